"""Whisper decoder layers run over encoder frames.

Two modules run transformers' ``WhisperDecoderLayer`` stacks over encoder
frames of a padded batch: DiVA's Q-Former
(:class:`~speechbrain_blspkd.nnet.qformer.QFormer`, learned queries in
place of tokens) and the decoder teacher of the token timings
(:class:`~speechbrain_blspkd.nnet.whisper_decoder.WhisperDecoderTeacher`).
Both call the layers the same way (transformers 5.x):
``layer(x, self_mask, frames, encoder_attention_mask=cross_mask,
past_key_values=None, use_cache=False)``, the cross-attention mask being
additive and float, (B, 1, 1, T): 0 on a row's real frames, the dtype's
minimum on its padding.  This module holds that call once.

Authors
 * speechbrain-blspkd contributors 2026
"""

import torch

__all__ = ["frame_attention_mask", "run_decoder_layers"]


def frame_attention_mask(valid, dtype):
    """Additive cross-attention mask of the real frames.

    Arguments
    ---------
    valid : torch.Tensor
        (B, T) bool, True on the frames the cross-attention may read.
    dtype : torch.dtype
        Dtype of the attention scores.

    Returns
    -------
    torch.Tensor
        (B, 1, 1, T) on ``valid``'s device: 0 where ``valid``, the dtype's
        minimum elsewhere.

    Example
    -------
    >>> mask = frame_attention_mask(torch.tensor([[True, False]]),
    ...     torch.float32)
    >>> mask.shape, mask[0, 0, 0, 0].item(), bool(mask[0, 0, 0, 1] < -1e38)
    (torch.Size([1, 1, 1, 2]), 0.0, True)
    """
    mask = torch.zeros(
        valid.shape[0],
        1,
        1,
        valid.shape[1],
        dtype=dtype,
        device=valid.device,
    )
    return mask.masked_fill(~valid[:, None, None, :], torch.finfo(dtype).min)


def run_decoder_layers(layers, x, frames, valid, self_mask=None):
    """Runs Whisper decoder layers over ``x``, cross-attending to ``frames``.

    Arguments
    ---------
    layers : iterable of WhisperDecoderLayer
        The layers, in order.
    x : torch.Tensor
        (B, L, d) decoder inputs (embedded tokens or queries).
    frames : torch.Tensor
        (B, T, d) encoder frames, in the dtype of the scores.
    valid : torch.Tensor
        (B, T) bool, the frames the cross-attention may read.
    self_mask : torch.Tensor, optional
        Additive (B or 1, 1, L, L) self-attention mask; None leaves the
        self-attention to the layers (causal unless their ``is_causal``
        was switched off).

    Returns
    -------
    torch.Tensor
        (B, L, d) output of the last layer (before any final norm).

    Example
    -------
    >>> from transformers import WhisperConfig
    >>> from transformers.models.whisper.modeling_whisper import (
    ...     WhisperDecoderLayer)
    >>> config = WhisperConfig(d_model=8, decoder_attention_heads=2,
    ...     decoder_ffn_dim=16)
    >>> config._attn_implementation = "sdpa"
    >>> layers = [WhisperDecoderLayer(config, layer_idx=0).eval()]
    >>> frames = torch.randn(2, 5, 8)
    >>> valid = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    >>> run_decoder_layers(layers, torch.randn(2, 3, 8), frames,
    ...     valid).shape
    torch.Size([2, 3, 8])
    """
    cross_mask = frame_attention_mask(valid, frames.dtype)
    for layer in layers:
        x = layer(
            x,
            self_mask,
            frames,
            encoder_attention_mask=cross_mask,
            past_key_values=None,
            use_cache=False,
        )
        if isinstance(x, tuple):  # older transformers return tuples
            x = x[0]
    return x
