"""The offline teacher: the text teacher's top-k next-token log-probs, stored.

BLSP-KD's teacher is the LLM itself on the transcript, with PLoRA off
(``docs/algorithms.md`` section 2.4).  It never changes during training, so
its distributions at the distilled positions can be computed once and read
back in every epoch instead of running the teacher forward in every step
(``teacher: offline`` in a recipe YAML; ``online``, the default, runs it).

What is stored
--------------
For every manifest row (a KD training row: transcript and teacher
continuation), the teacher prompt of training is built with the model's own
:class:`~speechbrain_blspkd.prompt.PromptBuilder` and run through
:meth:`~speechbrain_blspkd.models.speech_llm.SpeechLLMModel.teacher_pass`,
so the positions are exactly those ``input_kl`` and ``response_kl`` read:

* the ``N`` input positions (the distribution after transcript token
  ``i``), then
* the ``R`` response positions (the distribution that predicts response
  token ``j``, the first one from the last prompt position).

At each position the ``k`` largest log-probs at temperature 1 (float16 by
default) and their vocabulary indices (int32) are kept: the loss tempers
them (:func:`~speechbrain_blspkd.losses.kd_kl_topk`), so one cache serves
every temperature.

Size: ``k * (2 + 4)`` bytes per distilled position, **384 bytes at the
default k = 64** (``k * (4 + 4)`` with ``logprob_dtype="float32"``), plus
about 100 bytes of index per utterance.  An utterance of N transcript and R
response tokens takes ``(N + R) * 6k`` bytes; the online teacher's
float32 logits of SmolLM2 (V = 49,152) would be 196,608 bytes per
position.

Layout of the cache folder::

    meta.json                              the teacher it was written for
    topk.shard<i>of<n>.progress.jsonl      index: settings line, then one
                                           line per utterance (ID, row
                                           digest, chunk, offset, N, R)
    chunks/s<i>of<n>-<seq>.logp.npy        (rows, k) log-probs
    chunks/s<i>of<n>-<seq>.idx.npy         (rows, k) int32 indices

Writing is sharded and resumable with the machinery of the continuations
(:mod:`speechbrain_blspkd.dataprep.continuations`): ``shard=(i, n)`` takes
rows ``i, i + n, ...``; each batch's chunk files are written atomically
(:mod:`speechbrain_blspkd.utils.atomic`) before its index lines are
appended and synced, so a killed run resumes with the missing rows (a
half-written last index line is dropped).  The shards of one folder need no
merge: the reader joins every shard's index.

Stale caches
------------
``meta.json`` records a checksum of the LLM's weights (PLoRA excluded), a
checksum of the tokenizer and chat template, the instruction, the system
prompt, the transcript separator, ``k`` and the vocabulary size.  A folder
written for another teacher is refused (:class:`StaleTeacherCacheError`,
naming what differs) unless ``overwrite=True`` (``--overwrite``) deletes it
and starts again, as for the feature cache
(:mod:`speechbrain_blspkd.dataprep.feature_cache`).  Each index line
carries a digest of the row's transcript, continuation and truncation
flag, and training refuses a row whose text changed since.

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
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import shutil
import signal
import sys

import numpy as np
import torch

from speechbrain_blspkd.dataio.manifest import read_manifest
from speechbrain_blspkd.dataprep.continuations import (
    DEFAULT_INSTRUCTION,
    _append_records,
    _load_progress,
    _parse_shard,
    _progress_path,
)
from speechbrain_blspkd.dataprep.feature_cache import StaleCacheError
from speechbrain_blspkd.utils.atomic import (
    atomic_path,
    atomic_write_text,
    remove_stray_tmp,
)
from speechbrain_blspkd.utils.cache_label import check_label
from speechbrain_blspkd.utils.cli import report_error, setup_logging

logger = logging.getLogger(__name__)

__all__ = [
    "StaleTeacherCacheError",
    "TeacherTopK",
    "TopKTeacherCache",
    "bytes_per_position",
    "llm_checksum",
    "prepare_teacher_topk",
    "share_shards",
    "teacher_settings",
    "write_teacher_topk",
]

CACHE_VERSION = 1
META_FILE = "meta.json"
DEFAULT_K = 64
LOGPROB_DTYPES = ("float16", "float32")
INDEX_DTYPE = "int32"
SPANS = ("input", "response")
_INDEX_STEM = "topk"
_CHUNKS = "chunks"


class StaleTeacherCacheError(StaleCacheError):
    """A teacher cache folder was written for another teacher."""


@dataclasses.dataclass(frozen=True)
class TeacherTopK:
    """The stored teacher of one utterance.

    Arguments
    ---------
    input_logp, input_idx : torch.Tensor
        ``(N, k)`` log-probs (float16 or float32) and int32 vocabulary
        indices at the N input positions.
    response_logp, response_idx : torch.Tensor
        ``(R, k)`` at the R response positions.

    Example
    -------
    >>> rows = TeacherTopK(torch.zeros(3, 2), torch.zeros(3, 2, dtype=torch.int32),
    ...     torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.int32))
    >>> rows.count("input"), rows.count("response"), rows.k
    (3, 1, 2)
    """

    input_logp: torch.Tensor
    input_idx: torch.Tensor
    response_logp: torch.Tensor
    response_idx: torch.Tensor

    def count(self, span):
        """Number of stored positions of ``span`` (``input``/``response``)."""
        return int(getattr(self, f"{span}_logp").shape[0])

    @property
    def k(self):
        """Entries per position."""
        return int(self.input_logp.shape[1])

    def span(self, span):
        """``(logp, idx)`` of ``span``."""
        return getattr(self, f"{span}_logp"), getattr(self, f"{span}_idx")


def bytes_per_position(k=DEFAULT_K, logprob_dtype="float16"):
    """Bytes the cache stores per distilled position.

    Example
    -------
    >>> bytes_per_position(), bytes_per_position(64, "float32")
    (384, 512)
    """
    if logprob_dtype not in LOGPROB_DTYPES:
        raise ValueError(
            f"logprob_dtype must be one of {LOGPROB_DTYPES}, got "
            f"{logprob_dtype!r}"
        )
    return int(k) * (np.dtype(logprob_dtype).itemsize + 4)


# ----------------------------------------------------------------------
# what identifies the teacher
def _base_weights(llm):
    """``(name, tensor)`` of the LLM's base weights, PLoRA left out.

    A PLoRA-wrapped layer ``x`` holds its base weight as ``x.base.weight``
    and its adapter as ``x.lora_A`` / ``x.lora_B``; names are given as in
    the unwrapped LLM, so an LLM with and without PLoRA hash alike.
    """
    from speechbrain_blspkd.nnet import plora as plora_lib

    wrapped = {name for name, _ in plora_lib._wrapped(llm)}
    for key, tensor in sorted(llm.state_dict().items()):
        module, _, leaf = key.rpartition(".")
        if module in wrapped and leaf.startswith("lora_"):
            continue
        if module.endswith(".base") and module[: -len(".base")] in wrapped:
            key = f"{module[: -len('.base')]}.{leaf}"
        yield key, tensor


def llm_checksum(llm):
    """SHA-256 of an LLM's base weights (names, dtypes, shapes, bytes).

    PLoRA matrices are left out and PLoRA-wrapped layers named as unwrapped
    ones, so the model being trained (PLoRA on) and the plain LLM loaded
    from the same folder give the same checksum. A different dtype is a
    different teacher (other numbers).

    Arguments
    ---------
    llm : torch.nn.Module
        The causal LM (not sharded).

    Returns
    -------
    str
        Hexadecimal digest.

    Example
    -------
    >>> from speechbrain_blspkd.utils.testing import tiny_speech_llm
    >>> torch.manual_seed(0)
    <torch._C.Generator object at ...>
    >>> model = tiny_speech_llm(whisper=False)
    >>> a = llm_checksum(model.llm)
    >>> with torch.no_grad():
    ...     _ = model.llm.model.layers[0].self_attn.q_proj.lora_A.add_(1)
    >>> a == llm_checksum(model.llm)  # PLoRA is not the teacher
    True
    >>> with torch.no_grad():
    ...     _ = model.llm.model.norm.weight.add_(1)
    >>> a == llm_checksum(model.llm)
    False
    """
    h = hashlib.sha256()
    for name, tensor in _base_weights(llm):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _tokenizer_checksum(tokenizer):
    """SHA-256 of the vocabulary, special tokens and chat template."""
    h = hashlib.sha256()
    vocab = sorted(tokenizer.get_vocab().items())
    h.update(json.dumps(vocab, ensure_ascii=False).encode())
    special = getattr(tokenizer, "special_tokens_map", {})
    h.update(json.dumps(special, sort_keys=True, default=str).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    return h.hexdigest()


def teacher_settings(model, k=DEFAULT_K, logprob_dtype=None):
    """What identifies the stored teacher of ``model`` (``meta.json``).

    Arguments
    ---------
    model : speechbrain_blspkd.models.speech_llm.SpeechLLMModel
        The speech LLM (its LLM with PLoRA off is the teacher) or a text-only
        one (``adapter=None``).
    k : int
        Entries per position.
    logprob_dtype : str, optional
        Storage dtype of the log-probs; None leaves it out (a reader
        accepts either).

    Returns
    -------
    dict
        JSON-ready settings.

    Example
    -------
    >>> from speechbrain_blspkd.utils.testing import tiny_speech_llm
    >>> s = teacher_settings(tiny_speech_llm(whisper=False, instruction="Say:"), 8)
    >>> s["k"], s["vocab_size"], s["instruction"]
    (8, 300, 'Say:')
    """
    vocab = int(model.llm.get_output_embeddings().weight.shape[0])
    k = int(k)
    if not 1 <= k <= vocab:
        raise ValueError(
            f"teacher top-k: k must be in 1..{vocab} (the vocabulary), got {k}"
        )
    settings = dict(
        version=CACHE_VERSION,
        k=k,
        vocab_size=vocab,
        llm=llm_checksum(model.llm),
        tokenizer=_tokenizer_checksum(model.tokenizer),
        instruction=model.instruction,
        system_prompt=model.prompts.system_prompt,
        transcript_separator=model.prompts.transcript_separator,
    )
    if logprob_dtype is not None:
        bytes_per_position(k, logprob_dtype)  # validates the name
        settings["logprob_dtype"] = logprob_dtype
    return settings


def _truncated(value):
    return value is True or str(value).strip() in ("1", "True", "true")


def row_digest(transcript, continuation, truncated):
    """Digest of what a row's teacher prompt is made of (16 hex digits).

    Example
    -------
    >>> row_digest("a b", "c", "0") == row_digest("a b", "c", False)
    True
    >>> row_digest("a b", "c", "1") == row_digest("a b", "c", "0")
    False
    """
    text = json.dumps(
        [str(transcript), str(continuation or ""), _truncated(truncated)],
        ensure_ascii=False,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _rows_digest(rows):
    h = hashlib.sha256()
    for r in rows:
        digest = row_digest(r["transcript"], r["continuation"], r["truncated"])
        h.update(f"{r['ID']}\t{digest}\n".encode())
    return h.hexdigest()[:16]


def _describe(key, value):
    text = repr(value)
    return text[:12] + "..." if key in ("llm", "tokenizer") else text


# ----------------------------------------------------------------------
# the cache folder
class TopKTeacherCache:
    """A folder of stored top-k teacher distributions (see the module notes).

    Arguments
    ---------
    folder : str or pathlib.Path
        The cache folder.
    settings : dict
        :func:`teacher_settings` of the teacher expected there; every key
        given must match ``meta.json``.
    create : bool
        Writer side: make the folder and its ``meta.json`` when missing.
        Reader side (False): a folder without ``meta.json`` is an error
        that says how to write it.
    overwrite : bool
        When the folder holds another teacher (or is unlabelled), delete
        its contents and start again instead of raising
        :class:`StaleTeacherCacheError`.

    Example
    -------
    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> cache = TopKTeacherCache(folder, {"k": 4, "llm": "abc"}, create=True)
    >>> TopKTeacherCache(folder, {"k": 8, "llm": "abc"})
    Traceback (most recent call last):
    ...
    speechbrain_blspkd.dataprep.teacher_topk.StaleTeacherCacheError: teacher cache in ... was written for other settings: k 4 != 8 (this run); use another folder, delete it, or rebuild it with overwrite=True (--overwrite)
    """

    def __init__(self, folder, settings, create=False, overwrite=False):
        self.folder = pathlib.Path(folder)
        self.settings = dict(settings)

        def clear():
            shutil.rmtree(self.folder / _CHUNKS, ignore_errors=True)
            for path in self._index_files():
                path.unlink()

        meta = check_label(
            self.folder,
            META_FILE,
            self.settings,
            what="teacher cache",
            error=StaleTeacherCacheError,
            holds_data=lambda: bool(
                self._index_files() or (self.folder / _CHUNKS).is_dir()
            ),
            clear=clear,
            how_to_write="write it with `python -m speechbrain_blspkd."
            f"dataprep.teacher_topk MANIFEST {self.folder} ...` or the "
            "recipe's preparation (prepare_teacher_topk)",
            create=create,
            overwrite=overwrite,
            describe=_describe,
        )
        self.meta = meta
        self._index = None
        self._chunks = {}

    # -- layout
    def _index_files(self):
        return sorted(
            self.folder.glob(f"{_INDEX_STEM}.shard*of*.progress.jsonl")
        )

    def index_path(self, shard):
        """The index (progress) file of ``shard = (i, n)``."""
        return _progress_path(self.folder / _INDEX_STEM, shard)

    def chunk_paths(self, name):
        """``(logp, idx)`` file paths of chunk ``name``."""
        return _chunk_files(self.folder, name)

    def shard_meta(self, shard, rows):
        """Settings line of a shard's index: ``meta.json`` plus the shard
        and a digest of its rows (as for the continuations)."""
        return {
            **self.meta,
            "shard": [int(shard[0]), int(shard[1])],
            "rows": _rows_digest(rows),
        }

    # -- reading
    def index(self):
        """``{ID: record}`` joined over every shard's index file."""
        if self._index is None:
            index = {}
            for path in self._index_files():
                with open(path, "rb") as f:
                    first = f.readline()
                try:
                    head = json.loads(first)["_meta"]
                except (ValueError, KeyError):
                    raise StaleTeacherCacheError(
                        f"{path}: no settings line"
                    ) from None
                own = {
                    k: v for k, v in head.items() if k not in ("shard", "rows")
                }
                if own != self.meta:
                    raise StaleTeacherCacheError(
                        f"{path}: written for other settings than "
                        f"{self.folder / META_FILE}; delete it"
                    )
                for uid, rec in _load_progress(path, head).items():
                    index.setdefault(uid, rec)
            self._index = index
        return self._index

    def __contains__(self, uid):
        return uid in self.index()

    def __len__(self):
        return len(self.index())

    def _arrays(self, name):
        if name not in self._chunks:
            if len(self._chunks) >= 64:
                self._chunks.pop(next(iter(self._chunks)))
            logp, idx = self.chunk_paths(name)
            self._chunks[name] = (
                np.load(logp, mmap_mode="r"),
                np.load(idx, mmap_mode="r"),
            )
        return self._chunks[name]

    def get(self, uid):
        """The stored teacher of ``uid`` (:class:`TeacherTopK`).

        Raises
        ------
        KeyError
            When ``uid`` is not in the cache (names the folder).
        """
        rec = self.index().get(uid)
        if rec is None:
            raise KeyError(
                f"utterance {uid!r} is not in the teacher cache {self.folder}"
            )
        logp, idx = self._arrays(rec["chunk"])
        start, n_in, n_resp = rec["offset"], rec["input"], rec["response"]
        mid, end = start + n_in, start + n_in + n_resp

        def part(array, a, b):
            return torch.from_numpy(np.array(array[a:b]))

        return TeacherTopK(
            part(logp, start, mid),
            part(idx, start, mid),
            part(logp, mid, end),
            part(idx, mid, end),
        )

    def check_rows(self, rows, source=None):
        """Refuse rows that are missing or whose text changed since writing.

        Arguments
        ---------
        rows : list of dict
            Manifest rows (``ID``, ``transcript``, ``continuation``,
            ``truncated``).
        source : str, optional
            Manifest name for the messages.

        Raises
        ------
        KeyError
            Rows not in the cache (count and examples).
        StaleTeacherCacheError
            A row whose transcript, continuation or truncation differs.
        """
        index = self.index()
        where = f" of {source}" if source else ""
        missing = [r["ID"] for r in rows if r["ID"] not in index]
        if missing:
            raise KeyError(
                f"{len(missing)} of {len(rows)} rows{where} are not in the "
                f"teacher cache {self.folder} (e.g. {missing[:3]}); write them "
                "with python -m speechbrain_blspkd.dataprep.teacher_topk"
            )
        for r in rows:
            digest = row_digest(
                r["transcript"], r["continuation"], r["truncated"]
            )
            if index[r["ID"]]["row"] != digest:
                raise StaleTeacherCacheError(
                    f"row {r['ID']!r}{where}: its transcript, continuation or "
                    f"truncation changed since the teacher cache {self.folder} "
                    "was written; rebuild it (overwrite=True / --overwrite)"
                )


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


