"""CTC over the LLM vocabulary: a frame-level guide for a CIF adapter.

The alignment loss (:func:`speechbrain_blspkd.objectives.blsp_kd.
alignment_loss`) supervises the CIF outputs only, so the frames before CIF
learn what a token is only through the integration.  CTC gives those frames
their own sequence-level supervision, without an alignment: each frame
(the channels CIF integrates, ``CFormerOutput.frames``) is projected into
the LLM embedding space and scored against the LLM input embeddings by
cosine / temperature, plus one learned blank vector; CTC then marginalises
over every monotonic path that spells the transcript's LLM tokens.  The
output layer is tied to the frozen LLM embedding table (the projection is
the only new weight besides the blank), so what the frames learn is the
same token geometry that the speech tokens must reach.

Scoring every frame against all V embeddings costs ``T x V x D`` per
utterance (for SmolLM2 V = 49,152: several times the rest of an
alignment step on a CPU).  :func:`sampled_vocabulary` restricts the
softmax to the batch's own tokens plus ``negatives`` tokens drawn at random
(a sampled softmax, as in large-vocabulary language modelling); with
``negatives=None`` the whole vocabulary is used.  The same restriction is
offered to the alignment loss.

Greedy CTC decoding gives a token count per utterance
(:func:`ctc_greedy_counts`: collapse repeats, drop blanks), a second
estimate of N beside CIF's ``sum(alpha)``.

Nothing here is used at inference: the head belongs to the objective
(checkpointed with it, not exported).

Authors
 * speechbrain-blspkd contributors 2026
"""

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "VocabCTCHead",
    "ctc_greedy_counts",
    "sampled_vocabulary",
]


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


class VocabCTCHead(nn.Module):
    """Frame projection + blank vector; CTC against the LLM embeddings.

    Arguments
    ---------
    input_size : int
        Width of the frames (``CFormer``: encoder width - 1).
    embedding_size : int
        Width D of the LLM embeddings.
    temperature : float
        Divides the cosine logits.
    negatives : int, optional
        Sampled-softmax size (:func:`sampled_vocabulary`); None: all V.

    Example
    -------
    >>> head = VocabCTCHead(6, 4, negatives=None)
    >>> table = F.normalize(torch.randn(10, 4), dim=-1)
    >>> frames = torch.randn(2, 9, 6)
    >>> mask = torch.tensor([[True] * 9, [True] * 6 + [False] * 3])
    >>> ids = torch.tensor([[1, 2, 3], [4, 5, 0]])
    >>> id_mask = torch.tensor([[True] * 3, [True, True, False]])
    >>> loss = head.loss(frames, mask, ids, id_mask, table)
    >>> bool(loss > 0), loss.requires_grad
    (True, True)
    """

    def __init__(
        self, input_size, embedding_size, temperature=0.05, negatives=None
    ):
        super().__init__()
        if temperature <= 0:
            raise ValueError("VocabCTCHead: temperature must be > 0")
        if negatives is not None and int(negatives) < 0:
            raise ValueError("VocabCTCHead: negatives must be >= 0 or None")
        self.proj = nn.Linear(input_size, embedding_size)
        self.blank = nn.Parameter(
            torch.randn(embedding_size) / embedding_size**0.5
        )
        self.temperature = float(temperature)
        self.negatives = None if negatives is None else int(negatives)

    def log_probs(self, frames, table, vocab=None):
        """(B, T, 1 + K) log-probabilities; index 0 is the blank.

        Arguments
        ---------
        frames : torch.Tensor
            (B, T, input_size).
        table : torch.Tensor
            (V, D) unit-norm LLM embeddings.
        vocab : torch.Tensor, optional
            (K,) ids scored (default: all V).
        """
        rows = table if vocab is None else table[vocab]
        keys = torch.cat([F.normalize(self.blank, dim=-1)[None], rows])
        query = F.normalize(self.proj(frames.float()), dim=-1)
        return F.log_softmax(query @ keys.T / self.temperature, dim=-1)

    def loss(self, frames, frame_mask, ids, id_mask, table):
        """Mean CTC loss of the batch (per target token, as in
        ``torch.nn.functional.ctc_loss(reduction="mean")``).

        Arguments
        ---------
        frames : torch.Tensor
            (B, T, input_size) frame features.
        frame_mask : torch.Tensor
            (B, T) bool, True for real frames.
        ids : torch.Tensor
            (B, N) LLM token ids of the transcripts.
        id_mask : torch.Tensor
            (B, N) bool, True for real tokens.
        table : torch.Tensor
            (V, D) unit-norm LLM embeddings (frozen).

        Returns
        -------
        torch.Tensor
            Scalar; utterances that CTC cannot spell (fewer frames than
            the path needs) contribute zero (``zero_infinity``).
        """
        ids = ids.to(frames.device)
        id_mask = id_mask.to(frames.device)
        targets = ids[id_mask]
        vocab = sampled_vocabulary(targets, table.shape[0], self.negatives)
        log_probs = self.log_probs(frames, table, vocab)
        labels = torch.searchsorted(vocab, targets) + 1
        return F.ctc_loss(
            log_probs.transpose(0, 1),
            labels,
            input_lengths=frame_mask.sum(1),
            target_lengths=id_mask.sum(1),
            blank=0,
            reduction="mean",
            zero_infinity=True,
        )


def ctc_greedy_counts(log_probs, frame_mask, blank=0):
    """Tokens of the greedy CTC path of each utterance.

    The best class of each real frame, repeats collapsed, blanks removed.

    Arguments
    ---------
    log_probs : torch.Tensor
        (B, T, C) frame scores.
    frame_mask : torch.Tensor
        (B, T) bool, True for real frames.
    blank : int
        The blank class.

    Returns
    -------
    torch.Tensor
        (B,) long.

    Example
    -------
    >>> best = torch.tensor([[0, 5, 5, 0, 2, 0, 2, 2]])
    >>> scores = F.one_hot(best, 6).float()
    >>> ctc_greedy_counts(scores, torch.ones(1, 8, dtype=torch.bool)).tolist()
    [3]
    """
    best = log_probs.argmax(-1)
    previous = torch.cat([torch.full_like(best[:, :1], -1), best[:, :-1]], 1)
    new = (best != previous) & (best != blank) & frame_mask
    return new.sum(1)
