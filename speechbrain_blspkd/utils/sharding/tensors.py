"""Sharded tensors and whole ones: ``DTensor`` parameters gathered into
full tensors, and full tensors laid out like a sharded parameter.
"""

import torch


def is_dtensor(tensor):
    """Whether ``tensor`` is a ``DTensor`` (a sharded FSDP parameter).

    Example
    -------
    >>> is_dtensor(torch.zeros(2))
    False
    """
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _mesh_device(mesh):
    """The device a mesh communicates on (this process's accelerator)."""
    if mesh.device_type == "cpu":
        return torch.device("cpu")
    module = torch.get_device_module(mesh.device_type)
    return torch.device(mesh.device_type, module.current_device())


def full_tensor(tensor):
    """The whole tensor: all-gathered from a ``DTensor`` (a collective: every
    process must call it, in the same order), else ``tensor`` itself.

    Shards kept in CPU memory (``fsdp_cpu_offload``) are gathered on the
    mesh's device.

    Example
    -------
    >>> full_tensor(torch.ones(2)).tolist()
    [1.0, 1.0]
    """
    if not is_dtensor(tensor):
        return tensor
    device = _mesh_device(tensor.device_mesh)
    if tensor.device != device:
        tensor = tensor.to(device)
    return tensor.full_tensor()


def sharded_like(value, param):
    """``value`` (a whole tensor) laid out like ``param``.

    For a ``DTensor`` parameter each process keeps its own shard of
    ``value`` (every process must hold the same ``value``: no data moves);
    for a plain parameter ``value`` is returned on the parameter's device.

    Example
    -------
    >>> sharded_like(torch.ones(2), torch.zeros(2)).tolist()
    [1.0, 1.0]
    """
    from torch.distributed.tensor import distribute_tensor

    if not is_dtensor(param):
        return value.to(param.device)
    value = value.to(device=param.device)
    return distribute_tensor(
        value, param.device_mesh, param.placements, src_data_rank=None
    )


def full_state(state):
    """``{name: tensor}`` with every ``DTensor`` gathered, on CPU, detached.

    A collective when ``state`` holds ``DTensor`` values (every process must
    call it with the same keys, in the same order).

    Example
    -------
    >>> full_state({"w": torch.ones(1, requires_grad=True)})["w"]
    tensor([1.])
    """
    return {k: full_tensor(v.detach()).cpu() for k, v in state.items()}
