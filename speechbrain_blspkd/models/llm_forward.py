"""Running the causal LLM on prompt embeddings, as a training pass does.

:func:`run_llm` is the forward of every teacher and student pass of
:class:`~speechbrain_blspkd.models.speech_llm.SpeechLLMModel`: it returns
the final hidden states and any requested layers of a right-padded prompt
batch. Two savings live here, each off where it would change a result:

* **prefix reuse** (:func:`reusable_prefix`, :func:`prefix_keys_values`):
  the keys and values of the prompt prefix the whole batch shares (system
  prompt and instruction) are computed once with batch 1, kept while the
  base LLM is frozen and the prefix gets no PLoRA delta, and expanded over
  the batch; under FSDP every process decides together
  (:func:`collective_prefix`);
* **early stop** (:func:`stop_layer`, :func:`truncated_forward`): a pass
  that needs neither logits nor the final state stops after the deepest
  layer it reads.

:func:`eval_mode` is the small context the passes and generation use to
run a module in eval mode.

Authors
 * speechbrain-blspkd contributors 2025
"""

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from speechbrain_blspkd.nnet import plora as plora_lib
from speechbrain_blspkd.utils import sharding

__all__ = [
    "collective_prefix",
    "eval_mode",
    "prefix_keys_values",
    "reusable_prefix",
    "run_llm",
    "stop_layer",
    "truncated_forward",
]


@contextlib.contextmanager
def eval_mode(module):
    """``module`` in eval mode inside the block, its mode restored after.

    Example
    -------
    >>> layer = nn.Dropout()
    >>> with eval_mode(layer):
    ...     layer.training
    False
    >>> layer.training
    True
    """
    was = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was)


def run_llm(
    model, embeds, batch, plora_mask=None, hidden_layers=(), final=True
):
    """Final hidden states (B, L, D) and any requested layers.

    ``model`` is the :class:`~speechbrain_blspkd.models.speech_llm.
    SpeechLLMModel` whose ``llm`` runs; ``batch`` is a right-padded
    collated prompt batch; ``plora_mask`` the student's PLoRA mask (None:
    no delta, e.g. the teacher). With
    ``prefix_reuse`` the shared prefix comes from the cache and the
    returned states cover the prefix positions with zeros (nothing is
    read there: every span starts after the instruction).  With
    ``final=False`` (no logits and no final state wanted) the pass
    stops after the deepest requested layer and the returned final
    state is None (:func:`truncated_forward`).
    """
    attention_mask = batch["attention_mask"]
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    start = reusable_prefix(model, batch, plora_mask)
    collective = collective_prefix(model)
    if collective and not sharding.agree(start > 0, "all", embeds.device):
        start = 0  # another process cannot reuse: none does
    past = None
    if start:
        past = prefix_keys_values(
            model, batch["input_ids"][0, :start], embeds.shape[0], collective
        )
        embeds = embeds[:, start:]
        position_ids = position_ids[:, start:]
        if plora_mask is not None:
            plora_mask = plora_mask[:, start:]
    # The mask stays set after this call: with gradient checkpointing
    # the student forward is re-run in backward().
    if model.has_plora:
        plora_lib.set_plora_mask(model.llm, plora_mask)
    kwargs = {
        "inputs_embeds": embeds,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "past_key_values": past,
        "use_cache": False,
    }
    stop = stop_layer(model, hidden_layers, final)
    if stop is not None:
        layers = truncated_forward(model, kwargs, hidden_layers, stop)
        final = None
    else:
        out = model.llm.base_model(
            **kwargs, output_hidden_states=bool(hidden_layers)
        )
        layers = {k: out.hidden_states[k] for k in hidden_layers}
        final = out.last_hidden_state
    if start:
        if final is not None:
            final = F.pad(final, (0, 0, start, 0))
        layers = {k: F.pad(v, (0, 0, start, 0)) for k, v in layers.items()}
    return final, layers


def stop_layer(model, hidden_layers, final):
    """The number of decoder layers a pass must run, or None (all).

    A pass that needs neither logits nor the final state stops after
    the deepest requested layer (AuRA's layer-wise distillation reads
    LLM layers 2, 4, 6 of 30: a fifth of the forward and backward).
    Not under FSDP, where every process must run the same layer calls,
    and not for LLMs whose decoder layers are not ``base_model.layers``.
    """
    if final or not hidden_layers:
        return None
    layers = getattr(model.llm.base_model, "layers", None)
    deepest = max(hidden_layers)
    if not isinstance(layers, nn.ModuleList):
        return None
    if not 1 <= deepest < len(layers):
        return None
    if sharding.is_sharded(model.llm):
        return None
    return deepest


