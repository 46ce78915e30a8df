"""The English sentence sources of the SynthSpeech corpus (Debian texts).

Each source is a small function returning clean, de-duplicated sentences
(:func:`~speechbrain_blspkd.dataprep.sentences.clean_sentence`) in a
fixed reading order:

* :func:`core_fortune_sentences`: the fortune files SynthSpeech has always
  used (:data:`CORE_FORTUNES`); valid and test sentences are drawn from
  these only;
* :func:`extra_fortune_sentences`: every other English fortune file
  (packages ``fortunes``, ``fortune-anarchism``) and the ``tfortunes``
  epigrams;
* :func:`bible_sentences`: the King James Bible (``bible-kjv``, whose
  ``bible`` program reads the compressed text of ``bible-kjv-text``),
  verse numbers stripped, chapters split into sentences;
* :func:`wordnet_sentences`: the quoted example sentences of the WordNet
  glosses (``wordnet-base``);
* :func:`dhammapada_sentences`: John Richards' English Dhammapada
  (``display-dhammapada``).

:data:`SOURCES` names them in the order they are merged
(:func:`english_sentences`); :func:`extra_sentences` is the training-only
pool, :func:`missing_sources` the Debian packages not installed.
``python -m speechbrain_blspkd.dataprep.english_text --count`` counts the
sentences of each source (:mod:`~speechbrain_blspkd.dataprep.english_text`).
"""

import functools
import itertools
import os
import pathlib
import re
import shutil
import subprocess

from speechbrain_blspkd.dataprep.sentences import (
    FORTUNE_DIR,
    entry_sentences,
    fortune_sentences,
    read_text,
    split_sentences,
    unique_clean,
    unique_sentences,
)

# fmt: off
__all__ = [
    "APT_PACKAGES", "BIBLE_DATA", "CORE_FORTUNES", "DHAMMAPADA",
    "EXTRA_FORTUNES", "SOURCES", "TFORTUNES", "WORDNET_DIR",
    "bible_sentences", "core_fortune_sentences", "dhammapada_sentences",
    "english_sentences", "extra_fortune_sentences", "extra_sentences",
    "merge_sources", "missing_sources", "parse_bible", "read_kjv",
    "source_sentences", "tfortune_sentences", "wordnet_sentences",
]
# fmt: on

#: Debian packages of the English sources (besides ``fortunes`` and
#: ``fortunes-min``, which the core sentences come from).
APT_PACKAGES = (
    "bible-kjv",
    "bible-kjv-text",
    "wordnet-base",
    "fortune-anarchism",
    "tfortunes",
    "display-dhammapada",
)

BIBLE_DATA = pathlib.Path("/usr/lib/bible.data")
WORDNET_DIR = pathlib.Path("/usr/share/wordnet")
TFORTUNES = pathlib.Path("/usr/share/games/tfortunes/epigrams/en.tfortunes")
DHAMMAPADA = pathlib.Path(
    "/usr/share/display-dhammapada/dhammapada-english-transl.txt"
)

