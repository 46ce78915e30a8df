"""Token timings: where each LLM token of a transcript is spoken.

A CIF adapter learns *what* each LLM token sounds like and *where* it is
in the clip.  Whisper knows the second: teacher-forced on the transcript,
its *alignment heads* (listed in the asset's ``generation_config.json``)
look at the frames of the token being predicted.  This module stores one
``(start, end)`` time per LLM token of every utterance beside the feature
cache, so that training can tell the CIF where tokens are (the timing
loss and scheduled forcing of :class:`~speechbrain_blspkd.nnet.cformer.
CFormer`, ``docs/algorithms.md`` "Token timings").

How (per utterance)
-------------------
1. Decoder input: ``<|startoftranscript|><|lang|><|transcribe|>
   <|notimestamps|>`` (an English-only model: ``<|startoftranscript|>
   <|notimestamps|>``) followed by Whisper's tokens of ``" " +
   transcript``; the decoder cross-attends to the **cached encoder
   output** (:mod:`~speechbrain_blspkd.dataprep.feature_cache`: dynamic
   length, the same frames the adapter reads), so no encoder pass runs.
2. The cross-attention weights of the alignment heads over the real frames
   are z-normalised over the token axis, median-filtered along time
   (width 7) and averaged over the heads; the rows that predict the text
   tokens and the end-of-text token (from the ``<|notimestamps|>`` row to
   the last text token's row) form a (W + 1, T) matrix.
3. Dynamic time warping on its negation gives a monotonic path from the
   first to the last frame, which hands each row a stretch of frames; the
   start of Whisper token ``i`` is the midpoint of row ``i``'s first
   frame and its attention peak inside the stretch (row W: the end of the
   speech).  Frames are 1 / 50 s (Whisper's encoder rate).
4. The LLM tokens (exactly the model's tokenisation,
   :meth:`~speechbrain_blspkd.prompt.PromptBuilder.transcript_ids`) are
   placed on the transcript's characters: an LLM token starts at the time
   of its first character, interpolated by characters inside the Whisper
   token that covers it; it ends where the next starts, the last where
   the speech ends (the two tokenisers split most sentences differently).

Steps 2-4: :mod:`speechbrain_blspkd.nnet.token_alignment`; the decoder:
:mod:`speechbrain_blspkd.nnet.whisper_decoder`.

Storage and stale caches
------------------------
An ``(N, 2)`` float16 tensor of seconds per utterance (4 bytes per LLM
token), one atomic file each (:class:`~speechbrain_blspkd.dataprep.
feature_cache.FeatureCache`), so an interrupted run resumes with the
utterances still missing.  ``timings.json`` records what they depend on
(the features' checksum, Whisper's decoder and tokenizer, the alignment
heads, the LLM tokenizer and the transcript separator); a folder written
for other settings is refused (:class:`StaleTokenTimingsError`, naming
what differs) unless ``overwrite=True`` (``--overwrite``).  Training
checks the settings it can see and each utterance's token count.

Command line (``--help`` lists the options)::

    python -m speechbrain_blspkd.dataprep.token_timings MANIFEST [...] \\
        --features FEATURE_CACHE_FOLDER --out FOLDER [--shard 0/2]

In a recipe, ``token_timings_folder`` makes :func:`prepare_token_timings`
write every split's timings before training; :func:`timing_items` hands
them to the model as ``token_spans``.

Authors
 * speechbrain-blspkd contributors 2026
"""

import argparse
import hashlib
import json
import logging
import pathlib
import shutil
import sys
import time

import torch

from speechbrain_blspkd.dataio.manifest import read_manifest
from speechbrain_blspkd.dataprep.feature_cache import (
    META_FILE as FEATURE_META_FILE,
)
from speechbrain_blspkd.dataprep.feature_cache import (
    FeatureCache,
    StaleCacheError,
    encoder_checksum,
    feature_checksum,
)
from speechbrain_blspkd.dataprep.shard_progress import (
    WORKER_ERRORS,
    parse_shard,
    parse_worker_args,
)
from speechbrain_blspkd.dataprep.teacher_identity import (
    tokenizer_checksum as _tokenizer_checksum,
)
from speechbrain_blspkd.nnet.token_alignment import (
    MEDIAN_WIDTH,
    utterance_timings,
)
from speechbrain_blspkd.nnet.whisper_decoder import WhisperDecoderTeacher
from speechbrain_blspkd.utils.atomic import remove_stray_tmp
from speechbrain_blspkd.utils.cache_label import LabelledFolder
from speechbrain_blspkd.utils.cli import per, report_run

