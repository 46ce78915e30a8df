"""The install step leaves torchaudio usable beside a CPU-only torch."""

import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_torchaudio_fbank_and_resample_work():
    import torchaudio

    wav = torch.sin(torch.linspace(0, 2000, 16000)).unsqueeze(0)
    feats = torchaudio.compliance.kaldi.fbank(wav, num_mel_bins=80)
    assert feats.shape == (98, 80)
    assert torch.isfinite(feats).all()
    down = torchaudio.functional.resample(wav, 16000, 8000)
    assert down.shape == (1, 8000)
    mel = torchaudio.transforms.MelSpectrogram(16000, n_mels=40)(wav)
    assert mel.shape[1] == 40


def test_fix_torchaudio_is_idempotent():
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "fix_torchaudio.py")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "nothing to do" in out
    assert "fbank and resample work" in out


def test_speechbrain_imports_with_soundfile_io(tmp_path):
    import soundfile as sf
    from speechbrain.dataio.dataio import read_audio

    sf.write(tmp_path / "a.wav", torch.zeros(1600).numpy(), 16000)
    assert read_audio(str(tmp_path / "a.wav")).shape == (1600,)
