"""The PLoRA layer: a frozen linear layer plus a position-masked delta.

:class:`PLoRALinear` computes ``y = W0 x + m_t * (alpha / r) * B A
dropout(x)`` (the package notes); the per-position weights ``m_t`` come from
one :class:`PLoRAState` that every wrapped layer of a model shares.

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
``backward()`` outside a
:func:`~speechbrain_blspkd.nnet.plora.inject.plora_mask` block that you used
for the forward).

Adapter weights are created in float32 by default (``adapter_dtype``) on the
base weight's device; the delta is computed in the adapter dtype and cast back
to the base output dtype, so a bf16 LLM can carry fp32 adapters.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SCOPES", "PLoRALinear", "PLoRAState"]

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
