"""SynthSpeech: the embedded default corpus, synthesised on this machine.

Sentences come from texts that Debian packages install (the ``fortunes``
collections in English, German, Spanish, Italian and Brazilian Portuguese,
and the human translations in the gettext ``.mo`` catalogues under
``/usr/share/locale`` for French, Mandarin Chinese, Hindi and Arabic, and as
a supplement for the others): the *core* pool of each language.  English
also has an *extra* pool (:mod:`~speechbrain_blspkd.dataprep.english_text`):
the other English fortune files and ``tfortunes``, the King James Bible
(``bible-kjv``, verse numbers stripped, split into sentences), the example
sentences of the WordNet glosses (``wordnet-base``) and the English
Dhammapada (``display-dhammapada``): about 9,200 core and 53,600 extra
clean English sentences (``python -m
speechbrain_blspkd.dataprep.english_text --count``).  Valid and test
sentences are drawn from the core pool only; training takes the rest of
it, then the extra pool (:func:`make_plan`, :func:`language_pools`).
They are cleaned (3-25 words, or 5-40 characters for Chinese; letters of
the language's script and basic punctuation only, no URLs, code or digits),
deduplicated (case and punctuation ignored: :func:`sentence_key`), and
spoken by ``espeak-ng`` with many voices, voice variants
(``+f1`` .. ``+m7`` and named variants), speeds and pitches, then converted
by ``sox`` to 16 kHz mono 16-bit wav.

Languages (:data:`LANGUAGES`): ``en de es fr it pt`` in Latin script, and
``zh`` (Mandarin, espeak-ng's ``cmn`` voice, Han characters), ``hi``
(Devanagari) and ``ar`` (Arabic script), whose sentences are checked
against their script (:data:`SCRIPTS`) by :func:`clean_sentence`.

Splits: ``train``, ``valid`` and ``test``.  The sentences of the three splits
are disjoint, and so are their voice variants: valid and test are spoken
only by variants held out from training, so they measure unseen voices.
The test split (sentences, voices, speeds, pitches) does not depend on
``num_train`` or ``num_valid``, and a larger ``num_train`` keeps the
training sentences of a smaller one.

The build is resumable and idempotent:

1. the plan (every utterance's sentence, voice, speed and pitch) is a pure
   function of the options and the seed; it is written first to
   ``synthspeech_plan.json``;
2. each wav is written atomically (temporary file + rename); a rerun skips
   the wav files that are already complete and removes stray temporaries;
3. the manifests (``train.csv``, ``valid.csv``, ``test.csv``, with
   ``$data_root`` standing for ``save_folder``) are written last; a call
   whose plan options match and whose manifests exist does nothing.

Debian packages needed: ``espeak-ng sox fortunes fortunes-min fortunes-de
fortunes-es fortunes-it fortunes-br``, and for English ``bible-kjv
bible-kjv-text wordnet-base fortune-anarchism tfortunes display-dhammapada``
(see :data:`APT_PACKAGES`).

Command line::

    python -m speechbrain_blspkd.dataprep.synthspeech SAVE_FOLDER \\
        [--num-train 8000] [--num-valid 300] [--num-test 300] \\
        [--languages en,de,es,fr,it,pt] [--seed 1234] [--num-workers 2] \\
        [--en-fraction 0.8|equal]
"""

import argparse
import concurrent.futures
import contextlib
import functools
import hashlib
import json
import logging
import os
import pathlib
import random
import re
import struct
import subprocess
import sys
import unicodedata

from speechbrain_blspkd.dataio.manifest import read_manifest, write_manifest
from speechbrain_blspkd.dataprep import tts
from speechbrain_blspkd.utils.atomic import atomic_write_text, remove_stray_tmp
from speechbrain_blspkd.utils.cli import report_error, setup_logging

logger = logging.getLogger(__name__)

#: Debian packages the default corpus needs.
APT_PACKAGES = (
    "espeak-ng",
    "sox",
    "fortunes",
    "fortunes-min",
    "fortunes-de",
    "fortunes-es",
    "fortunes-it",
    "fortunes-br",
    # English sources beyond the fortunes (dataprep.english_text)
    "bible-kjv",
    "bible-kjv-text",
    "wordnet-base",
    "fortune-anarchism",
    "tfortunes",
    "display-dhammapada",
)

