"""Clean sentences from the texts Debian installs, and where they come from.

The sentence sources and cleaning rules of the SynthSpeech corpus
(:mod:`~speechbrain_blspkd.dataprep.synthspeech`), in one place:

* cleaning: :func:`clean_sentence` keeps a candidate only when it is one
  speakable sentence (3-25 words, letters and basic punctuation, no URLs,
  code or digits); a language not written in the Latin alphabet
  (:data:`SCRIPTS`: Mandarin, Hindi, Arabic) follows the rules of its
  script (:func:`clean_script_sentence`);
* de-duplication: :func:`sentence_key` (case and punctuation ignored),
  :func:`unique_sentences` and :func:`unique_clean`;
* the ``fortune`` files below :data:`FORTUNE_DIR`
  (:func:`fortune_sentences`; :func:`entry_sentences` splits one entry);
* the human translations of the gettext ``.mo`` catalogues below
  :data:`LOCALE_DIR` (:func:`read_mo`, :func:`gettext_sentences`).

The English sources beyond the fortunes are in
:mod:`~speechbrain_blspkd.dataprep.english_sources`.
"""

import pathlib
import re
import struct
import unicodedata

FORTUNE_DIR = pathlib.Path("/usr/share/games/fortunes")
LOCALE_DIR = pathlib.Path("/usr/share/locale")

#: Gettext locale folder of a language, where it is not the code itself.
LOCALES = {"zh": "zh_CN"}

#: Script of the languages not written in the Latin alphabet: the Unicode
#: blocks their letters (and combining marks) must come from, the
#: characters that may end a sentence, the punctuation allowed besides
#: :data:`_ALLOWED_PUNCT`, and whether length is counted in characters (no
#: spaces between words) or in words.
SCRIPTS = {
    "zh": dict(
        blocks=((0x3400, 0x4DBF), (0x4E00, 0x9FFF)),
        final="\u3002\uff01\uff1f",  # 。！？
        punct="\uff0c\u3001\uff1b\uff1a\u201c\u201d\u2018\u2019",
        by_characters=True,
    ),
    "hi": dict(
        blocks=((0x0900, 0x0963), (0x0970, 0x097F)),  # without digits
        final=".!?\u0964",  # danda
        punct="",
        by_characters=False,
    ),
    "ar": dict(
        blocks=((0x0620, 0x065F), (0x066E, 0x06D3)),  # without digits
        final=".!\u061f",  # Arabic question mark
        punct="\u060c\u061b",  # Arabic comma, semicolon
        by_characters=False,
    ),
}
_MIN_CHARS, _MAX_CHARS = 5, 40
_MIN_WORDS, _MAX_WORDS = 3, 25
# Characters a clean sentence may hold besides letters and spaces.
_ALLOWED_PUNCT = set(".,;:!?'-\u2019\u00bf\u00a1\u00ab\u00bb\"")
_SENT_SPLIT = re.compile(
    r"(?<=[.!?])\s+(?=[\"'\u00bf\u00a1\u00abA-Z\u00c0-\u00de])"
)


def read_text(path):
    """The text of a file: UTF-8, else Latin-1."""
    raw = pathlib.Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _normalise(text):
    text = unicodedata.normalize("NFC", " ".join(text.split()))
    text = text.replace("``", '"').replace("''", '"')
    return text.replace("\u201c", '"').replace("\u201d", '"')


def clean_sentence(text, language=None):
    """Return ``text`` as one clean speakable sentence, or ``None``.

    Whitespace is collapsed; the sentence must hold 3-25 words, start with
    a letter (or opening quote/mark), end with ``.``, ``!`` or ``?``, and
    contain only letters, spaces and basic punctuation: no digits, URLs,
    code, markup, or control characters.  A language of :data:`SCRIPTS`
    follows its script's rules instead (:func:`clean_script_sentence`).

    Arguments
    ---------
    text : str
        A candidate sentence.
    language : str, optional
        Its language code (None or a Latin-script language: the rules
        above).

    Returns
    -------
    str or None
        The cleaned sentence, or ``None`` if it is not usable.

    Example
    -------
    >>> clean_sentence("  A  stitch in time\\n saves nine. ")
    'A stitch in time saves nine.'
    >>> clean_sentence("See http://example.com now.") is None
    True
    >>> clean_sentence("Too short.") is None
    True
    >>> clean_sentence("无法打开这个文件。", "zh")
    '无法打开这个文件。'
    """
    if language in SCRIPTS:
        return clean_script_sentence(text, language)
    text = _normalise(text)
    words = text.split()
    if not (_MIN_WORDS <= len(words) <= _MAX_WORDS):
        return None
    if text[-1] not in ".!?" or ".." in text or "--" in text:
        return None
    if not (text[0].isalpha() or text[0] in "\"'\u00bf\u00a1\u00ab"):
        return None
    first = next((ch for ch in text if ch.isalpha()), "")
    if not first.isupper():
        return None
    letters = 0
    for ch in text:
        if ch.isalpha():
            letters += 1
        elif ch != " " and ch not in _ALLOWED_PUNCT:
            return None
    if letters < 0.7 * len(text):
        return None
    if text.count('"') % 2 or text.count("(") != text.count(")"):
        return None
    upper = sum(ch.isupper() for ch in text)
    if upper > 0.5 * letters:  # shouting, acronyms, headers
        return None
    if any(len(w) > 25 for w in words):
        return None
    return text


