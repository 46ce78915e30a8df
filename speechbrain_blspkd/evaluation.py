"""Decoding and scoring: speech-vs-text parity of a speech LLM.

For every evaluation task (an instruction such as "Repeat ..." or "Continue
..."), the model answers each test utterance twice through the same prompt
builder: from the **speech** (student) and from the **transcript** (the text
teacher: the same LLM with PLoRA off).  The agreement of the two answers
(chrF and WER, speech answer scored against the teacher's) is reported
beside a shuffled-pair baseline (teacher answers matched to the wrong
utterances), with the number of speech embeddings against the transcript's
token count.
Rows with a ``translation`` or ``answer`` column are also scored against
those references (BLEU/chrF, QA accuracy) through
:class:`~speechbrain_blspkd.metrics.EvalSummary`.

Decoding is split across ranks under ``torchrun`` (rank ``r`` takes rows
``r::world``); the rows travel through the process group and every rank
merges them in ID order, so distributed decoding gives exactly the rows of
one process, and no node reads another node's files.

A task whose instruction is ``None`` (YAML ``null``) takes each row's own
``instruction`` column: spoken questions over a passage (Audio-MLQA,
:mod:`speechbrain_blspkd.dataprep.audio_mlqa`), where every row carries
its passage in its instruction.  Any exported model scores any manifest
from the command line::

    python -m speechbrain_blspkd.evaluation MODEL_FOLDER MANIFEST OUT \
        [--data-root DIR] [--task qa] [--task repeat="Repeat the text:"]

The teacher's answers are cached beside the evaluation folders
(``teacher_answers.json``) under a key of everything that changes them:
:mod:`speechbrain_blspkd.teacher_answers`.
"""

import json
import logging
import pathlib

import speechbrain as sb
import torch
from tqdm import tqdm

from speechbrain_blspkd.dataio.audio import load_row_audio
from speechbrain_blspkd.dataio.manifest import read_manifest
from speechbrain_blspkd.metrics import (
    EvalSummary,
    format_summary,
    summarize_parity,
)
from speechbrain_blspkd.teacher_answers import (
    cached_teacher_answers,
    load_teacher_answers,
    store_teacher_answers,
    teacher_keys,
)
from speechbrain_blspkd.utils.atomic import atomic_write_text
from speechbrain_blspkd.utils.distributed import gather_results, shard

logger = logging.getLogger(__name__)


def instructions_for(rows, instruction, source=None):
    """What to ask ``rows`` for a task: the task's instruction (one
    string), or, when it is ``None``, each row's ``instruction`` column
    (a list).

    Example
    -------
    >>> rows = [{"ID": "a", "instruction": " Q? "}, {"ID": "b", "instruction": "R?"}]
    >>> instructions_for(rows, None), instructions_for(rows, "Repeat:")
    (['Q?', 'R?'], 'Repeat:')
    >>> instructions_for([{"ID": "c", "instruction": ""}], None, "t.csv")
    Traceback (most recent call last):
    ...
    ValueError: t.csv: row c has no instruction (the task takes each row's own)
    """
    if instruction is not None:
        return instruction
    out = []
    for row in rows:
        text = (row.get("instruction") or "").strip()
        if not text:
            raise ValueError(
                f"{source or 'manifest'}: row {row.get('ID')} has no "
                "instruction (the task takes each row's own)"
            )
        out.append(text)
    return out


def _pad(tensors):
    """Right-padded batch and SpeechBrain relative lengths."""
    from speechbrain.utils.data_utils import batch_pad_right

    return batch_pad_right([t.float() for t in tensors])


def speech_batch(rows, feature_cache, sample_rate, device, source=None):
    """Model keyword arguments for the speech of ``rows``.

    Arguments
    ---------
    rows : list of dict
        Manifest rows (``ID``, ``wav`` ...).
    feature_cache : FeatureCache or None
        Cached encoder features (read by row ID) instead of the audio.
    sample_rate : int
        Rate the audio is loaded at.
    device : str or torch.device
        Where the tensors go.
    source : str or pathlib.Path, optional
        The manifest, named in bad-audio errors.

    Returns
    -------
    dict
        ``feats``/``feat_lens`` (cache) or ``wavs``/``wav_lens``: padded
        batches and SpeechBrain relative lengths.
    """
    if feature_cache is not None:
        feats, rel = _pad([feature_cache.get(r["ID"]) for r in rows])
        return {"feats": feats.to(device), "feat_lens": rel.to(device)}
    wavs, rel = _pad(
        [load_row_audio(r, source, sample_rate=sample_rate) for r in rows]
    )
    return {"wavs": wavs.to(device), "wav_lens": rel.to(device)}


