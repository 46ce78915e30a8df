#!/usr/bin/env python3
"""Token accuracy against training minutes for the variants of a plan.

Usage::

    python plot_equal_time.py timings.yaml [--out results/timings/equal_time.png]

For every variant of an ``ablate.py`` plan that has run, the validation
figures of each epoch of its first stage (the TensorBoard scalars
``valid_<stage>/token_acc_pred`` and ``valid_<stage>/token_acc``, with
their wall-clock times) are drawn against the minutes since the stage's
first logged step, one line per variant, and the final test figure of
``hearing.json`` (espeak unseen voices, predicted count) is marked at the
variant's last minute.  A Markdown table of the points is printed (and
written beside the figure), so the figure's numbers are in the text too.

The minutes are the run's own wall clock: compare variants only from one
run on one quiet machine (the plan says which CPU).
"""

import argparse
import json
import pathlib

import yaml

from speechbrain_blspkd.utils.atomic import atomic_write_text


def variant_curve(folder, stage="align"):
    """``[(minutes, token_acc_pred, token_acc)]`` of a run folder's
    validations, minutes counted from its first logged training step."""
    from tensorboard.backend.event_processing.event_accumulator import (
        EventAccumulator,
    )

    events = EventAccumulator(str(pathlib.Path(folder) / "tensorboard"))
    events.Reload()
    tags = events.Tags().get("scalars", [])
    steps = [t for t in tags if t.startswith("train_step/")]
    if not steps:
        return []
    start = min(e.wall_time for e in events.Scalars(steps[0]))
    pred_tag, true_tag = (
        f"valid_{stage}/token_acc_pred",
        f"valid_{stage}/token_acc",
    )
    if pred_tag not in tags:
        return []
    true = (
        {e.step: e.value for e in events.Scalars(true_tag)}
        if true_tag in tags
        else {}
    )
    return [
        ((e.wall_time - start) / 60.0, e.value, true.get(e.step))
        for e in events.Scalars(pred_tag)
    ]


def final_test(folder):
    """(espeak, piper) nearest-token accuracy at the predicted count of a
    variant's ``hearing.json`` (None where missing)."""
    path = pathlib.Path(folder) / "hearing" / "hearing.json"
    if not path.is_file():
        return None, None
    sets = json.loads(path.read_text())["sets"]

    def acc(key):
        speech = sets.get(key, {}).get("systems", {}).get("speech", {})
        return (speech.get("token_accuracy_predicted_count") or {}).get(
            "accuracy"
        )

    return acc("espeak_unseen_voices"), acc("piper_unseen_engine")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plan")
    parser.add_argument("--out", default=None)
    parser.add_argument("--stage", default="align")
    args = parser.parse_args(argv)
    plan_path = pathlib.Path(args.plan)
    plan = yaml.safe_load(plan_path.read_text())
    root = (plan_path.parent / plan["output_folder"]).resolve()
    out = pathlib.Path(args.out or root / "equal_time.png")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines = [
        "| variant | minutes | valid acc. (pred. N) | valid acc. (true N) |",
        "|---|---|---|---|",
    ]
    finals = [
        "",
        "| variant | minutes | test espeak (pred. N) | test piper (pred. N) |",
        "|---|---|---|---|",
    ]
    for name in plan["variants"]:
        folder = root / name
        curve = variant_curve(folder, args.stage) if folder.is_dir() else []
        if not curve:
            continue
        minutes = [m for m, _, _ in curve]
        ax.plot(minutes, [100 * p for _, p, _ in curve], marker="o", label=name)
        for m, p, t in curve:
            true = "-" if t is None else f"{100 * t:.1f}"
            lines.append(f"| {name} | {m:.1f} | {100 * p:.1f} | {true} |")
        espeak, piper = final_test(folder)
        if espeak is not None:
            ax.scatter(
                [minutes[-1]],
                [100 * espeak],
                marker="*",
                s=120,
                color=ax.lines[-1].get_color(),
            )
            finals.append(
                f"| {name} | {minutes[-1]:.1f} | {100 * espeak:.1f} | "
                + ("-" if piper is None else f"{100 * piper:.1f}")
                + " |"
            )
    ax.set_xlabel("minutes of training (this run's wall clock)")
    ax.set_ylabel("nearest-token accuracy at the predicted count (%)")
    ax.set_title("validation per epoch (o); unseen-voice test at the end (*)")
    ax.grid(alpha=0.3)
    ax.legend()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    table = "\n".join(lines + finals) + "\n"
    atomic_write_text(out.with_suffix(".md"), table)
    print(table)
    print(f"figure: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