logger = logging.getLogger(__name__)

__all__ = [
    "StaleTokenTimingsError",
    "TokenTimingCache",
    "decoder_checksum",
    "prepare_token_timings",
    "timing_items",
    "write_token_timings",
]

CACHE_VERSION = 1
META_FILE = "timings.json"


class StaleTokenTimingsError(StaleCacheError):
    """A token-timing folder was written for other settings."""


def decoder_checksum(teacher):
    """SHA-256 of a :class:`~speechbrain_blspkd.nnet.whisper_decoder.
    WhisperDecoderTeacher`'s weights and configuration and of its
    tokenizer: what stored timings depend on besides the features."""
    h = hashlib.sha256(encoder_checksum(teacher.decoder).encode())
    h.update(_tokenizer_checksum(teacher.tokenizer).encode())
    return h.hexdigest()


def _open_features(features):
    """A FeatureCache from an object or a folder (its own checksum)."""
    if isinstance(features, FeatureCache):
        return features
    folder = pathlib.Path(features)
    meta_path = folder / FEATURE_META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{folder} is not a feature cache (no {FEATURE_META_FILE}); "
            "build it first (the recipe's prepare_features)"
        )
    checksum = json.loads(meta_path.read_text(encoding="utf-8"))["checksum"]
    return FeatureCache(folder, checksum)


def _rows(manifest):
    """Manifest rows from a path, a list of paths or a list of rows."""
    if isinstance(manifest, (str, pathlib.Path)):
        return read_manifest(manifest)
    items = list(manifest)
    if items and isinstance(items[0], dict):
        return items
    return [row for path in items for row in read_manifest(path)]


# ----------------------------------------------------------------------
# settings and the cache folder
def reader_settings(model):
    """What training can check of a timing cache: the features (the
    model's encoder), the LLM tokenizer and the transcript separator.

    Example
    -------
    >>> from speechbrain_blspkd.testing import tiny_speech_llm
    >>> sorted(reader_settings(tiny_speech_llm()))
    ['features', 'llm_tokenizer', 'transcript_separator', 'version']
    """
    if model is None or getattr(model, "encoder", None) is None:
        raise ValueError(
            "token timings need the model's (Whisper) encoder to check the "
            "stored timings against"
        )
    return _settings(
        feature_checksum(model.encoder),
        model.tokenizer,
        model.prompts.transcript_separator,
    )


def _settings(features, llm_tokenizer, separator, teacher=None):
    settings = dict(
        version=CACHE_VERSION,
        features=str(features),
        llm_tokenizer=_tokenizer_checksum(llm_tokenizer),
        transcript_separator=separator,
    )
    if teacher is not None:
        settings.update(
            whisper=decoder_checksum(teacher),
            alignment_heads=[list(h) for h in teacher.alignment_heads],
            median_width=MEDIAN_WIDTH,
        )
    return settings


