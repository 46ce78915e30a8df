"""The SynthSpeech corpus plan: which sentence each utterance speaks, in
which split, with which voice, speed and pitch.

* the languages (:data:`LANGUAGES`: espeak-ng voices, fortune sources and
  their Debian packages) and their sentence pools on this machine
  (:func:`language_pools`: a *core* pool for every split, and for English
  an *extra* pool for training only, from
  :mod:`~speechbrain_blspkd.dataprep.english_sources`);
* the splits (:data:`SPLITS`) and their voice variants (:data:`VARIANTS`:
  valid and test are spoken only by variants held out from training),
  speeds and pitches;
* :func:`make_plan`: every utterance of the corpus, a pure function of the
  options (:func:`plan_options`) and the seed; the build
  (:mod:`~speechbrain_blspkd.dataprep.synthspeech`) saves it to
  :data:`PLAN_FILE` and reuses it while the options match
  (:func:`load_saved_plan`).
"""

import functools
import random

from speechbrain_blspkd.dataprep.english_sources import (
    CORE_FORTUNES,
    extra_sentences,
)
from speechbrain_blspkd.dataprep.sentences import (
    fortune_sentences,
    gettext_sentences,
    sentence_key,
    unique_clean,
    unique_sentences,
)
from speechbrain_blspkd.dataprep.tts import FLITE_VOICES
from speechbrain_blspkd.utils.atomic import read_json

#: 2: English training sentences beyond the core fortunes
#: (:func:`language_pools`), pools de-duplicated by
#: :func:`~speechbrain_blspkd.dataprep.sentences.sentence_key`.
PLAN_VERSION = 2
PLAN_FILE = "synthspeech_plan.json"
SPLITS = ("train", "valid", "test")

#: language -> (espeak-ng voices, fortune sources, Debian package of them).
#: A fortune source is a file or a folder of fortune files below
#: :data:`~speechbrain_blspkd.dataprep.sentences.FORTUNE_DIR`.
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
        CORE_FORTUNES,
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
#: The espeak-ng speed (words per minute) that flite's voices speak at
#: their own rate: over 30 training sentences they say 169-193 words a
#: minute (185 on average, silences included) where espeak-ng ``-s 175``
#: says 201, so 175 * 185 / 201 ~ 160.  A flite utterance planned at
#: ``speed`` is spoken with ``duration_stretch = FLITE_SPEED / speed``.
FLITE_SPEED = 160


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
        core += unique_clean(gettext_sentences(language), language, seen)
    else:
        extra = [s for s in extra_sentences() if sentence_key(s) not in seen]
    return tuple(core), tuple(extra)


