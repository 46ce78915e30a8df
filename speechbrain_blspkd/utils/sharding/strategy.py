"""Which data-parallel strategy a run uses, and decisions every process
shares (see :mod:`speechbrain_blspkd.utils.sharding`).
"""

import logging
import os

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


STRATEGIES = ("ddp", "fsdp")


class ShardingError(ValueError):
    """An unsupported sharding configuration."""


def _process_group_ready():
    return dist.is_available() and dist.is_initialized()


def _world_size():
    return dist.get_world_size() if _process_group_ready() else 1


def _is_main():
    return not _process_group_ready() or dist.get_rank() == 0


def resolve_strategy(
    strategy="ddp", precision="fp32", data_parallel=False, distributed=None
):
    """The data-parallel strategy a run uses, or a clear error.

    Arguments
    ---------
    strategy : str
        ``"ddp"`` or ``"fsdp"`` (the ``distributed_strategy`` YAML key).
    precision : str
        The run's ``precision`` (``fp32``, ``bf16`` or ``fp16``).
    data_parallel : bool
        The speechbrain ``data_parallel_backend`` run option.
    distributed : bool, optional
        Whether a process group is initialised (default: ask
        ``torch.distributed``).

    Returns
    -------
    str
        ``"fsdp"`` when the run shards; ``"ddp"`` otherwise.  ``fsdp`` in a
        single process (no ``torchrun``) has nothing to shard: it trains the
        whole model in that process (``"ddp"``, which does not wrap without
        a launch), with a logged note, so one YAML serves both.

    Example
    -------
    >>> resolve_strategy("fsdp", distributed=False)
    'ddp'
    >>> resolve_strategy("zero3")
    Traceback (most recent call last):
    ...
    speechbrain_blspkd.utils.sharding.strategy.ShardingError: distributed_strategy: 'zero3' is not one of ('ddp', 'fsdp')
    """
    if strategy not in STRATEGIES:
        raise ShardingError(
            f"distributed_strategy: {strategy!r} is not one of {STRATEGIES}"
        )
    if strategy != "fsdp":
        return strategy
    if data_parallel:
        raise ShardingError(
            "distributed_strategy: fsdp needs a torchrun launch; it cannot "
            "be combined with --data_parallel_backend"
        )
    if str(precision) == "fp16":
        raise ShardingError(
            "distributed_strategy: fsdp does not support precision fp16 "
            "(the gradient scaler would check overflow shard by shard); use "
            "bf16 or fp32"
        )
    if distributed is None:
        distributed = _process_group_ready()
        if not distributed and os.environ.get("RANK") is not None:
            raise ShardingError(
                "distributed_strategy: fsdp under torchrun, but no process "
                "group: call speechbrain.utils.distributed.ddp_init_group("
                "run_opts) before creating the Brain"
            )
    if not distributed:
        logger.info(
            "distributed_strategy: fsdp in a single process: nothing to "
            "shard, the whole model trains in this process"
        )
        return "ddp"
    return "fsdp"


def agree(flag, how="all", device=None):
    """One decision for every process: ``flag`` combined over the group.

    Sharded layers all-gather their weights in every forward, so every
    process must run the same layer calls: a choice that changes which
    calls run (e.g. whether a cached prompt prefix is recomputed) must be
    the same everywhere.  Without a process group the flag is returned.

    Arguments
    ---------
    flag : bool
        This process's answer.
    how : str
        ``"all"`` (true when true on every process) or ``"any"``.
    device : str or torch.device, optional
        Where the reduction runs (the backend's device: CUDA for NCCL);
        default CPU.

    Returns
    -------
    bool

    Example
    -------
    >>> agree(True, "all"), agree(False, "any")
    (True, False)
    """
    if how not in ("all", "any"):
        raise ValueError(f"agree: how must be 'all' or 'any', got {how!r}")
    if not _process_group_ready() or dist.get_world_size() == 1:
        return bool(flag)
    value = torch.tensor([float(bool(flag))], device=device or "cpu")
    op = dist.ReduceOp.MIN if how == "all" else dist.ReduceOp.MAX
    dist.all_reduce(value, op=op)
    return bool(value.item())
