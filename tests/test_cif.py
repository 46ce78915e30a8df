"""Tests of the loop-free CIF against a plain integrate-and-fire loop."""

import pytest
import torch

from speechbrain_blspkd.nnet.cif import (
    cif,
    fire_positions,
    quantity_loss,
    scale_alphas,
)


def reference_cif(hidden, alphas, num_tokens, threshold=1.0):
    """Integrate-and-fire one frame at a time (one utterance, float64).

    ``hidden`` (T, C), ``alphas`` (T,), ``num_tokens`` int -> (N, C).
    """
    hidden = hidden.double()
    tokens = torch.zeros(num_tokens, hidden.shape[1], dtype=torch.float64)
    index, accumulated = 0, 0.0
    for t in range(hidden.shape[0]):
        remaining = float(alphas[t])
        # Fire as long as this frame fills the current token (never fire the
        # last token: it takes everything that is left).
        while index < num_tokens - 1 and accumulated + remaining >= threshold:
            part = threshold - accumulated
            tokens[index] += part * hidden[t]
            remaining -= part
            index += 1
            accumulated = 0.0
        tokens[index] += remaining * hidden[t]
        accumulated += remaining
    return tokens


def random_batch(lengths, channels, num_tokens, spiky=False, seed=0):
    """Random frames and scaled, masked alphas for a padded batch."""
    gen = torch.Generator().manual_seed(seed)
    batch, time = len(lengths), max(lengths)
    hidden = torch.randn(batch, time, channels, generator=gen)
    alphas = torch.rand(batch, time, generator=gen)
    if spiky:  # a few frames well above the threshold
        spikes = torch.rand(batch, time, generator=gen) < 0.2
        alphas = alphas + 4.0 * spikes * torch.rand(batch, time, generator=gen)
    mask = torch.arange(time)[None, :] < torch.tensor(lengths)[:, None]
    alphas = alphas * mask
    num_tokens = torch.tensor(num_tokens)
    return hidden, scale_alphas(alphas, num_tokens), num_tokens


CASES = [
    # lengths, num_tokens, spiky
    ([7, 5, 3], [3, 2, 1], False),
    ([12, 12], [5, 12], True),
    ([10, 4], [1, 1], False),  # N = 1
    ([1, 1], [1, 3], False),  # T = 1 (one frame fires several tokens)
    ([20, 9, 15], [6, 9, 2], True),  # alpha > 1 everywhere it spikes
    ([6, 6], [18, 3], False),  # N > T: every frame fires 3 tokens
]


@pytest.mark.parametrize("lengths,num_tokens,spiky", CASES)
def test_matches_reference_loop(lengths, num_tokens, spiky):
    hidden, alphas, n = random_batch(lengths, 4, num_tokens, spiky, seed=1)
    tokens, token_mask = cif(hidden.double(), alphas.double(), n)
    assert tokens.shape == (len(lengths), max(num_tokens), 4)
    assert token_mask.dtype == torch.bool
    assert token_mask.sum(1).tolist() == num_tokens
    for b, (length, count) in enumerate(zip(lengths, num_tokens)):
        expected = reference_cif(hidden[b, :length], alphas[b, :length], count)
        torch.testing.assert_close(tokens[b, :count], expected)
        assert torch.all(tokens[b, count:] == 0)


def test_long_sequence_matches_reference():
    hidden, alphas, n = random_batch([3000, 2500], 3, [400, 160], seed=2)
    tokens, _ = cif(hidden, alphas, n)
    for b, length in enumerate([3000, 2500]):
        expected = reference_cif(
            hidden[b, :length], alphas[b, :length].double(), int(n[b])
        )
        count = int(n[b])
        torch.testing.assert_close(
            tokens[b, :count].double(), expected, rtol=1e-4, atol=1e-4
        )


def test_threshold_other_than_one():
    hidden, alphas, n = random_batch([9, 6], 2, [4, 2], seed=3)
    alphas = alphas.double() * 0.5
    tokens, _ = cif(hidden.double(), alphas, n, threshold=0.5)
    for b, length in enumerate([9, 6]):
        expected = reference_cif(
            hidden[b, :length], alphas[b, :length], int(n[b]), threshold=0.5
        )
        torch.testing.assert_close(tokens[b, : int(n[b])], expected)


