"""How well can a CIF weight predictor count LLM tokens on its own?

A measurement, kept in git history only (RESULTS.md names the commit).
Only the weight predictor trains: no token layers, no alignment loss, no
LLM.  Its input is what the shipped CFormer's predictor reads (Whisper-base
features from the recipe's cache, average-pooled to 25 frames a second,
layer-normalised); its targets are the transcript's LLM-token count and
the cached token timings.  Every 100 steps the predicted count of each
test clip is compared with the true one.

Variants (ARCH_LOSS):

* ARCH: ``conv`` (the shipped two 1-D convolutions), ``rnn`` (a
  bidirectional LSTM), ``tf`` (two transformer layers of width 256);
* LOSS: ``qt`` (the recipe's quantity + timing losses; count =
  round(sum of weights)), ``fire`` (a 3-way class per frame: how many
  tokens end in it, 0 / 1 / 2+; count = sum of the argmax classes),
  ``ctc`` (CTC over the LLM tokens seen in training; count = length of
  the greedy output).

Usage::

    python count_alone.py prepare DATA_FOLDER PIPER_FOLDER CACHE.pt
    python count_alone.py train CACHE.pt conv_qt MINUTES [SEED] [THREADS]
    python count_alone.py baselines CACHE.pt

``baselines`` prints two counts that need no training of a predictor:
a line fitted to the training clips' frame counts (the duration alone),
and the number of words plus punctuation marks (the words known, their
BPE splits not).
"""

import csv
import json
import math
import pathlib
import random
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from speechbrain_blspkd.nnet.cif import span_weights, timing_loss

FRAME_RATE = 25.0  # the CFormer's rate after frame_stride 2


