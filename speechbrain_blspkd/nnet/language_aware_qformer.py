"""Language-aware Q-Former: a bank of queries per language, picked by a gate.

The adapter of language-aware distillation (LAD; ``docs/algorithms.md``
section 2.7).  It is DiVA's :class:`~speechbrain_blspkd.nnet.qformer.QFormer`
(Whisper decoder layers over learned queries, cross-attending to the
encoder frames) with its one set of queries replaced by a **query bank**:
one set of L queries per language, K x L x d in all.  A **gating network**
reads the encoder frames and predicts language logits g (B, K); the
queries of an utterance are chosen from the bank with them:

* ``gating: soft``: Q = sum_k softmax(g)_k Q_k (a mixture);
* ``gating: hard``: Q = Q_argmax(g), one bank entry exactly, with a
  **straight-through estimator**: the forward pass uses the selected entry
  only, the backward pass gives the gate the gradient of the soft mixture
  (Q_sel + M - stop_grad(M), M = sum_k softmax(g)_k stop_grad(Q_k)), so the
  distillation losses reach the gate while only the selected entry is
  updated by them.

Two gates, chosen with ``gate``: ``conv``, a convolutional language-ID
network, and ``attention``, attention pooling then an MLP (both in
:mod:`speechbrain_blspkd.nnet.language_gate`; padding never changes a row's
logits).

**Scheduled teacher forcing.** In training, when the batch's true languages
are given (``AdapterTargets.language``), each utterance uses the bank entry
of its true language instead of the gate's choice with probability
p(t) = (1 + cos(pi t / f)) / 2 for t < f and 0 after, where t is the
fraction of the training stage done (told by the training loop through
:meth:`~speechbrain_blspkd.nnet.adapter.SpeechAdapter.set_training_progress`)
and f is ``forcing_fraction`` (0.5: annealed from 1 to 0 over the first half
of the stage; 0: never forced).  Forced utterances give the gate no
straight-through gradient: it learns from the language-ID loss there.
Evaluation and inference never force.

The language of index k is ``languages[k]``; the training loop maps the
manifest's language codes to those indices
(:meth:`LanguageAwareQFormer.language_codes`).

Authors
 * speechbrain-blspkd contributors 2026
"""

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from speechbrain_blspkd.nnet.adapter import AdapterOutput
from speechbrain_blspkd.nnet.language_gate import (
    GATES,
    AttentionPoolingGate,
    ConvLanguageGate,
)
from speechbrain_blspkd.nnet.qformer import QFormer

__all__ = [
    "AttentionPoolingGate",
    "ConvLanguageGate",
    "GATES",
    "LanguageAwareOutput",
    "LanguageAwareQFormer",
    "forcing_probability",
]

GATINGS = ("soft", "hard")


def forcing_probability(progress, fraction):
    """Teacher-forcing probability at ``progress`` of the training stage.

    Arguments
    ---------
    progress : float
        Fraction of the stage done, in [0, 1].
    fraction : float
        Fraction of the stage over which the probability falls from 1 to 0
        (a half cosine); 0 disables forcing.

    Returns
    -------
    float

    Example
    -------
    >>> [round(forcing_probability(t, 0.5), 3) for t in (0, 0.25, 0.5, 0.9)]
    [1.0, 0.5, 0.0, 0.0]
    >>> forcing_probability(0.0, 0.0)
    0.0
    """
    if fraction <= 0 or progress >= fraction:
        return 0.0
    return 0.5 * (1.0 + math.cos(math.pi * max(progress, 0.0) / fraction))


