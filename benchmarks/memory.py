"""Peak memory of demo training and of inference.

Each is measured in a fresh process (``python -m benchmarks.memory train``
or ``infer``), so one peak does not hide the other: resident memory (the
process's maximum RSS) on the CPU, and the peak allocated device memory on
CUDA.

* ``train``: the demo's model from cached-feature-sized frames, two
  alignment steps (batch 32) and two BLSP-KD steps (batch 8), AdamW;
* ``infer``: the speech LLM with the Whisper-base encoder answering a batch
  of 8 four-second clips from audio (48 new tokens).
"""

import json
import subprocess
import sys
import tempfile

import torch

from benchmarks.common import peak_rss_mib


def _measure(kind, device, dtype):
    from benchmarks.common import demo_model, speech_clip
    from benchmarks.train_step import Steps

    if kind == "train":
        steps = Steps(dtype, device, kd_batch=8, align_batch=32, seconds=4)
        for _ in range(2):
            steps.align()
            steps.kd()
    else:
        model = demo_model(dtype, device, encoder=True).eval()
        with tempfile.TemporaryDirectory() as tmp:
            wavs = speech_clip(4, tmp)[None].repeat(8, 1).to(device)
        model.generate(wavs, max_new_tokens=48, min_new_tokens=48)
    out = {"peak_rss_mib": peak_rss_mib()}
    if torch.device(device).type == "cuda":
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run(args):
    """Figures: ``train.*`` and ``infer.*`` peaks (MiB), each measured in
    its own process."""
    out = {}
    for kind in ("train", "infer"):
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.memory",
            kind,
            str(args.device),
            str(args.dtype).split(".")[-1],
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(
                f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}"
            )
        figures = json.loads(proc.stdout.strip().splitlines()[-1])
        for name, value in figures.items():
            out[f"{kind}.{name}"] = value
    return out


if __name__ == "__main__":
    kind, device, dtype = sys.argv[1:4]
    torch.manual_seed(0)
    result = _measure(kind, device, getattr(torch, dtype))
    print(json.dumps(result))
