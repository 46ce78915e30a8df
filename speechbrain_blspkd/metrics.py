"""Evaluation metrics shared by every system (BLSP-KD, cascade, siblings).

One text normalisation (:func:`normalize_text`) is applied to every system
before word error rates and spoken-QA matching, so that numbers from
different systems compare fairly.

Units used throughout this module:

* WER, BLEU and chrF are percentages (0 to 100, WER may exceed 100), the
  conventions of SpeechBrain's ``ErrorRateStats`` and of sacrebleu.
* Rates and accuracies (exact count rate, nearest-token accuracy, collapse
  rate, spoken-QA accuracy) are fractions in [0, 1].

Languages written without spaces between words (``language`` starting
with ``zh``, ``ja``, ``cmn``, ``yue``, ``th``, ``lo``, ``km`` or ``my``) are
scored per character: every character of those scripts (CJK, kana, Thai,
Lao, Khmer, Myanmar) is one token, and runs of other characters (Latin
words, digits) stay whole words.  The WER of such a language is therefore a
character error rate (CER).  ``language=None`` (the default of :func:`wer`,
:func:`bleu` and :func:`parity_agreement`) scores by script instead: the
same per-character rule applied to every text, whatever its language, so a
corpus that mixes languages is scored correctly without knowing them.

Speech-vs-text parity (docs/algorithms.md §2.8, §2.9.8) is measured as the agreement of the
response to the spoken instruction with the teacher's response to the same
instruction as text (:func:`parity_agreement`), beside a shuffled-pair
baseline.  The KL part of parity is computed with the losses.
"""

import json
import logging
import pathlib
import random
import re
import unicodedata

import torch

from speechbrain_blspkd.utils.atomic import atomic_write_text

logger = logging.getLogger(__name__)

CHARACTER_LANGUAGES = ("zh", "ja", "cmn", "yue", "th", "lo", "km", "my")

# Apostrophes are deleted ("don't" -> "dont"); all other punctuation becomes
# a space ("well-known" -> "well known").
_APOSTROPHES = {"'", "\u2019", "\u02bc", "\u2018", "`"}

_CJK_RANGES = (
    (0x2E80, 0x2FDF),  # radicals
    (0x3005, 0x3007),  # iteration marks, ideographic zero
    (0x3040, 0x30FF),  # hiragana, katakana
    (0x3100, 0x312F),  # bopomofo
    (0x3190, 0x31FF),
    (0x3400, 0x4DBF),  # extension A
    (0x4E00, 0x9FFF),  # unified ideographs
    (0xF900, 0xFAFF),  # compatibility ideographs
    (0x20000, 0x2FA1F),  # extensions B+
)
# other scripts written without spaces between words
_UNSPACED_RANGES = _CJK_RANGES + (
    (0x0E00, 0x0EFF),  # Thai, Lao
    (0x1000, 0x109F),  # Myanmar
    (0x1780, 0x17FF),  # Khmer
)


def _is_cjk(char):
    """Whether ``char`` is scored as one token (a script without spaces)."""
    code = ord(char)
    return any(lo <= code <= hi for lo, hi in _UNSPACED_RANGES)


def _by_character(language):
    """Whether characters of unspaced scripts are tokens (None: always)."""
    return language is None or is_character_language(language)


def is_character_language(language):
    """Return True when ``language`` is scored per character (zh, ja).

    Arguments
    ---------
    language : str or None
        A language code such as ``"en"``, ``"zh"``, ``"zh-CN"``.

    Returns
    -------
    bool

    Example
    -------
    >>> is_character_language("zh-CN"), is_character_language("en")
    (True, False)
    """
    if not language:
        return False
    base = re.split(r"[-_]", str(language).strip().lower())[0]
    return base in CHARACTER_LANGUAGES


def normalize_text(text, language="en"):
    """Normalise a transcript or response for scoring.

    Steps: Unicode NFKC, lowercase, apostrophes deleted, every other
    punctuation character (Unicode categories ``P*``) replaced by a space,
    whitespace collapsed and stripped.  CJK characters are kept; for
    character languages (zh, ja, th ...) and ``language=None`` (by script)
    the spaces next to characters of unspaced scripts are removed, so that
    "我 爱 你" and "我爱你" normalise alike.

    Arguments
    ---------
    text : str or None
        The text; None gives "".
    language : str or None
        Language code of the text; None: by script.

    Returns
    -------
    str
        The normalised text.

    Example
    -------
    >>> normalize_text("  Hello,   WORLD! Don't  stop-me. ")
    'hello world dont stop me'
    >>> normalize_text("你好，世界！", language="zh")
    '你好世界'
    """
    if text is None:
        return ""
    if not isinstance(text, str):
        raise TypeError(
            f"normalize_text: expected a string, got {type(text).__name__}"
        )
    text = unicodedata.normalize("NFKC", text).lower()
    chars = []
    for char in text:
        if char in _APOSTROPHES:
            continue
        if unicodedata.category(char).startswith("P"):
            chars.append(" ")
        else:
            chars.append(char)
    text = " ".join("".join(chars).split())
    if _by_character(language):
        text = "".join(
            piece if piece != " " else _space_or_empty(text, i)
            for i, piece in enumerate(text)
        )
    return text