def decode_rows(
    model,
    rows,
    tasks,
    batch_size=8,
    max_new_tokens=48,
    feature_cache=None,
    sample_rate=16000,
    teacher_cache=None,
    source=None,
):
    """Speech and text answers of ``model`` for every row and task.

    Arguments
    ---------
    model : SpeechLLMModel
        The model.
    rows : list of dict
        Manifest rows (``wav`` resolved).
    tasks : dict
        ``{task name: instruction}``; instruction ``None``: each row's
        ``instruction`` column.
    batch_size : int
        Utterances per generation batch.
    max_new_tokens : int
        Generation limit.
    feature_cache : FeatureCache, optional
        Cached encoder features instead of audio.
    sample_rate : int
        Audio rate.
    teacher_cache : dict, optional
        ``{(task, id): text}`` of earlier teacher answers (the teacher does
        not change during training); filled in place.
    source : str, optional
        The manifest of ``rows``, named in errors.

    Returns
    -------
    list of dict
        One row per (utterance, task): ``id`` (``<ID>/<task>``), ``utt``,
        ``task``, ``language``, ``hyp`` (speech answer), ``teacher`` (text
        answer), ``transcript``, ``num_pred``, ``num_target``,
        ``instruction`` for a task of per-row instructions and, for the
        ``repeat`` task or rows with a translation/answer, ``ref`` /
        ``answers``.

    Raises
    ------
    speechbrain_blspkd.prompt.ContextLengthError
        A prompt (text: before decoding starts; speech: before its batch)
        plus ``max_new_tokens`` is longer than the LLM context; the message
        names ``source`` and the row.
    """
    device = model.embed_tokens.weight.device
    teacher_cache = {} if teacher_cache is None else teacher_cache
    for instruction in tasks.values():  # the text prompts, up front
        model.check_fits(
            instructions_for(rows, instruction, source),
            max_new_tokens,
            transcripts=[r["transcript"] for r in rows],
            names=[r["ID"] for r in rows],
            source=source,
        )
    out = []
    order = sorted(rows, key=lambda r: (r["duration"], r["ID"]))
    batches = [
        order[i : i + batch_size] for i in range(0, len(order), batch_size)
    ]
    for name, instruction in tasks.items():
        for chunk in tqdm(batches, desc=f"decode {name}", leave=False):
            speech = speech_batch(
                chunk, feature_cache, sample_rate, device, source
            )
            asked = instructions_for(chunk, instruction, source)
            hyps, counts = model.generate(
                instructions=asked,
                max_new_tokens=max_new_tokens,
                return_num_tokens=True,
                names=[r["ID"] for r in chunk],
                source=source,
                **speech,
            )
            missing = [r for r in chunk if (name, r["ID"]) not in teacher_cache]
            if missing:
                texts = model.generate_text(
                    [r["transcript"] for r in missing],
                    instructions=instructions_for(missing, instruction),
                    max_new_tokens=max_new_tokens,
                )
                for r, t in zip(missing, texts):
                    teacher_cache[(name, r["ID"])] = t
            targets = model.transcript_ids([r["transcript"] for r in chunk])
            for k, (r, hyp, n_pred, ids) in enumerate(
                zip(chunk, hyps, counts.tolist(), targets)
            ):
                n_tgt = len(ids)
                row = {
                    "id": f"{r['ID']}/{name}",
                    "utt": r["ID"],
                    "task": name,
                    "language": r["language"],
                    "hyp": hyp,
                    "teacher": teacher_cache[(name, r["ID"])],
                    "transcript": r["transcript"],
                    "num_pred": int(n_pred),
                    "num_target": int(n_tgt),
                }
                if instruction is None:
                    row["instruction"] = asked[k]
                if name == "repeat":
                    row["ref"] = r["transcript"]
                elif name == "translate" and r.get("translation"):
                    row["ref"] = r["translation"]
                if name == "qa" and r.get("answer"):
                    row["answers"] = r["answer"].split("|")
                out.append(row)
    return out


def evaluate_parity(
    model,
    manifest,
    data_root,
    tasks,
    out_folder,
    batch_size=8,
    max_new_tokens=48,
    max_utterances=None,
    feature_cache=None,
    sample_rate=16000,
    plot_utterances=0,
):
    """Decode a test manifest on every rank, merge, score and write files.

    Call it on every rank (a collective): rank ``r`` of ``n`` decodes rows
    ``r::n`` and the rows are merged through the process group.  Writes
    ``rows.jsonl`` (one line per utterance and task) and ``summary.json``
    into ``out_folder`` (main process, atomically), ``adapter_<ID>.png``
    figures of the first ``plot_utterances`` utterances when the adapter
    draws any (:meth:`SpeechAdapter.plot`), and the teacher's answers into
    ``out_folder/../teacher_answers.json`` (the first process of every
    node: each node keeps its own), reused by later evaluations with the
    same :func:`~speechbrain_blspkd.teacher_answers.teacher_keys`.

    Returns
    -------
    dict
        The summary (on every rank).
    """
    out_folder = pathlib.Path(out_folder)
    rows = read_manifest(manifest, data_root=data_root)
    if max_utterances:
        rows = rows[: int(max_utterances)]
    keys = teacher_keys(model, tasks, max_new_tokens)
    teacher_file = out_folder.parent / "teacher_answers.json"
    stored = load_teacher_answers(teacher_file)
    parts = gather_results(
        decode_rows,
        model,
        shard(rows),
        tasks,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        feature_cache=feature_cache,
        sample_rate=sample_rate,
        teacher_cache=cached_teacher_answers(stored, keys, rows, tasks),
        source=str(manifest),
    )
    merged = EvalSummary.merge(parts).rows
    summary = summarize_parity(merged)
    if sb.utils.distributed.is_local_rank_zero():  # every node's own cache
        store_teacher_answers(teacher_file, stored, keys, merged, tasks)
    if sb.utils.distributed.if_main_process():
        out_folder.mkdir(parents=True, exist_ok=True)
        EvalSummary(merged).write_rows(out_folder / "rows.jsonl")
        atomic_write_text(
            out_folder / "summary.json", json.dumps(summary, indent=1)
        )
        if plot_utterances:
            plot_adapter_examples(
                model,
                rows[: int(plot_utterances)],
                out_folder,
                feature_cache,
                sample_rate,
            )
    return summary


