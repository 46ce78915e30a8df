"""From Whisper's alignment heads to the time of every LLM token.

Pure tensor code, used when the token timings are stored for training
(:mod:`speechbrain_blspkd.dataprep.token_timings`, which describes the
method step by step) and wherever a clip's tokens must be placed in time
(the demo page's CIF plot):

* :func:`alignment_matrix`: z-normalised, median-filtered head weights,
  one row per text token plus the end of text;
* :func:`dtw_path` and :func:`row_times`: a monotonic path through it and
  the frame where each row's token begins;
* :func:`llm_token_times`: Whisper tokens' starts to LLM tokens' (start,
  end), through the characters both tokenisers cover;
* :func:`utterance_timings`: all of it for a batch of utterances.

Authors
 * speechbrain-blspkd contributors 2026
"""

import torch
from torch import nn

__all__ = [
    "MEDIAN_WIDTH",
    "alignment_matrix",
    "char_spans",
    "dtw_path",
    "llm_token_spans",
    "llm_token_times",
    "row_times",
    "utterance_timings",
]

#: Width of the median filter along time (frames), as Whisper's own
#: word timestamps use.
MEDIAN_WIDTH = 7


def char_spans(tokenizer, text, offset):
    """Token ids of ``text`` and each token's character span, shifted by
    ``-offset`` (so a prefix of ``offset`` characters counts negative).

    Example
    -------
    >>> from speechbrain_blspkd.testing import doctest_tokenizer
    >>> ids, spans = char_spans(doctest_tokenizer(), " the cat", 1)
    >>> spans[0][0], spans[-1][1]
    (-1, 7)
    """
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
    >>> from speechbrain_blspkd.testing import doctest_tokenizer
    >>> prompts = PromptBuilder(doctest_tokenizer())
    >>> ids, spans = llm_token_spans(prompts, " the cat ")
    >>> ids == prompts.transcript_ids(" the cat "), spans[0][0], spans[-1][1]
    (True, -1, 7)
    """
    separator = prompts.transcript_separator
    ids, spans = char_spans(
        prompts.tokenizer, separator + transcript.strip(), len(separator)
    )
    if ids != prompts.transcript_ids(transcript):
        raise ValueError(
            f"the LLM tokenizer splits {transcript!r} differently with "
            "offsets than without; its character spans cannot be trusted"
        )
    return ids, spans


def _pad(tensors):
    """Right-pad 2-D tensors of equal width: (B, Tmax, d) and counts."""
    counts = torch.tensor([t.shape[0] for t in tensors])
    out = tensors[0].new_zeros(
        len(tensors), int(counts.max()), tensors[0].shape[1]
    )
    for b, t in enumerate(tensors):
        out[b, : t.shape[0]] = t
    return out, counts


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