#: 2: English training sentences beyond the core fortunes
#: (:func:`language_pools`), pools de-duplicated by :func:`sentence_key`.
PLAN_VERSION = 2
PLAN_FILE = "synthspeech_plan.json"
SPLITS = ("train", "valid", "test")
FORTUNE_DIR = pathlib.Path("/usr/share/games/fortunes")
LOCALE_DIR = pathlib.Path("/usr/share/locale")

# English fortune files (packages fortunes, fortunes-min); the technical
# ones (computers, linux, perl, debian ...) and ascii art are left out.
_EN_FORTUNES = (
    "fortunes",
    "literature",
    "riddles",
    "cookie",
    "definitions",
    "education",
    "food",
    "humorists",
    "kids",
    "law",
    "love",
    "magic",
    "medicine",
    "miscellaneous",
    "news",
    "people",
    "pets",
    "platitudes",
    "politics",
    "pratchett",
    "science",
    "songs-poems",
    "sports",
    "wisdom",
    "work",
    "paradoxum",
    "goedel",
    "startrek",
    "tao",
)

#: language -> (espeak-ng voices, fortune sources, Debian package of them).
#: A fortune source is a file or a folder of fortune files below
#: :data:`FORTUNE_DIR`.
LANGUAGES = {
    "en": (
        (
            "en-us",
            "en-gb",
            "en-gb-x-rp",
            "en-gb-scotland",
            "en-029",
            "en-gb-x-gbclan",
            "en-gb-x-gbcwmd",
            "en-us-nyc",
        ),
        _EN_FORTUNES,
        "fortunes fortunes-min",
    ),
    "de": (("de",), ("de",), "fortunes-de"),
    "es": (("es", "es-419"), ("es",), "fortunes-es"),
    "fr": (("fr-fr", "fr-be", "fr-ch"), (), None),
    "it": (("it",), ("it",), "fortunes-it"),
    "pt": (("pt-br", "pt"), ("brasil",), "fortunes-br"),
    # gettext translations only (the locale packages of the base system)
    "zh": (("cmn",), (), None),
    "hi": (("hi",), (), None),
    "ar": (("ar",), (), None),
}

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

#: Voice variants (``espeak-ng -v VOICE+VARIANT``) by split.  Valid and
#: test variants are never used in training.
# fmt: off
VARIANTS = {
    "train": (
        "f1", "f2", "f3", "m1", "m2", "m3", "m4", "m5", "Alex", "Andy",
        "Annie", "adam", "belinda", "benjamin", "david", "ed", "edward",
        "john", "max", "paul", "rob", "robert", "zac", "Michael", "Mike",
        "Lee", "iven", "anika", "aunty", "caleb", "Denis", "Gene", "Hugo",
        "Jacky", "Marco", "Mario", "michel", "miguel", "pablo", "pedro",
        "antonio", "marcelo", "norbert", "sandro", "shelby", "travis",
        "victor", "gustave", "boris", "Alicia", "Andrea", "Diogo",
        "Henrique", "steph2", "iven2", "edward2", "Gene2", "klatt",
    ),
    "valid": ("f4", "m6", "linda", "steph", "iven3"),
    "test": ("f5", "m7", "quincy", "steph3", "grandma", "iven4"),
}
# fmt: on

SPEED_RANGE = (130, 190)
PITCH_RANGE = (30, 70)

_MIN_WORDS, _MAX_WORDS = 3, 25
# Characters a clean sentence may hold besides letters and spaces.
_ALLOWED_PUNCT = set(".,;:!?'-\u2019\u00bf\u00a1\u00ab\u00bb\"")
_SENT_SPLIT = re.compile(
    r"(?<=[.!?])\s+(?=[\"'\u00bf\u00a1\u00abA-Z\u00c0-\u00de])"
)


def _apt_hint(packages):
    return "apt-get install -y --no-install-recommends " + " ".join(packages)


def _read_text(path):
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


def _fortune_entries(path):
    """Yield the entries (``%``-separated) of one fortune file."""
    entry = []
    for line in _read_text(path).splitlines():
        if line.strip() == "%":
            if entry:
                yield entry
            entry = []
        else:
            entry.append(line)
    if entry:
        yield entry


