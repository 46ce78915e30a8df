"""The FSDP layout of a speech LLM: its decoder layers sharded across the
process group (with or without CPU offload), gradient sync switched for
accumulation, and the layers gathered whole for rank-local work (see
:mod:`speechbrain_blspkd.utils.sharding`).
"""

import contextlib
import logging

import torch
import torch.distributed as dist

from speechbrain_blspkd.utils.sharding.strategy import (
    ShardingError,
    _process_group_ready,
)
from speechbrain_blspkd.utils.sharding.tensors import is_dtensor

logger = logging.getLogger(__name__)


FORWARD_METHODS = ("generate", "generate_text")


def decoder_layers(llm):
    """The LLM modules that become FSDP units: its decoder layers.

    Arguments
    ---------
    llm : transformers.PreTrainedModel
        A causal LM.

    Returns
    -------
    list of (str, torch.nn.Module)
        Names (relative to ``llm``) and modules, outermost only.

    Example
    -------
    >>> from speechbrain_blspkd.models.speech_llm import SpeechLLMModel
    >>> from speechbrain_blspkd.testing import tiny_speech_llm
    >>> llm = tiny_speech_llm(whisper=False).llm
    >>> [name for name, _ in decoder_layers(llm)]
    ['model.layers.0', 'model.layers.1']
    """
    classes = set(getattr(llm, "_no_split_modules", None) or ())
    found = []
    if classes:
        for name, module in llm.named_modules():
            inside = any(name.startswith(f"{n}.") for n, _ in found)
            if type(module).__name__ in classes and not inside:
                found.append((name, module))
    if not found:
        layers = getattr(getattr(llm, "base_model", None), "layers", None)
        if isinstance(layers, torch.nn.ModuleList):
            prefix = next(n for n, m in llm.named_modules() if m is layers)
            found = [(f"{prefix}.{i}", m) for i, m in enumerate(layers)]
    if not found:
        raise ShardingError(
            f"distributed_strategy: fsdp: cannot find the decoder layers of "
            f"{type(llm).__name__} (no _no_split_modules match and no "
            "base_model.layers)"
        )
    return found


def shards_after_move(device, cpu_offload):
    """Whether a Brain shards after speechbrain moved its modules.

    With CPU offload on an accelerator the shards must stay in CPU memory,
    so the model is sharded once speechbrain's ``Brain.__init__`` has moved
    it to ``device`` (see the package notes); otherwise before, so that only
    the shards reach the device.

    Arguments
    ---------
    device : str or torch.device
        The run's device.
    cpu_offload : bool
        ``fsdp_cpu_offload``.

    Returns
    -------
    bool

    Example
    -------
    >>> shards_after_move("cuda:0", True), shards_after_move("cuda:0", False)
    (True, False)
    >>> shards_after_move("cpu", True)
    False
    """
    return bool(cpu_offload) and torch.device(device).type != "cpu"


def check_offloaded(model):
    """Raise :class:`ShardingError` when an offloaded shard left the CPU.

    FSDP2 refuses, at the first forward, CPU-offloaded shards that
    something moved to an accelerator; this says so at once, naming the
    parameters.

    Arguments
    ---------
    model : torch.nn.Module
        A model sharded by :func:`shard_model`.

    Example
    -------
    >>> check_offloaded(torch.nn.Linear(2, 2))
    """
    moved = []
    for name, module in model.named_modules():
        if not getattr(module, "_blspkd_cpu_offload", False):
            continue
        for pname, param in module.named_parameters():
            local = param.to_local() if is_dtensor(param) else param
            if local.device.type != "cpu":
                moved.append((f"{name}.{pname}".lstrip("."), str(local.device)))
    if moved:
        raise ShardingError(
            "fsdp_cpu_offload: the offloaded shards must stay in CPU memory, "
            f"but {len(moved)} were moved to {moved[0][1]} (e.g. "
            f"{moved[0][0]}); move the model before sharding it, not after"
        )


