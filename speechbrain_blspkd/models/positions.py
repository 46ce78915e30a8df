"""Positions in a prompt batch: spans, next-token positions, gathering.

The one implementation of the position conventions of the speech LLM
(``docs/algorithms.md`` section 2.4): the distribution after transcript
(or speech) token ``i`` sits at ``span_start + i``; response tokens at
``r0 .. r0+R-1`` are predicted by the distributions at ``r0-1 .. r0+R-2``
(the first one from the last prompt position).  The model and the
objectives use these helpers; nothing else recomputes positions.

Authors
 * speechbrain-blspkd contributors 2025
"""

import torch
from torch import nn  # noqa: F401 (doctests)

__all__ = [
    "gather_logits",
    "gather_positions",
    "next_token_positions",
    "shift_for_next_token",
    "span_positions",
]


def _as_long(x, like=None):
    device = like.device if torch.is_tensor(like) else None
    return torch.as_tensor(x, dtype=torch.long, device=device).reshape(-1)


def span_positions(start, length, max_len=None):
    """Positions ``start .. start+length-1`` per row, padded.

    Use for ``input_kl``: the distribution after transcript (or speech)
    token ``i`` sits at ``start + i``.

    Arguments
    ---------
    start : torch.Tensor or sequence of int
        ``(B,)`` first position of the span.
    length : torch.Tensor or sequence of int
        ``(B,)`` span length.
    max_len : int, optional
        Width ``K`` of the output (default ``max(length)``).

    Returns
    -------
    index : torch.Tensor
        ``(B, K)`` long; padded entries hold 0 (a valid index).
    mask : torch.Tensor
        ``(B, K)`` bool, true for real entries.

    Example
    -------
    >>> index, mask = span_positions([3, 1], [2, 3])
    >>> index
    tensor([[3, 4, 0],
            [1, 2, 3]])
    >>> mask
    tensor([[ True,  True, False],
            [ True,  True,  True]])
    """
    start = _as_long(start, length if torch.is_tensor(length) else None)
    length = _as_long(length, start)
    if start.shape != length.shape:
        raise ValueError(
            f"start {tuple(start.shape)} and length {tuple(length.shape)} "
            "must both be (batch,)"
        )
    if (length < 0).any() or (start < 0).any():
        raise ValueError("span_positions: negative start or length")
    k = int(length.max()) if max_len is None and length.numel() else max_len
    k = k or 0
    if length.numel() and int(length.max()) > k:
        raise ValueError(f"span length {int(length.max())} > max_len {k}")
    offsets = torch.arange(k, device=start.device)
    mask = offsets[None, :] < length[:, None]
    index = torch.where(mask, start[:, None] + offsets[None, :], 0)
    return index, mask


def next_token_positions(start, length, max_len=None):
    """Positions whose distributions predict tokens ``start .. start+len-1``.

    That is ``start-1 .. start+length-2``: the first continuation token is
    predicted from the last prompt position. Use for ``response_kl`` and
    ``response_ce`` (the targets are then ``span_positions(start, length)``).

    Arguments
    ---------
    start : torch.Tensor or sequence of int
        ``(B,)`` position of the first predicted token (>= 1).
    length : torch.Tensor or sequence of int
        ``(B,)`` number of predicted tokens.
    max_len : int, optional
        Output width.

    Returns
    -------
    index, mask : torch.Tensor
        As :func:`span_positions`.

    Example
    -------
    >>> index, mask = next_token_positions([4], [3])
    >>> index
    tensor([[3, 4, 5]])
    """
    start = _as_long(start, length if torch.is_tensor(length) else None)
    if (start < 1).any():
        raise ValueError(
            "next_token_positions: the token at position 0 has no predicting "
            "position (start must be >= 1)"
        )
    return span_positions(start - 1, length, max_len)


