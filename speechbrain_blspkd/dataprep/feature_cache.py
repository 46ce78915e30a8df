"""A disk cache of frozen speech-encoder features, one file per utterance.

When the speech encoder is frozen its output for an utterance never changes,
so it can be computed once and reused in every epoch.  The cache is only
valid for the exact encoder that filled it: :func:`encoder_checksum` hashes
the encoder's weights and configuration, the folder's ``meta.json`` records
that checksum, and :class:`FeatureCache` refuses a folder filled by another
encoder (:class:`StaleCacheError`) unless told to ``overwrite`` it.

Features are stored as float16 ``.pt`` files (``feats/<xx>/<uid>.pt``),
each written atomically, so an interrupted :func:`build_feature_cache`
resumes with the utterances that are still missing.

Under ``torchrun`` every rank calls :func:`build_feature_cache`: the
utterances some node still lacks are split across all ranks, each batch's
features travel to every rank through the process group, and the first
process of each node writes them into that node's folder: nodes share no
disk, each holds the whole cache.
"""

import hashlib
import json
import logging
import pathlib
import re
import shutil

import speechbrain as sb
import torch

from speechbrain_blspkd.dataio.audio import load_row_audio
from speechbrain_blspkd.dataio.manifest import read_manifest
from speechbrain_blspkd.utils.atomic import (
    atomic_path,
    remove_stray_tmp,
)
from speechbrain_blspkd.utils.cache_label import LabelledFolder, hash_tensors
from speechbrain_blspkd.utils.distributed import (
    all_gather,
    gather_results,
    rank_world,
    shard,
)

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
META_FILE = "meta.json"
_SAFE_UID = re.compile(r"[A-Za-z0-9._-]{1,150}")


class StaleCacheError(ValueError):
    """A feature cache folder belongs to another encoder (or is unlabelled)."""


