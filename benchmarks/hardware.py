"""Hardware reference: matrix-product throughput in fp32 and bf16, and
memory bandwidth.

The denominator of every utilisation figure of the suite. "Peak" is the
faster of the two precisions on this machine (on an AVX2-only CPU bf16 is
emulated and fp32 is the peak; with AMX or a GPU bf16 usually wins), measured
on square products at two sizes, keeping the best. ``memory_gbps`` is the
rate of a large tensor copy (bytes read plus bytes written per second): the
limit of work that reads every weight once per step, such as greedy
decoding at batch 1.
"""

import torch

from benchmarks.common import compare


def matmul_throughput(size, dtype, device, rounds):
    """Best GFLOP/s of a ``size``^3 product in ``dtype`` (``rounds`` tries)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device, dtype)
    b = torch.randn(size, size, generator=gen).to(device, dtype)
    repeat = max(1, int(2e9 // (2 * size**3)))

    def run():
        for _ in range(repeat):
            torch.mm(a, b)

    best = compare({"mm": run}, rounds, device)["mm"].best
    return 2 * size**3 * repeat / best / 1e9


def memory_bandwidth(device, rounds, mbytes=256):
    """Best GB/s of copying an ``mbytes`` MB float32 tensor (read + write).

    Example
    -------
    >>> memory_bandwidth("cpu", rounds=1, mbytes=4) > 0
    True
    """
    n = mbytes * 2**20 // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    best = compare({"copy": lambda: dst.copy_(src)}, rounds, device)
    return 2 * n * 4 / best["copy"].best / 1e9


def run(args):
    """Figures: ``gflops_fp32``, ``gflops_bf16``, ``peak_gflops``,
    ``peak_dtype`` and the bf16/fp32 ratio."""
    sizes = (512, 1024) if args.quick else (1024, 2048)
    rounds = 2 if args.quick else 4
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        best = 0.0
        for size in sizes:
            best = max(
                best, matmul_throughput(size, dtype, args.device, rounds)
            )
            if name == "bf16" and best < out["gflops_fp32"] / 10:
                break  # emulated bf16: the larger size only takes minutes
        out[f"gflops_{name}"] = best
    out["bf16_over_fp32"] = out["gflops_bf16"] / out["gflops_fp32"]
    peak = "bf16" if out["gflops_bf16"] > out["gflops_fp32"] else "fp32"
    out["peak_dtype"] = peak
    out["peak_gflops"] = out[f"gflops_{peak}"]
    out["sizes"] = list(sizes)
    out["memory_gbps"] = memory_bandwidth(
        args.device, rounds, 64 if args.quick else 256
    )
    return out
