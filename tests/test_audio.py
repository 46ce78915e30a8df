"""Audio loading: the same checks for every entry point."""

import logging

import numpy as np
import pytest
import soundfile as sf
import torch

from speechbrain_blspkd.dataio.audio import AudioError, load_audio


def test_missing_and_corrupt_and_empty(tmp_path):
    with pytest.raises(AudioError, match="nope.wav: audio file not found"):
        load_audio(tmp_path / "nope.wav")
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x00\x00garbage" * 10)
    with pytest.raises(AudioError, match="bad.wav: cannot read audio"):
        load_audio(bad)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, dtype="float32"), 16000)
    with pytest.raises(AudioError, match="empty.wav: zero-length audio"):
        load_audio(empty)


def test_stereo_is_downmixed_and_rate_resampled(tmp_path, caplog):
    path = tmp_path / "st.wav"
    left = 0.3 * np.sin(np.linspace(0, 100, 22050)).astype("float32")
    sf.write(path, np.stack([left, -left], axis=1) + 0.2, 22050)
    with caplog.at_level(logging.WARNING):
        wav = load_audio(path)
    assert wav.dtype == torch.float32
    assert wav.shape == (16000,)
    mid = wav[100:-100]  # resampler edge effects aside
    assert torch.allclose(mid, torch.full_like(mid, 0.2), atol=1e-2)
    assert "resampling from 22050 Hz to 16000 Hz" in caplog.text


def test_too_long_is_refused(tmp_path):
    path = tmp_path / "long.wav"
    sf.write(path, np.zeros(16000 * 3, dtype="float32"), 16000)
    wav = load_audio(path, max_seconds=3)
    assert wav.shape == (48000,)
    with pytest.raises(AudioError, match="longer than the 2 s"):
        load_audio(path, max_seconds=2)