def test_unscaled_alphas_leave_tokens_partial():
    # sum(alpha) = 1.5 < N = 3: token 1 gets half a frame, token 2 nothing.
    hidden = torch.ones(1, 3, 1)
    tokens, _ = cif(hidden, torch.tensor([[0.5, 0.5, 0.5]]), torch.tensor([3]))
    assert tokens.flatten().tolist() == [1.0, 0.5, 0.0]


def test_last_token_takes_remainder():
    # sum(alpha) = 3.5 > N = 2: the last token takes 2.5 of the weight.
    hidden = torch.ones(1, 2, 1)
    tokens, _ = cif(hidden, torch.tensor([[2.0, 1.5]]), torch.tensor([2]))
    assert tokens.flatten().tolist() == [1.0, 2.5]


def test_batch_independence():
    lengths, counts = [11, 30, 4], [4, 9, 2]
    hidden, alphas, n = random_batch(lengths, 5, counts, spiky=True, seed=4)
    batched, _ = cif(hidden, alphas, n)
    for b, (length, count) in enumerate(zip(lengths, counts)):
        single, mask = cif(
            hidden[b : b + 1, :length], alphas[b : b + 1, :length], n[b : b + 1]
        )
        assert mask.shape == (1, count)
        torch.testing.assert_close(batched[b : b + 1, :count], single)
    # More padding frames (zero weight, any content) change nothing either.
    padded_hidden = torch.cat([hidden, torch.randn(3, 7, 5)], dim=1)
    padded_alphas = torch.nn.functional.pad(alphas, (0, 7))
    padded, _ = cif(padded_hidden, padded_alphas, n)
    torch.testing.assert_close(padded, batched)


def test_gradcheck_float64():
    hidden, alphas, n = random_batch([6, 4], 3, [3, 2], spiky=True, seed=5)
    hidden = hidden.double().requires_grad_()
    # Padding enters through the mask (alpha = 0 is a one-sided kink of the
    # overlap length, which finite differences cannot check).
    mask = (alphas > 0).double()
    raw = (alphas.double() + (1 - mask)).requires_grad_()

    def fn(h, a):
        return cif(h, a * mask, n)[0]

    assert torch.autograd.gradcheck(fn, (hidden, raw))


def test_gradients_reach_scaling_and_alphas():
    raw = torch.rand(2, 8, dtype=torch.float64, requires_grad=True)
    hidden = torch.randn(2, 8, 3, dtype=torch.float64, requires_grad=True)
    n = torch.tensor([3, 5])
    assert torch.autograd.gradcheck(
        lambda h, a: cif(h, scale_alphas(a, n), n)[0], (hidden, raw)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtype_preserved(dtype):
    hidden, alphas, n = random_batch([40, 25], 6, [8, 5], seed=6)
    tokens, _ = cif(hidden.to(dtype), alphas.to(dtype), n)
    assert tokens.dtype == dtype
    expected, _ = cif(hidden.double(), alphas.double(), n)
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(
        tokens.double(), expected, rtol=tol, atol=tol * 4
    )
    hidden = hidden.to(dtype).requires_grad_()
    alphas = alphas.to(dtype).requires_grad_()
    cif(hidden, alphas, n)[0].sum().backward()
    assert hidden.grad.dtype == dtype and alphas.grad.dtype == dtype


def test_rejects_bad_arguments():
    hidden, alphas = torch.zeros(2, 3, 4), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="num_tokens"):
        cif(hidden, alphas, torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="alphas"):
        cif(hidden, torch.zeros(2, 4), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="NaN"):
        cif(hidden, torch.full((2, 3), float("nan")), torch.tensor([1, 1]))


def test_scale_alphas():
    alphas = torch.tensor([[0.2, 0.3, 0.0], [0.0, 0.0, 0.0], [1.0, 3.0, 4.0]])
    raw = alphas.clone().requires_grad_()
    scaled = scale_alphas(raw, torch.tensor([2, 4, 1]))
    torch.testing.assert_close(scaled.sum(1), torch.tensor([2.0, 0.0, 1.0]))
    torch.testing.assert_close(scaled[0], torch.tensor([0.8, 1.2, 0.0]))
    torch.testing.assert_close(scaled[2], alphas[2] / 8.0)
    scaled.sum().backward()
    assert torch.isfinite(raw.grad).all()


