"""Tests for speechbrain_blspkd.losses (KD divergences and cross-entropy).

The position helpers are tested in test_positions.py, the weighted
objectives in test_objectives.py.
"""

import math

import pytest
import torch
from torch import nn

from speechbrain_blspkd.losses import (
    kd_kl,
    kd_kl_topk,
    response_ce,
    sampled_vocabulary,
)


def _hand_kl(s, t, temp):
    """KL(softmax(t/T) || softmax(s/T)) for two plain lists."""
    es = [math.exp(x / temp) for x in s]
    et = [math.exp(x / temp) for x in t]
    ps = [x / sum(es) for x in es]
    pt = [x / sum(et) for x in et]
    return sum(a * math.log(a / b) for a, b in zip(pt, ps, strict=True))


def test_kd_kl_matches_hand_computation():
    s = [[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]]
    t = [[0.0, 2.0, 1.0], [3.0, 0.0, -2.0]]
    student = torch.tensor([s])
    teacher = torch.tensor([t])
    for temp in (1.0, 2.0):
        want = (_hand_kl(s[0], t[0], temp) + _hand_kl(s[1], t[1], temp)) / 2
        got = kd_kl(student, teacher, torch.ones(1, 2, dtype=torch.bool), temp)
        assert math.isclose(float(got), want, rel_tol=1e-5)
        scaled = kd_kl(student, teacher, None, temp, scale_by_t2=True)
        assert math.isclose(float(scaled), want * temp**2, rel_tol=1e-5)


def test_kd_kl_zero_for_identical_and_float32_for_bf16():
    torch.manual_seed(0)
    z = torch.randn(2, 4, 11)
    assert float(kd_kl(z, z.clone())) == 0.0
    out = kd_kl(z.bfloat16(), (z + 0.3 * torch.randn_like(z)).bfloat16())
    assert out.dtype == torch.float32 and float(out) > 0


def test_kd_kl_mask_ignores_outside_and_averages_over_positions():
    torch.manual_seed(0)
    s = torch.randn(2, 3, 5)
    t = torch.randn(2, 3, 5)
    mask = torch.tensor([[True, False, False], [True, True, True]])
    per_pos = [
        float(kd_kl(s[b, i], t[b, i], temperature=2.0))
        for b in range(2)
        for i in range(3)
        if mask[b, i]
    ]
    got = kd_kl(s, t, mask, 2.0)
    # mean over the 4 positions, not the mean of 2 per-sequence means
    assert math.isclose(float(got), sum(per_pos) / 4, rel_tol=1e-5)
    per_seq = (per_pos[0] + sum(per_pos[1:]) / 3) / 2
    assert not math.isclose(float(got), per_seq, rel_tol=1e-3)
    # garbage (even NaN) outside the mask does not matter
    s2, t2 = s.clone(), t.clone()
    s2[0, 1:] = float("nan")
    t2[0, 1:] = 1e4
    assert torch.equal(kd_kl(s2, t2, mask, 2.0), got)


def test_kd_kl_empty_mask_is_zero_with_graph():
    s = torch.randn(1, 3, 4)
    s[0, 0] = float("nan")
    s.requires_grad_(True)
    none = torch.zeros(1, 3, dtype=torch.bool)
    out = kd_kl(s, torch.randn(1, 3, 4), none)
    assert out.item() == 0.0
    ce = response_ce(s, torch.zeros(1, 3, dtype=torch.long), none)
    assert ce.item() == 0.0
    out.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_gradients_reach_student_only():
    torch.manual_seed(0)
    s = torch.randn(1, 3, 6, requires_grad=True)
    t = torch.randn(1, 3, 6, requires_grad=True)
    kd_kl(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None
    lp = torch.log_softmax(torch.randn(1, 3, 6), -1).topk(4, -1)
    tv = lp.values.clone().requires_grad_(True)
    s.grad = None
    kd_kl_topk(s, tv, lp.indices).backward()
    assert s.grad.abs().sum() > 0 and tv.grad is None


@pytest.mark.parametrize("norm", ["full", "topk"])
def test_topk_with_k_equal_v_equals_full(norm):
    torch.manual_seed(0)
    s = torch.randn(2, 4, 9)
    t = torch.randn(2, 4, 9)
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1]]).bool()
    lp, idx = torch.log_softmax(t, -1).topk(9, -1)  # k = V, sorted
    for temp in (1.0, 2.0):
        full = kd_kl(s, t, mask, temp)
        topk = kd_kl_topk(s, lp, idx, mask, temp, student_norm=norm)
        torch.testing.assert_close(topk, full, atol=1e-6, rtol=1e-6)
    # order of the stored entries does not matter
    perm = torch.randperm(9)
    torch.testing.assert_close(
        kd_kl_topk(s, lp[..., perm], idx[..., perm], mask, student_norm=norm),
        kd_kl(s, t, mask),
        atol=1e-6,
        rtol=1e-6,
    )


def test_topk_renormalisation_documented_behaviour():
    torch.manual_seed(0)
    z = torch.randn(1, 2, 20)
    lp, idx = torch.log_softmax(z, -1).topk(5, -1)
    # student == teacher: the top-k-renormalised KL is 0, the full-vocab
    # variant equals -log(tempered top-k mass of the teacher) > 0
    assert float(kd_kl_topk(z, lp, idx, student_norm="topk")) < 1e-6
    full = kd_kl_topk(z, lp, idx, temperature=2.0)
    mass = torch.softmax(z / 2.0, -1).gather(-1, idx).sum(-1)
    torch.testing.assert_close(full, (-mass.log()).mean(), atol=1e-6, rtol=1e-5)
    # -inf padding entries are ignored
    lp_pad = torch.cat([lp, torch.full_like(lp[..., :2], -math.inf)], -1)
    idx_pad = torch.cat([idx, torch.zeros_like(idx[..., :2])], -1)
    for norm in ("full", "topk"):
        torch.testing.assert_close(
            kd_kl_topk(z, lp_pad, idx_pad, student_norm=norm),
            kd_kl_topk(z, lp, idx, student_norm=norm),
        )


def test_response_ce_matches_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7)
    targets = torch.randint(0, 7, (2, 4))
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]]).bool()
    want = nn.functional.cross_entropy(logits[mask], targets[mask])
    torch.testing.assert_close(response_ce(logits, targets, mask), want)


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