def clean_script_sentence(text, language):
    """:func:`clean_sentence` for a language of :data:`SCRIPTS`.

    Every letter and combining mark must belong to the language's script
    (no Latin words, no digits of any script); the sentence ends with one
    of the script's final marks, holds 3-25 words (5-40 letters for a
    script written without spaces), starts with a letter or an opening
    quote, and is at least 70 % letters.  Scripts with upper case also
    follow the capital-letter rules of :func:`clean_sentence`.

    Arguments
    ---------
    text : str
        A candidate sentence.
    language : str
        A key of :data:`SCRIPTS`.

    Returns
    -------
    str or None

    Example
    -------
    >>> clean_script_sentence("फ़ाइल खोली नहीं जा सकी।", "hi")
    'फ़ाइल खोली नहीं जा सकी।'
    >>> clean_script_sentence("GNOME 设置无法打开。", "zh") is None
    True
    """
    script = SCRIPTS[language]
    text = _normalise(text)
    if not text or text[-1] not in script["final"]:
        return None
    if ".." in text or "--" in text:
        return None
    allowed = _ALLOWED_PUNCT | set(script["final"]) | set(script["punct"])

    def in_script(ch):
        return any(lo <= ord(ch) <= hi for lo, hi in script["blocks"])

    letters = 0
    for ch in text:
        if in_script(ch) and unicodedata.category(ch)[0] in "LM":
            letters += 1
        elif ch != " " and ch not in allowed:
            return None
    if not (in_script(text[0]) or text[0] in "\"'\u00ab"):
        return None
    if script["by_characters"]:
        if not (_MIN_CHARS <= letters <= _MAX_CHARS):
            return None
    elif not (_MIN_WORDS <= len(text.split()) <= _MAX_WORDS):
        return None
    if letters < 0.7 * len(text):
        return None
    if text.count('"') % 2:
        return None
    return text


def sentence_key(text):
    """Case- and punctuation-insensitive key of a sentence: sentences with
    the same key count as one (de-duplication, split disjointness).

    Example
    -------
    >>> sentence_key("Hello, World!") == sentence_key("hello world.")
    True
    """
    return re.sub(r"[^\w]+", " ", text.lower()).strip()


def unique_sentences(sentences, exclude=()):
    """``sentences`` without repeated :func:`sentence_key` s (first kept)
    and without those whose key is in ``exclude``.

    Example
    -------
    >>> unique_sentences(["Go now.", "go now!", "Stay."], exclude=["stay"])
    ['Go now.']
    """
    out, seen = [], set(exclude)
    for s in sentences:
        key = sentence_key(s)
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


def unique_clean(candidates, language=None, exclude=()):
    """The candidates that :func:`clean_sentence` keeps, cleaned, first of
    each :func:`sentence_key` kept, keys in ``exclude`` left out.

    Example
    -------
    >>> unique_clean(["Too short.", "A  stitch in time saves nine.",
    ...     "a stitch in time saves nine!"])
    ['A stitch in time saves nine.']
    """
    cleaned = (clean_sentence(cand, language) for cand in candidates)
    return unique_sentences((s for s in cleaned if s is not None), exclude)


def split_sentences(text):
    """Split ``text`` after ``.``, ``!`` or ``?`` followed by a space and a
    capital (or an opening quote or mark).

    Example
    -------
    >>> split_sentences("It rained. We stayed in! Why? e.g. not here.")
    ['It rained.', 'We stayed in!', 'Why? e.g. not here.']
    """
    return _SENT_SPLIT.split(text)


def _fortune_entries(path):
    """Yield the entries (``%``-separated) of one fortune file."""
    entry = []
    for line in read_text(path).splitlines():
        if line.strip() == "%":
            if entry:
                yield entry
            entry = []
        else:
            entry.append(line)
    if entry:
        yield entry


def entry_sentences(lines):
    """Split one fortune entry (its lines) into candidate sentences: the
    text before an attribution; none for an entry drawn with tabs or
    overstrike."""
    kept = []
    for line in lines:
        s = line.strip()
        # attributions, dialogue markers, indented verse/tables, headers
        if s.startswith(("--", "\u2014", "-- ", "~", "*")):
            break
        if "\x08" in line or "\t" in line:  # overstrike, tables
            return []
        kept.append(s)
    return split_sentences(" ".join(kept))


