"""Benchmark: one BLSP-KD training step and one alignment step.

Times, on the same inputs and in the same run (the ratios are what to
quote on a shared machine):

* the KD step (teacher pass, student forward + backward) with and without
  ``prefix_reuse`` (the shared system + instruction prefix computed once);
* the same step with the masked PLoRA delta computed densely, as
  ``y + mask * delta`` over every position (the straightforward version,
  kept here as the reference), against the row-sparse delta of
  :class:`speechbrain_blspkd.nnet.plora.PLoRALinear`;
* the alignment step (CFormer + alignment loss, no LLM pass) with
  ``frame_stride`` 1 and 2.

Configurations alternate round by round so that load on the machine hits
them alike. Uses the real SmolLM2-135M-Instruct asset (it must have been
fetched: ``python -m speechbrain_blspkd.assets fetch smollm2-135m-instruct``)
and random encoder features of Whisper-base width.

Usage::

    python benchmarks/bench_kd_step.py [--rounds 4] [--batch 8] [--device cpu]

Authors
 * speechbrain-blspkd contributors 2025
"""

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F

from speechbrain_blspkd.assets import asset_path
from speechbrain_blspkd.models.speech_llm import PassRequest, SpeechLLMModel
from speechbrain_blspkd.nnet import plora as plora_lib
from speechbrain_blspkd.nnet.cformer import CFormer
from speechbrain_blspkd.objectives.blsp_kd import alignment_loss
from speechbrain_blspkd.utils.precision import choose, resolve_dtype

SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "It is amazing how nice people are to you when you are going away.",
    "Beware of all enterprises that require new clothes.",
    "The time for action is past, and now is the time for thought.",
    "A private sin is not so prejudicial as a public indecency.",
    "Soap and education are not as sudden as a massacre.",
    "Gandhi often changed his mind publicly.",
    "One meets his destiny often on the road he takes to avoid it.",
]
CONTINUATION = (
    "This sentence reminds us that small choices shape the course of a "
    "life, and that what we avoid often finds us anyway."
)


def dense_plora_forward(self, x):
    """Reference PLoRA forward: the delta over every position, masked."""
    y = self.base(x)
    m = self.state.weights(
        x, training=self.training and torch.is_grad_enabled()
    )
    if m is None:
        return y
    h = self.dropout(x.to(self.lora_A.dtype))
    d = F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling
    if m is not True:
        d = d * m.to(d.dtype)
    return y + d.to(y.dtype)


