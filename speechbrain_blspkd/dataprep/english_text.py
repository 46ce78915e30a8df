"""English sentence sources of the SynthSpeech corpus (Debian texts).

Each source is a small function returning clean, de-duplicated sentences
(:func:`~speechbrain_blspkd.dataprep.synthspeech.clean_sentence`) in a
fixed reading order:

* :func:`core_fortune_sentences`: the fortune files SynthSpeech has always
  used (:data:`~speechbrain_blspkd.dataprep.synthspeech._EN_FORTUNES`);
  valid and test sentences are drawn from these only;
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

Command line (sentence counts per source and in total)::

    python -m speechbrain_blspkd.dataprep.english_text --count
"""

import argparse
import functools
import os
import pathlib
import re
import shutil
import subprocess
import sys

from speechbrain_blspkd.dataprep import synthspeech

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

#: English fortune files besides the core ones: technical collections,
#: whose code, URLs and digits :func:`clean_sentence` drops, included.
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
sentence_key = synthspeech.sentence_key


def _unique_clean(candidates):
    """Clean ``candidates`` and keep the first of each :func:`sentence_key`."""
    out, seen = [], set()
    for cand in candidates:
        s = synthspeech.clean_sentence(cand)
        if s is None:
            continue
        key = sentence_key(s)
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


def core_fortune_sentences():
    """The fortune sentences SynthSpeech has always used (valid/test pool).

    Returns
    -------
    list of str

    Example
    -------
    >>> all(synthspeech.clean_sentence(s) == s
    ...     for s in core_fortune_sentences())
    True
    """
    return synthspeech.fortune_sentences(synthspeech._EN_FORTUNES)


def tfortune_sentences(path=TFORTUNES):
    """Sentences of a ``tfortunes`` file (entries end with ``---- tags``).

    Arguments
    ---------
    path : str or pathlib.Path
        A ``.tfortunes`` file; missing: no sentences.

    Returns
    -------
    list of str

    Example
    -------
    >>> import tempfile
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "en.tfortunes"
    >>> _ = p.write_text("The best defense against logic is ignorance.\\n"
    ...     "---- math,geek\\nMath is hard to do.  -- Barbie\\n---- math\\n")
    >>> tfortune_sentences(p)
    ['The best defense against logic is ignorance.', 'Math is hard to do.']
    """
    path = pathlib.Path(path)
    if not path.is_file():
        return []
    cands, entry = [], []
    for line in synthspeech._read_text(path).splitlines() + ["----"]:
        if line.startswith("----"):
            # an attribution may follow the text on its last line
            lines = [re.split(r"\s--\s", x)[0] for x in entry]
            cands.extend(synthspeech._entry_sentences(lines))
            entry = []
        else:
            entry.append(line)
    return _unique_clean(cands)


def extra_fortune_sentences(fortune_files=EXTRA_FORTUNES, tfortunes=TFORTUNES):
    """Sentences of the other English fortune files and of ``tfortunes``.

    Arguments
    ---------
    fortune_files : sequence of str or pathlib.Path
        Fortune files (names below
        :data:`~speechbrain_blspkd.dataprep.synthspeech.FORTUNE_DIR`).
    tfortunes : str or pathlib.Path
        A ``tfortunes`` file (:func:`tfortune_sentences`).

    Returns
    -------
    list of str

    Example
    -------
    >>> import tempfile
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "f").write_text("Art is long and life is short.\\n%\\n")
    >>> extra_fortune_sentences([d / "f"], d / "none")
    ['Art is long and life is short.']
    """
    out = synthspeech.fortune_sentences(fortune_files)
    return _unique_clean(out + tfortune_sentences(tfortunes))


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
        lines = synthspeech._read_text(path).splitlines()
    cands = []
    for chapter in parse_bible(lines):
        cands.extend(synthspeech._SENT_SPLIT.split(chapter))
    return _unique_clean(cands)


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
        for line in synthspeech._read_text(path).splitlines():
            if line.startswith(" ") or " | " not in line:
                continue  # licence header
            gloss = line.split(" | ", 1)[1]
            for quoted in _QUOTED.findall(gloss):
                s = _example_sentence(quoted)
                if s is not None:
                    cands.append(s)
    return _unique_clean(cands)


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
    path = pathlib.Path(path)
    if not path.is_file():
        return []
    text = synthspeech._read_text(path)
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
        cands.extend(synthspeech._SENT_SPLIT.split(para))
    return _unique_clean(cands)


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

    Example
    -------
    >>> merge_sources([["Hello there, you.", "Go now, quickly."],
    ...     ["hello there you!", "Stay a while."]])
    ['Hello there, you.', 'Go now, quickly.', 'Stay a while.']
    """
    out, seen = [], set()
    for sentences in lists:
        for s in sentences:
            key = sentence_key(s)
            if key not in seen:
                seen.add(key)
                out.append(s)
    return out


def extra_sentences():
    """English sentences of every source but the core fortunes.

    Those whose key is also a core sentence's are left out, so they never
    bring a valid or test sentence into training.

    Example
    -------
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
    if not (synthspeech.FORTUNE_DIR / "anarchism").is_file():
        missing.append("fortune-anarchism")
    if not TFORTUNES.is_file():
        missing.append("tfortunes")
    if not DHAMMAPADA.is_file():
        missing.append("display-dhammapada")
    return missing


