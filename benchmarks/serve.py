"""Serving under load: blspkd-serve batched vs one by one vs blspkd-infer.

One run, the same clips and answer length for all three:

* ``batched``: ``blspkd-serve --max-batch B`` (``--serve_max_batch``,
  default 8; ``--max-wait-ms 20``);
* ``one_by_one``: ``blspkd-serve --max-batch 1`` (every request alone);
* ``infer_b8``: ``blspkd-infer --batch-size 8`` over the same clips (offline
  batches, no HTTP). Its rate is ``(N - 1) / (t(N clips) - t(1 clip))``:
  the model load is subtracted.

Each server runs in its own process; the load generator is asyncio + httpx
in this one: ``C`` clients (1, 8, 32) each send their next request when the
previous is answered (closed loop), greedy, ``max_tokens`` =
``answer_tokens``. Per system and ``C``: requests/s, answer tokens/s,
p50/p95 latency (s). ``failed`` (non-200 or transport errors) and ``lost``
(requests without an answer) must be 0: the section asserts it after
printing. ``mismatched`` counts batched answers that differ from one-by-one
answers (greedy decoding: expected 0 in fp32).
``c8.batched_over_one_by_one`` and ``c32.batched_over_one_by_one`` are the
throughput ratios of batching; ``placement`` gives the server's device and
LLM dtype.

The model is ``--serve_model DIR`` (default ``results/demo/model``, which
``make demo`` writes; when absent, the demo's architecture with random
adapters is exported to a temporary folder), or a tiny random model with
``--serve_tiny`` (a smoke run in seconds: its figures mean nothing).

Standalone: ``python -m benchmarks.serve [--quick] [--serve_tiny] ...``
(= ``python -m benchmarks.run --only serve ...``).
"""

import asyncio
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "results" / "demo" / "model"
CONCURRENCY = (1, 8, 32)


def _tiny_folder(tmp, answer_tokens):
    from speechbrain_blspkd.inference.export import export_model
    from speechbrain_blspkd.testing import tiny_saved_speech_llm

    model = tiny_saved_speech_llm(tmp / "tiny", seed=0)
    return export_model(
        model,
        tmp / "tiny" / "model",
        {"max_new_tokens": answer_tokens, "llm_dtype": None},
    )


def _demo_folder(args, tmp):
    from benchmarks.common import demo_model
    from speechbrain_blspkd.inference.export import export_model

    model = demo_model(args.dtype, "cpu", encoder=True)
    return export_model(model, tmp / "demo_random" / "model")


def _clips(tmp, n, tiny):
    """``n`` clip files (distinct paths; 8 distinct audios, 2-5 s)."""
    import soundfile as sf

    from benchmarks.common import SAMPLE_RATE, speech_clip
    from speechbrain_blspkd.testing import write_speechlike_wav

    folder = tmp / "clips"
    folder.mkdir(parents=True, exist_ok=True)
    distinct = []
    for i in range(8):
        seconds = 2.0 + 0.4 * i
        path = folder / f"audio{i}.wav"
        if tiny:
            write_speechlike_wav(path, seconds / 4, seed=i, pitch=160 + 20 * i)
        else:
            wav = speech_clip(seconds, tmp)
            start = int(0.3 * i * SAMPLE_RATE) % max(1, wav.numel() // 2)
            sf.write(str(path), wav.roll(-start).numpy(), SAMPLE_RATE)
        distinct.append(path)
    paths = []
    for j in range(n):
        path = folder / f"clip{j:03d}.wav"
        shutil.copyfile(distinct[j % len(distinct)], path)
        paths.append(path)
    return paths


class _Server:
    """``python -m speechbrain_blspkd.serve`` in a subprocess."""

    def __init__(self, folder, max_batch, device, log):
        from speechbrain_blspkd.serve.app import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [
            sys.executable,
            "-m",
            "speechbrain_blspkd.serve",
            "--model",
            f"bench={folder}",
            "--port",
            str(self.port),
            "--max-batch",
            str(max_batch),
            "--max-wait-ms",
            "20",
            "--device",
            device,
            "--log-level",
            "warning",
        ]
        self.log = open(log, "w", encoding="utf-8")
        self.process = subprocess.Popen(
            command, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO
        )

    def wait(self, timeout=600):
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"blspkd-serve exited ({self.process.returncode}); see "
                    f"{self.log.name}"
                )
            try:
                return httpx.get(self.url + "/health", timeout=5).json()
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError(f"blspkd-serve did not start; see {self.log.name}")

    def health(self):
        import httpx

        return httpx.get(self.url + "/health", timeout=30).json()

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def _payload(path, max_tokens):
    import base64

    data = base64.b64encode(pathlib.Path(path).read_bytes()).decode()
    return {
        "model": "bench",
        "messages": [
            {
                "role": "user",
                "content": [
                    {
                        "type": "input_audio",
                        "input_audio": {"data": data, "format": "wav"},
                    }
                ],
            }
        ],
        "max_tokens": max_tokens,
        "temperature": 0,
    }


async def _load(url, payloads, concurrency, timeout):
    """Closed-loop load: ``concurrency`` clients until ``payloads`` run out."""
    import httpx

    answers = [None] * len(payloads)
    latencies, tokens, failures = [], [0], []
    todo = iter(range(len(payloads)))
    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:

        async def client_loop():
            for i in todo:
                start = time.perf_counter()
                try:
                    response = await client.post(
                        url + "/v1/chat/completions", json=payloads[i]
                    )
                except httpx.HTTPError as err:
                    failures.append(f"request {i}: {err!r}")
                    continue
                latencies.append(time.perf_counter() - start)
                if response.status_code != 200:
                    failures.append(
                        f"request {i}: {response.status_code} {response.text}"
                    )
                    continue
                body = response.json()
                answers[i] = body["choices"][0]["message"]["content"]
                tokens[0] += body["usage"]["completion_tokens"]

        start = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return answers, latencies, tokens[0], failures, wall


