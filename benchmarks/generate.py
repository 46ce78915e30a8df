"""Generation throughput: new tokens per second at batch 1, 8 and 32.

Greedy decoding of SmolLM2-135M-Instruct through the project's one
generation path (:meth:`~speechbrain_blspkd.models.speech_llm.SpeechLLMModel.generate_text`,
which the teacher continuations and the evaluation's text answers use;
speech answers go through the same decoder after the adapter). Every row
generates exactly ``new_tokens`` tokens (end of turn suppressed until then),
so the count is fixed. The KV-cache implementations are timed in the same
run: ``transformers``' dynamic cache and its static (preallocated) cache.

Utilisation, two ways, both over the machine's peak:

* ``utilisation``: the executed FLOPs of one call (counted, see
  :func:`benchmarks.common.count_flops`: the prompt's prefill and every
  decoding step) per second;
* ``decode_utilisation``: the decoding loop alone, i.e. the FLOPs and the
  time of the call beyond those of the same call with one new token (the
  prefill and the first token), which is what the KV cache and the loop
  decide. ``new_token_gflop`` is the forward FLOPs per generated token
  (per row) of that loop.

At small batches decoding is bound by memory, not by FLOPs: every step
reads all the LLM's weights once, whatever the batch. ``weight_gbps`` is
that stream (the weights' bytes times the decoding steps over the decoding
time) and ``bandwidth_utilisation`` its share of the machine's copy
bandwidth (``hardware.memory_gbps``): near 1, a faster loop cannot help,
only fewer bytes per weight can.
"""

from benchmarks.common import (
    compare,
    count_flops,
    demo_model,
    parameter_bytes,
    texts,
)


def run(args, peak_gflops, memory_gbps=None):
    """Figures per batch size and cache: tokens/s, GFLOP/s, utilisation,
    and the weight stream of the decoding loop."""
    model = demo_model(args.dtype, args.device)
    model.eval()
    llm_bytes = parameter_bytes(model.llm)
    n_new = args.new_tokens
    caches = {"dynamic": {}, "static": {"cache_implementation": "static"}}
    out = {"new_tokens": n_new, "dtype": str(args.dtype).split(".")[-1]}
    for batch in args.gen_batches:
        transcripts = texts(batch)

        def call(extra, transcripts=transcripts):
            return lambda: model.generate_text(
                transcripts,
                max_new_tokens=n_new,
                min_new_tokens=n_new,
                **extra,
            )

        configs = {name: call(extra) for name, extra in caches.items()}
        flops = count_flops(configs["dynamic"])
        first = lambda t=transcripts: model.generate_text(  # noqa: E731
            t, max_new_tokens=1
        )
        first_flops = count_flops(first)
        configs["first_token"] = first
        timing = compare(configs, args.rounds, args.device)
        t_first = timing.pop("first_token").best
        decode_flops = flops - first_flops
        out[f"b{batch}.new_token_gflop"] = (
            decode_flops / ((n_new - 1) * batch) / 1e9
        )
        for name, t in timing.items():
            key = f"b{batch}.{name}"
            out[f"{key}.tokens_per_s"] = batch * n_new / t.best
            out[f"{key}.gflops"] = flops / t.best / 1e9
            out[f"{key}.utilisation"] = flops / t.best / 1e9 / peak_gflops
            decode_seconds = max(t.best - t_first, 1e-9)
            out[f"{key}.decode_utilisation"] = (
                decode_flops / decode_seconds / 1e9 / peak_gflops
            )
            stream = llm_bytes * (n_new - 1) / decode_seconds / 1e9
            out[f"{key}.weight_gbps"] = stream
            if memory_gbps:
                out[f"{key}.bandwidth_utilisation"] = stream / memory_gbps
        best = max(
            caches, key=lambda name: out[f"b{batch}.{name}.tokens_per_s"]
        )
        out[f"b{batch}.best_cache"] = best
        out[f"b{batch}.tokens_per_s"] = out[f"b{batch}.{best}.tokens_per_s"]
        out[f"b{batch}.utilisation"] = out[f"b{batch}.{best}.utilisation"]
        out[f"b{batch}.decode_utilisation"] = out[
            f"b{batch}.{best}.decode_utilisation"
        ]
        for figure in ("weight_gbps", "bandwidth_utilisation"):
            if f"b{batch}.{best}.{figure}" in out:
                out[f"b{batch}.{figure}"] = out[f"b{batch}.{best}.{figure}"]
    top = max(args.gen_batches)
    out["tokens_per_s"] = out[f"b{top}.tokens_per_s"]
    out["utilisation"] = out[f"b{top}.utilisation"]
    out["decode_utilisation"] = out[f"b{top}.decode_utilisation"]
    out["llm_weight_mb"] = llm_bytes / 2**20
    return out
