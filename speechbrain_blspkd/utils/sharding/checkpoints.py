"""Optimiser checkpoints of a sharded run, in the single-process format:
gathered and written by the main process, loaded back shard by shard.
"""

import torch

from speechbrain_blspkd.utils.sharding.strategy import _is_main
from speechbrain_blspkd.utils.sharding.tensors import full_tensor, sharded_like


def full_optimizer_state(optimizer):
    """The optimiser's ``state_dict`` with every ``DTensor`` state gathered.

    The result has the format of a single-process optimiser (tensors on
    CPU), so :meth:`torch.optim.Optimizer.load_state_dict` of an unsharded
    run reads it.  A collective: every process must call it.

    Example
    -------
    >>> p = torch.nn.Parameter(torch.ones(2))
    >>> opt = torch.optim.SGD([p], lr=0.1)
    >>> sorted(full_optimizer_state(opt))
    ['param_groups', 'state']
    """
    sd = optimizer.state_dict()
    state = {}
    for idx in sorted(sd["state"]):
        state[idx] = {
            key: full_tensor(v).cpu() if torch.is_tensor(v) else v
            for key, v in sd["state"][idx].items()
        }
    return {"state": state, "param_groups": sd["param_groups"]}


def load_full_optimizer_state(optimizer, sd):
    """Load :func:`full_optimizer_state` (or a plain ``state_dict``) into an
    optimiser of sharded parameters: each process keeps its shards.

    Example
    -------
    >>> p = torch.nn.Parameter(torch.ones(2))
    >>> opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    >>> p.grad = torch.ones(2); opt.step()
    >>> load_full_optimizer_state(opt, full_optimizer_state(opt))
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for idx, entry in sd["state"].items():
        param = params[int(idx)]
        state[idx] = {
            key: (
                sharded_like(v, param)
                if torch.is_tensor(v) and v.shape == param.shape and v.dim()
                else v
            )
            for key, v in entry.items()
        }
    optimizer.load_state_dict(
        {"state": state, "param_groups": sd["param_groups"]}
    )


def save_optimizer(optimizer, path):
    """Checkpoint save hook: :func:`full_optimizer_state` to ``path``.

    Every process gathers (a collective); the main process writes,
    atomically.  The file is what ``torch.save(optimizer.state_dict())``
    writes in one process.

    Example
    -------
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "optimizer.ckpt"
    >>> p = torch.nn.Parameter(torch.ones(2))
    >>> opt = torch.optim.SGD([p], lr=0.1)
    >>> save_optimizer(opt, path)
    >>> load_optimizer(opt, path)
    """
    from speechbrain_blspkd.utils.atomic import atomic_path

    state = full_optimizer_state(optimizer)
    if _is_main():
        with atomic_path(path) as tmp:
            torch.save(state, tmp)


def load_optimizer(optimizer, path, end_of_epoch=None):
    """Checkpoint load hook: a single-process optimiser file into the shards
    of this process (see :func:`save_optimizer`)."""
    del end_of_epoch
    state = torch.load(path, map_location="cpu", weights_only=True)
    load_full_optimizer_state(optimizer, state)
