"""Training stages declared in the YAML.

A recipe trains through a list of :class:`Stage` objects in order; each
names its objective, its training manifest, its epoch counter, its
data-loader options, its peak learning rate and its learning-rate
schedule.  The Brain runs whatever
stages the YAML lists and knows none of them by name::

    stages:
        - !new:speechbrain_blspkd.stages.Stage
            name: align
            objective: !ref <align_objective>
            train_manifest: !ref <train_manifest>
            epochs: !new:speechbrain.utils.epoch_loop.EpochCounter
                limit: 3
            loader_options: {batch_size: 32, shuffle: True}
            lr: 0.001
            scheduler: !name:transformers.get_cosine_with_min_lr_schedule_with_warmup
                num_warmup_steps: 20
                min_lr_rate: 0.1

The schedule is any ``scheduler(optimizer, num_training_steps=...)``
factory returning a ``torch.optim.lr_scheduler.LRScheduler`` (transformers'
schedules are); ``total_steps: null`` (the default) is set when the stage
starts to its epochs times the optimiser steps per epoch of the process's
loader, so it follows data size, batch size, gradient accumulation and the
number of processes.  The schedule is stepped before every optimiser step
(the first step runs at ``lr * schedule(1)``).

Authors
 * speechbrain-blspkd contributors 2026
"""

import logging
import warnings

__all__ = ["Stage"]

logger = logging.getLogger(__name__)


