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

The package, by concept:

* :mod:`~speechbrain_blspkd.utils.sharding.strategy`: the strategy a run
  uses (:func:`resolve_strategy`) and decisions shared by every process
  (:func:`agree`);
* :mod:`~speechbrain_blspkd.utils.sharding.wrapping`: the layout
  (:func:`shard_model`), CPU offload, gradient sync and :func:`gathered`;
* :mod:`~speechbrain_blspkd.utils.sharding.tensors`: sharded tensors made
  whole and whole tensors laid out as shards;
* :mod:`~speechbrain_blspkd.utils.sharding.gradients`: the replicated
  gradients averaged and the global norm clipped;
* :mod:`~speechbrain_blspkd.utils.sharding.checkpoints`: optimiser
  checkpoints in the single-process format.
"""

from speechbrain_blspkd.utils.sharding.checkpoints import (
    full_optimizer_state,
    load_full_optimizer_state,
    load_optimizer,
    save_optimizer,
)
from speechbrain_blspkd.utils.sharding.gradients import (
    clip_grad_norm_,
    sync_replicated_grads,
)
from speechbrain_blspkd.utils.sharding.strategy import (
    STRATEGIES,
    ShardingError,
    _process_group_ready,
    agree,
    resolve_strategy,
)
from speechbrain_blspkd.utils.sharding.tensors import (
    full_state,
    full_tensor,
    is_dtensor,
    sharded_like,
)
from speechbrain_blspkd.utils.sharding.wrapping import (
    FORWARD_METHODS,
    check_offloaded,
    decoder_layers,
    gathered,
    gradient_sync,
    is_sharded,
    shard_model,
    shards_after_move,
)

__all__ = [
    "FORWARD_METHODS",
    "STRATEGIES",
    "ShardingError",
    "_process_group_ready",
    "agree",
    "check_offloaded",
    "clip_grad_norm_",
    "decoder_layers",
    "full_optimizer_state",
    "full_state",
    "full_tensor",
    "gathered",
    "gradient_sync",
    "is_dtensor",
    "is_sharded",
    "load_full_optimizer_state",
    "load_optimizer",
    "resolve_strategy",
    "save_optimizer",
    "shard_model",
    "sharded_like",
    "shards_after_move",
    "sync_replicated_grads",
]
