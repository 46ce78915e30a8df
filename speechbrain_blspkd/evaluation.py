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
``r::world``); each rank writes its rows, and the main process merges them
in ID order, so distributed decoding gives exactly the rows of one process.
"""

import json
import logging
import os
import pathlib

import torch
from tqdm import tqdm

from speechbrain_blspkd import metrics
from speechbrain_blspkd.dataio.audio import load_row_audio
from speechbrain_blspkd.dataio.manifest import read_manifest
from speechbrain_blspkd.utils.atomic import atomic_write_text

logger = logging.getLogger(__name__)


def _rank_world():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


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
        ``{task name: instruction}``.
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
        answer), ``transcript``, ``num_pred``, ``num_target`` and, for the
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
            instruction,
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
            hyps, counts = model.generate(
                instructions=instruction,
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
                    instructions=instruction,
                    max_new_tokens=max_new_tokens,
                )
                for r, t in zip(missing, texts):
                    teacher_cache[(name, r["ID"])] = t
            targets = model.transcript_ids([r["transcript"] for r in chunk])
            for r, hyp, n_pred, ids in zip(
                chunk, hyps, counts.tolist(), targets
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
                if name == "repeat":
                    row["ref"] = r["transcript"]
                elif name == "translate" and r.get("translation"):
                    row["ref"] = r["translation"]
                if name == "qa" and r.get("answer"):
                    row["answers"] = r["answer"].split("|")
                out.append(row)
    return out


def summarize_parity(rows, seed=0):
    """Overall and per-language numbers of :func:`decode_rows` rows.

    Returns
    -------
    dict
        ``tasks``: per task ``speech`` (agreement of the speech answers with
        the teacher: chrF, WER, shuffled baseline), ``teacher`` (the
        teacher against itself: the upper bound) and, for ``repeat``, the
        teacher's and the speech answer's WER against the transcript;
        ``count``: exact-count rate and mean absolute count error;
        ``by_language``: :meth:`EvalSummary.summarize` output.
    """
    tasks = {}
    for task in sorted({r["task"] for r in rows}):
        sub = [r for r in rows if r["task"] == task]
        hyps = [r["hyp"] for r in sub]
        teach = [r["teacher"] for r in sub]
        entry = {
            "n": len(sub),
            "speech": metrics.parity_agreement(hyps, teach, seed=seed)
            if len(sub) > 1
            else metrics.parity_agreement(hyps, teach),
            "teacher": metrics.parity_agreement(teach, teach, seed=seed),
        }
        refs = [r.get("ref") for r in sub]
        if all(refs):
            entry["teacher_vs_ref_wer"] = metrics.wer(teach, refs)["wer"]
            entry["speech_vs_ref_wer"] = metrics.wer(hyps, refs)["wer"]
        tasks[task] = entry
    first_task = rows[0]["task"] if rows else None
    per_utt = [r for r in rows if r["task"] == first_task]
    count = metrics.count_stats(
        [r["num_pred"] for r in per_utt], [r["num_target"] for r in per_utt]
    )
    by_lang = metrics.EvalSummary(
        [{k: v for k, v in r.items() if k != "transcript"} for r in rows]
    ).summarize(seed=seed)
    return {"tasks": tasks, "count": count, "by_language": by_lang}


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

    Writes ``rows.jsonl`` (one line per utterance and task) and
    ``summary.json`` into ``out_folder`` (main process, atomically), and
    ``adapter_<ID>.png`` figures of the first ``plot_utterances``
    utterances when the adapter draws any (:meth:`SpeechAdapter.plot`).

    Returns
    -------
    dict
        The summary (on every rank).
    """
    out_folder = pathlib.Path(out_folder)
    rank, world = _rank_world()
    rows = read_manifest(manifest, data_root=data_root)
    if max_utterances:
        rows = rows[: int(max_utterances)]
    teacher_file = out_folder.parent / "teacher_answers.json"
    teacher_cache = {}
    if teacher_file.is_file():
        with open(teacher_file, encoding="utf-8") as f:
            teacher_cache = {
                tuple(k.split("\t", 1)): v for k, v in json.load(f).items()
            }
    mine = decode_rows(
        model,
        rows[rank::world],
        tasks,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        feature_cache=feature_cache,
        sample_rate=sample_rate,
        teacher_cache=teacher_cache,
        source=str(manifest),
    )
    out_folder.mkdir(parents=True, exist_ok=True)
    shard = out_folder / f"rows.rank{rank}.jsonl"
    atomic_write_text(shard, "".join(json.dumps(r) + "\n" for r in mine))
    _barrier()
    shards = [
        metrics.EvalSummary.load_rows(out_folder / f"rows.rank{r}.jsonl")
        for r in range(world)
    ]
    merged = metrics.EvalSummary.merge(shards).rows
    summary = summarize_parity(merged)
    _barrier()
    if rank == 0:
        metrics.EvalSummary(merged).write_rows(out_folder / "rows.jsonl")
        for r in range(world):
            os.remove(out_folder / f"rows.rank{r}.jsonl")
        answers = {f"{r['task']}\t{r['utt']}": r["teacher"] for r in merged}
        atomic_write_text(teacher_file, json.dumps(answers))
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