def _entry_sentences(lines):
    """Split one fortune entry into candidate sentences."""
    kept = []
    for line in lines:
        s = line.strip()
        # attributions, dialogue markers, indented verse/tables, headers
        if s.startswith(("--", "\u2014", "-- ", "~", "*")):
            break
        if "\x08" in line or "\t" in line:  # overstrike, tables
            return []
        kept.append(s)
    return _SENT_SPLIT.split(" ".join(kept))


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
    seen_files, out, seen = set(), [], set()
    for f in files:
        real = f.resolve()
        if real.suffix in (".dat", ".u8") or real in seen_files:
            continue
        seen_files.add(real)
        for entry in _fortune_entries(real):
            for cand in _entry_sentences(entry):
                _add_sentence(cand, out, seen)
    return out


def sentence_key(text):
    """Case- and punctuation-insensitive key of a sentence: sentences with
    the same key count as one (de-duplication, split disjointness).

    Example
    -------
    >>> sentence_key("Hello, World!") == sentence_key("hello world.")
    True
    """
    return re.sub(r"[^\w]+", " ", text.lower()).strip()


def _add_sentence(cand, out, seen, language=None):
    s = clean_sentence(cand, language)
    if s is None:
        return
    key = sentence_key(s)
    if key not in seen:
        seen.add(key)
        out.append(s)


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
    out, seen = [], set()
    if not folder.is_dir():
        return out
    for mo in sorted(folder.glob("*.mo")):
        try:
            catalog = read_mo(mo)
        except (OSError, struct.error):
            continue
        for msgid, msgstr in sorted(catalog.items()):
            if msgstr and msgstr != msgid:
                _add_sentence(msgstr, out, seen, language)
    return out


@functools.cache
def _language_sentences(language):
    if language not in LANGUAGES:
        raise ValueError(
            f"language {language!r} is not supported; choose from "
            f"{sorted(LANGUAGES)}"
        )
    _, sources, _ = LANGUAGES[language]
    core = fortune_sentences(sources)
    seen = {sentence_key(s) for s in core}
    extra = []
    if language != "en":
        for s in gettext_sentences(language):
            _add_sentence(s, core, seen, language)
    else:
        from speechbrain_blspkd.dataprep import english_text

        extra = [
            s
            for s in english_text.extra_sentences()
            if sentence_key(s) not in seen
        ]
    return tuple(core), tuple(extra)


def language_pools(language):
    """The core and the extra sentences of ``language`` on this machine.

    Valid and test sentences come from the core pool only (the fortunes,
    and gettext translations for languages other than English); the extra
    pool (English only: the other sources of
    :mod:`~speechbrain_blspkd.dataprep.english_text`: more fortunes, the
    King James Bible, WordNet examples, the Dhammapada) only ever adds
    training sentences, and holds no sentence whose :func:`sentence_key`
    is a core one's.  Both are cached for the life of the process.

    Arguments
    ---------
    language : str
        A key of :data:`LANGUAGES`.

    Returns
    -------
    tuple of (list of str, list of str)

    Example
    -------
    >>> core, extra = language_pools("en")
    >>> {sentence_key(s) for s in core} & {sentence_key(s) for s in extra}
    set()
    """
    core, extra = _language_sentences(language)
    return list(core), list(extra)


def language_sentences(language):
    """All clean sentences available on this machine for ``language``.

    The core pool first (fortune texts, then, except for English, gettext
    translations), then the extra pool (:func:`language_pools`), without
    two sentences of the same :func:`sentence_key`; cached for the life of
    the process.

    Arguments
    ---------
    language : str
        A key of :data:`LANGUAGES`.

    Returns
    -------
    list of str

    Example
    -------
    >>> all(clean_sentence(s) == s for s in language_sentences("en"))
    True
    """
    core, extra = _language_sentences(language)
    return list(core + extra)


