"""AudioEmbedding: AuRA's audio embedding layer, log-mels -> LLM positions.

AuRA (``docs/algorithms.md`` section 2.7) runs no speech encoder at
inference: the LLM, adapted with LoRA, reads the speech through this
lightweight layer alone, and training distils a Whisper encoder's
representations into the LLM's hidden states.  The layer is a **patch
embedding** of the Whisper log-mel frames
(:class:`~speechbrain_blspkd.nnet.whisper_encoder.WhisperLogMel`, 100 frames
a second):

* a 1-D convolution over time with kernel ``kernel_size`` (default: the
  stride, i.e. non-overlapping patches) and stride ``stride``: position
  ``j`` reads the mel frames ``j * stride .. j * stride + kernel_size - 1``,
  so the LLM sees ``100 / stride`` positions a second (stride 2, 4, 8: 50,
  25, 12.5 per second);
* GELU, LayerNorm, and a Linear into the LLM width.  With ``out_init_std``
  the projection starts with weights drawn from N(0, sigma^2 / hidden) and a
  zero bias, so its first outputs have about the standard deviation sigma of
  the LLM's token embeddings (the CFormer's initialisation, section 2.2).

No positional encoding: the LLM adds its own (rotary) positions.

A clip of ``m`` mel frames gives ``ceil(m / stride)`` positions.  Frames
beyond a row's length are zeroed before the convolution and the batch is
zero-padded on the right to whole patches, so a row's outputs do not depend
on the batch padding (they equal what the row gives alone).

The output (:class:`AudioEmbeddingOutput`) also says how many input frames
each position advances (``frames_per_token``): the distillation objective
aligns the Whisper frames (50 a second) to the positions with it
(:func:`speechbrain_blspkd.objectives.aura.align_frames`).

Authors
 * speechbrain-blspkd contributors 2026
"""

import dataclasses

import torch
from torch import nn

from speechbrain_blspkd.nnet.adapter import AdapterOutput, SpeechAdapter

__all__ = ["AudioEmbedding", "AudioEmbeddingOutput"]


@dataclasses.dataclass
class AudioEmbeddingOutput(AdapterOutput):
    """:class:`AdapterOutput` plus the patch stride.

    Arguments
    ---------
    tokens, token_mask
        See :class:`~speechbrain_blspkd.nnet.adapter.AdapterOutput`.
    frames_per_token : int
        Input frames between consecutive positions (the stride): position
        ``j`` starts at input frame ``j * frames_per_token``.
    """

    frames_per_token: int = 1


class AudioEmbedding(SpeechAdapter):
    """Patch embedding of log-mel frames (B, T, n_mels) -> (B, ~T/s, D).

    Arguments
    ---------
    input_size : int
        Mel bins of the frames (80 for Whisper-base).
    output_size : int
        Width D of the LLM embeddings.
    stride : int
        Mel frames per position (2, 4, 8: 50, 25, 12.5 positions a second).
    kernel_size : int, optional
        Mel frames each position reads (default ``stride``; at least
        ``stride``).
    hidden_size : int, optional
        Width after the convolution (default ``output_size``).
    dropout : float
        Dropout before the projection.
    out_init_std : float, optional
        Initial output standard deviation (see the module notes); None
        keeps PyTorch's default initialisation.

    Example
    -------
    >>> layer = AudioEmbedding(80, 16, stride=4)
    >>> out = layer(torch.randn(2, 10, 80), torch.tensor([1.0, 0.5]))
    >>> out.tokens.shape, out.token_counts.tolist(), out.frames_per_token
    (torch.Size([2, 3, 16]), [3, 2], 4)
    >>> AudioEmbedding(**layer.export_hparams()).output_size()
    16
    """

    def __init__(
        self,
        input_size,
        output_size,
        stride=4,
        kernel_size=None,
        hidden_size=None,
        dropout=0.0,
        out_init_std=None,
    ):
        super().__init__()
        if kernel_size is None:
            kernel_size = stride
        if hidden_size is None:
            hidden_size = output_size
        self.check_sizes(
            input_size=input_size,
            output_size=output_size,
            stride=stride,
            kernel_size=kernel_size,
            hidden_size=hidden_size,
        )
        if kernel_size < stride:
            raise ValueError(
                f"AudioEmbedding: kernel_size {kernel_size} < stride "
                f"{stride} would skip frames"
            )
        self.input_size = int(input_size)
        self.stride = int(stride)
        self.kernel_size = int(kernel_size)
        self.conv = nn.Conv1d(
            self.input_size,
            int(hidden_size),
            self.kernel_size,
            stride=self.stride,
        )
        self.norm = nn.LayerNorm(int(hidden_size))
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(int(hidden_size), int(output_size))
        if out_init_std is not None:
            with torch.no_grad():
                self.proj.weight.normal_(
                    0.0, float(out_init_std) / int(hidden_size) ** 0.5
                )
                self.proj.bias.zero_()

    def output_size(self):
        """Width of the speech embeddings (the LLM hidden size)."""
        return self.proj.out_features

    def output_lengths(self, num_frames):
        """Positions of clips of ``num_frames`` frames: ceil(frames / stride).

        Example
        -------
        >>> AudioEmbedding(80, 8, stride=4).output_lengths(
        ...     torch.tensor([1, 4, 5, 300])).tolist()
        [1, 1, 2, 75]
        """
        frames = torch.as_tensor(num_frames).long()
        return torch.div(
            frames + self.stride - 1, self.stride, rounding_mode="floor"
        )

    def forward(self, feats, lengths=None, targets=None):
        """Embeds each patch of frames into the LLM space.

        Arguments
        ---------
        feats, lengths
            As in :meth:`~speechbrain_blspkd.nnet.adapter.SpeechAdapter.forward`, the frames (B, T, input_size) being log-mels.
        targets : AdapterTargets, optional
            Unused (the count follows from the length).

        Returns
        -------
        AudioEmbeddingOutput
            ``tokens`` (B, N, output_size), zero beyond each row's count,
            ``token_mask`` (B, N) and ``frames_per_token`` (the stride).
        """
        self.check_feats(feats)
        mask = self.frame_mask(feats, lengths)
        counts = self.output_lengths(mask.sum(1))
        positions = int(counts.max())
        needed = (positions - 1) * self.stride + self.kernel_size
        x = feats.to(self.proj.weight.dtype).masked_fill(~mask[..., None], 0.0)
        if needed > x.shape[1]:
            x = nn.functional.pad(x, (0, 0, 0, needed - x.shape[1]))
        x = self.conv(x[:, :needed].transpose(1, 2)).transpose(1, 2)
        x = self.proj(self.dropout(self.norm(nn.functional.gelu(x))))
        token_mask = (
            torch.arange(positions, device=x.device)[None] < counts[:, None]
        )
        x = x.masked_fill(~token_mask[..., None], 0.0)
        return AudioEmbeddingOutput(
            tokens=x, token_mask=token_mask, frames_per_token=self.stride
        )