def _space_or_empty(text, i):
    """Keep a space only when it separates two non-CJK characters."""
    left, right = text[i - 1], text[i + 1]
    return "" if _is_cjk(left) or _is_cjk(right) else " "


def tokenize(text, language="en"):
    """Split normalised text into scoring tokens.

    Words split on whitespace; for character languages (zh, ja, th ...)
    and ``language=None`` (by script) each character of an unspaced script
    is its own token and runs of other characters stay words.

    Arguments
    ---------
    text : str
        Normalised text (see :func:`normalize_text`).
    language : str or None
        Language code; None: by script.

    Returns
    -------
    list of str

    Example
    -------
    >>> tokenize("hello world")
    ['hello', 'world']
    >>> tokenize("我用python写", language="zh")
    ['我', '用', 'python', '写']
    >>> tokenize("hello 世界", language=None)
    ['hello', '世', '界']
    """
    if not _by_character(language):
        return text.split()
    tokens = []
    for word in text.split():
        run = ""
        for char in word:
            if _is_cjk(char):
                if run:
                    tokens.append(run)
                    run = ""
                tokens.append(char)
            else:
                run += char
        if run:
            tokens.append(run)
    return tokens


def _check_pair(hyps, refs, what):
    hyps, refs = list(hyps), list(refs)
    if len(hyps) != len(refs):
        raise ValueError(
            f"{what}: {len(hyps)} hypotheses but {len(refs)} references"
        )
    if not hyps:
        raise ValueError(f"{what}: no hypotheses to score")
    return hyps, refs


def _languages(language, n, what):
    """One language (or None) per item from a code, None or a list."""
    if isinstance(language, (list, tuple)):
        if len(language) != n:
            raise ValueError(f"{what}: {len(language)} languages for {n} items")
        return list(language)
    return [language] * n


def wer(hyps, refs, language=None, ids=None, normalize=True):
    """Word error rate (character error rate for zh/ja) of a corpus.

    Uses SpeechBrain's ``ErrorRateStats`` on the tokens of
    :func:`normalize_text` + :func:`tokenize`.  Empty hypotheses count all
    reference words as deletions; empty references count all hypothesis
    words as insertions.  When the references hold no words at all the
    corpus WER is 0.0 without edits and 100.0 with any.

    Arguments
    ---------
    hyps : list of str
        Hypotheses (system outputs).
    refs : list of str
        References, same length.
    language : str or None or list
        Language code (decides normalisation and tokenisation), one per
        utterance (a list), or None (default): by script, each character of
        an unspaced script (CJK, Thai ...) one token, whatever the language.
    ids : list of str, optional
        Utterance IDs for the details; default "0", "1", ...
    normalize : bool
        Apply :func:`normalize_text` first (default True).

    Returns
    -------
    dict
        ``wer`` (percent), ``ins``, ``del``, ``sub``, ``num_words``
        (reference tokens), ``num_utts`` and ``details``: one dict per
        utterance with ``id``, ``wer``, ``ins``, ``del``, ``sub``,
        ``num_words``, ``hyp`` and ``ref`` (the scored token strings).

    Example
    -------
    >>> out = wer(["the cat sat"], ["the cat sat down"])
    >>> out["wer"], out["del"], out["num_words"]
    (25.0, 1, 4)
    >>> wer(["我爱他"], ["我爱你"])["wer"]  # by script: per character
    33.33...
    """
    from speechbrain.utils.metric_stats import ErrorRateStats

    hyps, refs = _check_pair(hyps, refs, "wer")
    if ids is None:
        ids = [str(i) for i in range(len(hyps))]
    elif len(ids) != len(hyps):
        raise ValueError(f"wer: {len(ids)} ids for {len(hyps)} hypotheses")
    langs = _languages(language, len(hyps), "wer")
    seps = ["" if is_character_language(lang) else " " for lang in langs]

    def prep(text, lang):
        text = normalize_text(text, lang) if normalize else text or ""
        return tokenize(text, lang)

    hyp_tokens = [prep(h, lang) for h, lang in zip(hyps, langs)]
    ref_tokens = [prep(r, lang) for r, lang in zip(refs, langs)]
    stats = ErrorRateStats()
    stats.append(list(ids), hyp_tokens, ref_tokens)
    details = []
    totals = {"ins": 0, "del": 0, "sub": 0, "num_words": 0}
    for score, sep in zip(stats.scores, seps):
        row = {
            "id": score["key"],
            "wer": float(score["WER"]),
            "ins": int(score["insertions"]),
            "del": int(score["deletions"]),
            "sub": int(score["substitutions"]),
            "num_words": int(score["num_ref_tokens"]),
            "hyp": sep.join(score["hyp_tokens"]),
            "ref": sep.join(score["ref_tokens"]),
        }
        for key in totals:
            totals[key] += row[key]
        details.append(row)
    edits = totals["ins"] + totals["del"] + totals["sub"]
    if totals["num_words"]:
        rate = 100.0 * edits / totals["num_words"]
    else:
        rate = 100.0 if edits else 0.0
    return {"wer": rate, **totals, "num_utts": len(hyps), "details": details}