def shard_model(model, device=None, cpu_offload=False):
    """Shard a speech LLM's decoder layers across the process group (FSDP2).

    See the package notes for the layout.  Needs an initialised process
    group; parameters move to ``device`` shard by shard (the replicated
    parts stay where they are).

    Arguments
    ---------
    model : SpeechLLMModel
        The model, sharded in place.
    device : str or torch.device, optional
        The device of this process (default: the first parameter's).
    cpu_offload : bool
        Keep the shards, their gradients and optimiser state in CPU memory
        (FSDP2 ``CPUOffloadPolicy``); all-gathers go to ``device``.  Only
        meaningful on accelerators: ignored, with a logged note, on CPU.
        The model must not be moved afterwards (see the package notes).

    Returns
    -------
    list of str
        The names of the sharded units (relative to ``model``).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        OffloadPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    if not _process_group_ready():
        raise ShardingError(
            "shard_model: no torch.distributed process group (launch with "
            "torchrun and call ddp_init_group first)"
        )
    if is_sharded(model):
        raise ShardingError("shard_model: the model is already sharded")
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    offload = OffloadPolicy()
    if cpu_offload:
        if device.type == "cpu":
            logger.info("fsdp_cpu_offload: the run is on CPU; ignored")
        else:
            offload = CPUOffloadPolicy()
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    units = decoder_layers(model.llm)
    in_units = set()
    offloaded = isinstance(offload, CPUOffloadPolicy)
    for _, layer in units:
        fully_shard(layer, mesh=mesh, offload_policy=offload)
        layer._blspkd_cpu_offload = offloaded
        in_units.update(id(p) for p in layer.parameters())
    ignored = {p for p in model.parameters() if id(p) not in in_units}
    fully_shard(model, mesh=mesh, ignored_params=ignored)
    for method in FORWARD_METHODS:
        if hasattr(model, method):
            register_fsdp_forward_method(model, method)
    names = [f"llm.{name}" for name, _ in units]
    logger.info(
        "fsdp: %d decoder layers sharded over %d processes (%s%s); "
        "%d parameter tensors replicated",
        len(units),
        dist.get_world_size(),
        device,
        ", shards in CPU memory" if offloaded else "",
        len(ignored),
    )
    return names


def _fsdp_units(module):
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def is_sharded(module):
    """Whether ``module`` (or a submodule) is an FSDP module.

    Example
    -------
    >>> is_sharded(torch.nn.Linear(2, 2))
    False
    """
    return bool(_fsdp_units(module))


@contextlib.contextmanager
def gradient_sync(module, enabled):
    """FSDP's gradient reduction on or off inside the block (accumulation).

    Example
    -------
    >>> with gradient_sync(torch.nn.Linear(2, 2), False):
    ...     pass
    """
    units = _fsdp_units(module)
    for unit in units:
        unit.set_requires_gradient_sync(enabled, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            unit.set_requires_gradient_sync(True, recurse=False)


@contextlib.contextmanager
def gathered(model):
    """Every sharded layer whole on every process for the block.

    All-gathers each FSDP unit once on entry (a collective: every process
    enters the block) and keeps it unsharded until the block ends, so
    forward passes inside communicate nothing: processes may run different
    amounts of work (rank-split decoding) or work alone (the main process's
    export).  The block runs without gradients.  No-op for a model that is
    not sharded.

    Example
    -------
    >>> with gathered(torch.nn.Linear(2, 2)):
    ...     pass
    """
    units = [u for u in _fsdp_units(model) if u is not model]
    if not units:
        yield model
        return
    llm = getattr(model, "llm", None)
    synced = getattr(llm, "_is_fsdp_managed_module", False)
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    if llm is not None:
        # transformers' generate() would otherwise sync every decode step
        # across processes (synced_gpus), which rank-split decoding breaks.
        llm._is_fsdp_managed_module = False
    try:
        with torch.no_grad():
            yield model
    finally:
        if llm is not None:
            llm._is_fsdp_managed_module = synced
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)
