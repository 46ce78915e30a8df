"""Whisper's decoder on cached encoder output, teacher-forced.

:class:`WhisperDecoderTeacher` keeps only the decoder of a transformers
Whisper checkpoint and runs it over encoder frames that are already
computed (the feature cache, or the encoder pass the speech LLM makes
anyway), so no second encoder pass is needed.  It
gives the final decoder states of a transcript, and the cross-attention
weights of the *alignment heads* that Whisper's own word timestamps use
(listed in the checkpoint's ``generation_config.json``), from which
:mod:`speechbrain_blspkd.nnet.token_alignment` places each token in time.

Authors
 * speechbrain-blspkd contributors 2026
"""

import json
import pathlib

import torch
from torch import nn

from speechbrain_blspkd.nnet.decoder_layers import run_decoder_layers
from speechbrain_blspkd.nnet.token_alignment import char_spans

__all__ = ["WhisperDecoderTeacher"]

_SOT = "<|startoftranscript|>"
_TRANSCRIBE = "<|transcribe|>"
_NO_TIMESTAMPS = "<|notimestamps|>"


class WhisperDecoderTeacher(nn.Module):
    """Whisper's decoder (no encoder), teacher-forced on transcripts.

    Arguments
    ---------
    source : str or pathlib.Path
        A local transformers Whisper folder or a project asset name
        (``"whisper-base"``; :func:`~speechbrain_blspkd.assets.paths.
        resolve_source`), with its tokenizer.
    dtype : torch.dtype or str, optional
        Weight dtype (``"auto"``: bfloat16 where the device computes it
        fast; None: float32).

    Example
    -------
    >>> import tempfile
    >>> from speechbrain_blspkd.testing import tiny_saved_speech_llm
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> _ = tiny_saved_speech_llm(folder)
    >>> teacher = WhisperDecoderTeacher(folder / "whisper")
    >>> prefix = teacher.prefix_ids("en")
    >>> teacher.tokenizer.convert_ids_to_tokens(prefix)[0], len(prefix)
    ('<|startoftranscript|>', 4)
    >>> text_ids, spans = teacher.text_spans("the cat")
    >>> spans[0][0], spans[-1][1]  # characters of "the cat"; -1: the space
    (-1, 7)
    >>> ids = torch.tensor([prefix + text_ids])
    >>> states = teacher.states(torch.randn(1, 7, 64), torch.tensor([7]),
    ...     ids)
    >>> states.shape == (1, len(prefix) + len(text_ids), 64)
    True
    """

    def __init__(self, source, dtype=None):
        super().__init__()
        from transformers import AutoTokenizer, WhisperForConditionalGeneration

        from speechbrain_blspkd.assets.paths import resolve_source
        from speechbrain_blspkd.utils.precision import resolve_dtype

        folder = resolve_source(source)
        if not (pathlib.Path(folder) / "config.json").is_file():
            raise FileNotFoundError(
                f"WhisperDecoderTeacher: {folder} is not a transformers "
                "Whisper folder (no config.json); fetch it with "
                "`python -m speechbrain_blspkd.assets fetch whisper-base`"
            )
        whisper = WhisperForConditionalGeneration.from_pretrained(
            str(folder), dtype=resolve_dtype(dtype) or torch.float32
        )
        self.source = str(source)
        self.decoder = whisper.model.decoder
        self.config = whisper.config
        generation = whisper.generation_config
        del whisper
        self.requires_grad_(False)
        self.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        vocab = self.tokenizer.get_vocab()
        missing = [t for t in (_SOT, _NO_TIMESTAMPS) if t not in vocab]
        if missing:
            raise ValueError(
                f"WhisperDecoderTeacher: the tokenizer of {folder} lacks "
                f"Whisper's {missing}"
            )
        multilingual = getattr(generation, "is_multilingual", None)
        if multilingual is None:
            multilingual = _TRANSCRIBE in vocab and "<|en|>" in vocab
        self.multilingual = bool(multilingual)
        self._vocab = vocab
        # read from the file: transformers drops the field of a
        # generation config it derives from the model config
        gen_file = pathlib.Path(folder) / "generation_config.json"
        heads = getattr(generation, "alignment_heads", None) or []
        if not heads and gen_file.is_file():
            heads = (
                json.loads(gen_file.read_text(encoding="utf-8")).get(
                    "alignment_heads"
                )
                or []
            )
        self.alignment_heads = [(int(a), int(b)) for a, b in heads]
        layers, nheads = (
            len(self.decoder.layers),
            self.config.decoder_attention_heads,
        )
        for layer, head in self.alignment_heads:
            if not (0 <= layer < layers and 0 <= head < nheads):
                raise ValueError(
                    f"WhisperDecoderTeacher: alignment head ({layer}, {head}) "
                    f"of {folder} is outside the decoder's {layers} layers x "
                    f"{nheads} heads"
                )

    @property
    def width(self):
        """Width d of the decoder states."""
        return int(self.config.d_model)

    def train(self, mode=True):
        """The decoder stays in eval mode (frozen, no dropout)."""
        return super().train(False)

    def prefix_ids(self, language):
        """The decoder prompt for a transcript in ``language``.

        ``<|startoftranscript|><|lang|><|transcribe|><|notimestamps|>``;
        an English-only model gets ``<|startoftranscript|>
        <|notimestamps|>``.

        Arguments
        ---------
        language : str
            ISO code (``"en"``), as the manifests' ``language`` column.

        Returns
        -------
        list of int
        """
        from speechbrain_blspkd.nnet.whisper_asr import _language_code

        if not self.multilingual:
            return [self._vocab[_SOT], self._vocab[_NO_TIMESTAMPS]]
        code = _language_code(language or "")
        token = f"<|{code}|>"
        if token not in self._vocab:
            raise ValueError(
                f"WhisperDecoderTeacher: language {language!r} has no "
                f"Whisper token ({token})"
            )
        return [
            self._vocab[_SOT],
            self._vocab[token],
            self._vocab[_TRANSCRIBE],
            self._vocab[_NO_TIMESTAMPS],
        ]

    def text_spans(self, transcript):
        """Whisper's tokens of ``" " + transcript.strip()`` and their spans
        (characters of the stripped transcript; the space is -1).

        Returns
        -------
        ids : list of int
        spans : list of (int, int)
        """
        return char_spans(self.tokenizer, " " + transcript.strip(), 1)

    @torch.no_grad()
    def states(self, feats, frame_counts, ids):
        """Final decoder states (after the final layer norm) of a batch.

        The self-attention is causal, the cross-attention sees each row's
        first ``frame_counts`` frames only, so a row's states do not depend
        on the batch padding of either side.

        Arguments
        ---------
        feats : torch.Tensor
            (B, T, d) encoder output, zero-padded on the right.
        frame_counts : torch.Tensor
            (B,) real frames of each row.
        ids : torch.Tensor
            (B, L) decoder input ids (prompt + text), right-padded.

        Returns
        -------
        torch.Tensor
            (B, L, d), position ``t`` predicting input ``t + 1``.
        """
        dec = self.decoder
        length = ids.shape[1]
        if length > dec.embed_positions.weight.shape[0]:
            raise ValueError(
                f"WhisperDecoderTeacher: {length} decoder positions exceed "
                f"the model's {dec.embed_positions.weight.shape[0]}"
            )
        weight = dec.embed_tokens.weight
        device, dtype = weight.device, weight.dtype
        ids = ids.to(device)
        feats = feats.to(device=device, dtype=dtype)
        x = dec.embed_tokens(ids) * dec.embed_scale
        x = x + dec.embed_positions.weight[:length]
        low = torch.finfo(dtype).min
        causal = torch.ones(length, length, dtype=torch.bool, device=device)
        self_mask = torch.zeros(
            1, 1, length, length, dtype=dtype, device=device
        )
        self_mask = self_mask.masked_fill(~causal.tril(), low)
        valid = self._valid_frames(feats, frame_counts)
        x = run_decoder_layers(dec.layers, x, feats, valid, self_mask)
        return dec.layer_norm(x)

    @staticmethod
    def _valid_frames(feats, frame_counts):
        """(B, T) bool on ``feats``' device: each row's first frames."""
        frames = torch.arange(feats.shape[1], device=feats.device)
        return frames[None] < frame_counts.to(feats.device)[:, None]

    @torch.no_grad()
    def cross_attention(self, feats, frame_counts, ids, heads=None):
        """Cross-attention weights of the alignment heads over the frames.

        The same teacher-forced pass as :meth:`states`; a hook on each
        cross-attention block reads its (normalised) input, from which the
        weights of the chosen heads are recomputed (query and key
        projections, Whisper's scaling, the frame mask, softmax), so no
        attention implementation of transformers needs to return them.

        Arguments
        ---------
        feats, frame_counts, ids
            As in :meth:`states`.
        heads : list of (int, int), optional
            ``(layer, head)`` pairs (default: :attr:`alignment_heads`).

        Returns
        -------
        torch.Tensor
            (B, H, L, T) float32 weights; zero on padding frames.
        """
        heads = list(self.alignment_heads if heads is None else heads)
        if not heads:
            raise ValueError(
                "WhisperDecoderTeacher: the model lists no alignment heads "
                "(generation_config.json `alignment_heads`); token timings "
                "need them"
            )
        dec = self.decoder
        feats = feats.to(device=dec.embed_tokens.weight.device)
        valid = self._valid_frames(feats, frame_counts)
        captured = {}
        hooks = []
        wanted = sorted({layer for layer, _ in heads})
        for index in wanted:

            def grab(module, args, kwargs, index=index):
                hidden = args[0] if args else kwargs["hidden_states"]
                captured[index] = hidden

            hooks.append(
                dec.layers[index].encoder_attn.register_forward_pre_hook(
                    grab, with_kwargs=True
                )
            )
        try:
            self.states(feats, frame_counts, ids)
        finally:
            for hook in hooks:
                hook.remove()
        out = []
        for layer, head in heads:
            attn = dec.layers[layer].encoder_attn
            size = attn.head_dim
            rows = slice(head * size, (head + 1) * size)
            hidden = captured[layer]
            q = (
                nn.functional.linear(
                    hidden,
                    attn.q_proj.weight[rows],
                    None
                    if attn.q_proj.bias is None
                    else attn.q_proj.bias[rows],
                )
                * attn.scaling
            )
            k = nn.functional.linear(
                feats.to(hidden.dtype), attn.k_proj.weight[rows]
            )
            scores = q.float() @ k.float().transpose(1, 2)
            scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
            out.append(scores.softmax(-1))
        return torch.stack(out, dim=1)