def bleu(hyps, refs, language=None):
    """Corpus BLEU (sacrebleu) on raw, detokenised text.

    sacrebleu's own tokeniser is used ("zh" for Chinese and Japanese, and
    with ``language=None`` when a reference holds CJK characters; "char"
    for Thai, Lao, Khmer and Myanmar; "13a" otherwise); no extra
    normalisation, as is standard for BLEU.

    Arguments
    ---------
    hyps : list of str
        Hypotheses.
    refs : list of str
        One reference per hypothesis.
    language : str or None
        Target language code; None: from the references' script.

    Returns
    -------
    float
        BLEU in percent.

    Example
    -------
    >>> round(bleu(["the cat sat on the mat"], ["the cat sat on the mat"]))
    100
    """
    import sacrebleu

    hyps, refs = _check_pair(hyps, refs, "bleu")
    if language is None:
        cjk = any(_is_cjk(c) for r in refs for c in (r or ""))
        tok = "zh" if cjk else "13a"
    elif not is_character_language(language):
        tok = "13a"
    else:  # sacrebleu's "zh" splits CJK only: the other scripts per char
        base = re.split(r"[-_]", str(language).strip().lower())[0]
        tok = "zh" if base in ("zh", "ja", "cmn", "yue") else "char"
    hyps = [h or "" for h in hyps]
    refs = [r or "" for r in refs]
    return float(sacrebleu.corpus_bleu(hyps, [refs], tokenize=tok).score)


def chrf(hyps, refs):
    """Corpus chrF (sacrebleu ``CHRF`` default parameters) on raw text.

    Arguments
    ---------
    hyps : list of str
        Hypotheses.
    refs : list of str
        One reference per hypothesis.

    Returns
    -------
    float
        chrF in percent.

    Example
    -------
    >>> chrf(["hello there"], ["hello there"])
    100.0
    """
    import sacrebleu

    hyps, refs = _check_pair(hyps, refs, "chrf")
    hyps = [h or "" for h in hyps]
    refs = [r or "" for r in refs]
    return float(sacrebleu.CHRF().corpus_score(hyps, [refs]).score)


def derangement(n, seed=0):
    """A seeded random permutation of ``range(n)`` with no fixed point.

    Drawn uniformly by rejection (about e tries on average).

    Arguments
    ---------
    n : int
        Number of items, at least 2.
    seed : int
        Random seed (the result is deterministic for a seed).

    Returns
    -------
    list of int
        ``perm`` with ``perm[i] != i`` for every i.

    Example
    -------
    >>> perm = derangement(5, seed=0)
    >>> sorted(perm) == list(range(5)), any(p == i for i, p in enumerate(perm))
    (True, False)
    """
    if n < 2:
        raise ValueError(f"derangement: needs at least 2 items, got {n}")
    rng = random.Random(seed)
    perm = list(range(n))
    while True:
        rng.shuffle(perm)
        if all(p != i for i, p in enumerate(perm)):
            return perm


def parity_agreement(speech_responses, text_responses, seed=0, language=None):
    """Agreement of speech-input responses with the text-input responses.

    The text-input (teacher) response to the same instruction is the
    reference.  The shuffled baseline scores the same speech responses
    against teacher responses of the wrong utterances (a seeded
    derangement); it tells what agreement topic-free generic answers
    already reach.  With a single item the baseline is undefined (None).

    Arguments
    ---------
    speech_responses : list of str
        Responses of the system given the spoken instruction.
    text_responses : list of str
        Teacher responses given the instruction as text, same order.
    seed : int
        Seed of the derangement.
    language : str or None or list
        Language of the responses (WER normalisation and tokenisation), one
        per response (a list), or None (default): by script (each CJK or
        other unspaced-script character one token), so that a corpus mixing
        languages is scored correctly.

    Returns
    -------
    dict
        ``chrf``, ``wer``, ``shuffled_chrf``, ``shuffled_wer`` (percent; the
        shuffled ones None when ``n`` is 1) and ``n``.

    Example
    -------
    >>> texts = ["a red car", "big dog"]
    >>> out = parity_agreement(texts, texts)
    >>> out["chrf"], out["wer"], out["shuffled_chrf"] < 100.0
    (100.0, 0.0, True)
    """
    speech, text = _check_pair(
        speech_responses, text_responses, "parity_agreement"
    )
    out = {
        "chrf": chrf(speech, text),
        "wer": wer(speech, text, language)["wer"],
        "shuffled_chrf": None,
        "shuffled_wer": None,
        "n": len(speech),
    }
    if len(speech) > 1:
        wrong = [text[j] for j in derangement(len(text), seed)]
        out["shuffled_chrf"] = chrf(speech, wrong)
        out["shuffled_wer"] = wer(speech, wrong, language)["wer"]
    return out