def _save_npy(path, array):
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


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
    >>> from speechbrain_blspkd.utils.testing import tiny_speech_llm
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

    i, n = shard
    if not 0 <= i < n:
        raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard}")
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
        cache.folder, f"{_CHUNKS}/.s{i}of{n}-*.tmp", recursive=False
    )
    meta = cache.shard_meta(shard, rows)
    progress = cache.index_path(shard)
    done = _load_progress(progress, meta)
    if not progress.is_file() or progress.stat().st_size == 0:
        _append_records(progress, [], meta=meta)
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
            add_eot=[not _truncated(r["truncated"]) for r in batch],
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
        _save_npy(logp_path, logp)
        _save_npy(idx_path, idx)
        _append_records(progress, records)  # the batch counts from here on
        seq += 1
        stats["written"] += len(batch)
        stats["positions"] += offset
        stats["bytes"] += logp.nbytes + idx.nbytes
        if stop_after_batches is not None and b + 1 >= stop_after_batches:
            os.kill(os.getpid(), signal.SIGKILL)
    done = _load_progress(progress, meta)
    missing = [r["ID"] for r in rows if r["ID"] not in done]
    if missing:
        raise RuntimeError(
            f"{progress}: {len(missing)} rows still missing (e.g. {missing[:3]})"
        )
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
    own = folder / f"{_INDEX_STEM}.shard{rank}of{shard_count}.progress.jsonl"
    text = own.read_text(encoding="utf-8")
    chunks = sorted(
        {json.loads(line)["chunk"] for line in text.splitlines()[1:]}
    )
    shards = [None] * world
    dist.all_gather_object(shards, (rank, text, chunks))
    writer = sb.utils.distributed.is_local_rank_zero()

    def chunk_missing(name):
        return not all(p.is_file() for p in _chunk_files(folder, name))

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
            payload = [[np.load(p) for p in _chunk_files(folder, name)]]
        dist.broadcast_object_list(payload, src=r)
        if writer and (r, name) in missing:
            for path, array in zip(_chunk_files(folder, name), payload[0]):
                _save_npy(path, array)
            received += 1
    if writer:  # the indexes last: a row counts once its chunk is there
        for r, shard_text, _ in shards:
            path = (
                folder / f"{_INDEX_STEM}.shard{r}of{shard_count}.progress.jsonl"
            )
            if (
                not path.is_file()
                or path.read_text(encoding="utf-8") != shard_text
            ):
                atomic_write_text(path, shard_text)
    sb.utils.distributed.ddp_barrier()
    return received


