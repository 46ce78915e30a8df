"""Token timings: where each LLM token of a transcript is spoken.

A CIF adapter has to learn both *what* each LLM token of a transcript
sounds like and *where* it is in the clip (how much weight each encoder
frame gives it).  Whisper already knows the second: when its decoder is
teacher-forced on the transcript, a few of its cross-attention heads (the
*alignment heads* that Whisper's own word timestamps use, listed in the
asset's ``generation_config.json``) look at the frames of the token being
predicted.  This module turns that into one ``(start, end)`` time per LLM
token of every utterance, stored once beside the feature cache, so that
training can tell the CIF where tokens are (the timing loss and scheduled
forcing of :class:`~speechbrain_blspkd.nnet.cformer.CFormer`,
``docs/algorithms.md`` "Token timings").

How (per utterance)
-------------------
1. Decoder input: ``<|startoftranscript|><|lang|><|transcribe|>
   <|notimestamps|>`` (an English-only model: ``<|startoftranscript|>
   <|notimestamps|>``) followed by Whisper's tokens of ``" " +
   transcript``; the decoder cross-attends to the **cached encoder
   output** (:mod:`~speechbrain_blspkd.dataprep.feature_cache`: dynamic
   length, the same frames the adapter reads), so no encoder pass runs.
2. The cross-attention weights of the alignment heads over the real frames
   are z-normalised over the token axis, median-filtered along time
   (width 7) and averaged over the heads; the rows that predict the text
   tokens and the end-of-text token (from the ``<|notimestamps|>`` row to
   the last text token's row) form a (W + 1, T) matrix.
3. Dynamic time warping (:func:`dtw_path`) on its negation gives a
   monotonic path from the first to the last frame, which hands each row
   a stretch of frames; the start of Whisper token ``i`` is the midpoint
   of row ``i``'s first frame and its attention peak inside the stretch
   (:func:`row_times` says why; row W: the end of the speech).  Frames
   are 1 / 50 s (Whisper's encoder rate).
4. The LLM tokens (exactly the model's tokenisation,
   :meth:`~speechbrain_blspkd.prompt.PromptBuilder.transcript_ids`) are
   placed on the transcript's characters: an LLM token starts at the time
   of its first character, interpolated by characters inside the Whisper
   token that covers it (:func:`llm_token_times`); it ends where the next
   starts, the last where the speech ends.  The two tokenisers split most
   sentences differently, so the bridge goes through characters.

The last token ends where Whisper places the end of text, so trailing
silence belongs to no token.

Storage and stale caches
------------------------
An ``(N, 2)`` float16 tensor of seconds per utterance (4 bytes per LLM
token), one atomic file each (:class:`~speechbrain_blspkd.dataprep.
feature_cache.FeatureCache`), so an interrupted run resumes with the
utterances still missing.  ``timings.json`` records what they depend on
(the features' checksum, Whisper's decoder and tokenizer, the alignment
heads, the LLM tokenizer and the transcript separator); a folder written
for other settings is refused (:class:`StaleTokenTimingsError`, naming
what differs) unless ``overwrite=True`` (``--overwrite``).  Training
checks the settings it can see and each utterance's token count.

Command line::

    python -m speechbrain_blspkd.dataprep.token_timings MANIFEST [...] \\
        --features FEATURE_CACHE_FOLDER --out FOLDER [--whisper whisper-base] \\
        [--llm smollm2-135m-instruct] [--batch-size 16] [--shard 0/2] \\
        [--limit N] [--device cpu] [--overwrite]

Inside a recipe, ``token_timings_folder`` (null: none) makes
:func:`prepare_token_timings` write the timings of every split before
training, and :func:`timing_items` hands each row's timings to the model
as ``token_spans``.

Authors
 * speechbrain-blspkd contributors 2026
"""

import argparse
import hashlib
import json
import logging
import pathlib
import shutil
import sys
import time

import torch
from torch import nn

from speechbrain_blspkd.dataio.manifest import read_manifest
from speechbrain_blspkd.dataprep.feature_cache import (
    META_FILE as FEATURE_META_FILE,
)
from speechbrain_blspkd.dataprep.feature_cache import (
    FeatureCache,
    StaleCacheError,
    encoder_checksum,
    feature_checksum,
)
from speechbrain_blspkd.dataprep.shard_progress import (
    parse_shard as _parse_shard,
)
from speechbrain_blspkd.dataprep.teacher_identity import (
    tokenizer_checksum as _tokenizer_checksum,
)
from speechbrain_blspkd.utils.atomic import remove_stray_tmp
from speechbrain_blspkd.utils.cache_label import check_label
from speechbrain_blspkd.utils.cli import report_error, setup_logging

