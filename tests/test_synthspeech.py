"""Tests of the SynthSpeech corpus builder (espeak-ng + sox)."""

import json
import shutil

import pytest
import soundfile as sf
from conftest import SYNTH_SIZES, resume_synthspeech

from speechbrain_blspkd.dataio.manifest import read_manifest
from speechbrain_blspkd.dataprep import sentences, synthspeech_plan, tts
from speechbrain_blspkd.dataprep import synthspeech as ss

pytestmark = pytest.mark.skipif(
    shutil.which("espeak-ng") is None or shutil.which("sox") is None,
    reason="needs espeak-ng and sox",
)
SIZES = SYNTH_SIZES


@pytest.fixture
def corpus(synth_corpus):
    return synth_corpus


def _rows(folder):
    return {
        s: read_manifest(folder / f"{s}.csv", data_root=folder)
        for s in ss.SPLITS
    }


def test_clean_sentence_rules():
    assert (
        ss.clean_sentence("Hello  there,\nmy friend!")
        == "Hello there, my friend!"
    )
    for bad in [
        "Two words.",
        "No final punctuation here at all",
        "Visit www.example.com/page for more.",
        "It costs 5 dollars today.",
        "Call foo(bar) { return x; } now.",
        "lower case start is not a sentence.",
        "THIS IS ALL SHOUTING AT YOU.",
        " ".join(["word"] * 26) + ".",
    ]:
        assert ss.clean_sentence(bad) is None, bad


def test_mo_reader_round_trip(tmp_path):
    cat = {"Open the file.": "Ouvrir le fichier.", "Quit": "Quitter"}
    sentences._write_mo(tmp_path / "x.mo", cat)
    assert ss.read_mo(tmp_path / "x.mo") == cat


def test_plan_is_deterministic_and_disjoint():
    sents = {
        "en": [
            f"This is English sentence {w}." for w in "abcdefghijklmnopqrst"
        ],
        "de": [
            f"Das ist der deutsche Satz {w}." for w in "abcdefghijklmnopqrst"
        ],
    }
    a = ss.make_plan(10, 3, 3, ["en", "de"], 1, sentences=sents)
    assert a == ss.make_plan(10, 3, 3, ["en", "de"], 1, sentences=sents)
    assert a != ss.make_plan(10, 3, 3, ["en", "de"], 2, sentences=sents)
    by_split = {
        s: [u for u in a["utterances"] if u["split"] == s] for s in ss.SPLITS
    }
    assert [len(by_split[s]) for s in ss.SPLITS] == [10, 3, 3]
    assert sum(u["language"] == "en" for u in by_split["train"]) == 8
    for held in ("valid", "test"):
        assert not {u["text"] for u in by_split[held]} & {
            u["text"] for u in by_split["train"]
        }
        assert not {u["variant"] for u in by_split[held]} & set(
            ss.VARIANTS["train"]
        )


def test_corpus_manifests_and_audio(corpus):
    rows = _rows(corpus)
    assert [len(rows[s]) for s in ss.SPLITS] == [12, 3, 3]
    ids = [r["ID"] for s in ss.SPLITS for r in rows[s]]
    assert len(ids) == len(set(ids))
    assert {r["language"] for r in rows["train"]} == {"en", "de"}
    assert sum(r["language"] == "en" for r in rows["train"]) >= 9
    for r in (r for s in ss.SPLITS for r in rows[s]):
        info = sf.info(r["wav"])
        assert info.samplerate == 16000 and info.channels == 1
        assert info.subtype == "PCM_16"
        assert abs(info.frames / 16000 - r["duration"]) < 1e-3
        assert 0.5 < r["duration"] < 20
        assert r["speaker"].split("+")[0] in ss.LANGUAGES[r["language"]][0]
    raw = (corpus / "train.csv").read_text()
    assert "$data_root/wavs/train/" in raw


def test_held_out_voices_and_sentences(corpus):
    rows = _rows(corpus)
    train_spk = {r["speaker"] for r in rows["train"]}
    train_txt = {r["transcript"] for r in rows["train"]}
    for held in ("valid", "test"):
        assert not {r["speaker"] for r in rows[held]} & train_spk
        assert not {r["transcript"] for r in rows[held]} & train_txt
    assert not {r["transcript"] for r in rows["valid"]} & {
        r["transcript"] for r in rows["test"]
    }