def language_pools(language):
    """The core and the extra sentences of ``language`` on this machine.

    Valid and test sentences come from the core pool only (the fortunes,
    and gettext translations for languages other than English); the extra
    pool (English only: the other sources of
    :mod:`~speechbrain_blspkd.dataprep.english_sources`: more fortunes, the
    King James Bible, WordNet examples, the Dhammapada) only ever adds
    training sentences, and holds no sentence whose
    :func:`~speechbrain_blspkd.dataprep.sentences.sentence_key` is a core
    one's.  Both are cached for the life of the process.

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
    two sentences of the same
    :func:`~speechbrain_blspkd.dataprep.sentences.sentence_key`; cached for
    the life of the process.

    Arguments
    ---------
    language : str
        A key of :data:`LANGUAGES`, as for :func:`language_pools`.

    Returns
    -------
    list of str
        The core pool, then the extra pool.

    Example
    -------
    >>> from speechbrain_blspkd.dataprep import sentences
    >>> all(sentences.clean_sentence(s) == s
    ...     for s in language_sentences("en"))
    True
    """
    core, extra = _language_sentences(language)
    return list(core + extra)


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
    train_speed_range=None,
    train_flite_share=0.0,
):
    """Deterministic assignment of sentences and voices to utterances.

    Per language, the core pool (de-duplicated by
    :func:`~speechbrain_blspkd.dataprep.sentences.sentence_key`) is
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
    train_speed_range : (int, int), optional
        The espeak-ng speeds (words per minute, both ends included) of the
        training utterances; default :data:`SPEED_RANGE`, as valid and
        test always have.  The voices, variants and speeds of the test
        split are drawn first, so they do not depend on it.
    train_flite_share : float
        Share of the English training utterances spoken by flite instead
        of espeak-ng (a second engine; valid and test stay espeak-ng).
        Which ones, and their flite voices (:data:`~.tts.FLITE_VOICES`,
        in turn), are drawn with a seed of their own after everything
        else, so every other utterance is the one the plan without flite
        has; a flite utterance keeps its sentence and speed, gets
        ``engine: flite`` and no variant or pitch.

    Returns
    -------
    dict
        ``{"options": ..., "utterances": [{"ID", "split", "language",
        "voice", "variant", "speed", "pitch", "text"}, ...]}``; flite
        utterances also have ``"engine": "flite"``.

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
        pool = unique_sentences(pool)
        random.Random(f"{seed}-{lang}").shuffle(pool)
        more = unique_sentences(more, exclude={sentence_key(s) for s in pool})
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
    # depends on the size (or the speeds) of a later one
    train_speeds = _speed_range(train_speed_range)
    speeds = dict(test=SPEED_RANGE, valid=SPEED_RANGE, train=train_speeds)
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
                        speed=rng.randint(*speeds[split]),
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
    share = _share(train_flite_share)
    english = [
        u for u in utts if u["split"] == "train" and u["language"] == "en"
    ]
    picked = random.Random(f"{seed}-flite").sample(
        range(len(english)), round(share * len(english))
    )
    for k, i in enumerate(sorted(picked)):
        voice = FLITE_VOICES[k % len(FLITE_VOICES)]
        english[i].update(engine="flite", voice=voice, variant=None, pitch=None)
    options = plan_options(
        num_train,
        num_valid,
        num_test,
        languages,
        seed,
        en_fraction,
        train_speed_range=train_speeds,
        train_flite_share=share,
    )
    return dict(options=options, utterances=utts)


def _share(value):
    """``value`` as a checked share between 0 and 1."""
    share = float(value or 0.0)
    if not 0.0 <= share <= 1.0:
        raise ValueError(
            f"train_flite_share {value}: need a share between 0 and 1"
        )
    return share


def _speed_range(value):
    """``value`` as a checked ``(low, high)`` espeak-ng speed range
    (:data:`SPEED_RANGE` when None)."""
    if value is None:
        return SPEED_RANGE
    if len(value) != 2:
        raise ValueError(
            f"train_speed_range {list(value)}: need two speeds, low and high "
            "(espeak-ng words per minute)"
        )
    low, high = (int(v) for v in value)
    # espeak-ng speaks 80-450 words per minute
    if not 80 <= low <= high <= 450:
        raise ValueError(
            f"train_speed_range {list(value)}: need 80 <= low <= high <= 450 "
            "(espeak-ng words per minute)"
        )
    return (low, high)


def plan_options(
    num_train,
    num_valid,
    num_test,
    languages,
    seed,
    en_fraction,
    train_speed_range=None,
    train_flite_share=0.0,
):
    """The ``options`` entry of a plan (:func:`make_plan`): the arguments
    that make it, with :data:`PLAN_VERSION`.  A saved plan is reused only
    when they are the same (:func:`load_saved_plan`).  The training speed
    range and flite share are recorded only when they are not the defaults
    (:data:`SPEED_RANGE`, none), so the plans saved before they existed
    stay valid.

    Example
    -------
    >>> plan_options(10, 2, 2, ["en"], 0, None)["version"] == PLAN_VERSION
    True
    >>> plan_options(10, 2, 2, ["en"], 0, None, (120, 240))["train_speed_range"]
    [120, 240]
    >>> plan_options(10, 2, 2, ["en"], 0, None, train_flite_share=0.25)[
    ...     "train_flite_share"]
    0.25
    """
    options = dict(
        version=PLAN_VERSION,
        num_train=num_train,
        num_valid=num_valid,
        num_test=num_test,
        languages=list(languages),
        seed=seed,
        en_fraction=en_fraction,
    )
    speeds = _speed_range(train_speed_range)
    if speeds != SPEED_RANGE:
        options["train_speed_range"] = list(speeds)
    share = _share(train_flite_share)
    if share:
        options["train_flite_share"] = share
    return options


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
    >>> import json, pathlib, tempfile
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "plan.json"
    >>> _ = p.write_text(json.dumps({"options": {"n": 2}, "utts": []}))
    >>> load_saved_plan(p, {"n": 2})["utts"], load_saved_plan(p, {"n": 3})
    ([], None)
    """
    saved = read_json(plan_path)
    if isinstance(saved, dict) and saved.get("options") == options:
        return saved
    return None
