"""The objective interface: model outputs -> ``(loss, stats)``.

An objective is the method-specific half of training.  The speech LLM
(:class:`~speechbrain_blspkd.models.speech_llm.SpeechLLMModel`) computes
whatever an objective asks for in one forward pass (a
:class:`~speechbrain_blspkd.models.speech_llm.PassRequest`: teacher and/or
student pass, logits and hidden states at chosen spans and layers); the
objective turns those outputs into a scalar loss and a dict of statistics.
The Brain only calls :meth:`Objective.request` and the objective itself, so
it knows no method (the shape of ESPnet's ``AbsESPnetModel``, whose forward
returns the loss and its stats).

Writing an objective
--------------------
Subclass :class:`Objective`, list the names of its weighted terms in
``TERMS`` (and in ``DEFAULT_WEIGHTS`` the weights used when none are
given), and implement

* :meth:`Objective.request` (what the model must compute in a stage), and
* :meth:`Objective.terms` (name -> scalar tensor, or a zero-argument
  callable computed only when the term has a nonzero weight),

and optionally :meth:`Objective.metrics` (numbers reported in validation
and test, no gradient).  ``docs/adding_a_method.md`` walks through one.

Objective-owned modules
-----------------------
An objective is an ``nn.Module`` and may own modules that exist for
training only: a frozen teacher (AuRA's Whisper encoder) and small
trainable heads (AuRA's linear maps between the LLM's and the teacher's
widths).  The training loop moves the stage's objective to its device,
trains the objective's :meth:`Objective.trainable_parameters` with the
model's (one optimiser, one gradient clip; averaged over the processes of a
distributed run) and checkpoints them (the checkpoint hooks below save the
trainable parameters only, never a frozen teacher).  They are not part of
the model, so the export never holds them.

Authors
 * speechbrain-blspkd contributors 2026
"""

import math

import speechbrain as sb
import torch
from speechbrain.utils.checkpoints import (
    mark_as_loader,
    mark_as_saver,
    register_checkpoint_hooks,
)
from torch import nn

from speechbrain_blspkd.utils.atomic import atomic_path

__all__ = ["Objective"]


