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
