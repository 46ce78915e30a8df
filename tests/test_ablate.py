"""The ablation driver of the SynthSpeech recipe (ablate.py)."""

import json
import pathlib

import pytest

from speechbrain_blspkd.testing import load_script

RECIPE = (
    pathlib.Path(__file__).resolve().parents[1]
    / "recipes"
    / "SynthSpeech"
    / "speech_llm"
)


def _module():
    return load_script("SynthSpeech/speech_llm/ablate.py")


@pytest.mark.parametrize(
    "plan_file",
    ["ablations.yaml", "scaling.yaml", "levers.yaml", "timings.yaml"],
)
def test_shipped_plan_names_real_overrides(plan_file):
    ablate = _module()
    plan = ablate.load_plan(RECIPE / plan_file)
    keys = {
        line.split(":")[0]
        for line in (RECIPE / plan["hparams"]).read_text().splitlines()
        if line and not line[0].isspace() and ":" in line
    }
    for name, args in plan["variants"].items():
        flags = [
            a[2:] for a in plan["common"] + args if str(a).startswith("--")
        ]
        assert flags, name
        assert set(flags) <= keys, (name, sorted(set(flags) - keys))


def test_table_from_finished_variants_and_resume(tmp_path, capsys):
    ablate = _module()
    out = tmp_path / "abl"
    plan = {
        "hparams": "hparams/blsp_kd.yaml",
        "synth_folder": "d",
        "output_folder": str(out),
        "common": [],
        "variants": {"done": [], "todo": ["--length_pool_batches", "8"]},
    }
    figures = {
        "count": {"exact_rate": 0.25},
        "token_accuracy_true_count": {"accuracy": 0.5},
        "token_accuracy_predicted_count": {"accuracy": 0.375},
    }
    report = {
        "sets": {name: {"systems": {"speech": figures}} for name in ablate.SETS}
    }
    (out / "done" / "hearing").mkdir(parents=True)
    (out / "done" / "hearing" / "hearing.json").write_text(json.dumps(report))
    steps = [{"stage": "align", "step": s, "time": 3.0 * s} for s in (5, 10)]
    (out / "done" / "train_steps.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in steps)
    )
    rows = ablate.collect(plan)
    assert [r["variant"] for r in rows] == ["done"]
    assert rows[0]["steps"] == 10 and rows[0]["s_per_step"] == 3.0
    line = ablate.format_table(rows).splitlines()[-1]
    assert (
        line == "| done | 10 | 3.0 | 50.0 | 37.5 | 25.0 | 50.0 | 37.5 | 25.0 |"
    )
    # a step log without wall-clock times: no seconds per step
    (out / "done" / "train_steps.jsonl").write_text(
        "".join(
            json.dumps({"stage": "align", "step": s}) + "\n" for s in (5, 10)
        )
    )
    line = ablate.format_table(ablate.collect(plan)).splitlines()[-1]
    assert line.startswith("| done | 10 | - | 50.0 |")
    # a finished variant is not run again; the other would be
    ablate.run(plan, ["done", "todo"], dry_run=True)
    printed = capsys.readouterr().out
    assert "done: done before" in printed
    assert "--length_pool_batches 8" in printed and "--tokens-only" in printed


def test_bad_plan_is_refused(tmp_path):
    ablate = _module()
    path = tmp_path / "p.yaml"
    path.write_text(
        "hparams: h\nsynth_folder: d\noutput_folder: o\nvariants: {}\n"
    )
    with pytest.raises(ValueError, match="variants` is empty"):
        ablate.load_plan(path)
    path.write_text(
        "hparams: h\nsynth_folder: d\noutput_folder: o\nvariants: {a-b: []}\n"
    )
    with pytest.raises(ValueError, match="not an identifier"):
        ablate.load_plan(path)


def test_scaling_curve_points_train_equal_steps():
    plan = _module().load_plan(RECIPE / "scaling.yaml")

    def clips_seen(name):
        args = plan["common"] + plan["variants"][name]
        value = {a[2:]: b for a, b in zip(args, args[1:]) if a.startswith("--")}
        return int(value["align_max_utterances"]) * int(
            value["align_epochs_limit"]
        )

    curve = [n for n in plan["variants"] if n in ("n1200", "n2400", "n4800")]
    assert len(curve) == 3
    assert len({clips_seen(n) for n in curve}) == 1
    # the step-bound check doubles the steps at the largest size
    assert clips_seen("n4800_e2") == 2 * clips_seen("n4800")


def test_lever_rows_change_one_setting_and_see_the_same_clips():
    plan = _module().load_plan(RECIPE / "levers.yaml")
    common = dict(zip(plan["common"][::2], plan["common"][1::2]))

    def flags(name):
        args = plan["variants"][name]
        assert all(a.startswith("--") for a in args[::2]), name
        return dict(zip(args[::2], args[1::2]))

    base = flags("base")
    singles, combined = {}, {}
    for name in plan["variants"]:
        row = flags(name)
        # none re-sets what the shared overrides already set
        assert not set(row) & set(common), name
        changed = {k: v for k, v in row.items() if base.get(k) != v}
        changed.update({k: None for k in base if k not in row})
        if name == "base":
            assert not changed
            continue
        assert None not in changed.values(), name
        (singles if len(changed) == 1 else combined)[name] = changed
    assert len(singles) >= 4
    # a combination row only combines settings measured alone
    measured = {item for row in singles.values() for item in row.items()}
    for name, changed in combined.items():
        assert set(changed.items()) <= measured, name
    # every row sees the same clips: epochs x the whole corpus
    assert common["--align_epochs_limit"] == "2"
    assert "--align_max_utterances" not in common


@pytest.mark.parametrize("name", ["timings.yaml", "cross.yaml"])
def test_timing_plan_gives_every_variant_the_same_minutes(name):
    """timings.yaml and cross.yaml compare at equal wall time: each
    variant's steps (epochs x utterances / batch) times its pilot seconds
    per step agree within 2 %, and every variant reads the token timings."""
    plan = _module().load_plan(RECIPE / name)

    def value(args, flag, default=None):
        args = [str(a) for a in args]
        return args[args.index(flag) + 1] if flag in args else default

    epochs = int(value(plan["common"], "--align_epochs_limit"))
    assert value(plan["common"], "--token_timings_folder")
    budgets = {}
    for name, args in plan["variants"].items():
        clips = int(value(args, "--align_max_utterances"))
        steps = epochs * clips / 32
        budgets[name] = steps * plan["pilot_seconds_per_step"][name]
    low, high = min(budgets.values()), max(budgets.values())
    assert high / low < 1.02, budgets
