"""Text agreement: WER, BLEU and chrF of answers against references, the
speech-vs-text parity and spoken-QA accuracy.

WER, BLEU and chrF are percentages (0 to 100, WER may exceed 100), the
conventions of SpeechBrain's ``ErrorRateStats`` and of sacrebleu; the
spoken-QA accuracy is a fraction in [0, 1].  Texts are normalised and
split into tokens by :mod:`speechbrain_blspkd.metrics.text`.

Speech-vs-text parity (docs/algorithms.md §2.8, §2.9.8) is measured as the agreement of the
response to the spoken instruction with the teacher's response to the same
instruction as text (:func:`parity_agreement`), beside a shuffled-pair
baseline.  The KL part of parity is computed with the losses.
"""

import random
import re

from speechbrain_blspkd.metrics.text import (
    _check_pair,
    _is_cjk,
    _languages,
    is_character_language,
    normalize_text,
    tokenize,
)


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
