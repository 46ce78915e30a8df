"""Sharded data parallelism (FSDP) for LLMs too large to copy on every GPU.

With ``distributed_strategy: fsdp`` (a recipe YAML key) a ``torchrun``
launch shards the frozen LLM's decoder layers, the bulk of the weights at
the paper's 7B scale, across its processes with PyTorch's FSDP2
(:func:`torch.distributed.fsdp.fully_shard`): each process keeps
``1 / world`` of every decoder layer (its frozen base weights and its
PLoRA matrices) and all-gathers one layer at a time in the forward and
backward passes.  ``distributed_strategy: ddp`` (the default) keeps the
whole model on every process (``DistributedDataParallel``).

Layout (:func:`shard_model`)
----------------------------
* One FSDP unit per LLM decoder layer (the module classes the LLM lists in
  ``_no_split_modules``, else the modules of ``llm.base_model.layers``).
* The model itself is the FSDP root and manages no parameter: the LLM
  embeddings, final norm and LM head (frozen; the alignment loss and the
  logit gather read them directly, outside any forward), the adapter and
  the encoder are replicated (FSDP's ``ignored_params``).  The gradients of
  the replicated trainable parameters (the adapter, an unfrozen encoder) are
  averaged across processes by :func:`sync_replicated_grads` before the
  optimiser step, as DDP would.
* ``generate`` and ``generate_text`` are registered as FSDP forward methods.

CPU offload
-----------
``fsdp_cpu_offload: True`` keeps the decoder layers' shards, their
gradients and optimiser state in CPU memory (FSDP2 ``CPUOffloadPolicy``);
each layer's shards are copied to the GPU for its all-gather.  FSDP2
requires the offloaded shards to stay in CPU memory, while speechbrain's
``Brain.__init__`` moves every module to the run's device.  So with
offload on an accelerator the Brain shards *after* that move
(:func:`shards_after_move`): the whole model reaches the GPU once (as with
DDP), ``fully_shard`` then copies each process's shards to (pinned) CPU
memory and the GPU copies are freed; :func:`check_offloaded` verifies it.
Without offload the layers are sharded before the move, so only the shards
reach the GPU.  On a CPU run offload means nothing and is ignored (logged).

Numerics
--------
No FSDP mixed-precision policy is set: parameters are all-gathered in the
dtype they are stored in (``llm_dtype`` for the frozen base, float32 for
PLoRA), the compute dtype follows the run's ``precision`` (autocast) exactly
as with DDP, and gradients are reduced in the dtype of the trainable
parameters (float32).  An FSDP run therefore computes what a DDP run
computes, up to the summation order of the reductions.  ``precision: fp16``
(a gradient scaler whose overflow check would be per shard) is refused.

Checkpoints
-----------
The trainable weights and the optimiser state are gathered into full
tensors and written by the main process in the single-process format
(:func:`full_state`, :func:`full_optimizer_state`), and loaded back shard
by shard (:func:`sharded_like`, :func:`load_full_optimizer_state`): an FSDP
checkpoint resumes in one process or under DDP, and the other way round.

Rank-local work
---------------
Parity decoding splits the test rows across processes, so the processes run
different numbers of ``generate`` calls; sharded layers would wait for each
other's all-gathers.  :func:`gathered` all-gathers every decoder layer once
and keeps it whole until the block ends: decoding (and the main-process
export) then needs no communication, at the cost of holding the full frozen
LLM on each process for that time (inference needs no gradients, optimiser
state or stored activations).
"""

import contextlib
import logging
import os

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

STRATEGIES = ("ddp", "fsdp")
FORWARD_METHODS = ("generate", "generate_text")


class ShardingError(ValueError):
    """An unsupported sharding configuration."""


def _process_group_ready():
    return dist.is_available() and dist.is_initialized()


def _world_size():
    return dist.get_world_size() if _process_group_ready() else 1


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
    speechbrain_blspkd.utils.sharding.ShardingError: distributed_strategy: 'zero3' is not one of ('ddp', 'fsdp')
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
    >>> from speechbrain_blspkd.utils.testing import tiny_speech_llm
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
    it to ``device`` (see the module notes); otherwise before, so that only
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

    See the module notes for the layout.  Needs an initialised process
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
        The model must not be moved afterwards (see the module notes).

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


def _is_main():
    return not _process_group_ready() or dist.get_rank() == 0


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
