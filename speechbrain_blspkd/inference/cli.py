"""``blspkd-infer``: answer spoken (or written) instructions from the shell.

::

    blspkd-infer --model FOLDER --wav a.wav [--wav b.wav ...] \\
        [--instruction TEXT] [--text TRANSCRIPT] [--max-new-tokens N] \\
        [--beams N] [--device cpu|cuda]

Prints one answer per input: the bare answer for a single input, else
``<input>: <answer>`` lines (``--wav`` files first, then ``--text``). Bad
inputs (missing model folder or file, unreadable audio, weights that do not
fit) give a one-line error on stderr and exit status 2.

Authors
 * speechbrain-blspkd contributors 2025
"""

import argparse
import sys

from speechbrain_blspkd.utils.cli import report_error

__all__ = ["build_parser", "main"]


def build_parser():
    """The argument parser of ``blspkd-infer``.

    Example
    -------
    >>> args = build_parser().parse_args(["--model", "m", "--wav", "a.wav"])
    >>> args.wav, args.beams
    (['a.wav'], None)
    """
    parser = argparse.ArgumentParser(
        prog="blspkd-infer",
        description="Answer audio files (and transcripts) with an exported "
        "speech LLM folder (any method).",
    )
    parser.add_argument("--model", required=True, help="exported model folder")
    parser.add_argument(
        "--wav",
        action="append",
        default=[],
        metavar="FILE",
        help="audio file (repeat for several; decoded as one batch)",
    )
    parser.add_argument(
        "--instruction",
        default=None,
        help="instruction (default: the model's own)",
    )
    parser.add_argument(
        "--text",
        action="append",
        default=[],
        metavar="TRANSCRIPT",
        help="also answer this transcript as text (the teacher side)",
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=None, help="generation limit"
    )
    parser.add_argument(
        "--beams", type=int, default=None, help="beam size (1 = greedy)"
    )
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 ... (default: auto)"
    )
    return parser


def _fail(message):
    return report_error(message, prog="blspkd-infer", status=2)


def main(argv=None):
    """Run ``blspkd-infer``; return the exit status (0, or 2 on bad input).

    Arguments
    ---------
    argv : list of str, optional
        Arguments (default ``sys.argv[1:]``).

    Returns
    -------
    int

    Example
    -------
    >>> import tempfile
    >>> main(["--model", tempfile.mkdtemp(), "--wav", "missing.wav"])
    2
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.wav and not args.text:
        parser.error("give at least one --wav FILE or --text TRANSCRIPT")
    for name in ("max_new_tokens", "beams"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")

    if args.device and args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return _fail(f"--device {args.device}: CUDA is not available")

    from speechbrain_blspkd.dataio.audio import AudioError, load_audio
    from speechbrain_blspkd.inference.export import (
        ModelFolderError,
        check_model_folder,
    )
    from speechbrain_blspkd.models.trainable import WeightsMismatchError

    try:
        check_model_folder(args.model)
        for path in args.wav:  # fail fast, before loading the model
            load_audio(path)
    except (ModelFolderError, AudioError) as err:
        return _fail(err)

    from speechbrain_blspkd.inference.speech_llm import SpeechLLM

    gen = {}
    if args.max_new_tokens is not None:
        gen["max_new_tokens"] = args.max_new_tokens
    if args.beams is not None:
        gen["num_beams"] = args.beams
    run_opts = {"device": args.device} if args.device else None
    try:
        model = SpeechLLM.from_hparams(source=args.model, run_opts=run_opts)
        outputs = []
        if args.wav:
            answers = model.generate_files(args.wav, args.instruction, **gen)
            outputs += list(zip(args.wav, answers))
        if args.text:
            answers = model.generate_text(args.text, args.instruction, **gen)
            outputs += list(zip(args.text, answers))
    except (
        ModelFolderError,
        WeightsMismatchError,
        AudioError,
        FileNotFoundError,
        ValueError,
    ) as err:
        return _fail(err)
    if len(outputs) == 1:
        print(outputs[0][1])
    else:
        for label, answer in outputs:
            print(f"{label}: {answer}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