@contextlib.contextmanager
def dense_plora():
    cls = plora_lib.PLoRALinear
    sparse = cls.forward
    cls.forward = dense_plora_forward
    try:
        yield
    finally:
        cls.forward = sparse


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--align_batch", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--dtype",
        default="auto",
        help="auto (bf16 where this machine computes it fast, else fp32), "
        "bfloat16 or float32: LLM weights and autocast",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    dtype = resolve_dtype(args.dtype, device)
    print(f"dtype {dtype}; auto on this machine: {choose(device.type)}")
    amp = dict(
        device_type=device.type,
        dtype=dtype,
        enabled=dtype != torch.float32,
    )

    adapter = CFormer(512, 576, n_pre=2, n_post=2, nhead=8, d_ffn=2048)
    model = SpeechLLMModel(
        str(asset_path("smollm2-135m-instruct", fetch=False)),
        adapter,
        instruction="Continue the following text in a coherent style:",
        plora={"r": 16, "alpha": 16, "dropout": 0.05, "scope": "audio"},
        llm_dtype=dtype,
    ).to(device)
    model.train()
    frames = int(args.seconds * 50)
    texts = (SENTENCES * args.batch)[: args.batch]
    feats = torch.randn(args.batch, frames, 512, device=device)
    lens = torch.linspace(0.6, 1.0, args.batch, device=device)

    kd_request = PassRequest(
        teacher=True, student=True, logits=("input", "response")
    )

    def kd_step():
        with torch.autocast(**amp):
            out = model(
                texts,
                [CONTINUATION] * args.batch,
                feats=feats,
                feat_lens=lens,
                request=kd_request,
            )
            loss = out.student.logits["response"].logsumexp(-1).mean()
            loss = loss + out.student.logits["input"].logsumexp(-1).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    align_texts = (SENTENCES * args.align_batch)[: args.align_batch]
    align_feats = torch.randn(args.align_batch, frames, 512, device=device)
    align_lens = torch.linspace(0.4, 1.0, args.align_batch, device=device)
    strided = CFormer(
        512, 576, n_pre=2, n_post=2, nhead=8, d_ffn=2048, frame_stride=2
    ).to(device)
    plain = model.adapter

    def align_step(adapter):
        def run():
            model.adapter = adapter
            with torch.autocast(**amp):
                out = model(
                    align_texts, feats=align_feats, feat_lens=align_lens
                )
                loss = alignment_loss(
                    model,
                    out.adapter,
                    out.transcript_ids,
                    transcript_mask=out.transcript_mask,
                )[0]
            loss.backward()
            adapter.zero_grad(set_to_none=True)
            model.adapter = plain

        return run

    def with_reuse(flag, dense=False):
        def run():
            model.prefix_reuse = flag
            ctx = dense_plora() if dense else contextlib.nullcontext()
            with ctx:
                kd_step()

        return run

    # one PLoRA layer of SmolLM2's MLP width, a quarter of the rows masked
    layer_state = plora_lib.PLoRAState("audio")
    layer = plora_lib.PLoRALinear(
        torch.nn.Linear(576, 1536).to(device, dtype),
        layer_state,
        r=16,
        alpha=16,
        dropout=0.05,
    )
    layer_mask = torch.zeros(args.batch, 90, dtype=torch.bool, device=device)
    layer_mask[:, 33:56] = True
    layer_x = torch.randn(args.batch, 90, 576, dtype=dtype, device=device)

    def layer_step(dense):
        def run():
            ctx = dense_plora() if dense else contextlib.nullcontext()
            with ctx:
                for _ in range(20):
                    layer_state.set_mask(layer_mask)
                    x = layer_x.clone().requires_grad_(True)
                    with torch.autocast(**amp):
                        y = layer(x)
                    y.float().square().mean().backward()

        return run

    configs = {
        "plora layer x20: dense": layer_step(True),
        "plora layer x20: sparse": layer_step(False),
        "kd: full sequence, dense PLoRA": with_reuse(False, dense=True),
        "kd: full sequence, sparse PLoRA": with_reuse(False),
        "kd: prefix reuse, sparse PLoRA": with_reuse(True),
        "align: frame_stride 1": align_step(plain),
        "align: frame_stride 2": align_step(strided),
    }
    for fn in configs.values():  # warm-up (and the prefix cache)
        fn()
    times = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, fn in configs.items():
            times[name].append(timed(fn, device))
    # the minimum: the least disturbed round (a shared machine only ever
    # adds time); medians printed beside it
    med = {name: min(t) for name, t in times.items()}
    mid = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"device {device}, KD batch {args.batch}, align batch "
        f"{args.align_batch}, {args.seconds:g} s clips, "
        f"{args.rounds} rounds, min (median)"
    )
    for name, value in med.items():
        print(f"  {name:36s} {value:7.3f} s ({mid[name]:.3f} s)")
    base = med["kd: full sequence, dense PLoRA"]
    print("speed-ups in this run:")
    print(
        f"  sparse PLoRA (one layer) "
        f"{med['plora layer x20: dense'] / med['plora layer x20: sparse']:.2f}x"
    )
    print(
        f"  sparse PLoRA             "
        f"{base / med['kd: full sequence, sparse PLoRA']:.2f}x"
    )
    print(
        f"  sparse PLoRA + prefix    "
        f"{base / med['kd: prefix reuse, sparse PLoRA']:.2f}x"
    )
    print(
        f"  frame_stride 2 (align)   "
        f"{med['align: frame_stride 1'] / med['align: frame_stride 2']:.2f}x"
    )


if __name__ == "__main__":
    main()
