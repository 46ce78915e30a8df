"""The benchmark suite's plumbing (not its speed: no timing is asserted)."""

import json
import math

import pytest
import torch

from benchmarks import budget, common, generate
from benchmarks import run as suite


def test_selected_adds_what_a_section_needs_in_suite_order():
    assert suite.selected("budget") == [
        "hardware",
        "train_step",
        "generate",
        "encoder",
        "budget",
    ]
    assert suite.selected("cif") == ["cif"]
    assert suite.selected(None) == list(suite.SECTIONS)
    with pytest.raises(SystemExit, match="unknown section"):
        suite.selected("cif,warp_drive")


def test_count_flops_counts_forward_and_backward_matmuls():
    w = torch.ones(8, 2, requires_grad=True)
    x = torch.ones(4, 8)
    # forward 2*4*8*2; backward: grad of w only (x needs none) -> same again
    assert common.count_flops(lambda: (x @ w).sum().backward()) == 256


def test_parameter_count_counts_shared_weights_once():
    a = torch.nn.Linear(3, 2)  # 8 parameters
    b = torch.nn.Sequential(a, torch.nn.Linear(2, 1))  # a + 3
    assert common.parameter_count(a) == 8
    assert common.parameter_count(a, b) == 11
    tied = torch.nn.Linear(3, 2)
    tied.weight = a.weight  # shares 6 of its 8
    assert common.parameter_count(a, tied) == 10


def test_linear_weights_are_the_distinct_linear_matrices(monkeypatch):
    embed = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    # a tied output layer: listed as the head's; the embedding is no product
    head.weight = embed.weight
    net = torch.nn.ModuleDict(
        {"embed": embed, "mlp": torch.nn.Linear(4, 6), "head": head}
    )
    shapes = sorted(tuple(w.shape) for w in generate.linear_weights(net))
    assert shapes == [(6, 4), (10, 4)]
    # the floor runs one product per weight, with the batch's rows
    seen = []
    real = torch.nn.functional.linear

    def spy(x, w, *rest):
        seen.append((tuple(x.shape), tuple(w.shape)))
        return real(x, w, *rest)

    monkeypatch.setattr(generate.F, "linear", spy)
    generate.matmul_floor(generate.linear_weights(net), 3, rounds=1)
    # one warm-up pass and one timed pass
    assert seen == [((3, 4), (6, 4)), ((3, 4), (10, 4))] * 2


def test_compare_alternates_and_keeps_every_round():
    calls = []
    timing = common.compare(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
        rounds=3,
        warmup=1,
    )
    assert calls == ["a", "b"] + ["a", "b"] * 3
    assert len(timing["a"].seconds) == 3
    assert timing["a"].best == min(timing["a"].seconds)


def test_recipe_counts_reads_the_demo_yaml_plain_values():
    y = budget.recipe_counts()
    assert isinstance(y["num_train"], int) and y["num_train"] > 0
    assert y["align_batch_size"] > 0
    assert y["encoder"] is None  # a tagged node is not built


def test_budget_prices_each_stage_from_the_figures(monkeypatch):
    monkeypatch.setattr(budget, "synthesis_seconds_per_clip", lambda: 0.5)
    y = budget.recipe_counts()
    figures = {
        "generate": {"tokens_per_s": 100.0},
        "train_step": {"align.seconds": 2.0, "kd.seconds": 10.0},
        "encoder": {"cache.encode_seconds": 4.0, "cache.batch": 8},
    }
    out = budget.run(None, figures)
    align_steps = math.ceil(y["num_train"] / y["align_batch_size"])
    assert out["align.steps"] == y["align_epochs_limit"] * align_steps
    assert out["align.seconds"] == pytest.approx(out["align.steps"] * 2.0)
    assert out["kd.seconds"] == pytest.approx(out["kd.steps"] * 10.0)
    clips = y["num_train"] + y["num_valid"] + y["num_test"]
    assert out["feature_cache.seconds"] == pytest.approx(clips * 0.5)
    assert out["synthesis.seconds"] == pytest.approx(clips * 0.5 / 2)
    stages = [k for k in out if k.endswith(".seconds") and k != "total.seconds"]
    assert out["total.seconds"] == pytest.approx(sum(out[k] for k in stages))
    assert out["fits"] == (out["total.minutes"] <= 30)


def test_run_writes_json_and_results_section(tmp_path):
    out = tmp_path / "bench.json"
    md = tmp_path / "RESULTS.md"
    figures = suite.main(
        ["--quick", "--only", "cif", "--json", str(out), "--results", str(md)]
    )
    data = json.loads(out.read_text())
    assert data["machine"]["cpu"] == common.cpu_model()
    assert data["command"].startswith("python -m benchmarks.run --quick")
    assert data["cif"]["speedup_fwd_bwd"] == figures["cif"]["speedup_fwd_bwd"]
    assert data["cif"]["max_abs_diff"] < 1e-3
    assert set(data) == {"machine", "command", "cif"}
    text = md.read_text()
    assert "| cif | speedup_fwd_bwd |" in text
    assert common.cpu_model() in text


def test_demo_adapter_is_the_shipped_yaml_adapter():
    plain = budget.recipe_counts()
    adapter = common.demo_adapter()
    built = adapter.export_hparams()
    assert built["n_post"] == plain["cformer_layers_post"]
    assert built["n_pre"] == plain["cformer_layers_pre"]
    assert built["cross_window"] == plain["cformer_cross_window"]
    assert built["weight_predictor"] == plain["weight_predictor"]
    assert built["frame_stride"] == plain["frame_stride"]
    assert common.demo_adapter(frame_stride=1).frame_stride == 1


def test_recipe_arguments_refuses_a_ref_it_cannot_resolve(tmp_path):
    path = tmp_path / "h.yaml"
    path.write_text(
        "size: 4\n"
        "thing: !new:torch.nn.Linear\n"
        "    in_features: !ref <size>\n"
        "    out_features: !ref <missing>\n"
    )
    with pytest.raises(KeyError, match="thing.out_features"):
        budget.recipe_arguments("thing", path)
    path.write_text(
        "size: 4\nthing: !new:torch.nn.Linear\n    in_features: !ref <size>\n"
    )
    assert budget.recipe_arguments("thing", path) == {"in_features": 4}