logger = logging.getLogger(__name__)

__all__ = [
    "StaleTokenTimingsError",
    "TokenTimingCache",
    "WhisperDecoderTeacher",
    "alignment_matrix",
    "dtw_path",
    "llm_token_spans",
    "llm_token_times",
    "prepare_token_timings",
    "row_times",
    "timing_items",
    "utterance_timings",
    "write_token_timings",
]

CACHE_VERSION = 1
META_FILE = "timings.json"
#: Width of the median filter along time (frames), as Whisper's own
#: word timestamps use.
MEDIAN_WIDTH = 7
_SOT = "<|startoftranscript|>"
_TRANSCRIBE = "<|transcribe|>"
_NO_TIMESTAMPS = "<|notimestamps|>"


class StaleTokenTimingsError(StaleCacheError):
    """A token-timing folder was written for other settings."""


def _spans(tokenizer, text, offset):
    """Ids and character spans of ``text`` (spans shifted by ``-offset``)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = [(a - offset, b - offset) for a, b in enc["offset_mapping"]]
    return list(enc["input_ids"]), spans


def llm_token_spans(prompts, transcript):
    """The transcript's LLM token ids and their character spans.

    Exactly the model's tokenisation of transcripts
    (:meth:`~speechbrain_blspkd.prompt.PromptBuilder.transcript_ids`: the
    separator, then the stripped transcript); spans count characters of
    the stripped transcript, so the separator's characters are negative.

    Arguments
    ---------
    prompts : speechbrain_blspkd.prompt.PromptBuilder
        The model's prompt builder (``model.prompts``).
    transcript : str
        The transcript.

    Returns
    -------
    ids : list of int
    spans : list of (int, int)

    Example
    -------
    >>> from speechbrain_blspkd.prompt import PromptBuilder
    >>> from speechbrain_blspkd.utils.testing import doctest_tokenizer
    >>> prompts = PromptBuilder(doctest_tokenizer())
    >>> ids, spans = llm_token_spans(prompts, " the cat ")
    >>> ids == prompts.transcript_ids(" the cat "), spans[0][0], spans[-1][1]
    (True, -1, 7)
    """
    separator = prompts.transcript_separator
    ids, spans = _spans(
        prompts.tokenizer, separator + transcript.strip(), len(separator)
    )
    if ids != prompts.transcript_ids(transcript):
        raise ValueError(
            f"the LLM tokenizer splits {transcript!r} differently with "
            "offsets than without; its character spans cannot be trusted"
        )
    return ids, spans


# ----------------------------------------------------------------------
# the decoder
class WhisperDecoderTeacher(nn.Module):
    """Whisper's decoder (no encoder), teacher-forced on transcripts.

    Arguments
    ---------
    source : str or pathlib.Path
        A local transformers Whisper folder or a project asset name
        (``"whisper-base"``; :func:`~speechbrain_blspkd.inference.export.
        resolve_source`), with its tokenizer.
    dtype : torch.dtype or str, optional
        Weight dtype (``"auto"``: bfloat16 where the device computes it
        fast; None: float32).

    Example
    -------
    >>> import tempfile
    >>> from speechbrain_blspkd.utils.testing import tiny_saved_speech_llm
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

        from speechbrain_blspkd.inference.export import resolve_source
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
        self.proj_out = whisper.proj_out
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
        return _spans(self.tokenizer, " " + transcript.strip(), 1)

    @torch.no_grad()
    def states(self, feats, frame_counts, ids, id_counts=None):
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
        id_counts : torch.Tensor, optional
            (B,) real ids of each row (only checked against the positional
            table; padded positions' states are meaningless).

        Returns
        -------
        torch.Tensor
            (B, L, d), position ``t`` predicting input ``t + 1``.
        """
        dec = self.decoder
        batch, length = ids.shape
        longest = int(length if id_counts is None else max(id_counts))
        if longest > dec.embed_positions.weight.shape[0]:
            raise ValueError(
                f"WhisperDecoderTeacher: {longest} decoder positions exceed "
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
        frames = torch.arange(feats.shape[1], device=device)
        valid = frames[None] < frame_counts.to(device)[:, None]
        cross_mask = torch.zeros(
            batch, 1, 1, feats.shape[1], dtype=dtype, device=device
        )
        cross_mask = cross_mask.masked_fill(~valid[:, None, None, :], low)
        for layer in dec.layers:
            x = layer(
                x,
                self_mask,
                feats,
                encoder_attention_mask=cross_mask,
                past_key_values=None,
                use_cache=False,
            )
            if isinstance(x, tuple):  # older transformers return tuples
                x = x[0]
        return dec.layer_norm(x)

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
        feats : torch.Tensor
            (B, T, d) encoder output, zero-padded on the right.
        frame_counts : torch.Tensor
            (B,) real frames of each row.
        ids : torch.Tensor
            (B, L) decoder input ids, right-padded.
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
        frames = torch.arange(feats.shape[1], device=feats.device)
        valid = frames[None] < frame_counts.to(feats.device)[:, None]
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

    def checksum(self):
        """SHA-256 of the decoder's weights and configuration, and of the
        tokenizer (what the targets depend on besides the features)."""
        h = hashlib.sha256(encoder_checksum(self.decoder).encode())
        h.update(_tokenizer_checksum(self.tokenizer).encode())
        return h.hexdigest()


def _pad(tensors):
    """Right-pad 2-D tensors of equal width: (B, Tmax, d) and counts."""
    counts = torch.tensor([t.shape[0] for t in tensors])
    out = tensors[0].new_zeros(
        len(tensors), int(counts.max()), tensors[0].shape[1]
    )
    for b, t in enumerate(tensors):
        out[b, : t.shape[0]] = t
    return out, counts


def _open_features(features):
    """A FeatureCache from an object or a folder (its own checksum)."""
    if isinstance(features, FeatureCache):
        return features
    folder = pathlib.Path(features)
    meta_path = folder / FEATURE_META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{folder} is not a feature cache (no {FEATURE_META_FILE}); "
            "build it first (the recipe's prepare_features)"
        )
    checksum = json.loads(meta_path.read_text(encoding="utf-8"))["checksum"]
    return FeatureCache(folder, checksum)


def _rows(manifest):
    """Manifest rows from a path, a list of paths or a list of rows."""
    if isinstance(manifest, (str, pathlib.Path)):
        return read_manifest(manifest)
    items = list(manifest)
    if items and isinstance(items[0], dict):
        return items
    rows = []
    for path in items:
        rows.extend(read_manifest(path))
    return rows


# ----------------------------------------------------------------------
# from attention to times (pure)
def _median_filter(x, width):
    """Median over a window of ``width`` along the last axis (edges
    reflected); ``width`` 1 returns ``x``."""
    if width <= 1 or x.shape[-1] < 2:
        return x
    pad = width // 2
    if x.shape[-1] <= pad:
        return x
    shape = x.shape
    flat = x.reshape(-1, 1, shape[-1])
    flat = nn.functional.pad(flat, (pad, pad), mode="reflect")
    return flat.unfold(-1, width, 1).median(-1).values.reshape(shape)


def alignment_matrix(weights, first_row, num_rows, median_width=MEDIAN_WIDTH):
    """The (rows, frames) matrix that DTW aligns, from head weights.

    Arguments
    ---------
    weights : torch.Tensor
        (H, L, T) cross-attention of the alignment heads over one
        utterance's real frames (L decoder positions).
    first_row : int
        The position that predicts the first text token (the
        ``<|notimestamps|>`` position).
    num_rows : int
        Rows kept: the text tokens and the end of text (W + 1).
    median_width : int
        Median filter width along time.

    Returns
    -------
    torch.Tensor
        (num_rows, T) float32.

    Example
    -------
    >>> w = torch.rand(2, 6, 10)
    >>> alignment_matrix(w, 2, 3).shape
    torch.Size([3, 10])
    """
    if weights.dim() != 3:
        raise ValueError(
            f"alignment_matrix: weights must be (H, L, T), got "
            f"{tuple(weights.shape)}"
        )
    if first_row < 0 or first_row + num_rows > weights.shape[1]:
        raise ValueError(
            f"alignment_matrix: rows {first_row}..{first_row + num_rows - 1} "
            f"are outside the {weights.shape[1]} decoder positions"
        )
    w = weights.float()
    std = w.std(dim=1, keepdim=True, unbiased=False).clamp(min=1e-8)
    w = (w - w.mean(dim=1, keepdim=True)) / std
    w = _median_filter(w, median_width)
    return w.mean(0)[first_row : first_row + num_rows]


def dtw_path(cost):
    """Monotonic minimum-cost path through a (R, T) cost matrix.

    The path starts at (0, 0), ends at (R - 1, T - 1) and moves by one row,
    one column or both at each step (dynamic time warping).  Written here
    because it is a dozen lines on tiny matrices (tens of rows, a few
    hundred frames) and no installed library offers it.

    Arguments
    ---------
    cost : torch.Tensor or array-like
        (R, T) costs.

    Returns
    -------
    rows, cols : list of int
        The path, in order.

    Example
    -------
    >>> cost = torch.tensor([[0., 0, 9, 9], [9, 9, 0, 9], [9, 9, 9, 0]])
    >>> dtw_path(cost)
    ([0, 0, 1, 2], [0, 1, 2, 3])
    """
    cost = torch.as_tensor(cost, dtype=torch.float64).tolist()
    num_rows = len(cost)
    num_cols = len(cost[0]) if num_rows else 0
    if num_rows == 0 or num_cols == 0:
        raise ValueError("dtw_path: empty cost matrix")
    inf = float("inf")
    total = [[inf] * (num_cols + 1) for _ in range(num_rows + 1)]
    move = [[0] * (num_cols + 1) for _ in range(num_rows + 1)]
    total[0][0] = 0.0
    for i in range(1, num_rows + 1):
        above, here, row_cost = total[i - 1], total[i], cost[i - 1]
        moves = move[i]
        for j in range(1, num_cols + 1):
            diagonal, up, left = above[j - 1], above[j], here[j - 1]
            if diagonal <= up and diagonal <= left:
                best, step = diagonal, 0
            elif up <= left:
                best, step = up, 1
            else:
                best, step = left, 2
            here[j] = row_cost[j - 1] + best
            moves[j] = step
    i, j = num_rows, num_cols
    rows, cols = [], []
    while i > 0 and j > 0:
        rows.append(i - 1)
        cols.append(j - 1)
        step = move[i][j]
        if step == 0:
            i, j = i - 1, j - 1
        elif step == 1:
            i -= 1
        else:
            j -= 1
    return rows[::-1], cols[::-1]


def row_times(matrix, rows, cols):
    """For each row, the frame where its token begins, from a DTW path.

    The path gives each row a stretch of frames.  On clips of separately
    spoken words with known onsets (``tests/test_token_timings.py``), the
    first frame of a stretch fell about half a word early (median 180 ms)
    and the peak of the row's attention inside it about 110 ms late
    (the heads look at a token's start from the row that predicts it);
    the midpoint of the two was within 65 ms of the onset and inside the
    silence before the word for most words.  That midpoint is the row's
    time; times never decrease, as the stretches are in order.

    Arguments
    ---------
    matrix : torch.Tensor
        (R, T) the aligned matrix (higher: more attention).
    rows, cols : list of int
        The path (:func:`dtw_path` on ``-matrix``).

    Returns
    -------
    list of int
        R frames.

    Example
    -------
    >>> m = torch.tensor([[5., 1, 0, 0, 0], [0, 1, 2, 6, 1], [0, 0, 0, 1, 3]])
    >>> row_times(m, *dtw_path(-m))
    [0, 2, 4]
    """
    num_rows = matrix.shape[0]
    first = [None] * num_rows
    best = [None] * num_rows
    for r, c in zip(rows, cols):
        value = float(matrix[r, c])
        if first[r] is None:
            first[r] = c
        if best[r] is None or value > best[r][0]:
            best[r] = (value, c)
    missing = [r for r, b in enumerate(best) if b is None]
    if missing:
        raise ValueError(f"row_times: rows {missing} are not on the path")
    return [(f + b[1]) // 2 for f, b in zip(first, best)]


def llm_token_times(
    whisper_spans, whisper_starts, speech_end, llm_spans, text=None
):
    """(start, end) of each LLM token from the Whisper tokens' starts.

    Whisper token ``i`` holds characters ``whisper_spans[i]`` and the time
    from ``whisper_starts[i]`` to the next token's start (the last: to
    ``speech_end``); a character's time is interpolated linearly inside
    its token.  An LLM token starts at its first character's time (a
    character before every Whisper token: the first start; after all:
    the speech end) and ends where the next LLM token starts (the last:
    at ``speech_end``).  Starts never decrease.

    Arguments
    ---------
    whisper_spans : sequence of (int, int)
        Character spans of the W Whisper text tokens.
    whisper_starts : sequence of float
        Their W start times.
    speech_end : float
        The end of text's time.
    llm_spans : sequence of (int, int)
        Character spans of the N LLM tokens (same text).
    text : str, optional
        The text the spans count (position -1: a space before it); when
        given, a token's time is that of its first character that is not
        a space (a space makes no sound).

    Returns
    -------
    list of (float, float)

    Example
    -------
    >>> # Whisper " hello|world" at 0.0 and 1.0 s, end 2.0 s;
    >>> # LLM " hel|lo| world"
    >>> llm_token_times([(0, 6), (6, 12)], [0.0, 1.0], 2.0,
    ...                 [(0, 4), (4, 6), (6, 12)])
    [(0.0, 0.6666666666666666), (0.6666666666666666, 1.0), (1.0, 2.0)]
    """
    bounds = list(whisper_starts) + [speech_end]
    if len(whisper_spans) + 1 != len(bounds) or not whisper_spans:
        raise ValueError(
            "llm_token_times: need one start per Whisper token (at least one)"
        )

    def char_time(c):
        for i, (a, b) in enumerate(whisper_spans):
            if c < b or i == len(whisper_spans) - 1:
                if c <= a or b <= a:
                    return float(bounds[i])
                frac = min((c - a) / (b - a), 1.0)
                return bounds[i] + frac * (bounds[i + 1] - bounds[i])
        return float(speech_end)

    def first_sound(a, b):
        if text is None:
            return a
        for c in range(a, b):
            if 0 <= c < len(text) and not text[c].isspace():
                return c
        return a

    starts, last = [], float(bounds[0])
    for a, b in llm_spans:
        last = max(last, char_time(first_sound(a, b)))
        starts.append(min(last, float(speech_end)))
    ends = starts[1:] + [float(speech_end)]
    return [(s, max(s, e)) for s, e in zip(starts, ends)]


# ----------------------------------------------------------------------
# a batch of utterances
@torch.no_grad()
def utterance_timings(teacher, prompts, feats, rows, frame_rate=50.0):
    """The LLM-token timings of a batch of utterances.

    Arguments
    ---------
    teacher : WhisperDecoderTeacher
        The decoder (with its alignment heads).
    prompts : speechbrain_blspkd.prompt.PromptBuilder
        The LLM's prompt builder (its transcript tokenisation).
    feats : list of torch.Tensor
        (T_b, d) encoder output of each row (unpadded).
    rows : list of dict
        Manifest rows (``ID``, ``transcript``, ``language``).
    frame_rate : float
        Encoder frames per second.

    Returns
    -------
    list of torch.Tensor
        (N_b, 2) float32 seconds per row.
    """
    inputs, plans, plans_text = [], [], []
    for row in rows:
        transcript = row["transcript"]
        text_ids, whisper_spans = teacher.text_spans(transcript)
        _, llm_spans = llm_token_spans(prompts, transcript)
        if not text_ids or not llm_spans:
            raise ValueError(f"utterance {row['ID']!r}: empty transcript")
        prefix = teacher.prefix_ids(row.get("language"))
        inputs.append(torch.tensor(prefix + text_ids))
        plans.append((len(prefix), whisper_spans, llm_spans))
        plans_text.append(transcript.strip())
    limit = teacher.decoder.embed_positions.weight.shape[0]
    for row, ids in zip(rows, inputs):
        if ids.numel() > limit:
            raise ValueError(
                f"utterance {row['ID']!r}: {ids.numel()} Whisper decoder "
                f"tokens exceed the decoder's {limit} positions"
            )
    ids, _ = _pad([i[:, None] for i in inputs])
    padded, frame_counts = _pad([f.float() for f in feats])
    weights = teacher.cross_attention(padded, frame_counts, ids[..., 0])
    out = []
    for b, (prefix, whisper_spans, llm_spans) in enumerate(plans):
        frames = int(frame_counts[b])
        length = prefix + len(whisper_spans)
        matrix = alignment_matrix(
            weights[b, :, :length, :frames], prefix - 1, len(whisper_spans) + 1
        )
        peaks = row_times(matrix, *dtw_path(-matrix))
        seconds = [s / frame_rate for s in peaks]
        times = llm_token_times(
            whisper_spans,
            seconds[:-1],
            seconds[-1],
            llm_spans,
            text=plans_text[b],
        )
        out.append(torch.tensor(times, dtype=torch.float32))
    return out


# ----------------------------------------------------------------------
# settings and the cache folder
def reader_settings(model):
    """What training can check of a timing cache: the features (the
    model's encoder), the LLM tokenizer and the transcript separator.

    Example
    -------
    >>> from speechbrain_blspkd.utils.testing import tiny_speech_llm
    >>> sorted(reader_settings(tiny_speech_llm()))
    ['features', 'llm_tokenizer', 'transcript_separator', 'version']
    """
    if model is None or getattr(model, "encoder", None) is None:
        raise ValueError(
            "token timings need the model's (Whisper) encoder to check the "
            "stored timings against"
        )
    return _settings(
        feature_checksum(model.encoder),
        model.tokenizer,
        model.prompts.transcript_separator,
    )


def _settings(features, llm_tokenizer, separator, teacher=None):
    settings = dict(
        version=CACHE_VERSION,
        features=str(features),
        llm_tokenizer=_tokenizer_checksum(llm_tokenizer),
        transcript_separator=separator,
    )
    if teacher is not None:
        settings.update(
            whisper=teacher.checksum(),
            alignment_heads=[list(h) for h in teacher.alignment_heads],
            median_width=MEDIAN_WIDTH,
        )
    return settings


def _short(value):
    text = repr(value)
    return text[:14] + "...'" if len(text) > 18 else text


class TokenTimingCache:
    """A folder of per-utterance LLM-token timings ((N, 2) seconds).

    Arguments
    ---------
    folder : str or pathlib.Path
        The cache folder.
    settings : dict
        What the timings must have been written with; every key given must
        match ``timings.json`` (a reader gives :func:`reader_settings`, the
        writer more).
    create : bool
        Writer side: make the folder and its label when missing.  Reader
        side (False): a folder without ``timings.json`` is an error that
        says how to write it.
    overwrite : bool
        A folder written for other settings is deleted and started again
        instead of raising :class:`StaleTokenTimingsError`.

    Example
    -------
    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> cache = TokenTimingCache(folder, {"features": "a", "whisper": "w"},
    ...     create=True)
    >>> cache.put("u1", torch.tensor([[0.0, 0.5], [0.5, 0.75]]))
    >>> TokenTimingCache(folder, {"features": "a"}).get("u1").tolist()
    [[0.0, 0.5], [0.5, 0.75]]
    >>> TokenTimingCache(folder, {"features": "b"})
    Traceback (most recent call last):
    ...
    speechbrain_blspkd.dataprep.token_timings.StaleTokenTimingsError: token timings in ... was written for other settings: features 'a' != 'b' (this run); use another folder, delete it, or rebuild it with overwrite=True (--overwrite)
    """

    def __init__(self, folder, settings, create=False, overwrite=False):
        self.folder = pathlib.Path(folder)

        def clear():
            shutil.rmtree(self.folder / "feats", ignore_errors=True)
            (self.folder / META_FILE).unlink(missing_ok=True)
            (self.folder / FEATURE_META_FILE).unlink(missing_ok=True)

        meta = check_label(
            self.folder,
            META_FILE,
            settings,
            what="token timings",
            error=StaleTokenTimingsError,
            holds_data=lambda: (
                (self.folder / "feats").is_dir()
                or (self.folder / FEATURE_META_FILE).is_file()
            ),
            clear=clear,
            how_to_write="write them with `python -m speechbrain_blspkd."
            "dataprep.token_timings MANIFEST --features FOLDER --out "
            f"{self.folder}` or the recipe's preparation "
            "(prepare_token_timings)",
            create=create,
            overwrite=overwrite,
            describe=lambda key, value: _short(value),
        )
        self.settings = meta
        digest = hashlib.sha256(
            json.dumps(meta, sort_keys=True).encode()
        ).hexdigest()
        self.store = FeatureCache(self.folder, f"token-timings:{digest}")

    def __contains__(self, uid):
        return uid in self.store

    def __len__(self):
        return len(self.store)

    def get(self, uid):
        """The ``(N, 2)`` float32 timings of ``uid`` (None when absent)."""
        return self.store.get(uid, dtype=torch.float32)

    def put(self, uid, timings):
        """Store ``(N, 2)`` timings of ``uid`` (float16 seconds, atomic)."""
        if timings.dim() != 2 or timings.shape[1] != 2:
            raise ValueError(
                f"timings of {uid!r} must be (N, 2), got {tuple(timings.shape)}"
            )
        self.store.put(uid, timings)


# ----------------------------------------------------------------------
# writing
def write_token_timings(
    manifest,
    features,
    folder,
    teacher,
    prompts,
    batch_size=16,
    ids=None,
    shard=(0, 1),
    limit=None,
    encoder=None,
    overwrite=False,
):
    """Store the token timings of every row not stored yet.

    Arguments
    ---------
    manifest : str, pathlib.Path, or list
        A manifest, several, or their rows (``ID``, ``transcript``,
        ``language``, ``duration``).
    features : FeatureCache or str or pathlib.Path
        The encoder features the adapter reads; every row must be there.
    folder : str or pathlib.Path
        The timing cache folder.
    teacher : WhisperDecoderTeacher
        Whisper's decoder, the partner of the encoder that wrote
        ``features``.
    prompts : speechbrain_blspkd.prompt.PromptBuilder
        The LLM's prompt builder (``model.prompts``).
    batch_size : int
        Utterances per decoder pass.
    ids : collection of str, optional
        Only these rows (None: all).
    shard : tuple of int
        ``(i, n)``: rows ``i, i + n, ...`` (after ``ids``).
    limit : int, optional
        Only the first ``limit`` rows of the shard.
    encoder : torch.nn.Module, optional
        When given, the features must have been written by it.
    overwrite : bool
        Rebuild a folder written for other settings.

    Returns
    -------
    dict
        ``written``, ``skipped`` (already stored), ``tokens`` (LLM tokens
        written), ``seconds`` (decoder passes, DTW and writing).

    Example
    -------
    >>> import tempfile
    >>> from speechbrain_blspkd.utils.testing import tiny_saved_speech_llm
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> model = tiny_saved_speech_llm(d)
    >>> features = FeatureCache(d / "feats", "enc")
    >>> features.put("u1", torch.randn(20, 64))
    >>> rows = [dict(ID="u1", transcript="the cat sat", language="en",
    ...     duration=0.4)]
    >>> teacher = WhisperDecoderTeacher(d / "whisper")
    >>> write_token_timings(rows, features, d / "t", teacher,
    ...     model.prompts)["written"]
    1
    >>> spans = TokenTimingCache(d / "t", {"features": "enc"}).get("u1")
    >>> spans.shape[0] == len(model.transcript_ids(["the cat sat"])[0])
    True
    >>> bool((spans[1:, 0] >= spans[:-1, 0]).all())
    True
    """
    i, n = shard
    if not 0 <= i < n:
        raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard}")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    rows = _rows(manifest)
    if ids is not None:
        wanted = set(ids)
        rows = [r for r in rows if r["ID"] in wanted]
    rows = rows[i::n]
    if limit is not None:
        rows = rows[: int(limit)]
    features = _open_features(features)
    if encoder is not None and feature_checksum(encoder) != features.checksum:
        raise StaleCacheError(
            f"the features in {features.folder} were written by another "
            f"encoder ({features.checksum[:12]}...) than this Whisper's "
            f"({feature_checksum(encoder)[:12]}...); rebuild them or use "
            "the same Whisper (and encoder dtype) as the recipe"
        )
    settings = _settings(
        features.checksum,
        prompts.tokenizer,
        prompts.transcript_separator,
        teacher,
    )
    cache = TokenTimingCache(folder, settings, create=True, overwrite=overwrite)
    remove_stray_tmp(cache.folder, "feats/*/.*.tmp", recursive=False)
    todo = [r for r in rows if r["ID"] not in cache]
    absent = [r["ID"] for r in todo if r["ID"] not in features]
    if absent:
        raise KeyError(
            f"{len(absent)} of {len(todo)} utterances are not in the feature "
            f"cache {features.folder} (e.g. {absent[:3]}); build it first"
        )
    todo.sort(key=lambda r: (float(r.get("duration") or 0), r["ID"]))
    stats = dict(written=0, skipped=len(rows) - len(todo), tokens=0)
    logger.info(
        "token timings %s: %d rows, %d stored, %d to write",
        cache.folder,
        len(rows),
        stats["skipped"],
        len(todo),
    )
    from speechbrain_blspkd.nnet.whisper_encoder import WhisperEncoder

    rate = WhisperEncoder.frame_rate()
    start = time.perf_counter()
    for first in range(0, len(todo), batch_size):
        batch = todo[first : first + batch_size]
        feats = [features.get(r["ID"]) for r in batch]
        timings = utterance_timings(teacher, prompts, feats, batch, rate)
        for row, timing in zip(batch, timings):
            cache.put(row["ID"], timing)
            stats["tokens"] += timing.shape[0]
        stats["written"] += len(batch)
    stats["seconds"] = time.perf_counter() - start
    return stats


def _recipe_manifests(hparams):
    """Every manifest a recipe trains, validates or tests on (once each)."""
    paths = [s.train_manifest for s in hparams.get("stages") or []]
    paths += [hparams.get("valid_csv"), hparams.get("test_csv")]
    seen, out = set(), []
    for path in paths:
        if path and str(path) not in seen and pathlib.Path(path).is_file():
            seen.add(str(path))
            out.append(path)
    return out


def prepare_token_timings(hparams, feature_cache, device="cpu", shard=(0, 1)):
    """Write the token timings of every row a recipe reads.

    Does nothing unless ``hparams["token_timings_folder"]`` is set.  The
    rows of every stage's manifest and of the validation and test
    manifests, the recipe's feature cache, Whisper's decoder from
    ``encoder_source`` on ``device``, the model's LLM tokenizer and
    transcript separator, ``feature_batch_size`` rows per pass.  Resumable
    and idempotent; a folder written for other settings is refused
    (:class:`StaleTokenTimingsError`).  Call it after
    :func:`~speechbrain_blspkd.brain.prepare_features`, on one process per
    node (or on every process with its ``shard`` followed by a barrier).

    Returns
    -------
    pathlib.Path or None
        The folder (None when the recipe asks for no timings).
    """
    folder = hparams.get("token_timings_folder")
    if not folder:
        return None
    if feature_cache is None:
        raise ValueError(
            "token timings are computed from the cached encoder features: "
            "set use_feature_cache: True (a frozen Whisper encoder)"
        )
    teacher = WhisperDecoderTeacher(hparams["encoder_source"]).to(device)
    rows = []
    for path in _recipe_manifests(hparams):
        rows.extend(read_manifest(path))
    unique = list({r["ID"]: r for r in rows}.values())
    info = write_token_timings(
        unique,
        feature_cache,
        folder,
        teacher,
        hparams["model"].prompts,
        batch_size=hparams.get("feature_batch_size", 16),
        shard=shard,
    )
    logger.info("token timings %s: %s", folder, info)
    return pathlib.Path(folder)


def timing_items(model, folder):
    """The dynamic item that gives each row its stored timings.

    The cache is checked against ``model`` (features, LLM tokenizer,
    separator: :class:`StaleTokenTimingsError` otherwise); each row's
    timings must hold one span per transcript token.

    Arguments
    ---------
    model : speechbrain_blspkd.models.speech_llm.SpeechLLMModel
        The model being trained.
    folder : str or pathlib.Path
        The timing cache.

    Returns
    -------
    callable
        A speechbrain dynamic item ``(id, transcript) -> token_spans``
        ((N, 2) float32 seconds).
    """
    import speechbrain as sb

    cache = TokenTimingCache(folder, reader_settings(model))

    @sb.utils.data_pipeline.takes("id", "transcript")
    @sb.utils.data_pipeline.provides("token_spans")
    def stored_timings(uid, transcript):
        spans = cache.get(uid)
        if spans is None:
            raise KeyError(
                f"utterance {uid!r} has no token timings in {cache.folder}; "
                "run the recipe's preparation (prepare_token_timings)"
            )
        count = len(model.prompts.transcript_ids(transcript))
        if spans.shape[0] != count:
            raise StaleTokenTimingsError(
                f"{cache.folder}: utterance {uid!r} has {spans.shape[0]} "
                f"token timings for a transcript of {count} LLM tokens; the "
                "transcript changed since they were written (rebuild with "
                "overwrite=True)"
            )
        return spans

    return stored_timings


# ----------------------------------------------------------------------
# command line
def main(argv=None):
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description="Store the time span of every LLM token of each "
        "transcript, from Whisper's cross-attention on a feature cache."
    )
    parser.add_argument("manifests", nargs="+", help="manifest(s)")
    parser.add_argument(
        "--features", required=True, help="the recipe's feature cache folder"
    )
    parser.add_argument("--out", required=True, help="the timing folder")
    parser.add_argument("--whisper", default="whisper-base")
    parser.add_argument("--llm", default="smollm2-135m-instruct")
    parser.add_argument("--system-prompt", default=None)
    parser.add_argument("--transcript-separator", default=" ")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shard", type=_parse_shard, default=(0, 1))
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--encoder-dtype",
        default="auto",
        help="the recipe encoder's dtype, to check the features against "
        "(default %(default)s, as the recipes; 'none' skips the check)",
    )
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    setup_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        from transformers import AutoTokenizer

        from speechbrain_blspkd.inference.export import resolve_source
        from speechbrain_blspkd.nnet.whisper_encoder import WhisperEncoder
        from speechbrain_blspkd.prompt import PromptBuilder
        from speechbrain_blspkd.utils import precision

        precision.set_run_device(args.device)
        prompts = PromptBuilder(
            AutoTokenizer.from_pretrained(str(resolve_source(args.llm))),
            system_prompt=args.system_prompt,
            transcript_separator=args.transcript_separator,
        )
        encoder = None
        if args.encoder_dtype.lower() != "none":
            encoder = WhisperEncoder(
                resolve_source(args.whisper), dtype=args.encoder_dtype
            )
        teacher = WhisperDecoderTeacher(args.whisper).to(args.device)
        info = write_token_timings(
            args.manifests,
            args.features,
            args.out,
            teacher,
            prompts,
            batch_size=args.batch_size,
            shard=args.shard,
            limit=args.limit,
            encoder=encoder,
            overwrite=args.overwrite,
        )
    except (RuntimeError, ValueError, KeyError, FileNotFoundError) as e:
        return report_error(e)
    rate = info["written"] / info["seconds"] if info["seconds"] else 0.0
    print(
        f"{args.out}: {info['written']} utterances written ({rate:.1f}/s), "
        f"{info['skipped']} already there, {info['tokens']} LLM tokens"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
