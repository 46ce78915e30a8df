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

The mask and the input length
-----------------------------
The mask describes the positions of the input of the *current* forward pass
(``(B, L)``; its batch may also divide the input batch, e.g. beam search,
where rows are repeated with ``repeat_interleave`` as HF does). With a KV
cache the positions seen by a forward pass change, and the rule is:

* input length == ``L``: the mask is used as is (training, prompt pass of
  ``generate()``, a prompt that follows a cached fixed prefix when the mask
  covers only the new part);
* input length < ``L`` (decode steps of ``generate()`` with a KV cache): every
  input position is a *generated* token;
* input length > ``L`` (``generate(use_cache=False)`` recomputing the whole
  sequence): the first ``L`` positions use the mask, the rest are generated.

Generated tokens get no delta in scope ``"audio"`` (they are never speech) and
the delta in scope ``"text"`` (they are text). Because the prompt pass runs
with the mask, the KV cache holds the LoRA-adapted keys/values of the speech
positions, and cached decoding equals a full recomputation. In training (train
mode with grad enabled) a length mismatch is an error (it almost always means
a wrong mask); ``generate()`` runs without grad and is never refused. A prompt
of length 1 is ambiguous with a decode step; it is treated as the prompt.

The mask is stored in one :class:`PLoRAState` shared by all wrapped layers.
It stays set until changed: with gradient checkpointing the forward is re-run
during ``backward()``, so keep the student's mask set until then (do not call
``backward()`` outside a :func:`plora_mask` block that you used for the
forward).

Why not peft
------------
peft 0.21 adapts every position of a forward pass; its only position-aware
variant (aLoRA, ``alora_invocation_tokens``) switches the adapter on for a
*suffix* that starts at an invocation token found in ``input_ids``. Speech
positions sit in the middle of the prompt and arrive as ``inputs_embeds``, so
neither maps onto an arbitrary per-position mask without patching peft's
layer forward. The layer here is small, has no version coupling, and gives
exact base-model equality when the delta is off.

