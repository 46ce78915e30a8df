"""``blspkd-infer``: answer spoken (or written) instructions from the shell.

::

    blspkd-infer --model FOLDER [--wav a.wav ...] [--wav-list FILE] \\
        [--manifest CSV [--data-root DIR]] [--text TRANSCRIPT ...] \\
        [--instruction TEXT] [--out ANSWERS.jsonl] [--batch-size N] \\
        [--format auto|text|jsonl] [--max-new-tokens N] [--beams N] \\
        [--device cpu|cuda] [--no-progress] [--overwrite]

Inputs
    ``--wav`` (repeatable), ``--wav-list`` (a text file, one audio path a
    line; blank lines and lines starting with ``#`` are skipped; relative
    paths are relative to the current folder) and ``--manifest`` (a CSV of
    the project's manifest schema, :mod:`speechbrain_blspkd.dataio.manifest`;
    ``$data_root`` in its ``wav`` column becomes ``--data-root``, default
    the manifest's folder) can be combined; ``--text`` also answers a
    transcript as text (the teacher side). The id of a ``--wav`` /
    ``--wav-list`` input is its path as given, of a manifest row its ``ID``,
    of a ``--text`` its text. An input given twice is answered once.

Instruction
    ``--instruction`` for every input; else a manifest row's
    ``instruction`` column when it is set; else the model's own.

Decoding
    Audio is decoded in batches of ``--batch-size`` files of similar length
    (sorted longest first, so a batch pads little) through
    :meth:`SpeechLLM.generate_waveforms
    <speechbrain_blspkd.inference.speech_llm.SpeechLLM.generate_waveforms>`:
    the answers are those of one-by-one decoding. A batch that fails (a
    prompt too long for the LLM context ...) is decoded again file by file,
    so only the files at fault fail. A progress bar runs on stderr
    (``--no-progress``: none).

Output
    JSON lines, one per answered input, in decoding order::

        {"id": ..., "file": ..., "instruction": ..., "answer": ...,
         "seconds": ...}

    ``seconds`` is the audio's duration (``file`` and ``seconds`` are null,
    and ``text`` holds the transcript, for a ``--text`` input). They go to
    ``--out`` (each line appended whole once its batch is decoded) or to
    stdout. ``--format text`` prints ``<input>: <answer>`` lines in input
    order instead (the bare answer for one input); ``auto`` (default) is
    ``text`` when only ``--wav`` / ``--text`` are given without ``--out``,
    else ``jsonl``.

Resuming
    When ``--out`` exists the inputs whose id it already holds are skipped
    (a truncated last line, from an interrupted run, is dropped first), so
    rerunning the same command finishes an interrupted job; ``--overwrite``
    starts the file afresh.

Errors
    A bad input (missing, unreadable or too long audio, a prompt longer than
    the LLM context) is reported on stderr as ``blspkd-infer: error: ...``
    naming it; the others are still answered, the failures are counted at
    the end and the exit status is 1. A bad invocation (missing model
    folder, unreadable ``--wav-list`` / ``--manifest``, weights that do not
    fit) is a one-line error and exit status 2. Otherwise 0.

Where it lives
    This module holds the command line and the batch loop; the inputs are
    gathered in :mod:`speechbrain_blspkd.inference.batch_inputs`, the
    answers file is written and resumed by
    :mod:`speechbrain_blspkd.inference.answers_file`.

Authors
 * speechbrain-blspkd contributors 2025
"""

import argparse
import sys
import time

from speechbrain_blspkd.inference.answers_file import JsonlWriter, read_done_ids
from speechbrain_blspkd.inference.batch_inputs import (
    Input,
    InputError,
    collect_inputs,
    length_sorted_batches,
    probe_audio,
)
from speechbrain_blspkd.utils.cli import report_error

__all__ = [
    "Input",
    "JsonlWriter",
    "build_parser",
    "collect_inputs",
    "length_sorted_batches",
    "main",
    "read_done_ids",
]

PROG = "blspkd-infer"