def shift_for_next_token(target_mask):
    """Turn a mask over predicted tokens into a mask over predicting logits.

    ``out[:, t] = target_mask[:, t + 1]`` (and ``out[:, -1] = False``).

    Arguments
    ---------
    target_mask : torch.Tensor
        ``(B, L)`` bool, true at the tokens to predict (e.g. the
        continuation). Position 0 cannot be predicted.

    Returns
    -------
    torch.Tensor
        ``(B, L)`` bool, true at the positions whose logits predict them.

    Example
    -------
    >>> shift_for_next_token(torch.tensor([[False, False, True, True]]))
    tensor([[False,  True,  True, False]])
    """
    target_mask = target_mask.bool()
    if target_mask[:, 0].any():
        raise ValueError(
            "shift_for_next_token: the token at position 0 has no predicting "
            "position"
        )
    out = torch.zeros_like(target_mask)
    out[:, :-1] = target_mask[:, 1:]
    return out


def gather_positions(values, index, mask=None):
    """Pick ``values[b, index[b, k]]`` -> ``(B, K, ...)``.

    Arguments
    ---------
    values : torch.Tensor
        ``(B, L, ...)``, e.g. logits ``(B, L, V)`` or hidden states.
    index : torch.Tensor
        ``(B, K)`` long positions.
    mask : torch.Tensor, optional
        ``(B, K)`` bool; entries outside it read position 0 (their values are
        meaningless: keep passing the mask to the loss).

    Returns
    -------
    torch.Tensor
        ``(B, K, ...)``.

    Example
    -------
    >>> x = torch.arange(6.0).reshape(1, 3, 2)
    >>> gather_positions(x, torch.tensor([[2, 0]]))
    tensor([[[4., 5.],
             [0., 1.]]])
    """
    if index.dim() != 2 or index.shape[0] != values.shape[0]:
        raise ValueError(
            f"index must be (batch={values.shape[0]}, K), got "
            f"{tuple(index.shape)}"
        )
    index = index.to(device=values.device, dtype=torch.long)
    if mask is not None:
        index = index.masked_fill(~mask.to(index.device).bool(), 0)
    if index.numel() and (
        int(index.max()) >= values.shape[1] or int(index.min()) < 0
    ):
        raise ValueError(
            f"position index out of range [0, {values.shape[1]}): "
            f"{int(index.min())} .. {int(index.max())}"
        )
    rows = torch.arange(values.shape[0], device=values.device)[:, None]
    return values[rows, index]


def gather_logits(hidden, lm_head, index, mask=None):
    """Logits at selected positions only: ``lm_head(hidden[b, index[b, k]])``.

    The head runs on the ``mask``-selected rows only (entries outside the
    mask are 0), so a ``V``-wide projection costs ``O(#positions)``.

    Arguments
    ---------
    hidden : torch.Tensor
        ``(B, L, D)`` final hidden states (after the final norm, e.g.
        ``model.model(...).last_hidden_state`` of a HF causal LM).
    lm_head : callable
        Maps ``(P, D)`` to ``(P, V)``, e.g. ``model.lm_head``; wrap it in a
        function if the model post-processes logits (Gemma's
        ``final_logit_softcapping``).
    index : torch.Tensor
        ``(B, K)`` positions.
    mask : torch.Tensor, optional
        ``(B, K)`` bool.

    Returns
    -------
    torch.Tensor
        ``(B, K, V)``.

    Example
    -------
    >>> head = nn.Linear(4, 7, bias=False)
    >>> h = torch.randn(2, 5, 4)
    >>> idx, m = next_token_positions([2, 3], [2, 1])
    >>> out = gather_logits(h, head, idx, m)
    >>> out.shape
    torch.Size([2, 2, 7])
    >>> torch.allclose(out[1, 0], head(h[1, 2]))
    True
    """
    selected = gather_positions(hidden, index, mask)
    if mask is None:
        return lm_head(selected)
    mask = mask.to(selected.device).bool()
    logits = lm_head(selected[mask])
    out = logits.new_zeros(*mask.shape, logits.shape[-1])
    out[mask] = logits
    return out