def test_second_call_skips(corpus, monkeypatch):
    before = {s: (corpus / f"{s}.csv").stat().st_mtime_ns for s in ss.SPLITS}

    def boom(*args, **kwargs):
        raise AssertionError("should not synthesise or plan again")

    monkeypatch.setattr(ss, "synthesise", boom)
    monkeypatch.setattr(ss, "make_plan", boom)
    ss.prepare_synthspeech(corpus, **SIZES)
    after = {s: (corpus / f"{s}.csv").stat().st_mtime_ns for s in ss.SPLITS}
    assert before == after


def test_resume_after_kill(corpus, tmp_path, monkeypatch):
    work = tmp_path / "c"
    shutil.copytree(corpus, work)
    ref = _rows(corpus)
    for s in ss.SPLITS:  # killed before the manifests were written
        (work / f"{s}.csv").unlink()
    train_wavs = sorted((work / "wavs" / "train").rglob("*.wav"))
    gone = train_wavs[:3]
    for p in gone:
        p.unlink()
    train_wavs[3].write_bytes(train_wavs[3].read_bytes()[:30])  # torn file
    stray = gone[0].parent / f".{gone[0].name}.abc123.tmp"
    stray.write_bytes(b"RIFF")
    made = resume_synthspeech(work, monkeypatch)
    assert sorted(made) == sorted(p.stem[:-9] for p in train_wavs[:4])
    assert not stray.exists()
    got = _rows(work)
    for s in ss.SPLITS:
        assert [
            (r["ID"], r["transcript"], r["speaker"], r["duration"])
            for r in got[s]
        ] == [
            (r["ID"], r["transcript"], r["speaker"], r["duration"])
            for r in ref[s]
        ]
    plan = json.loads((work / ss.PLAN_FILE).read_text())
    assert len(plan["utterances"]) == 18


def test_training_speed_range_leaves_valid_and_test_alone():
    sents = {"en": [f"This is English sentence {w}." for w in "abcdefghijkl"]}
    base = ss.make_plan(40, 3, 3, ["en"], 1, sentences=sents)
    wide = ss.make_plan(
        40, 3, 3, ["en"], 1, sentences=sents, train_speed_range=(200, 240)
    )

    def split(plan, name):
        return [u for u in plan["utterances"] if u["split"] == name]

    # valid and test are drawn before training: the same clips exactly
    for held in ("valid", "test"):
        assert split(wide, held) == split(base, held)
    # the training sentences stay, their speeds move into the new range
    assert [u["text"] for u in split(wide, "train")] == [
        u["text"] for u in split(base, "train")
    ]
    speeds = [u["speed"] for u in split(wide, "train")]
    assert min(speeds) >= 200 and max(speeds) <= 240
    assert min(u["speed"] for u in split(base, "train")) < 200
    # recorded in the options (a saved plan of another range is not
    # reused); the default range records nothing, as plans saved before
    assert wide["options"]["train_speed_range"] == [200, 240]
    assert "train_speed_range" not in base["options"]
    assert (
        ss.make_plan(
            40,
            3,
            3,
            ["en"],
            1,
            sentences=sents,
            train_speed_range=ss.SPEED_RANGE,
        )
        == base
    )
    with pytest.raises(ValueError, match=r"train_speed_range \[240, 200\]"):
        ss.make_plan(
            4, 1, 1, ["en"], 1, sentences=sents, train_speed_range=(240, 200)
        )


def test_flite_share_replaces_only_the_picked_training_clips():
    sents = {"en": [f"This is English sentence {w}." for w in "abcdefghijkl"]}
    base = ss.make_plan(40, 3, 3, ["en"], 1, sentences=sents)
    mixed = ss.make_plan(
        40, 3, 3, ["en"], 1, sentences=sents, train_flite_share=0.25
    )
    assert mixed["options"]["train_flite_share"] == 0.25
    assert "train_flite_share" not in base["options"]
    flite = [u for u in mixed["utterances"] if u.get("engine") == "flite"]
    # exactly a quarter of the training clips, training only, every voice
    assert len(flite) == 10
    assert {u["split"] for u in flite} == {"train"}
    assert sorted(u["voice"] for u in flite[:4]) == sorted(tts.FLITE_VOICES)
    assert all(u["variant"] is None and u["pitch"] is None for u in flite)
    # every other clip, and the sentence and speed of the picked ones, are
    # the plan's without flite
    by_id = {u["ID"]: u for u in base["utterances"]}
    for u in mixed["utterances"]:
        old = by_id[u["ID"]]
        if u.get("engine") == "flite":
            assert (u["text"], u["speed"]) == (old["text"], old["speed"])
        else:
            assert u == old
    with pytest.raises(ValueError, match=r"train_flite_share 1.5"):
        ss.make_plan(4, 1, 1, ["en"], 1, sentences=sents, train_flite_share=1.5)