def build_parser():
    """The argument parser of ``blspkd-infer``.

    Example
    -------
    >>> args = build_parser().parse_args(["--model", "m", "--wav", "a.wav"])
    >>> args.wav, args.beams, args.batch_size
    (['a.wav'], None, 8)
    """
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Answer audio files (and transcripts) with an exported "
        "speech LLM folder (any method), in length-sorted batches.",
    )
    parser.add_argument("--model", required=True, help="exported model folder")
    parser.add_argument(
        "--wav",
        action="append",
        default=[],
        metavar="FILE",
        help="audio file (repeat for several)",
    )
    parser.add_argument(
        "--wav-list",
        action="append",
        default=[],
        metavar="FILE",
        help="text file with one audio path a line (# comments)",
    )
    parser.add_argument(
        "--manifest",
        action="append",
        default=[],
        metavar="CSV",
        help="manifest CSV (ID, wav, duration, ...; optional instruction)",
    )
    parser.add_argument(
        "--data-root",
        default=None,
        metavar="DIR",
        help="replaces $data_root in manifest wav paths (default: the "
        "manifest's folder)",
    )
    parser.add_argument(
        "--instruction",
        default=None,
        help="instruction for every input (default: a manifest row's, else "
        "the model's own)",
    )
    parser.add_argument(
        "--text",
        action="append",
        default=[],
        metavar="TRANSCRIPT",
        help="also answer this transcript as text (the teacher side)",
    )
    parser.add_argument(
        "--out",
        default=None,
        metavar="FILE",
        help="append JSON lines here (resumes: ids already there are "
        "skipped); default stdout",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start --out afresh instead of resuming it",
    )
    parser.add_argument(
        "--format",
        choices=("auto", "text", "jsonl"),
        default="auto",
        help="stdout format (auto: text for plain --wav/--text, else jsonl)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=8, help="files decoded together"
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar"
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
    return report_error(message, prog=PROG, status=2)


class _Run:
    """Decodes batches, writes records, counts failures."""

    def __init__(self, model, args, writer, bar, text_mode):
        self.model = model
        self.args = args
        self.writer = writer
        self.bar = bar
        self.text_mode = text_mode
        self.gen = {}
        if args.max_new_tokens is not None:
            self.gen["max_new_tokens"] = args.max_new_tokens
        if args.beams is not None:
            self.gen["num_beams"] = args.beams
        self.answers = {}
        self.failed = []

    def instruction(self, item):
        if self.args.instruction is not None:
            return self.args.instruction
        if item.instruction is not None:
            return item.instruction
        return self.model.default_instruction(audio=item.text is None)

    def fail(self, item, message):
        self.failed.append(item.id)
        text = f"{PROG}: error: {message}"
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def record(self, item, instruction, answer, started):
        return {
            "id": item.id,
            "file": item.file,
            "instruction": instruction,
            "answer": answer,
            "seconds": None if item.seconds is None else round(item.seconds, 3),
            **({"text": item.text} if item.text is not None else {}),
            "decode_seconds": round(time.perf_counter() - started, 3),
        }

    def _decode(self, items, instructions):
        if items[0].text is not None:
            texts = [i.text for i in items]
            return self.model.generate_text(texts, instructions, **self.gen)
        wavs = [i.wav for i in items]
        names = [i.file for i in items]
        return self.model.generate_waveforms(
            wavs, instructions, names, **self.gen
        )

    def run_batch(self, batch):
        from speechbrain_blspkd.dataio.audio import AudioError

        started = time.perf_counter()
        ready = []
        for item in batch:
            if item.file is None:
                ready.append(item)
                continue
            try:
                item.wav = self.model.load_file(item.file)
            except (AudioError, OSError) as err:
                self.fail(item, err)
                continue
            ready.append(item)
        instructions = [self.instruction(i) for i in ready]
        done = []
        if ready:
            try:
                answers = self._decode(ready, instructions)
                done = list(zip(ready, instructions, answers))
            except (ValueError, RuntimeError) as err:
                if len(ready) == 1:
                    self.fail(ready[0], _named(ready[0], err))
                else:  # find the inputs at fault: one by one
                    for item, instruction in zip(ready, instructions):
                        try:
                            answer = self._decode([item], [instruction])[0]
                        except (ValueError, RuntimeError) as err:
                            self.fail(item, _named(item, err))
                            continue
                        done.append((item, instruction, answer))
        records = [self.record(i, ins, a, started) for i, ins, a in done]
        for item in batch:
            item.wav = None  # free the audio
        for rec in records:
            self.answers[rec["id"]] = rec["answer"]
        if not self.text_mode and records:
            self.writer.write(records)
        if self.bar is not None:
            self.bar.update(len(batch))


def _named(item, err):
    """The error message, naming the input when it does not already."""
    message = str(err)
    name = item.file or item.id
    return message if name in message else f"{name}: {message}"


def main(argv=None):
    """Run ``blspkd-infer``; return the exit status (0, 1 or 2).

    Arguments
    ---------
    argv : list of str, optional
        The command line after the program name (default
        ``sys.argv[1:]``).

    Returns
    -------
    int
        0: every input answered; 1: some inputs failed; 2: bad invocation.

    Example
    -------
    >>> import tempfile
    >>> main(["--model", tempfile.mkdtemp(), "--wav", "missing.wav"])
    2
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.wav or args.wav_list or args.manifest or args.text):
        parser.error(
            "give at least one --wav FILE, --wav-list FILE, --manifest CSV "
            "or --text TRANSCRIPT"
        )
    for name in ("max_new_tokens", "beams", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.overwrite and not args.out:
        parser.error("--overwrite needs --out")
    text_mode = args.format == "text" or (
        args.format == "auto"
        and not (args.out or args.wav_list or args.manifest)
    )
    if args.out and args.format == "text":
        parser.error("--format text prints to stdout; drop --out")

    if args.device and args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return _fail(f"--device {args.device}: CUDA is not available")

    from speechbrain_blspkd.inference.model_folder import (
        ModelFolderError,
        check_model_folder,
    )

    try:
        check_model_folder(args.model)
        items = collect_inputs(
            args.wav, args.wav_list, args.manifest, args.text, args.data_root
        )
    except (ModelFolderError, InputError) as err:
        return _fail(err)

    done = set()
    if args.out and not args.overwrite:
        done = read_done_ids(args.out)
    todo = [i for i in items if i.id not in done]
    skipped = len(items) - len(todo)
    if skipped:
        print(
            f"{PROG}: resuming {args.out}: {skipped} of {len(items)} inputs "
            "already answered",
            file=sys.stderr,
        )

    failed_early = []
    for item in todo:  # missing / unreadable files fail before the model loads
        if item.file is not None:
            message = probe_audio(item)
            if message:
                report_error(message, prog=PROG)
                failed_early.append(item.id)
    bad = set(failed_early)
    todo = [i for i in todo if i.id not in bad]

    writer = JsonlWriter(args.out, overwrite=args.overwrite)
    try:
        run = None
        if todo:
            run = _decode_all(args, todo, writer, text_mode)
            if isinstance(run, int):
                return run
    finally:
        writer.close()

    failed = failed_early + (run.failed if run else [])
    answered = len(todo) - len(run.failed if run else [])
    if text_mode and run is not None:
        outputs = [(i, run.answers[i.id]) for i in items if i.id in run.answers]
        if len(items) == 1 and outputs:
            print(outputs[0][1])
        else:
            for item, answer in outputs:
                print(f"{item.id}: {answer}")
    if not text_mode or failed:
        where = f" to {args.out}" if args.out else ""
        print(
            f"{PROG}: {answered} answered{where}, {len(failed)} failed, "
            f"{skipped} already done (of {len(items)} inputs)",
            file=sys.stderr,
        )
    return 1 if failed else 0


def _decode_all(args, todo, writer, text_mode):
    """Load the model and decode ``todo``; the run, or an exit status."""
    from speechbrain_blspkd.inference.model_folder import ModelFolderError
    from speechbrain_blspkd.inference.speech_llm import SpeechLLM
    from speechbrain_blspkd.models.trainable import WeightsMismatchError

    run_opts = {"device": args.device} if args.device else None
    try:
        model = SpeechLLM.from_hparams(source=args.model, run_opts=run_opts)
    except (
        ModelFolderError,
        WeightsMismatchError,
        FileNotFoundError,
        ValueError,
    ) as err:
        return _fail(err)
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(
            total=len(todo), unit="input", file=sys.stderr, dynamic_ncols=True
        )
    try:
        run = _Run(model, args, writer, bar, text_mode)
        audio = [i for i in todo if i.file is not None]
        texts = [i for i in todo if i.file is None]
        for group in (audio, texts):
            for batch in length_sorted_batches(group, args.batch_size):
                run.run_batch(batch)
    finally:
        if bar is not None:
            bar.close()
    return run


if __name__ == "__main__":
    sys.exit(main())
