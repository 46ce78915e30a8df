"""CTC over the LLM vocabulary and the sampled softmax (issue: hearing)."""

import pytest
import speechbrain as sb
import torch
import torch.nn.functional as F

from speechbrain_blspkd.nnet.adapter import AdapterTargets
from speechbrain_blspkd.nnet.cif import cif
from speechbrain_blspkd.objectives import BLSPKDObjective
from speechbrain_blspkd.objectives.blsp_kd import alignment_loss
from speechbrain_blspkd.objectives.vocab_ctc import (
    VocabCTCHead,
    ctc_greedy_counts,
    sampled_vocabulary,
)
from speechbrain_blspkd.utils.testing import tiny_speech_llm


def test_sampled_vocabulary_keeps_every_target_and_draws_the_rest():
    ids = torch.tensor([[5, 1, 5], [9, 2, 0]])
    gen = torch.Generator().manual_seed(0)
    vocab = sampled_vocabulary(ids, 40, negatives=10, generator=gen)
    assert len(vocab) == 5 + 10
    assert set(ids.flatten().tolist()) <= set(vocab.tolist())
    assert torch.equal(vocab, torch.sort(vocab).values)
    assert len(set(vocab.tolist())) == len(vocab)
    # asking for more negatives than exist: the whole vocabulary
    assert sampled_vocabulary(ids, 12, negatives=100).tolist() == list(
        range(12)
    )
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        sampled_vocabulary(torch.tensor([3, 8]), 8, negatives=2)


def test_ctc_with_every_negative_equals_the_full_vocabulary_ctc():
    torch.manual_seed(0)
    table = F.normalize(torch.randn(30, 8), dim=-1)
    frames = torch.randn(2, 12, 6)
    frame_mask = torch.ones(2, 12, dtype=torch.bool)
    frame_mask[1, 9:] = False
    ids = torch.tensor([[3, 7, 7, 20], [11, 4, 0, 0]])
    id_mask = torch.tensor([[True] * 4, [True, True, False, False]])
    full = VocabCTCHead(6, 8, negatives=None)
    sampled = VocabCTCHead(6, 8, negatives=1000)
    sampled.load_state_dict(full.state_dict())
    a = full.loss(frames, frame_mask, ids, id_mask, table)
    b = sampled.loss(frames, frame_mask, ids, id_mask, table)
    assert torch.allclose(a, b, atol=1e-5)
    # and the full one is torch's CTC over [blank] + table
    keys = torch.cat([F.normalize(full.blank, dim=-1)[None], table])
    query = F.normalize(full.proj(frames), dim=-1)
    log_probs = F.log_softmax(query @ keys.T / full.temperature, -1)
    expected = F.ctc_loss(
        log_probs.transpose(0, 1),
        torch.tensor([4, 8, 8, 21, 12, 5]),
        torch.tensor([12, 9]),
        torch.tensor([4, 2]),
        zero_infinity=True,
    )
    assert torch.allclose(a, expected, atol=1e-5)
    # a few negatives only: a different (smaller-vocabulary) loss
    few = VocabCTCHead(6, 8, negatives=2)
    few.load_state_dict(full.state_dict())
    few_loss = few.loss(frames, frame_mask, ids, id_mask, table)
    assert float(few_loss.detach()) < float(a.detach())


def test_ctc_and_cif_agree_on_counts_in_a_hand_built_case():
    # seven frames; CIF weights that fire three times, and CTC posteriors
    # whose best path spells three tokens with spikes on the same frames
    alphas = torch.tensor([[0.5, 0.6, 0.1, 0.9, 0.2, 0.7, 0.0]])
    integrated = torch.randn(1, 7, 4)
    count = int(alphas.sum().round())
    tokens, token_mask = cif(integrated, alphas, torch.tensor([count]))
    best = torch.tensor([[0, 5, 0, 2, 0, 7, 0]])
    scores = F.one_hot(best, 9).float().log_softmax(-1)
    ctc = ctc_greedy_counts(scores, torch.ones(1, 7, dtype=torch.bool))
    assert int(token_mask.sum()) == count == int(ctc[0]) == 3
    # a repeated label over two frames is one token; padding frames count
    # for nothing
    best = torch.tensor([[0, 5, 5, 0, 2, 0, 7, 7]])
    mask = torch.tensor([[True] * 6 + [False] * 2])
    scores = F.one_hot(best, 9).float()
    assert ctc_greedy_counts(scores, mask).tolist() == [2]


def test_objective_ctc_term_trains_the_frames_before_cif():
    torch.manual_seed(0)
    model = tiny_speech_llm(whisper=False)
    objective = BLSPKDObjective(
        {"cif": 1.0, "align": 1.0, "ctc": 0.5},
        ctc=dict(input_size=63, embedding_size=64, negatives=20),
        align_negatives=20,
    )
    names = {n for n, _ in objective.named_parameters()}
    assert {"ctc_head.proj.weight", "ctc_head.blank"} <= names
    assert len(objective.trainable_parameters()) == 3
    out = model(
        ["the cat sat", "a dog"],
        feats=torch.randn(2, 40, 64),
        feat_lens=torch.tensor([1.0, 0.7]),
        request=objective.request(sb.Stage.TRAIN),
    )
    loss, stats = objective(out, model, sb.Stage.TRAIN)
    assert {"ctc", "align", "cif"} <= set(stats)
    assert stats["ctc"] > 0
    loss.backward()
    pre = model.adapter.pre_layers[0].linear1.weight.grad
    assert pre is not None and float(pre.abs().sum()) > 0
    assert objective.ctc_head.proj.weight.grad is not None
    # weight but no settings: refused up front; settings but no weight: no
    # idle head
    with pytest.raises(ValueError, match="ctc term needs"):
        BLSPKDObjective({"ctc": 1.0})
    idle = BLSPKDObjective(
        {"align": 1.0}, ctc=dict(input_size=63, embedding_size=64)
    )
    assert idle.ctc_head is None and not idle.trainable_parameters()


def test_alignment_loss_sampled_equals_full_when_every_token_is_drawn():
    torch.manual_seed(0)
    model = tiny_speech_llm(whisper=False)
    out = model.adapter(
        torch.randn(2, 20, 64), targets=AdapterTargets(torch.tensor([3, 2]))
    )
    ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    mask = torch.tensor([[True] * 3, [True, True, False]])
    vocab = model.embed_tokens.weight.shape[0]
    full, _ = alignment_loss(model, out, ids, transcript_mask=mask)
    same, _ = alignment_loss(
        model, out, ids, transcript_mask=mask, negatives=vocab
    )
    fewer, _ = alignment_loss(
        model, out, ids, transcript_mask=mask, negatives=3
    )
    assert torch.allclose(full, same, atol=1e-5)
    assert float(fewer.detach()) < float(full.detach())  # fewer competitors
