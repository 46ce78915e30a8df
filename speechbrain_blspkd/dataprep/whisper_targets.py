"""Whisper-decoder targets: what Whisper's decoder heard, one vector per LLM token.

The CIF adapter has to learn, from a few hours of speech, to read Whisper's
encoder output into LLM tokens.  Whisper's own decoder already reads that
output.  This module turns the decoder's reading into a dense target for
every CIF position (``docs/algorithms.md``, "Whisper-decoder targets"):

1. the decoder is teacher-forced on its own tokenisation of the
   transcript, after the usual prompt ``<|startoftranscript|><|lang|>
   <|transcribe|><|notimestamps|>`` (an English-only model: without the
   language and task tokens), cross-attending to the **same encoder
   output the adapter reads**: the cached features of
   :mod:`speechbrain_blspkd.dataprep.feature_cache` (dynamic length, not
   padded to 30 s; the cross-attention ignores the batch padding, so an
   utterance's targets do not depend on its batch);
2. the state of the final decoder layer after its final layer norm (what
   the output head reads) at position ``t - 1`` predicts Whisper token
   ``t``: it carries what the decoder heard of token ``t``;
3. the transcript's LLM tokens (exactly the model's tokenisation,
   :meth:`~speechbrain_blspkd.prompt.PromptBuilder.transcript_ids`) and
   its Whisper tokens are placed on the transcript's characters, and each
   LLM token's target is the mean of the states predicting the Whisper
   tokens whose character spans overlap its own (:func:`span_groups`,
   :func:`span_pool`).  The two tokenisers split most sentences
   differently and no matrix maps one vocabulary onto the other, so the
   bridge goes through characters.

The result is an ``(N, d)`` float16 tensor per utterance (N: the LLM
transcript tokens, d: Whisper's width, 512 for Whisper-base): **2 d bytes
per LLM token** (1,024 for Whisper-base) plus one small file header per
utterance, stored with the feature cache's machinery (one atomic ``.pt``
file per utterance, :class:`~speechbrain_blspkd.dataprep.feature_cache.
FeatureCache`), so an interrupted run resumes with the utterances still
missing.  No Whisper decoder runs in training or at inference.

Stale caches
------------
``targets.json`` records what the targets depend on: the checksum of the
features (the encoder, as the feature cache computes it), of Whisper's
decoder and tokenizer, of the LLM tokenizer, and the transcript
separator.  A folder written for other settings is refused
(:class:`StaleWhisperTargetsError`, naming what differs) unless
``overwrite=True`` (``--overwrite``) deletes it and starts again.  Training
checks the settings it can see (features, LLM tokenizer, separator) and
each utterance's token count against its transcript.

Command line::

    python -m speechbrain_blspkd.dataprep.whisper_targets MANIFEST [...] \\
        --features FEATURE_CACHE_FOLDER --out FOLDER [--whisper whisper-base] \\
        [--llm smollm2-135m-instruct] [--transcript-separator " "] \\
        [--batch-size 16] [--shard 0/2] [--limit N] [--device cpu] \\
        [--dtype float32] [--encoder-dtype auto] [--score] [--overwrite]

Inside a recipe, :func:`prepare_whisper_targets` writes the targets of
every stage whose objective weighs the ``whisper`` term, with the recipe's
own feature cache and LLM tokenizer.

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
    feature_checksum,
)
from speechbrain_blspkd.dataprep.shard_progress import (
    parse_shard as _parse_shard,
)
from speechbrain_blspkd.dataprep.teacher_identity import (
    tokenizer_checksum as _tokenizer_checksum,
)
from speechbrain_blspkd.dataprep.token_timings import (
    _open_features,
    _rows,
    decoder_checksum,
)
from speechbrain_blspkd.nnet.token_alignment import _pad, llm_token_spans
from speechbrain_blspkd.nnet.whisper_decoder import WhisperDecoderTeacher
from speechbrain_blspkd.utils.atomic import remove_stray_tmp
from speechbrain_blspkd.utils.cache_label import check_label
from speechbrain_blspkd.utils.cli import report_error, setup_logging

logger = logging.getLogger(__name__)

__all__ = [
    "StaleWhisperTargetsError",
    "WhisperDecoderTeacher",
    "WhisperTargetCache",
    "feature_checksum",
    "llm_token_spans",
    "prepare_whisper_targets",
    "reader_settings",
    "span_groups",
    "span_pool",
    "utterance_targets",
    "wants_whisper_targets",
    "write_whisper_targets",
]

CACHE_VERSION = 1
META_FILE = "targets.json"
#: Which decoder states are stored (in the settings of every cache).
LAYER = "decoder final layer norm"


class StaleWhisperTargetsError(StaleCacheError):
    """A Whisper-target folder was written for other settings."""


# ----------------------------------------------------------------------
# the span rule (pure)
def span_groups(whisper_spans, llm_spans):
    """For each LLM token, the Whisper tokens whose characters overlap it.

    Spans are half-open character ranges ``(start, end)`` in one common
    text.  LLM token ``j`` takes every Whisper token ``i`` with
    ``max(s_j, a_i) < min(e_j, b_i)`` (at least one shared character).  An
    LLM token that shares no character with any Whisper token (an empty
    span, or characters no Whisper token covers) takes the first Whisper
    token that ends after its start, else the last one.

    Arguments
    ---------
    whisper_spans : sequence of (int, int)
        Character spans of the Whisper text tokens (at least one).
    llm_spans : sequence of (int, int)
        Character spans of the LLM tokens.

    Returns
    -------
    list of list of int
        Per LLM token, the indices of its Whisper tokens (ascending).

    Example
    -------
    >>> # " hello worldwide": Whisper " hello|world|wide",
    >>> # LLM " hel|lo| worldwide"
    >>> span_groups([(0, 6), (6, 12), (12, 16)], [(0, 4), (4, 6), (6, 16)])
    [[0], [0], [1, 2]]
    """
    whisper_spans = [(int(a), int(b)) for a, b in whisper_spans]
    if not whisper_spans:
        raise ValueError("span_groups: no Whisper token to pool from")
    groups = []
    for start, end in llm_spans:
        group = [
            i
            for i, (a, b) in enumerate(whisper_spans)
            if max(start, a) < min(end, b)
        ]
        if not group:
            later = [i for i, (_, b) in enumerate(whisper_spans) if b > start]
            group = [later[0] if later else len(whisper_spans) - 1]
        groups.append(group)
    return groups


def span_pool(states, whisper_spans, llm_spans):
    """Mean of the Whisper-token states over each LLM token's span group.

    Arguments
    ---------
    states : torch.Tensor
        (W, d): row ``i`` is the decoder state that predicts Whisper text
        token ``i``.
    whisper_spans : sequence of (int, int)
        The W Whisper tokens' character spans.
    llm_spans : sequence of (int, int)
        The N LLM tokens' character spans, in the same text.

    Returns
    -------
    torch.Tensor
        (N, d) float32 targets (:func:`span_groups` gives the rule).

    Example
    -------
    >>> states = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 4.0]])
    >>> span_pool(states, [(0, 6), (6, 12), (12, 16)],
    ...     [(0, 4), (4, 6), (6, 16)]).tolist()
    [[1.0, 0.0], [1.0, 0.0], [0.0, 3.0]]
    """
    if states.dim() != 2 or states.shape[0] != len(whisper_spans):
        raise ValueError(
            f"span_pool: states {tuple(states.shape)} do not hold one row "
            f"per Whisper token ({len(whisper_spans)})"
        )
    groups = span_groups(whisper_spans, llm_spans)
    weights = states.new_zeros(
        len(groups), states.shape[0], dtype=torch.float32
    )
    for j, group in enumerate(groups):
        weights[j, group] = 1.0 / len(group)
    return weights @ states.float()


@torch.no_grad()
def utterance_targets(teacher, prompts, feats, rows, score=False):
    """The pooled targets of a batch of utterances.

    Arguments
    ---------
    teacher : WhisperDecoderTeacher
        The decoder.
    prompts : speechbrain_blspkd.prompt.PromptBuilder
        The LLM's prompt builder (its transcript tokenisation).
    feats : list of torch.Tensor
        (T_b, d) encoder output of each row (unpadded).
    rows : list of dict
        Manifest rows (``ID``, ``transcript``, ``language``).
    score : bool
        Also count the text tokens that Whisper's output head predicts
        from their states (a check that the decoder heard them; about a
        fifth more time with Whisper-base's 51,865-token head).

    Returns
    -------
    targets : list of torch.Tensor
        (N_b, d) float32 per row.
    correct : int
        Text tokens whose state's argmax (Whisper's output head) is the
        token itself (0 without ``score``).
    total : int
        Text tokens scored (0 without ``score``).
    """
    inputs, plans = [], []
    for row in rows:
        transcript = row["transcript"]
        text_ids, whisper_spans = teacher.text_spans(transcript)
        _, llm_spans = llm_token_spans(prompts, transcript)
        if not text_ids or not llm_spans:
            raise ValueError(f"utterance {row['ID']!r}: empty transcript")
        prefix = teacher.prefix_ids(row.get("language"))
        inputs.append(torch.tensor(prefix + text_ids))
        plans.append((len(prefix), text_ids, whisper_spans, llm_spans))
    limit = teacher.decoder.embed_positions.weight.shape[0]
    for row, ids in zip(rows, inputs):
        if ids.numel() > limit:
            raise ValueError(
                f"utterance {row['ID']!r}: {ids.numel()} Whisper decoder "
                f"tokens exceed the decoder's {limit} positions"
            )
    ids, id_counts = _pad([i[:, None] for i in inputs])
    padded, frame_counts = _pad([f.float() for f in feats])
    states = teacher.states(padded, frame_counts, ids[..., 0], id_counts)
    targets, correct, total = [], 0, 0
    for b, (prefix, text_ids, whisper_spans, llm_spans) in enumerate(plans):
        heard = states[b, prefix - 1 : prefix - 1 + len(text_ids)].float()
        targets.append(span_pool(heard, whisper_spans, llm_spans).cpu())
        if score:
            guess = teacher.proj_out(heard.to(states.dtype)).argmax(-1)
            correct += int((guess.cpu() == torch.tensor(text_ids)).sum())
            total += len(text_ids)
    return targets, correct, total


# ----------------------------------------------------------------------
# settings and the cache folder
def reader_settings(model):
    """What training can check of a target cache: the features (the
    model's encoder), the LLM tokenizer and the transcript separator.

    Arguments
    ---------
    model : speechbrain_blspkd.models.speech_llm.SpeechLLMModel
        The model being trained (a frozen Whisper encoder).

    Returns
    -------
    dict

    Example
    -------
    >>> from speechbrain_blspkd.utils.testing import tiny_speech_llm
    >>> sorted(reader_settings(tiny_speech_llm()))
    ['features', 'layer', 'llm_tokenizer', 'transcript_separator', 'version']
    """
    if model is None or getattr(model, "encoder", None) is None:
        raise ValueError(
            "Whisper-decoder targets need the model's (Whisper) encoder to "
            "check the stored targets against"
        )
    return _settings(
        feature_checksum(model.encoder),
        model.tokenizer,
        model.prompts.transcript_separator,
    )


def _settings(features, llm_tokenizer, separator, teacher=None):
    settings = dict(
        version=CACHE_VERSION,
        layer=LAYER,
        features=str(features),
        llm_tokenizer=_tokenizer_checksum(llm_tokenizer),
        transcript_separator=separator,
    )
    if teacher is not None:
        settings.update(whisper=decoder_checksum(teacher), width=teacher.width)
    return settings


def _short(value):
    text = repr(value)
    return text[:14] + "...'" if len(text) > 18 else text


class WhisperTargetCache:
    """A folder of per-utterance Whisper-decoder targets (float16).

    The settings are in ``targets.json``; the tensors are stored by a
    :class:`~speechbrain_blspkd.dataprep.feature_cache.FeatureCache` in
    the same folder (``feats/<xx>/<uid>.pt``, atomic writes).

    Arguments
    ---------
    folder : str or pathlib.Path
        The cache folder.
    settings : dict
        What the targets must have been written with; every key given
        must match ``targets.json`` (a reader gives
        :func:`reader_settings`, the writer more).
    create : bool
        Writer side: make the folder and its ``targets.json`` when
        missing.  Reader side (False): a folder without ``targets.json`` is
        an error that says how to write it.
    overwrite : bool
        A folder written for other settings (or unlabelled) is deleted and
        started again instead of raising :class:`StaleWhisperTargetsError`.

    Example
    -------
    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> cache = WhisperTargetCache(folder, {"features": "a", "whisper": "w"},
    ...     create=True)
    >>> cache.put("u1", torch.ones(3, 4))
    >>> WhisperTargetCache(folder, {"features": "a"}).get("u1").shape
    torch.Size([3, 4])
    >>> WhisperTargetCache(folder, {"features": "b"})
    Traceback (most recent call last):
    ...
    speechbrain_blspkd.dataprep.whisper_targets.StaleWhisperTargetsError: Whisper targets in ... was written for other settings: features 'a' != 'b' (this run); use another folder, delete it, or rebuild it with overwrite=True (--overwrite)
    """

    def __init__(self, folder, settings, create=False, overwrite=False):
        self.folder = pathlib.Path(folder)

        def clear():
            shutil.rmtree(self.folder / "feats", ignore_errors=True)
            (self.folder / META_FILE).unlink(missing_ok=True)
            (self.folder / FEATURE_META_FILE).unlink(missing_ok=True)

        meta = check_label(
            self.folder,
            META_FILE,
            settings,
            what="Whisper targets",
            error=StaleWhisperTargetsError,
            holds_data=lambda: (
                (self.folder / "feats").is_dir()
                or (self.folder / FEATURE_META_FILE).is_file()
            ),
            clear=clear,
            how_to_write="write them with `python -m speechbrain_blspkd."
            "dataprep.whisper_targets MANIFEST --features FOLDER --out "
            f"{self.folder}` or the recipe's preparation "
            "(prepare_whisper_targets)",
            create=create,
            overwrite=overwrite,
            describe=lambda key, value: _short(value),
        )
        self.settings = meta
        digest = hashlib.sha256(
            json.dumps(meta, sort_keys=True).encode()
        ).hexdigest()
        self.store = FeatureCache(self.folder, f"whisper-targets:{digest}")

    def __contains__(self, uid):
        return uid in self.store

    def __len__(self):
        return len(self.store)

    def path(self, uid):
        """The file of ``uid``'s targets."""
        return self.store.path(uid)

    def get(self, uid, dtype=torch.float16):
        """The ``(N, d)`` targets of ``uid`` (None when not stored)."""
        return self.store.get(uid, dtype=dtype)

    def put(self, uid, targets):
        """Store ``(N, d)`` targets of ``uid`` as float16 (atomic)."""
        if targets.dim() != 2:
            raise ValueError(
                f"targets of {uid!r} must be (N, d), got {tuple(targets.shape)}"
            )
        self.store.put(uid, targets)


# ----------------------------------------------------------------------
# writing
def write_whisper_targets(
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
    score=False,
):
    """Store the Whisper-decoder targets of every row not stored yet.

    Arguments
    ---------
    manifest : str, pathlib.Path, or list
        A manifest, several, or their rows (``ID``, ``transcript``,
        ``language``, ``duration``).
    features : FeatureCache or str or pathlib.Path
        The encoder features the adapter reads (the recipe's feature
        cache); every row must be there.
    folder : str or pathlib.Path
        The target cache folder.
    teacher : WhisperDecoderTeacher
        Whisper's decoder; the partner of the encoder that wrote
        ``features``.
    prompts : speechbrain_blspkd.prompt.PromptBuilder
        The LLM's prompt builder (``model.prompts``): its tokenizer and
        transcript separator decide the LLM tokens.
    batch_size : int
        Utterances per decoder pass.
    ids : collection of str, optional
        Only these rows (None: all).
    shard : tuple of int
        ``(i, n)``: rows ``i, i + n, ...`` (after ``ids``).
    limit : int, optional
        Only the first ``limit`` rows of the shard.
    encoder : torch.nn.Module, optional
        When given, the features must have been written by it (checked
        with :func:`feature_checksum`).
    overwrite : bool
        Rebuild a folder written for other settings.
    score : bool
        Report ``whisper_token_acc`` (:func:`utterance_targets`).

    Returns
    -------
    dict
        ``written``, ``skipped`` (already stored), ``tokens`` (LLM tokens
        written), ``bytes`` (target bytes written), ``seconds`` (the
        decoder passes, loading and writing), ``whisper_token_acc`` (with
        ``score``: the share of Whisper text tokens that the decoder's
        head predicts from the features, teacher-forced; else None).

    Example
    -------
    >>> import tempfile
    >>> from speechbrain_blspkd.dataprep.feature_cache import FeatureCache
    >>> from speechbrain_blspkd.utils.testing import tiny_saved_speech_llm
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> model = tiny_saved_speech_llm(d)
    >>> features = FeatureCache(d / "feats", "enc")
    >>> features.put("u1", torch.randn(20, 64))
    >>> rows = [dict(ID="u1", transcript="the cat sat", language="en",
    ...     duration=0.4)]
    >>> teacher = WhisperDecoderTeacher(d / "whisper")
    >>> info = write_whisper_targets(rows, features, d / "targets", teacher,
    ...     model.prompts)
    >>> info["written"], info["bytes"] == info["tokens"] * 64 * 2
    (1, True)
    >>> cache = WhisperTargetCache(d / "targets", {"features": "enc"})
    >>> cache.get("u1").shape[0] == len(model.transcript_ids(["the cat sat"])[0])
    True
    >>> write_whisper_targets(rows, features, d / "targets", teacher,
    ...     model.prompts)["skipped"]
    1
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
    cache = WhisperTargetCache(
        folder, settings, create=True, overwrite=overwrite
    )
    remove_stray_tmp(cache.folder, "feats/*/.*.tmp", recursive=False)
    todo = [r for r in rows if r["ID"] not in cache]
    absent = [r["ID"] for r in todo if r["ID"] not in features]
    if absent:
        raise KeyError(
            f"{len(absent)} of {len(todo)} utterances are not in the feature "
            f"cache {features.folder} (e.g. {absent[:3]}); build it first"
        )
    # similar lengths share a batch (little padding)
    todo.sort(key=lambda r: (float(r.get("duration") or 0), r["ID"]))
    stats = dict(
        written=0, skipped=len(rows) - len(todo), tokens=0, bytes=0, seconds=0.0
    )
    correct = total = 0
    logger.info(
        "Whisper targets %s: %d rows, %d stored, %d to write",
        cache.folder,
        len(rows),
        stats["skipped"],
        len(todo),
    )
    start = time.perf_counter()
    for first in range(0, len(todo), batch_size):
        batch = todo[first : first + batch_size]
        feats = [features.get(r["ID"]) for r in batch]
        targets, right, scored = utterance_targets(
            teacher, prompts, feats, batch, score=score
        )
        for row, target in zip(batch, targets):
            cache.put(row["ID"], target)
            stats["tokens"] += target.shape[0]
            stats["bytes"] += target.numel() * 2
        stats["written"] += len(batch)
        correct, total = correct + right, total + scored
    stats["seconds"] = time.perf_counter() - start
    stats["whisper_token_acc"] = correct / total if total else None
    return stats


def wants_whisper_targets(objective):
    """Whether a stage's objective reads Whisper-decoder targets (its
    ``whisper`` term is weighted).

    Example
    -------
    >>> wants_whisper_targets(object())
    False
    """
    return getattr(objective, "whisper_target_folder", None) is not None


def prepare_whisper_targets(hparams, feature_cache, device="cpu", shard=(0, 1)):
    """Write the targets of every stage whose objective weighs ``whisper``.

    For each such stage: its training rows (``train_manifest`` after the
    stage's ``languages`` and ``max_utterances``), the recipe's feature
    cache, Whisper's decoder from ``encoder_source`` (the encoder's own
    partner) on ``device``, the model's LLM tokenizer and transcript
    separator, ``feature_batch_size`` utterances per pass, into the
    objective's ``whisper`` folder.  Resumable and idempotent; a folder
    written for other settings is refused
    (:class:`StaleWhisperTargetsError`).  Nothing is loaded when no stage
    weighs the term.  Call it after
    :func:`~speechbrain_blspkd.brain.prepare_features` and before
    :func:`~speechbrain_blspkd.brain.dataio_prepare`; with several
    processes on the main one only (``run_on_main``), or on every process
    with its ``shard = (rank, world)`` followed by a barrier.

    Arguments
    ---------
    hparams : dict
        The recipe's hyperparameters (``stages``, ``model``,
        ``encoder_source``, ``feature_batch_size``).
    feature_cache : FeatureCache or None
        What :func:`~speechbrain_blspkd.brain.prepare_features` returned.
    device : str or torch.device
        Where the decoder runs.
    shard : tuple of int
        ``(i, n)`` rows of each stage this call writes.

    Returns
    -------
    list of pathlib.Path
        The target folders (empty when no stage weighs the term).
    """
    from speechbrain.dataio.dataset import DynamicItemDataset

    stages = [
        s
        for s in hparams.get("stages") or []
        if wants_whisper_targets(s.objective)
    ]
    if not stages:
        return []
    if feature_cache is None:
        raise ValueError(
            "the `whisper` term reads targets computed from the cached "
            "encoder features: set use_feature_cache: True (a frozen "
            "Whisper encoder)"
        )
    teacher = WhisperDecoderTeacher(hparams["encoder_source"]).to(device)
    model = hparams["model"]
    folders = []
    for stage in stages:
        rows = read_manifest(stage.train_manifest)
        dataset = DynamicItemDataset({r["ID"]: dict(r) for r in rows})
        ids = stage.select_rows(dataset, source=stage.train_manifest).data_ids
        folder = stage.objective.whisper_target_folder
        info = write_whisper_targets(
            rows,
            feature_cache,
            folder,
            teacher,
            model.prompts,
            batch_size=hparams.get("feature_batch_size", 16),
            ids=ids,
            shard=shard,
        )
        logger.info(
            "stage %s: Whisper targets %s: %s", stage.name, folder, info
        )
        folders.append(pathlib.Path(folder))
    return folders


# ----------------------------------------------------------------------
# command line
def main(argv=None):
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description="Store Whisper-decoder targets (one vector per LLM "
        "transcript token) computed from a feature cache."
    )
    parser.add_argument("manifests", nargs="+", help="manifest(s)")
    parser.add_argument(
        "--features", required=True, help="the recipe's feature cache folder"
    )
    parser.add_argument("--out", required=True, help="the target folder")
    parser.add_argument("--whisper", default="whisper-base")
    parser.add_argument("--llm", default="smollm2-135m-instruct")
    parser.add_argument("--system-prompt", default=None)
    parser.add_argument("--transcript-separator", default=" ")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shard", type=_parse_shard, default=(0, 1))
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--dtype", default=None, help="decoder weights (default float32)"
    )
    parser.add_argument(
        "--encoder-dtype",
        default="auto",
        help="the recipe encoder's dtype, to check the features against "
        "(default %(default)s, as the recipes; 'none' skips the check)",
    )
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument(
        "--score",
        action="store_true",
        help="report how many Whisper text tokens the decoder's own head "
        "predicts from the features (teacher-forced)",
    )
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    setup_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
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
        teacher = WhisperDecoderTeacher(args.whisper, dtype=args.dtype)
        teacher.to(args.device)
        info = write_whisper_targets(
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
            score=args.score,
        )
    except (RuntimeError, ValueError, KeyError, FileNotFoundError) as e:
        return report_error(e)
    rate = info["written"] / info["seconds"] if info["seconds"] else 0.0
    acc = info["whisper_token_acc"]
    print(
        f"{args.out}: {info['written']} utterances written "
        f"({rate:.1f}/s), {info['skipped']} already there, "
        f"{info['tokens']} LLM tokens, {info['bytes']} target bytes"
        + ("" if acc is None else f", Whisper token accuracy {acc:.3f}")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
