"""Measurement script (kept in git history only): choose the count among N^-2..N^+2 by the adapter's confidence and the LLM's score of the snapped tokens."""
import sys, time, pathlib, torch, torch.nn.functional as F
from speechbrain_blspkd.hearing.measure import resolve_model_folder
from speechbrain_blspkd.hearing.sets import english_rows
from speechbrain_blspkd.hearing.batches import by_duration, encoded_batches
from speechbrain_blspkd.inference.speech_llm import SpeechLLM
from speechbrain_blspkd.nnet.adapter import AdapterTargets
torch.set_grad_enabled(False)
model_dir, synth = sys.argv[1], pathlib.Path(sys.argv[2])
nmax = int(sys.argv[3]) if len(sys.argv) > 3 else 48
model = SpeechLLM.from_hparams(source=resolve_model_folder(model_dir), run_opts={"device": "cpu"}).model
model.eval()
table, _ = model.embedding_table("cpu")
llm = model.llm
rows = english_rows(synth / "test.csv", synth, nmax)
D = (-2, -1, 0, 1, 2)
prefix = model.transcript_ids(["Transcript:"])[0]
def lm_score(seq):
    x = torch.tensor([prefix + seq])
    lp = llm(input_ids=x).logits[0].log_softmax(-1)
    P = len(prefix)
    return sum(lp[P - 1 + i, t].item() for i, t in enumerate(seq))
res = {}
t0 = time.time()
for chunk, feats, feat_lens in encoded_batches(model, by_duration(rows), 8, 16000, None):
    ids = model.transcript_ids([r["transcript"] for r in chunk])
    free = model.encode_speech(feats=feats, feat_lens=feat_lens)
    nhat = free.token_counts.clone()
    cands = {}
    for d in D:
        num = (nhat + d).clamp(min=1)
        out = model.encode_speech(feats=feats, feat_lens=feat_lens, targets=AdapterTargets(num_tokens=num))
        for b in range(len(chunk)):
            n = int(num[b])
            v = F.normalize(out.tokens[b, :n].float(), dim=-1) @ table.T
            mx, arg = v.max(-1)
            lp = (v / 0.05).log_softmax(-1).max(-1).values
            seq = arg.tolist()
            cands.setdefault(b, []).append(dict(n=n, seq=seq, cos=mx.mean().item(), lp=lp.mean().item(), lps=lp.sum().item(), lm=lm_score(seq)))
    for b in range(len(chunk)):
        tgt = ids[b]; N = len(tgt)
        def acc(c): return sum(int(a == t) for a, t in zip(c["seq"], tgt))
        base = cands[b][D.index(0)]
        choices = {
            "pred": base,
            "oracle": max(cands[b], key=lambda c: (c["n"] == N, acc(c))),
            "cos": max(cands[b], key=lambda c: c["cos"]),
            "lp": max(cands[b], key=lambda c: c["lp"]),
            "lm/n": max(cands[b], key=lambda c: c["lm"] / c["n"]),
            "lm+lps": max(cands[b], key=lambda c: c["lm"] + c["lps"]),
            "lm+lps0.5": max(cands[b], key=lambda c: 0.5*c["lm"] + c["lps"]),
            "lm+cos": max(cands[b], key=lambda c: c["lm"]/c["n"] + 5*c["cos"]),
        }
        for k, c in choices.items():
            r = res.setdefault(k, [0, 0, 0, 0])
            r[0] += acc(c); r[1] += N; r[2] += int(c["n"] == N); r[3] += 1
print(len(rows), "clips", f"{time.time()-t0:.0f}s")
for k, (h, n, e, u) in res.items():
    print(f"  {k:10s} acc {100*h/n:5.1f}  exact {100*e/u:5.1f}")
