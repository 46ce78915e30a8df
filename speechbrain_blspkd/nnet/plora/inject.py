"""Putting PLoRA into a model and steering it.

:func:`apply_plora` wraps a model's target linear layers with
:class:`~speechbrain_blspkd.nnet.plora.layer.PLoRALinear` (all sharing one
:class:`~speechbrain_blspkd.nnet.plora.layer.PLoRAState`); the mask that
says where the delta applies is set with :func:`set_plora_mask` or, for a
block, :func:`plora_mask`; :func:`disable_plora` switches the delta off
(the exact base model, the teacher); :func:`scope_mask` turns a speech mask
into the mask of a scope.  The helpers that find the wrapped layers of a
model (through DDP and ``torch.compile`` wrappers) live here too.
"""

import contextlib
import re

import torch
from torch import nn

from speechbrain_blspkd.nnet.plora.layer import SCOPES, PLoRALinear, PLoRAState
from speechbrain_blspkd.nnet.plora_targets import DEFAULT_TARGETS

__all__ = [
    "DEFAULT_TARGETS",
    "apply_plora",
    "disable_plora",
    "plora_mask",
    "scope_mask",
    "set_plora_mask",
]


def _unwrap(model):
    """The module under DDP / DataParallel / torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(
            model, (nn.parallel.DistributedDataParallel, nn.DataParallel)
        ):
            model = model.module
        else:
            return model


def _wrapped(model):
    """``[(name, PLoRALinear)]`` in module order."""
    return [
        (n, m)
        for n, m in _unwrap(model).named_modules()
        if isinstance(m, PLoRALinear)
    ]


def _state(model):
    model = _unwrap(model)
    state = getattr(model, "_plora_state", None)
    if state is None:
        for m in model.modules():
            if isinstance(m, PLoRALinear):
                return m.state
        raise ValueError(
            f"{type(model).__name__} has no PLoRA layers; "
            "call apply_plora first"
        )
    return state


def _matcher(target_modules):
    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        return lambda name: pattern.fullmatch(name) is not None
    suffixes = tuple(target_modules)
    if not suffixes:
        raise ValueError("PLoRA target_modules is empty")
    return lambda name: any(
        name == s or name.endswith("." + s) for s in suffixes
    )


def apply_plora(
    model,
    target_modules=DEFAULT_TARGETS,
    r=16,
    alpha=16,
    dropout=0.05,
    scope="audio",
    adapter_dtype=torch.float32,
    freeze_base=True,
):
    """Wrap the target linear layers of ``model`` with :class:`PLoRALinear`.

    Arguments
    ---------
    model : torch.nn.Module
        Typically a HF causal LM (Llama, Qwen2, SmolLM2, Gemma3 naming).
    target_modules : sequence of str or str
        Module-name suffixes (``"q_proj"`` matches ``...self_attn.q_proj``),
        or one regular expression matched against the full module name
        (``re.fullmatch``), e.g. ``r"model\\.layers\\.\\d+\\.self_attn\\..*"``.
        Only ``nn.Linear`` modules are wrapped.
    r, alpha, dropout : int, float, float
        LoRA rank, scaling numerator (delta scaled by ``alpha / r``), dropout
        on the adapter input.
    scope : str
        ``"audio"``, ``"text"`` or ``"global"`` (module notes).
    adapter_dtype : torch.dtype, optional
        Adapter weight dtype (default float32; ``None``: the base dtype).
    freeze_base : bool
        Set ``requires_grad=False`` on every non-adapter parameter of
        ``model`` (the BLSP-KD LLM is frozen apart from PLoRA).

    Returns
    -------
    list of str
        Names of the wrapped modules (relative to ``model``).

    Example
    -------
    >>> net = nn.Sequential()
    >>> net.add_module("q_proj", nn.Linear(4, 4))
    >>> net.add_module("fc", nn.Linear(4, 2))
    >>> apply_plora(net, r=2)
    ['q_proj']
    >>> [n for n, p in net.named_parameters() if p.requires_grad]
    ['q_proj.lora_A', 'q_proj.lora_B']
    """
    model = _unwrap(model)
    if _wrapped(model):
        raise ValueError("apply_plora: the model already has PLoRA layers")
    match = _matcher(target_modules)
    targets = [
        name
        for name, module in model.named_modules()
        if name and isinstance(module, nn.Linear) and match(name)
    ]
    if not targets:
        raise ValueError(
            f"apply_plora: no nn.Linear module of {type(model).__name__} "
            f"matches target_modules={target_modules!r}"
        )
    state = PLoRAState(scope)
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        wrapper = PLoRALinear(base, state, r, alpha, dropout, adapter_dtype)
        wrapper.train(base.training)
        setattr(parent, child, wrapper)
    model._plora_state = state
    model._plora_config = dict(
        r=int(r), alpha=float(alpha), dropout=float(dropout), scope=scope
    )
    return targets


def set_plora_mask(model, mask):
    """Set the positions where the delta applies (``(B, L)`` or ``None``).

    Arguments
    ---------
    model : torch.nn.Module
        A model prepared with :func:`apply_plora`.
    mask : torch.Tensor or None
        ``(B, L)`` bool or float over the positions of the next forward
        passes (speech positions for scope ``"audio"``, text positions for
        ``"text"``; ignored for ``"global"``). ``None``: no delta (audio,
        text).

    Example
    -------
    >>> net = nn.Sequential()
    >>> net.add_module("q_proj", nn.Linear(4, 4))
    >>> _ = apply_plora(net, r=2)
    >>> set_plora_mask(net, torch.ones(1, 3, dtype=torch.bool))
    >>> net._plora_state.mask.shape
    torch.Size([1, 3])
    """
    _state(model).set_mask(mask)


@contextlib.contextmanager
def plora_mask(model, mask):
    """Context manager: :func:`set_plora_mask`, restoring the previous mask.

    Example
    -------
    >>> net = nn.Sequential()
    >>> net.add_module("q_proj", nn.Linear(4, 4))
    >>> _ = apply_plora(net, r=2)
    >>> with plora_mask(net, torch.ones(1, 3)):
    ...     net._plora_state.mask is not None
    True
    >>> net._plora_state.mask is None
    True
    """
    state = _state(model)
    previous = state.mask
    state.set_mask(mask)
    try:
        yield
    finally:
        state.set_mask(previous)


@contextlib.contextmanager
def disable_plora(model):
    """Context manager: delta off in every scope (exact base model, teacher).

    Nestable; the mask is kept and applies again on exit.

    Example
    -------
    >>> net = nn.Sequential()
    >>> net.add_module("q_proj", nn.Linear(4, 4))
    >>> _ = apply_plora(net, r=2, scope="global")
    >>> _ = nn.init.ones_(net.q_proj.lora_B)
    >>> x = torch.randn(2, 4)
    >>> with disable_plora(net):
    ...     torch.equal(net(x), net.q_proj.base(x))
    True
    """
    state = _state(model)
    state.disabled += 1
    try:
        yield
    finally:
        state.disabled -= 1


def scope_mask(speech_mask, scope, attention_mask=None):
    """The PLoRA mask for ``scope`` from a speech-position mask.

    Arguments
    ---------
    speech_mask : torch.Tensor
        ``(B, L)`` bool, true at speech positions.
    scope : str
        ``"audio"`` -> the speech positions; ``"text"`` -> positions that are
        neither speech nor padding; ``"global"`` -> the non-padding positions
        (the layer ignores it anyway).
    attention_mask : torch.Tensor, optional
        ``(B, L)``, nonzero at real (non-padding) positions.

    Returns
    -------
    torch.Tensor
        ``(B, L)`` bool.

    Example
    -------
    >>> speech = torch.tensor([[False, True, True, False]])
    >>> att = torch.tensor([[0, 1, 1, 1]])
    >>> scope_mask(speech, "text", att)
    tensor([[False, False, False,  True]])
    """
    if scope not in SCOPES:
        raise ValueError(f"PLoRA scope {scope!r} is not one of {SCOPES}")
    speech = speech_mask.bool()
    real = (
        torch.ones_like(speech)
        if attention_mask is None
        else attention_mask != 0
    )
    if scope == "audio":
        return speech & real
    if scope == "text":
        return ~speech & real
    return real
