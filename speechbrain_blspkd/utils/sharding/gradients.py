"""The gradients of a sharded model: the replicated parameters' averaged
across processes (as DDP would) and one global norm clipped over sharded
and replicated gradients alike.
"""

import torch
import torch.distributed as dist

from speechbrain_blspkd.utils.sharding.strategy import _world_size
from speechbrain_blspkd.utils.sharding.tensors import _mesh_device, is_dtensor


def sync_replicated_grads(params):
    """Average the gradients of the plain (replicated) parameters.

    What DDP does for the parameters FSDP does not manage (the adapter, an
    unfrozen encoder): gradients are summed over the processes and divided
    by their number.  A parameter without a gradient on every process keeps
    ``None`` (the optimiser then skips it, as with DDP); one with a gradient
    on some processes only counts zeros for the others.  ``DTensor``
    parameters are skipped (FSDP reduces them).  No-op in one process.

    Arguments
    ---------
    params : iterable of torch.nn.Parameter
        The trainable parameters, in the same order on every process.

    Example
    -------
    >>> p = torch.nn.Parameter(torch.ones(2)); p.grad = torch.ones(2)
    >>> sync_replicated_grads([p]); p.grad.tolist()
    [1.0, 1.0]
    """
    world = _world_size()
    if world == 1:
        return
    plain = [p for p in params if p.requires_grad and not is_dtensor(p)]
    if not plain:
        return
    flags = torch.tensor(
        [float(p.grad is not None) for p in plain], device=plain[0].device
    )
    dist.all_reduce(flags)
    groups = {}
    for p, count in zip(plain, flags.tolist()):
        if count > 0:
            groups.setdefault((p.dtype, p.device), []).append(p)
    for group in groups.values():
        flat = torch.cat(
            [
                (p.grad if p.grad is not None else torch.zeros_like(p))
                .detach()
                .reshape(-1)
                for p in group
            ]
        )
        dist.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for p in group:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n


def clip_grad_norm_(params, max_norm):
    """Clip the global gradient norm of sharded and replicated parameters.

    ``torch.nn.utils.clip_grad_norm_`` cannot mix ``DTensor`` and plain
    gradients in one norm.  This computes what it computes in one process
    (the L2 norm of the per-tensor norms, float32, then one clipping factor
    ``max_norm / (norm + 1e-6)`` capped at 1), with the per-tensor norms of
    the sharded gradients summed over their shards in one all-reduce.  Call
    it after :func:`sync_replicated_grads`, on every process.

    Arguments
    ---------
    params : iterable of torch.nn.Parameter
        The trainable parameters.
    max_norm : float
        The largest global L2 norm.

    Returns
    -------
    torch.Tensor
        The norm before clipping (float32 scalar).

    Example
    -------
    >>> p = torch.nn.Parameter(torch.zeros(2)); p.grad = torch.tensor([3., 4.])
    >>> float(clip_grad_norm_([p], 1.0))
    5.0
    >>> [round(g, 4) for g in p.grad.tolist()]
    [0.6, 0.8]
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    local = [g.to_local() if is_dtensor(g) else g for g in grads]
    device = local[0].device
    squares = torch.stack(
        [
            torch.linalg.vector_norm(g, dtype=torch.float32).to(device) ** 2
            for g in local
        ]
    )
    sharded = torch.tensor([is_dtensor(g) for g in grads], device=device)
    if bool(sharded.any()):
        mesh = next(g.device_mesh for g in grads if is_dtensor(g))
        part = squares[sharded].to(_mesh_device(mesh))
        dist.all_reduce(part)
        squares[sharded] = part.to(device)
    total = torch.linalg.vector_norm(squares.sqrt())
    coef = torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)
    with torch.no_grad():
        for g in local:
            g.mul_(coef.to(device=g.device, dtype=g.dtype))
    return total
