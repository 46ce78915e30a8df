"""The offline teacher: the text teacher's top-k next-token log-probs, stored.

BLSP-KD's teacher is the LLM itself on the transcript, with PLoRA off
(``docs/algorithms.md`` section 2.4).  It never changes during training, so
its distributions at the distilled positions can be computed once and read
back in every epoch instead of running the teacher forward in every step
(``teacher: offline`` in a recipe YAML; ``online``, the default, runs it).

The stored format (what is stored, the folder's layout, the refusal of a
folder written for another teacher) and its reader are in
:mod:`speechbrain_blspkd.dataprep.teacher_cache`; what identifies a teacher
in :mod:`speechbrain_blspkd.dataprep.teacher_identity`.  This module
computes the distributions and writes them (:func:`write_teacher_topk`).

Writing is sharded and resumable with the bookkeeping it shares with the
continuations (:mod:`speechbrain_blspkd.dataprep.shard_progress`): ``shard=(i, n)`` takes
rows ``i, i + n, ...``; each batch's chunk files are written atomically
(:mod:`speechbrain_blspkd.utils.atomic`) before its index lines are
appended and synced, so a killed run resumes with the missing rows (a
half-written last index line is dropped).  The shards of one folder need no
merge: the reader joins every shard's index.

Command line::

    python -m speechbrain_blspkd.dataprep.teacher_topk MANIFEST FOLDER \\
        [--model-dir DIR] [--k 64] [--batch-size 16] [--shard 0/2] \\
        [--instruction TEXT] [--system-prompt TEXT] \\
        [--transcript-separator " "] [--device cuda:0] [--dtype auto] \\
        [--logprob-dtype float16] [--overwrite]

``MANIFEST`` holds the continuations (the output of
:mod:`~speechbrain_blspkd.dataprep.continuations`); the instruction, system
prompt and separator must be the recipe's.  Inside a recipe,
:func:`prepare_teacher_topk` writes the cache of every stage whose
objective has ``teacher: offline``, with the recipe's model itself, on
every process of a run: rank ``r`` of ``n`` writes shard ``(r, n)`` and
:func:`share_shards` gives every node the shards it lacks through the
process group (no shared disk needed).
"""

import argparse
import contextlib
import json
import logging
import pathlib
import sys

import numpy as np
import torch

from speechbrain_blspkd.dataio.manifest import read_manifest
from speechbrain_blspkd.dataprep.continuations import DEFAULT_INSTRUCTION
from speechbrain_blspkd.dataprep.shard_progress import (
    WORKER_ERRORS,
    add_worker_options,
    append_records,
    check_finished,
    check_shard,
    open_progress,
    parse_shard,
    parse_worker_args,
    stop_for_resume_test,
)
from speechbrain_blspkd.dataprep.teacher_cache import (
    CHUNK_FOLDER,
    DEFAULT_K,
    INDEX_DTYPE,
    LOGPROB_DTYPES,
    SPANS,
    TopKTeacherCache,
    chunk_files,
    index_file,
    is_truncated,
    row_digest,
    save_npy,
)
from speechbrain_blspkd.dataprep.teacher_identity import teacher_settings
from speechbrain_blspkd.utils.atomic import atomic_write_text, remove_stray_tmp
from speechbrain_blspkd.utils.cli import per, report_run

logger = logging.getLogger(__name__)

__all__ = [
    "offline_stages",
    "prepare_teacher_topk",
    "share_shards",
    "write_teacher_topk",
]


# ----------------------------------------------------------------------
# writing
def _topk_rows(logits, mask, k):
    """Per row: ``(logp, idx)`` numpy arrays of its real positions."""
    logp, idx = logits.float().log_softmax(-1).topk(k, dim=-1)
    logp, idx, mask = logp.cpu(), idx.cpu(), mask.cpu()
    return [
        (logp[b][mask[b]].numpy(), idx[b][mask[b]].to(torch.int32).numpy())
        for b in range(logits.shape[0])
    ]


def _next_seq(done):
    seqs = [int(rec["chunk"].rsplit("-", 1)[1]) for rec in done.values()]
    return max(seqs, default=-1) + 1


