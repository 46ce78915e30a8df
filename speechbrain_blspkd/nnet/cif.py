"""Continuous integrate-and-fire (CIF) without a Python loop over time.

CIF turns T encoder frames into N tokens: walking over the frames, it
accumulates the per-frame weights alpha_t; whenever the accumulator reaches
the threshold beta a token fires whose value is the alpha-weighted sum of the
frames integrated since the previous fire. A frame that crosses the threshold
is split (the part needed to reach beta closes the current token, the rest
opens the next one) and a frame with alpha > beta fires several tokens. The
token index is clamped at N - 1, so the last token takes whatever is left.

The same result has a closed form. With c_t = sum_{s<=t} alpha_s / beta (a
float64 cumulative sum), frame t covers the interval [c_{t-1}, c_t] and token
k the interval [k, k + 1) ([N - 1, inf) for the last token); the weight of
frame t in token k is beta times the length of their overlap. Each frame only
overlaps the few tokens its interval touches, so :func:`cif` adds every
weighted frame to its first token and then only the (frame, token) pairs of
frames that cross a token boundary (about N per utterance), with two
``index_add`` calls instead of a dense (B, N, T) matrix: memory and time are
O(B (T + N) C).

Authors
 * speechbrain-blspkd contributors 2025
"""

import torch

__all__ = [
    "boundary_error",
    "cif",
    "fire_positions",
    "quantity_loss",
    "scale_alphas",
    "span_weights",
    "timing_loss",
]


def _check_num_tokens(num_tokens, batch, device, name="num_tokens"):
    """Returns ``num_tokens`` as a (B,) long tensor on ``device``."""
    num_tokens = torch.as_tensor(num_tokens, device=device)
    if num_tokens.dim() != 1 or num_tokens.shape[0] != batch:
        raise ValueError(
            f"cif: `{name}` must have shape ({batch},), "
            f"got {tuple(num_tokens.shape)}"
        )
    if num_tokens.is_floating_point():
        if not torch.equal(num_tokens, num_tokens.round()):
            raise ValueError(f"cif: `{name}` must hold whole numbers")
    return num_tokens.long()


def _overlap(c_prev, c_next, token, last_token, threshold):
    """Length of [c_prev, c_next] within [token, token + 1) (float64).

    The last token (``token == last_token``) extends to infinity. The result
    is multiplied by ``threshold`` (the token axis is in threshold units).
    """
    token_f = token.to(torch.float64)
    lower = torch.maximum(c_prev, token_f)
    upper = torch.where(
        token == last_token, c_next, torch.minimum(c_next, token_f + 1.0)
    )
    return (upper - lower).clamp(min=0.0) * threshold


