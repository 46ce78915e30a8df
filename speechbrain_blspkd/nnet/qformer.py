"""QFormer: DiVA's connector, a fixed number of learned queries over speech.

DiVA (Held et al., 2024, "Distilling an End-to-End Voice Assistant Without
Instruction Training Data") connects the Whisper encoder to the LLM with a
Q-Former made of Whisper's own *decoder* layers: ``num_queries`` learned
query vectors (initialised N(0, 0.02)) play the role of the decoder's input
tokens, Whisper's decoder positional embeddings are added to them, and the
decoder layers run over them with

* self-attention among the queries, NOT causal (every query sees every
  other one: there is no left-to-right order to respect here),
* cross-attention to the encoder frames, with the batch padding masked,

then the decoder's final LayerNorm and a Linear into the LLM width. The
result is always ``num_queries`` tokens whatever the utterance length, so
``token_mask`` is all True. Starting from the pretrained decoder layers
(``init_from``) gives the connector cross-attention that already reads
Whisper's frames.

Implementation notes (transformers 5.x internals relied upon):

* the layers are ``transformers.models.whisper.modeling_whisper.
  WhisperDecoderLayer`` modules, run with no self-attention mask by
  :func:`~speechbrain_blspkd.nnet.decoder_layers.run_decoder_layers`
  (the call and the additive frame mask it builds are described there);
* their self-attention is built with ``is_causal=True``, which the SDPA
  path applies whenever no mask is given: the constructor sets
  ``layer.self_attn.is_causal = False`` so the queries see each other;
* the attention implementation is fixed to ``"sdpa"`` in the layer config.

Authors
 * speechbrain-blspkd contributors 2026
"""

import torch
from torch import nn

from speechbrain_blspkd.nnet.adapter import AdapterOutput, SpeechAdapter
from speechbrain_blspkd.nnet.decoder_layers import run_decoder_layers
from speechbrain_blspkd.nnet.whisper_folder import load_whisper_model

__all__ = ["QFormer"]


def _layer_config(d_model, num_heads, ffn_size, num_layers, dropout, act):
    """The WhisperConfig the decoder layers are built from."""
    from transformers import WhisperConfig

    config = WhisperConfig(
        d_model=d_model,
        decoder_attention_heads=num_heads,
        decoder_ffn_dim=ffn_size,
        decoder_layers=num_layers,
        dropout=dropout,
        attention_dropout=dropout,
        activation_dropout=dropout,
        activation_function=act,
    )
    config._attn_implementation = "sdpa"
    return config


def _load_whisper_decoder(folder):
    """The decoder of the transformers Whisper model in ``folder``."""
    model = load_whisper_model(folder, "QFormer")
    decoder = model.decoder
    del model
    return decoder


