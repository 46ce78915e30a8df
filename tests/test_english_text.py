"""Tests of the English sentence sources of SynthSpeech and of the split
rules of its plan (disjoint splits, test split independent of num_train)."""

import re

import pytest

from speechbrain_blspkd.dataprep import english_text as et
from speechbrain_blspkd.dataprep import synthspeech as ss


def _texts(plan, split):
    return [u["text"] for u in plan["utterances"] if u["split"] == split]


def _keys(texts):
    return {ss.sentence_key(t) for t in texts}


# --- source parsers on made-up files ------------------------------------


def test_bible_verses_joined_split_and_cleaned(tmp_path):
    listing = tmp_path / "kjv.txt"
    listing.write_text(
        "Ge1:1 In the beginning God created the heaven and the earth.\n"
        "Ge1:2 And the LORD said, Let there be light: and there\n"
        "Ge1:3 was light. And God saw the light, that it was good.\n"
        "Ge1:4 " + " ".join(["And it was so"] * 7) + ".\n"  # > 25 words
        "Ge1:5 And he wrote, KING OF KINGS, AND LORD OF LORDS.\n"
        "Ge2:1 Thus the heavens were finished\n"  # chapter ends: no stop
        "Ge2:2 And on the seventh day God ended his work.\n"
        "Ex1:1 Now these are the names.\n"
        "Genesis 1\n"  # not a verse line
    )
    got = et.bible_sentences(listing)
    assert got == [
        "In the beginning God created the heaven and the earth.",
        "And the Lord said, Let there be light: and there was light.",
        "And God saw the light, that it was good.",
        "And he wrote, King Of Kings, And Lord Of Lords.",
        "Thus the heavens were finished And on the seventh day God "
        "ended his work.",
        "Now these are the names.",
    ]
    assert not any(ch.isdigit() for s in got for ch in s)


def test_wordnet_examples(tmp_path):
    (tmp_path / "data.noun").write_text(
        "  1 This software and database is being provided to you.  \n"
        "00001 03 n 01 castle 0 000 | a fortress; \"a man's house is his "
        'castle" - Edward Coke; "the castle stood on the hill"; "old '
        'castle"  \n'
    )
    (tmp_path / "data.verb").write_text(
        '00002 29 v 01 sedate 0 000 | cause to be calm; "The patient must '
        'be sedated before the operation"; "Did they sedate her?"  \n'
        '00003 29 v 01 pay 0 000 | give money; "pay 5 dollars for it"  \n'
    )
    assert et.wordnet_sentences(tmp_path) == [
        "A man's house is his castle.",
        "The castle stood on the hill.",
        "The patient must be sedated before the operation.",
        "Did they sedate her?",
    ]


def test_tfortunes_and_extra_fortunes(tmp_path):
    tf = tmp_path / "en.tfortunes"
    tf.write_text(
        "One is less than two, even for large values of one.\n"
        "---- math,geek\n"
        "Of course, the development space is neither flat nor\n"
        "round.                               -- Linus Torvalds (2006)\n"
        "---- math\n"
        "\tmoney = time = work/power\n"
        "---- math\n"
    )
    assert et.tfortune_sentences(tf) == [
        "One is less than two, even for large values of one.",
        "Of course, the development space is neither flat nor round.",
    ]
    fortune = tmp_path / "f"
    fortune.write_text(
        "one is LESS than two, even for large values of one!\n%\n"
        "Drugs are a bet with your mind.\n\t-- Jim Morrison\n%\n"
    )
    # lower-case start: not a sentence; the tfortunes follow the fortunes
    assert et.extra_fortune_sentences([fortune], tf) == [
        "Drugs are a bet with your mind.",
        "One is less than two, even for large values of one.",
        "Of course, the development space is neither flat nor round.",
    ]


def test_extra_fortunes_keep_first_spelling(tmp_path):
    tf = tmp_path / "en.tfortunes"
    tf.write_text("One is less than two, even for large values.\n---- x\n")
    fortune = tmp_path / "f"
    fortune.write_text(
        "Drugs are a bet with your mind.\n\t-- Jim Morrison\n%\n"
        "ONE is less than two; even for large values!\n%\n"
    )
    assert et.extra_fortune_sentences([fortune], tf) == [
        "Drugs are a bet with your mind.",
        "ONE is less than two; even for large values!",
    ]