def cif(hidden, alphas, num_tokens, threshold=1.0):
    """Integrates frames into exactly ``num_tokens`` tokens per utterance.

    Arguments
    ---------
    hidden : torch.Tensor
        Frames to integrate, (B, T, C).
    alphas : torch.Tensor
        Non-negative per-frame weights, (B, T), already masked (zero on
        padding) and usually scaled with :func:`scale_alphas` so that each
        row sums to ``num_tokens * threshold``.
    num_tokens : torch.Tensor
        Number of tokens N of each utterance, (B,) integers >= 1.
    threshold : float
        Firing threshold beta (> 0).

    Returns
    -------
    tokens : torch.Tensor
        (B, max(N), C) in the dtype of ``hidden``; token k of row b is
        sum_t W[b, k, t] * hidden[b, t] and rows k >= N_b are zero.
    token_mask : torch.Tensor
        (B, max(N)) bool, True for the N_b real tokens of row b.

    Example
    -------
    >>> hidden = torch.tensor([[[1.0], [2.0], [3.0], [4.0]]])
    >>> alphas = torch.tensor([[0.5, 0.75, 0.5, 0.25]])
    >>> tokens, token_mask = cif(hidden, alphas, torch.tensor([2]))
    >>> tokens.squeeze(-1)  # 0.5*1 + 0.5*2 and 0.25*2 + 0.5*3 + 0.25*4
    tensor([[1.5000, 3.0000]])
    >>> token_mask
    tensor([[True, True]])
    """
    if hidden.dim() != 3:
        raise ValueError(
            f"cif: `hidden` must be (B, T, C), got {tuple(hidden.shape)}"
        )
    batch, time, channels = hidden.shape
    if alphas.shape != (batch, time):
        raise ValueError(
            f"cif: `alphas` must be (B, T) = ({batch}, {time}), "
            f"got {tuple(alphas.shape)}"
        )
    if not threshold > 0:
        raise ValueError(f"cif: `threshold` must be > 0, got {threshold}")
    device = hidden.device
    num_tokens = _check_num_tokens(num_tokens, batch, device)
    if batch == 0:
        return hidden.new_zeros(0, 0, channels), torch.zeros(
            0, 0, dtype=torch.bool, device=device
        )
    if bool((num_tokens < 1).any()):
        raise ValueError(
            f"cif: every `num_tokens` must be >= 1, got {num_tokens.tolist()}"
        )
    n_max = int(num_tokens.max())
    token_mask = (
        torch.arange(n_max, device=device)[None, :] < num_tokens[:, None]
    )
    if time == 0:
        return hidden.new_zeros(batch, n_max, channels), token_mask

    # Frame t covers [c_prev_t, c_t] on the token axis (unit = threshold).
    # Both ends come from the same float64 cumsum, so adjacent frames share
    # their boundary exactly and no weight is lost or counted twice.
    scaled = alphas.to(torch.float64) / threshold
    cum = torch.cumsum(scaled, dim=1)
    if not bool(torch.isfinite(cum[:, -1]).all()):
        raise ValueError("cif: `alphas` contain inf or NaN")
    cum0 = torch.nn.functional.pad(cum, (1, 0))
    c_prev, c_next = cum0[:, :-1], cum0[:, 1:]

    # Tokens overlapped by each frame: first..last (clamped at N - 1).
    last_token = (num_tokens - 1)[:, None].expand(batch, time).reshape(-1)
    c_prev, c_next = c_prev.reshape(-1), c_next.reshape(-1)
    first = torch.minimum(torch.floor(c_prev.detach()).long(), last_token)
    last = torch.minimum(torch.ceil(c_next.detach()).long() - 1, last_token)
    extra = (last - first).clamp(min=0)
    row = torch.arange(batch, device=device).repeat_interleave(time)

    # Every frame gives to its first token (no gather of the frames) ...
    acc_dtype = torch.promote_types(hidden.dtype, torch.float32)
    frames = hidden.reshape(batch * time, channels).to(acc_dtype)
    weight = _overlap(c_prev, c_next, first, last_token, threshold)
    tokens = hidden.new_zeros(batch * n_max, channels, dtype=acc_dtype)
    tokens = tokens.index_add(
        0, row * n_max + first, frames * weight.to(acc_dtype)[:, None]
    )

    # ... and the frames that cross token boundaries (about N per row) give
    # to the further tokens: one row per such (frame, token) pair.
    frame = torch.repeat_interleave(
        torch.arange(batch * time, device=device), extra
    )
    if frame.numel():
        starts = torch.cumsum(extra, 0) - extra
        offset = torch.arange(frame.shape[0], device=device) - starts[frame]
        token = first[frame] + offset + 1
        weight = _overlap(
            c_prev[frame], c_next[frame], token, last_token[frame], threshold
        )
        tokens = tokens.index_add(
            0,
            row[frame] * n_max + token,
            frames[frame] * weight.to(acc_dtype)[:, None],
        )
    tokens = tokens.reshape(batch, n_max, channels).to(hidden.dtype)
    return tokens, token_mask