def check_requirements(languages):
    """Raise ``RuntimeError`` naming the apt command if a tool/text is missing.

    Arguments
    ---------
    languages : list of str
        Languages to synthesise.

    Example
    -------
    >>> check_requirements([])  # tools only
    """
    missing = tts.missing_tools()
    for lang in languages:
        if lang not in LANGUAGES:
            raise ValueError(
                f"language {lang!r} is not supported; choose from "
                f"{sorted(LANGUAGES)}"
            )
        _, sources, pkg = LANGUAGES[lang]
        if sources and not any((FORTUNE_DIR / s).exists() for s in sources):
            missing.extend(pkg.split())
        if lang == "en":  # the training sentences beyond the fortunes
            from speechbrain_blspkd.dataprep import english_text

            missing.extend(english_text.missing_sources())
    if missing:
        raise RuntimeError(
            "SynthSpeech needs Debian packages that are not installed: "
            f"{' '.join(missing)}.  Install them with:\n  "
            + _apt_hint(APT_PACKAGES)
        )


def _espeak_variants():
    """The variant names this espeak-ng installation knows."""
    out = subprocess.run(
        ["espeak-ng", "--voices=variant"], capture_output=True, text=True
    ).stdout
    names = set()
    for line in out.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 5 and parts[4].startswith("!v/"):
            names.add(parts[4][3:])
    return names


def _split_counts(total, languages, en_fraction):
    """Utterances per language: ``en_fraction`` English, the rest shared
    (``en_fraction`` None: every language an equal share).

    Example
    -------
    >>> _split_counts(10, ["en", "de", "zh"], 0.8)
    {'en': 8, 'de': 1, 'zh': 1}
    >>> _split_counts(10, ["en", "de", "zh"], None)
    {'en': 4, 'de': 3, 'zh': 3}
    """
    if en_fraction is None:
        n, extra = divmod(total, len(languages))
        return {
            lang: n + (1 if i < extra else 0)
            for i, lang in enumerate(languages)
        }
    if "en" in languages and len(languages) > 1:
        n_en = round(total * en_fraction)
    elif "en" in languages:
        n_en = total
    else:
        n_en = 0
    others = [lang for lang in languages if lang != "en"]
    counts = {"en": n_en} if "en" in languages else {}
    rest = total - n_en
    for i, lang in enumerate(others):
        counts[lang] = rest // len(others) + (
            1 if i < rest % len(others) else 0
        )
    return counts