@torch.no_grad()
def plot_adapter_examples(model, rows, out_folder, feature_cache, sample_rate):
    """The adapter's figure of each row (nothing for adapters that draw
    none), with the transcript tokens as labels.

    Returns
    -------
    list of pathlib.Path
        The files written.
    """
    from speechbrain_blspkd.nnet.adapter import AdapterTargets

    device = model.embed_tokens.weight.device
    written = []
    if model.adapter is None:
        return written
    was_training = model.training
    model.eval()
    try:
        for r in rows:
            speech = speech_batch([r], feature_cache, sample_rate, device)
            ids = model.transcript_ids([r["transcript"]])[0]
            targets = AdapterTargets(num_tokens=torch.tensor([len(ids)]))
            out = model.encode_speech(targets=targets, **speech)
            path = pathlib.Path(out_folder) / f"adapter_{r['ID']}.png"
            tokens = [model.tokenizer.decode([i]) for i in ids]
            if model.adapter.plot(out, 0, path, tokens=tokens):
                written.append(path)
    finally:
        model.train(was_training)
    return written


def _task_argument(text):
    """``name=instruction`` or ``name`` (each row's own instruction)."""
    name, sep, instruction = text.partition("=")
    if not name.strip():
        raise ValueError(f"--task {text!r}: give NAME or NAME=INSTRUCTION")
    return name.strip(), (instruction if sep else None)


def build_parser():
    """The command line of ``python -m speechbrain_blspkd.evaluation``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m speechbrain_blspkd.evaluation",
        description=(
            "Score an exported speech LLM on a manifest: each task's speech "
            "answer against the text teacher's (same LLM, transcript as "
            "text), per language, beside the shuffled-pair level; QA "
            "accuracy for rows with answers."
        ),
    )
    parser.add_argument("model", help="exported model folder")
    parser.add_argument("manifest", help="manifest CSV (audio rows)")
    parser.add_argument("out", help="output folder (rows.jsonl, summary.json)")
    parser.add_argument(
        "--data-root",
        default=None,
        help="what $data_root stands for (default: the manifest's folder)",
    )
    parser.add_argument(
        "--task",
        action="append",
        default=None,
        help=(
            "NAME=INSTRUCTION, or NAME alone for each row's own instruction "
            "column (e.g. Audio-MLQA: --task qa); repeatable; default: "
            "repeat, and continue with the model's own instruction"
        ),
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--max-utterances", type=int, default=None)
    parser.add_argument("--device", default=None)
    return parser


#: The "repeat" task's instruction (also :mod:`speechbrain_blspkd.hearing`'s).
REPEAT_INSTRUCTION = "Repeat the following text exactly:"


def main(argv=None):
    """Evaluate; print the table; return the exit status.

    Example
    -------
    >>> import tempfile
    >>> main([tempfile.mkdtemp(), "missing.csv", tempfile.mkdtemp()])
    2
    """
    from speechbrain_blspkd.inference.model_folder import ModelFolderError
    from speechbrain_blspkd.utils.cli import report_error, setup_logging

    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        tasks = dict(_task_argument(t) for t in args.task or ())
        manifest = pathlib.Path(args.manifest)
        if not manifest.is_file():
            raise FileNotFoundError(f"no manifest {manifest}")
        from speechbrain_blspkd.inference import SpeechLLM

        device = args.device or sb.utils.distributed.infer_device()
        model = SpeechLLM.from_hparams(
            source=args.model, run_opts={"device": device}
        ).model.eval()
        # default: repeat, and continue with the model's own instruction
        tasks = tasks or {
            "repeat": REPEAT_INSTRUCTION,
            "continue": model.instruction,
        }
        summary = evaluate_parity(
            model,
            manifest,
            args.data_root or str(manifest.resolve().parent),
            tasks,
            args.out,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            max_utterances=args.max_utterances,
        )
    except (ModelFolderError, FileNotFoundError, ValueError) as err:
        return report_error(err, prog="evaluation", status=2)
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