def write_teacher_topk(
    model,
    manifest,
    folder,
    k=DEFAULT_K,
    batch_size=16,
    shard=(0, 1),
    logprob_dtype="float16",
    overwrite=False,
    stop_after_batches=None,
):
    """Store the top-k teacher of every row of one shard of ``manifest``.

    Arguments
    ---------
    model : speechbrain_blspkd.models.speech_llm.SpeechLLMModel
        Gives the teacher (its LLM with PLoRA off, in eval mode), the
        prompts and the instruction; runs where its LLM is.
    manifest : str or pathlib.Path
        Rows with ``continuation`` and ``truncated`` (the KD training
        manifest).
    folder : str or pathlib.Path
        The cache folder.
    k : int
        Entries per position (1 to the vocabulary size).
    batch_size : int
        Rows per teacher pass.
    shard : tuple of int
        ``(i, n)``: rows ``i, i + n, ...``.
    logprob_dtype : str
        ``"float16"`` (default) or ``"float32"``.
    overwrite : bool
        Rebuild a folder written for another teacher.
    stop_after_batches : int, optional
        Resume tests: SIGKILL this process after that many saved batches.

    Returns
    -------
    dict
        ``written`` (rows now), ``skipped`` (rows already there),
        ``positions`` (positions now), ``bytes`` (chunk bytes now).

    Example
    -------
    >>> import tempfile
    >>> from speechbrain_blspkd.dataio.manifest import write_manifest
    >>> from speechbrain_blspkd.testing import tiny_speech_llm
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> write_manifest(d / "kd.csv", [dict(ID="u1", wav="x.wav", duration=1,
    ...     transcript="hello world", language="en", speaker="s",
    ...     continuation="a b", truncated="0")])
    >>> model = tiny_speech_llm(whisper=False, instruction="Say:")
    >>> info = write_teacher_topk(model, d / "kd.csv", d / "topk", k=4)
    >>> info["written"], info["bytes"] == info["positions"] * 4 * 6
    (1, True)
    >>> rows = TopKTeacherCache(d / "topk", teacher_settings(model, 4)).get("u1")
    >>> rows.count("input") == len(model.transcript_ids(["hello world"])[0])
    True
    """
    from speechbrain_blspkd.models.passes import PassRequest

    i, n = check_shard(shard)
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    rows = read_manifest(manifest)[i::n]
    no_text = [r["ID"] for r in rows if not r.get("continuation")]
    if no_text and len(no_text) == len(rows):
        raise ValueError(
            f"{manifest}: no row has a teacher continuation; write them "
            "first (speechbrain_blspkd.dataprep.continuations)"
        )
    cache = TopKTeacherCache(
        folder,
        teacher_settings(model, k, logprob_dtype),
        create=True,
        overwrite=overwrite,
    )
    # this shard's leftovers only: other shards may be writing beside it
    remove_stray_tmp(
        cache.folder, f"{CHUNK_FOLDER}/.s{i}of{n}-*.tmp", recursive=False
    )
    meta = cache.shard_meta(shard, rows)
    progress = cache.index_path(shard)
    done = open_progress(progress, meta)
    todo = [r for r in rows if r["ID"] not in done]
    # longest first: similar lengths share a batch, memory peaks early
    todo.sort(
        key=lambda r: (-len(r["transcript"]) - len(r["continuation"]), r["ID"])
    )
    logger.info(
        "teacher top-%d shard %d/%d: %d rows, %d done, %d to write",
        k,
        i,
        n,
        len(rows),
        len(rows) - len(todo),
        len(todo),
    )
    stats = dict(written=0, skipped=len(rows) - len(todo), positions=0, bytes=0)
    seq = _next_seq(done)
    request = PassRequest(teacher=True, logits=SPANS)
    dtype = np.dtype(logprob_dtype)
    for b, start in enumerate(range(0, len(todo), batch_size)):
        batch = todo[start : start + batch_size]
        out = model.teacher_pass(
            [r["transcript"] for r in batch],
            [r["continuation"] for r in batch],
            add_eot=[not is_truncated(r["truncated"]) for r in batch],
            request=request,
        )
        spans = {
            span: _topk_rows(out.logits[span], out.masks[span], k)
            for span in SPANS
        }
        name = f"s{i}of{n}-{seq:06d}"
        logps, idxs, records, offset = [], [], [], 0
        for row_index, r in enumerate(batch):
            counts = {}
            for span in SPANS:
                logp, idx = spans[span][row_index]
                logps.append(logp)
                idxs.append(idx)
                counts[span] = int(logp.shape[0])
            records.append(
                dict(
                    ID=r["ID"],
                    row=row_digest(
                        r["transcript"], r["continuation"], r["truncated"]
                    ),
                    chunk=name,
                    offset=offset,
                    **counts,
                )
            )
            offset += counts["input"] + counts["response"]
        logp = np.concatenate(logps).astype(dtype)
        idx = np.concatenate(idxs).astype(INDEX_DTYPE)
        logp_path, idx_path = cache.chunk_paths(name)
        save_npy(logp_path, logp)
        save_npy(idx_path, idx)
        append_records(progress, records)  # the batch counts from here on
        seq += 1
        stats["written"] += len(batch)
        stats["positions"] += offset
        stats["bytes"] += logp.nbytes + idx.nbytes
        stop_for_resume_test(b + 1, stop_after_batches)
    check_finished(progress, meta, rows)
    return stats


