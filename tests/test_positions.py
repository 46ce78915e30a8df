"""Tests for speechbrain_blspkd.models.positions (span and next-token
positions, gathering)."""

import pytest
import torch
from torch import nn

from speechbrain_blspkd.losses import kd_kl, response_ce
from speechbrain_blspkd.models.positions import (
    gather_logits,
    gather_positions,
    next_token_positions,
    shift_for_next_token,
    span_positions,
)


def test_response_shift_first_token_from_last_prompt_position():
    # A "model" whose logits at position p put all mass on token p + 11:
    # i.e. position p predicts exactly the token at p + 1 (seq[p] = p + 10).
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
    with pytest.raises(ValueError, match="position 0"):
        shift_for_next_token(torch.tensor([[True, False]]))


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
    # a span shifted by one position does not match
    s_bad, _ = span_positions([3, 4], [3, 2])
    assert float(kd_kl(gather_positions(student, s_bad), ts, t_mask)) > 0


def test_span_positions_width_tensor_inputs_and_errors():
    index, mask = span_positions(torch.tensor([1, 0]), torch.tensor([2, 0]), 4)
    assert index.tolist() == [[1, 2, 0, 0], [0, 0, 0, 0]]
    assert mask.tolist() == [[True, True, False, False], [False] * 4]
    assert index.dtype == torch.long
    with pytest.raises(ValueError, match="max_len"):
        span_positions([0], [3], max_len=2)
    with pytest.raises(ValueError, match="negative"):
        span_positions([-1], [2])
    with pytest.raises(ValueError, match="negative"):
        span_positions([1], [-2])
    with pytest.raises(ValueError, match=r"\(batch,\)"):
        span_positions([1, 2], [3])


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
    # without a mask every listed position is projected
    torch.testing.assert_close(
        gather_logits(hidden, head, index), gather_positions(full, index)
    )
    with pytest.raises(ValueError, match="out of range"):
        gather_positions(full, torch.tensor([[6], [0]]))
    with pytest.raises(ValueError, match="index must be"):
        gather_positions(full, torch.tensor([0, 1]))
    # out-of-range entries outside the mask read position 0 (no error)
    far = torch.tensor([[99], [2]])
    picked = gather_positions(full, far, torch.tensor([[False], [True]]))
    assert torch.equal(picked[0, 0], full[0, 0])
    assert torch.equal(picked[1, 0], full[1, 2])
