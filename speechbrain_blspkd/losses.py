"""Knowledge-distillation objectives of BLSP-KD and the position helpers.

The student (LLM + PLoRA on speech input) is trained to match the teacher
(the same LLM, PLoRA off, on the transcript) at two sets of positions:

* ``input_kl``: the teacher's transcript tokens sit at positions
  ``s0 .. s0+N-1``, the student's N speech tokens at ``s0' .. s0'+N-1``. The
  distribution that predicts the token *after* transcript token ``i`` is at
  ``s0 + i`` (teacher) and ``s0' + i`` (student):
  :func:`span_positions` ``(s0, N)``.
* ``response_kl`` / ``response_ce``: continuation tokens at ``r0 .. r0+R-1``
  are predicted by the distributions at ``r0-1 .. r0+R-2`` -- the first one
  comes from the last prompt position and must be included:
  :func:`next_token_positions` ``(r0, R)``.

:func:`gather_positions` pulls those logits out of a ``(B, L, V)`` tensor;
:func:`gather_logits` applies the LM head to the selected hidden states only,
so the ``V``-wide projection runs only at distilled positions.

All divergences are computed in float32 whatever the input dtype, averaged
over the selected positions (not per sequence), and never scaled by ``T**2``
unless ``scale_by_t2=True`` (the classic Hinton scaling keeps gradient
magnitudes comparable across temperatures; with a fixed ``T`` it is only a
constant factor on the loss weight). Teacher inputs are detached: gradients
reach the student only.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


def _check_mask(mask, logits, name="mask"):
    if mask is None:
        return torch.ones(
            logits.shape[:-1], dtype=torch.bool, device=logits.device
        )
    if tuple(mask.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"{name} has shape {tuple(mask.shape)}, expected "
            f"{tuple(logits.shape[:-1])} (the logits without the vocabulary)"
        )
    return mask.to(device=logits.device).bool()


def _kl_rows(teacher_logp, student_logp):
    """Row-wise KL(p_T || p_S) from log-probs (float32), 0 log 0 = 0."""
    p = teacher_logp.exp()
    terms = p * (teacher_logp - student_logp)
    return torch.where(p > 0, terms, torch.zeros_like(terms)).sum(-1)


def _finish(kl_rows, selected, temperature, scale_by_t2):
    if kl_rows.numel() == 0:
        # No selected position: a zero that keeps the graph connected (the
        # empty selection sums to 0 even if other positions hold NaN).
        return selected.sum() * 0.0
    loss = kl_rows.mean()
    return loss * temperature**2 if scale_by_t2 else loss


def kd_kl(
    student_logits,
    teacher_logits,
    mask=None,
    temperature=2.0,
    scale_by_t2=False,
):
    """Mean forward KL(p_T || p_S) over the masked positions.

    ``p = softmax(logits / T)``; computed in float32.

    Arguments
    ---------
    student_logits : torch.Tensor
        ``(..., V)``, e.g. ``(B, L, V)`` or gathered ``(B, K, V)``.
    teacher_logits : torch.Tensor
        Same shape; detached.
    mask : torch.Tensor, optional
        ``(...)`` bool, the positions to distil (default all).
    temperature : float
        Softmax temperature ``T``.
    scale_by_t2 : bool
        Multiply by ``T**2`` (default no).

    Returns
    -------
    torch.Tensor
        Scalar; 0 (with a graph) when the mask selects nothing.

    Example
    -------
    >>> s = torch.tensor([[[0.0, 0.0], [1.0, 2.0]]])
    >>> t = torch.tensor([[[0.0, 0.0], [5.0, 0.0]]])
    >>> kd_kl(s, t, torch.tensor([[True, False]]), temperature=1.0)
    tensor(0.)
    >>> kd_kl(s, s, temperature=2.0)
    tensor(0.)
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape"
        )
    mask = _check_mask(mask, student_logits)
    s = student_logits[mask].float() / temperature
    t = teacher_logits.detach()[mask].float() / temperature
    rows = _kl_rows(F.log_softmax(t, -1), F.log_softmax(s, -1))
    return _finish(rows, s, temperature, scale_by_t2)


