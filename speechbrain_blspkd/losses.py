"""Distillation loss functions shared by the objectives.

The student (LLM + PLoRA on speech input) is trained to match the teacher
(the same LLM, PLoRA off, on the transcript) at two sets of positions:

* ``input_kl``: the teacher's transcript tokens sit at positions
  ``s0 .. s0+N-1``, the student's N speech tokens at ``s0' .. s0'+N-1``. The
  distribution that predicts the token *after* transcript token ``i`` is at
  ``s0 + i`` (teacher) and ``s0' + i`` (student):
  :func:`~speechbrain_blspkd.models.positions.span_positions` ``(s0, N)``.
* ``response_kl`` / ``response_ce``: continuation tokens at ``r0 .. r0+R-1``
  are predicted by the distributions at ``r0-1 .. r0+R-2`` -- the first one
  comes from the last prompt position and must be included:
  :func:`~speechbrain_blspkd.models.positions.next_token_positions`
  ``(r0, R)``.

The speech LLM (:mod:`speechbrain_blspkd.models.positions`) gathers the
logits at those positions only; the functions here take them as ``(B, P,
V)`` tensors with a ``(B, P)`` mask.  The objectives
(:mod:`speechbrain_blspkd.objectives`) weight and combine them.

All divergences are computed in float32 whatever the input dtype, averaged
over the selected positions (not per sequence), and never scaled by ``T**2``
unless ``scale_by_t2=True`` (the classic Hinton scaling keeps gradient
magnitudes comparable across temperatures; with a fixed ``T`` it is only a
constant factor on the loss weight). Teacher inputs are detached: gradients
reach the student only.

:func:`sampled_vocabulary` picks the token ids a sampled softmax scores
(the batch's targets plus random others), e.g. for the alignment loss's
cross-entropy against the LLM embedding table, which is far cheaper than
scoring all V embeddings (for SmolLM2 V = 49,152).
"""

import math

import torch
import torch.nn.functional as F


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
    (padding of a short top-k) get ``q = 0`` and are ignored.  A tail bucket
    (the teacher's mass outside its top-k) is not modelled: at ``T != 1``
    it depends on the shape of the tail, which is not stored.

    The offline teacher of BLSP-KD (``teacher: offline``) trains with this
    loss on the log-probs that
    :mod:`speechbrain_blspkd.dataprep.teacher_topk` stores.

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


def sampled_vocabulary(ids, vocab_size, negatives=None, generator=None):
    """The token ids a sampled softmax scores: the targets plus random ones.

    Arguments
    ---------
    ids : torch.Tensor
        Target ids (any shape; every one is kept).
    vocab_size : int
        Size V of the full vocabulary.
    negatives : int, optional
        How many other ids to draw uniformly (without replacement among
        the non-targets); None: the whole vocabulary.
    generator : torch.Generator, optional
        Random source of the draw (default: torch's global one, so a run
        seeded by speechbrain is reproducible).

    Returns
    -------
    vocab : torch.Tensor
        (K,) sorted unique ids on ``ids``' device; ``ids`` map into it with
        ``torch.searchsorted(vocab, ids)``.

    Example
    -------
    >>> ids = torch.tensor([[7, 3], [3, 9]])
    >>> sampled_vocabulary(ids, 12).tolist() == list(range(12))
    True
    >>> vocab = sampled_vocabulary(ids, 12, negatives=4)
    >>> len(vocab), {3, 7, 9} <= set(vocab.tolist())
    (7, True)
    >>> torch.equal(vocab[torch.searchsorted(vocab, ids)], ids)
    True
    """
    device = ids.device
    if negatives is None:
        return torch.arange(vocab_size, device=device)
    targets = torch.unique(ids.reshape(-1))
    if targets.numel() and (
        int(targets.min()) < 0 or int(targets.max()) >= vocab_size
    ):
        raise ValueError(
            f"sampled_vocabulary: ids must be in [0, {vocab_size}), got "
            f"{int(targets.min())}..{int(targets.max())}"
        )
    is_target = torch.zeros(vocab_size, dtype=torch.bool)
    is_target[targets.cpu()] = True
    others = torch.nonzero(~is_target).squeeze(1)
    count = min(int(negatives), others.numel())
    pick = torch.randperm(others.numel(), generator=generator)[:count]
    vocab = torch.cat([targets.cpu(), others[pick]])
    return torch.sort(vocab).values.to(device)