@register_checkpoint_hooks
class Objective(nn.Module):
    """Base class: a weighted sum of named terms and its statistics.

    Arguments
    ---------
    weights : dict, optional
        ``{term: weight}`` for names in ``TERMS``; missing terms weigh 0.
        None: the class's ``DEFAULT_WEIGHTS``.

    Example
    -------
    >>> class Toy(Objective):
    ...     TERMS = ("a", "b")
    ...     def terms(self, outputs, model, stage):
    ...         return {"a": torch.tensor(2.0), "b": lambda: 1 / 0}
    >>> loss, stats = Toy({"a": 0.5, "b": 0.0})(None, None, None)
    >>> float(loss), stats
    (1.0, {'a': 2.0, 'loss': 1.0})
    """

    TERMS = ()
    DEFAULT_WEIGHTS = {}

    def __init__(self, weights=None):
        super().__init__()
        weights = dict(self.DEFAULT_WEIGHTS if weights is None else weights)
        name = type(self).__name__
        unknown = sorted(set(weights) - set(self.TERMS))
        if unknown:
            raise ValueError(
                f"{name}: unknown loss weight(s) {unknown}; known terms are "
                f"{list(self.TERMS)}"
            )
        for term, w in weights.items():
            if not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise ValueError(
                    f"{name}: weight {term}={w!r} must be a finite number >= 0"
                )
        self.weights = {k: float(v) for k, v in weights.items()}
        if not any(self.weights.values()):
            raise ValueError(f"{name}: every loss weight is 0")

    def trainable_parameters(self):
        """The parameters this objective trains itself (none by default).

        Returns
        -------
        list of torch.nn.Parameter
            Those with ``requires_grad`` (e.g. projection heads; a frozen
            teacher has none).

        Example
        -------
        >>> class Head(Objective):
        ...     TERMS = ("a",)
        ...     def __init__(self):
        ...         super().__init__({"a": 1.0})
        ...         self.head = nn.Linear(2, 2)
        ...         self.teacher = nn.Linear(2, 2).requires_grad_(False)
        >>> len(Head().trainable_parameters())
        2
        """
        return [p for p in self.parameters() if p.requires_grad]

    @mark_as_saver
    def save_trainable(self, path):
        """Checkpoint hook: write the trainable parameters to ``path``.

        Example
        -------
        >>> import tempfile, pathlib
        >>> class Head(Objective):
        ...     TERMS = ("a",)
        ...     def __init__(self):
        ...         super().__init__({"a": 1.0})
        ...         self.head = nn.Linear(2, 2)
        >>> a, b = Head(), Head()
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "objective.ckpt"
        >>> a.save_trainable(path)
        >>> b.load_trainable(path)
        >>> torch.equal(a.head.weight, b.head.weight)
        True
        """
        state = {
            name: p.detach().cpu()
            for name, p in self.named_parameters()
            if p.requires_grad
        }
        with atomic_path(path) as tmp:
            torch.save(state, tmp)

    @mark_as_loader
    def load_trainable(self, path, end_of_epoch=None):
        """Checkpoint hook: load what :meth:`save_trainable` wrote.

        Raises ``ValueError`` naming ``path`` when the names or shapes do
        not match this objective's trainable parameters.
        """
        state = torch.load(path, map_location="cpu", weights_only=True)
        own = {n: p for n, p in self.named_parameters() if p.requires_grad}
        if set(state) != set(own):
            raise ValueError(
                f"{path}: objective parameters {sorted(state)} do not match "
                f"{type(self).__name__}'s {sorted(own)}"
            )
        with torch.no_grad():
            for name, value in state.items():
                if value.shape != own[name].shape:
                    raise ValueError(
                        f"{path}: {name} has shape {tuple(value.shape)}, "
                        f"expected {tuple(own[name].shape)}"
                    )
                own[name].copy_(value)

    def active(self, term):
        """Whether ``term`` has a nonzero weight (computed only then)."""
        if term not in self.TERMS:
            raise ValueError(f"{type(self).__name__}: unknown term {term!r}")
        return self.weights.get(term, 0.0) != 0.0

    def data_keys(self):
        """Names of the per-utterance batch items this objective reads.

        The training loop passes these items of each batch, when the batch
        has them, to the objective as ``outputs.data`` (a dict), so that an
        objective can use data prepared per utterance (e.g. a stored
        teacher) without the loop knowing what it is.  Default: none.

        Returns
        -------
        tuple of str
        """
        return ()

    def data_items(self, model, dataset, source=None):
        """Dynamic items that add :meth:`data_keys` to a training dataset.

        Called once per training stage by
        :func:`~speechbrain_blspkd.dataio.pipelines.dataio_prepare` with the
        stage's dataset, before any training; it may check the dataset's
        rows and refuse them (with a message naming ``source``).  Default:
        none.

        Arguments
        ---------
        model : speechbrain_blspkd.models.speech_llm.SpeechLLMModel
            The model being trained.
        dataset : speechbrain.dataio.dataset.DynamicItemDataset
            The stage's training data (``dataset.data`` holds its rows).
        source : str, optional
            The manifest the rows come from.

        Returns
        -------
        list
            speechbrain dynamic items (functions decorated with ``takes``
            and ``provides``) providing the :meth:`data_keys`.

        Example
        -------
        >>> Objective.data_items(None, None, None)
        []
        """
        return []

    def stat_counts(self, outputs):
        """How many items each reported statistic averages over.

        Validation and test average each statistic over the batches
        weighted by this count (default: the number of utterances), so a
        statistic that is a mean over positions becomes a mean over every
        position of the pass, not a mean of batch means.

        Arguments
        ---------
        outputs : speechbrain_blspkd.models.speech_llm.SpeechLLMOutput
            The batch's outputs.

        Returns
        -------
        dict
            stat name -> count (missing: the batch's utterances).
        """
        return {}

    def request(self, stage):
        """What the model computes for this objective in ``stage``.

        Arguments
        ---------
        stage : speechbrain.Stage
            TRAIN, VALID or TEST.

        Returns
        -------
        speechbrain_blspkd.models.speech_llm.PassRequest
        """
        from speechbrain_blspkd.models.passes import PassRequest

        return PassRequest()

    def terms(self, outputs, model, stage):
        """The loss terms (name -> scalar tensor or callable).

        A term (or its callable) may give None: not available for this
        batch (e.g. per-utterance data that only the training rows carry,
        in validation); it is then left out of the loss and the stats.
        """
        raise NotImplementedError

    def metrics(self, outputs, model, stage):
        """Extra numbers for validation/test (default none).

        Returns
        -------
        dict
            name -> float, tensor or zero-argument callable (called only
            when no weighted term of that name was computed already).
        """
        return {}

    def forward(self, outputs, model, stage):
        """The weighted loss and its statistics.

        Arguments
        ---------
        outputs : speechbrain_blspkd.models.speech_llm.SpeechLLMOutput
            The model's outputs for :meth:`request`.
        model : speechbrain_blspkd.models.speech_llm.SpeechLLMModel
            The (unwrapped) model, for read-only helpers such as its
            embedding table.
        stage : speechbrain.Stage
            The current stage.

        Returns
        -------
        loss : torch.Tensor
            Scalar.
        stats : dict
            Float value of each computed term, ``loss``, and in validation
            and test the :meth:`metrics`.
        """
        terms = self.terms(outputs, model, stage)
        missing = sorted(
            t for t, w in self.weights.items() if w and t not in terms
        )
        if missing:
            raise ValueError(
                f"{type(self).__name__}: term(s) {missing} have a nonzero "
                "weight but were not computed"
            )
        total, stats = None, {}
        for term, value in terms.items():
            weight = self.weights.get(term, 0.0)
            if weight == 0.0:
                continue
            value = value() if callable(value) else value
            if value is None:  # not available for this batch (see terms)
                continue
            if not torch.is_tensor(value) or value.numel() != 1:
                raise ValueError(
                    f"{type(self).__name__}: term {term} must be a scalar "
                    "tensor"
                )
            value = value.reshape(())
            stats[term] = float(value.detach())
            total = weight * value if total is None else total + weight * value
        if total is None:
            raise ValueError(
                f"{type(self).__name__}: no weighted term is available for "
                "this batch"
            )
        stats["loss"] = float(total.detach())
        if stage is not None and stage != sb.Stage.TRAIN:
            with torch.no_grad():
                for key, value in self.metrics(outputs, model, stage).items():
                    if key not in stats:  # a weighted term is not redone
                        stats[key] = float(
                            value() if callable(value) else value
                        )
        return total, stats
