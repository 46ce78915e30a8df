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
    fires = cif_module.fire_positions(alphas).tolist()
    out = plotting.plot_cif_weights(
        alphas, fires, ["the", "cat", "sat"], tmp_path / "cif.png", title="u1"
    )
    assert out == tmp_path / "cif.png"
    assert _is_png(out)
    # explicit fire frames, more firings than tokens, list input
    out2 = plotting.plot_cif_weights(
        [0.5, 0.7, 0.9], [1, 2], ["a"], tmp_path / "sub" / "b.png"
    )
    assert _is_png(out2)
    assert not list(tmp_path.rglob(".*.tmp"))
    with pytest.raises(ValueError, match="empty"):
        plotting.plot_cif_weights([], [], [], tmp_path / "c.png")


def _capture_figures(monkeypatch):
    """Keep each figure plotting saves (then save it as usual)."""
    figures = []
    real_save = plotting._save_png

    def keep(fig, path):
        figures.append(fig)
        return real_save(fig, path)

    monkeypatch.setattr(plotting, "_save_png", keep)
    return figures


def _timing_lines(ax):
    return [
        line
        for line in ax.get_lines()
        if line.get_color() == plotting.TIMING_COLOR
    ]


def _legend_texts(fig):
    return [
        text.get_text()
        for ax in fig.axes
        if ax.get_legend() is not None
        for text in ax.get_legend().get_texts()
    ]


def test_plot_cif_weights_marks_token_timings(tmp_path, monkeypatch):
    figures = _capture_figures(monkeypatch)
    alphas = [0.3] * 20  # 0.4 s at 50 frames/s
    timings = torch.tensor([[0.02, 0.1], [0.1, 0.22], [0.22, 0.3]])
    fires = cif_module.fire_positions(torch.tensor(alphas)).tolist()
    out = plotting.plot_cif_weights(
        alphas,
        fires,
        ["a", "b", "c"],
        tmp_path / "timed.png",
        token_timings=timings,
    )
    assert _is_png(out)
    # without the argument (as before): no timing lines, no legend
    plotting.plot_cif_weights(
        alphas, fires, ["a", "b", "c"], tmp_path / "p.png"
    )
    timed, plain = figures
    lines = _timing_lines(timed.axes[0])
    assert [line.get_xdata()[0] for line in lines] == pytest.approx(
        [0.02, 0.1, 0.22]
    )
    assert [line.get_linestyle() for line in lines] == ["-"] * 3
    assert "Whisper timings (transcript)" in _legend_texts(timed)
    assert "CIF fired" in _legend_texts(timed)
    # the fired markers are still there, dashed and red, one per firing
    fired = [
        line
        for line in timed.axes[0].get_lines()
        if line.get_linestyle() == "--"
    ]
    assert len(fired) == 6  # sum(alpha) 6.0 at threshold 1
    assert not _timing_lines(plain.axes[0])
    assert _legend_texts(plain) == []
    # pairs work as well; an empty list draws nothing; bad items are refused
    plotting.plot_cif_weights(
        alphas, [3], ["a"], tmp_path / "q.png", token_timings=[(0.1, 0.2)]
    )
    assert len(_timing_lines(figures[-1].axes[0])) == 1
    plotting.plot_cif_weights(
        alphas, [3], ["a"], tmp_path / "r.png", token_timings=[]
    )
    assert not _timing_lines(figures[-1].axes[0])
    assert _legend_texts(figures[-1]) == []
    with pytest.raises(ValueError, match="item 1 is not a .start, end. pair"):
        plotting.plot_cif_weights(
            alphas, [3], ["a"], tmp_path / "s.png", token_timings=[(0, 1), 2]
        )


def test_mark_token_timings_labels_the_tokens(monkeypatch):
    fig = plotting._new_figure(4, 3)
    top, bottom = fig.subplots(2, 1)
    lines = plotting.mark_token_timings(
        [bottom, top],
        [(0.5, 1.0), (1.0, 1.5)],
        labels=["he", "llo"],
        label_ax=top,
    )
    assert len(lines) == 2 and all(line.axes is bottom for line in lines)
    assert len(_timing_lines(top)) == 2
    assert [t.get_text() for t in top.texts] == ["he", "llo"]
    assert [t.get_position()[0] for t in top.texts] == [0.5, 1.0]
    assert not bottom.texts
    # only the first line is in the legend
    assert bottom.get_legend_handles_labels()[1] == [plotting.TIMING_LABEL]


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