def test_quantity_loss():
    alphas = torch.tensor([[0.5, 1.0, 9.0], [2.0, 2.0, 2.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    n = torch.tensor([3, 4])
    # |1.5 / 3 - 1| = 0.5 and |6 / 4 - 1| = 0.5
    torch.testing.assert_close(
        quantity_loss(alphas, mask, n), torch.tensor(0.5)
    )
    torch.testing.assert_close(
        quantity_loss(alphas, None, n),
        torch.tensor((abs(10.5 / 3 - 1) + 0.5) / 2),
    )
    exact = quantity_loss(alphas, mask, torch.tensor([1.5, 6.0]).round())
    assert exact > 0  # rounded counts 2 and 6: 0.25 / 2
    torch.testing.assert_close(exact, torch.tensor(0.125))


def test_fire_positions_match_reference_fires():
    _, alphas, n = random_batch([15, 10], 1, [5, 3], spiky=True, seed=7)
    positions = fire_positions(alphas)
    for b in range(2):
        running, fires = 0.0, []
        for t, a in enumerate(alphas[b].tolist()):
            running += a
            while len(fires) < int(n[b]) and running >= len(fires) + 1 - 1e-6:
                fires.append(t)
        got = [p for p in positions[b].tolist() if p >= 0]
        assert got == fires


def test_fire_positions_one_utterance():
    # (T,) input (tensor or list): the frames of the fired tokens, in order
    alphas = torch.tensor([0.3, 0.3, 0.5, 0.1, 0.9, 0.2, 1.7])
    # cumsum: .3 .6 1.1 1.2 2.1 2.3 4.0 -> fires at 2, 4, 6, 6
    assert fire_positions(alphas).tolist() == [2, 4, 6, 6]
    assert fire_positions(alphas.tolist()).tolist() == [2, 4, 6, 6]
    assert fire_positions([0.2, 0.2]).tolist() == []
    assert fire_positions([]).tolist() == []
    # scaled alphas summing to N up to rounding still fire N times
    assert len(fire_positions(torch.full((30,), 0.1))) == 3
    # float64 running sum 1.9999999999999998: fires 2 only with the slack
    rounded = [0.2, 0.2, 0.1, 0.1, 0.7, 0.7]
    assert fire_positions(rounded).tolist() == [4, 5]
    assert fire_positions(rounded, tolerance=0.0).tolist() == [4]
    assert fire_positions([0.6, 0.6], threshold=0.5).tolist() == [0, 1]
    # a row of a batch and the same utterance alone agree
    batch = torch.stack([alphas, torch.zeros(7)])
    assert fire_positions(batch)[0].tolist() == [2, 4, 6, 6]
    assert fire_positions(batch)[1].tolist() == [-1, -1, -1, -1]


def test_fire_positions_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(B, T\) or \(T,\)"):
        fire_positions(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="threshold"):
        fire_positions([0.5], threshold=0.0)
    with pytest.raises(ValueError, match="sequence of numbers"):
        fire_positions(["a", "b"])


def test_token_windows_cover_each_tokens_fire_frame():
    from speechbrain_blspkd.nnet.cif import (
        fire_positions,
        scale_alphas,
        token_windows,
    )

    torch.manual_seed(0)
    mask = torch.ones(3, 40, dtype=torch.bool)
    mask[1, 25:] = False
    mask[2, 9:] = False
    n = torch.tensor([9, 5, 2])
    alphas = torch.rand(3, 40) * mask
    scaled = scale_alphas(alphas, n)
    windows = token_windows(scaled, mask, n, window=0)
    assert windows.shape == (3, 9, 40)
    assert not windows[~mask[:, None, :].expand_as(windows)].any()
    for b in range(3):
        fires = fire_positions(scaled[b][mask[b]]).tolist()
        assert len(fires) == int(n[b])
        for i, t in enumerate(fires):
            assert windows[b, i, t], (b, i, t)
            # a token's own stretch is contiguous and ends where it fires
            frames = windows[b, i].nonzero().flatten().tolist()
            assert frames == list(range(frames[0], frames[-1] + 1))
            assert frames[-1] == t
        # rows past the count see every real frame
        assert torch.equal(
            windows[b, int(n[b]) :], mask[b].expand(9 - int(n[b]), -1)
        )
    wide = token_windows(scaled, mask, n, window=2)
    assert (wide >= windows).all() and wide.sum() > windows.sum()
