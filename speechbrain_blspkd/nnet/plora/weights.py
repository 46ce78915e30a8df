"""PLoRA's own weights: listing, saving, loading, merging them.

The adapter parameters of a model prepared with
:func:`~speechbrain_blspkd.nnet.plora.inject.apply_plora`
(:func:`plora_parameters`), the configuration it was given
(:func:`plora_config`), a state dict of the adapters alone and its strict
loading (:func:`plora_state_dict`, :func:`load_plora_state_dict`), and
folding a global-scope delta into the base weights (:func:`merge_plora`).
"""

import torch
from torch import nn  # noqa: F401 (doctests)

from speechbrain_blspkd.nnet.plora.inject import (  # noqa: F401 (doctests)
    _state,
    _unwrap,
    _wrapped,
    apply_plora,
)

__all__ = [
    "load_plora_state_dict",
    "merge_plora",
    "plora_config",
    "plora_parameters",
    "plora_state_dict",
]


def plora_parameters(model):
    """The adapter parameters (``lora_A``, ``lora_B`` of every layer).

    Example
    -------
    >>> net = nn.Sequential()
    >>> net.add_module("q_proj", nn.Linear(4, 4))
    >>> _ = apply_plora(net, r=2)
    >>> [tuple(p.shape) for p in plora_parameters(net)]
    [(2, 4), (4, 2)]
    """
    return [p for _, m in _wrapped(model) for p in (m.lora_A, m.lora_B)]


def plora_config(model):
    """``dict(r, alpha, dropout, scope)`` given to :func:`apply_plora`.

    Example
    -------
    >>> net = nn.Sequential()
    >>> net.add_module("q_proj", nn.Linear(4, 4))
    >>> _ = apply_plora(net, r=2, alpha=4)
    >>> plora_config(net)["alpha"]
    4.0
    """
    model = _unwrap(model)
    config = getattr(model, "_plora_config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no PLoRA configuration")
    return dict(config)


def plora_state_dict(model):
    """Adapter weights only: ``{"<module>.lora_A": ..., "<module>.lora_B"}``.

    Keys use the wrapped module names relative to the unwrapped model (DDP
    and ``torch.compile`` wrappers are looked through), so they are stable
    across wrapping. Values are detached references (like
    ``nn.Module.state_dict``).

    Example
    -------
    >>> net = nn.Sequential()
    >>> net.add_module("q_proj", nn.Linear(4, 4))
    >>> _ = apply_plora(net, r=2)
    >>> sorted(plora_state_dict(net))
    ['q_proj.lora_A', 'q_proj.lora_B']
    """
    sd = {}
    for name, m in _wrapped(model):
        sd[f"{name}.lora_A"] = m.lora_A.detach()
        sd[f"{name}.lora_B"] = m.lora_B.detach()
    return sd


def load_plora_state_dict(model, state_dict):
    """Load adapter weights saved by :func:`plora_state_dict` (strict).

    Raises ``KeyError`` naming missing / unexpected keys and ``ValueError``
    on a shape mismatch; values are cast to the adapter dtype and device.

    Example
    -------
    >>> net = nn.Sequential()
    >>> net.add_module("q_proj", nn.Linear(4, 4))
    >>> _ = apply_plora(net, r=2)
    >>> sd = {k: torch.ones_like(v) for k, v in plora_state_dict(net).items()}
    >>> load_plora_state_dict(net, sd)
    >>> float(net.q_proj.lora_B.detach().sum())
    8.0
    """
    own = dict(
        (f"{n}.{w}", getattr(m, w))
        for n, m in _wrapped(model)
        for w in ("lora_A", "lora_B")
    )
    if not own:
        raise ValueError("load_plora_state_dict: the model has no PLoRA layers")
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise KeyError(
            "load_plora_state_dict: "
            f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''} "
            f"({len(missing)}), unexpected keys "
            f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} "
            f"({len(unexpected)})"
        )
    for key, param in own.items():
        value = state_dict[key]
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(
                f"load_plora_state_dict: {key} has shape {tuple(value.shape)}, "
                f"the model expects {tuple(param.shape)} (different r?)"
            )
    with torch.no_grad():
        for key, param in own.items():
            param.copy_(state_dict[key])


def merge_plora(model):
    """Fold the deltas into the base weights and remove the adapters.

    Only valid for scope ``"global"`` (a masked delta is not a weight
    change). Merging is done in float32 and cast to the base dtype.

    Returns
    -------
    list of str
        The merged module names.

    Example
    -------
    >>> net = nn.Sequential()
    >>> net.add_module("q_proj", nn.Linear(4, 4))
    >>> _ = apply_plora(net, r=2, scope="global")
    >>> merge_plora(net)
    ['q_proj']
    >>> type(net.q_proj).__name__
    'Linear'
    """
    model = _unwrap(model)
    state = _state(model)
    if state.scope != "global":
        raise ValueError(
            f"merge_plora: PLoRA scope {state.scope!r} applies the delta only "
            "at some positions and cannot be merged into the weights; only "
            "scope 'global' can"
        )
    merged = []
    for name, m in _wrapped(model):
        with torch.no_grad():
            w = m.base.weight
            delta = m.delta_weight().to(device=w.device, dtype=torch.float32)
            w.copy_((w.float() + delta).to(w.dtype))
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, m.base)
        merged.append(name)
    for attr in ("_plora_state", "_plora_config"):
        if hasattr(model, attr):
            delattr(model, attr)
    return merged