class TokenTimingCache(LabelledFolder):
    """A folder of per-utterance LLM-token timings ((N, 2) seconds).

    Arguments
    ---------
    folder : str or pathlib.Path
        The cache folder.
    settings : dict
        What the timings must have been written with; every key given must
        match ``timings.json`` (a reader gives :func:`reader_settings`, the
        writer more).
    create : bool
        Writer side: make the folder and its label when missing.  Reader
        side (False): a folder without ``timings.json`` is an error that
        says how to write it.
    overwrite : bool
        A folder written for other settings is deleted and started again
        instead of raising :class:`StaleTokenTimingsError`.

    Example
    -------
    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> cache = TokenTimingCache(folder, {"features": "a", "whisper": "w"},
    ...     create=True)
    >>> cache.put("u1", torch.tensor([[0.0, 0.5], [0.5, 0.75]]))
    >>> TokenTimingCache(folder, {"features": "a"}).get("u1").tolist()
    [[0.0, 0.5], [0.5, 0.75]]
    >>> TokenTimingCache(folder, {"features": "b"})
    Traceback (most recent call last):
    ...
    speechbrain_blspkd.dataprep.token_timings.StaleTokenTimingsError: token timings in ... was written for other settings: features 'a' != 'b' (this run); use another folder, delete it, or rebuild it with overwrite=True (--overwrite)
    """

    label_name = META_FILE
    what = "token timings"
    error = StaleTokenTimingsError
    how_to_write = (
        "write them with `python -m speechbrain_blspkd.dataprep.token_timings"
        " MANIFEST --features FOLDER --out {folder}` or the recipe's "
        "preparation (prepare_token_timings)"
    )

    def __init__(self, folder, settings, create=False, overwrite=False):
        self.folder = pathlib.Path(folder)
        self.settings = self.check_label(settings, create, overwrite)
        digest = hashlib.sha256(
            json.dumps(self.settings, sort_keys=True).encode()
        ).hexdigest()
        self.store = FeatureCache(self.folder, f"token-timings:{digest}")

    # -- the label (see LabelledFolder)
    def holds_data(self):
        """Whether the folder holds timings (or their store's label)."""
        return (self.folder / "feats").is_dir() or (
            self.folder / FEATURE_META_FILE
        ).is_file()

    def clear(self):
        """Delete the timings, their store's label and this label."""
        shutil.rmtree(self.folder / "feats", ignore_errors=True)
        (self.folder / META_FILE).unlink(missing_ok=True)
        (self.folder / FEATURE_META_FILE).unlink(missing_ok=True)

    def describe(self, key, value):
        """Long values (checksums) shortened to 14 characters."""
        text = repr(value)
        return text[:14] + "...'" if len(text) > 18 else text

    # -- the timings
    def __contains__(self, uid):
        return uid in self.store

    def __len__(self):
        return len(self.store)

    def get(self, uid):
        """The ``(N, 2)`` float32 timings of ``uid`` (None when absent)."""
        return self.store.get(uid, dtype=torch.float32)

    def put(self, uid, timings):
        """Store ``(N, 2)`` timings of ``uid`` (float16 seconds, atomic)."""
        if timings.dim() != 2 or timings.shape[1] != 2:
            raise ValueError(
                f"timings of {uid!r} must be (N, 2), got {tuple(timings.shape)}"
            )
        self.store.put(uid, timings)


