"""The benchmark suite: one command, one table, figures under stable keys.

Usage::

    python -m benchmarks.run [--quick] [--json OUT] [--results FILE]
        [--only hardware,train_step,...] [--device cpu|cuda] [--dtype auto]

Sections, in order (each a module of this package):

``hardware``     matmul GFLOP/s in fp32 and bf16, the peak (denominator), copy GB/s
``train_step``   BLSP-KD / alignment / offline-teacher / CE step: seconds,
                 tokens/s, executed GFLOP/s, MFU (``--profile``: where the
                 KD step's time goes; ``--ablations``: prefix reuse, sparse
                 PLoRA, frame stride against their plain versions)
``generate``     greedy new tokens/s at batch 1, 8, 32 and utilisation
``encoder``      feature cache vs on the fly; dynamic length vs 30-s padding
``cif``          vectorised CIF vs a per-frame loop
``latency``      speech LLM vs cascade vs text LLM per utterance, TTFT, RTF
``memory``       peak memory of demo training and of inference
``scaling``      KD step vs clip length and batch; 2-process DDP speed-up
``budget``       the demo's stage-by-stage time from the figures above
``serve``        blspkd-serve at 1, 8, 32 clients: batched vs one by one vs
                 blspkd-infer --batch-size 8 (requests/s, p50/p95 latency;
                 ``--serve_tiny``: a tiny random model, a smoke run)

``--json`` writes ``{"machine": ..., "command": ..., "<section>": {...}}``
with keys such as ``train_step.mfu``, ``generate.tokens_per_s`` and
``latency.speech_llm_over_cascade`` (section, dot, figure). ``--results``
appends the table, the command, the date and the machine to a Markdown file
(``benchmarks/RESULTS.md``). Every ratio is of figures timed in this run.
``--quick`` shrinks sizes and rounds (a smoke run: its figures are noisier).
The real assets (Whisper-base, SmolLM2-135M-Instruct) are fetched and
converted on first use.
"""

import argparse
import datetime
import json
import pathlib
import shlex
import sys
import time

import torch

from benchmarks.common import machine

SECTIONS = (
    "hardware",
    "train_step",
    "generate",
    "encoder",
    "cif",
    "latency",
    "memory",
    "scaling",
    "budget",
    "serve",
)
# what a section needs from earlier ones (run first when asked for)
NEEDS = {
    "train_step": ("hardware",),
    "generate": ("hardware",),
    "budget": ("hardware", "train_step", "generate", "encoder"),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None, help="write figures here")
    parser.add_argument(
        "--results", default=None, help="append a Markdown section here"
    )
    parser.add_argument(
        "--only", default=None, help="comma-separated sections (and needs)"
    )
    parser.add_argument("--device", default=None, help="default: inferred")
    parser.add_argument(
        "--dtype",
        default="auto",
        help="auto (the project's choice for the device), float32, bfloat16",
    )
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--ablations",
        action="store_true",
        help="train_step: also time prefix reuse, sparse PLoRA and "
        "frame_stride against their plain versions",
    )
    parser.add_argument("--kd_batch", type=int, default=8)
    parser.add_argument("--align_batch", type=int, default=32)
    parser.add_argument("--clip_seconds", type=float, default=4.0)
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=None)
    parser.add_argument("--answer_tokens", type=int, default=None)
    parser.add_argument(
        "--serve_model",
        default=None,
        help="serve: exported model folder (default results/demo/model)",
    )
    parser.add_argument(
        "--serve_tiny",
        action="store_true",
        help="serve: a tiny random model instead (smoke run)",
    )
    parser.add_argument(
        "--serve_max_batch",
        type=int,
        default=8,
        help="serve: --max-batch of the batched server",
    )
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.rounds is None:
        args.rounds = 2 if args.quick else 4
    if args.new_tokens is None:
        args.new_tokens = 8 if args.quick else 32
    if args.answer_tokens is None:
        args.answer_tokens = 8 if args.quick else 32
    args.gen_batches = (1, 8) if args.quick else (1, 8, 32)
    if args.quick:
        args.kd_batch = min(args.kd_batch, 4)
        args.align_batch = min(args.align_batch, 8)
    return args


def selected(only):
    """The sections to run, in suite order, with what they need."""
    if not only:
        return list(SECTIONS)
    wanted = [s.strip() for s in only.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"unknown section(s) {unknown}; known: {SECTIONS}")
    for name in list(wanted):
        wanted.extend(NEEDS.get(name, ()))
    return [s for s in SECTIONS if s in wanted]


def run_section(name, args, figures):
    """One section's figures (a flat dict)."""
    import importlib

    module = importlib.import_module(f"benchmarks.{name}")
    peak = figures.get("hardware", {}).get("peak_gflops")
    if name == "generate":
        return module.run(
            args, peak, figures.get("hardware", {}).get("memory_gbps")
        )
    if name == "train_step":
        return module.run(args, peak)
    if name == "budget":
        return module.run(args, figures)
    return module.run(args)


def _fmt(value):
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def table(figures):
    """The figures as one Markdown table (section, figure, value)."""
    lines = ["| section | figure | value |", "|---|---|---|"]
    for section, values in figures.items():
        for key, value in values.items():
            lines.append(f"| {section} | {key} | {_fmt(value)} |")
    return "\n".join(lines)


def main(argv=None):
    """Run the suite (see the module docstring)."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from speechbrain_blspkd.utils.precision import choose, resolve_dtype

    args.dtype = resolve_dtype(args.dtype, torch.device(args.device))
    info = machine()
    info["device"] = str(args.device)
    info["dtype"] = str(args.dtype).split(".")[-1]
    info["auto_choice"] = str(choose(torch.device(args.device).type))
    command = "python -m benchmarks.run " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    print(f"# {command}")
    print("# " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    figures = {}
    for name in selected(args.only):
        start = time.perf_counter()
        figures[name] = run_section(name, args, figures)
        figures[name]["section_seconds"] = time.perf_counter() - start
        for key, value in figures[name].items():
            print(f"{name}.{key} = {_fmt(value)}", flush=True)
    print()
    print(table(figures))
    if args.json:
        path = pathlib.Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"machine": info, "command": command, **figures}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(payload, indent=1, default=str))
        tmp.replace(path)
    if args.results:
        stamp = datetime.date.today().isoformat()
        section = (
            f"\n## {stamp}: {info['cpu']} ({info['cpu_capability']}, "
            f"{info['cores']} cores, {info['threads']} threads), "
            f"{info['device']}, {info['dtype']}\n\n"
            f"Command: `{command}`  \n"
            f"Machine: `{json.dumps(info)}`\n\n{table(figures)}\n"
        )
        with open(args.results, "a", encoding="utf-8") as f:
            f.write(section)
    return figures


if __name__ == "__main__":
    main()
