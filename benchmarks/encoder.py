"""The frozen Whisper-base encoder: feature cache, dynamic length.

* **Feature cache vs on the fly**: reading a batch of cached features
  (:class:`~speechbrain_blspkd.dataprep.feature_cache.FeatureCache`, float16
  on disk) against encoding the same clips.
* **Dynamic length vs 30-s padding** on 2, 5 and 10-s clips: the encoder run
  at the clip's own length (``dynamic_length=True``, the project's default)
  against Whisper's fixed 30-s input, with how much the clip's frames
  differ between the two (relative L2 difference, mean and smallest cosine
  similarity of the frames).

The clips are spoken by espeak-ng (the project's one TTS wrapper), repeated
to the wanted length, so the output difference is measured on speech.
"""

import pathlib
import tempfile

import torch

from benchmarks.common import compare, encoder_path, speech_clip
from speechbrain_blspkd.dataprep.feature_cache import FeatureCache
from speechbrain_blspkd.nnet.whisper_encoder import WhisperEncoder


def run(args):
    """Figures: cache vs on-the-fly seconds per batch; dynamic vs padded
    seconds and output difference per clip length."""
    device = args.device
    dtype = args.dtype
    dynamic = WhisperEncoder(encoder_path(), dtype=dtype).to(device)
    padded = WhisperEncoder(
        encoder_path(), dtype=dtype, dynamic_length=False
    ).to(device)
    out = {"dtype": str(dtype).split(".")[-1]}
    with tempfile.TemporaryDirectory() as tmp:
        lengths = (2, 5) if args.quick else (2, 5, 10)
        for seconds in lengths:
            wav = speech_clip(seconds, tmp)[None].to(device)
            with torch.no_grad():
                a = dynamic(wav)
                b = padded(wav)
            if isinstance(a, tuple):
                a, b = a[0], b[0]
            n = min(a.shape[1], b.shape[1])
            a, b = a[:, :n].float(), b[:, :n].float()
            rel_l2 = (a - b).norm() / b.norm()
            cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1)
            timing = compare(
                {
                    "dynamic": lambda w=wav: dynamic(w),
                    "padded": lambda w=wav: padded(w),
                },
                args.rounds,
                device,
            )
            key = f"{seconds}s"
            out[f"{key}.dynamic_seconds"] = timing["dynamic"].best
            out[f"{key}.padded_seconds"] = timing["padded"].best
            out[f"{key}.padded_over_dynamic"] = (
                timing["padded"].best / timing["dynamic"].best
            )
            out[f"{key}.relative_l2_diff"] = float(rel_l2)
            out[f"{key}.mean_frame_cosine"] = float(cosine.mean())
            out[f"{key}.min_frame_cosine"] = float(cosine.min())

        batch = args.kd_batch
        wavs = torch.stack([speech_clip(4, tmp) for _ in range(batch)])
        wavs = wavs.to(device)
        with torch.no_grad():
            feats = dynamic(wavs)
        if isinstance(feats, tuple):
            feats = feats[0]
        cache = FeatureCache(pathlib.Path(tmp) / "cache", "bench")
        for i in range(batch):
            cache.put(f"u{i}", feats[i].cpu())

        def read():
            rows = [cache.get(f"u{i}", device=device) for i in range(batch)]
            return torch.stack(rows)

        def encode():
            with torch.no_grad():
                return dynamic(wavs)

        timing = compare(
            {"cache": read, "on_the_fly": encode}, args.rounds, device
        )
    out["cache.batch"] = batch
    out["cache.read_seconds"] = timing["cache"].best
    out["cache.encode_seconds"] = timing["on_the_fly"].best
    out["cache.encode_over_read"] = (
        timing["on_the_fly"].best / timing["cache"].best
    )
    return out
