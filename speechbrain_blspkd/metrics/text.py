"""Text normalisation and scoring tokens, shared by every metric of text.

One text normalisation (:func:`normalize_text`) is applied to every system
before word error rates and spoken-QA matching, so that numbers from
different systems compare fairly.

Languages written without spaces between words (``language`` starting
with ``zh``, ``ja``, ``cmn``, ``yue``, ``th``, ``lo``, ``km`` or ``my``) are
scored per character: every character of those scripts (CJK, kana, Thai,
Lao, Khmer, Myanmar) is one token, and runs of other characters (Latin
words, digits) stay whole words.  The WER of such a language is therefore a
character error rate (CER).  ``language=None`` (the default of
:func:`~speechbrain_blspkd.metrics.agreement.wer`,
:func:`~speechbrain_blspkd.metrics.agreement.bleu` and
:func:`~speechbrain_blspkd.metrics.agreement.parity_agreement`) scores by
script instead: the same per-character rule applied to every text,
whatever its language, so a corpus that mixes languages is scored
correctly without knowing them.
"""

import re
import unicodedata

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
