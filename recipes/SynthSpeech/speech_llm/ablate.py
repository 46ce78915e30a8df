#!/usr/bin/env python3
"""Run a table of recipe variants and measure what each one hears.

Usage::

    python ablate.py ablations.yaml [--only NAME,NAME] [--dry-run]

``ablations.yaml`` (plain YAML) names the recipe, the corpus the test sets
come from, the overrides every variant shares and, per variant, its own
overrides::

    hparams: hparams/blsp_kd.yaml
    synth_folder: results/synthspeech        # hearing test sets (+ corpus)
    output_folder: results/ablations
    common: [--kd_epochs_limit, "0"]
    variants:
        base: []
        pooled: [--length_pool_batches, "8"]

Each variant trains with ``python train.py HPARAMS --output_folder
OUT/NAME ... COMMON VARIANT`` (its log in ``OUT/NAME.train.log``), then
``python -m speechbrain_blspkd.hearing --tokens-only`` measures its exported
model on the unseen-voice espeak test and the unseen-engine piper test
(``OUT/NAME/hearing``).  A variant whose ``hearing.json`` exists is not run
again, so a stopped table resumes with the next variant; a failed variant
is reported and the others still run.  The table (``OUT/ablations.md`` and
``.json``) lists per variant: optimiser steps, seconds per step (median of
the step log's wall clock; only comparable within one quiet machine),
nearest-token accuracy at the true and at the predicted count and the
exact-count rate on both test sets.

The variants' step counts are the recipe's (epochs x batches): a fair
table keeps them equal (``align_epochs_limit`` x ``align_max_utterances``
/ batch size).
"""

import argparse
import json
import pathlib
import shlex
import statistics
import subprocess
import sys
import time

import yaml

from speechbrain_blspkd.utils.atomic import atomic_write_text

HERE = pathlib.Path(__file__).resolve().parent
SETS = ("espeak_unseen_voices", "piper_unseen_engine")


def load_plan(path):
    """The ablation plan, checked.

    Example
    -------
    >>> import tempfile
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.yaml"
    >>> _ = p.write_text("hparams: h.yaml\\nsynth_folder: d\\n"
    ...     "output_folder: o\\nvariants: {base: []}\\n")
    >>> load_plan(p)["common"], list(load_plan(p)["variants"])
    ([], ['base'])
    """
    path = pathlib.Path(path)
    plan = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    for key in ("hparams", "synth_folder", "output_folder", "variants"):
        if key not in plan:
            raise ValueError(f"{path}: missing `{key}`")
    if not plan["variants"]:
        raise ValueError(f"{path}: `variants` is empty")
    plan.setdefault("common", [])
    for name, args in plan["variants"].items():
        if not str(name).isidentifier():
            raise ValueError(
                f"{path}: variant name {name!r} is not an identifier"
            )
        if not isinstance(args, list):
            raise ValueError(
                f"{path}: variant {name}: overrides must be a list"
            )
    return plan


def commands(plan, name, python=sys.executable):
    """The training and the measuring command of one variant.

    Example
    -------
    >>> plan = {"hparams": "h.yaml", "synth_folder": "d", "output_folder":
    ...     "o", "common": ["--x", "1"], "variants": {"v": ["--y", "2"]}}
    >>> train, hear = commands(plan, "v", python="py")
    >>> " ".join(train[1:6]), train[-2:]
    ('train.py h.yaml --output_folder o/v --export_folder', ['--y', '2'])
    >>> hear[-1]
    '--tokens-only'
    """
    out = pathlib.Path(plan["output_folder"]) / name
    train = [
        python,
        "train.py",
        str(plan["hparams"]),
        "--output_folder",
        str(out),
        "--export_folder",
        str(out / "model"),
        *map(str, plan["common"]),
        *map(str, plan["variants"][name]),
    ]
    hear = [
        python,
        "-m",
        "speechbrain_blspkd.hearing",
        "--model",
        str(out / "model"),
        "--synth-folder",
        str(plan["synth_folder"]),
        "--out",
        str(out / "hearing"),
        "--tokens-only",
    ]
    return train, hear


