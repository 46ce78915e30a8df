"""Whisper speech encoder with a dynamic-length path.

:class:`WhisperEncoder` wraps the encoder of a HF ``WhisperModel`` (loaded
from a local folder, or built from a ``WhisperConfig`` for tests) and turns
waveforms into encoder frames at 50 frames/s.

Features: the Whisper log-mel spectrogram computed in torch
(:mod:`speechbrain_blspkd.nnet.whisper_features`, which reproduces
``WhisperFeatureExtractor``).

Encoding: HF's encoder refuses anything but 30 s (3000 mel frames). Two
paths:

* ``dynamic_length=True`` (default): the batch is padded to its longest clip
  (mel frames rounded up to a multiple of 2), the positional table is sliced
  to that length and the layers are called directly. With ``mask_padding``
  (default) the attention ignores the batch padding, so an utterance's
  frames do not depend on the other clips of the batch (batched == one by
  one).
* ``dynamic_length=False``: the standard 30-s padded encoding, then sliced
  to the same number of frames as the dynamic path (same output shape).

:class:`WhisperLogMel` is the front end alone (no weights): the frames the
dynamic path feeds the convolutions, for a model whose adapter reads
log-mels; :meth:`WhisperEncoder.layer_states` encodes such frames and
returns the hidden states of chosen layers (a teacher distilled from).

The 30-s path reproduces HF exactly (max abs difference 0.0 against
``WhisperModel.encoder`` on ``WhisperFeatureExtractor`` features). The
dynamic path is not identical: in the 30-s version every frame also attends
to up to 30 s of encoded silence. Measured with Whisper-base on 8 espeak-ng
English clips of 0.8-7.2 s (one batch, 2 CPU cores), frames of the real part
compared with the 30-s encoding:

=====================  ==========  ========  =======  ============  =======
path                   cos median  cos mean  cos min  max abs diff  speed
=====================  ==========  ========  =======  ============  =======
dynamic, masked        0.976       0.931     -0.42    22.1          5.5x
dynamic, unmasked      --          0.965     -0.42    21.2          5.5x
=====================  ==========  ========  =======  ============  =======

(frame std 1.42; 90 % of frames have cosine > 0.9; the speed-up is 4.1x
with bf16 weights: 11.5 s -> 2.8 s for the batch, fp32 27.7 s -> 5.0 s).
The differences concentrate in the last frames of each clip (trailing
silence) and in very short clips (a 0.8-s clip: mean cosine 0.67). The
encoder is frozen and the adapter learns on whichever path the recipe uses,
so train and decode with the same setting; masking keeps batched encoding
equal to one-by-one encoding, which the unmasked variant does not.

Authors
 * speechbrain-blspkd contributors 2025
"""

import torch
from torch import nn

# whisper_log_mel lives in whisper_features and stays importable from here
from speechbrain_blspkd.nnet.whisper_features import (
    CHUNK_SECONDS,
    HOP,
    SAMPLE_RATE,
    _batch_log_mel,
    _mel_filters,
    _mel_frames,
    whisper_log_mel,
)
from speechbrain_blspkd.nnet.whisper_folder import load_whisper_model
from speechbrain_blspkd.utils.precision import resolve_dtype

__all__ = ["WhisperEncoder", "WhisperLogMel", "whisper_log_mel"]