class QFormer(SpeechAdapter):
    """Q-Former of Whisper decoder layers: (B, T, d) -> (B, L, D) tokens.

    Arguments
    ---------
    input_size : int
        Width d of the encoder frames (and of the decoder layers).
    output_size : int
        Width D of the LLM embeddings.
    num_queries : int
        Number L of learned queries = speech tokens per utterance.
    num_layers : int
        Number of decoder layers.
    init_from : str or pathlib.Path, optional
        A transformers Whisper folder (e.g. the ``whisper-base`` asset):
        the first ``num_layers`` decoder layers, the first L rows of the
        decoder positional table and the decoder's final LayerNorm are
        copied from it, and ``num_heads``, ``ffn_size`` and ``activation``
        are read from its config (the given values are ignored). Its
        ``d_model`` must equal ``input_size``. None: random initialisation.
    num_heads : int
        Attention heads (random initialisation).
    ffn_size : int
        Feed-forward width of the layers (random initialisation).
    dropout : float
        Dropout of the layers (hidden, attention and activation) and of the
        queries after the positional embeddings are added.
    activation : str
        Feed-forward activation (random initialisation; Whisper's "gelu").

    Example
    -------
    >>> adapter = QFormer(16, 24, num_queries=4, num_layers=1, num_heads=2,
    ...     ffn_size=32)
    >>> out = adapter(torch.randn(2, 30, 16), torch.tensor([1.0, 0.5]))
    >>> out.tokens.shape, out.token_counts.tolist()
    (torch.Size([2, 4, 24]), [4, 4])
    >>> rebuilt = QFormer(**adapter.export_hparams())
    >>> rebuilt.load_state_dict(adapter.state_dict())
    <All keys matched successfully>
    """

    def __init__(
        self,
        input_size,
        output_size,
        num_queries=64,
        num_layers=2,
        init_from=None,
        num_heads=8,
        ffn_size=2048,
        dropout=0.0,
        activation="gelu",
    ):
        super().__init__()
        self.check_sizes(
            input_size=input_size,
            output_size=output_size,
            num_queries=num_queries,
            num_layers=num_layers,
        )
        source = None
        if init_from is not None:
            source = _load_whisper_decoder(init_from)
            pretrained = source.config
            if pretrained.d_model != input_size:
                raise ValueError(
                    f"QFormer: `input_size` ({input_size}) must equal the "
                    f"d_model of {init_from} ({pretrained.d_model})"
                )
            if num_layers > pretrained.decoder_layers:
                raise ValueError(
                    f"QFormer: {num_layers} layers asked, {init_from} has "
                    f"{pretrained.decoder_layers} decoder layers"
                )
            if num_queries > pretrained.max_target_positions:
                raise ValueError(
                    f"QFormer: {num_queries} queries exceed the decoder "
                    f"positional table of {init_from} "
                    f"({pretrained.max_target_positions})"
                )
            num_heads = pretrained.decoder_attention_heads
            ffn_size = pretrained.decoder_ffn_dim
            activation = pretrained.activation_function
        if input_size % num_heads != 0:
            raise ValueError(
                f"QFormer: `num_heads` ({num_heads}) must divide "
                f"`input_size` ({input_size})"
            )
        from transformers.models.whisper.modeling_whisper import (
            WhisperDecoderLayer,
        )

        self.input_size = int(input_size)
        self.num_queries = int(num_queries)
        self.num_heads = int(num_heads)
        self.ffn_size = int(ffn_size)
        self.activation = str(activation)
        config = _layer_config(
            self.input_size,
            self.num_heads,
            self.ffn_size,
            int(num_layers),
            dropout,
            self.activation,
        )
        self.queries = nn.Parameter(
            torch.randn(self.num_queries, self.input_size) * 0.02
        )
        self.positions = nn.Parameter(
            torch.randn(self.num_queries, self.input_size) * 0.02
        )
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            WhisperDecoderLayer(config, layer_idx=i)
            for i in range(int(num_layers))
        )
        for layer in self.layers:
            # queries are unordered: the self-attention must not be causal
            layer.self_attn.is_causal = False
        self.layer_norm = nn.LayerNorm(self.input_size)
        self.out_proj = nn.Linear(self.input_size, int(output_size))
        if source is not None:
            self._copy_from(source)

    @torch.no_grad()
    def _copy_from(self, decoder):
        """Copies layers, positions and final norm of a Whisper decoder."""
        for target, layer in zip(self.layers, decoder.layers):
            target.load_state_dict(layer.state_dict())
        table = decoder.embed_positions.weight
        self.positions.copy_(table[: self.num_queries])
        self.layer_norm.load_state_dict(decoder.layer_norm.state_dict())

    def output_size(self):
        """Width of the speech embeddings (the LLM hidden size)."""
        return self.out_proj.out_features

    def export_hparams(self):
        """Constructor arguments without the initialisation source.

        ``init_from`` becomes None and the sizes read from the pretrained
        config (heads, feed-forward width, activation) are recorded, so the
        random-initialisation path rebuilds the same modules and the
        checkpoint supplies the weights.

        Example
        -------
        >>> adapter = QFormer(16, 8, num_queries=3, num_layers=1,
        ...     num_heads=4, ffn_size=32)
        >>> args = adapter.export_hparams()
        >>> args["init_from"], args["num_heads"], args["num_queries"]
        (None, 4, 3)
        """
        args = super().export_hparams()
        args.update(
            init_from=None,
            num_queries=self.num_queries,
            num_heads=self.num_heads,
            ffn_size=self.ffn_size,
            activation=self.activation,
        )
        return args

    def forward(self, feats, lengths=None, targets=None):
        """Runs the queries over the encoder frames.

        Arguments
        ---------
        feats, lengths
            As in :meth:`~speechbrain_blspkd.nnet.adapter.SpeechAdapter.forward` (the cross-attention ignores the frames beyond the
            lengths).
        targets : AdapterTargets, optional
            Unused.

        Returns
        -------
        AdapterOutput
            ``tokens`` (B, num_queries, output_size) and an all-True
            ``token_mask`` (B, num_queries).
        """
        frames, valid = self.prepare_frames(feats, lengths)
        queries = self.queries[None].expand(frames.shape[0], -1, -1)
        tokens = self.attend(queries, frames, valid)
        return AdapterOutput(tokens=tokens, token_mask=self.all_tokens(tokens))

    def prepare_frames(self, feats, lengths=None):
        """Checked frames in the queries' dtype, padding zeroed.

        Arguments
        ---------
        feats, lengths
            As in :meth:`forward`.

        Returns
        -------
        frames : torch.Tensor
            (B, T, input_size), 0 beyond each row's length.
        valid : torch.Tensor
            (B, T) bool, True on the real frames.
        """
        self.check_feats(feats)
        valid = self.frame_mask(feats, lengths)
        # zero the padding too: masked frames still pass through k/v
        # projections, and non-finite garbage would reach the output
        frames = feats.to(self.queries.dtype).masked_fill(
            ~valid[..., None], 0.0
        )
        return frames, valid

    def attend(self, queries, frames, valid):
        """The decoder layers over ``queries`` reading ``frames``.

        Arguments
        ---------
        queries : torch.Tensor
            (B, num_queries, input_size) query vectors (before the
            positional embeddings, which are added here).
        frames : torch.Tensor
            (B, T, input_size) from :meth:`prepare_frames`.
        valid : torch.Tensor
            (B, T) bool, the frames the cross-attention may read.

        Returns
        -------
        torch.Tensor
            (B, num_queries, output_size) speech embeddings.
        """
        x = self.dropout(queries + self.positions)
        x = run_decoder_layers(self.layers, x, frames, valid)
        return self.out_proj(self.layer_norm(x))

    @staticmethod
    def all_tokens(tokens):
        """(B, L) all-True mask: every query is a speech embedding."""
        return torch.ones(
            tokens.shape[:2], dtype=torch.bool, device=tokens.device
        )
