"""Tests of the SynthSpeech corpus builder (espeak-ng + sox)."""

import json
import shutil

import pytest
import soundfile as sf
from conftest import SYNTH_SIZES, resume_synthspeech

from speechbrain_blspkd.dataio.manifest import read_manifest
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
    ss._write_mo(tmp_path / "x.mo", cat)
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