def kd_kl_topk(
    student_logits,
    teacher_logprobs,
    teacher_indices,
    mask=None,
    temperature=2.0,
    scale_by_t2=False,
    student_norm="full",
):
    """KL against a teacher stored as top-k log-probs (offline KD).

    The teacher is stored per position as its ``k`` largest log-probs at
    temperature 1 and their vocabulary indices. Approximation used:

    * teacher: ``q_i = softmax_i(logp_i / T)`` over the ``k`` stored entries,
      i.e. the tempered teacher renormalised over its top-k (exact up to that
      renormalisation, since ``logp / T`` and ``logits / T`` differ by a
      constant);
    * student (``student_norm="full"``, default): log-probs at those indices
      from the *full-vocabulary* ``log_softmax(z / T)``. The loss is
      ``sum_i q_i (log q_i - log p_S,i)`` >= 0. It is minimised by a student
      that puts all its mass on the teacher's top-k, so with ``k < V`` it
      does not reach 0 at student == teacher (floor ``-log`` of the tempered
      top-k mass) and it gently pushes tail mass into the top-k.
    * ``student_norm="topk"``: the student is renormalised over the same
      ``k`` entries too: the exact KL of the two distributions conditioned on
      the top-k set (0 at student == teacher; the tail is left free).

    Both equal :func:`kd_kl` when ``k = V``. Entries with log-prob ``-inf``
    (padding of a short top-k) get ``q = 0`` and are ignored.

    Arguments
    ---------
    student_logits : torch.Tensor
        ``(..., V)``.
    teacher_logprobs : torch.Tensor
        ``(..., k)``, log-probs at temperature 1.
    teacher_indices : torch.Tensor
        ``(..., k)`` long, vocabulary indices of ``teacher_logprobs``.
    mask : torch.Tensor, optional
        ``(...)`` bool, positions to distil.
    temperature, scale_by_t2
        As in :func:`kd_kl`.
    student_norm : str
        ``"full"`` or ``"topk"`` (see above).

    Returns
    -------
    torch.Tensor
        Scalar.

    Example
    -------
    >>> z = torch.randn(1, 3, 5)
    >>> lp, idx = torch.log_softmax(z, -1).topk(5, -1)
    >>> bool(torch.isclose(kd_kl_topk(z, lp, idx), kd_kl(z, z), atol=1e-6))
    True
    """
    if student_norm not in ("full", "topk"):
        raise ValueError(
            f"student_norm must be 'full' or 'topk', got {student_norm!r}"
        )
    if teacher_logprobs.shape != teacher_indices.shape:
        raise ValueError(
            f"teacher_logprobs {tuple(teacher_logprobs.shape)} and "
            f"teacher_indices {tuple(teacher_indices.shape)} differ in shape"
        )
    if teacher_logprobs.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"teacher top-k {tuple(teacher_logprobs.shape)} does not match "
            f"student logits {tuple(student_logits.shape)} before the last dim"
        )
    mask = _check_mask(mask, student_logits)
    s = student_logits[mask].float() / temperature
    idx = teacher_indices[mask].to(device=s.device, dtype=torch.long)
    t_logp = F.log_softmax(
        teacher_logprobs.detach()[mask].float() / temperature, -1
    )
    s_sel = s.gather(-1, idx)
    if student_norm == "full":
        s_logp = s_sel - torch.logsumexp(s, -1, keepdim=True)
    else:
        # Entries the teacher padded with -inf are not part of the set.
        s_sel = s_sel.masked_fill(torch.isneginf(t_logp), -math.inf)
        s_logp = F.log_softmax(s_sel, -1)
    rows = _kl_rows(t_logp, s_logp)
    return _finish(rows, s, temperature, scale_by_t2)


def response_ce(logits, targets, mask=None):
    """Mean cross-entropy of ``targets`` under ``logits`` at masked positions.

    ``logits[..., j, :]`` must already be the distribution that predicts
    ``targets[..., j]`` (use :func:`next_token_positions` and
    :func:`gather_positions`); computed in float32.

    Arguments
    ---------
    logits : torch.Tensor
        ``(..., V)``.
    targets : torch.Tensor
        ``(...)`` long.
    mask : torch.Tensor, optional
        ``(...)`` bool.

    Returns
    -------
    torch.Tensor
        Scalar; 0 (with a graph) when the mask selects nothing.

    Example
    -------
    >>> logits = torch.tensor([[[0.0, 0.0], [9.0, -9.0]]])
    >>> round(float(response_ce(logits, torch.tensor([[0, 0]]),
    ...                         torch.tensor([[True, False]]))), 4)
    0.6931
    """
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"targets {tuple(targets.shape)} do not match logits "
            f"{tuple(logits.shape)} before the vocabulary dim"
        )
    mask = _check_mask(mask, logits)
    selected = logits[mask].float()
    if selected.shape[0] == 0:
        return selected.sum() * 0.0
    return F.cross_entropy(selected, targets[mask].long())


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