def encoder_checksum(encoder_module, extra=None):
    """SHA-256 of an encoder's state dict tensors and configuration.

    Every tensor's name, dtype, shape and raw bytes are hashed in name
    order, then the class name, the ``config`` (when the module has a
    transformers-style ``config.to_dict()``) and ``extra`` (any
    JSON-serialisable settings that change the features, e.g. the
    padding policy).

    Arguments
    ---------
    encoder_module : torch.nn.Module
        The (frozen) encoder.
    extra : dict, optional
        More settings to include.

    Returns
    -------
    str
        Hexadecimal digest.

    Example
    -------
    >>> lin = torch.nn.Linear(2, 2)
    >>> a = encoder_checksum(lin)
    >>> with torch.no_grad():
    ...     lin.weight[0, 0] += 1
    >>> a == encoder_checksum(lin)
    False
    >>> len(a)
    64
    """
    h = hashlib.sha256()
    h.update(type(encoder_module).__qualname__.encode())
    hash_tensors(h, sorted(encoder_module.state_dict().items()))
    config = getattr(encoder_module, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        h.update(
            json.dumps(config.to_dict(), sort_keys=True, default=str).encode()
        )
    if extra is not None:
        h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def feature_checksum(encoder):
    """The checksum a feature cache of ``encoder``'s output is labelled
    with: its weights and configuration plus its padding policy
    (``dynamic_length``).

    Example
    -------
    >>> from speechbrain_blspkd.nnet.whisper_encoder import WhisperEncoder
    >>> from speechbrain_blspkd.testing import tiny_whisper_config
    >>> len(feature_checksum(WhisperEncoder(tiny_whisper_config())))
    64
    """
    return encoder_checksum(
        encoder, extra={"dynamic_length": encoder.dynamic_length}
    )


class FeatureCache(LabelledFolder):
    """Per-utterance float16 features of one encoder, stored in ``folder``.

    Arguments
    ---------
    folder : str or pathlib.Path
        Cache folder (created when missing).
    checksum : str
        :func:`encoder_checksum` of the encoder whose features go here.
    overwrite : bool
        When the folder holds another encoder's features, delete them and
        start empty instead of raising :class:`StaleCacheError`.

    Example
    -------
    >>> import tempfile
    >>> cache = FeatureCache(tempfile.mkdtemp(), "abc")
    >>> cache.get("u1") is None
    True
    >>> cache.put("u1", torch.ones(3, 2))
    >>> cache.get("u1").dtype, "u1" in cache, len(cache)
    (torch.float32, True, 1)
    """

    label_name = META_FILE
    what = "feature cache"
    error = StaleCacheError

    def __init__(self, folder, checksum, overwrite=False):
        self.folder = pathlib.Path(folder)
        self.checksum = str(checksum)
        self.feat_dir = self.folder / "feats"
        self.check_label(
            dict(
                version=CACHE_VERSION, checksum=self.checksum, dtype="float16"
            ),
            create=True,
            overwrite=overwrite,
        )

    def holds_data(self):
        """Whether any features are stored (see LabelledFolder)."""
        return self.feat_dir.is_dir() and any(self.feat_dir.iterdir())

    def clear(self):
        """Delete every stored feature (see LabelledFolder)."""
        shutil.rmtree(self.feat_dir, ignore_errors=True)

    def path(self, uid):
        """The file that holds (or will hold) the features of ``uid``."""
        digest = hashlib.sha1(uid.encode()).hexdigest()
        name = uid if _SAFE_UID.fullmatch(uid) else digest
        return self.feat_dir / digest[:2] / f"{name}.pt"

    def __contains__(self, uid):
        return self.path(uid).is_file()

    def __len__(self):
        if not self.feat_dir.is_dir():
            return 0
        return sum(1 for _ in self.feat_dir.glob("*/*.pt"))

    def get(self, uid, dtype=torch.float32, device=None):
        """Features of ``uid`` (``None`` when not cached).

        Arguments
        ---------
        uid : str
            Utterance ID.
        dtype : torch.dtype
            Returned dtype (stored as float16).
        device : str or torch.device, optional
            Returned device (default CPU).
        """
        path = self.path(uid)
        if not path.is_file():
            return None
        try:
            item = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # unreadable file: recompute it
            logger.warning(
                "%s: unreadable cached features (%s); ignoring", path, e
            )
            return None
        if item.get("uid") != uid:
            raise StaleCacheError(
                f"{path}: holds features of {item.get('uid')!r}, not {uid!r}"
            )
        return item["feats"].to(device=device or "cpu", dtype=dtype)

    def put(self, uid, feats):
        """Store ``feats`` (any float tensor) for ``uid`` as float16, atomically.

        Raises
        ------
        ValueError
            If the features are not finite or overflow float16.
        """
        half = _to_half(uid, feats)
        path = self.path(uid)
        with atomic_path(path) as tmp:
            torch.save({"uid": uid, "feats": half.clone()}, tmp)


def build_feature_cache(
    manifest,
    folder,
    encoder_fn,
    checksum,
    batch_size=8,
    data_root=None,
    overwrite=False,
    sample_rate=16000,
    max_seconds=None,
):
    """Encode every utterance of ``manifest`` that is not cached yet.

    Rows are sorted by duration (similar lengths share a batch); cached
    utterances are skipped, so an interrupted build resumes.

    Under ``torchrun`` call it on every rank (a collective) with the same
    arguments (``folder`` may be a different disk on every node): the
    utterances missing from any node's folder are split across the ranks
    (rank ``r`` of ``n`` encodes rows ``r::n`` of them, in duration order),
    every batch's features are gathered through the process group, and the
    first process of each node writes them all into its ``folder``.  An
    error on any rank (unreadable audio ...) is raised on every rank.

    Arguments
    ---------
    manifest : str or pathlib.Path
        The manifest (see :mod:`speechbrain_blspkd.dataio.manifest`).
    folder : str or pathlib.Path
        The cache folder.
    encoder_fn : callable
        ``encoder_fn(wavs) -> list of tensors``: takes a list of 1-D float32
        waveforms and returns one feature tensor (e.g. ``(frames, dim)``)
        per waveform, unpadded.
    checksum : str
        :func:`encoder_checksum` of the encoder behind ``encoder_fn``.
    batch_size : int
        Waveforms per ``encoder_fn`` call.
    data_root : str, optional
        Replaces ``$data_root`` in the manifest (default: the manifest's
        folder).
    overwrite : bool
        Rebuild a cache made by another encoder (see :class:`FeatureCache`).
    sample_rate : int
        Rate the audio is loaded at.
    max_seconds : float, optional
        Refuse longer audio.

    Returns
    -------
    dict
        ``computed`` (utterances this rank encoded), ``skipped`` (cached
        on every node already) and the ``cache``.

    Example
    -------
    >>> import tempfile, numpy as np, soundfile
    >>> from speechbrain_blspkd.dataio.manifest import write_manifest
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> soundfile.write(d / "a.wav", np.zeros(1600, "float32"), 16000)
    >>> write_manifest(d / "m.csv", [dict(ID="a", wav="$data_root/a.wav",
    ...     duration=0.1, transcript="x", language="en", speaker="s")])
    >>> enc = lambda wavs: [w.reshape(-1, 160) for w in wavs]
    >>> build_feature_cache(d / "m.csv", d / "cache", enc, "c1")["computed"]
    1
    >>> build_feature_cache(d / "m.csv", d / "cache", enc, "c1")["skipped"]
    1
    """
    from tqdm import tqdm

    manifest = pathlib.Path(manifest)
    if data_root is None:
        data_root = str(manifest.parent)
    rank, world = rank_world()
    cache = _open_on_every_rank(folder, checksum, overwrite)
    writer = world == 1 or sb.utils.distributed.is_local_rank_zero()
    rows = read_manifest(manifest, data_root=data_root)
    # what some node still lacks (each node checks its own folder)
    missing = set()
    for ids in all_gather([r["ID"] for r in rows if r["ID"] not in cache]):
        missing.update(ids)
    todo = [r for r in rows if r["ID"] in missing]
    todo.sort(key=lambda r: (r["duration"], r["ID"]))
    mine = shard(todo, rank, world)
    # every rank takes part in every gather, also with nothing left to do
    steps = -(-len(shard(todo, 0, world)) // batch_size)
    stats = dict(computed=0, skipped=len(rows) - len(todo), cache=cache)

    def encode(batch):
        wavs = [
            load_row_audio(
                r, manifest, sample_rate=sample_rate, max_seconds=max_seconds
            )
            for r in batch
        ]
        with torch.no_grad():
            feats = encoder_fn(wavs) if batch else []
        if len(feats) != len(batch):
            raise ValueError(
                f"encoder_fn returned {len(feats)} feature tensors for "
                f"{len(batch)} waveforms"
            )
        return [(r["ID"], _to_half(r["ID"], f)) for r, f in zip(batch, feats)]

    with tqdm(total=len(mine), desc="feature cache", unit="utt") as bar:
        for step in range(steps):
            batch = mine[step * batch_size : (step + 1) * batch_size]
            encoded = gather_results(encode, batch)
            if writer:
                for uid, half in (item for part in encoded for item in part):
                    if uid not in cache:
                        cache.put(uid, half)
            stats["computed"] += len(batch)
            bar.update(len(batch))
    sb.utils.distributed.ddp_barrier()  # every node's cache is complete
    return stats


def _open_on_every_rank(folder, checksum, overwrite):
    """The :class:`FeatureCache` of ``folder`` on every rank.

    The first process of each node opens it first (checks it, clears it
    with ``overwrite``, removes stray temporary files), then the others;
    an error on any rank is raised on every rank.
    """
    opened = {}

    def open_first():
        if sb.utils.distributed.is_local_rank_zero():
            cache = FeatureCache(folder, checksum, overwrite=overwrite)
            remove_stray_tmp(cache.folder, "feats/*/.*.tmp", recursive=False)
            opened["cache"] = cache

    gather_results(open_first)
    if "cache" in opened:
        return opened["cache"]
    return FeatureCache(folder, checksum)


def _to_half(uid, feats):
    """``feats`` as the float16 CPU tensor the cache stores (checked)."""
    half = feats.detach().to("cpu", torch.float16).contiguous()
    if not torch.isfinite(half).all():
        raise ValueError(
            f"features of {uid!r} are not finite in float16 (max |x| = "
            f"{feats.detach().abs().max().item():.4g}); float16 holds up "
            "to 65504"
        )
    return half