class WhisperLogMel(nn.Module):
    """Whisper's log-mel front end alone: waveforms -> mel frames (100/s).

    The encoder slot of a model whose adapter reads log-mels instead of
    encoder frames (AuRA's audio embedding layer, ``docs/algorithms.md``
    section 2.7): no weights, nothing to load.  The frames are exactly
    those :class:`WhisperEncoder` (``dynamic_length=True``) feeds its
    convolutions, two silent frames after the longest clip included, so
    :meth:`WhisperEncoder.layer_states` on them equals the encoder on the
    waveforms (a teacher distilling from the same frames).

    Arguments
    ---------
    n_mels : int
        Mel bins (80, or 128 for large-v3).

    Example
    -------
    >>> front_end = WhisperLogMel()
    >>> mel, lens = front_end(torch.randn(2, 16000) * 0.1,
    ...     torch.tensor([1.0, 0.5]))
    >>> mel.shape, (lens * mel.shape[1]).round().tolist()
    (torch.Size([2, 102, 80]), [100.0, 50.0])
    >>> front_end.export_hparams()
    {'n_mels': 80}
    """

    #: Nothing to train (export and the feature cache read these).
    freeze = True
    dynamic_length = True

    def __init__(self, n_mels=80):
        super().__init__()
        if int(n_mels) != n_mels or n_mels < 1:
            raise ValueError(f"WhisperLogMel: bad n_mels {n_mels!r}")
        self.n_mels = int(n_mels)
        self.max_frames = int(CHUNK_SECONDS * SAMPLE_RATE / HOP / 2)
        self.register_buffer(
            "mel_filters", _mel_filters(self.n_mels, "cpu"), persistent=False
        )

    @property
    def output_size(self):
        """Width of the frames (the mel bins)."""
        return self.n_mels

    def export_hparams(self):
        """Constructor arguments that rebuild it (for the export)."""
        return {"n_mels": self.n_mels}

    @staticmethod
    def frame_rate():
        """Mel frames per second (100).

        Example
        -------
        >>> WhisperLogMel.frame_rate()
        100.0
        """
        return SAMPLE_RATE / HOP

    @torch.no_grad()
    def forward(self, wavs, wav_lens=None):
        """Log-mel frames of a batch of waveforms.

        Arguments
        ---------
        wavs, wav_lens
            As in :meth:`WhisperEncoder.forward`.

        Returns
        -------
        mel : torch.Tensor
            (B, M, n_mels) float32 frames.
        lens : torch.Tensor
            (B,) relative lengths of each clip's frames, ceil(samples / 160).
        """
        mel, counts, _ = _batch_log_mel(
            wavs,
            wav_lens,
            self.n_mels,
            self.mel_filters,
            self.max_frames,
            True,
            type(self).__name__,
        )
        return mel.transpose(1, 2), counts.to(torch.float32) / mel.shape[-1]