@contextlib.contextmanager
def _llm_on(model, device):
    """The model's LLM on ``device`` inside the block (back afterwards)."""
    before = model.device
    model.llm.to(device)
    try:
        yield model
    finally:
        model.llm.to(before)


def offline_stages(hparams):
    """The training stages whose objective reads a stored teacher.

    Example
    -------
    >>> offline_stages({"stages": []})
    []
    """
    return [
        stage
        for stage in hparams.get("stages") or []
        if getattr(stage.objective, "teacher", "online") == "offline"
    ]


def _rank_world():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def share_shards(folder, shard_count):
    """Give every node the index and chunk files of every rank's shard.

    Call it on every rank (a collective) after each rank ``r`` wrote shard
    ``(r, shard_count)`` into its own node's ``folder``.  The files a
    node lacks travel through the process group, one chunk at a time from
    the rank that wrote it (never through a shared disk; with a shared
    disk nothing travels), and the node's first process writes them.

    Arguments
    ---------
    folder : str or pathlib.Path
        The cache folder (each node's own).
    shard_count : int
        The number of shards (the world size).

    Returns
    -------
    int
        The number of chunks this node received.
    """
    import speechbrain as sb
    import torch.distributed as dist

    folder = pathlib.Path(folder)
    rank, world = _rank_world()
    if world == 1:
        return 0
    own = index_file(folder, (rank, shard_count))
    text = own.read_text(encoding="utf-8")
    chunks = sorted(
        {json.loads(line)["chunk"] for line in text.splitlines()[1:]}
    )
    shards = [None] * world
    dist.all_gather_object(shards, (rank, text, chunks))
    writer = sb.utils.distributed.is_local_rank_zero()

    def chunk_missing(name):
        return not all(p.is_file() for p in chunk_files(folder, name))

    missing = [
        (r, name)
        for r, _, names in shards
        for name in names
        if chunk_missing(name)
    ]
    wanted = [None] * world
    dist.all_gather_object(wanted, missing)
    received = 0
    for r, name in sorted({item for part in wanted for item in part}):
        payload = [None]
        if rank == r:
            payload = [[np.load(p) for p in chunk_files(folder, name)]]
        dist.broadcast_object_list(payload, src=r)
        if writer and (r, name) in missing:
            for path, array in zip(chunk_files(folder, name), payload[0]):
                save_npy(path, array)
            received += 1
    if writer:  # the indexes last: a row counts once its chunk is there
        for r, shard_text, _ in shards:
            path = index_file(folder, (r, shard_count))
            if (
                not path.is_file()
                or path.read_text(encoding="utf-8") != shard_text
            ):
                atomic_write_text(path, shard_text)
    sb.utils.distributed.ddp_barrier()
    return received