def scale_alphas(alphas, num_tokens, threshold=1.0):
    """Rescales each row of ``alphas`` to sum to ``num_tokens * threshold``.

    A row whose weights sum to zero stays zero (no division by zero, no NaN
    gradient).

    Arguments
    ---------
    alphas : torch.Tensor
        Masked non-negative weights, (B, T).
    num_tokens : torch.Tensor
        Target token counts, (B,).
    threshold : float
        Firing threshold of :func:`cif`.

    Returns
    -------
    torch.Tensor
        alphas * N * threshold / sum_t alphas, (B, T), dtype of ``alphas``.

    Example
    -------
    >>> scale_alphas(torch.tensor([[0.5, 0.25, 0.25], [0.0, 0.0, 0.0]]),
    ...              torch.tensor([4, 2]))
    tensor([[2., 1., 1.],
            [0., 0., 0.]])
    """
    if alphas.dim() != 2:
        raise ValueError(
            f"scale_alphas: `alphas` must be (B, T), got {tuple(alphas.shape)}"
        )
    num_tokens = _check_num_tokens(num_tokens, alphas.shape[0], alphas.device)
    work = alphas.to(torch.promote_types(alphas.dtype, torch.float32))
    total = work.sum(dim=1, keepdim=True)
    positive = total > 0
    safe_total = torch.where(positive, total, torch.ones_like(total))
    target = num_tokens[:, None].to(work.dtype) * threshold
    factor = torch.where(positive, target / safe_total, torch.zeros_like(total))
    return (work * factor).to(alphas.dtype)


def quantity_loss(alphas, mask, num_tokens):
    """CIF quantity loss: mean over the batch of |sum_t alpha_t / N - 1|.

    Arguments
    ---------
    alphas : torch.Tensor
        Unscaled weights, (B, T).
    mask : torch.Tensor or None
        (B, T) bool or float mask of the real frames (None: all real).
    num_tokens : torch.Tensor
        Target token counts N, (B,) >= 1.

    Returns
    -------
    torch.Tensor
        Scalar loss (float32 or wider).

    Example
    -------
    >>> alphas = torch.tensor([[0.5, 0.5, 0.9], [1.0, 1.0, 1.0]])
    >>> mask = torch.tensor([[True, True, False], [True, True, True]])
    >>> quantity_loss(alphas, mask, torch.tensor([2, 3]))  # (0.5 + 0) / 2
    tensor(0.2500)
    """
    if alphas.dim() != 2:
        raise ValueError(
            f"quantity_loss: `alphas` must be (B, T), got {tuple(alphas.shape)}"
        )
    num_tokens = _check_num_tokens(num_tokens, alphas.shape[0], alphas.device)
    if bool((num_tokens < 1).any()):
        raise ValueError("quantity_loss: every `num_tokens` must be >= 1")
    work = alphas.to(torch.promote_types(alphas.dtype, torch.float32))
    if mask is not None:
        if mask.shape != alphas.shape:
            raise ValueError(
                f"quantity_loss: `mask` shape {tuple(mask.shape)} differs "
                f"from `alphas` shape {tuple(alphas.shape)}"
            )
        work = work * mask.to(work.dtype)
    ratio = work.sum(dim=1) / num_tokens.to(work.dtype)
    return (ratio - 1.0).abs().mean()