class WhisperEncoder(nn.Module):
    """The encoder of a Whisper model: waveforms -> frames (50 per second).

    Arguments
    ---------
    source : str, pathlib.Path or transformers.WhisperConfig
        A local transformers Whisper folder (e.g. the ``whisper-base``
        asset), or a config for a randomly initialised encoder (tests).
    freeze : bool
        Freeze the weights (no grad, kept in eval mode).
    dynamic_length : bool
        Encode at the batch length instead of 30 s (see the module notes).
    mask_padding : bool
        In the dynamic path, mask the batch padding in self-attention.
    dtype : torch.dtype or str, optional
        Weight dtype of the encoder: a dtype or name, or ``"auto"``
        (bfloat16 where the run's device computes it fast, else float32;
        :mod:`speechbrain_blspkd.utils.precision`). None keeps float32.
        The log-mel front end is computed in float32.
    output_dtype : torch.dtype, optional
        dtype of the returned frames (default float32; None keeps the
        encoder's dtype).

    Example
    -------
    >>> from transformers import WhisperConfig
    >>> config = WhisperConfig(d_model=32, encoder_layers=1,
    ...     encoder_attention_heads=2, encoder_ffn_dim=64, num_mel_bins=80)
    >>> encoder = WhisperEncoder(config)
    >>> wavs = torch.randn(2, 16000) * 0.1
    >>> feats, lens = encoder(wavs, torch.tensor([1.0, 0.5]))
    >>> feats.shape, lens.tolist()
    (torch.Size([2, 50, 32]), [1.0, 0.5])
    """

    def __init__(
        self,
        source,
        freeze=True,
        dynamic_length=True,
        mask_padding=True,
        dtype=None,
        output_dtype=torch.float32,
    ):
        super().__init__()
        from transformers import WhisperConfig

        if isinstance(source, WhisperConfig):
            from transformers.models.whisper import modeling_whisper

            model = nn.Module()
            model.encoder = modeling_whisper.WhisperEncoder(source)
        else:
            model = load_whisper_model(source, "WhisperEncoder")
        self.encoder = model.encoder
        del model
        dtype = resolve_dtype(dtype)
        if dtype is not None:
            self.encoder.to(dtype)
        self.config = self.encoder.config
        self.n_mels = self.config.num_mel_bins
        self.max_frames = self.config.max_source_positions
        self.output_size = self.config.d_model
        self.freeze = freeze
        self.dynamic_length = dynamic_length
        self.mask_padding = mask_padding
        self.output_dtype = output_dtype
        self.register_buffer(
            "mel_filters", _mel_filters(self.n_mels, "cpu"), persistent=False
        )
        if freeze:
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    def train(self, mode=True):
        """Sets train mode; a frozen encoder stays in eval mode."""
        super().train(mode)
        if self.freeze:
            self.encoder.eval()
        return self

    def num_frames(self, num_samples):
        """Encoder frames holding the clip: ceil(ceil(samples / 160) / 2).

        Arguments
        ---------
        num_samples : torch.Tensor
            (B,) numbers of samples.

        Returns
        -------
        torch.Tensor
            (B,) long: the encoder frames of each clip.

        Example
        -------
        >>> from transformers import WhisperConfig
        >>> enc = WhisperEncoder(WhisperConfig(d_model=8, encoder_layers=1,
        ...     encoder_attention_heads=2, encoder_ffn_dim=8))
        >>> enc.num_frames(torch.tensor([16000, 161])).tolist()
        [50, 1]
        """
        mel = _mel_frames(num_samples)
        return torch.div(mel + 1, 2, rounding_mode="floor").long()

    def forward(self, wavs, wav_lens=None):
        """Encodes a batch of waveforms.

        Arguments
        ---------
        wavs : torch.Tensor
            (B, S) 16-kHz waveforms, zero-padded on the right, at most 30 s.
        wav_lens : torch.Tensor, optional
            (B,) relative lengths (SpeechBrain style); None = all full.

        Returns
        -------
        feats : torch.Tensor
            (B, T', d) encoder frames, T' = frames of the longest clip.
        lens : torch.Tensor
            (B,) relative lengths of the real frames (SpeechBrain style).
        """
        grad = torch.is_grad_enabled() and not self.freeze
        with torch.set_grad_enabled(grad):
            mel, mel_counts, length = _batch_log_mel(
                wavs,
                wav_lens,
                self.n_mels,
                self.mel_filters,
                self.max_frames,
                self.dynamic_length,
                "WhisperEncoder",
            )
            frames = torch.div(mel_counts + 1, 2, rounding_mode="floor")
            masked = self.dynamic_length and self.mask_padding
            feats, _ = self._encode(mel, length, frames if masked else None)
        out_frames = int(frames.max())
        feats = feats[:, :out_frames]
        if self.output_dtype is not None:
            feats = feats.to(self.output_dtype)
        return feats, frames.to(torch.float32) / out_frames

    def layer_states(self, mel, mel_lens=None, layers=(-1,)):
        """Hidden states at chosen layers, from :class:`WhisperLogMel` frames.

        On the frames of :class:`WhisperLogMel` the last layer equals
        :meth:`forward` on the same waveforms (the dynamic path), so a
        model that reads log-mels can be distilled from this encoder on
        exactly what it heard.  No gradient reaches a frozen encoder.

        Arguments
        ---------
        mel : torch.Tensor
            (B, M, n_mels) log-mel frames (100 per second).
        mel_lens : torch.Tensor, optional
            (B,) relative lengths of the clips' frames (None: all M).
        layers : sequence of int
            Hidden-state indices, as Hugging Face's
            ``output_hidden_states``: 0 the input of the first layer
            (convolutions + positions), ``k`` the output of layer ``k``,
            the last (``encoder_layers``, or -1) after the final norm (what
            :meth:`forward` returns).

        Returns
        -------
        states : dict
            layer -> (B, T, d) frames (``output_dtype``), T the longest
            clip's encoder frames.
        frames : torch.Tensor
            (B,) long: each clip's encoder frames, ceil(mel frames / 2).

        Example
        -------
        >>> from transformers import WhisperConfig
        >>> enc = WhisperEncoder(WhisperConfig(d_model=8, encoder_layers=2,
        ...     encoder_attention_heads=2, encoder_ffn_dim=8))
        >>> wavs, lens = torch.randn(2, 8000) * 0.1, torch.tensor([1.0, 0.6])
        >>> mel, mel_lens = WhisperLogMel()(wavs, lens)
        >>> states, frames = enc.layer_states(mel, mel_lens, layers=(1, -1))
        >>> states[1].shape, frames.tolist()
        (torch.Size([2, 25, 8]), [25, 15])
        >>> torch.equal(states[-1], enc(wavs, lens)[0])
        True
        """
        if not self.dynamic_length:
            raise ValueError(
                "WhisperEncoder.layer_states: encoding log-mel frames needs "
                "dynamic_length=True (the 30-s path pads the waveform)"
            )
        if mel.dim() != 3 or mel.shape[-1] != self.n_mels:
            raise ValueError(
                f"WhisperEncoder.layer_states: `mel` must be (B, M, "
                f"{self.n_mels}), got {tuple(mel.shape)}"
            )
        count = len(self.encoder.layers)
        wanted = []
        for layer in layers:
            if int(layer) != layer or not -1 <= layer <= count:
                raise ValueError(
                    f"WhisperEncoder.layer_states: layer {layer!r} is not in "
                    f"0..{count} (or -1)"
                )
            wanted.append(int(layer))
        total = mel.shape[1]
        if mel_lens is None:
            counts = torch.full((mel.shape[0],), total, device=mel.device)
        else:
            counts = torch.round(mel_lens.to(mel.device) * total).long()
        counts = counts.clamp(min=1, max=total)
        frames = torch.div(counts + 1, 2, rounding_mode="floor")
        length = int(frames.max())
        grad = torch.is_grad_enabled() and not self.freeze
        with torch.set_grad_enabled(grad):
            final, states = self._encode(
                mel.transpose(1, 2).float(),
                length,
                frames if self.mask_padding else None,
                [count if layer == -1 else layer for layer in wanted],
            )
        out = {}
        for layer in wanted:
            value = final if layer in (-1, count) else states[layer]
            if self.output_dtype is not None:
                value = value.to(self.output_dtype)
            out[layer] = value
        return out, frames

    def mel_stride(self):
        """Mel frames per encoder frame (the convolutions' strides: 2).

        Example
        -------
        >>> from transformers import WhisperConfig
        >>> WhisperEncoder(WhisperConfig(d_model=8, encoder_layers=1,
        ...     encoder_attention_heads=2, encoder_ffn_dim=8)).mel_stride()
        2
        """
        return int(self.encoder.conv1.stride[0] * self.encoder.conv2.stride[0])

    def _encode(self, mel, length, frames=None, layers=()):
        """Encoder on (B, n_mels, >= 2 T - 1) features -> (B, T = length, d),
        and the hidden states of ``layers`` (0 .. number of layers - 1; the
        last layer is the returned, normed output)."""
        enc = self.encoder
        dtype = enc.conv1.weight.dtype
        x = nn.functional.gelu(enc.conv1(mel.to(dtype)))
        x = nn.functional.gelu(enc.conv2(x)).permute(0, 2, 1)[:, :length]
        if length > self.max_frames:
            raise ValueError(
                f"WhisperEncoder: {length} frames exceed the positional "
                f"table ({self.max_frames})"
            )
        if x.shape[1] < length:
            raise ValueError(
                f"WhisperEncoder: {mel.shape[-1]} mel frames give "
                f"{x.shape[1]} encoder frames, fewer than {length}"
            )
        x = x + enc.embed_positions.weight[:length].to(x.dtype)
        x = nn.functional.dropout(x, p=enc.dropout, training=enc.training)
        attn_mask = None
        if frames is not None and bool((frames < length).any()):
            valid = (
                torch.arange(length, device=x.device)[None] < frames[:, None]
            )
            attn_mask = torch.zeros(
                x.shape[0], 1, 1, length, dtype=x.dtype, device=x.device
            )
            attn_mask = attn_mask.masked_fill(
                ~valid[:, None, None, :], torch.finfo(x.dtype).min
            )
        states = {0: x} if 0 in layers else {}
        for index, layer in enumerate(enc.layers, start=1):
            x = layer(x, attn_mask)
            if index in layers:
                states[index] = x
        return enc.layer_norm(x), states

    @staticmethod
    def frame_rate():
        """Encoder frames per second (50).

        Example
        -------
        >>> WhisperEncoder.frame_rate()
        50.0
        """
        return SAMPLE_RATE / HOP / 2