def _as_long_list(values, what):
    if isinstance(values, torch.Tensor):
        values = values.detach().reshape(-1).tolist()
    values = list(values)
    if not values:
        raise ValueError(f"{what}: no counts given")
    return [int(round(float(v))) for v in values]


def count_stats(predicted_counts, target_counts):
    """Exact-count rate and count errors of the CIF token counts.

    Arguments
    ---------
    predicted_counts : list or torch.Tensor
        Predicted number of tokens per utterance (N^).
    target_counts : list or torch.Tensor
        True number of tokens (N).

    Returns
    -------
    dict
        ``exact_rate`` (fraction with N^ == N), ``mean_abs_error``
        (mean |N^ - N|), ``mean_error`` (mean N^ - N) and ``n``.

    Example
    -------
    >>> stats = count_stats([3, 4, 6], [3, 5, 5])
    >>> stats["exact_rate"], stats["mean_abs_error"], stats["mean_error"]
    (0.333..., 0.666..., 0.0)
    """
    pred = _as_long_list(predicted_counts, "count_stats (predicted)")
    true = _as_long_list(target_counts, "count_stats (target)")
    if len(pred) != len(true):
        raise ValueError(
            f"count_stats: {len(pred)} predicted counts but "
            f"{len(true)} target counts"
        )
    n = len(pred)
    diffs = [p - t for p, t in zip(pred, true)]
    return {
        "exact_rate": sum(d == 0 for d in diffs) / n,
        "mean_abs_error": sum(abs(d) for d in diffs) / n,
        "mean_error": sum(diffs) / n,
        "n": n,
    }


def exact_count_rate(predicted_counts, target_counts):
    """Fraction of utterances whose predicted token count is exact.

    Arguments
    ---------
    predicted_counts : list or torch.Tensor
        Predicted counts N^.
    target_counts : list or torch.Tensor
        True counts N.

    Returns
    -------
    float

    Example
    -------
    >>> exact_count_rate([3, 4], [3, 5])
    0.5
    """
    return count_stats(predicted_counts, target_counts)["exact_rate"]


def mean_abs_count_error(predicted_counts, target_counts):
    """Mean |N^ - N| of the predicted token counts.

    Arguments
    ---------
    predicted_counts : list or torch.Tensor
        Predicted counts N^.
    target_counts : list or torch.Tensor
        True counts N.

    Returns
    -------
    float

    Example
    -------
    >>> mean_abs_count_error(torch.tensor([3, 7]), torch.tensor([3, 5]))
    1.0
    """
    return count_stats(predicted_counts, target_counts)["mean_abs_error"]


def nearest_tokens(
    outputs, embedding_table, metric="cosine", row_chunk=1024, vocab_chunk=16384
):
    """Index of the nearest embedding-table row for every output vector.

    Computed in float32 in chunks of rows and of the vocabulary, so tables
    of 262k rows never need a (K, V) score matrix.  Runs on the device of
    ``outputs``; the table is moved chunk by chunk.

    Arguments
    ---------
    outputs : torch.Tensor
        (K, D) vectors (e.g. adapter outputs at the CIF positions).
    embedding_table : torch.Tensor
        (V, D) token embeddings of the LLM.
    metric : str
        "cosine" (largest cosine), "l2" (smallest Euclidean distance) or
        "dot" (largest inner product).
    row_chunk : int
        Rows of ``outputs`` scored at once.
    vocab_chunk : int
        Table rows scored at once.

    Returns
    -------
    torch.Tensor
        (K,) long indices on the device of ``outputs``.

    Example
    -------
    >>> table = torch.eye(4)
    >>> nearest_tokens(torch.tensor([[0.1, 0.9, 0, 0], [0, 0, 0, 2.0]]), table)
    tensor([1, 3])
    """
    if metric not in ("cosine", "l2", "dot"):
        raise ValueError(
            f"nearest_tokens: metric must be cosine, l2 or dot, got {metric!r}"
        )
    if outputs.dim() != 2 or embedding_table.dim() != 2:
        raise ValueError(
            "nearest_tokens: expected outputs (K, D) and embedding_table "
            f"(V, D), got {tuple(outputs.shape)} and "
            f"{tuple(embedding_table.shape)}"
        )
    if outputs.shape[1] != embedding_table.shape[1]:
        raise ValueError(
            f"nearest_tokens: outputs have dimension {outputs.shape[1]} but "
            f"the embedding table {embedding_table.shape[1]}"
        )
    device = outputs.device
    result = torch.empty(outputs.shape[0], dtype=torch.long, device=device)
    with torch.no_grad():
        for r0 in range(0, outputs.shape[0], row_chunk):
            x = outputs[r0 : r0 + row_chunk].float()
            if metric == "cosine":
                x = torch.nn.functional.normalize(x, dim=-1)
            best = torch.full(
                (x.shape[0],), -float("inf"), dtype=torch.float32, device=device
            )
            best_idx = torch.zeros(x.shape[0], dtype=torch.long, device=device)
            for v0 in range(0, embedding_table.shape[0], vocab_chunk):
                e = embedding_table[v0 : v0 + vocab_chunk].to(device).float()
                if metric == "cosine":
                    e = torch.nn.functional.normalize(e, dim=-1)
                scores = x @ e.T
                if metric == "l2":
                    # argmin |x - e|^2 == argmax (2 x.e - |e|^2)
                    scores = 2 * scores - (e * e).sum(-1)
                val, idx = scores.max(dim=-1)
                better = val > best
                best = torch.where(better, val, best)
                best_idx = torch.where(better, idx + v0, best_idx)
            result[r0 : r0 + x.shape[0]] = best_idx
    return result


