"""Measurement script (kept in git history only): top-k of the adapter's cosine logits, and snapping fused with the LLM's own next-token scores (beam 4)."""
import sys, time, pathlib, torch, torch.nn.functional as F
from speechbrain_blspkd.hearing.measure import resolve_model_folder
from speechbrain_blspkd.hearing.sets import english_rows
from speechbrain_blspkd.hearing.batches import by_duration, encoded_batches
from speechbrain_blspkd.inference.speech_llm import SpeechLLM
from speechbrain_blspkd.nnet.adapter import AdapterTargets
from speechbrain_blspkd.dataprep.unseen_engine import default_folder
torch.set_grad_enabled(False)
model_dir, synth = sys.argv[1], pathlib.Path(sys.argv[2])
nmax = int(sys.argv[3]) if len(sys.argv) > 3 else 48
model = SpeechLLM.from_hparams(source=resolve_model_folder(model_dir), run_opts={"device": "cpu"}).model
model.eval()
table, _ = model.embedding_table("cpu")
llm = model.llm
sets = {"espeak": english_rows(synth / "test.csv", synth, nmax)}
pf = default_folder(synth)
if (pf / "test.csv").exists():
    sets["piper"] = english_rows(pf / "test.csv", pf, nmax)
tok = model.prompts.tokenizer if hasattr(model.prompts, "tokenizer") else None

def lm_beam(logp_ac, beam, lam, start_ids, topk=20):
    """logp_ac: (N, V) adapter log-probs. Beam over positions, LM fused."""
    N = logp_ac.shape[0]
    cand_lp, cand_id = logp_ac.topk(topk, -1)
    beams = [(0.0, [])]
    ctx = torch.tensor([start_ids])
    out = llm(input_ids=ctx, use_cache=True)
    past0, lm0 = out.past_key_values, out.logits[0, -1].log_softmax(-1)
    states = [(0.0, [], past0, lm0)]
    for i in range(N):
        new = []
        for score, seq, past, lm in states:
            s = score + cand_lp[i] + lam * lm[cand_id[i]]
            for j in range(topk):
                new.append((s[j].item(), seq + [cand_id[i, j].item()], past, lm))
        new.sort(key=lambda x: -x[0])
        new = new[:beam]
        if i == N - 1:
            return new[0][1]
        # advance LM for each kept beam (batched)
        import copy
        nxt = []
        for score, seq, past, lm in new:
            o = llm(input_ids=torch.tensor([[seq[-1]]]), past_key_values=copy.deepcopy(past), use_cache=True)
            nxt.append((score, seq, o.past_key_values, o.logits[0, -1].log_softmax(-1)))
        states = nxt
    return []

start = model.transcript_ids(["\n"])[0] if False else None
for name, rows in sets.items():
    order = by_duration(rows)
    stats = {}
    t0 = time.time()
    for chunk, feats, feat_lens in encoded_batches(model, order, 8, 16000, None):
        ids = model.transcript_ids([r["transcript"] for r in chunk])
        num = torch.tensor([len(x) for x in ids])
        told = model.encode_speech(feats=feats, feat_lens=feat_lens, targets=AdapterTargets(num_tokens=num))
        free = model.encode_speech(feats=feats, feat_lens=feat_lens)
        for tag, out in (("true", told), ("pred", free)):
            for b in range(len(chunk)):
                n = int(out.token_counts[b]); tgt = ids[b]
                v = F.normalize(out.tokens[b, :n].float(), dim=-1) @ table.T
                logp = (v / 0.05).log_softmax(-1)
                top = v.topk(20, -1).indices
                m = min(n, len(tgt))
                for k in (1, 5, 20):
                    if tag == "true":
                        stats.setdefault(f"top{k}", []).extend(
                            [int(tgt[i] in top[i, :k].tolist()) for i in range(m)])
                res = {"snap": top[:, 0].tolist()}
                for lam in (0.3, 0.6, 1.0):
                    res[f"lm{lam}"] = lm_beam(logp, 4, lam, model.transcript_ids(["Transcript:"])[0])
                for key, seq in res.items():
                    hits = sum(int(a == c) for a, c in zip(seq, tgt))
                    stats.setdefault(f"{tag}_{key}", []).append((hits, len(tgt)))
    print(name, len(rows), "clips", f"{time.time()-t0:.0f}s")
    for k, v in stats.items():
        if k.startswith("top"):
            print(f"  {k}: {100*sum(v)/len(v):.1f}")
        else:
            print(f"  {k}: {100*sum(h for h,_ in v)/sum(n for _,n in v):.1f}")