def _pooled(feats):
    frames = feats.shape[0] // 2 * 2
    return feats[:frames].view(frames // 2, 2, -1).mean(1).half()


def prepare(data, piper, out):
    """Cache pooled features, timings and token ids of train/test/piper."""
    import soundfile
    from transformers import AutoTokenizer

    from speechbrain_blspkd.assets.paths import resolve_source
    from speechbrain_blspkd.dataprep.feature_cache import FeatureCache
    from speechbrain_blspkd.dataprep.token_timings import TokenTimingCache
    from speechbrain_blspkd.nnet.whisper_encoder import WhisperEncoder
    from speechbrain_blspkd.prompt.builder import PromptBuilder

    data, piper = pathlib.Path(data), pathlib.Path(piper)
    prompts = PromptBuilder(
        AutoTokenizer.from_pretrained(resolve_source("smollm2-135m-instruct"))
    )
    feature_folder = data / "features.whisper-base"
    meta = json.loads((feature_folder / "meta.json").read_text())
    features = FeatureCache(feature_folder, meta["checksum"])
    timing_folder = data / "timings.smollm2-135m-instruct"
    timings = TokenTimingCache(
        timing_folder, json.loads((timing_folder / "timings.json").read_text())
    )
    sets = {}
    for split in ("train", "test"):
        items = []
        for row in csv.DictReader(open(data / f"{split}.csv")):
            feats, spans = features.get(row["ID"]), timings.get(row["ID"])
            if feats is None or spans is None:
                continue
            ids = prompts.transcript_ids(row["transcript"])
            items.append(
                dict(
                    feats=_pooled(feats),
                    spans=spans,
                    ids=ids,
                    text=row["transcript"],
                )
            )
        sets[split] = items
    encoder = WhisperEncoder(
        resolve_source("whisper-base"),
        freeze=True,
        dynamic_length=True,
        dtype="fp32",
    ).eval()
    sets["piper"] = []
    for row in csv.DictReader(open(piper / "test.csv")):
        wav = row["wav"].replace("$data_root", str(piper))
        audio, rate = soundfile.read(wav, dtype="float32")
        assert rate == 16000, wav
        with torch.no_grad():
            feats = encoder(torch.tensor(audio)[None], torch.tensor([1.0]))[0]
        ids = prompts.transcript_ids(row["transcript"])
        sets["piper"].append(
            dict(
                feats=_pooled(feats[0]),
                spans=None,
                ids=ids,
                text=row["transcript"],
            )
        )
    torch.save(sets, out)
    print({k: len(v) for k, v in sets.items()})


def batch_of(items):
    """Padded (B, T, 512) frames, (B, T) mask, (B,) counts, (B, N, 2) spans."""
    time_ = max(it["feats"].shape[0] for it in items)
    x = torch.zeros(len(items), time_, items[0]["feats"].shape[1])
    mask = torch.zeros(len(items), time_, dtype=torch.bool)
    for i, it in enumerate(items):
        x[i, : it["feats"].shape[0]] = it["feats"].float()
        mask[i, : it["feats"].shape[0]] = True
    counts = torch.tensor([len(it["ids"]) for it in items])
    spans = None
    if items[0]["spans"] is not None:
        spans = torch.full((len(items), int(counts.max()), 2), -1.0)
        for i, it in enumerate(items):
            spans[i, : len(it["ids"])] = it["spans"]
    return x, mask, counts, spans


class Predictor(nn.Module):
    """Frames -> per-frame outputs (a weight logit, 3 classes or CTC)."""

    def __init__(self, arch, width, outputs):
        super().__init__()
        self.arch = arch
        self.norm = nn.LayerNorm(width)
        if arch == "conv":
            self.body = nn.ModuleList(
                [
                    nn.Conv1d(width, 256, 5, padding=2),
                    nn.Conv1d(256, 256, 5, padding=2),
                ]
            )
            hidden = 256
        elif arch == "rnn":
            self.body = nn.LSTM(
                width, 256, batch_first=True, bidirectional=True
            )
            hidden = 512
        elif arch == "tf":
            self.inp = nn.Linear(width, 256)
            self.pos = nn.Conv1d(256, 256, 9, padding=4, groups=16)
            layer = nn.TransformerEncoderLayer(
                256, 4, 1024, 0.0, batch_first=True, norm_first=True
            )
            self.body = nn.TransformerEncoder(
                layer, 2, enable_nested_tensor=False
            )
            hidden = 256
        else:
            raise ValueError(f"unknown predictor {arch!r}")
        self.out = nn.Linear(hidden, outputs)
        if outputs == 1:
            nn.init.constant_(self.out.bias, -2.0)  # the CFormer's start

    def forward(self, x, mask):
        x = self.norm(x).masked_fill(~mask[..., None], 0.0)
        if self.arch == "conv":
            keep = mask[:, None, :].float()
            h = x.transpose(1, 2)
            for conv in self.body:
                h = F.gelu(conv(h)) * keep
            h = h.transpose(1, 2)
        elif self.arch == "rnn":
            packed = nn.utils.rnn.pack_padded_sequence(
                x, mask.sum(1).cpu(), batch_first=True, enforce_sorted=False
            )
            h, _ = self.body(packed)
            h, _ = nn.utils.rnn.pad_packed_sequence(
                h, batch_first=True, total_length=x.shape[1]
            )
        else:
            h = self.inp(x)
            h = h + self.pos(h.transpose(1, 2)).transpose(1, 2)
            h = self.body(h, src_key_padding_mask=~mask)
        return self.out(h)


def fire_classes(spans, mask):
    """Per frame: how many tokens end in it (0, 1, 2+)."""
    classes = torch.zeros(mask.shape, dtype=torch.long)
    lengths = mask.sum(1)
    for b in range(mask.shape[0]):
        for start, end in spans[b].tolist():
            if start < 0:
                continue
            frame = math.ceil(end * FRAME_RATE - 1e-6) - 1
            classes[b, min(max(frame, 0), int(lengths[b]) - 1)] += 1
    return classes.clamp(max=2)


def ctc_greedy_lengths(logits, mask):
    best = logits.argmax(-1)
    lengths = []
    for b in range(best.shape[0]):
        path = best[b, : int(mask[b].sum())]
        keep = (path != 0) & torch.cat([path[:1] != -1, path[1:] != path[:-1]])
        lengths.append(int(keep.sum()))
    return torch.tensor(lengths)


def train(cache, variant, minutes, seed=1234, threads=2):
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    random.seed(seed)
    sets = torch.load(cache)
    arch, loss_kind = variant.split("_")
    vocab = sorted({t for it in sets["train"] for t in it["ids"]})
    index = {t: k + 1 for k, t in enumerate(vocab)}  # 0: the CTC blank
    outputs = {"qt": 1, "fire": 3, "ctc": len(vocab) + 1}[loss_kind]
    width = sets["train"][0]["feats"].shape[1]
    model = Predictor(arch, width, outputs)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)

    def counts_of(items):
        model.eval()
        pairs = []
        with torch.no_grad():
            for i in range(0, len(items), 16):
                x, mask, counts, _ = batch_of(items[i : i + 16])
                out = model(x, mask)
                if loss_kind == "qt":
                    weights = torch.sigmoid(out[..., 0]) * mask
                    guess = weights.sum(1).round().clamp(min=1)
                elif loss_kind == "fire":
                    guess = (out.argmax(-1) * mask).sum(1)
                else:
                    guess = ctc_greedy_lengths(out, mask)
                pairs += list(zip(guess.tolist(), counts.tolist()))
        model.train()
        exact = sum(g == c for g, c in pairs) / len(pairs)
        mae = sum(abs(g - c) for g, c in pairs) / len(pairs)
        bias = sum(g - c for g, c in pairs) / len(pairs)
        return [round(100 * exact, 1), round(mae, 2), round(bias, 2)]

    start, step, order = time.time(), 0, []
    while True:
        if not order:
            order = list(range(len(sets["train"])))
            random.shuffle(order)
        rows = [sets["train"][order.pop()] for _ in range(min(32, len(order)))]
        x, mask, counts, spans = batch_of(rows)
        out = model(x, mask)
        if loss_kind == "qt":
            weights = torch.sigmoid(out[..., 0]) * mask
            target, _ = span_weights(spans, mask, FRAME_RATE)
            loss = ((weights.sum(1) - counts).abs() / counts).mean()
            loss = loss + timing_loss(weights, target, mask, counts)
        elif loss_kind == "fire":
            loss = F.cross_entropy(out[mask], fire_classes(spans, mask)[mask])
        else:
            targets = torch.cat(
                [torch.tensor([index[t] for t in r["ids"]]) for r in rows]
            )
            log_probs = F.log_softmax(out.float(), -1).transpose(0, 1)
            loss = F.ctc_loss(
                log_probs, targets, mask.sum(1), counts, zero_infinity=True
            )
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        elapsed = (time.time() - start) / 60
        if step % 100 == 0 or elapsed > minutes:
            row = dict(
                step=step,
                minutes=round(elapsed, 2),
                loss=round(loss.item(), 4),
                espeak=counts_of(sets["test"]),
                piper=counts_of(sets["piper"]),
            )
            print(json.dumps(row), flush=True)
        if elapsed > minutes:
            break


