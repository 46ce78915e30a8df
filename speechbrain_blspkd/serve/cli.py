"""``blspkd-serve``: serve exported models over an OpenAI-compatible API.

::

    blspkd-serve --model DIR [--model NAME=DIR ...] [--host 127.0.0.1] \\
        [--port 8000] [--max-batch 8] [--max-wait-ms 20] [--device cpu|cuda]

A model is named by its folder's name (``NAME=DIR`` names it otherwise);
clients pick it with ``"model": NAME`` (``GET /v1/models`` lists them). See
:mod:`speechbrain_blspkd.serve.app` for the endpoints.
"""

import argparse
import logging
import pathlib
import sys

from speechbrain_blspkd.utils.cli import report_error

PROG = "blspkd-serve"


def build_parser():
    """The argument parser.

    Example
    -------
    >>> args = build_parser().parse_args(["--model", "m"])
    >>> args.port, args.max_batch, args.max_wait_ms
    (8000, 8, 20.0)
    """
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Serve exported speech LLM folders over an "
        "OpenAI-compatible HTTP API (chat completions with input_audio), "
        "batching concurrent requests.",
    )
    parser.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="[NAME=]DIR",
        help="exported model folder (repeat for several)",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--max-batch", type=int, default=8, help="requests decoded together"
    )
    parser.add_argument(
        "--max-wait-ms",
        type=float,
        default=20.0,
        help="longest wait for a batch to fill (ms)",
    )
    parser.add_argument(
        "--max-audio-mb",
        type=float,
        default=25.0,
        help="largest audio file accepted (MiB)",
    )
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 ... (default: auto)"
    )
    parser.add_argument("--log-level", default="info")
    return parser


def model_names(specs):
    """``{name: folder}`` from ``[NAME=]DIR`` arguments.

    Example
    -------
    >>> model_names(["runs/a/model", "b=runs/b/model"])
    {'model': 'runs/a/model', 'b': 'runs/b/model'}
    >>> model_names(["x/model", "y/model"])
    Traceback (most recent call last):
    ...
    ValueError: two models named 'model': name them with NAME=DIR
    """
    out = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep:
            folder = spec
            name = pathlib.Path(spec).resolve().name or spec
        if name in out:
            raise ValueError(
                f"two models named {name!r}: name them with NAME=DIR"
            )
        out[name] = folder
    return out


def main(argv=None):
    """Load the models and serve until interrupted (exit status)."""
    args = build_parser().parse_args(argv)
    if args.max_batch < 1:
        return report_error("--max-batch must be >= 1", prog=PROG, status=2)
    if args.max_wait_ms < 0:
        return report_error("--max-wait-ms must be >= 0", prog=PROG, status=2)
    try:
        import uvicorn

        from speechbrain_blspkd.serve.app import create_app
    except ImportError as err:
        return report_error(str(err), prog=PROG, status=2)
    from speechbrain_blspkd.inference.model_folder import ModelFolderError
    from speechbrain_blspkd.inference.speech_llm import SpeechLLM

    logging.basicConfig(level=args.log_level.upper())
    try:
        folders = model_names(args.model)
    except ValueError as err:
        return report_error(str(err), prog=PROG, status=2)
    run_opts = {"device": args.device} if args.device else None
    models = {}
    for name, folder in folders.items():
        try:
            models[name] = SpeechLLM.from_hparams(
                source=folder, run_opts=run_opts
            )
        except (ModelFolderError, FileNotFoundError, ValueError) as err:
            return report_error(f"{folder}: {err}", prog=PROG, status=2)
        print(f"{PROG}: loaded {name!r} from {folder}", file=sys.stderr)
    app = create_app(
        models,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_audio_bytes=int(args.max_audio_mb * 1024 * 1024),
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
