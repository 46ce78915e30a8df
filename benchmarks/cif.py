"""Benchmark: loop-free CIF against a per-frame Python loop.

Times the forward pass and forward + backward of
:func:`speechbrain_blspkd.nnet.cif.cif` and of a reference integrate-and-fire
loop over time (vectorised over the batch, the usual CIF implementation) on
the same inputs, checks that both agree, and prints median times and the
speed-up ratios from the same run.

Part of the suite: ``python -m benchmarks.run --only cif``.

Authors
 * speechbrain-blspkd contributors 2025
"""

import torch

from benchmarks.common import compare
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


def forward_backward(fn, hidden, alphas, num_tokens):
    """Returns a closure running forward + backward of ``fn``."""

    def run():
        h = hidden.detach().requires_grad_()
        a = alphas.detach().requires_grad_()
        fn(h, a, num_tokens)[0].float().square().sum().backward()

    return run


def run(args):
    """Figures: fwd and fwd+bwd seconds of both, speed-ups, agreement."""
    device = args.device
    shape = (8, 500, 512, 50) if args.quick else (8, 1500, 512, 150)
    hidden, alphas, n = make_inputs(*shape, torch.float32, device)
    error = float(
        (cif(hidden, alphas, n)[0] - loop_cif(hidden, alphas, n)).abs().max()
    )
    if not error < 1e-3:
        raise RuntimeError(f"cif and the per-frame loop disagree ({error:.2e})")

    def fwd(fn):
        def call():
            with torch.no_grad():
                fn(hidden, alphas, n)

        return call

    configs = {
        "cif.fwd": fwd(cif),
        "loop.fwd": fwd(loop_cif),
        "cif.fwd_bwd": forward_backward(cif, hidden, alphas, n),
        "loop.fwd_bwd": forward_backward(loop_cif, hidden, alphas, n),
    }
    timing = compare(configs, max(2, args.rounds), device)
    out = {"shape_btcn": list(shape), "max_abs_diff": error}
    for name, t in timing.items():
        out[f"{name}_seconds"] = t.best
    for kind in ("fwd", "fwd_bwd"):
        out[f"speedup_{kind}"] = (
            timing[f"loop.{kind}"].best / timing[f"cif.{kind}"].best
        )
    return out