def _percentile(values, q):
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def _serve_figures(server, paths, levels, answer_tokens, timeout):
    figures, answers = {}, {}
    payloads = [_payload(p, answer_tokens) for p in paths]
    # warm-up (first-call allocations, lazy imports)
    asyncio.run(_load(server.url, payloads[:2], 2, timeout))
    for c in levels:
        n = max(2 * c, 16)
        got, lat, tokens, failures, wall = asyncio.run(
            _load(server.url, payloads[:n], c, timeout)
        )
        answered = sum(a is not None for a in got)
        figures[f"c{c}.rps"] = answered / wall
        figures[f"c{c}.tokens_per_s"] = tokens / wall
        figures[f"c{c}.p50_s"] = _percentile(lat, 0.5)
        figures[f"c{c}.p95_s"] = _percentile(lat, 0.95)
        figures[f"c{c}.requests"] = n
        figures[f"c{c}.failed"] = len(failures)
        figures[f"c{c}.lost"] = n - answered - len(failures)
        for message in failures[:3]:
            print(f"# serve: failed {message[:300]}", file=sys.stderr)
        answers[c] = got
    stats = server.health()["batcher"]
    figures["mean_batch"] = statistics.fmean(stats["recent"] or [0])
    return figures, answers


def _infer_seconds(folder, paths, answer_tokens, device, out):
    command = [
        sys.executable,
        "-m",
        "speechbrain_blspkd.inference.cli",
        "--model",
        str(folder),
        "--batch-size",
        "8",
        "--max-new-tokens",
        str(answer_tokens),
        "--no-progress",
        "--device",
        device,
        "--out",
        str(out),
        "--overwrite",
    ]
    for path in paths:
        command += ["--wav", str(path)]
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO, capture_output=True)
    seconds = time.perf_counter() - start
    lines = pathlib.Path(out).read_text(encoding="utf-8").splitlines()
    return seconds, [json.loads(x) for x in lines if x.strip()]


def run(args):
    """The figures (see the module docstring); asserts none failed or lost."""
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="blspkd-bench-serve-"))
    tiny = bool(getattr(args, "serve_tiny", False))
    answer_tokens = int(args.answer_tokens)
    device = str(args.device)
    if tiny:
        folder, source = _tiny_folder(tmp, answer_tokens), "tiny random"
    elif getattr(args, "serve_model", None):
        folder, source = pathlib.Path(args.serve_model), args.serve_model
    elif (DEMO_MODEL / "hyperparams.yaml").is_file():
        folder, source = DEMO_MODEL, str(DEMO_MODEL.relative_to(REPO))
    else:
        folder = _demo_folder(args, tmp)
        source = "demo architecture, random adapters"
    levels = CONCURRENCY
    n_max = max(max(2 * c, 16) for c in levels)
    paths = _clips(tmp, n_max, tiny)
    batch = int(getattr(args, "serve_max_batch", 8) or 8)
    timeout = 600.0
    out = {"model": source, "answer_tokens": answer_tokens, "max_batch": batch}
    results = {}
    for name, max_batch in (("batched", batch), ("one_by_one", 1)):
        server = _Server(folder, max_batch, device, tmp / f"{name}.log")
        try:
            health = server.wait()
            placement = health["placement"]["bench"]
            out["placement"] = f"{placement['device']} {placement['dtype']}"
            figures, answers = _serve_figures(
                server, paths, levels, answer_tokens, timeout
            )
        finally:
            server.stop()
        results[name] = answers
        for key, value in figures.items():
            out[f"{name}.{key}"] = value
    for c in levels:
        b, o = out[f"batched.c{c}.rps"], out[f"one_by_one.c{c}.rps"]
        out[f"c{c}.batched_over_one_by_one"] = b / o if o else float("nan")
        out[f"c{c}.mismatched"] = sum(
            x != y
            for x, y in zip(results["batched"][c], results["one_by_one"][c])
        )
    n = n_max
    t_one, _ = _infer_seconds(
        folder, paths[:1], answer_tokens, device, tmp / "one.jsonl"
    )
    t_all, rows = _infer_seconds(
        folder, paths[:n], answer_tokens, device, tmp / "all.jsonl"
    )
    out["infer_b8.clips"] = n
    out["infer_b8.rps"] = (n - 1) / max(t_all - t_one, 1e-9)
    out["infer_b8.wall_s"] = t_all
    out["infer_b8.lost"] = n - len(rows)
    for c in (8, 32):
        out[f"c{c}.batched_over_infer_b8"] = (
            out[f"batched.c{c}.rps"] / out["infer_b8.rps"]
        )
    out["failed"] = sum(v for k, v in out.items() if k.endswith(".failed"))
    out["lost"] = sum(v for k, v in out.items() if k.endswith(".lost"))
    if not os.environ.get("BLSPKD_BENCH_KEEP"):
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"serve.failed = {out['failed']}, serve.lost = {out['lost']}",
        flush=True,
    )
    assert out["failed"] == 0, f"{out['failed']} requests failed"
    assert out["lost"] == 0, f"{out['lost']} requests lost"
    return out


def main(argv=None):
    """``python -m benchmarks.run --only serve`` with ``argv``."""
    from benchmarks import run as suite

    argv = list(sys.argv[1:] if argv is None else argv)
    return suite.main(["--only", "serve", *argv])


if __name__ == "__main__":
    main()