def nearest_token_accuracy(
    adapter_outputs,
    embedding_table,
    target_ids,
    metric="cosine",
    row_chunk=1024,
    vocab_chunk=16384,
):
    """Fraction of adapter outputs whose nearest token embedding is the target.

    Arguments
    ---------
    adapter_outputs : torch.Tensor
        (K, D) adapter outputs aligned with the target tokens.
    embedding_table : torch.Tensor
        (V, D) LLM input embedding table.
    target_ids : torch.Tensor or list
        (K,) true token ids.
    metric : str
        "cosine", "l2" or "dot" (see :func:`nearest_tokens`).
    row_chunk : int
        Rows scored at once.
    vocab_chunk : int
        Table rows scored at once.

    Returns
    -------
    float
        Accuracy in [0, 1].

    Example
    -------
    >>> table = torch.eye(3)
    >>> outs = torch.tensor([[1.0, 0.1, 0], [0, 0, 1.0]])
    >>> nearest_token_accuracy(outs, table, torch.tensor([0, 1]))
    0.5
    """
    target = torch.as_tensor(target_ids, dtype=torch.long).reshape(-1)
    if target.numel() != adapter_outputs.shape[0]:
        raise ValueError(
            f"nearest_token_accuracy: {adapter_outputs.shape[0]} outputs "
            f"but {target.numel()} target ids"
        )
    if target.numel() == 0:
        raise ValueError("nearest_token_accuracy: no outputs to score")
    pred = nearest_tokens(
        adapter_outputs, embedding_table, metric, row_chunk, vocab_chunk
    )
    return float((pred == target.to(pred.device)).float().mean())


def collapse_rate(nearest_ids):
    """Fraction of outputs whose nearest token is the most common one.

    A collapsed adapter maps (almost) every position to the same token
    (docs/algorithms.md §2.9.2 measured 90-100 %); a healthy one stays low.

    Arguments
    ---------
    nearest_ids : torch.Tensor or list
        (K,) nearest-token ids (see :func:`nearest_tokens`).

    Returns
    -------
    float
        In [1/K, 1].

    Example
    -------
    >>> collapse_rate(torch.tensor([5, 5, 5, 2]))
    0.75
    """
    ids = torch.as_tensor(nearest_ids, dtype=torch.long).reshape(-1)
    if ids.numel() == 0:
        raise ValueError("collapse_rate: no ids given")
    _, counts = torch.unique(ids, return_counts=True)
    return float(counts.max()) / ids.numel()


