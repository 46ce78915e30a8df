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

``matmul_floor_ms`` is what the products of one decoding step cost alone:
one pass of ``batch`` rows through every distinct linear weight of the LLM
(the output layer included, a tied one once), nothing else. ``step_ms`` is
the measured decoding time per new token and ``matmul_floor_share`` their
ratio: the share of a step that the products need; the rest is attention,
norms, sampling and Python per call, which only a leaner loop (fewer,
larger kernel calls) removes.
"""

import torch
import torch.nn.functional as F

from benchmarks.common import (
    compare,
    count_flops,
    demo_model,
    parameter_bytes,
    texts,
)


def linear_weights(module):
    """The distinct weight matrices of ``module``'s linear layers.

    Example
    -------
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 3))
    >>> tied = torch.nn.Linear(4, 4)
    >>> tied.weight = net[0].weight  # the same tensor: listed once
    >>> [tuple(w.shape) for w in linear_weights(torch.nn.ModuleList([net, tied]))]
    [(4, 4), (3, 4)]
    """
    seen = {}
    for layer in module.modules():
        if isinstance(layer, torch.nn.Linear):
            seen.setdefault(layer.weight.data_ptr(), layer.weight)
    return list(seen.values())


def matmul_floor(weights, batch, rounds, device="cpu"):
    """Best seconds of one pass of ``batch`` rows through every weight.

    Example
    -------
    >>> matmul_floor([torch.ones(8, 4), torch.ones(2, 8)], 1, rounds=2) > 0
    True
    """
    inputs = [
        torch.randn(batch, w.shape[1], dtype=w.dtype, device=device)
        for w in weights
    ]

    def one_pass():
        with torch.no_grad():
            for x, w in zip(inputs, weights):
                F.linear(x, w)

    return compare({"floor": one_pass}, rounds, device)["floor"].best


def run(args, peak_gflops, memory_gbps=None):
    """Figures per batch size and cache: tokens/s, GFLOP/s, utilisation,
    and the weight stream of the decoding loop."""
    model = demo_model(args.dtype, args.device)
    model.eval()
    llm_bytes = parameter_bytes(model.llm)
    weights = linear_weights(model.llm)
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
            out[f"{key}.step_ms"] = 1e3 * decode_seconds / (n_new - 1)
        best = max(
            caches, key=lambda name: out[f"b{batch}.{name}.tokens_per_s"]
        )
        out[f"b{batch}.best_cache"] = best
        out[f"b{batch}.tokens_per_s"] = out[f"b{batch}.{best}.tokens_per_s"]
        out[f"b{batch}.utilisation"] = out[f"b{batch}.{best}.utilisation"]
        out[f"b{batch}.decode_utilisation"] = out[
            f"b{batch}.{best}.decode_utilisation"
        ]
        for figure in ("weight_gbps", "bandwidth_utilisation", "step_ms"):
            if f"b{batch}.{best}.{figure}" in out:
                out[f"b{batch}.{figure}"] = out[f"b{batch}.{best}.{figure}"]
        floor = matmul_floor(weights, batch, args.rounds, args.device)
        out[f"b{batch}.matmul_floor_ms"] = 1e3 * floor
        out[f"b{batch}.matmul_floor_share"] = (
            1e3 * floor / out[f"b{batch}.step_ms"]
        )
    top = max(args.gen_batches)
    out["tokens_per_s"] = out[f"b{top}.tokens_per_s"]
    out["utilisation"] = out[f"b{top}.utilisation"]
    out["decode_utilisation"] = out[f"b{top}.decode_utilisation"]
    out["llm_weight_mb"] = llm_bytes / 2**20
    return out