def fire_positions(alphas, threshold=1.0, tolerance=1e-6):
    """Frame index at which each token fires (for plots and diagnostics).

    Token k fires at the first frame t where the running sum of alphas
    reaches (k + 1) * threshold (within ``tolerance``, so that scaled alphas
    summing to N up to round-off fire N tokens). A frame whose alpha spans
    several levels fires several tokens (its index repeats). The running sum
    is taken in float64 whatever the dtype of ``alphas``.

    Arguments
    ---------
    alphas : torch.Tensor or sequence of float
        Masked, non-negative weights: (B, T) for a batch or (T,) for one
        utterance (a list of floats is accepted too).
    threshold : float
        Firing threshold (> 0).
    tolerance : float
        Slack on each crossing, in units of ``threshold``.

    Returns
    -------
    torch.Tensor
        For (B, T) input: (B, K) long, K the largest number of fires in the
        batch; -1 where a row fires fewer than K tokens. For (T,) input:
        (K,) long, the frame of each fired token in order.

    Example
    -------
    >>> fire_positions(torch.tensor([[0.5, 0.75, 0.5, 0.25], [2., 0, 0, 0]]))
    tensor([[1, 3],
            [0, 0]])
    >>> fire_positions([0.5, 0.6, 0.2, 0.9, 0.4]).tolist()
    [1, 3]
    """
    if not torch.is_tensor(alphas):
        try:
            alphas = torch.as_tensor(alphas, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(
                "fire_positions: `alphas` must be a tensor or a sequence "
                "of numbers"
            ) from err
    if threshold <= 0:
        raise ValueError(
            f"fire_positions: `threshold` must be > 0, got {threshold}"
        )
    if alphas.dim() == 1:
        return fire_positions(alphas[None], threshold, tolerance)[0]
    if alphas.dim() != 2:
        raise ValueError(
            "fire_positions: `alphas` must be (B, T) or (T,), "
            f"got {tuple(alphas.shape)}"
        )
    cum = torch.cumsum(alphas.detach().to(torch.float64), dim=1) / threshold
    if cum.shape[1] == 0:
        return torch.zeros(
            cum.shape[0], 0, dtype=torch.long, device=alphas.device
        )
    fired = torch.floor(cum[:, -1] + tolerance).long()
    n_max = int(fired.max()) if fired.numel() else 0
    levels = torch.arange(1, n_max + 1, device=alphas.device)
    levels = levels.to(torch.float64)[None, :].expand(cum.shape[0], -1)
    position = torch.searchsorted(cum.contiguous(), levels - tolerance)
    valid = levels <= fired[:, None].to(torch.float64)
    return torch.where(valid, position, torch.full_like(position, -1))


def span_weights(token_spans, frame_mask, frame_rate, min_frames=1.0):
    """Target CIF weights from token time spans: each token's unit of
    weight spread evenly over its span.

    Frame ``t`` covers ``[t, t + 1)`` frames; token ``k`` with span
    ``[s, e)`` seconds gives frame ``t`` the share of its span that the
    frame covers, so each row's weights sum to its number of tokens and
    the running sum crosses ``k + 1`` where token ``k``'s span ends (CIF
    fires token ``k`` there).  A span shorter than ``min_frames`` is
    widened to that length from its start; spans are clipped to the real
    frames.

    Arguments
    ---------
    token_spans : torch.Tensor
        (B, N, 2) start and end of each token in seconds; rows padded with
        any value beyond ``num_tokens`` (given by ``token_mask``).
    frame_mask : torch.Tensor
        (B, T) bool, True for real frames.
    frame_rate : float
        Frames per second of ``frame_mask``.
    min_frames : float
        Shortest span, in frames.

    Returns
    -------
    weights : torch.Tensor
        (B, T) float32, zero on padding frames.
    token_mask : torch.Tensor
        (B, N) bool: the spans that count (end >= start >= 0; padding
        spans are marked by a negative start).

    Example
    -------
    >>> spans = torch.tensor([[[0.0, 0.1], [0.1, 0.3]]])
    >>> w, _ = span_weights(spans, torch.ones(1, 4, dtype=torch.bool), 10.0)
    >>> w.tolist()
    [[1.0, 0.5, 0.5, 0.0]]
    """
    if token_spans.dim() != 3 or token_spans.shape[-1] != 2:
        raise ValueError(
            "span_weights: `token_spans` must be (B, N, 2), got "
            f"{tuple(token_spans.shape)}"
        )
    batch, time = frame_mask.shape
    if token_spans.shape[0] != batch:
        raise ValueError(
            f"span_weights: {token_spans.shape[0]} span rows for a batch of "
            f"{batch}"
        )
    spans = token_spans.to(frame_mask.device, torch.float32) * frame_rate
    token_mask = spans[..., 0] >= 0
    frames = frame_mask.sum(1).to(torch.float32)[:, None]
    start = torch.minimum(spans[..., 0].clamp(min=0.0), frames)
    end = torch.maximum(spans[..., 1], start + min_frames)
    end = torch.minimum(end, frames)
    start = torch.minimum(start, (end - min_frames).clamp(min=0.0))
    width = (end - start).clamp(min=1e-6)
    edges = torch.arange(time, device=frame_mask.device, dtype=torch.float32)
    lower = torch.maximum(edges[None, None, :], start[..., None])
    upper = torch.minimum(edges[None, None, :] + 1.0, end[..., None])
    share = (upper - lower).clamp(min=0.0) / width[..., None]
    share = share * token_mask[..., None].to(share.dtype)
    weights = share.sum(1) * frame_mask.to(share.dtype)
    return weights, token_mask


def timing_loss(alphas, target, mask=None, num_tokens=None):
    """Where the running sums of predicted and target weights differ.

    ``sum_t |C_t - C*_t| / N`` per utterance, averaged over the batch, with
    ``C`` and ``C*`` the running sums of the (unscaled) predicted and the
    target weights: the area between the two running sums, which is the
    mean distance, in frames, between where each token fires under the
    prediction and under the target (a one-dimensional earth mover's
    distance).  It is zero exactly when the weights equal the target, and
    it teaches both where tokens fire and how many fire in each stretch
    (a frame's gradient carries the signed error of every later running
    sum), where a per-frame L1 against a flat ``1 / |span|`` target only
    sees each frame alone.

    Arguments
    ---------
    alphas : torch.Tensor
        (B, T) predicted weights (unscaled).
    target : torch.Tensor
        (B, T) target weights (:func:`span_weights`).
    mask : torch.Tensor, optional
        (B, T) bool, True for real frames (None: all).
    num_tokens : torch.Tensor, optional
        (B,) token counts (default: the target's sums).

    Returns
    -------
    torch.Tensor
        Scalar (frames per token).

    Example
    -------
    >>> target = torch.tensor([[0.0, 1.0, 0.0, 1.0]])
    >>> float(timing_loss(target.clone(), target))
    0.0
    >>> float(timing_loss(torch.tensor([[1.0, 0.0, 0.0, 1.0]]), target))
    0.5
    """
    if alphas.shape != target.shape or alphas.dim() != 2:
        raise ValueError(
            "timing_loss: `alphas` and `target` must both be (B, T), got "
            f"{tuple(alphas.shape)} and {tuple(target.shape)}"
        )
    work = alphas.to(torch.promote_types(alphas.dtype, torch.float32))
    goal = target.to(work.dtype)
    if mask is not None:
        real = mask.to(work.dtype)
        work, goal = work * real, goal * real
    if num_tokens is None:
        counts = goal.sum(1).round().clamp(min=1)
    else:
        counts = torch.as_tensor(num_tokens, device=work.device).to(work.dtype)
    gap = (work.cumsum(1) - goal.cumsum(1)).abs()
    if mask is not None:
        gap = gap * real
    return (gap.sum(1) / counts.clamp(min=1)).mean()


def boundary_error(alphas, target, num_tokens, frame_rate):
    """Mean distance, in milliseconds, between where each token fires
    under the predicted weights scaled to the true count and under the
    target weights.

    Arguments
    ---------
    alphas : torch.Tensor
        (B, T) predicted weights (masked, unscaled).
    target : torch.Tensor
        (B, T) target weights (:func:`span_weights`).
    num_tokens : torch.Tensor
        (B,) true counts.
    frame_rate : float
        Frames per second.

    Returns
    -------
    float

    Example
    -------
    >>> t = torch.tensor([[0.0, 1.0, 0.0, 1.0]])
    >>> boundary_error(torch.tensor([[1.0, 0.0, 0.0, 1.0]]), t,
    ...                torch.tensor([2]), 10.0)
    50.0
    """
    scaled = scale_alphas(alphas.detach().float(), num_tokens)
    fired = fire_positions(scaled, tolerance=1e-4)
    wanted = fire_positions(target.detach().float(), tolerance=1e-4)
    width = min(fired.shape[1], wanted.shape[1])
    fired, wanted = fired[:, :width], wanted[:, :width]
    valid = (fired >= 0) & (wanted >= 0)
    if not bool(valid.any()):
        return 0.0
    diff = (fired - wanted).abs().to(torch.float64)[valid]
    return float(diff.mean()) * 1000.0 / frame_rate


def token_windows(scaled, frame_mask, num_tokens, window, threshold=1.0):
    """Which frames each integrated token may attend to: its own stretch of
    frames (where the running sum of ``scaled`` passes from ``i`` to
    ``i + 1`` thresholds) widened by ``window`` frames on each side.

    No library offers this mask: it is the CIF's own segmentation, turned
    into a cross-attention mask so that a token reads the frames it was
    integrated from and their neighbours, not the whole utterance.

    Arguments
    ---------
    scaled : torch.Tensor
        (B, T) weights as integrated (:func:`scale_alphas`: row ``b`` sums
        to ``num_tokens[b] * threshold``).
    frame_mask : torch.Tensor
        (B, T) bool, True on real frames.
    num_tokens : torch.Tensor
        (B,) token counts N.
    window : int
        Frames added on each side of a token's stretch.
    threshold : float
        CIF threshold.

    Returns
    -------
    torch.Tensor
        (B, max N, T) bool, True where token ``i`` may attend to frame
        ``t``.  Every row has at least one True (rows past ``N`` see every
        real frame), so an attention over it is never empty.

    Example
    -------
    >>> scaled = torch.tensor([[0.5, 0.5, 0.5, 0.5, 0.0]])
    >>> mask = torch.tensor([[True, True, True, True, False]])
    >>> token_windows(scaled, mask, torch.tensor([2]), window=0).int()
    tensor([[[1, 1, 0, 0, 0],
             [0, 0, 1, 1, 0]]], dtype=torch.int32)
    >>> token_windows(scaled, mask, torch.tensor([2]), window=1).int()
    tensor([[[1, 1, 1, 0, 0],
             [0, 1, 1, 1, 0]]], dtype=torch.int32)
    """
    batch, frames = scaled.shape
    n_max = int(num_tokens.max())
    with torch.no_grad():
        # float64, as cif() and fire_positions() sum: the stretches end
        # exactly where those fire
        weights = scaled.detach().to(torch.float64)
        after = weights.cumsum(1)
        before = after - weights
        level = torch.arange(n_max, device=scaled.device, dtype=after.dtype)
        level = (level * threshold)[None].expand(batch, n_max).contiguous()
        eps = 1e-4 * threshold
        # first frame whose running sum passes i thresholds, and the frame
        # where it reaches i + 1
        start = torch.searchsorted(after.contiguous(), level + eps)
        end = torch.searchsorted(before.contiguous(), level + threshold - eps)
        end = end - 1
        last = frame_mask.sum(1, keepdim=True) - 1
        start = torch.minimum(start, last).clamp(min=0)
        end = torch.maximum(torch.minimum(end, last), start)
        t = torch.arange(frames, device=scaled.device)
        inside = (t[None, None] >= (start - window)[..., None]) & (
            t[None, None] <= (end + window)[..., None]
        )
        real = torch.arange(n_max, device=scaled.device)[None] < num_tokens[
            :, None
        ].to(scaled.device)
        inside = inside | ~real[..., None]
        return inside & frame_mask[:, None, :]