@pytest.mark.skipif(shutil.which("flite") is None, reason="needs flite")
def test_flite_clips_are_built_named_and_resumed(corpus, tmp_path):
    work = tmp_path / "c"
    shutil.copytree(corpus, work)
    sizes = SIZES | {"train_flite_share": 0.5}
    ss.prepare_synthspeech(work, **sizes)
    plan = json.loads((work / ss.PLAN_FILE).read_text())
    train = _rows(work)["train"]
    flite = {u["ID"]: u for u in plan["utterances"] if "engine" in u}
    english = [r for r in train if r["language"] == "en"]
    assert len(flite) == round(len(english) / 2) > 0
    for row in train:
        if row["ID"] in flite:
            assert row["speaker"] == f"flite:{flite[row['ID']]['voice']}"
        else:
            assert "+" in row["speaker"]  # espeak-ng VOICE+VARIANT
        assert sf.info(row["wav"]).samplerate == 16000
    # the espeak-ng clips are the corpus's own files (same name, same
    # audio): only the flite ones were synthesised
    before = {p.name for p in corpus.rglob("*.wav")}
    after = {p.name for p in work.rglob("*.wav")}
    assert sorted(name[: name.rindex("_")] for name in after - before) == (
        sorted(flite)
    )
    # a rerun with the same options finds it complete
    again = ss.prepare_synthspeech(work, **sizes)
    assert again["train"].is_file()


def test_changed_options_make_a_new_plan(corpus, tmp_path):
    work = tmp_path / "c"
    shutil.copytree(corpus, work)
    ss.prepare_synthspeech(work, **(SIZES | {"seed": 8, "num_train": 10}))
    rows = _rows(work)
    assert len(rows["train"]) == 10
    old = {r["ID"]: r for s in ss.SPLITS for r in _rows(corpus)[s]}
    changed = 0
    for r in (r for s in ss.SPLITS for r in rows[s]):  # no stale audio
        o = old.get(r["ID"])
        if o and (o["transcript"], o["speaker"]) != (
            r["transcript"],
            r["speaker"],
        ):
            assert o["wav"].split("/")[-1] != r["wav"].split("/")[-1]
            changed += 1
    assert changed > 0
    assert len(list((work / "wavs").rglob("*.wav"))) == 16


def test_missing_texts_name_the_apt_command(tmp_path, monkeypatch):
    monkeypatch.setattr(ss, "FORTUNE_DIR", tmp_path)
    with pytest.raises(RuntimeError, match="apt-get install .*fortunes-de"):
        ss.prepare_synthspeech(tmp_path / "out", **SIZES)


def test_skip_prep(tmp_path):
    assert ss.prepare_synthspeech(tmp_path / "x", skip_prep=True) == {}
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------
# the non-Latin scripts of the multilingual corpus (zh, hi, ar)
def test_script_languages_keep_their_script_only():
    good = {
        "zh": "无法打开这个文件。",
        "hi": "फ़ाइल खोली नहीं जा सकी।",
        "ar": "لا يمكن فتح هذا الملف.",
    }
    for language, sentence in good.items():
        assert ss.clean_sentence(f"  {sentence} ", language) == sentence
    for language, bad in [
        ("zh", "GNOME 设置无法打开。"),  # a Latin word
        ("zh", "打开文件"),  # no final mark
        ("zh", "好。"),  # too short (5-40 characters)
        ("zh", "共有３个文件。"),  # a digit
        ("hi", "फ़ाइल नहीं"),  # no final mark, too short
        ("hi", "फ़ाइल १ खोली नहीं जा सकी।"),  # a Devanagari digit
        ("ar", "لا يمكن فتح الملف %s."),  # a placeholder
        ("ar", "لا يمكن فتح ٣ ملفات."),  # an Arabic-Indic digit
    ]:
        assert ss.clean_sentence(bad, language) is None, bad
    # the Latin rules still reject caseless text for a Latin language
    assert ss.clean_sentence(good["zh"], "en") is None