def positional_token_accuracy(predicted_ids, target_ids):
    """Token accuracy of predicted id sequences, position by position.

    For utterance ``b`` with ``N^_b`` predicted ids (e.g. the nearest tokens
    of the adapter outputs at the count it predicted itself, what the LLM
    sees at inference) and ``N_b`` true ids, positions
    ``0 <= i < max(N^_b, N_b)`` are scored.  Position ``i`` is correct when
    ``i < min(N^_b, N_b)`` and ``predicted[b][i] == target[b][i]``; a
    missing position (``N^_b < N_b``) and an extra one (``N^_b > N_b``)
    are errors.  The accuracy is::

        sum_b correct_b / sum_b max(N^_b, N_b)

    Positions are not re-aligned: one token missing early shifts every
    later one, which is what a count error does to the speech tokens the
    LLM reads.  With ``N^_b = N_b`` for every ``b`` it is the plain share
    of correct positions (the nearest-token accuracy at the true count).

    Arguments
    ---------
    predicted_ids : list of (list of int)
        Per utterance, the predicted token ids.
    target_ids : list of (list of int)
        Per utterance, the true token ids, same number of utterances.

    Returns
    -------
    dict
        ``accuracy`` (fraction, 0.0 when no position is scored),
        ``correct`` and ``positions`` (the sums above) and ``n``
        (utterances).

    Example
    -------
    One of four tokens is missing at position 1: the two later tokens are
    right but one place early, so only position 0 counts as correct.

    >>> out = positional_token_accuracy([[7, 9, 4]], [[7, 8, 9, 4]])
    >>> out["accuracy"], out["correct"], out["positions"]
    (0.25, 1, 4)
    >>> positional_token_accuracy([[1, 2], [3]], [[1, 5], [3]])["accuracy"]
    0.666...
    """
    pred, true = _check_pair(
        predicted_ids, target_ids, "positional_token_accuracy"
    )
    correct = positions = 0
    for p, t in zip(pred, true):
        p, t = [int(x) for x in p], [int(x) for x in t]
        positions += max(len(p), len(t))
        correct += sum(a == b for a, b in zip(p, t))
    return {
        "accuracy": correct / positions if positions else 0.0,
        "correct": correct,
        "positions": positions,
        "n": len(pred),
    }


def vocabulary_coverage(test_ids, train_ids):
    """Share of test tokens whose id occurs in the training token ids.

    A speech model can hardly produce a token it never heard; this tells
    how much of a test set is in the training vocabulary at all.

    Arguments
    ---------
    test_ids : list of (list of int)
        Token ids of each test transcript (e.g. under the LLM tokenizer).
    train_ids : iterable of (list of int)
        Token ids of each training transcript.

    Returns
    -------
    dict
        ``token_coverage``: fraction of test token occurrences whose id is
        in the training ids; ``type_coverage``: the same over distinct test
        ids; ``tokens`` and ``types`` (test occurrences and distinct ids);
        ``unseen_types`` (the distinct test ids never seen in training,
        sorted).

    Example
    -------
    >>> out = vocabulary_coverage([[1, 2, 2], [3]], [[1, 2], [4]])
    >>> out["token_coverage"], out["type_coverage"], out["unseen_types"]
    (0.75, 0.666..., [3])
    """
    known = {int(i) for ids in train_ids for i in ids}
    flat = [int(i) for ids in test_ids for i in ids]
    if not flat:
        raise ValueError("vocabulary_coverage: no test tokens given")
    types = set(flat)
    unseen = sorted(types - known)
    return {
        "token_coverage": sum(i in known for i in flat) / len(flat),
        "type_coverage": 1 - len(unseen) / len(types),
        "tokens": len(flat),
        "types": len(types),
        "unseen_types": unseen,
    }


def confusion_from_stats(stats, prefix="lid_confusion/"):
    """Row-normalised confusion matrix from joint-share statistics.

    An adapter with a language gate reports, per evaluation batch, the
    share of utterances of true language ``t`` sent to ``p`` as
    ``<prefix><t>/<p>``; averaged over a pass these are joint shares.
    Dividing each row by its sum gives P(predicted | true).

    Arguments
    ---------
    stats : dict
        Evaluation means (e.g. ``summary.json``'s ``adapter``); other keys
        are ignored.
    prefix : str
        The key prefix of the joint shares.

    Returns
    -------
    dict
        ``languages`` (the true languages, in first-seen order), ``matrix``
        (``{t: {p: P(p | t)}}``), ``support`` (``{t: share of the pass}``)
        and ``accuracy`` (the trace of the joint shares: the overall LID
        accuracy), or None when ``stats`` holds no such key.

    Example
    -------
    >>> c = confusion_from_stats({"lid_confusion/en/en": 0.375,
    ...     "lid_confusion/en/zh": 0.125, "lid_confusion/zh/en": 0.0,
    ...     "lid_confusion/zh/zh": 0.5, "loss": 1.0})
    >>> c["matrix"]["en"], round(c["accuracy"], 3)
    ({'en': 0.75, 'zh': 0.25}, 0.875)
    """
    joint = {}
    for key, value in stats.items():
        if not key.startswith(prefix):
            continue
        true, _, guess = key[len(prefix) :].partition("/")
        joint.setdefault(true, {})[guess] = float(value)
    if not joint:
        return None
    matrix, support = {}, {}
    for true, row in joint.items():
        total = sum(row.values())
        support[true] = total
        matrix[true] = {
            p: (v / total if total > 0 else 0.0) for p, v in row.items()
        }
    accuracy = sum(row.get(t, 0.0) for t, row in joint.items())
    return {
        "languages": list(joint),
        "matrix": matrix,
        "support": support,
        "accuracy": accuracy,
    }