@dataclasses.dataclass
class LanguageAwareOutput(AdapterOutput):
    """:class:`AdapterOutput` plus what the gate decided.

    Arguments
    ---------
    tokens, token_mask
        As in :class:`~speechbrain_blspkd.nnet.adapter.AdapterOutput`.
    language_logits : torch.Tensor
        (B, K) float32 gate logits g.
    language_weights : torch.Tensor
        (B, K) weights of the bank entries in the forward pass (one-hot in
        hard gating and for forced utterances).
    forced : torch.Tensor
        (B,) bool: the utterances that used their true language.
    """

    language_logits: torch.Tensor = None
    language_weights: torch.Tensor = None
    forced: torch.Tensor = None


class LanguageAwareQFormer(QFormer):
    """Q-Former whose queries come from a per-language bank via a gate.

    Arguments
    ---------
    input_size, output_size : int
        As in :class:`~speechbrain_blspkd.nnet.qformer.QFormer`.
    languages : list of str
        The K language codes, in gate order (index k is ``languages[k]``);
        every manifest row's ``language`` must be one of them.
    num_queries : int
        L queries per language = speech tokens per utterance.
    num_layers, init_from, num_heads, ffn_size, dropout, activation
        As in :class:`~speechbrain_blspkd.nnet.qformer.QFormer` (the
        layers, positional embeddings and final norm are shared by all
        languages).
    gate : str
        ``"conv"`` (:class:`ConvLanguageGate`) or ``"attention"``
        (:class:`AttentionPoolingGate`).
    gate_size : int
        Hidden width of the gate.
    gating : str
        ``"hard"`` (one bank entry, straight-through gradient) or
        ``"soft"`` (softmax mixture of the entries).
    forcing_fraction : float
        Fraction of each training stage over which the probability of
        using the true language falls from 1 to 0 (0: never forced).

    Example
    -------
    >>> from speechbrain_blspkd.nnet.adapter import AdapterTargets
    >>> adapter = LanguageAwareQFormer(16, 24, ["en", "de", "zh"],
    ...     num_queries=4, num_layers=1, num_heads=2, ffn_size=32,
    ...     gate_size=8)
    >>> adapter.queries.shape
    torch.Size([3, 4, 16])
    >>> out = adapter(torch.randn(2, 30, 16), torch.tensor([1.0, 0.5]))
    >>> out.tokens.shape, out.language_logits.shape, out.token_counts.tolist()
    (torch.Size([2, 4, 24]), torch.Size([2, 3]), [4, 4])
    >>> out.language_weights.sum(1).tolist()  # hard: one entry per row
    [1.0, 1.0]
    >>> _ = adapter.train()
    >>> adapter.set_training_progress(0.0)  # forcing probability 1
    >>> out = adapter(torch.randn(2, 30, 16),
    ...     targets=AdapterTargets(language=torch.tensor([2, 1])))
    >>> out.forced.tolist(), out.language_weights.argmax(1).tolist()
    ([True, True], [2, 1])
    >>> rebuilt = LanguageAwareQFormer(**adapter.export_hparams())
    >>> rebuilt.load_state_dict(adapter.state_dict())
    <All keys matched successfully>
    """

    def __init__(
        self,
        input_size,
        output_size,
        languages,
        num_queries=64,
        num_layers=2,
        init_from=None,
        num_heads=8,
        ffn_size=2048,
        dropout=0.0,
        activation="gelu",
        gate="conv",
        gate_size=256,
        gating="hard",
        forcing_fraction=0.5,
    ):
        name = type(self).__name__
        codes = [str(code) for code in (languages or [])]
        if not codes or any(not code.strip() for code in codes):
            raise ValueError(
                f"{name}: `languages` must be a non-empty list of language "
                f"codes, got {languages!r}"
            )
        if len(set(codes)) != len(codes):
            raise ValueError(f"{name}: `languages` repeats a code: {codes}")
        if gate not in GATES:
            raise ValueError(
                f"{name}: unknown gate {gate!r}; choose from {sorted(GATES)}"
            )
        if gating not in GATINGS:
            raise ValueError(
                f"{name}: unknown gating {gating!r}; choose from "
                f"{list(GATINGS)}"
            )
        if not 0.0 <= forcing_fraction <= 1.0:
            raise ValueError(
                f"{name}: `forcing_fraction` must be in [0, 1], got "
                f"{forcing_fraction}"
            )
        super().__init__(
            input_size,
            output_size,
            num_queries=num_queries,
            num_layers=num_layers,
            init_from=init_from,
            num_heads=num_heads,
            ffn_size=ffn_size,
            dropout=dropout,
            activation=activation,
        )
        self.check_sizes(gate_size=gate_size)
        self.languages = codes
        self.gate_type = str(gate)
        self.gating = str(gating)
        self.forcing_fraction = float(forcing_fraction)
        self.progress = 0.0
        # the bank replaces the single set of queries: K x L x d, N(0, 0.02)
        self.queries = nn.Parameter(
            torch.randn(len(codes), self.num_queries, self.input_size) * 0.02
        )
        self.gate = GATES[gate](self.input_size, len(codes), int(gate_size))

    def language_codes(self):
        """The gate's languages, in index order."""
        return list(self.languages)

    def diagnostics(self, output, targets=None):
        """The gate's confusion over the batch, for evaluation.

        For every pair of true language t and gate argmax p the share of
        the batch's utterances that are t and go to p
        (``lid_confusion/<t>/<p>``; every pair is present, zeros
        included, so that means over a whole pass are joint shares).
        :func:`speechbrain_blspkd.metrics.confusion_from_stats` turns the
        means of a pass into the row-normalised confusion matrix.

        Arguments
        ---------
        output : LanguageAwareOutput
            This adapter's output on the batch.
        targets : AdapterTargets, optional
            Without true languages there is nothing to report.

        Returns
        -------
        dict
            ``lid_confusion/<t>/<p>`` -> float.

        Example
        -------
        >>> from speechbrain_blspkd.nnet.adapter import AdapterTargets
        >>> adapter = LanguageAwareQFormer(8, 8, ["en", "zh"],
        ...     num_queries=2, num_layers=1, num_heads=2, ffn_size=16,
        ...     gate_size=4)
        >>> out = LanguageAwareOutput(torch.zeros(3, 2, 8), None,
        ...     language_logits=torch.tensor([[2., 0.], [0., 1.], [3., 1.]]))
        >>> stats = adapter.diagnostics(out,
        ...     AdapterTargets(language=torch.tensor([0, 0, 1])))
        >>> [round(stats[f"lid_confusion/{t}/{p}"], 3)
        ...     for t in ("en", "zh") for p in ("en", "zh")]
        [0.333, 0.333, 0.333, 0.0]
        """
        labels = None if targets is None else targets.language
        logits = getattr(output, "language_logits", None)
        if labels is None or logits is None:
            return {}
        labels = torch.as_tensor(labels).reshape(-1).cpu().long()
        guess = logits.detach().argmax(-1).cpu().long()
        k = len(self.languages)
        joint = torch.zeros(k * k)
        joint.index_add_(0, labels * k + guess, torch.ones(labels.numel()))
        joint = (joint / max(labels.numel(), 1)).tolist()
        return {
            f"lid_confusion/{t}/{p}": joint[i * k + j]
            for i, t in enumerate(self.languages)
            for j, p in enumerate(self.languages)
        }

    def export_hparams(self):
        """The Q-Former's export arguments, ``languages`` as plain strings.

        Example
        -------
        >>> adapter = LanguageAwareQFormer(16, 8, ("en", "de"),
        ...     num_queries=2, num_layers=1, num_heads=2, ffn_size=32,
        ...     gate="attention", gate_size=8, gating="soft")
        >>> args = adapter.export_hparams()
        >>> args["languages"], args["gate"], args["gating"], args["init_from"]
        (['en', 'de'], 'attention', 'soft', None)
        """
        args = super().export_hparams()
        args["languages"] = list(self.languages)
        return args

    def set_training_progress(self, fraction):
        """Sets the stage progress the forcing probability follows."""
        self.progress = min(max(float(fraction), 0.0), 1.0)

    def forcing_probability(self):
        """The teacher-forcing probability now (training only)."""
        return forcing_probability(self.progress, self.forcing_fraction)

    def forward(self, feats, lengths=None, targets=None):
        """Gate, queries from the bank, then the Q-Former layers.

        Arguments
        ---------
        feats, lengths
            As in :meth:`~speechbrain_blspkd.nnet.qformer.QFormer.forward`.
        targets : AdapterTargets, optional
            ``language`` (B,) indices into ``languages``: the labels of
            the scheduled teacher forcing (training only).

        Returns
        -------
        LanguageAwareOutput
        """
        frames, valid = self.prepare_frames(feats, lengths)
        logits = self.gate(frames, valid).float()
        labels = None if targets is None else targets.language
        if labels is not None:
            labels = self.check_labels(labels, frames.shape[0])
        forced = self.draw_forcing(labels, frames.shape[0], frames.device)
        queries, weights = self.bank_queries(logits, labels, forced)
        tokens = self.attend(queries, frames, valid)
        return LanguageAwareOutput(
            tokens=tokens,
            token_mask=self.all_tokens(tokens),
            language_logits=logits,
            language_weights=weights,
            forced=forced,
        )

    def check_labels(self, labels, batch):
        """(B,) long language indices, checked against the bank size."""
        labels = torch.as_tensor(labels, device=self.queries.device)
        labels = labels.long().reshape(-1)
        if labels.shape[0] != batch:
            raise ValueError(
                f"{type(self).__name__}: {labels.shape[0]} language labels "
                f"for a batch of {batch}"
            )
        if bool(((labels < 0) | (labels >= len(self.languages))).any()):
            raise ValueError(
                f"{type(self).__name__}: language indices "
                f"{labels.tolist()} outside 0..{len(self.languages) - 1} "
                f"({self.languages})"
            )
        return labels

    def draw_forcing(self, labels, batch, device):
        """(B,) bool: the rows that use their true language this step."""
        forced = torch.zeros(batch, dtype=torch.bool, device=device)
        if not self.training or labels is None:
            return forced
        p = self.forcing_probability()
        if p <= 0.0:
            return forced
        return torch.rand(batch, device=device) < p

    def bank_queries(self, logits, labels, forced):
        """Queries (B, L, d) and the bank weights (B, K) used forward.

        Arguments
        ---------
        logits : torch.Tensor
            (B, K) gate logits.
        labels : torch.Tensor or None
            (B,) true language indices (needed where ``forced``).
        forced : torch.Tensor
            (B,) bool: rows that take their true language's entry.

        Returns
        -------
        queries : torch.Tensor
            (B, L, d).
        weights : torch.Tensor
            (B, K) float32.
        """
        bank = self.queries
        num = bank.shape[0]
        probs = logits.float().softmax(-1)
        any_forced = bool(forced.any())
        if self.gating == "hard":
            choice = probs.argmax(-1)
            if any_forced:
                choice = torch.where(forced, labels, choice)
            queries = bank[choice]  # exactly one entry per row
            if torch.is_grad_enabled() and not bool(forced.all()):
                # straight-through: zero forward, the soft mixture's
                # gradient backward (to the gate only)
                mix = torch.einsum(
                    "bk,kld->bld", probs.to(bank.dtype), bank.detach()
                )
                free = (~forced).to(mix.dtype)[:, None, None]
                queries = queries + (mix - mix.detach()) * free
            return queries, F.one_hot(choice, num).float()
        weights = probs
        if any_forced:
            truth = F.one_hot(labels, num).float()
            weights = torch.where(forced[:, None], truth, probs)
        queries = torch.einsum("bk,kld->bld", weights.to(bank.dtype), bank)
        return queries, weights
