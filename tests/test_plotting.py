"""Tests of speechbrain_blspkd.utils.plotting."""

import json

import pytest
import torch

from speechbrain_blspkd.nnet import cif as cif_module
from speechbrain_blspkd.utils import plotting

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

TRAIN_LOG = """\
epoch: 1, lr: 1.00e-03 - train loss: 2.50 - valid loss: 2.10, valid wer: 45.20
epoch: 2, lr: 5.00e-04 - train loss: 1.75 - valid loss: 1.60, valid wer: 30.10
epoch: 3, lr: 2.50e-04 - train loss: 1.20 - valid loss: 1.30, valid wer: 22.00
Epoch loaded: 3 - test loss: 1.35, test wer: 23.50
"""


def _is_png(path):
    data = path.read_bytes()
    return len(data) > 100 and data[:8] == PNG_SIGNATURE


def test_plot_cif_weights(tmp_path, monkeypatch):
    torch.manual_seed(0)
    alphas = torch.rand(120) * 0.2
    out = plotting.plot_cif_weights(
        alphas, None, ["the", "cat", "sat"], tmp_path / "cif.png", title="u1"
    )
    assert out == tmp_path / "cif.png"
    assert _is_png(out)
    # fire_frames=None draws the frames nnet.cif.fire_positions computes
    seen = []
    real_fire_positions = cif_module.fire_positions
    monkeypatch.setattr(
        cif_module,
        "fire_positions",
        lambda *a, **k: seen.append((a, k)) or real_fire_positions(*a, **k),
    )
    plotting.plot_cif_weights(
        [0.6, 0.6, 0.9], None, ["x", "y"], tmp_path / "t.png", threshold=0.5
    )
    assert seen and seen[0][0][1] == 0.5
    # explicit fire frames, more firings than tokens, list input
    out2 = plotting.plot_cif_weights(
        [0.5, 0.7, 0.9], [1, 2], ["a"], tmp_path / "sub" / "b.png"
    )
    assert _is_png(out2)
    assert not list(tmp_path.rglob(".*.tmp"))
    with pytest.raises(ValueError, match="empty"):
        plotting.plot_cif_weights([], None, [], tmp_path / "c.png")


def test_parse_train_log(tmp_path):
    path = tmp_path / "train_log.txt"
    path.write_text(TRAIN_LOG)
    records = plotting.parse_train_log(path)
    assert len(records) == 4
    assert records[0] == {
        "epoch": 1.0,
        "lr": 1e-3,
        "train loss": 2.5,
        "valid loss": 2.1,
        "valid wer": 45.2,
    }
    assert records[1]["lr"] == pytest.approx(5e-4)
    assert records[3] == {
        "Epoch loaded": 3.0,
        "test loss": 1.35,
        "test wer": 23.5,
    }
    assert plotting.parse_train_log(["no numbers here", ""]) == []


def test_plot_training_curves_from_log_and_jsonl(tmp_path):
    log = tmp_path / "train_log.txt"
    log.write_text(TRAIN_LOG)
    out = plotting.plot_training_curves(log, tmp_path / "curves.png")
    assert _is_png(out)

    jsonl = tmp_path / "steps.jsonl"
    jsonl.write_text(
        "".join(
            json.dumps({"step": s, "loss": 3.0 / s, "input_kl": 1.0 / s}) + "\n"
            for s in range(1, 80)
        )
    )
    records = plotting.load_stats(jsonl)
    assert len(records) == 79 and records[1]["loss"] == pytest.approx(1.5)
    out2 = plotting.plot_training_curves(jsonl, tmp_path / "steps.png")
    assert _is_png(out2)

    with pytest.raises(ValueError, match="no statistics"):
        plotting.plot_training_curves([], tmp_path / "x.png")
    with pytest.raises(ValueError, match="no metric"):
        plotting.plot_training_curves([{"epoch": 1}], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