def format_confusion(confusion):
    """A Markdown table of a :func:`confusion_from_stats` result: rows are
    the true languages, columns the predicted ones, cells % of the row.

    Example
    -------
    >>> print(format_confusion(confusion_from_stats({
    ...     "lid_confusion/en/en": 0.5, "lid_confusion/en/zh": 0.0,
    ...     "lid_confusion/zh/en": 0.125, "lid_confusion/zh/zh": 0.375})))
    | true \\ predicted | en | zh |
    |---|---|---|
    | en | 100 | 0 |
    | zh | 25 | 75 |
    """
    langs = confusion["languages"]
    lines = [
        "| true \\ predicted | " + " | ".join(langs) + " |",
        "|---" * (len(langs) + 1) + "|",
    ]
    for true in langs:
        row = confusion["matrix"][true]
        cells = " | ".join(f"{100 * row.get(p, 0.0):.0f}" for p in langs)
        lines.append(f"| {true} | {cells} |")
    return "\n".join(lines)


def spoken_qa_accuracy(hyps, answers_lists, language="en"):
    """Spoken-QA accuracy: containment and exact match of the answer.

    Both the response and each acceptable answer go through
    :func:`normalize_text`.  *Contains*: some normalised answer occurs in
    the normalised response as whole words (for zh/ja: as a substring).
    *Exact*: the normalised response equals some normalised answer.
    Answers that normalise to "" are ignored.

    Arguments
    ---------
    hyps : list of str
        System responses.
    answers_lists : list of (list of str or str)
        Acceptable answers per question (a string is one answer).
    language : str
        Language code.

    Returns
    -------
    dict
        ``accuracy`` (containment, fraction), ``exact_match`` (fraction),
        ``n`` and ``correct`` (per-item booleans for containment).

    Example
    -------
    >>> hyps = ["It is Paris.", "London"]
    >>> out = spoken_qa_accuracy(hyps, [["paris"], "rome"])
    >>> out["accuracy"], out["exact_match"]
    (0.5, 0.0)
    """
    hyps, answers_lists = _check_pair(hyps, answers_lists, "spoken_qa_accuracy")
    char_lang = is_character_language(language)
    contains, exact = [], []
    for i, (hyp, answers) in enumerate(zip(hyps, answers_lists)):
        if isinstance(answers, str):
            answers = [answers]
        normed = [normalize_text(a, language) for a in answers]
        normed = [a for a in normed if a]
        if not normed:
            raise ValueError(
                f"spoken_qa_accuracy: item {i} has no non-empty answer "
                f"(got {answers!r})"
            )
        resp = normalize_text(hyp, language)
        if char_lang:
            hit = any(a in resp for a in normed)
        else:
            hit = any(f" {a} " in f" {resp} " for a in normed)
        contains.append(hit)
        exact.append(resp in normed)
    n = len(hyps)
    return {
        "accuracy": sum(contains) / n,
        "exact_match": sum(exact) / n,
        "n": n,
        "correct": contains,
    }