class BLSPKDLoss(nn.Module):
    """Weighted sum of the BLSP-KD loss terms.

    Arguments
    ---------
    weights : dict
        ``{term: weight}``; terms not listed have weight 0. Names must be in
        ``terms``.
    temperature : float
        ``T`` used by :meth:`kl` and :meth:`kl_topk`.
    terms : sequence of str, optional
        Allowed term names (default :attr:`TERMS`; extend it for variants).
    scale_by_t2 : bool
        Passed to the KL helpers.

    Example
    -------
    >>> loss = BLSPKDLoss({"input_kl": 1.0, "cif": 0.5, "response_ce": 0.0})
    >>> total, terms = loss(
    ...     input_kl=torch.tensor(2.0),
    ...     cif=lambda: torch.tensor(1.0),
    ...     response_ce=lambda: 1 / 0,  # weight 0: never evaluated
    ... )
    >>> total
    tensor(2.5000)
    >>> sorted(terms)
    ['cif', 'input_kl']
    """

    TERMS = ("input_kl", "response_kl", "response_ce", "cif", "align")
    DEFAULT_WEIGHTS = {
        "input_kl": 1.0,
        "response_kl": 1.0,
        "response_ce": 0.0,
        "cif": 1.0,
    }

    def __init__(
        self, weights=None, temperature=2.0, terms=None, scale_by_t2=False
    ):
        super().__init__()
        self.terms = tuple(terms) if terms is not None else self.TERMS
        weights = dict(self.DEFAULT_WEIGHTS if weights is None else weights)
        unknown = sorted(set(weights) - set(self.terms))
        if unknown:
            raise ValueError(
                f"BLSPKDLoss: unknown loss weight(s) {unknown}; known terms "
                f"are {list(self.terms)}"
            )
        for name, w in weights.items():
            if not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise ValueError(
                    f"BLSPKDLoss: weight {name}={w!r} must be a finite "
                    "number >= 0"
                )
        self.weights = {k: float(v) for k, v in weights.items()}
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.scale_by_t2 = scale_by_t2

    def active(self, name):
        """Whether term ``name`` has a nonzero weight (compute it only then)."""
        if name not in self.terms:
            raise ValueError(f"BLSPKDLoss: unknown term {name!r}")
        return self.weights.get(name, 0.0) != 0.0

    def kl(self, student_logits, teacher_logits, mask=None):
        """:func:`kd_kl` at this loss's temperature."""
        return kd_kl(
            student_logits,
            teacher_logits,
            mask,
            self.temperature,
            self.scale_by_t2,
        )

    def kl_topk(
        self, student_logits, teacher_logprobs, teacher_indices, mask=None
    ):
        """:func:`kd_kl_topk` at this loss's temperature."""
        return kd_kl_topk(
            student_logits,
            teacher_logprobs,
            teacher_indices,
            mask,
            self.temperature,
            self.scale_by_t2,
        )

    def forward(self, **terms):
        """Weighted total of the given terms.

        Arguments
        ---------
        **terms : torch.Tensor or callable
            Scalar tensors, or zero-argument callables returning one (called
            only when the weight is nonzero). Every term with a nonzero
            weight must be given.

        Returns
        -------
        total : torch.Tensor
            Scalar.
        values : dict
            ``{term: detached scalar}`` of the computed terms.
        """
        unknown = sorted(set(terms) - set(self.terms))
        if unknown:
            raise ValueError(
                f"BLSPKDLoss: unknown term(s) {unknown}; known terms are "
                f"{list(self.terms)}"
            )
        missing = sorted(
            n for n, w in self.weights.items() if w != 0.0 and n not in terms
        )
        if missing:
            raise ValueError(
                f"BLSPKDLoss: term(s) {missing} have nonzero weight but were "
                "not given"
            )
        total, values = None, {}
        for name, term in terms.items():
            weight = self.weights.get(name, 0.0)
            if weight == 0.0:
                continue
            value = term() if callable(term) else term
            if not torch.is_tensor(value) or value.numel() != 1:
                raise ValueError(
                    f"BLSPKDLoss: term {name} must be a scalar tensor"
                )
            value = value.reshape(())
            values[name] = value.detach()
            total = weight * value if total is None else total + weight * value
        if total is None:
            raise ValueError("BLSPKDLoss: every given term has weight 0")
        return total, values
