"""The ``whisper`` term: CIF token states pulled towards Whisper's decoder.

Whisper's decoder, teacher-forced on the transcript over the same encoder
output the adapter reads, gives one 512-d vector per LLM transcript token
(span-pooled, stored once per clip by
:mod:`speechbrain_blspkd.dataprep.whisper_targets`).  This term pulls the
CFormer's post-CIF token states (``CFormerOutput.token_hidden``: after the
post layers' final norm, before the projection into the LLM space) towards
them, position by position at the true token count: a dense target from a
reader that already works, instead of a 49k-way class learned from scratch.

``loss = mean over real positions of (1 - cos(P h, t))
+ mse_weight * mean((P h - t)^2) / var(t)``, with ``P`` an objective-owned
linear map from the adapter width to the target width when they differ
(identity when equal, e.g. Whisper-base's 512 for the recipe's CFormer).
The map belongs to the objective (trained and checkpointed with it, never
exported); nothing here runs at inference.

The targets reach the objective through the training loop's data seam
(:meth:`~speechbrain_blspkd.objectives.Objective.data_items`):
:func:`whisper_target_items` gives the dynamic item that reads each
utterance's targets (batch item ``whisper_target``, a list of
:class:`StoredWhisperTarget`).

Authors
 * speechbrain-blspkd contributors 2026
"""

import dataclasses

import speechbrain as sb
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DATA_KEY",
    "StoredWhisperTarget",
    "WhisperTargetHead",
    "whisper_target_items",
]

#: The batch item holding the stored targets.
DATA_KEY = "whisper_target"


@dataclasses.dataclass(frozen=True)
class StoredWhisperTarget:
    """The stored targets of one utterance.

    Arguments
    ---------
    uid : str
        The utterance (named in errors).
    states : torch.Tensor
        (N, d) float16 targets, one per LLM transcript token.

    Example
    -------
    >>> StoredWhisperTarget("u1", torch.zeros(3, 8)).count
    3
    """

    uid: str
    states: torch.Tensor

    @property
    def count(self):
        """Number of LLM tokens N."""
        return int(self.states.shape[0])


class WhisperTargetHead(nn.Module):
    """The map from the adapter's token states to the targets, and the loss.

    Arguments
    ---------
    input_size : int
        Width of the adapter's token states (the CFormer's width d).
    target_size : int
        Width of the targets (Whisper's ``d_model``: 512 for Whisper-base).
    mse_weight : float
        Weight of the MSE (over the targets' variance) beside ``1 - cos``.

    Example
    -------
    >>> head = WhisperTargetHead(8, 8)
    >>> isinstance(head.proj, nn.Identity), head.trainable()
    (True, False)
    >>> hidden = torch.randn(2, 3, 8)
    >>> mask = torch.tensor([[True, True, True], [True, False, False]])
    >>> rows = [StoredWhisperTarget("a", hidden[0]), StoredWhisperTarget("b",
    ...     hidden[1, :1])]
    >>> float(head.loss(hidden, mask, rows)) < 1e-6
    True
    >>> WhisperTargetHead(6, 8).trainable()
    True
    """

    def __init__(self, input_size, target_size, mse_weight=0.0):
        super().__init__()
        if mse_weight < 0:
            raise ValueError("WhisperTargetHead: mse_weight must be >= 0")
        if int(input_size) == int(target_size):
            self.proj = nn.Identity()
        else:
            self.proj = nn.Linear(int(input_size), int(target_size))
        self.target_size = int(target_size)
        self.mse_weight = float(mse_weight)

    def trainable(self):
        """Whether the head has weights of its own (widths differ)."""
        return any(p.requires_grad for p in self.parameters())

    def loss(self, hidden, token_mask, rows):
        """Mean ``1 - cos`` (+ weighted MSE) over the real positions.

        Arguments
        ---------
        hidden : torch.Tensor
            (B, Nmax, input_size) token states.
        token_mask : torch.Tensor
            (B, Nmax) bool, True for the positions the adapter emitted.
        rows : list of StoredWhisperTarget
            One per batch row; row ``b`` must hold as many targets as the
            adapter emitted for it (the true count).

        Returns
        -------
        torch.Tensor
            Scalar.
        """
        counts = token_mask.sum(1).tolist()
        if len(rows) != len(counts):
            raise ValueError(
                f"whisper term: {len(rows)} stored targets for a batch of "
                f"{len(counts)}"
            )
        for row, count in zip(rows, counts):
            if row is None:
                raise ValueError("whisper term: a batch row has no targets")
            if row.count != count or row.states.shape[1] != self.target_size:
                raise ValueError(
                    f"whisper term: utterance {row.uid!r} has "
                    f"{tuple(row.states.shape)} stored targets, the adapter "
                    f"emitted {count} tokens for targets of width "
                    f"{self.target_size}; the term needs the true count "
                    "(training) and targets written for this LLM tokenizer"
                )
        pred = self.proj(hidden[token_mask].float())
        target = torch.cat([row.states for row in rows]).to(pred.device)
        target = target.float()
        loss = (1 - F.cosine_similarity(pred, target, dim=-1)).mean()
        if self.mse_weight:
            var = target.var().clamp(min=1e-8)
            loss = loss + self.mse_weight * ((pred - target) ** 2).mean() / var
        return loss


def whisper_target_items(model, dataset, folder, source=None):
    """The dynamic item that reads each utterance's stored targets.

    Checks the cache in ``folder`` against ``model`` first (features of its
    encoder, its LLM tokenizer and transcript separator:
    :class:`~speechbrain_blspkd.dataprep.whisper_targets.
    StaleWhisperTargetsError` otherwise) and that every row of
    ``dataset`` is stored (``KeyError`` naming the missing utterances).
    The item then checks each utterance's target count against the model's
    tokenisation of its transcript (``ValueError`` naming it).

    Arguments
    ---------
    model : speechbrain_blspkd.models.speech_llm.SpeechLLMModel
        The model being trained.
    dataset : speechbrain.dataio.dataset.DynamicItemDataset
        The stage's training rows.
    folder : str or pathlib.Path
        The target cache.
    source : str, optional
        The manifest the rows come from (named in errors).

    Returns
    -------
    list
        One speechbrain dynamic item providing ``whisper_target``.
    """
    from speechbrain_blspkd.dataprep.whisper_targets import (
        WhisperTargetCache,
        reader_settings,
    )

    cache = WhisperTargetCache(folder, reader_settings(model))
    missing = [uid for uid in dataset.data_ids if uid not in cache]
    if missing:
        where = f" of {source}" if source else ""
        raise KeyError(
            f"{len(missing)} of {len(dataset.data_ids)} utterances{where} "
            f"have no Whisper targets in {cache.folder} (e.g. {missing[:3]}); "
            "write them with prepare_whisper_targets or `python -m "
            "speechbrain_blspkd.dataprep.whisper_targets`"
        )

    @sb.utils.data_pipeline.takes("id", "transcript")
    @sb.utils.data_pipeline.provides(DATA_KEY)
    def stored_targets(uid, transcript):
        states = cache.get(uid)
        if states is None:
            raise KeyError(
                f"utterance {uid!r} has no Whisper targets in {cache.folder}"
            )
        count = len(model.prompts.transcript_ids(transcript))
        if states.shape[0] != count:
            raise ValueError(
                f"utterance {uid!r}: {states.shape[0]} Whisper targets in "
                f"{cache.folder}, but its transcript has {count} LLM tokens "
                "(the transcript changed since they were written); rebuild "
                "them (overwrite=True / --overwrite)"
            )
        return StoredWhisperTarget(uid, states)

    return [stored_targets]