def _json_default(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return value.tolist()
    if isinstance(value, pathlib.PurePath):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


class EvalSummary:
    """Per-utterance evaluation rows, written as JSONL plus a summary JSON.

    Every row is a dict with at least ``id``; the usual keys are ``task``,
    ``language``, ``hyp``, ``ref`` (transcript or translation), ``teacher``
    (text-input response of the teacher) and ``answers`` (spoken QA).
    Rows are always kept in a deterministic order (sorted by ``id``), so the
    files of a run split over several ranks equal those of one process.

    Arguments
    ---------
    rows : list of dict, optional
        Initial rows.

    Example
    -------
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> s = EvalSummary()
    >>> s.add(id="b", task="asr", hyp="a cat", ref="a cat")
    >>> s.add({"id": "a", "task": "asr", "hyp": "dog", "ref": "a dog"})
    >>> [r["id"] for r in s.rows]
    ['a', 'b']
    >>> summary = s.summarize()
    >>> summary["asr"]["wer"]
    25.0
    >>> s.write(d / "utts.jsonl", d / "summary.json")
    >>> len(EvalSummary.load_rows(d / "utts.jsonl"))
    2
    """

    def __init__(self, rows=None):
        self._rows = {}
        for row in rows or []:
            self.add(row)

    def add(self, row=None, **fields):
        """Add one row (a dict and/or keyword fields); ``id`` is required.

        A row whose ``id`` is already present must be identical (ranks may
        score a padded duplicate); a differing one raises ValueError.
        """
        row = dict(row or {}, **fields)
        if "id" not in row:
            raise ValueError(f"EvalSummary.add: row without 'id': {row!r}")
        key = str(row["id"])
        row["id"] = key
        old = self._rows.get(key)
        if old is not None and _canonical(old) != _canonical(row):
            raise ValueError(
                f"EvalSummary: conflicting rows for id {key!r}: "
                f"{old!r} vs {row!r}"
            )
        self._rows[key] = row

    def extend(self, rows):
        """Add several rows."""
        for row in rows:
            self.add(row)

    @property
    def rows(self):
        """The rows sorted by ``id`` (a new list)."""
        return [self._rows[k] for k in sorted(self._rows)]

    def __len__(self):
        return len(self._rows)

    @classmethod
    def merge(cls, shards):
        """Merge row lists from several ranks into one sorted summary.

        Exact duplicates (a distributed sampler pads by repeating items)
        are kept once; conflicting rows for one ``id`` raise ValueError.

        Arguments
        ---------
        shards : list of (list of dict or EvalSummary)
            Rows of each rank (e.g. from ``all_gather_object``).

        Returns
        -------
        EvalSummary

        Example
        -------
        >>> m = EvalSummary.merge([[{"id": "2"}, {"id": "0"}], [{"id": "1"}]])
        >>> [r["id"] for r in m.rows]
        ['0', '1', '2']
        """
        merged = cls()
        for shard in shards:
            merged.extend(shard.rows if isinstance(shard, cls) else shard)
        return merged

    @staticmethod
    def load_rows(path):
        """Read rows back from a JSONL file written by :meth:`write_rows`."""
        rows = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(
                        f"{path}:{lineno}: invalid JSON line ({err})"
                    ) from err
        return rows

    def write_rows(self, path):
        """Write the rows as JSONL (one a line, sorted by id), atomically."""
        lines = [
            json.dumps(r, ensure_ascii=False, default=_json_default)
            for r in self.rows
        ]
        atomic_write_text(path, "".join(line + "\n" for line in lines))

    def summarize(self, seed=0):
        """Corpus metrics per task (and language when rows mix languages).

        Per group (key ``task`` or ``task/language``): ``n``; with ``hyp``
        and ``ref``: ``wer`` (+ ins/del/sub/num_words), ``chrf`` and
        ``bleu``; with ``hyp`` and ``teacher``: the
        :func:`parity_agreement` numbers prefixed ``parity_``; with ``hyp``
        and ``answers``: ``qa_accuracy`` and ``qa_exact_match``.  Each
        metric uses the rows of the group that have its fields.

        Arguments
        ---------
        seed : int
            Seed of the parity shuffled baseline.

        Returns
        -------
        dict
        """
        groups = {}
        for row in self.rows:
            task = str(row.get("task", "default"))
            lang = str(row.get("language") or "en")
            groups.setdefault(task, {}).setdefault(lang, []).append(row)
        summary = {}
        for task, by_lang in groups.items():
            for lang, rows in by_lang.items():
                key = task if len(by_lang) == 1 else f"{task}/{lang}"
                summary[key] = _summarize_group(rows, lang, seed)
        return summary

    def write_summary(self, path, extra=None, seed=0):
        """Write :meth:`summarize` (updated with ``extra``) as JSON, atomically.

        Returns
        -------
        dict
            What was written.
        """
        summary = self.summarize(seed=seed)
        summary.update(extra or {})
        text = json.dumps(
            summary, indent=2, ensure_ascii=False, default=_json_default
        )
        atomic_write_text(path, text + "\n")
        return summary

    def write(self, rows_path, summary_path, extra=None, seed=0):
        """Write both the per-utterance JSONL and the summary JSON."""
        self.write_rows(rows_path)
        self.write_summary(summary_path, extra=extra, seed=seed)


def _canonical(row):
    return json.dumps(row, sort_keys=True, default=_json_default)


def _summarize_group(rows, lang, seed):
    out = {"n": len(rows)}
    with_ref = [r for r in rows if r.get("ref") is not None and "hyp" in r]
    if with_ref:
        hyps = [r["hyp"] or "" for r in with_ref]
        refs = [r["ref"] for r in with_ref]
        scores = wer(hyps, refs, lang, ids=[r["id"] for r in with_ref])
        scores.pop("details")
        scores.pop("num_utts")
        out.update(scores)
        out["chrf"] = chrf(hyps, refs)
        out["bleu"] = bleu(hyps, refs, lang)
    with_teacher = [
        r for r in rows if r.get("teacher") is not None and "hyp" in r
    ]
    if with_teacher:
        parity = parity_agreement(
            [r["hyp"] or "" for r in with_teacher],
            [r["teacher"] for r in with_teacher],
            seed=seed,
            language=lang,
        )
        out.update({f"parity_{k}": v for k, v in parity.items()})
    with_answers = [r for r in rows if r.get("answers") and "hyp" in r]
    if with_answers:
        qa = spoken_qa_accuracy(
            [r["hyp"] or "" for r in with_answers],
            [r["answers"] for r in with_answers],
            language=lang,
        )
        out["qa_accuracy"] = qa["accuracy"]
        out["qa_exact_match"] = qa["exact_match"]
        out["qa_n"] = qa["n"]
    return out