class Stage:
    """One training stage.

    Arguments
    ---------
    name : str
        Unique name (checkpoint names and logs use it).
    objective : speechbrain_blspkd.objectives.Objective
        The loss of this stage.
    train_manifest : str
        Manifest of the training utterances.
    epochs : speechbrain.utils.epoch_loop.EpochCounter
        Epoch counter (``limit: 0`` skips the stage).
    loader_options : dict
        DataLoader options (``batch_size``, ``shuffle``, and
        ``dynamic_batching`` for length-bucketed batches).
    lr : float
        Peak learning rate.
    scheduler : callable, optional
        ``scheduler(optimizer, num_training_steps=N)`` -> LR scheduler;
        None: constant ``lr``.
    total_steps : int, optional
        Optimiser steps of the schedule (None: derived from the loader).
    languages : list of str, optional
        Train only on the manifest rows of these languages (its
        ``language`` column); None: every row.  E.g. English-first data for
        an English LLM.
    max_utterances : int, optional
        Train only on the first ``max_utterances`` rows (manifest order,
        after the language filter); None: all.  Data-scaling curves use it
        with a fixed corpus.

    Example
    -------
    >>> import torch
    >>> from functools import partial
    >>> from transformers import get_cosine_with_min_lr_schedule_with_warmup
    >>> from speechbrain.utils.epoch_loop import EpochCounter
    >>> stage = Stage("align", None, "train.csv", EpochCounter(2),
    ...     {"batch_size": 4}, lr=1.0,
    ...     scheduler=partial(get_cosine_with_min_lr_schedule_with_warmup,
    ...         num_warmup_steps=2, min_lr_rate=0.0))
    >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    >>> sched = stage.make_scheduler(opt, steps_per_epoch=2)
    >>> lrs = []
    >>> for _ in range(4):
    ...     stage.step(sched)
    ...     lrs.append(round(opt.param_groups[0]["lr"], 3))
    >>> lrs
    [0.5, 1.0, 0.5, 0.0]
    """

    def __init__(
        self,
        name,
        objective,
        train_manifest,
        epochs,
        loader_options,
        lr,
        scheduler=None,
        total_steps=None,
        languages=None,
        max_utterances=None,
    ):
        if not name or not str(name).isidentifier():
            raise ValueError(
                f"Stage: name {name!r} must be a non-empty identifier"
            )
        if lr <= 0:
            raise ValueError(f"Stage {name}: lr must be > 0, got {lr}")
        self.name = str(name)
        self.objective = objective
        self.train_manifest = train_manifest
        self.epochs = epochs
        self.loader_options = dict(loader_options or {})
        self.lr = float(lr)
        self.scheduler = scheduler
        self.total_steps = total_steps
        if isinstance(languages, str):
            languages = [languages]
        self.languages = None if languages is None else list(languages)
        if self.languages is not None and not self.languages:
            raise ValueError(f"Stage {name}: `languages` is empty")
        if max_utterances is not None and int(max_utterances) < 1:
            raise ValueError(
                f"Stage {name}: max_utterances must be >= 1, "
                f"got {max_utterances}"
            )
        self.max_utterances = (
            None if max_utterances is None else int(max_utterances)
        )

    def select_rows(self, dataset, source=None):
        """The rows this stage trains on (``languages``, then
        ``max_utterances``).

        Arguments
        ---------
        dataset : speechbrain.dataio.dataset.DynamicItemDataset
            The stage's manifest as a dataset (rows in manifest order).
        source : str, optional
            The manifest, named in errors.

        Returns
        -------
        speechbrain.dataio.dataset.DynamicItemDataset

        Raises
        ------
        ValueError
            When the manifest has no ``language`` column but ``languages``
            is set, or when no row is left.

        Example
        -------
        >>> from speechbrain.dataio.dataset import DynamicItemDataset
        >>> from speechbrain.utils.epoch_loop import EpochCounter
        >>> ds = DynamicItemDataset({
        ...     "a": {"language": "en"}, "b": {"language": "de"},
        ...     "c": {"language": "en"}, "d": {"language": "en"}})
        >>> stage = Stage("align", None, "train.csv", EpochCounter(1), {},
        ...     lr=1e-3, languages=["en"], max_utterances=2)
        >>> stage.select_rows(ds).data_ids
        ['a', 'c']
        """
        where = source or self.train_manifest
        if self.languages is not None:
            wanted = set(self.languages)
            missing = [
                uid
                for uid in dataset.data_ids[:1]
                if "language" not in dataset.data[uid]
            ]
            if missing:
                raise ValueError(
                    f"Stage {self.name}: `languages` is set but {where} has "
                    f"no `language` column (row {missing[0]!r})"
                )
            dataset = dataset.filtered_sorted(
                key_test={"language": lambda code: code in wanted}
            )
        if self.max_utterances is not None:
            dataset = dataset.filtered_sorted(select_n=self.max_utterances)
        if not len(dataset):
            raise ValueError(
                f"Stage {self.name}: no row of {where} is left after "
                f"languages={self.languages}, "
                f"max_utterances={self.max_utterances}"
            )
        return dataset

    def __repr__(self):
        return (
            f"Stage({self.name!r}, {type(self.objective).__name__}, "
            f"epochs={self.epochs.limit}, lr={self.lr})"
        )

    def make_scheduler(self, optimizer, steps_per_epoch=None):
        """Set the optimiser to this stage's ``lr``; build its schedule.

        Arguments
        ---------
        optimizer : torch.optim.Optimizer
            The stage's optimiser.
        steps_per_epoch : int, optional
            Optimiser steps per epoch (sets ``total_steps`` when it is
            None).

        Returns
        -------
        torch.optim.lr_scheduler.LRScheduler or None
        """
        for group in optimizer.param_groups:
            group["lr"] = self.lr
            group["initial_lr"] = self.lr
        if self.scheduler is None:
            return None
        if self.total_steps is None:
            if not steps_per_epoch:
                raise ValueError(
                    f"Stage {self.name}: total_steps is null and the steps "
                    "per epoch are unknown"
                )
            self.total_steps = max(1, int(self.epochs.limit) * steps_per_epoch)
            logger.info(
                "stage %s: %d optimiser steps per epoch, schedule over %d",
                self.name,
                steps_per_epoch,
                self.total_steps,
            )
        return self.scheduler(optimizer, num_training_steps=self.total_steps)

    @staticmethod
    def step(scheduler):
        """Advance ``scheduler`` by one optimiser step (before the step).

        Stepping first is deliberate (step k runs at ``lr * schedule(k)``,
        so a warm-up never spends a step at learning rate 0); torch's
        warning about that order is silenced here.
        """
        if scheduler is None:
            return
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message="Detected call of `lr_scheduler.step"
            )
            scheduler.step()