def test_dhammapada_verses(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text(
        "Introduction that is not a verse at all.\n"
        "(An Anthology of Verses)\n\n1. The Pairs\n\n"
        "Mind precedes its objects. They are mind-governed and mind-made.\n"
        "To act with a peaceful mind is like an inseparable shadow. 2\n\n"
        "But the Tempter cannot master a man who is self- controlled in his\n"
        "senses.\n3\n"
    )
    assert et.dhammapada_sentences(path) == [
        "Mind precedes its objects.",
        "They are mind-governed and mind-made.",
        "To act with a peaceful mind is like an inseparable shadow.",
        "But the Tempter cannot master a man who is self-controlled in his "
        "senses.",
    ]


def test_missing_files_give_no_sentences(tmp_path):
    assert et.wordnet_sentences(tmp_path) == []
    assert et.dhammapada_sentences(tmp_path / "none") == []
    assert et.tfortune_sentences(tmp_path / "none") == []


def test_merge_sources_deduplicates_in_order():
    merged = et.merge_sources(
        [
            ["Hello there, my friend.", "Go home now, quickly!"],
            ["hello there my friend", "Stay a little while."],
            ["GO HOME NOW QUICKLY.", "Stay a little while."],
        ]
    )
    assert merged == [
        "Hello there, my friend.",
        "Go home now, quickly!",
        "Stay a little while.",
    ]


# --- plan: disjoint splits, test split independent of num_train -----------

CORE = {
    "en": [f"This is core sentence number {w}." for w in "abcdefghijklmnop"]
    + ["THIS is core sentence number A!"]  # a duplicate of the first
}
EXTRA = {
    "en": [f"An extra training sentence {w}." for w in "qrstuvwxyz"]
    # extra sentences that are core sentences in disguise
    + ["this is core sentence number b", "This is core, sentence number C."]
}


def test_splits_are_disjoint_with_extra_sentences():
    plan = ss.make_plan(40, 3, 4, ["en"], 7, sentences=CORE, extra=EXTRA)
    test, valid, train = (_texts(plan, s) for s in ("test", "valid", "train"))
    assert len(test) == 4 and len(valid) == 3 and len(train) == 40
    assert not _keys(test) & _keys(train)
    assert not _keys(valid) & _keys(train)
    assert not _keys(test) & _keys(valid)
    # every distinct sentence is used once before any is repeated:
    # 16 distinct core - 7 held out + 10 extra
    assert len(_keys(train)) == 19
    assert len(set(train)) == 19


def test_test_split_does_not_depend_on_num_train():
    plans = [
        ss.make_plan(n, 3, 4, ["en"], 7, sentences=CORE, extra=EXTRA)
        for n in (2, 9, 15, 40)
    ]
    for split in ("test", "valid"):
        first = [
            {k: u[k] for k in u if k != "ID"}
            for u in plans[0]["utterances"]
            if u["split"] == split
        ]
        for plan in plans[1:]:
            assert [
                {k: u[k] for k in u if k != "ID"}
                for u in plan["utterances"]
                if u["split"] == split
            ] == first
    # the training sentences of a smaller plan are kept by a larger one
    for small, big in zip(plans, plans[1:]):
        assert set(_texts(small, "train")) <= set(_texts(big, "train"))


def test_test_voices_do_not_depend_on_num_train_of_another_language():
    core = {
        "en": CORE["en"],
        "de": [f"Das ist der deutsche Satz {w}." for w in "abcdefghijklmn"],
    }
    tests = []
    for n in (4, 10):
        plan = ss.make_plan(n, 2, 4, ["en", "de"], 3, None, core)
        tests.append([u for u in plan["utterances"] if u["split"] == "test"])
    assert tests[0] == tests[1]


def test_extra_sentences_change_only_training():
    without = ss.make_plan(30, 3, 4, ["en"], 7, sentences=CORE)
    with_extra = ss.make_plan(30, 3, 4, ["en"], 7, sentences=CORE, extra=EXTRA)
    for split in ("test", "valid"):
        assert _texts(without, split) == _texts(with_extra, split)
    assert _texts(without, "train") != _texts(with_extra, "train")
    assert not _keys(_texts(without, "train")) & {
        ss.sentence_key(s) for s in EXTRA["en"][:10]
    }


# --- the real Debian texts ------------------------------------------------

needs_texts = pytest.mark.skipif(
    bool(et.missing_sources()),
    reason="English text packages missing: " + " ".join(et.missing_sources()),
)


@needs_texts
def test_real_sources_are_clean_and_large():
    counts = {name: len(et.source_sentences(name)) for name in et.SOURCES}
    assert counts["bible-kjv"] > 10000, counts
    assert counts["wordnet"] > 20000, counts
    for name in et.SOURCES:
        for s in et.source_sentences(name):
            assert ss.clean_sentence(s) == s, (name, s)
    assert not any(
        w.isupper() and len(w) > 1
        for s in et.source_sentences("bible-kjv")
        for w in re.findall(r"\w+", s)
    )
    pool = ss.language_sentences("en")
    assert len(pool) == len(_keys(pool)) >= 20000 + 128


@needs_texts
def test_real_english_plan_of_20000():
    plan = ss.make_plan(20000, 32, 96, ["en"], 1234)
    test, valid, train = (_texts(plan, s) for s in ("test", "valid", "train"))
    assert len(_keys(train)) == 20000
    assert not (_keys(test) | _keys(valid)) & _keys(train)
    small = ss.make_plan(2000, 32, 96, ["en"], 1234)
    assert _texts(small, "test") == test
    assert set(_texts(small, "train")) <= set(train)
    # the core (fortune) sentences hold every test sentence
    core, _ = ss.language_pools("en")
    assert _keys(test) <= _keys(core)
