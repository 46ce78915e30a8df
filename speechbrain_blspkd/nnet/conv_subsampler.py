"""ConvSubsampler: BLSP's adapter from speech-encoder frames to LLM tokens.

BLSP (Wang et al., 2023, "BLSP: Bootstrapping Language-Speech Pre-training
via Behavior Alignment of Continuation Writing") connects a frozen Whisper
encoder to a frozen text LLM with a small trainable adapter, and trains only
that adapter. The training signal is *behaviour alignment*: for each
speech-transcript pair the LLM first writes a continuation of the
transcript text; the speech model is then trained with cross-entropy to
produce that same continuation when the transcript is replaced by the
speech embeddings. The LLM thus behaves the same way whether it reads the
words or hears them, without any instruction data for speech.

The adapter has to make the 50-frames-a-second encoder output short and
LLM-shaped, and nothing more (the encoder and the LLM do the rest):

* ``num_layers`` (3) blocks of a 1-D convolution over time (kernel 5,
  stride 2, padding ``kernel_size // 2``) followed by a GLU: the convolution
  outputs twice the channels and the GLU gates one half with the other, so
  each block keeps the width ``hidden_size`` and halves the frame rate
  (3 blocks: 8x fewer frames, 6.25 tokens a second);
* a bottleneck MLP with a residual connection
  (``x + W2 relu(W1 x)``, width ``hidden_size`` -> ``bottleneck`` -> back);
* a LayerNorm and a final Linear into the LLM width ``output_size``.

Padding: the output length of each row is computed exactly from its input
length with the convolution formula ``(n + 2 p - k) // s + 1``, and the
frames beyond a row's length are zeroed before every convolution, so a
row's valid outputs do not depend on how much (or what) padding the batch
adds: they equal what the row alone gives.

Authors
 * speechbrain-blspkd contributors 2026
"""

import torch
from torch import nn

from speechbrain_blspkd.nnet.adapter import AdapterOutput, SpeechAdapter

__all__ = ["ConvSubsampler"]


class ConvSubsampler(SpeechAdapter):
    """BLSP's adapter: encoder frames (B, T, d) -> tokens (B, ~T/8, D).

    Arguments
    ---------
    input_size : int
        Width d of the encoder frames.
    output_size : int
        Width D of the LLM embeddings.
    hidden_size : int, optional
        Width of the convolution blocks (their GLU outputs) and of the
        bottleneck MLP's input and output (default: ``input_size``).
    num_layers : int
        Number of convolution + GLU blocks (each divides the frame count
        by ``stride``).
    kernel_size : int
        Kernel of the convolutions (padding ``kernel_size // 2``).
    stride : int
        Stride of the convolutions.
    bottleneck : int
        Inner width of the residual MLP (512 in BLSP).
    dropout : float
        Dropout after each convolution block and inside the MLP.

    Example
    -------
    >>> adapter = ConvSubsampler(16, 24, bottleneck=8)
    >>> feats = torch.randn(2, 40, 16)
    >>> out = adapter(feats, lengths=torch.tensor([1.0, 0.5]))
    >>> out.tokens.shape, out.token_counts.tolist()
    (torch.Size([2, 5, 24]), [5, 3])
    >>> adapter.output_size()
    24
    """

    def __init__(
        self,
        input_size,
        output_size,
        hidden_size=None,
        num_layers=3,
        kernel_size=5,
        stride=2,
        bottleneck=512,
        dropout=0.0,
    ):
        super().__init__()
        if hidden_size is None:
            hidden_size = input_size
        self.check_sizes(
            input_size=input_size,
            output_size=output_size,
            hidden_size=hidden_size,
            num_layers=num_layers,
            kernel_size=kernel_size,
            stride=stride,
            bottleneck=bottleneck,
        )
        self.input_size = int(input_size)
        self.hidden_size = int(hidden_size)
        self.kernel_size = int(kernel_size)
        self.stride = int(stride)
        self.padding = self.kernel_size // 2
        self.convs = nn.ModuleList(
            nn.Conv1d(
                self.input_size if i == 0 else self.hidden_size,
                2 * self.hidden_size,
                self.kernel_size,
                stride=self.stride,
                padding=self.padding,
            )
            for i in range(int(num_layers))
        )
        self.dropout = nn.Dropout(dropout)
        self.down = nn.Linear(self.hidden_size, int(bottleneck))
        self.up = nn.Linear(int(bottleneck), self.hidden_size)
        self.norm = nn.LayerNorm(self.hidden_size)
        self.out_proj = nn.Linear(self.hidden_size, int(output_size))

    def output_size(self):
        """Width of the speech embeddings (the LLM hidden size)."""
        return self.out_proj.out_features

    def output_lengths(self, num_frames):
        """Output frames of inputs of ``num_frames`` frames.

        Arguments
        ---------
        num_frames : torch.Tensor or int
            Input frame counts.

        Returns
        -------
        torch.Tensor
            The counts after every convolution (long, same shape).

        Example
        -------
        >>> adapter = ConvSubsampler(8, 8, bottleneck=4)
        >>> adapter.output_lengths(torch.tensor([1, 8, 9, 100])).tolist()
        [1, 1, 2, 13]
        """
        frames = torch.as_tensor(num_frames).long()
        for _ in self.convs:
            frames = self._conv_length(frames)
        return frames

    def _conv_length(self, frames):
        span = frames + 2 * self.padding - self.kernel_size
        return torch.div(span, self.stride, rounding_mode="floor") + 1

    def forward(self, feats, lengths=None, targets=None):
        """Subsamples the frames and maps them into the LLM space.

        Arguments
        ---------
        feats, lengths
            As in :meth:`~speechbrain_blspkd.nnet.adapter.SpeechAdapter.forward`.
        targets : AdapterTargets, optional
            Unused (the output length follows from the input length).

        Returns
        -------
        AdapterOutput
            ``tokens`` (B, T', output_size), zero beyond each row's
            length, and ``token_mask`` (B, T') its valid frames, T' the
            output length of T frames.
        """
        self.check_feats(feats)
        mask = self.frame_mask(feats, lengths)
        frames = mask.sum(dim=1)
        x = feats.to(self.out_proj.weight.dtype).transpose(1, 2)
        for conv in self.convs:
            x = x.masked_fill(~mask[:, None, :], 0.0)
            x = nn.functional.glu(conv(x), dim=1)
            x = self.dropout(x)
            frames = self._conv_length(frames)
            positions = torch.arange(x.shape[-1], device=x.device)
            mask = positions[None, :] < frames[:, None]
        x = x.transpose(1, 2)
        x = x + self.up(self.dropout(torch.relu(self.down(x))))
        x = self.out_proj(self.norm(x))
        x = x.masked_fill(~mask[..., None], 0.0)
        return AdapterOutput(tokens=x, token_mask=mask)