def test_equal_shares_of_every_language():
    assert synthspeech_plan._split_counts(9, ["en", "zh", "hi"], None) == {
        "en": 3,
        "zh": 3,
        "hi": 3,
    }
    sents = {
        lang: [f"{lang}{i}" for i in range(12)] for lang in ("en", "zh", "ar")
    }
    plan = ss.make_plan(6, 3, 3, ["en", "zh", "ar"], 1, None, sents)
    for split in ss.SPLITS:
        codes = [
            u["language"] for u in plan["utterances"] if u["split"] == split
        ]
        assert sorted(set(codes)) == ["ar", "en", "zh"], split
    assert {
        u["voice"] for u in plan["utterances"] if u["language"] == "zh"
    } == {"cmn"}
    assert plan["options"]["en_fraction"] is None


def test_script_languages_are_spoken(tmp_path):
    """One utterance per split and language in zh, hi and ar: espeak-ng
    speaks them with held-out voices in valid and test."""
    for language in ("zh", "hi", "ar"):
        if len(ss.language_sentences(language)) < 8:
            pytest.skip(f"too few {language} gettext sentences installed")
    ss.prepare_synthspeech(
        tmp_path, 3, 3, 3, ["zh", "hi", "ar"], seed=3, en_fraction=None
    )
    rows = _rows(tmp_path)
    for split in ss.SPLITS:
        assert sorted(r["language"] for r in rows[split]) == ["ar", "hi", "zh"]
        for r in rows[split]:
            assert 0.5 < r["duration"] < 20
            assert ss.clean_sentence(r["transcript"], r["language"])
    train_variants = {r["speaker"].split("+")[1] for r in rows["train"]}
    assert not train_variants & {
        r["speaker"].split("+")[1] for r in rows["test"]
    }


def test_cli_accepts_equal_shares():
    assert ss._fraction_or_equal("equal") is None
    assert ss._fraction_or_equal("0.5") == 0.5


def test_cli_passes_the_flite_share(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(
        ss, "prepare_synthspeech", lambda folder, **kw: seen.update(kw) or {}
    )
    assert ss.main([str(tmp_path), "--train-flite-share", "0.25"]) == 0
    assert seen["train_flite_share"] == 0.25
    assert ss.main([str(tmp_path)]) == 0
    assert seen["train_flite_share"] == 0.0


def test_cli_passes_the_training_speed_range(tmp_path, monkeypatch):
    seen = {}

    def fake_prepare(save_folder, **kwargs):
        seen.update(kwargs)
        return {}

    monkeypatch.setattr(ss, "prepare_synthspeech", fake_prepare)
    argv = [
        str(tmp_path),
        "--languages",
        "en",
        "--train-speed-range",
        "120,240",
    ]
    assert ss.main(argv) == 0
    assert seen["train_speed_range"] == [120, 240]
    assert ss.main([str(tmp_path)]) == 0
    assert seen["train_speed_range"] is None


def test_changed_options_refuse_a_folder_with_derived_data(corpus, tmp_path):
    work = tmp_path / "c"
    shutil.copytree(corpus, work)
    label = work / "features.whisper-base" / "meta.json"
    label.parent.mkdir()
    label.write_text("{}")
    plan_before = (work / ss.PLAN_FILE).read_text()
    wavs_before = sorted(p.name for p in work.rglob("*.wav"))
    with pytest.raises(RuntimeError) as err:
        ss.prepare_synthspeech(work, **(SIZES | {"num_train": 10}))
    message = str(err.value)
    assert f"num_train {SIZES['num_train']!r} -> 10" in message
    assert "features.whisper-base" in message and str(work) in message
    # nothing was replaced: the old plan, clips and cache stay
    assert (work / ss.PLAN_FILE).read_text() == plan_before
    assert sorted(p.name for p in work.rglob("*.wav")) == wavs_before
    assert label.is_file()
    # the same options still resume and skip
    assert ss.prepare_synthspeech(work, **SIZES)["train"].is_file()