def make_plan(
    num_train,
    num_valid,
    num_test,
    languages,
    seed,
    en_fraction=0.8,
    sentences=None,
    extra=None,
):
    """Deterministic assignment of sentences and voices to utterances.

    Per language, the core pool (de-duplicated by :func:`sentence_key`) is
    shuffled with a seed of its own; the test sentences are its first
    ones, the valid sentences the next, and the training sentences the
    rest of it followed by the extra pool (shuffled with another seed,
    sentences whose key is a core one's left out).  So the three splits
    never share a sentence, the test and valid sentences depend only on
    the seed, the pool and their own sizes (not on ``num_train``), and a
    larger ``num_train`` keeps the training sentences of a smaller one.

    Arguments
    ---------
    num_train, num_valid, num_test : int
        Utterances per split.
    languages : list of str
        Languages (keys of :data:`LANGUAGES`).
    seed : int
        Random seed; the plan is a pure function of the arguments and of
        the sentences available.
    en_fraction : float or None
        Share of English utterances when English is among several
        languages; None: every language gets an equal share.
    sentences : dict, optional
        ``{language: [sentence, ...]}``, the core pools; default: those of
        :func:`language_pools`.
    extra : dict, optional
        ``{language: [sentence, ...]}``, training-only sentences; default:
        those of :func:`language_pools` when ``sentences`` is None, else
        none.

    Returns
    -------
    dict
        ``{"options": ..., "utterances": [{"ID", "split", "language",
        "voice", "variant", "speed", "pitch", "text"}, ...]}``.

    Example
    -------
    >>> sents = {"en": [f"This is sentence number {w}." for w in
    ...     "one two three four five six seven eight".split()]}
    >>> plan = make_plan(4, 2, 2, ["en"], 0, sentences=sents)
    >>> [u["split"] for u in plan["utterances"]].count("test")
    2
    >>> more = {"en": ["An extra sentence for training."]}
    >>> plan = make_plan(7, 2, 2, ["en"], 0, sentences=sents, extra=more)
    >>> sorted({u["text"] for u in plan["utterances"]
    ...     if u["split"] == "train"})[0]
    'An extra sentence for training.'
    """
    languages = list(languages)
    sizes = dict(train=num_train, valid=num_valid, test=num_test)
    chunks = {}
    for lang in languages:
        if sentences is None:
            pool, more = language_pools(lang)
        else:
            pool = list(sentences[lang])
            more = list((extra or {}).get(lang, ()))
        pool = _unique(pool)
        random.Random(f"{seed}-{lang}").shuffle(pool)
        more = _unique(more, exclude={sentence_key(s) for s in pool})
        random.Random(f"{seed}-{lang}-extra").shuffle(more)
        pos = 0
        # test first, then valid, then train: disjoint slices of the pool;
        # a split reuses sentences of its own slice only if the pool is short
        need = {
            s: _split_counts(sizes[s], languages, en_fraction)[lang]
            for s in SPLITS
        }
        for split in ("test", "valid", "train"):
            n = need[split]
            if n == 0:
                continue
            avail = len(pool) - pos
            if split != "train":
                take = min(n, max(1, avail // 4))
                chunk = pool[pos : pos + take]
            else:
                chunk = (pool[pos:] + more)[:n]
                take = len(chunk)
            if take <= 0:
                raise ValueError(
                    f"SynthSpeech: only {len(pool)} {lang} sentences "
                    f"available, too few for the requested split sizes"
                )
            pos += take
            chunks[split, lang] = (chunk, n)
    # voices etc. are drawn split by split (test first), so that no split
    # depends on the size of a later one
    rng = random.Random(seed)
    utts = []
    for split in ("test", "valid", "train"):
        for lang in languages:
            if (split, lang) not in chunks:
                continue
            chunk, n = chunks[split, lang]
            voices = LANGUAGES[lang][0]
            for k in range(n):
                utts.append(
                    dict(
                        split=split,
                        language=lang,
                        voice=voices[k % len(voices)],
                        variant=rng.choice(VARIANTS[split]),
                        speed=rng.randint(*SPEED_RANGE),
                        pitch=rng.randint(*PITCH_RANGE),
                        text=chunk[k % len(chunk)],
                    )
                )
    counters = {}
    for u in utts:
        key = (u["split"], u["language"])
        counters[key] = counters.get(key, 0) + 1
        u["ID"] = f"synth_{u['split']}_{u['language']}_{counters[key]:06d}"
    utts.sort(key=lambda u: (SPLITS.index(u["split"]), u["ID"]))
    options = dict(
        version=PLAN_VERSION,
        num_train=num_train,
        num_valid=num_valid,
        num_test=num_test,
        languages=languages,
        seed=seed,
        en_fraction=en_fraction,
    )
    return dict(options=options, utterances=utts)


def _unique(sentences, exclude=()):
    """``sentences`` without repeated :func:`sentence_key` s (first kept)
    and without those whose key is in ``exclude``."""
    out, seen = [], set(exclude)
    for s in sentences:
        key = sentence_key(s)
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


def wav_relpath(utt):
    """Relative path of an utterance's wav inside the save folder.

    The name ends with a hash of what is spoken and how, so a wav left by
    an earlier plan is reused only when it is exactly the same utterance.

    Example
    -------
    >>> u = dict(ID="synth_train_en_000001", split="train", language="en",
    ...     text="Hello there you.", voice="en-us", variant="f1", speed=150,
    ...     pitch=50)
    >>> wav_relpath(u)[:36]
    'wavs/train/en/synth_train_en_000001_'
    """
    key = "|".join(
        str(utt[k]) for k in ("text", "voice", "variant", "speed", "pitch")
    )
    digest = hashlib.sha1(key.encode()).hexdigest()[:8]
    return f"wavs/{utt['split']}/{utt['language']}/{utt['ID']}_{digest}.wav"


def _remove_unplanned_wavs(save_folder, plan):
    planned = {wav_relpath(u) for u in plan["utterances"]}
    removed = 0
    for p in (save_folder / "wavs").rglob("*.wav"):
        if p.relative_to(save_folder).as_posix() not in planned:
            p.unlink()
            removed += 1
    if removed:
        logger.info("removed %d wavs of an earlier plan", removed)


def synthesise(utt, path):
    """Speak the plan entry ``utt`` into a 16 kHz mono wav, atomically.

    A thin adapter from a plan entry to :func:`.tts.synthesise` (the
    project's one espeak-ng + sox wrapper).

    Arguments
    ---------
    utt : dict
        A plan entry (``text``, ``voice``, ``variant``, ``speed``,
        ``pitch``; ``ID`` names it in errors).
    path : str or pathlib.Path
        Destination wav file.

    Raises
    ------
    speechbrain_blspkd.dataprep.tts.TTSError
        (a ``RuntimeError``) naming the utterance and the failing program.

    Example
    -------
    >>> import tempfile, soundfile
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.wav"
    >>> synthesise(dict(text="Hello there.", voice="en-us", variant="f1",
    ...     speed=160, pitch=50), p)
    >>> soundfile.info(str(p)).samplerate
    16000
    """
    try:
        tts.synthesise(
            utt["text"],
            path,
            voice=utt["voice"],
            variant=utt["variant"],
            speed=utt["speed"],
            pitch=utt["pitch"],
        )
    except tts.TTSError as e:
        raise tts.TTSError(
            f"synthesis of {utt.get('ID', path)} failed: {e}"
        ) from None


def _remove_stray_tmp(folder, recursive=True):
    removed = remove_stray_tmp(folder, recursive=recursive)
    if removed:
        logger.info("removed %d unfinished temporary files", removed)


def load_saved_plan(plan_path, options):
    """The plan saved at ``plan_path`` when it was made with ``options``.

    Arguments
    ---------
    plan_path : str or pathlib.Path
        A plan file (JSON with an ``options`` entry).
    options : dict
        The options of the build now.

    Returns
    -------
    dict or None
        None when the file is missing, unreadable or was made with other
        options (the build then makes a new plan).

    Example
    -------
    >>> import tempfile
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "plan.json"
    >>> _ = p.write_text(json.dumps({"options": {"n": 2}, "utts": []}))
    >>> load_saved_plan(p, {"n": 2})["utts"], load_saved_plan(p, {"n": 3})
    ([], None)
    """
    plan_path = pathlib.Path(plan_path)
    if not plan_path.is_file():
        return None
    try:
        saved = json.loads(plan_path.read_text(encoding="utf-8"))
    except ValueError:
        return None
    if isinstance(saved, dict) and saved.get("options") == options:
        return saved
    return None


def _manifests_done(save_folder, plan):
    for split in SPLITS:
        path = pathlib.Path(save_folder) / f"{split}.csv"
        if not path.is_file():
            return False
    ids = {u["ID"] for u in plan["utterances"]}
    try:
        got = set()
        for split in SPLITS:
            got |= {
                r["ID"]
                for r in read_manifest(
                    pathlib.Path(save_folder) / f"{split}.csv"
                )
            }
    except ValueError:
        return False
    return got == ids


def prepare_synthspeech(
    save_folder,
    num_train=8000,
    num_valid=300,
    num_test=300,
    languages=("en", "de", "es", "fr", "it", "pt"),
    seed=1234,
    num_workers=2,
    en_fraction=0.8,
    skip_prep=False,
):
    """Build (or resume, or skip) the SynthSpeech corpus in ``save_folder``.

    Arguments
    ---------
    save_folder : str or pathlib.Path
        Output folder: ``train.csv``, ``valid.csv``, ``test.csv``,
        ``synthspeech_plan.json`` and ``wavs/``.  It is the ``$data_root``
        of the manifests.
    num_train, num_valid, num_test : int
        Utterances per split.
    languages : sequence of str
        Languages to include (keys of :data:`LANGUAGES`).
    seed : int
        Seed of the plan.
    num_workers : int
        Concurrent synthesis processes.
    en_fraction : float or None
        Share of English utterances (when other languages are included);
        None: every language gets an equal share (the multilingual
        recipes).
    skip_prep : bool
        Do nothing.

    Returns
    -------
    dict
        ``{split: manifest path}`` (empty when ``skip_prep``).

    Example
    -------
    >>> import tempfile
    >>> out = prepare_synthspeech(tempfile.mkdtemp(), 2, 1, 1, ["en"])
    >>> sorted(out)
    ['test', 'train', 'valid']
    """
    if skip_prep:
        return {}
    save_folder = pathlib.Path(save_folder)
    languages = list(languages)
    check_requirements(languages)
    manifests = {s: save_folder / f"{s}.csv" for s in SPLITS}
    plan_path = save_folder / PLAN_FILE
    options = dict(
        version=PLAN_VERSION,
        num_train=num_train,
        num_valid=num_valid,
        num_test=num_test,
        languages=languages,
        seed=seed,
        en_fraction=en_fraction,
    )
    # a build killed while writing the plan or a manifest left a temp file
    # beside them (never trusted, but it would stay forever)
    if save_folder.is_dir():
        _remove_stray_tmp(save_folder, recursive=False)
    plan = load_saved_plan(plan_path, options)
    if plan is not None and _manifests_done(save_folder, plan):
        logger.info("SynthSpeech in %s is complete, skipping", save_folder)
        return manifests
    if plan is None and plan_path.is_file():
        logger.info("SynthSpeech options changed: new plan for %s", save_folder)
    if plan is None:
        for path in manifests.values():  # stale manifests of another plan
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        plan = make_plan(
            num_train, num_valid, num_test, languages, seed, en_fraction
        )
        atomic_write_text(
            plan_path, json.dumps(plan, ensure_ascii=False, indent=1)
        )
        _remove_unplanned_wavs(save_folder, plan)
    known = _espeak_variants()
    unknown = {u["variant"] for u in plan["utterances"]} - known
    if unknown:
        raise RuntimeError(
            f"espeak-ng lacks the voice variant(s) {sorted(unknown)}; "
            f"reinstall with: {_apt_hint(['espeak-ng', 'espeak-ng-data'])}"
        )
    _remove_stray_tmp(save_folder / "wavs")
    todo = [
        u
        for u in plan["utterances"]
        if not tts.is_complete_wav(save_folder / wav_relpath(u))
    ]
    logger.info(
        "SynthSpeech: %d of %d wavs to synthesise in %s",
        len(todo),
        len(plan["utterances"]),
        save_folder,
    )
    if todo:
        _run_synthesis(todo, save_folder, num_workers)
    _write_manifests(plan, save_folder, manifests)
    return manifests


def _run_synthesis(todo, save_folder, num_workers):
    from tqdm import tqdm

    with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
        futures = [
            pool.submit(synthesise, u, save_folder / wav_relpath(u))
            for u in todo
        ]
        try:
            for fut in tqdm(
                concurrent.futures.as_completed(futures),
                total=len(futures),
                desc="SynthSpeech",
                unit="utt",
            ):
                fut.result()
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def _write_manifests(plan, save_folder, manifests):
    import soundfile as sf

    rows = {s: [] for s in SPLITS}
    for u in plan["utterances"]:
        rel = wav_relpath(u)
        info = sf.info(str(save_folder / rel))
        rows[u["split"]].append(
            dict(
                ID=u["ID"],
                wav=f"$data_root/{rel}",
                duration=round(info.frames / info.samplerate, 4),
                transcript=u["text"],
                language=u["language"],
                speaker=f"{u['voice']}+{u['variant']}",
            )
        )
    for split in SPLITS:
        write_manifest(manifests[split], rows[split])


def _fraction_or_equal(text):
    return None if text == "equal" else float(text)


def main(argv=None):
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description="Build the SynthSpeech corpus (espeak-ng + Debian texts)."
    )
    parser.add_argument("save_folder")
    parser.add_argument("--num-train", type=int, default=8000)
    parser.add_argument("--num-valid", type=int, default=300)
    parser.add_argument("--num-test", type=int, default=300)
    parser.add_argument(
        "--languages",
        default="en,de,es,fr,it,pt",
        help="comma-separated language codes",
    )
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--num-workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument(
        "--en-fraction",
        type=_fraction_or_equal,
        default=0.8,
        help="share of English utterances, or 'equal' (every language the "
        "same share)",
    )
    args = parser.parse_args(argv)
    setup_logging()
    try:
        out = prepare_synthspeech(
            args.save_folder,
            num_train=args.num_train,
            num_valid=args.num_valid,
            num_test=args.num_test,
            languages=[x for x in args.languages.split(",") if x],
            seed=args.seed,
            num_workers=args.num_workers,
            en_fraction=args.en_fraction,
        )
    except (RuntimeError, ValueError) as e:
        return report_error(e)
    for split, path in out.items():
        print(f"{split}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