def fortune_sentences(sources):
    """Clean sentences from fortune files or folders (in file order).

    Arguments
    ---------
    sources : list of str or pathlib.Path
        Fortune files or folders of fortune files; relative names are
        looked up in :data:`FORTUNE_DIR`.

    Returns
    -------
    list of str
        Cleaned sentences, duplicates removed, in reading order.

    Example
    -------
    >>> import tempfile
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "f").write_text("A stitch in time saves nine. Look up!\\n%\\n"
    ...     "The early bird catches the worm.\\n\\t-- Proverb\\n%\\n")
    >>> fortune_sentences([d / "f"])
    ['A stitch in time saves nine.', 'The early bird catches the worm.']
    """
    files = []
    for src in sources:
        src = FORTUNE_DIR / src
        if src.is_dir():
            files.extend(sorted(p for p in src.iterdir() if p.is_file()))
        elif src.is_file():
            files.append(src)
    seen_files, cands = set(), []
    for f in files:
        real = f.resolve()
        if real.suffix in (".dat", ".u8") or real in seen_files:
            continue
        seen_files.add(real)
        for entry in _fortune_entries(real):
            cands.extend(entry_sentences(entry))
    return unique_clean(cands)


def read_mo(path):
    """Read a gettext ``.mo`` catalogue into a ``{msgid: msgstr}`` dict.

    Plural forms keep their first form; the header entry is skipped.

    Arguments
    ---------
    path : str or pathlib.Path
        The ``.mo`` file.

    Returns
    -------
    dict

    Example
    -------
    >>> import tempfile
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.mo"
    >>> _write_mo(p, {"Hello world.": "Bonjour le monde."})
    >>> read_mo(p)
    {'Hello world.': 'Bonjour le monde.'}
    """
    data = pathlib.Path(path).read_bytes()
    if len(data) < 28:
        return {}
    magic = struct.unpack("<I", data[:4])[0]
    end = "<" if magic == 0x950412DE else ">"
    _, _, n, o_orig, o_tr = struct.unpack(end + "5I", data[:20])
    out = {}
    for i in range(n):
        ln, off = struct.unpack(
            end + "2I", data[o_orig + 8 * i : o_orig + 8 * i + 8]
        )
        lt, ot = struct.unpack(
            end + "2I", data[o_tr + 8 * i : o_tr + 8 * i + 8]
        )
        msgid = data[off : off + ln].split(b"\0")[0]
        msgstr = data[ot : ot + lt].split(b"\0")[0]
        if not msgid or b"\x04" in msgid:  # header, msgctxt
            continue
        try:
            out[msgid.decode("utf-8")] = msgstr.decode("utf-8")
        except UnicodeDecodeError:
            continue
    return out


def _write_mo(path, catalog):
    """Write a minimal little-endian ``.mo`` file (tests and doctests)."""
    items = sorted(catalog.items())
    ids = [k.encode() for k, _ in items]
    strs = [v.encode() for _, v in items]
    n = len(items)
    o_orig = 28
    o_tr = o_orig + 8 * n
    pos = o_tr + 8 * n
    head, blobs = [], b""
    for group in (ids, strs):
        for b in group:
            head.append((len(b), pos + len(blobs)))
            blobs += b + b"\0"
    out = struct.pack("<7I", 0x950412DE, 0, n, o_orig, o_tr, 0, 0)
    out += b"".join(struct.pack("<2I", ln, off) for ln, off in head) + blobs
    pathlib.Path(path).write_bytes(out)


def gettext_sentences(language, locale_dir=LOCALE_DIR):
    """Clean translated sentences from the ``.mo`` catalogues of a language.

    Strings with format placeholders, markup, accelerators or digits are
    dropped by :func:`clean_sentence` (``%``, ``{``, ``_``, ``&`` ...).

    Arguments
    ---------
    language : str
        Language code (``fr``, ``de`` ...); its locale folder is the code
        itself or the one :data:`LOCALES` names (``zh`` -> ``zh_CN``).
        Sentences are cleaned with the rules of the language's script.
    locale_dir : str or pathlib.Path
        Root of the locale tree.

    Returns
    -------
    list of str
        Cleaned, deduplicated sentences (catalogues in sorted order).

    Example
    -------
    >>> isinstance(gettext_sentences("xx-none"), list)
    True
    """
    folder = (
        pathlib.Path(locale_dir)
        / LOCALES.get(language, language)
        / "LC_MESSAGES"
    )
    if not folder.is_dir():
        return []
    cands = []
    for mo in sorted(folder.glob("*.mo")):
        try:
            catalog = read_mo(mo)
        except (OSError, struct.error):
            continue
        for msgid, msgstr in sorted(catalog.items()):
            if msgstr and msgstr != msgid:
                cands.append(msgstr)
    return unique_clean(cands, language)