def _chunk_files(folder, name):
    base = pathlib.Path(folder) / _CHUNKS
    return base / f"{name}.logp.npy", base / f"{name}.idx.npy"


def prepare_teacher_topk(hparams, device=None):
    """Write the stored teacher of every stage with ``teacher: offline``.

    For each such stage: the rows of its ``train_manifest`` (with
    continuations), the objective's ``teacher_cache`` folder and
    ``teacher_topk``, the recipe's model (its LLM with PLoRA off is the
    teacher, moved to ``device`` for the block), ``continuation_batch_size``
    rows per pass.  Resumable and idempotent (rows already stored are
    skipped); a folder written for another teacher is refused
    (:class:`StaleTeacherCacheError`).  Call it after the continuations and
    before :func:`~speechbrain_blspkd.brain.dataio_prepare`, on **every**
    process of a run: rank ``r`` of ``n`` writes shard ``(r, n)`` and the
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
def _text_teacher(model_dir, device, dtype, instruction, system_prompt, sep):
    from speechbrain_blspkd.dataprep.continuations import _load_model
    from speechbrain_blspkd.models.speech_llm import SpeechLLMModel

    llm, tokenizer, name = _load_model(model_dir, device, dtype)
    model = SpeechLLMModel(
        llm,
        adapter=None,
        tokenizer=tokenizer,
        system_prompt=system_prompt,
        instruction=instruction,
        transcript_separator=sep,
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
    parser.add_argument("--shard", type=_parse_shard, default=(0, 1))
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
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--stop-after-batches", type=int, default=None, help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    setup_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device is None:
        import speechbrain as sb

        args.device = sb.utils.distributed.infer_device()
    try:
        model, name = _text_teacher(
            args.model_dir,
            args.device,
            args.dtype,
            args.instruction,
            args.system_prompt,
            args.transcript_separator,
        )
        info = write_teacher_topk(
            model,
            args.manifest,
            args.folder,
            k=args.k,
            batch_size=args.batch_size,
            shard=args.shard,
            logprob_dtype=args.logprob_dtype,
            overwrite=args.overwrite,
            stop_after_batches=args.stop_after_batches,
        )
    except (RuntimeError, ValueError, KeyError, FileNotFoundError) as e:
        return report_error(e)
    per = info["bytes"] / info["positions"] if info["positions"] else 0.0
    print(
        f"{args.folder} ({name}): {info['written']} rows written, "
        f"{info['skipped']} already there, {info['positions']} positions, "
        f"{info['bytes']} bytes ({per:.0f} per position)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
