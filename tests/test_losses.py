"""Tests for speechbrain_blspkd.losses (KD objectives, position helpers)."""

import math

import pytest
import torch
from torch import nn

from speechbrain_blspkd.losses import (
    BLSPKDLoss,
    gather_logits,
    gather_positions,
    kd_kl,
    kd_kl_topk,
    next_token_positions,
    response_ce,
    shift_for_next_token,
    span_positions,
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


def test_response_shift_first_token_from_last_prompt_position():
    # A "model" whose logits at position p put all mass on token p + 10:
    # i.e. position p predicts exactly the token at p + 1 if seq[p+1] = p+11.
    prompt_len, resp_len, vocab = 4, 3, 32
    seq_len = prompt_len + resp_len
    seq = torch.arange(seq_len) + 10  # token at position p is p + 10
    logits = torch.full((1, seq_len, vocab), -30.0)
    for p in range(seq_len):
        logits[0, p, (p + 11) % vocab] = 30.0  # predicts the next token
    index, mask = next_token_positions([prompt_len], [resp_len])
    assert index.tolist() == [[3, 4, 5]]  # first one = last prompt position
    tidx, tmask = span_positions([prompt_len], [resp_len])
    targets = gather_positions(seq[None, :, None], tidx, tmask)[..., 0]
    assert targets.tolist() == [[14, 15, 16]]
    picked = gather_positions(logits, index, mask)
    assert float(response_ce(picked, targets, mask)) < 1e-6
    # the unshifted (off-by-one) choice would be badly wrong
    wrong = gather_positions(logits, tidx, tmask)
    assert float(response_ce(wrong, targets, tmask)) > 10
    # the mask-style helper agrees
    cont = torch.zeros(1, seq_len, dtype=torch.bool)
    cont[0, prompt_len:] = True
    shifted = shift_for_next_token(cont)
    assert shifted.nonzero()[:, 1].tolist() == [3, 4, 5]
    with pytest.raises(ValueError, match="position 0"):
        next_token_positions([0], [2])


def test_input_kl_positions_align_teacher_and_student():
    # teacher transcript at 5..7, student speech tokens at 2..4 (N = 3)
    t_idx, t_mask = span_positions([5, 1], [3, 2])
    s_idx, s_mask = span_positions([2, 4], [3, 2])
    assert t_idx.tolist() == [[5, 6, 7], [1, 2, 0]]
    assert s_idx.tolist() == [[2, 3, 4], [4, 5, 0]]
    assert torch.equal(t_mask, s_mask)
    torch.manual_seed(0)
    teacher = torch.randn(2, 9, 6)
    student = torch.randn(2, 9, 6)
    student[0, 2:5] = teacher[0, 5:8]
    student[1, 4:6] = teacher[1, 1:3]
    ts = gather_positions(teacher, t_idx, t_mask)
    ss = gather_positions(student, s_idx, s_mask)
    assert float(kd_kl(ss, ts, t_mask)) == 0.0


def test_gather_logits_only_at_positions():
    torch.manual_seed(0)
    head = nn.Linear(8, 13, bias=False)
    hidden = torch.randn(2, 6, 8)
    index, mask = span_positions([1, 3], [3, 2])
    calls = []
    out = gather_logits(
        hidden, lambda h: calls.append(h.shape[0]) or head(h), index, mask
    )
    assert calls == [5]  # 5 real positions, not 2 * 6
    full = head(hidden)
    torch.testing.assert_close(
        out[mask], gather_positions(full, index, mask)[mask]
    )
    assert torch.equal(out[~mask], torch.zeros_like(out[~mask]))
    with pytest.raises(ValueError, match="out of range"):
        gather_positions(full, torch.tensor([[6], [0]]))


def test_blspkd_loss_weights_and_errors():
    loss = BLSPKDLoss(
        {"input_kl": 1.0, "response_kl": 0.5, "response_ce": 0.0, "cif": 2.0}
    )
    called = []
    total, terms = loss(
        input_kl=torch.tensor(1.5, requires_grad=True),
        response_kl=lambda: torch.tensor(2.0),
        response_ce=lambda: called.append(1),
        cif=torch.tensor([0.25]),
    )
    assert math.isclose(total.item(), 1.5 + 1.0 + 0.5)
    assert not called
    assert set(terms) == {"input_kl", "response_kl", "cif"}
    assert all(not v.requires_grad for v in terms.values())
    assert total.requires_grad
    with pytest.raises(ValueError, match="unknown loss weight"):
        BLSPKDLoss({"input_kll": 1.0})
    with pytest.raises(ValueError, match="unknown term"):
        loss(
            input_kl=torch.tensor(1.0),
            response_kl=torch.tensor(1.0),
            cif=torch.tensor(1.0),
            bogus=torch.tensor(1.0),
        )
    with pytest.raises(ValueError, match="not given"):
        loss(input_kl=torch.tensor(1.0))
    with pytest.raises(ValueError, match=">= 0"):
        BLSPKDLoss({"cif": -1.0})
    # temperature is used by the bound helpers
    z = torch.randn(1, 2, 5)
    t = torch.randn(1, 2, 5)
    assert torch.equal(
        BLSPKDLoss(temperature=3.0).kl(z, t), kd_kl(z, t, None, 3.0)
    )
