"""The stored top-k teacher: the cache folder's format, and reading it back.

The offline teacher (:mod:`speechbrain_blspkd.dataprep.teacher_topk` writes
it) keeps the text teacher's top-k next-token log-probs of every training
row in a folder; :class:`TopKTeacherCache` opens that folder, refuses it
when it was written for another teacher, and hands back the stored
distributions of one utterance (:class:`TeacherTopK`).

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

Stale caches
------------
``meta.json`` records a checksum of the LLM's weights (PLoRA excluded), a
checksum of the tokenizer and chat template, the instruction, the system
prompt, the transcript separator, ``k`` and the vocabulary size (see
:mod:`speechbrain_blspkd.dataprep.teacher_identity`).  A folder
written for another teacher is refused (:class:`StaleTeacherCacheError`,
naming what differs) unless ``overwrite=True`` (``--overwrite``) deletes it
and starts again, as for the feature cache
(:mod:`speechbrain_blspkd.dataprep.feature_cache`).  Each index line
carries a digest of the row's transcript, continuation and truncation
flag, and training refuses a row whose text changed since.
"""

import dataclasses
import hashlib
import json
import pathlib
import shutil

import numpy as np
import torch

from speechbrain_blspkd.dataprep.feature_cache import StaleCacheError
from speechbrain_blspkd.dataprep.shard_progress import (
    load_progress,
    progress_path,
    settings_line,
)
from speechbrain_blspkd.utils.atomic import atomic_path
from speechbrain_blspkd.utils.cache_label import LabelledFolder

__all__ = [
    "StaleTeacherCacheError",
    "TeacherTopK",
    "TopKTeacherCache",
    "bytes_per_position",
    "chunk_files",
    "index_file",
    "is_truncated",
    "row_digest",
    "save_npy",
]

CACHE_VERSION = 1
META_FILE = "meta.json"
DEFAULT_K = 64
LOGPROB_DTYPES = ("float16", "float32")
INDEX_DTYPE = "int32"
SPANS = ("input", "response")
_INDEX_STEM = "topk"
CHUNK_FOLDER = "chunks"


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


def is_truncated(value):
    """Whether a manifest's ``truncated`` value means true."""
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
        [str(transcript), str(continuation or ""), is_truncated(truncated)],
        ensure_ascii=False,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _rows_digest(rows):
    h = hashlib.sha256()
    for r in rows:
        digest = row_digest(r["transcript"], r["continuation"], r["truncated"])
        h.update(f"{r['ID']}\t{digest}\n".encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------
# the cache folder
class TopKTeacherCache(LabelledFolder):
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
    speechbrain_blspkd.dataprep.teacher_cache.StaleTeacherCacheError: teacher cache in ... was written for other settings: k 4 != 8 (this run); use another folder, delete it, or rebuild it with overwrite=True (--overwrite)
    """

    label_name = META_FILE
    what = "teacher cache"
    error = StaleTeacherCacheError
    how_to_write = (
        "write it with `python -m speechbrain_blspkd.dataprep.teacher_topk "
        "MANIFEST {folder} ...` or the recipe's preparation "
        "(prepare_teacher_topk)"
    )

    def __init__(self, folder, settings, create=False, overwrite=False):
        self.folder = pathlib.Path(folder)
        self.settings = dict(settings)
        self.meta = self.check_label(self.settings, create, overwrite)
        self._index = None
        self._chunks = {}

    # -- the label (see LabelledFolder)
    def holds_data(self):
        """Whether the folder holds an index or chunks."""
        return bool(
            self._index_files() or (self.folder / CHUNK_FOLDER).is_dir()
        )

    def clear(self):
        """Delete the chunks and the index files."""
        shutil.rmtree(self.folder / CHUNK_FOLDER, ignore_errors=True)
        for path in self._index_files():
            path.unlink()

    def describe(self, key, value):
        """Checksums (``llm``, ``tokenizer``) shortened to 12 characters."""
        text = repr(value)
        return text[:12] + "..." if key in ("llm", "tokenizer") else text

    # -- layout
    def _index_files(self):
        return sorted(
            self.folder.glob(f"{_INDEX_STEM}.shard*of*.progress.jsonl")
        )

    def index_path(self, shard):
        """The index (progress) file of ``shard = (i, n)``."""
        return index_file(self.folder, shard)

    def chunk_paths(self, name):
        """``(logp, idx)`` file paths of chunk ``name``."""
        return chunk_files(self.folder, name)

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
                head = settings_line(path)
                if head is None:
                    raise StaleTeacherCacheError(f"{path}: no settings line")
                own = {
                    k: v for k, v in head.items() if k not in ("shard", "rows")
                }
                if own != self.meta:
                    raise StaleTeacherCacheError(
                        f"{path}: written for other settings than "
                        f"{self.folder / META_FILE}; delete it"
                    )
                for uid, rec in load_progress(path, head).items():
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


def index_file(folder, shard):
    """The index (progress) file of ``shard = (i, n)`` in ``folder``.

    Example
    -------
    >>> index_file("/cache", (0, 2)).name
    'topk.shard0of2.progress.jsonl'
    """
    return progress_path(pathlib.Path(folder) / _INDEX_STEM, shard)


def chunk_files(folder, name):
    """``(logp, idx)`` file paths of chunk ``name`` in ``folder``."""
    base = pathlib.Path(folder) / CHUNK_FOLDER
    return base / f"{name}.logp.npy", base / f"{name}.idx.npy"


def save_npy(path, array):
    """Write ``array`` to the ``.npy`` file ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)
