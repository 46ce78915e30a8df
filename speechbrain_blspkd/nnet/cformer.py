"""CFormer: a CIF adapter from speech-encoder frames to LLM-space tokens.

The adapter (docs/algorithms.md §2.2) runs ``n_pre`` transformer layers over the encoder
output, reads one weight per frame from the last channel of the
(layer-normalised) result, integrates the other d - 1 channels into N tokens
with continuous integrate-and-fire (:mod:`speechbrain_blspkd.nnet.cif`),
projects them back to width d, runs ``n_post`` transformer layers over the
tokens and projects them into the LLM embedding space.

The weight channel sees no dropout: the pre layers are dropout-free by
default (``pre_dropout=0``) and dropout is applied to the integrated channels
only, so the alphas, hence the predicted token count, are the same in train
and eval mode (docs/algorithms.md §2.9.3: with dropout on the weight path sum(alpha) was
0.88 N in training and 0.08 N at inference).

Authors
 * speechbrain-blspkd contributors 2025
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from speechbrain_blspkd.nnet.adapter import (
    AdapterOutput,
    SpeechAdapter,
)
from speechbrain_blspkd.nnet.cif import (
    boundary_error,
    cif,
    fire_positions,
    scale_alphas,
    span_weights,
    token_windows,
)
from speechbrain_blspkd.nnet.weight_predictor import (
    build_weight_predictor,
    predict_weights,
)

__all__ = [
    "CFormer",
    "CFormerOutput",
    "pool_frames",
]


@dataclass
class CFormerOutput(AdapterOutput):
    """What :class:`CFormer` returns.

    Arguments
    ---------
    tokens : torch.Tensor
        (B, Nmax, output_size) tokens in the LLM embedding space (zero
        beyond each row's count).
    token_mask : torch.Tensor
        (B, Nmax) bool, True for real tokens.
    alphas : torch.Tensor
        (B, T) unscaled weights, zero on padding (for the quantity loss).
    frame_mask : torch.Tensor
        (B, T) bool, True for real frames.
    num_tokens : torch.Tensor
        (B,) long: the target count when one was given, else the
        predicted max(1, round(sum alpha)).
    alpha_sum : torch.Tensor
        (B,) sum of the unscaled alphas of each row.
    frames : torch.Tensor, optional
        (B, T, input_size - 1) the layer-normalised channels that CIF
        integrates, before dropout, at the rate of ``alphas`` (what a
        frame-level auxiliary loss reads).
    token_hidden : torch.Tensor, optional
        (B, Nmax, input_size) the post-CIF token states after ``post_norm``,
        before ``out_proj`` (zero beyond each row's count): what a
        token-level auxiliary loss in the adapter's own width reads.
    target_alphas : torch.Tensor, optional
        (B, T) the weights the token timings ask for
        (:func:`~speechbrain_blspkd.nnet.cif.span_weights`, at the rate of
        ``alphas``; each row sums to its token count), when the targets
        carried ``token_spans`` (what the timing loss compares with).
    forced : bool
        Whether the tokens were integrated with ``target_alphas`` instead
        of the predicted weights (scheduled forcing).
    """

    alphas: torch.Tensor
    frame_mask: torch.Tensor
    num_tokens: torch.Tensor
    alpha_sum: torch.Tensor
    frames: torch.Tensor = None
    token_hidden: torch.Tensor = None
    target_alphas: torch.Tensor = None
    forced: bool = False


def pool_frames(hidden, frame_mask, stride):
    """Averages each run of ``stride`` frames, ignoring padding frames.

    Arguments
    ---------
    hidden : torch.Tensor
        (B, T, d) frames.
    frame_mask : torch.Tensor
        (B, T) bool, True for real frames.
    stride : int
        Pooling factor (1 returns the inputs unchanged).

    Returns
    -------
    pooled : torch.Tensor
        (B, ceil(T / stride), d).
    pooled_mask : torch.Tensor
        (B, ceil(T / stride)) bool, True where a pooled frame holds at
        least one real frame.

    Example
    -------
    >>> x = torch.arange(10.0).view(1, 5, 2)
    >>> mask = torch.tensor([[True, True, True, False, False]])
    >>> pooled, pmask = pool_frames(x, mask, 2)
    >>> pooled[0].tolist(), pmask.tolist()
    ([[1.0, 2.0], [4.0, 5.0], [0.0, 0.0]], [[True, True, False]])
    """
    if stride == 1:
        return hidden, frame_mask
    batch, time, dim = hidden.shape
    pad = (-time) % stride
    weights = frame_mask.to(hidden.dtype)
    if pad:
        hidden = nn.functional.pad(hidden, (0, 0, 0, pad))
        weights = nn.functional.pad(weights, (0, pad))
    steps = (time + pad) // stride
    weights = weights.view(batch, steps, stride)
    total = (
        (hidden * weights.view(batch, time + pad, 1))
        .view(batch, steps, stride, dim)
        .sum(dim=2)
    )
    count = weights.sum(dim=2)
    pooled = total / count.clamp(min=1)[..., None]
    return pooled, count > 0


def _transformer_layer(d_model, nhead, d_ffn, dropout, activation, cross=False):
    layer = nn.TransformerDecoderLayer if cross else nn.TransformerEncoderLayer
    return layer(
        d_model,
        nhead,
        dim_feedforward=d_ffn,
        dropout=dropout,
        activation=activation,
        batch_first=True,
        norm_first=True,
    )


class CFormer(SpeechAdapter):
    """CIF adapter: encoder frames (B, T, d) -> tokens (B, N, output_size).

    Arguments
    ---------
    input_size : int
        Width d of the encoder output (and of the pre layers); the last
        channel is the weight predictor, the other d - 1 are integrated.
    output_size : int
        Width D of the LLM embeddings.
    n_pre : int
        Transformer layers over the frames.
    n_post : int
        Transformer layers over the tokens (width d).
    nhead : int
        Attention heads (must divide d).
    d_ffn : int
        Feed-forward width of the transformer layers.
    dropout : float
        Dropout of the post layers and of the integrated channels.
    out_init_std : float or None
        If given, the output projection starts with weights drawn from
        N(0, out_init_std^2 / d) and zero bias, so that its outputs (of
        layer-normalised inputs) have about the std of the LLM embeddings
        (e.g. 0.136 for SmolLM2-135M; docs/algorithms.md §2.9.5). None: PyTorch default.
    weight_norm : bool
        Take the weight channel from the layer-normalised pre-layer output
        (True, recommended) or from the raw residual stream (ablation).
    pre_dropout : float
        Dropout inside the pre layers. Anything above 0 reaches the weight
        channel, so alphas differ between train and eval.
    activation : str
        Activation of the transformer feed-forward blocks ("gelu" matches
        Whisper).
    threshold : float
        CIF firing threshold.
    weight_bias_init : float
        Initial bias of the weight channel (the LayerNorm bias of channel
        d-1, added before the sigmoid). With 0 every frame starts at alpha
        ~0.5, i.e. ~25 tokens a second where text has ~4-6: the quantity
        loss then pulls hard, and was seen to overshoot within ten steps
        into the saturated region (alpha ~0 for every frame, no gradient,
        one token at inference). ``-2.0`` starts near alpha ~0.12 instead.
    frame_stride : int
        Average-pool the encoder frames by this factor before the pre layers
        (padding frames excluded from the mean). Whisper's 50 frames a
        second are far more than the ~3-8 tokens a second of text: a stride
        of 2 halves the cost of the pre layers and of CIF. ``alphas`` and
        ``frame_mask`` are then at the pooled rate.
    weight_predictor : str
        Where the CIF weights come from. ``"channel"`` (the paper's
        CFormer): the last channel of the layer-normalised pre-layer
        output, the other d - 1 channels are integrated. ``"conv"``: two
        1-D convolutions (kernel 5, ``predictor_hidden`` channels, about
        0.2 s of context each side at 25 frames/s) over the normalised
        frames. ``"rnn"``: a bidirectional LSTM (``predictor_hidden`` units
        each way) over them, so each weight sees the whole utterance (how
        many LLM tokens a stretch holds depends on its words). With
        ``"conv"`` and ``"rnn"`` all d channels are integrated
        (:mod:`speechbrain_blspkd.nnet.weight_predictor`).
    predictor_hidden : int
        Width of the ``"conv"`` / ``"rnn"`` weight predictor.
    forcing_until : float
        Scheduled forcing: while the training stage is less than this
        fraction done (:meth:`set_training_progress`) and the targets
        carry ``token_spans``, the tokens are integrated with the weights
        the timings ask for instead of the predicted ones (the predictor
        still learns from the timing and quantity losses). 0: never.
    input_frame_rate : float
        Frames per second of the encoder output (Whisper: 50), to place
        the token timings on the frames.
    cross_window : int or None
        The token layers also attend to the frames (normalised, pooled), as
        a decoder layer does, but each token only to the frames it was
        integrated from and ``cross_window`` frames on each side
        (:func:`~speechbrain_blspkd.nnet.cif.token_windows`); it can then
        read the sounds around its own stretch instead of only their
        CIF-weighted sum. None: token layers over the tokens alone (the
        paper's CFormer). Attention to every frame was measured and lost
        (recipe RESULTS.md, ``cross.yaml``).
    cross_layers : int or None
        With ``cross_window``: only the first ``cross_layers`` token layers
        read the frames, the others attend to the tokens alone (reading
        the frames is about a third of an alignment step). None: all.

    Example
    -------
    >>> model = CFormer(16, 24, n_pre=1, n_post=1, nhead=2, d_ffn=32)
    >>> hidden = torch.randn(2, 30, 16)
    >>> out = model(hidden, lengths=torch.tensor([1.0, 0.6]),
    ...             num_tokens=torch.tensor([5, 3]))
    >>> out.tokens.shape, out.token_mask.sum(1).tolist()
    (torch.Size([2, 5, 24]), [5, 3])
    >>> out.alphas.shape, out.frame_mask.sum(1).tolist()
    (torch.Size([2, 30]), [30, 18])
    >>> _ = model.eval()
    >>> out = model(hidden, lengths=torch.tensor([1.0, 0.6]))
    >>> bool((out.num_tokens == out.alpha_sum.round().clamp(min=1)).all())
    True
    """

    def __init__(
        self,
        input_size,
        output_size,
        n_pre=4,
        n_post=4,
        nhead=8,
        d_ffn=2048,
        dropout=0.1,
        out_init_std=None,
        weight_norm=True,
        pre_dropout=0.0,
        activation="gelu",
        threshold=1.0,
        weight_bias_init=0.0,
        frame_stride=1,
        weight_predictor="channel",
        predictor_hidden=256,
        forcing_until=0.0,
        input_frame_rate=50.0,
        cross_window=None,
        cross_layers=None,
    ):
        super().__init__()
        if cross_window is not None and int(cross_window) < 0:
            raise ValueError(
                f"CFormer: `cross_window` must be >= 0 or None, got "
                f"{cross_window}"
            )
        self.cross_window = None if cross_window is None else int(cross_window)
        reads_frames = self.cross_window is not None
        if cross_layers is not None and not (
            reads_frames and 1 <= int(cross_layers) <= n_post
        ):
            raise ValueError(
                "CFormer: `cross_layers` needs `cross_window` and must be in "
                f"[1, n_post={n_post}], got {cross_layers}"
            )
        reading = n_post if cross_layers is None else int(cross_layers)
        if weight_predictor not in ("channel", "conv", "rnn"):
            raise ValueError(
                "CFormer: `weight_predictor` must be 'channel', 'conv' or "
                f"'rnn', got {weight_predictor!r}"
            )
        if not 0.0 <= float(forcing_until) <= 1.0:
            raise ValueError(
                f"CFormer: `forcing_until` must be in [0, 1], got "
                f"{forcing_until}"
            )
        self.weight_predictor = weight_predictor
        self.forcing_until = float(forcing_until)
        self.input_frame_rate = float(input_frame_rate)
        self._progress = 0.0
        self.check_sizes(frame_stride=frame_stride)
        self.frame_stride = int(frame_stride)
        if input_size < 2:
            raise ValueError(
                f"CFormer: `input_size` must be >= 2, got {input_size}"
            )
        if input_size % nhead != 0:
            raise ValueError(
                f"CFormer: `nhead` ({nhead}) must divide `input_size` "
                f"({input_size})"
            )
        d = input_size
        self.input_size = input_size
        self.weight_norm = weight_norm
        self.threshold = threshold
        self.pre_layers = nn.ModuleList(
            _transformer_layer(d, nhead, d_ffn, pre_dropout, activation)
            for _ in range(n_pre)
        )
        self.norm = nn.LayerNorm(d)
        integrated = d
        if weight_predictor == "channel":
            with torch.no_grad():
                self.norm.bias[-1] = weight_bias_init
            integrated = d - 1
        else:
            self.predictor, self.predictor_out = build_weight_predictor(
                weight_predictor, d, predictor_hidden, weight_bias_init
            )
        self.dropout = nn.Dropout(dropout)
        self.token_proj = nn.Linear(integrated, d)
        self.post_layers = nn.ModuleList(
            _transformer_layer(
                d,
                nhead,
                d_ffn,
                dropout,
                activation,
                reads_frames and i < reading,
            )
            for i in range(n_post)
        )
        self.post_norm = nn.LayerNorm(d)
        self.out_proj = nn.Linear(d, output_size)
        if out_init_std is not None:
            nn.init.normal_(
                self.out_proj.weight, 0.0, out_init_std / math.sqrt(d)
            )
            nn.init.zeros_(self.out_proj.bias)

    def output_size(self):
        """Width of the speech embeddings (the LLM hidden size)."""
        return self.out_proj.out_features

    def export_hparams(self):
        """Constructor arguments; initialisation-only ones neutralised."""
        args = super().export_hparams()
        args.update(out_init_std=None, weight_bias_init=0.0)
        return args

    def diagnostics(self, output, targets=None):
        """Token-count accuracy of the CIF against the transcript lengths.

        ``exact_count`` is the share of utterances whose predicted count
        max(1, round(sum alpha)) equals the transcript's token count,
        ``count_abs_error`` the mean absolute difference.

        Example
        -------
        >>> from speechbrain_blspkd.nnet.adapter import AdapterTargets
        >>> model = CFormer(16, 24, n_pre=1, n_post=1, nhead=2, d_ffn=32)
        >>> out = model(torch.randn(2, 30, 16), num_tokens=torch.tensor([5, 3]))
        >>> sorted(model.diagnostics(out, AdapterTargets(torch.tensor([5, 3]))))
        ['count_abs_error', 'exact_count']
        """
        if targets is None or targets.num_tokens is None:
            return {}
        from speechbrain_blspkd.metrics import count_stats

        predicted = output.alpha_sum.detach().round().clamp(min=1).long()
        stats = count_stats(predicted.tolist(), targets.num_tokens.tolist())
        out = {
            "exact_count": stats["exact_rate"],
            "count_abs_error": stats["mean_abs_error"],
        }
        if output.target_alphas is not None:
            out["boundary_ms"] = boundary_error(
                output.alphas,
                output.target_alphas,
                targets.num_tokens,
                self.frame_rate(),
            )
        return out

    def frame_rate(self):
        """Frames per second of ``alphas`` (after ``frame_stride``)."""
        return self.input_frame_rate / self.frame_stride

    def set_training_progress(self, fraction):
        """Remember how far the stage is (for scheduled forcing)."""
        self._progress = float(fraction)

    def plot(self, output, index, path, title=None, tokens=None):
        """The CIF weights of utterance ``index`` with the fired tokens."""
        from speechbrain_blspkd.utils.plotting import plot_cif_weights

        alphas = output.alphas[index][output.frame_mask[index]].float().cpu()
        count = int(output.num_tokens[index])
        scaled = alphas * count / alphas.sum().clamp(min=1e-6)
        plot_cif_weights(
            scaled,
            fire_positions(scaled, self.threshold).tolist(),
            list(tokens or []),
            path,
            frame_rate=self.frame_rate(),
            title=title or f"sum(alpha)={float(alphas.sum()):.1f}, N={count}",
        )
        return True

    def forward(
        self, hidden, lengths=None, targets=None, num_tokens=None, mask=None
    ):
        """Integrates the frames of each utterance into tokens.

        Arguments
        ---------
        hidden : torch.Tensor
            (B, T, input_size) encoder output.
        lengths : torch.Tensor or None
            (B,) SpeechBrain relative lengths in (0, 1].
        targets : AdapterTargets, optional
            Its ``num_tokens`` are used when ``num_tokens`` is None.
        num_tokens : torch.Tensor or None
            (B,) target counts (training); None predicts them.
        mask : torch.Tensor or None
            (B, T) bool frame mask, instead of ``lengths``.

        Returns
        -------
        CFormerOutput
        """
        if hidden.dim() != 3 or hidden.shape[-1] != self.input_size:
            raise ValueError(
                f"CFormer: `hidden` must be (B, T, {self.input_size}), "
                f"got {tuple(hidden.shape)}"
            )
        batch = hidden.shape[0]
        if num_tokens is None and targets is not None:
            num_tokens = targets.num_tokens
        frame_mask = self._frame_mask(hidden, lengths, mask)
        x, frame_mask = pool_frames(hidden, frame_mask, self.frame_stride)
        padding = ~frame_mask
        for layer in self.pre_layers:
            x = layer(x, src_key_padding_mask=padding)
        normed = self.norm(x)
        if self.weight_predictor == "channel":
            weight_logit = normed[..., -1] if self.weight_norm else x[..., -1]
            frames = normed[..., :-1]
        else:
            weight_logit = predict_weights(
                self.weight_predictor,
                self.predictor,
                self.predictor_out,
                normed,
                padding,
            )
            frames = normed
        alphas = torch.sigmoid(weight_logit) * frame_mask.to(x.dtype)
        alpha_sum = alphas.sum(dim=1)

        if num_tokens is None:
            num_tokens = alpha_sum.detach().round().clamp(min=1).long()
        else:
            num_tokens = torch.as_tensor(num_tokens, device=hidden.device)
            if num_tokens.shape != (batch,):
                raise ValueError(
                    f"CFormer: `num_tokens` must be ({batch},), "
                    f"got {tuple(num_tokens.shape)}"
                )
            if bool((num_tokens < 1).any()):
                raise ValueError(
                    "CFormer: every `num_tokens` must be >= 1, "
                    f"got {num_tokens.tolist()}"
                )
            num_tokens = num_tokens.long()

        integrated = self.dropout(frames)
        integrated = integrated.masked_fill(padding[..., None], 0.0)
        target = None
        spans = None if targets is None else targets.token_spans
        if spans is not None:
            target, _ = span_weights(spans, frame_mask, self.frame_rate())
            target = target.to(alphas.dtype)
        forced = (
            self.training
            and target is not None
            and self._progress < self.forcing_until
        )
        weights = target if forced else alphas
        scaled = scale_alphas(weights, num_tokens, self.threshold)
        tokens, token_mask = cif(
            integrated, scaled, num_tokens, threshold=self.threshold
        )

        y = self.token_proj(tokens)
        y = self._token_layers(
            y, token_mask, normed, frame_mask, scaled, num_tokens
        )
        token_hidden = self.post_norm(y) * token_mask[..., None].to(y.dtype)
        y = self.out_proj(token_hidden)
        y = y * token_mask[..., None].to(y.dtype)
        return CFormerOutput(
            tokens=y,
            token_mask=token_mask,
            alphas=alphas,
            frame_mask=frame_mask,
            num_tokens=num_tokens,
            alpha_sum=alpha_sum,
            frames=frames,
            token_hidden=token_hidden,
            target_alphas=target,
            forced=forced,
        )

    def _token_layers(
        self, y, token_mask, frames, frame_mask, scaled, num_tokens
    ):
        """The token layers (decoder layers also read each token's frames)."""
        blocked = None
        if self.cross_window is not None and self.post_layers:
            blocked = ~token_windows(
                scaled,
                frame_mask,
                num_tokens,
                self.cross_window,
                self.threshold,
            )
            heads = self.post_layers[0].multihead_attn.num_heads
            blocked = blocked.repeat_interleave(heads, dim=0)
        for layer in self.post_layers:
            if isinstance(layer, nn.TransformerDecoderLayer):
                y = layer(
                    y,
                    frames,
                    tgt_key_padding_mask=~token_mask,
                    memory_mask=blocked,
                )
            else:
                y = layer(y, src_key_padding_mask=~token_mask)
        return y

    def _frame_mask(self, hidden, lengths, mask):
        """Checked (B, T) bool frame mask from ``mask`` or ``lengths``.

        Relative ``lengths`` go through :meth:`SpeechAdapter.frame_mask`
        (SpeechBrain's ``length_to_mask``: the first round(length * T)
        frames, at least one).
        """
        batch, time, _ = hidden.shape
        if mask is not None and lengths is not None:
            raise ValueError("CFormer: give `lengths` or `mask`, not both")
        if mask is not None:
            if mask.shape != (batch, time):
                raise ValueError(
                    f"CFormer: `mask` must be ({batch}, {time}), "
                    f"got {tuple(mask.shape)}"
                )
            mask = mask.to(device=hidden.device, dtype=torch.bool)
            if not bool(mask.any(dim=1).all()):
                raise ValueError("CFormer: every row of `mask` needs a frame")
            return mask
        if lengths is None:
            return torch.ones(
                batch, time, dtype=torch.bool, device=hidden.device
            )
        lengths = torch.as_tensor(lengths, device=hidden.device)
        if lengths.shape != (batch,):
            raise ValueError(
                f"CFormer: `lengths` must be ({batch},), "
                f"got {tuple(lengths.shape)}"
            )
        if bool(((lengths <= 0) | (lengths > 1 + 1e-6)).any()):
            raise ValueError(
                "CFormer: relative `lengths` must be in (0, 1], "
                f"got {lengths.tolist()}"
            )
        return self.frame_mask(hidden, lengths)
