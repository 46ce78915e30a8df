"""Language-ID gates: encoder frames (B, T, d) -> language logits (B, K).

The gating networks of the language-aware Q-Former
(:class:`~speechbrain_blspkd.nnet.language_aware_qformer.
LanguageAwareQFormer`, ``gate=``): both pool over the real frames only, so
padding never changes a row's logits.

* ``conv`` (:class:`ConvLanguageGate`): a convolutional language-ID network:
  frame LayerNorm, two 1-D convolutions (kernel 5, ReLU) over time, mean +
  standard-deviation pooling, and a two-layer classifier (the x-vector
  shape);
* ``attention`` (:class:`AttentionPoolingGate`): attention pooling (a
  learned score per frame, softmax over the frames) of the normalised
  frames, then a two-layer MLP.

Authors
 * speechbrain-blspkd contributors 2026
"""

import torch
from torch import nn

__all__ = ["GATES", "AttentionPoolingGate", "ConvLanguageGate"]


class ConvLanguageGate(nn.Module):
    """Convolutional language-ID gate: frames (B, T, d) -> logits (B, K).

    Frame LayerNorm, ``num_layers`` 1-D convolutions over time (ReLU, the
    padding re-zeroed after each, so a padded row equals the row alone),
    mean and standard deviation over the real frames, then Linear, ReLU,
    Linear to the K language logits.

    Arguments
    ---------
    input_size : int
        Frame width d.
    num_languages : int
        K.
    hidden_size : int
        Channels of the convolutions and of the classifier.
    kernel_size : int
        Odd convolution width (frames).
    num_layers : int
        Convolutions.

    Example
    -------
    >>> gate = ConvLanguageGate(16, 3, hidden_size=8)
    >>> gate(torch.randn(2, 20, 16), torch.ones(2, 20).bool()).shape
    torch.Size([2, 3])
    """

    def __init__(
        self,
        input_size,
        num_languages,
        hidden_size=256,
        kernel_size=5,
        num_layers=2,
    ):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(
                f"ConvLanguageGate: kernel_size must be odd, got {kernel_size}"
            )
        self.norm = nn.LayerNorm(input_size)
        sizes = [input_size] + [hidden_size] * num_layers
        self.convs = nn.ModuleList(
            nn.Conv1d(a, b, kernel_size, padding=kernel_size // 2)
            for a, b in zip(sizes[:-1], sizes[1:])
        )
        self.classifier = nn.Sequential(
            nn.Linear(2 * hidden_size, hidden_size),
            nn.ReLU(),
            nn.Linear(hidden_size, num_languages),
        )

    def forward(self, frames, valid):
        """Language logits (B, K) of frames (B, T, d) with mask (B, T)."""
        keep = valid[:, None, :].to(frames.dtype)
        x = self.norm(frames).transpose(1, 2) * keep
        for conv in self.convs:
            x = torch.relu(conv(x)) * keep
        x = x.float()
        count = keep.float().sum(-1).clamp(min=1.0)
        mean = x.sum(-1) / count
        var = ((x - mean[..., None]) ** 2 * keep.float()).sum(-1) / count
        stats = torch.cat([mean, (var + 1e-5).sqrt()], -1)
        return self.classifier(stats.to(frames.dtype))


class AttentionPoolingGate(nn.Module):
    """Attention-pooling MLP gate: frames (B, T, d) -> logits (B, K).

    Frame LayerNorm; a score per frame (Linear, tanh, Linear), softmax over
    the real frames; the weighted mean of the normalised frames; then
    Linear, GELU, Linear to the K language logits.

    Arguments
    ---------
    input_size, num_languages : int
        As in :class:`ConvLanguageGate`.
    hidden_size : int
        Width of the scorer and of the MLP.

    Example
    -------
    >>> gate = AttentionPoolingGate(16, 3, hidden_size=8)
    >>> gate(torch.randn(2, 20, 16), torch.ones(2, 20).bool()).shape
    torch.Size([2, 3])
    """

    def __init__(self, input_size, num_languages, hidden_size=256):
        super().__init__()
        self.norm = nn.LayerNorm(input_size)
        self.score = nn.Sequential(
            nn.Linear(input_size, hidden_size),
            nn.Tanh(),
            nn.Linear(hidden_size, 1),
        )
        self.mlp = nn.Sequential(
            nn.Linear(input_size, hidden_size),
            nn.GELU(),
            nn.Linear(hidden_size, num_languages),
        )

    def forward(self, frames, valid):
        """Language logits (B, K) of frames (B, T, d) with mask (B, T)."""
        x = self.norm(frames)
        scores = self.score(x)[..., 0].float()
        scores = scores.masked_fill(~valid, float("-inf"))
        weights = scores.softmax(-1).to(x.dtype)
        pooled = torch.einsum("bt,btd->bd", weights, x)
        return self.mlp(pooled)


#: The gates ``LanguageAwareQFormer(gate=...)`` accepts.
GATES = {"conv": ConvLanguageGate, "attention": AttentionPoolingGate}