#: The core English fortune files (packages fortunes, fortunes-min), the
#: valid and test pool; the technical ones (computers, linux, perl, debian
#: ...) and ascii art are left out.
CORE_FORTUNES = (
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

#: English fortune files besides the core ones: technical collections
#: included (:func:`~speechbrain_blspkd.dataprep.sentences.clean_sentence`
#: drops their code, URLs and digits).
#: (``ascii-art`` holds pictures, ``translate-me`` a translators' note.)
EXTRA_FORTUNES = (
    "anarchism",
    "art",
    "computers",
    "debian",
    "disclaimer",
    "drugs",
    "ethnic",
    "knghtbrd",
    "linux",
    "linuxcookie",
    "men-women",
    "perl",
    "zippy",
)

#: Bible verse listing line: book abbreviation, chapter:verse, text.
_VERSE = re.compile(r"^\s*(\d?[A-Za-z]+)\s*(\d+):(\d+)\s+(.*)$")
#: Words in capitals (KJV prints the divine name and inscriptions so:
#: small capitals in print); they are given an initial capital only.
_CAPS_WORD = re.compile(r"\b[A-Z][A-Z]+\b")
_QUOTED = re.compile(r'"([^"]+)"')


def _optional_text(path):
    """The text of the file ``path``; empty when it is missing (a source
    whose package is not installed then gives no sentences)."""
    path = pathlib.Path(path)
    return read_text(path) if path.is_file() else ""


def core_fortune_sentences():
    """The fortune sentences SynthSpeech has always used (valid/test pool).

    Returns
    -------
    list of str
        The clean sentences of :data:`CORE_FORTUNES`, in file order.

    Example
    -------
    >>> from speechbrain_blspkd.dataprep.sentences import clean_sentence
    >>> all(clean_sentence(s) == s for s in core_fortune_sentences())
    True
    """
    return fortune_sentences(CORE_FORTUNES)


def tfortune_sentences(path=TFORTUNES):
    """Sentences of a ``tfortunes`` file (entries end with ``---- tags``).

    Arguments
    ---------
    path : str or pathlib.Path
        A ``.tfortunes`` file; missing: no sentences.

    Returns
    -------
    list of str
        Its clean sentences, in reading order (none when it is missing).

    Example
    -------
    >>> import tempfile
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "en.tfortunes"
    >>> _ = p.write_text("The best defense against logic is ignorance.\\n"
    ...     "---- math,geek\\nMath is hard to do.  -- Barbie\\n---- math\\n")
    >>> tfortune_sentences(p)
    ['The best defense against logic is ignorance.', 'Math is hard to do.']
    """
    text = _optional_text(path)
    cands, entry = [], []
    for line in text.splitlines() + ["----"]:
        if line.startswith("----"):
            # an attribution may follow the text on its last line
            lines = [re.split(r"\s--\s", x)[0] for x in entry]
            cands.extend(entry_sentences(lines))
            entry = []
        else:
            entry.append(line)
    return unique_clean(cands)


def extra_fortune_sentences(fortune_files=EXTRA_FORTUNES, tfortunes=TFORTUNES):
    """Sentences of the other English fortune files and of ``tfortunes``.

    Arguments
    ---------
    fortune_files : sequence of str or pathlib.Path
        Fortune files (names below
        :data:`~speechbrain_blspkd.dataprep.FORTUNE_DIR`).
    tfortunes : str or pathlib.Path
        A ``tfortunes`` file (:func:`tfortune_sentences`).

    Returns
    -------
    list of str
        The clean sentences of the fortune files, then of ``tfortunes``.

    Example
    -------
    >>> import tempfile
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "f").write_text("Art is long and life is short.\\n%\\n")
    >>> extra_fortune_sentences([d / "f"], d / "none")
    ['Art is long and life is short.']
    """
    out = fortune_sentences(fortune_files)
    return unique_clean(out + tfortune_sentences(tfortunes))


def _verse_text(text):
    return _CAPS_WORD.sub(lambda m: m.group(0).capitalize(), text)


def parse_bible(lines):
    """Chapters of a verse listing, verse numbers stripped.

    Arguments
    ---------
    lines : iterable of str
        Lines ``BOOKchapter:verse text`` (what ``bible -f`` prints, e.g.
        ``Ge1:1 In the beginning ...``); other lines are ignored.

    Returns
    -------
    list of str
        One string per chapter: its verses joined by spaces, in order.

    Example
    -------
    >>> parse_bible(["Ge1:1 In the beginning.", "Ge1:2 And the LORD said,",
    ...     "Ge2:1 Thus the heavens were finished."])
    ['In the beginning. And the Lord said,', 'Thus the heavens were finished.']
    """
    chapters, current, key = [], [], None
    for line in lines:
        m = _VERSE.match(line)
        if not m:
            continue
        book, chapter, _, text = m.groups()
        if (book, chapter) != key and current:
            chapters.append(" ".join(current))
            current = []
        key = (book, chapter)
        current.append(_verse_text(text))
    if current:
        chapters.append(" ".join(current))
    return chapters


def read_kjv(data=BIBLE_DATA):
    """The King James Bible as a verse listing, from the ``bible`` program.

    ``bible-kjv-text`` holds the text compressed (``/usr/lib/bible.data``);
    the ``bible`` program of ``bible-kjv`` prints it one verse a line.

    Arguments
    ---------
    data : str or pathlib.Path
        The compressed text.

    Returns
    -------
    list of str
        Lines ``Ge1:1 In the beginning ...``; empty when the program or the
        data is missing.

    Example
    -------
    >>> lines = read_kjv()
    >>> len(lines) in (0, 31102)
    True
    """
    data = pathlib.Path(data)
    program = shutil.which("bible")
    if program is None or not data.is_file():
        return []
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    out = subprocess.run(
        [
            program,
            "-f",
            "-p",
            str(data.parent),
            "-d",
            data.name,
            "Gen1:1-Rev22:21",
        ],
        capture_output=True,
        env=env,
        check=True,
    ).stdout
    return out.decode("utf-8", "replace").splitlines()


def bible_sentences(path=None):
    """Sentences of the King James Bible.

    Verses are joined chapter by chapter (a sentence often spans verses),
    split at sentence ends, and cleaned; a sentence over 25 words is
    dropped as every other source's.

    Arguments
    ---------
    path : str or pathlib.Path, optional
        A verse listing file (:func:`parse_bible`); default: the Debian
        text (:func:`read_kjv`).

    Returns
    -------
    list of str
        Clean sentences, book by book, chapter by chapter.

    Example
    -------
    >>> import tempfile
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "kjv.txt"
    >>> _ = p.write_text("Ge1:3 And God said, Let there be light: and there\\n"
    ...     "Ge1:3 was light. And the LORD saw the light, that it was good.\\n")
    >>> bible_sentences(p)[1]
    'And the Lord saw the light, that it was good.'
    """
    if path is None:
        lines = read_kjv()
    else:
        lines = read_text(path).splitlines()
    cands = []
    for chapter in parse_bible(lines):
        cands.extend(split_sentences(chapter))
    return unique_clean(cands)


def _example_sentence(text):
    """A WordNet example as a sentence: capital first, final stop added."""
    text = " ".join(text.split())
    if len(text.split()) < 4:  # mostly noun phrases ("unsaponified fat")
        return None
    text = text[0].upper() + text[1:]
    if text[-1] not in ".!?":
        text += "."
    return text


def wordnet_sentences(folder=WORDNET_DIR):
    """The example sentences quoted in WordNet's glosses.

    Examples (``"he was a big man"``) are given a capital and a full stop;
    those under four words (mostly phrases) are left out.

    Arguments
    ---------
    folder : str or pathlib.Path
        Folder of ``data.noun``, ``data.verb``, ``data.adj``, ``data.adv``.

    Returns
    -------
    list of str
        Clean example sentences (nouns, verbs, adjectives, adverbs).

    Example
    -------
    >>> import tempfile
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "data.verb").write_text("  1 license text\\n"
    ...     '00022316 29 v 01 sedate 0 000 | cause to be calm; "The patient '
    ...     'must be sedated before the operation"; "sedate her"  \\n')
    >>> wordnet_sentences(d)
    ['The patient must be sedated before the operation.']
    """
    cands = []
    for pos in ("noun", "verb", "adj", "adv"):
        path = pathlib.Path(folder) / f"data.{pos}"
        if not path.is_file():
            continue
        for line in read_text(path).splitlines():
            if line.startswith(" ") or " | " not in line:
                continue  # licence header
            gloss = line.split(" | ", 1)[1]
            for quoted in _QUOTED.findall(gloss):
                s = _example_sentence(quoted)
                if s is not None:
                    cands.append(s)
    return unique_clean(cands)


def dhammapada_sentences(path=DHAMMAPADA):
    """Sentences of the English Dhammapada of ``display-dhammapada``.

    The verses follow the line ``(An Anthology of Verses)``; chapter
    titles (``1. The Pairs``) and verse numbers are dropped.

    Arguments
    ---------
    path : str or pathlib.Path
        The translation's text file.

    Returns
    -------
    list of str
        Clean sentences of the verses (none when the file is missing).

    Example
    -------
    >>> import tempfile
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "d.txt"
    >>> _ = p.write_text("Preface to skip here.\\n(An Anthology of Verses)\\n"
    ...     "\\n1. The Pairs\\n\\nHatred is never settled by hatred. It is "
    ...     "settled by\\nfreedom from hatred. 5\\n")
    >>> dhammapada_sentences(p)
    ['Hatred is never settled by hatred.', 'It is settled by freedom from hatred.']
    """
    text = _optional_text(path)
    start = text.find("(An Anthology of Verses)")
    if start < 0:
        return []
    cands = []
    for para in re.split(r"\n\s*\n", text[start:].split("\n", 1)[-1]):
        para = " ".join(para.split())
        if re.fullmatch(r"\d+\. [^.]*", para):  # chapter title
            continue
        para = re.sub(r"\s*\d+$", "", para)  # verse number
        para = re.sub(r"(\w)- (\w)", r"\1-\2", para)  # "self- control"
        cands.extend(split_sentences(para))
    return unique_clean(cands)


#: Source name -> function, in the order their sentences are merged.
SOURCES = {
    "fortunes": core_fortune_sentences,
    "fortunes-extra": extra_fortune_sentences,
    "bible-kjv": bible_sentences,
    "wordnet": wordnet_sentences,
    "dhammapada": dhammapada_sentences,
}


@functools.cache
def _source(name):
    return tuple(SOURCES[name]())


def source_sentences(name):
    """The sentences of one source of :data:`SOURCES` (cached).

    Example
    -------
    >>> source_sentences("fortunes") == core_fortune_sentences()
    True
    """
    return list(_source(name))


def merge_sources(lists):
    """Union of sentence lists, first occurrence of each key kept, in order.

    Arguments
    ---------
    lists : iterable of list of str

    Returns
    -------
    list of str
        The sentences of every list, first occurrence of each key kept.

    Example
    -------
    >>> merge_sources([["Hello there, you.", "Go now, quickly."],
    ...     ["hello there you!", "Stay a while."]])
    ['Hello there, you.', 'Go now, quickly.', 'Stay a while.']
    """
    return unique_sentences(itertools.chain.from_iterable(lists))


def extra_sentences():
    """English sentences of every source but the core fortunes.

    Those whose key is also a core sentence's are left out, so they never
    bring a valid or test sentence into training.

    Example
    -------
    >>> from speechbrain_blspkd.dataprep.sentences import sentence_key
    >>> core = {sentence_key(s) for s in core_fortune_sentences()}
    >>> any(sentence_key(s) in core for s in extra_sentences())
    False
    """
    merged = merge_sources(source_sentences(n) for n in SOURCES)
    return merged[len(source_sentences("fortunes")) :]


def english_sentences():
    """All English sentences: core fortunes first, then the other sources.

    Example
    -------
    >>> len(english_sentences()) == (len(source_sentences("fortunes"))
    ...     + len(extra_sentences()))
    True
    """
    return merge_sources(source_sentences(n) for n in SOURCES)


def missing_sources():
    """Debian packages whose English text is not installed.

    Example
    -------
    >>> isinstance(missing_sources(), list)
    True
    """
    missing = []
    if shutil.which("bible") is None:
        missing.append("bible-kjv")
    if not BIBLE_DATA.is_file():
        missing.append("bible-kjv-text")
    if not (WORDNET_DIR / "data.noun").is_file():
        missing.append("wordnet-base")
    if not (FORTUNE_DIR / "anarchism").is_file():
        missing.append("fortune-anarchism")
    if not TFORTUNES.is_file():
        missing.append("tfortunes")
    if not DHAMMAPADA.is_file():
        missing.append("display-dhammapada")
    return missing