def step_stats(step_log):
    """(optimiser steps, median seconds per step) of a step log.

    Example
    -------
    >>> import tempfile
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "s.jsonl"
    >>> rows = [{"stage": "align", "step": s, "time": 2.0 * s}
    ...     for s in (5, 10, 15)]
    >>> _ = p.write_text("".join(json.dumps(r) + "\\n" for r in rows))
    >>> step_stats(p)
    (15, 2.0)
    """
    path = pathlib.Path(step_log)
    if not path.is_file():
        return None, None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line]
    if not rows:
        return None, None
    per_step = [
        (b["time"] - a["time"]) / (b["step"] - a["step"])
        for a, b in zip(rows, rows[1:])
        if "time" in a
        and "time" in b
        and a.get("stage") == b.get("stage")
        and b["step"] > a["step"]
    ]
    steps = max(r["step"] for r in rows)
    return steps, (round(statistics.median(per_step), 2) if per_step else None)


def collect(plan):
    """One row of figures per variant that has a ``hearing.json``."""
    rows = []
    for name in plan["variants"]:
        out = pathlib.Path(plan["output_folder"]) / name
        report = out / "hearing" / "hearing.json"
        if not report.is_file():
            continue
        sets = json.loads(report.read_text())["sets"]
        steps, seconds = step_stats(out / "train_steps.jsonl")
        row = {"variant": name, "steps": steps, "s_per_step": seconds}
        for key in SETS:
            speech = sets.get(key, {}).get("systems", {}).get("speech", {})
            true = speech.get("token_accuracy_true_count") or {}
            pred = speech.get("token_accuracy_predicted_count") or {}
            row[key] = {
                "acc_true": true.get("accuracy"),
                "acc_pred": pred.get("accuracy"),
                "exact": (speech.get("count") or {}).get("exact_rate"),
            }
        rows.append(row)
    return rows


def format_table(rows):
    """Markdown table of :func:`collect`'s rows.

    Example
    -------
    >>> figs = {"acc_true": 0.5, "acc_pred": 0.25, "exact": 0.3}
    >>> row = {"variant": "v", "steps": 10, "s_per_step": 1.5,
    ...     "espeak_unseen_voices": figs, "piper_unseen_engine": figs}
    >>> print(format_table([row]).splitlines()[-1])
    | v | 10 | 1.5 | 50.0 | 25.0 | 30.0 | 50.0 | 25.0 | 30.0 |
    """

    def pct(value):
        return "-" if value is None else f"{100 * value:.1f}"

    lines = [
        "| variant | steps | s/step | espeak acc. (true N) | espeak acc. "
        "(pred. N) | espeak exact N | piper acc. (true N) | piper acc. "
        "(pred. N) | piper exact N |",
        "|" + "---|" * 9,
    ]
    for row in rows:
        cells = [row["variant"]]
        cells += [
            "-" if row[k] is None else str(row[k])
            for k in ("steps", "s_per_step")
        ]
        for key in SETS:
            figs = row[key]
            cells += [pct(figs["acc_true"]), pct(figs["acc_pred"])]
            cells.append(pct(figs["exact"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run(plan, names, dry_run=False):
    """Train and measure the variants ``names``; return the failed ones."""
    failed = []
    for name in names:
        out = pathlib.Path(plan["output_folder"]) / name
        if (out / "hearing" / "hearing.json").is_file():
            print(f"{name}: done before")
            continue
        train, hear = commands(plan, name)
        if dry_run:
            print(shlex.join(train))
            print(shlex.join(hear))
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        start = time.time()
        for label, cmd in (("train", train), ("hearing", hear)):
            log = out.parent / f"{name}.{label}.log"
            with open(log, "w", encoding="utf-8") as fout:
                done = subprocess.run(
                    cmd, cwd=HERE, stdout=fout, stderr=subprocess.STDOUT
                )
            if done.returncode != 0:
                print(
                    f"{name}: {label} failed (exit {done.returncode}); see {log}"
                )
                failed.append(name)
                break
        else:
            print(f"{name}: done in {time.time() - start:.0f} s")
    return failed


def main(argv=None):
    """Run the plan, then write and print the table; exit status 1 when a
    variant failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("plan", help="ablations YAML")
    parser.add_argument("--only", default=None, help="comma-separated names")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    plan = load_plan(args.plan)
    names = list(plan["variants"])
    if args.only:
        names = [n for n in args.only.split(",") if n]
        unknown = sorted(set(names) - set(plan["variants"]))
        if unknown:
            parser.error(f"unknown variants {unknown}")
    failed = run(plan, names, dry_run=args.dry_run)
    if args.dry_run:
        return 0
    rows = collect(plan)
    out = pathlib.Path(plan["output_folder"])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "ablations.json", json.dumps(rows, indent=1))
    atomic_write_text(out / "ablations.md", format_table(rows))
    print(format_table(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