Adapter weights are created in float32 by default (``adapter_dtype``) on the
base weight's device; the delta is computed in the adapter dtype and cast back
to the base output dtype, so a bf16 LLM can carry fp32 adapters.
"""

import contextlib
import math
import re

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_TARGETS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
SCOPES = ("audio", "text", "global")


class PLoRAState:
    """Mask and on/off switch shared by all :class:`PLoRALinear` of a model.

    Arguments
    ---------
    scope : str
        One of ``"audio"``, ``"text"``, ``"global"`` (see the module notes).

    Example
    -------
    >>> state = PLoRAState("audio")
    >>> state.set_mask(torch.tensor([[0, 1, 1]]))
    >>> state.weights(torch.zeros(1, 3, 4)).squeeze(-1)
    tensor([[0., 1., 1.]])
    >>> state.weights(torch.zeros(1, 1, 4)) is None  # decode step: no delta
    True
    """

    def __init__(self, scope="audio"):
        if scope not in SCOPES:
            raise ValueError(f"PLoRA scope {scope!r} is not one of {SCOPES}")
        self.scope = scope
        self.mask = None
        self.disabled = 0
        self._any = False
        self._cache = {}

    def set_mask(self, mask):
        """Set the ``(B, L)`` position mask (bool or float), or ``None``."""
        if mask is not None:
            if not torch.is_tensor(mask) or mask.dim() != 2:
                raise ValueError(
                    "PLoRA mask must be a (batch, length) tensor, got "
                    f"{getattr(mask, 'shape', type(mask).__name__)}"
                )
            mask = mask.detach()
            # One host sync per mask, so an all-zero mask skips the delta
            # (exact base model) without a check in every layer.
            self._any = bool((mask != 0).any())
        else:
            self._any = False
        self.mask = mask
        self._cache = {}

    def _generated_on(self):
        return self.scope != "audio"

    def weights(self, x, training=False):
        """Per-position delta weights for input ``x``.

        Arguments
        ---------
        x : torch.Tensor
            Layer input ``(B, S, in)`` (or ``(B * S, in)`` flattened).
        training : bool
            Whether the caller is training (train mode with grad enabled); a
            length mismatch then raises.

        Returns
        -------
        None, True or torch.Tensor
            ``None``: no delta; ``True``: delta everywhere; else a tensor
            broadcastable to the layer output, ``(B, S, 1)`` (or
            ``(B * S, 1)``), in ``x``'s device and the adapter dtype of the
            caller (float32 here; cast by the caller).
        """
        if self.disabled:
            return None
        if self.scope == "global":
            return True
        if self.mask is None:
            return None
        flat = x.dim() == 2
        key = (tuple(x.shape[:-1]), x.device, bool(training))
        if key in self._cache:
            return self._cache[key]
        mask = self.mask
        mb, ml = mask.shape
        if flat:
            if x.shape[0] % ml:
                raise ValueError(
                    f"PLoRA: flattened input of {x.shape[0]} rows does not "
                    f"fit the mask of length {ml}"
                )
            xb, xl = x.shape[0] // ml, ml
        elif x.dim() == 3:
            xb, xl = x.shape[0], x.shape[1]
        else:
            raise ValueError(
                "PLoRA layers expect (batch, length, features) inputs, got "
                f"shape {tuple(x.shape)}"
            )
        if xb != mb:
            if xb % mb:
                raise ValueError(
                    f"PLoRA mask batch {mb} does not divide input batch {xb}"
                )
            mask = mask.repeat_interleave(xb // mb, dim=0)
        if xl != ml and training:
            raise ValueError(
                f"PLoRA mask length {ml} != input length {xl} in training "
                "mode; set the mask for the positions of this forward pass"
            )
        if xl == ml:
            if not self._any:
                result = None
            else:
                result = mask.to(device=x.device, dtype=torch.float32)
        elif xl < ml:
            result = True if self._generated_on() else None
        else:
            tail = torch.full(
                (xb, xl - ml),
                float(self._generated_on()),
                device=x.device,
                dtype=torch.float32,
            )
            result = torch.cat([mask.to(tail), tail], dim=1)
        if torch.is_tensor(result):
            result = result.reshape(-1, 1) if flat else result.unsqueeze(-1)
        self._cache[key] = result
        return result

    def rows(self, weights):
        """The flat rows a mask tensor from :meth:`weights` selects.

        The delta is computed on these rows only: for scope "audio" the
        speech positions are a small share of the sequence, so most of the
        adapter matmuls, dropout draws and masking are skipped.

        Arguments
        ---------
        weights : torch.Tensor
            A tensor returned by :meth:`weights`.

        Returns
        -------
        index : torch.Tensor
            (K,) long indices into the flattened (B * S) positions.
        scale : torch.Tensor or None
            (K, 1) weights of those rows, None when they are all 1.
        """
        key = ("rows", weights.data_ptr(), tuple(weights.shape))
        if key not in self._cache:
            flat = weights.reshape(-1)
            index = flat.nonzero().squeeze(1)
            scale = flat.index_select(0, index)[:, None]
            if bool((scale == 1).all()):
                scale = None
            self._cache[key] = (index, scale)
        return self._cache[key]


class PLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a position-masked low-rank delta.

    Arguments
    ---------
    base : torch.nn.Linear
        The layer to wrap (kept as ``self.base``; frozen).
    state : PLoRAState
        Shared mask state (one per model).
    r : int
        Rank.
    alpha : float
        Scaling numerator: the delta is multiplied by ``alpha / r``.
    dropout : float
        Dropout on the adapter input.
    adapter_dtype : torch.dtype, optional
        dtype of ``lora_A`` / ``lora_B`` (default float32; ``None``: the base
        weight's dtype).

    Example
    -------
    >>> state = PLoRAState("audio")
    >>> layer = PLoRALinear(nn.Linear(4, 3), state, r=2, alpha=2, dropout=0.0)
    >>> x = torch.randn(1, 3, 4)
    >>> torch.equal(layer(x), layer.base(x))  # no mask: base layer
    True
    >>> _ = nn.init.ones_(layer.lora_B)
    >>> state.set_mask(torch.tensor([[False, True, False]]))
    >>> (layer(x) != layer.base(x)).any(-1)
    tensor([[False,  True, False]])
    """

    def __init__(
        self,
        base,
        state,
        r=16,
        alpha=16,
        dropout=0.05,
        adapter_dtype=torch.float32,
    ):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(
                f"PLoRALinear wraps nn.Linear, got {type(base).__name__}"
            )
        if int(r) < 1:
            raise ValueError(f"PLoRA rank r must be >= 1, got {r}")
        self.base = base
        self.r = int(r)
        self.alpha = float(alpha)
        self.scaling = self.alpha / self.r
        self.state = state
        dtype = adapter_dtype or base.weight.dtype
        kw = dict(device=base.weight.device, dtype=dtype)
        self.lora_A = nn.Parameter(torch.empty(self.r, base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, self.r, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def _adapter_input(self, x):
        # under autocast F.linear casts anyway: an explicit cast to the
        # adapter dtype first would copy every activation twice
        if torch.is_autocast_enabled(x.device.type):
            return x
        return x.to(self.lora_A.dtype)

    def delta_weight(self):
        """The dense delta ``(alpha / r) * B @ A`` (out, in), adapter dtype."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x):
        """Base output plus the masked delta (see the module notes)."""
        y = self.base(x)
        strict = self.training and torch.is_grad_enabled()
        m = self.state.weights(x, training=strict)
        if m is None:
            return y
        if m is True:
            h = self.dropout(self._adapter_input(x))
            d = F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling
            return y + d.to(y.dtype)
        # masked: the delta on the selected rows only, added in place of
        # the dense ``y + delta * mask`` (same values, far less work)
        index, scale = self.state.rows(m)
        x = self._adapter_input(x)
        if self.training and not isinstance(self.dropout, nn.Identity):
            # dropout on the selected input rows only
            rows = x.reshape(-1, x.shape[-1]).index_select(0, index)
            h = F.linear(self.dropout(rows), self.lora_A)
        else:
            # the rank-r projection is cheap densely; selecting its (K, r)
            # rows keeps the backward scatter small
            h = F.linear(x, self.lora_A).reshape(-1, self.r)
            h = h.index_select(0, index)
        d = F.linear(h, self.lora_B) * self.scaling
        if scale is not None:
            d = d * scale.to(d.dtype)
        flat_y = y.reshape(-1, y.shape[-1])
        return flat_y.index_add(0, index, d.to(y.dtype)).view(y.shape)

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha:g}, scope={self.state.scope}"


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
