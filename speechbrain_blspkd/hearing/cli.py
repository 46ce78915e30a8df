"""The command line of the hearing measurement
(``python -m speechbrain_blspkd.hearing``).

Authors
 * speechbrain-blspkd contributors 2026
"""

import argparse

from speechbrain_blspkd.hearing.measure import measure
from speechbrain_blspkd.hearing.report import format_tables
from speechbrain_blspkd.utils.cli import report_run, setup_logging


def build_parser():
    """The argument parser of ``python -m speechbrain_blspkd.hearing``.

    Each option's destination is the parameter of :func:`measure` it sets.

    Example
    -------
    >>> args = build_parser().parse_args(["--model", "m", "--synth-folder", "d"])
    >>> args.piper_num, args.cascade, args.max_new_tokens, args.decode
    (100, True, 32, True)
    >>> args.ladder, args.model_folder
    (False, 'm')
    >>> import inspect
    >>> set(vars(args)) <= set(inspect.signature(measure).parameters)
    True
    """
    parser = argparse.ArgumentParser(
        prog="python -m speechbrain_blspkd.hearing",
        description="Does a speech LLM hear what was said? Measure an "
        "exported model on the SynthSpeech unseen-voice English test and on "
        "a piper (unseen engine) test, beside the cascade.",
    )
    parser.add_argument(
        "--model",
        dest="model_folder",
        metavar="MODEL",
        required=True,
        help="exported model folder (or run folder)",
    )
    parser.add_argument(
        "--synth-folder", required=True, help="the SynthSpeech corpus folder"
    )
    parser.add_argument(
        "--out",
        dest="out_folder",
        metavar="OUT",
        default="results/hearing",
        help="report folder",
    )
    parser.add_argument(
        "--cache-dir",
        default="results/hearing_cache",
        help="teacher answers and cascade results (keyed by content)",
    )
    parser.add_argument(
        "--train-manifest", default=None, help="default: SYNTH_FOLDER/train.csv"
    )
    parser.add_argument("--piper-folder", default=None)
    parser.add_argument("--piper-num", type=int, default=100)
    parser.add_argument(
        "--asr", default="whisper-base", help="cascade recogniser"
    )
    parser.add_argument("--asr-max-new-tokens", type=int, default=96)
    parser.add_argument(
        "--no-cascade",
        dest="cascade",
        action="store_false",
        help="skip the cascade",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--max-utterances", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument(
        "--tokens-only",
        dest="decode",
        action="store_false",
        help="only the adapter's token and count figures (no decoding, no "
        "cascade): the quick measurement of an ablation",
    )
    parser.add_argument(
        "--ladder",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also the quality ladder: repeat agreement when the LLM is fed "
        "the transcript's token embeddings, the adapter's outputs at the "
        "true and at the predicted count, raw and snapped to their nearest "
        "tokens (CIF adapters only; 5 more repeat decodings per set, so "
        "off by default)",
    )
    return parser


def main(argv=None):
    """Run the measurement; print the tables; return the exit status.

    Example
    -------
    >>> import tempfile
    >>> main(["--model", tempfile.mkdtemp(), "--synth-folder", "d"])
    2
    """
    args = build_parser().parse_args(argv)
    setup_logging()
    from speechbrain_blspkd.inference.model_folder import ModelFolderError

    def run():
        return format_tables(measure(**vars(args)))

    errors = (ModelFolderError, FileNotFoundError, RuntimeError, ValueError)
    return report_run(errors, run, prog="hearing", status=2)
