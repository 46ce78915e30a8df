"""Tests of the encoder feature cache."""

import hashlib
import json

import numpy as np
import pytest
import soundfile as sf
import torch

from speechbrain_blspkd.dataio.manifest import write_manifest
from speechbrain_blspkd.dataprep.feature_cache import (
    FeatureCache,
    StaleCacheError,
    build_feature_cache,
    encoder_checksum,
)


def _toy_encoder(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Conv1d(1, 4, kernel_size=160, stride=160)


def _encode_with(encoder):
    def fn(wavs):
        return [encoder(w[None, None])[0].T for w in wavs]

    return fn


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for k in range(7):
        n = 1600 * (k + 1)
        sf.write(
            tmp_path / f"u{k}.wav",
            rng.uniform(-0.5, 0.5, n).astype("float32"),
            16000,
        )
        rows.append(
            dict(
                ID=f"u{k}",
                wav=f"$data_root/u{k}.wav",
                duration=n / 16000,
                transcript="text",
                language="en",
                speaker="s",
            )
        )
    write_manifest(tmp_path / "m.csv", rows)
    return tmp_path


def test_checksum_tracks_weights_and_config():
    enc = _toy_encoder()
    a = encoder_checksum(enc)
    assert a == encoder_checksum(_toy_encoder())  # same weights, same hash
    assert a != encoder_checksum(_toy_encoder(seed=1))
    assert a != encoder_checksum(enc, extra={"pad_to_30s": False})


def _checksum_as_written_before(module, extra=None):
    """``encoder_checksum`` as it was before its tensor bytes came from
    ``utils.cache_label.tensor_bytes``: cache folders are labelled by it."""
    h = hashlib.sha256()
    h.update(type(module).__qualname__.encode())
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    if extra is not None:
        h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def test_checksum_of_existing_caches_is_unchanged():
    enc = _toy_encoder()
    enc.register_buffer("empty", torch.zeros(0))
    enc.register_buffer("bf16", torch.linspace(-1, 1, 3).bfloat16())
    enc.register_buffer("t_view", torch.arange(12).reshape(4, 3).t())
    extra = {"pad_to_30s": True}
    assert encoder_checksum(enc, extra) == _checksum_as_written_before(
        enc, extra
    )
    fixed = torch.nn.Linear(2, 1)
    with torch.no_grad():
        fixed.weight.copy_(torch.tensor([[0.25, -2.0]]))
        fixed.bias.fill_(1.0)
    assert encoder_checksum(fixed) == (
        "70838b2bfd4b2c8a5340396cd678b9033a36743233a0acb107dd11eba4afd627"
    )


def test_round_trip_fp16(tmp_path):
    cache = FeatureCache(tmp_path / "c", "sum1")
    feats = torch.randn(13, 8) * 3
    cache.put("spk/utt 1", feats)  # unsafe characters in the ID
    back = cache.get("spk/utt 1")
    assert back.shape == feats.shape and back.dtype == torch.float32
    torch.testing.assert_close(back, feats, atol=3e-3, rtol=1e-3)
    assert cache.get("other") is None
    assert len(cache) == 1
    with pytest.raises(ValueError, match="float16"):
        cache.put("big", torch.full((2,), 1e6))


def test_stale_cache_is_refused(tmp_path):
    cache = FeatureCache(tmp_path / "c", "sum1")
    cache.put("u", torch.ones(2, 2))
    with pytest.raises(StaleCacheError, match="sum1"):
        FeatureCache(tmp_path / "c", "sum2")
    # features kept after the refusal
    assert FeatureCache(tmp_path / "c", "sum1").get("u") is not None
    fresh = FeatureCache(tmp_path / "c", "sum2", overwrite=True)
    assert fresh.get("u") is None and len(fresh) == 0
    with pytest.raises(StaleCacheError):
        FeatureCache(tmp_path / "c", "sum1")


def test_unlabelled_folder_is_refused(tmp_path):
    cache = FeatureCache(tmp_path / "c", "sum1")
    cache.put("u", torch.ones(2, 2))
    (tmp_path / "c" / "meta.json").unlink()
    with pytest.raises(StaleCacheError, match="meta.json"):
        FeatureCache(tmp_path / "c", "sum1")


def test_build_and_resume(corpus):
    enc = _toy_encoder()
    fn = _encode_with(enc)
    checksum = encoder_checksum(enc)
    calls = []

    def failing(wavs):
        calls.append(len(wavs))
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed during the second batch
        return fn(wavs)

    with pytest.raises(KeyboardInterrupt):
        build_feature_cache(
            corpus / "m.csv", corpus / "c", failing, checksum, batch_size=3
        )
    assert len(FeatureCache(corpus / "c", checksum)) == 3
    stats = build_feature_cache(
        corpus / "m.csv", corpus / "c", fn, checksum, batch_size=3
    )
    assert stats["computed"] == 4 and stats["skipped"] == 3
    cache = stats["cache"]
    assert len(cache) == 7
    with torch.no_grad():
        for k in range(7):
            wav = torch.from_numpy(
                sf.read(corpus / f"u{k}.wav", dtype="float32")[0]
            )
            ref = fn([wav])[0]
            torch.testing.assert_close(
                cache.get(f"u{k}"), ref, atol=3e-3, rtol=2e-3
            )
    with pytest.raises(StaleCacheError):
        build_feature_cache(
            corpus / "m.csv", corpus / "c", fn, "another", batch_size=3
        )