def prepare_teacher_topk(hparams, device=None):
    """Write the stored teacher of every stage with ``teacher: offline``.

    For each such stage: the rows of its ``train_manifest`` (with
    continuations), the objective's ``teacher_cache`` folder and
    ``teacher_topk``, the recipe's model (its LLM with PLoRA off is the
    teacher, moved to ``device`` for the block), ``continuation_batch_size``
    rows per pass.  Resumable and idempotent (rows already stored are
    skipped); a folder written for another teacher is refused
    (:class:`StaleTeacherCacheError`).  Call it after the continuations and
    before :func:`~speechbrain_blspkd.dataio.pipelines.dataio_prepare`, on
    **every** process of a run: rank ``r`` of ``n`` writes shard ``(r, n)`` and the
    shards then reach every node's folder through the process group
    (:func:`share_shards`).

    Arguments
    ---------
    hparams : dict
        The recipe's hyperparameters (``stages``, ``model``,
        ``continuation_batch_size``).
    device : str or torch.device, optional
        Where the teacher runs (this process's device; default:
        speechbrain's ``infer_device``).

    Returns
    -------
    list of pathlib.Path
        The cache folders (empty when no stage is offline).
    """
    import speechbrain as sb

    folders = []
    rank, world = _rank_world()
    device = device or sb.utils.distributed.infer_device()
    for stage in offline_stages(hparams):
        objective = stage.objective
        with _llm_on(hparams["model"], device) as model:
            write_teacher_topk(
                model,
                stage.train_manifest,
                objective.teacher_cache,
                k=objective.teacher_topk,
                batch_size=hparams.get("continuation_batch_size", 16),
                shard=(rank, world),
            )
        share_shards(objective.teacher_cache, world)
        folders.append(pathlib.Path(objective.teacher_cache))
    return folders


# ----------------------------------------------------------------------
# command line
_TEACHER_OPTIONS = (
    "model_dir",
    "device",
    "dtype",
    "instruction",
    "system_prompt",
    "transcript_separator",
)


def _text_teacher(
    model_dir, device, dtype, instruction, system_prompt, transcript_separator
):
    """The text teacher of the command line (``device`` None: speechbrain's
    ``infer_device``) and its model's name."""
    import speechbrain as sb

    from speechbrain_blspkd.dataprep.greedy_generation import load_causal_lm
    from speechbrain_blspkd.models.speech_llm import SpeechLLMModel

    if device is None:
        device = sb.utils.distributed.infer_device()
    llm, tokenizer, name = load_causal_lm(model_dir, device, dtype)
    model = SpeechLLMModel(
        llm,
        adapter=None,
        tokenizer=tokenizer,
        system_prompt=system_prompt,
        instruction=instruction,
        transcript_separator=transcript_separator,
    )
    return model, name


def main(argv=None):
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description="Store the text teacher's top-k next-token log-probs "
        "at the distilled positions of a KD manifest (offline teacher)."
    )
    parser.add_argument("manifest", help="manifest with continuations")
    parser.add_argument("folder", help="the cache folder")
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--k", type=int, default=DEFAULT_K)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shard", type=parse_shard, default=(0, 1))
    parser.add_argument(
        "--instruction",
        default=DEFAULT_INSTRUCTION,
        help="the recipe's instruction (default: %(default)r)",
    )
    parser.add_argument("--system-prompt", default=None)
    parser.add_argument("--transcript-separator", default=" ")
    parser.add_argument(
        "--device",
        default=None,
        help="cpu, cuda, cuda:1 ... (default: speechbrain's infer_device, "
        "the GPU when there is one)",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "bfloat16", "float32"),
        help="LLM weights (the recipe's llm_dtype: the checksum includes it)",
    )
    parser.add_argument(
        "--logprob-dtype", default="float16", choices=LOGPROB_DTYPES
    )
    parser.add_argument("--overwrite", action="store_true")
    add_worker_options(parser)
    # the destinations are the parameters of _text_teacher (the teacher's,
    # _TEACHER_OPTIONS) and of write_teacher_topk (the rest, but --threads:
    # already applied)
    keywords = vars(parse_worker_args(parser, argv))
    del keywords["threads"]
    teacher = {key: keywords.pop(key) for key in _TEACHER_OPTIONS}

    def run():
        model, name = _text_teacher(**teacher)
        info = write_teacher_topk(model, **keywords)
        per_position = per(info["bytes"], info["positions"])
        return (
            f"{keywords['folder']} ({name}): {info['written']} rows written, "
            f"{info['skipped']} already there, {info['positions']} positions, "
            f"{info['bytes']} bytes ({per_position:.0f} per position)"
        )

    return report_run(WORKER_ERRORS, run)


if __name__ == "__main__":
    sys.exit(main())