# ----------------------------------------------------------------------
# writing
def write_token_timings(
    manifest,
    features,
    folder,
    teacher,
    prompts,
    batch_size=16,
    ids=None,
    shard=(0, 1),
    limit=None,
    encoder=None,
    overwrite=False,
):
    """Store the token timings of every row not stored yet.

    Arguments
    ---------
    manifest : str, pathlib.Path, or list
        A manifest, several, or their rows (``ID``, ``transcript``,
        ``language``, ``duration``).
    features : FeatureCache or str or pathlib.Path
        The encoder features the adapter reads; every row must be there.
    folder : str or pathlib.Path
        The timing cache folder.
    teacher : WhisperDecoderTeacher
        Whisper's decoder, the partner of the encoder that wrote
        ``features``.
    prompts : speechbrain_blspkd.prompt.PromptBuilder
        The LLM's prompt builder (``model.prompts``).
    batch_size : int
        Utterances per decoder pass.
    ids : collection of str, optional
        Only these rows (None: all).
    shard : tuple of int
        ``(i, n)``: rows ``i, i + n, ...`` (after ``ids``).
    limit : int, optional
        Only the first ``limit`` rows of the shard.
    encoder : torch.nn.Module, optional
        When given, the features must have been written by it.
    overwrite : bool
        Rebuild a folder written for other settings.

    Returns
    -------
    dict
        ``written``, ``skipped`` (already stored), ``tokens`` (LLM tokens
        written), ``seconds`` (decoder passes, DTW and writing).

    Example
    -------
    >>> import tempfile
    >>> from speechbrain_blspkd.testing import tiny_saved_speech_llm
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> model = tiny_saved_speech_llm(d)
    >>> features = FeatureCache(d / "feats", "enc")
    >>> features.put("u1", torch.randn(20, 64))
    >>> rows = [dict(ID="u1", transcript="the cat sat", language="en",
    ...     duration=0.4)]
    >>> teacher = WhisperDecoderTeacher(d / "whisper")
    >>> write_token_timings(rows, features, d / "t", teacher,
    ...     model.prompts)["written"]
    1
    >>> spans = TokenTimingCache(d / "t", {"features": "enc"}).get("u1")
    >>> spans.shape[0] == len(model.transcript_ids(["the cat sat"])[0])
    True
    >>> bool((spans[1:, 0] >= spans[:-1, 0]).all())
    True
    """
    i, n = shard
    if not 0 <= i < n:
        raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard}")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    rows = _rows(manifest)
    if ids is not None:
        wanted = set(ids)
        rows = [r for r in rows if r["ID"] in wanted]
    rows = rows[i::n]
    if limit is not None:
        rows = rows[: int(limit)]
    features = _open_features(features)
    if encoder is not None and feature_checksum(encoder) != features.checksum:
        raise StaleCacheError(
            f"the features in {features.folder} were written by another "
            f"encoder ({features.checksum[:12]}...) than this Whisper's "
            f"({feature_checksum(encoder)[:12]}...); rebuild them or use "
            "the same Whisper (and encoder dtype) as the recipe"
        )
    settings = _settings(
        features.checksum,
        prompts.tokenizer,
        prompts.transcript_separator,
        teacher,
    )
    cache = TokenTimingCache(folder, settings, create=True, overwrite=overwrite)
    remove_stray_tmp(cache.folder, "feats/*/.*.tmp", recursive=False)
    todo = [r for r in rows if r["ID"] not in cache]
    absent = [r["ID"] for r in todo if r["ID"] not in features]
    if absent:
        raise KeyError(
            f"{len(absent)} of {len(todo)} utterances are not in the feature "
            f"cache {features.folder} (e.g. {absent[:3]}); build it first"
        )
    todo.sort(key=lambda r: (float(r.get("duration") or 0), r["ID"]))
    stats = dict(written=0, skipped=len(rows) - len(todo), tokens=0)
    logger.info(
        "token timings %s: %d rows, %d stored, %d to write",
        cache.folder,
        len(rows),
        stats["skipped"],
        len(todo),
    )
    from speechbrain_blspkd.nnet.whisper_encoder import WhisperEncoder

    rate = WhisperEncoder.frame_rate()
    start = time.perf_counter()
    for first in range(0, len(todo), batch_size):
        batch = todo[first : first + batch_size]
        feats = [features.get(r["ID"]) for r in batch]
        timings = utterance_timings(teacher, prompts, feats, batch, rate)
        for row, timing in zip(batch, timings):
            cache.put(row["ID"], timing)
            stats["tokens"] += timing.shape[0]
        stats["written"] += len(batch)
    stats["seconds"] = time.perf_counter() - start
    return stats


def _recipe_manifests(hparams):
    """Every manifest a recipe trains, validates or tests on (once each)."""
    paths = [s.train_manifest for s in hparams.get("stages") or []]
    paths += [hparams.get("valid_csv"), hparams.get("test_csv")]
    seen, out = set(), []
    for path in paths:
        if path and str(path) not in seen and pathlib.Path(path).is_file():
            seen.add(str(path))
            out.append(path)
    return out


def prepare_token_timings(hparams, feature_cache, device="cpu", shard=(0, 1)):
    """Write the token timings of every row a recipe reads.

    Does nothing unless ``hparams["token_timings_folder"]`` is set.  The
    rows of every stage's manifest and of the validation and test
    manifests, the recipe's feature cache, Whisper's decoder from
    ``encoder_source`` on ``device``, the model's LLM tokenizer and
    transcript separator, ``feature_batch_size`` rows per pass.  Resumable
    and idempotent; a folder written for other settings is refused
    (:class:`StaleTokenTimingsError`).  Call it after
    :func:`~speechbrain_blspkd.recipe.prepare_features`, on one process per
    node (or on every process with its ``shard`` followed by a barrier).

    Returns
    -------
    pathlib.Path or None
        The folder (None when the recipe asks for no timings).
    """
    folder = hparams.get("token_timings_folder")
    if not folder:
        return None
    if feature_cache is None:
        raise ValueError(
            "token timings are computed from the cached encoder features: "
            "set use_feature_cache: True (a frozen Whisper encoder)"
        )
    teacher = WhisperDecoderTeacher(hparams["encoder_source"]).to(device)
    rows = []
    for path in _recipe_manifests(hparams):
        rows.extend(read_manifest(path))
    unique = list({r["ID"]: r for r in rows}.values())
    info = write_token_timings(
        unique,
        feature_cache,
        folder,
        teacher,
        hparams["model"].prompts,
        batch_size=hparams.get("feature_batch_size", 16),
        shard=shard,
    )
    logger.info("token timings %s: %s", folder, info)
    return pathlib.Path(folder)


