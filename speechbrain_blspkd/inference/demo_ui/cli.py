"""The ``blspkd-demo-ui`` command: load the models and the recogniser,
serve the page.

::

    blspkd-demo-ui --model FOLDER [--model FOLDER2 ...] [--host 127.0.0.1] \\
        [--port 7860] [--asr whisper-base|FOLDER|none] [--device cpu|cuda] \\
        [--max-new-tokens N] [--instruction TEXT ...]

The cascade's recogniser (``--asr``) is an asset name or folder, by
default the model's own recogniser for an exported cascade, else
``whisper-base``; ``none``: no cascade.  Several ``--model`` folders are
compared side by side, one column each; a missing folder or a missing
gradio is reported and exits with status 2.
"""

import argparse
import logging
import os
import pathlib

from speechbrain_blspkd.inference.demo_ui.backend import DemoBackend
from speechbrain_blspkd.inference.demo_ui.page import CSS, build_app, theme
from speechbrain_blspkd.utils.cli import report_error

logger = logging.getLogger(__name__)

PROG = "blspkd-demo-ui"

DEMO_EXTRA_HINT = (
    "the browser demo needs gradio: pip install 'speechbrain_blspkd[demo]'"
)


def _labels(folders):
    """Column titles: the folder names (``parent/model`` for a folder named
    ``model``, as recipes export), made unique."""
    names = []
    for folder in folders:
        path = pathlib.Path(folder).resolve()
        name = path.name or str(folder)
        if name in ("model", "export") and path.parent.name:
            name = f"{path.parent.name}/{name}"
        names.append(name)
    out = []
    for i, name in enumerate(names):
        out.append(name if names.count(name) == 1 else f"{name} ({i + 1})")
    return out


def build_parser():
    """The argument parser of ``blspkd-demo-ui``.

    Example
    -------
    >>> args = build_parser().parse_args(["--model", "a", "--model", "b"])
    >>> args.model, args.host, args.port
    (['a', 'b'], '127.0.0.1', 7860)
    """
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Browser demo: speak to exported speech LLM folders.",
    )
    parser.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="FOLDER",
        help="exported model folder (repeat to compare models side by side)",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to serve on"
    )
    parser.add_argument("--port", type=int, default=7860, help="port")
    parser.add_argument(
        "--asr",
        default=None,
        help="Whisper of the cascade: asset name or folder, or 'none' "
        "(default: the model's recogniser, else whisper-base)",
    )
    parser.add_argument(
        "--instruction",
        action="append",
        default=[],
        help="an instruction to offer first (repeatable)",
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=None, help="generation limit"
    )
    parser.add_argument(
        "--device", default=None, help="cpu, cuda ... (default: auto)"
    )
    return parser


def _asr_source(args, models):
    if args.asr is not None:
        return None if args.asr.lower() == "none" else args.asr
    for _, llm in models:
        source = getattr(llm.hparams, "transcriber_source", None)
        if source:
            return source
    return "whisper-base"


def load_backend(args):
    """Load the models and the recogniser named on the command line."""
    from speechbrain_blspkd.inference.speech_llm import SpeechLLM

    run_opts = {"device": args.device} if args.device else None
    models = []
    for label, folder in zip(_labels(args.model), args.model):
        logger.info("loading %s", folder)
        models.append(
            (label, SpeechLLM.from_hparams(source=folder, run_opts=run_opts))
        )
    transcriber = None
    source = _asr_source(args, models)
    if source is not None:
        import json

        from speechbrain_blspkd.inference.export import resolve_source
        from speechbrain_blspkd.nnet.whisper_asr import WhisperTranscriber

        logger.info("loading the cascade's recogniser %s", source)
        folder = resolve_source(source)
        config = json.loads((folder / "config.json").read_text())
        # as long as a 30-s clip needs, within the decoder's positions
        room = int(config.get("max_target_positions", 448)) - 4
        transcriber = WhisperTranscriber(folder, max_new_tokens=min(96, room))
        transcriber.to(models[0][1].device).eval()
    return DemoBackend(models, transcriber, args.max_new_tokens)


def main(argv=None):
    """Run ``blspkd-demo-ui`` (serves until interrupted).

    Returns
    -------
    int
        0 after a normal stop; 2 on bad input (a missing model folder,
        gradio not installed).
    """
    from speechbrain_blspkd.inference.export import (
        ModelFolderError,
        check_model_folder,
    )
    from speechbrain_blspkd.utils.cli import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401
    except ImportError:
        return report_error(DEMO_EXTRA_HINT, prog=PROG, status=2)
    try:
        for folder in args.model:
            check_model_folder(folder)
        backend = load_backend(args)
    except (ModelFolderError, FileNotFoundError, ValueError) as err:
        return report_error(err, prog=PROG, status=2)
    app = build_app(backend, args.instruction)
    app.queue(default_concurrency_limit=1)
    app.launch(
        server_name=args.host,
        server_port=args.port,
        theme=theme(),
        css=CSS,
        allowed_paths=[str(backend.plot_dir)],
        max_file_size="50mb",
        show_error=True,
        quiet=False,
    )
    return 0