def plan_coverage(
    tokenize,
    sizes,
    num_valid=32,
    num_test=96,
    seed=1234,
    sentences=None,
    extra=None,
):
    """Vocabulary coverage of an English plan's test sentences by the
    training sentences of plans of several ``num_train`` sizes.

    No audio is made: the sentences come from
    :func:`~speechbrain_blspkd.dataprep.synthspeech.make_plan`.

    Arguments
    ---------
    tokenize : callable
        ``str -> list of int`` (the LLM's transcript tokenisation).
    sizes : list of int
        The ``num_train`` values.
    num_valid, num_test, seed : int
        The other plan options (English only).
    sentences, extra : dict, optional
        Pools for :func:`~speechbrain_blspkd.dataprep.synthspeech.make_plan`
        (default: this machine's).

    Returns
    -------
    list of dict
        Per size: ``num_train``, ``distinct_train`` (distinct training
        sentences), ``token_coverage``, ``type_coverage``.

    Example
    -------
    >>> core = {"en": [f"Sentence {w} is here." for w in "abcdefgh"]}
    >>> more = {"en": ["Sentence x is there."]}
    >>> vocab = {}
    >>> def tokenize(text):  # one id per word
    ...     return [vocab.setdefault(w, len(vocab)) for w in text.split()]
    >>> out = plan_coverage(tokenize, [4, 20], 1, 2, 0, core, more)
    >>> [(r["distinct_train"], r["token_coverage"]) for r in out]
    [(4, 0.75), (6, 0.75)]
    """
    from speechbrain_blspkd.metrics import vocabulary_coverage

    def texts(plan, split):
        return [u["text"] for u in plan["utterances"] if u["split"] == split]

    out, test = [], None
    for n in sizes:
        plan = synthspeech.make_plan(
            n, num_valid, num_test, ["en"], seed, None, sentences, extra
        )
        if test is None:
            test = texts(plan, "test")
        if texts(plan, "test") != test:
            raise AssertionError("the test split depends on num_train")
        train = sorted(set(texts(plan, "train")))
        cov = vocabulary_coverage(
            [tokenize(t) for t in test], [tokenize(t) for t in train]
        )
        out.append(
            dict(
                num_train=n,
                distinct_train=len(train),
                token_coverage=cov["token_coverage"],
                type_coverage=cov["type_coverage"],
            )
        )
    return out


def _llm_tokenize(model):
    from transformers import AutoTokenizer

    from speechbrain_blspkd.inference.export import resolve_source
    from speechbrain_blspkd.prompt import PromptBuilder

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_source(model)))
    return PromptBuilder(tokenizer).transcript_ids


def main(argv=None):
    """Command line: ``--count`` prints the sentences per source."""
    parser = argparse.ArgumentParser(
        description="English sentence sources of SynthSpeech."
    )
    parser.add_argument(
        "--count",
        action="store_true",
        help="print the distinct clean sentences per source and in total",
    )
    parser.add_argument(
        "--coverage",
        metavar="LLM",
        help="print the LLM-token coverage of the test sentences of the "
        "English plan (num_valid 32, num_test 96, seed 1234) by the "
        "training sentences of num_train 2000/4000/8000/20000, for the "
        "full pool and the core fortunes only (LLM: an asset name or a "
        "folder, e.g. smollm2-135m-instruct)",
    )
    args = parser.parse_args(argv)
    if args.coverage:
        tokenize = _llm_tokenize(args.coverage)
        core = {"en": source_sentences("fortunes")}
        for name, kw in [
            ("all sources", {}),
            ("fortunes only", {"sentences": core}),
        ]:
            for r in plan_coverage(tokenize, [2000, 4000, 8000, 20000], **kw):
                print(
                    f"{name:14s} num_train {r['num_train']:6d}  distinct "
                    f"{r['distinct_train']:6d}  token coverage "
                    f"{100 * r['token_coverage']:.2f} %  type coverage "
                    f"{100 * r['type_coverage']:.2f} %"
                )
        return 0
    if not args.count:
        parser.print_help()
        return 0
    missing = missing_sources()
    if missing:
        print(f"missing Debian packages: {' '.join(missing)}")
    seen = set()
    for name in SOURCES:
        sents = source_sentences(name)
        keys = {sentence_key(s) for s in sents}
        new = len(keys - seen)
        seen |= keys
        print(f"{name:16s} {len(sents):7d}  (new after the above: {new})")
    print(f"{'total':16s} {len(english_sentences()):7d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