def timing_items(model, folder):
    """The dynamic item that gives each row its stored timings.

    The cache is checked against ``model`` (features, LLM tokenizer,
    separator: :class:`StaleTokenTimingsError` otherwise); each row's
    timings must hold one span per transcript token.

    Arguments
    ---------
    model : speechbrain_blspkd.models.speech_llm.SpeechLLMModel
        The model being trained.
    folder : str or pathlib.Path
        The timing cache.

    Returns
    -------
    callable
        A speechbrain dynamic item ``(id, transcript) -> token_spans``
        ((N, 2) float32 seconds).
    """
    import speechbrain as sb

    cache = TokenTimingCache(folder, reader_settings(model))

    @sb.utils.data_pipeline.takes("id", "transcript")
    @sb.utils.data_pipeline.provides("token_spans")
    def stored_timings(uid, transcript):
        spans = cache.get(uid)
        if spans is None:
            raise KeyError(
                f"utterance {uid!r} has no token timings in {cache.folder}; "
                "run the recipe's preparation (prepare_token_timings)"
            )
        count = len(model.prompts.transcript_ids(transcript))
        if spans.shape[0] != count:
            raise StaleTokenTimingsError(
                f"{cache.folder}: utterance {uid!r} has {spans.shape[0]} "
                f"token timings for a transcript of {count} LLM tokens; the "
                "transcript changed since they were written (rebuild with "
                "overwrite=True)"
            )
        return spans

    return stored_timings


# ----------------------------------------------------------------------
# command line
def main(argv=None):
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description="Store the time span of every LLM token of each "
        "transcript, from Whisper's cross-attention on a feature cache."
    )
    parser.add_argument("manifests", nargs="+", help="manifest(s)")
    parser.add_argument(
        "--features", required=True, help="the recipe's feature cache folder"
    )
    parser.add_argument("--out", required=True, help="the timing folder")
    parser.add_argument("--whisper", default="whisper-base")
    parser.add_argument("--llm", default="smollm2-135m-instruct")
    parser.add_argument("--system-prompt", default=None)
    parser.add_argument("--transcript-separator", default=" ")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shard", type=parse_shard, default=(0, 1))
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--encoder-dtype",
        default="auto",
        help="the recipe encoder's dtype, to check the features against "
        "(default %(default)s, as the recipes; 'none' skips the check)",
    )
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    args = parse_worker_args(parser, argv)

    def run():
        from transformers import AutoTokenizer

        from speechbrain_blspkd.assets.paths import resolve_source
        from speechbrain_blspkd.nnet.whisper_encoder import WhisperEncoder
        from speechbrain_blspkd.prompt import PromptBuilder
        from speechbrain_blspkd.utils import precision

        precision.set_run_device(args.device)
        prompts = PromptBuilder(
            AutoTokenizer.from_pretrained(str(resolve_source(args.llm))),
            system_prompt=args.system_prompt,
            transcript_separator=args.transcript_separator,
        )
        encoder = None
        if args.encoder_dtype.lower() != "none":
            encoder = WhisperEncoder(
                resolve_source(args.whisper), dtype=args.encoder_dtype
            )
        teacher = WhisperDecoderTeacher(args.whisper).to(args.device)
        info = write_token_timings(
            args.manifests,
            args.features,
            args.out,
            teacher,
            prompts,
            batch_size=args.batch_size,
            shard=args.shard,
            limit=args.limit,
            encoder=encoder,
            overwrite=args.overwrite,
        )
        rate = per(info["written"], info["seconds"])
        return (
            f"{args.out}: {info['written']} utterances written ({rate:.1f}/s), "
            f"{info['skipped']} already there, {info['tokens']} LLM tokens"
        )

    return report_run(WORKER_ERRORS, run)


if __name__ == "__main__":
    sys.exit(main())
