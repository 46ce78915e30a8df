"""Benchmark: loop-free CIF against a per-frame Python loop.

Times the forward pass and forward + backward of
:func:`speechbrain_blspkd.nnet.cif.cif` and of a reference integrate-and-fire
loop over time (vectorised over the batch, the usual CIF implementation) on
the same inputs, checks that both agree, and prints median times and the
speed-up ratios from the same run.

Usage::

    python benchmarks/bench_cif.py [--repeats 10] [--device cpu]

Authors
 * speechbrain-blspkd contributors 2025
"""

import argparse
import statistics
import time

import torch

from speechbrain_blspkd.nnet.cif import cif, scale_alphas


def loop_cif(hidden, alphas, num_tokens, threshold=1.0):
    """Integrate-and-fire one frame at a time, vectorised over the batch.

    Handles frames with alpha > threshold (several fires per frame) with a
    fixed number of inner steps, so the loop never syncs with the device.
    """
    batch, _, channels = hidden.shape
    last = num_tokens - 1
    n_max = int(num_tokens.max())
    inner = int(alphas.max() // threshold) + 1
    acc = alphas.new_zeros(batch)
    integrated = hidden.new_zeros(batch, channels)
    index = torch.zeros_like(num_tokens)
    values, slots = [], []
    # unbind: per-frame views whose backward is one stack, not T scatters
    for remaining, frame in zip(alphas.unbind(1), hidden.unbind(1)):
        for _ in range(inner):
            room = threshold - acc
            fire = (remaining >= room) & (index < last)
            take = torch.where(fire, room, torch.zeros_like(room))
            values.append(integrated + take[:, None] * frame)
            slots.append(
                torch.where(fire, index, torch.full_like(index, n_max))
            )
            integrated = torch.where(
                fire[:, None], torch.zeros_like(integrated), integrated
            )
            acc = torch.where(fire, torch.zeros_like(acc), acc)
            remaining = remaining - take
            index = index + fire.long()
        integrated = integrated + remaining[:, None] * frame
        acc = acc + remaining
    values.append(integrated)
    slots.append(index)
    values = torch.stack(values, dim=1)
    slots = torch.stack(slots, dim=1)
    out = hidden.new_zeros(batch, n_max + 1, channels)
    out = out.scatter(1, slots[..., None].expand(-1, -1, channels), values)
    return out[:, :n_max]


def make_inputs(batch, frames, channels, tokens, dtype, device, seed=0):
    """Random padded batch with scaled alphas (about ``tokens`` per row)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(frames // 2, frames + 1, (batch,), generator=gen)
    lengths[0] = frames
    mask = torch.arange(frames)[None, :] < lengths[:, None]
    num_tokens = (lengths * tokens // frames).clamp(min=1)
    hidden = torch.randn(batch, frames, channels, generator=gen)
    alphas = torch.rand(batch, frames, generator=gen) * mask
    alphas = scale_alphas(alphas, num_tokens)
    return (
        hidden.to(device=device, dtype=dtype),
        alphas.to(device=device, dtype=dtype),
        num_tokens.to(device),
    )


def sync(device):
    """Waits for queued device work (CUDA) before reading the clock."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, repeats, device, warmup=1):
    """Median wall time of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_backward(fn, hidden, alphas, num_tokens):
    """Returns a closure running forward + backward of ``fn``."""

    def run():
        h = hidden.detach().requires_grad_()
        a = alphas.detach().requires_grad_()
        fn(h, a, num_tokens)[0].float().square().sum().backward()

    return run


def peak_memory(fn, device):
    """Peak device memory (MiB) of one ``fn()`` call, CUDA only."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--loop-repeats", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads"
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--frames", type=int, default=1500)
    parser.add_argument("--channels", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=150)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loop_repeats = args.loop_repeats or max(1, min(args.repeats, 5))
    device = args.device
    shape = (args.batch, args.frames, args.channels, args.tokens)
    print(
        f"B={args.batch} T={args.frames} C={args.channels} N~{args.tokens} "
        f"device={device} torch={torch.__version__} "
        f"threads={torch.get_num_threads()} repeats={args.repeats} "
        f"(loop {loop_repeats})"
    )

    hidden, alphas, n = make_inputs(*shape, torch.float32, device)
    ours = cif(hidden, alphas, n)[0]
    reference = loop_cif(hidden, alphas, n)
    error = float((ours - reference).abs().max())
    print(f"max |cif - loop| (fp32) = {error:.2e}")
    if not error < 1e-3:
        raise SystemExit("cif and the loop disagree")

    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        h, a, n = make_inputs(*shape, dtype, device)
        name = str(dtype).replace("torch.", "")
        with torch.no_grad():
            results[f"cif fwd {name}"] = median_time(
                lambda h=h, a=a, n=n: cif(h, a, n), args.repeats, device
            )
        fb = forward_backward(cif, h, a, n)
        results[f"cif fwd+bwd {name}"] = median_time(fb, args.repeats, device)
        memory = peak_memory(fb, device)
        if memory is not None:
            print(f"peak memory cif fwd+bwd {name}: {memory:.1f} MiB")

    h, a, n = make_inputs(*shape, torch.float32, device)
    with torch.no_grad():
        results["loop fwd float32"] = median_time(
            lambda: loop_cif(h, a, n), loop_repeats, device, warmup=0
        )
    fb = forward_backward(loop_cif, h, a, n)
    results["loop fwd+bwd float32"] = median_time(
        fb, loop_repeats, device, warmup=0
    )
    memory = peak_memory(fb, device)
    if memory is not None:
        print(f"peak memory loop fwd+bwd float32: {memory:.1f} MiB")

    for key, seconds in results.items():
        print(f"{key:24s} {seconds * 1e3:10.2f} ms")
    for kind in ("fwd", "fwd+bwd"):
        loop = results[f"loop {kind} float32"]
        for name in ("float32", "bfloat16"):
            ratio = loop / results[f"cif {kind} {name}"]
            print(
                f"speed-up {kind:7s} loop fp32 / cif {name:8s}: {ratio:7.1f}x"
            )


if __name__ == "__main__":
    main()