class _Stop(Exception):
    """Raised by the hook on the last decoder layer a pass needs."""


def truncated_forward(model, kwargs, hidden_layers, stop):
    """Hidden states ``hidden_layers`` (each <= ``stop``) from a
    forward that runs decoder layers ``0 .. stop - 1`` only.

    Why by hand: Hugging Face models have no "stop after layer k"
    argument. Forward pre-hooks record the input of each requested
    layer (state ``k`` is the input of layer ``k``, the embedding
    output for ``k = 0``) and a forward hook on layer ``stop - 1``
    records its output (state ``stop``) and raises to end the pass;
    the hooks are removed before backward, so gradient checkpointing's
    recomputation does not meet them.
    """
    blocks = model.llm.base_model.layers
    wanted = set(hidden_layers)
    states = {}

    def before(index):
        def hook(module, args, kw):
            states[index] = args[0] if args else kw["hidden_states"]

        return hook

    def after(module, args, output):
        if isinstance(output, (tuple, list)):
            output = output[0]
        states[stop] = output
        raise _Stop

    handles = [
        blocks[k].register_forward_pre_hook(before(k), with_kwargs=True)
        for k in sorted(wanted - {stop})
    ]
    handles.append(blocks[stop - 1].register_forward_hook(after))
    try:
        model.llm.base_model(**kwargs)
    except _Stop:
        pass
    else:
        raise RuntimeError(
            f"SpeechLLMModel: the forward did not reach decoder layer "
            f"{stop - 1}"
        )
    finally:
        for handle in handles:
            handle.remove()
    return {k: states[k] for k in hidden_layers}


def reusable_prefix(model, batch, plora_mask):
    """Length of the batch's shared prefix to reuse (0: none)."""
    if not model.prefix_reuse or model.gradient_checkpointing:
        return 0
    ids = batch["input_ids"]
    start = int(batch["span_start"].min())
    if start < 1 or ids.shape[1] - start < 1:
        return 0
    same = (ids[:, :start] == ids[:1, :start]).all(0)
    if not bool(same.all()):
        start = int(same.long().cumprod(0).sum())
    if not bool(batch["attention_mask"][:, :start].bool().all()):
        return 0  # left padding: no shared prefix
    if plora_mask is not None and bool(plora_mask[:, :start].any()):
        return 0  # the delta reaches the prefix (scope text / global)
    frozen = all(
        not p.requires_grad
        for n, p in model.llm.named_parameters()
        if "lora_" not in n
    )
    return start if frozen else 0


def collective_prefix(model):
    """Whether prefix reuse must be decided by every process together.

    Under FSDP (the LLM's layers sharded across processes) every
    forward all-gathers each layer, so all processes must run the same
    layer calls.  Whether a process reuses a prefix (its batch may have
    left padding or a shorter shared prefix) and whether its cache
    misses (the prefix forward) are local facts; deciding them alone
    would make one process run a prefix forward that the others never
    join, and the run would hang.  So under FSDP the processes reuse a
    prefix only when all can, and all recompute it when any misses.
    """
    if not sharding._process_group_ready():
        return False
    return sharding.is_sharded(model.llm)


def prefix_keys_values(model, prefix_ids, batch_size, collective=False):
    """A fresh cache holding the prefix keys/values for the batch.

    ``collective``: the cache is (re)filled on every process when it
    misses on any (:func:`collective_prefix`).
    """
    from transformers import DynamicCache

    device = prefix_ids.device
    autocast = torch.is_autocast_enabled(device.type)
    key = (
        tuple(prefix_ids.tolist()),
        str(device),
        autocast,
        torch.get_autocast_dtype(device.type) if autocast else None,
        model.embed_tokens.weight.dtype,
        model.llm.training,
    )
    missing = key not in model._prefix_cache
    if collective:
        missing = sharding.agree(missing, "any", device)
    if missing:
        if len(model._prefix_cache) >= 8:
            model._prefix_cache.clear()
        with torch.no_grad(), model.plora_off():
            cache = DynamicCache(config=model.llm.config)
            model.llm.base_model(
                inputs_embeds=model.embed_tokens(prefix_ids[None]),
                past_key_values=cache,
                use_cache=True,
            )
        model._prefix_cache[key] = [
            (layer.keys, layer.values) for layer in cache.layers
        ]
    cache = DynamicCache(config=model.llm.config)
    for i, (k, v) in enumerate(model._prefix_cache[key]):
        shape = (batch_size,) + tuple(k.shape[1:])
        cache.update(k.expand(shape), v.expand(shape), i)
    return cache