def baselines(cache):
    sets = torch.load(cache)
    frames = torch.tensor([float(it["feats"].shape[0]) for it in sets["train"]])
    counts = torch.tensor([float(len(it["ids"])) for it in sets["train"]])
    design = torch.stack([frames, torch.ones_like(frames)], 1)
    slope, bias = torch.linalg.lstsq(design, counts[:, None]).solution[:, 0]
    for name in ("test", "piper"):
        items = sets[name]
        truth = torch.tensor([len(it["ids"]) for it in items])
        by_time = (
            torch.tensor([float(it["feats"].shape[0]) for it in items]) * slope
            + bias
        )
        by_time = by_time.round().clamp(min=1).long()
        by_words = torch.tensor(
            [
                len(it["text"].split())
                + sum(c in ',.;:?!"' for c in it["text"])
                for it in items
            ]
        )
        by_time = 100 * (by_time == truth).float().mean()
        by_words = 100 * (by_words == truth).float().mean()
        print(
            f"{name} exact count: duration line {by_time:.1f} %, "
            f"words + marks {by_words:.1f} %"
        )


if __name__ == "__main__":
    if sys.argv[1] == "baselines":
        baselines(sys.argv[2])
    elif sys.argv[1] == "prepare":
        prepare(*sys.argv[2:5])
    else:
        train(
            sys.argv[2],
            sys.argv[3],
            float(sys.argv[4]),
            *[int(a) for a in sys.argv[5:7]],
        )
