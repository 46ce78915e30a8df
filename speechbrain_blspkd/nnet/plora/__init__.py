"""Partial LoRA (PLoRA): a low-rank delta that applies only at some positions.

Every wrapped linear layer computes

    y = W0 x + m_t * (alpha / r) * B A dropout(x)

where ``m_t`` is a per-position weight (usually 0/1). In BLSP-KD ``m_t = 1``
exactly at the speech positions (scope ``"audio"``), so the LLM learns to read
the speech tokens while its behaviour on text is untouched; with ``m = 0``
everywhere the model *is* the base LLM, which is how the teacher is obtained
without a second copy of the weights (:func:`disable_plora`).

Scopes
------
``"audio"``
    The delta applies where the mask is true; pass the speech positions.
``"text"``
    The delta applies where the mask is true; pass the text positions
    (:func:`scope_mask` turns a speech mask into one: not speech and not
    padding).
``"global"``
    The delta applies everywhere; the mask is ignored. Only this scope can be
    merged into ``W0`` (:func:`merge_plora`).

In every scope :func:`disable_plora` switches the delta off (exact base
model). For ``"audio"`` and ``"text"`` a mask of ``None`` (the default after
:func:`apply_plora`) also means "no delta anywhere".

Why not peft
------------
peft 0.21 adapts every position of a forward pass; its only position-aware
variant (aLoRA, ``alora_invocation_tokens``) switches the adapter on for a
*suffix* that starts at an invocation token found in ``input_ids``. Speech
positions sit in the middle of the prompt and arrive as ``inputs_embeds``, so
neither maps onto an arbitrary per-position mask without patching peft's
layer forward. The layer here is small, has no version coupling, and gives
exact base-model equality when the delta is off.

The package
-----------
:mod:`~speechbrain_blspkd.nnet.plora.layer`
    The layer (:class:`PLoRALinear`) and the shared mask state
    (:class:`PLoRAState`): how the mask meets the input length, KV cache
    included.
:mod:`~speechbrain_blspkd.nnet.plora.inject`
    Wrapping a model (:func:`apply_plora`), setting the mask, switching the
    delta off, scope masks.
:mod:`~speechbrain_blspkd.nnet.plora.weights`
    The adapter weights: parameters, configuration, state dict save/load,
    merging into the base weights.

Every name is importable from ``speechbrain_blspkd.nnet.plora``.
"""

# the private model walkers stay reachable as ``plora._state``,
# ``plora._unwrap``, ``plora._wrapped`` (the model, its export and the
# teacher cache call them so)
from speechbrain_blspkd.nnet.plora.inject import (  # noqa: F401
    DEFAULT_TARGETS,
    _state,
    _unwrap,
    _wrapped,
    apply_plora,
    disable_plora,
    plora_mask,
    scope_mask,
    set_plora_mask,
)
from speechbrain_blspkd.nnet.plora.layer import SCOPES, PLoRALinear, PLoRAState
from speechbrain_blspkd.nnet.plora.weights import (
    load_plora_state_dict,
    merge_plora,
    plora_config,
    plora_parameters,
    plora_state_dict,
)

__all__ = [
    "DEFAULT_TARGETS",
    "PLoRALinear",
    "PLoRAState",
    "SCOPES",
    "apply_plora",
    "disable_plora",
    "load_plora_state_dict",
    "merge_plora",
    "plora_config",
    "plora_mask",
    "plora_parameters",
    "plora_state_dict",
    "scope_mask",
    "set_plora_mask",
]
