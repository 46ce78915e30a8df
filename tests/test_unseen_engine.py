"""The piper test set of held-out sentences: dataprep/unseen_engine.py."""

import json
import pathlib

import pytest
import soundfile as sf
from conftest import needs_piper

from speechbrain_blspkd.dataio.manifest import read_manifest
from speechbrain_blspkd.dataprep import synthspeech, tts, unseen_engine
from speechbrain_blspkd.metrics import normalize_text

WORDS = "one two three four five six seven eight nine ten eleven twelve"
POOL = {"en": [f"Here is sentence number {w}." for w in WORDS.split()]}


def _plan(**sizes):
    sizes = dict(dict(num_train=4, num_valid=2, num_test=2), **sizes)
    return synthspeech.make_plan(
        languages=["en"], seed=0, sentences=POOL, **sizes
    )


def _synth_folder(tmp_path, plan):
    folder = tmp_path / "synth"
    folder.mkdir()
    (folder / synthspeech.PLAN_FILE).write_text(json.dumps(plan))
    return folder


def _texts(plan, splits):
    return {
        normalize_text(u["text"])
        for u in plan["utterances"]
        if u["split"] in splits
    }


def test_held_out_sentences_are_the_test_ones_then_unused_pool():
    plan = _plan()
    test = [u["text"] for u in plan["utterances"] if u["split"] == "test"]
    assert unseen_engine.held_out_sentences(plan) == test
    assert unseen_engine.held_out_sentences(plan, num=1) == test[:1]
    more = unseen_engine.held_out_sentences(plan, num=6, pool=POOL["en"])
    assert more[:2] == test and len(set(more)) == 6
    used = _texts(plan, ("train", "valid"))
    assert not {normalize_text(t) for t in more} & used
    # the order of the extra sentences is seeded
    again = unseen_engine.held_out_sentences(plan, num=6, pool=POOL["en"])
    other = unseen_engine.held_out_sentences(
        plan, num=6, pool=POOL["en"], seed=5
    )
    assert again == more and set(other[:2]) == set(test)
    with pytest.raises(ValueError, match="only 6 held-out English"):
        unseen_engine.held_out_sentences(plan, num=7, pool=POOL["en"])


def test_overlap_with_training_text_raises():
    plan = _plan()
    test = next(u for u in plan["utterances"] if u["split"] == "test")
    # the same sentence, differently written, also in the training split
    train = next(u for u in plan["utterances"] if u["split"] == "train")
    train["text"] = test["text"].upper().replace(".", " !")
    with pytest.raises(
        unseen_engine.HeldOutError, match=r"1 test sentence\(s\) also in"
    ):
        unseen_engine.held_out_sentences(plan)
    # a validation sentence counts as seen too
    plan = _plan()
    test = next(u for u in plan["utterances"] if u["split"] == "test")
    valid = next(u for u in plan["utterances"] if u["split"] == "valid")
    valid["text"] = test["text"]
    with pytest.raises(unseen_engine.HeldOutError, match=test["text"][:10]):
        unseen_engine.held_out_sentences(plan)
    assert isinstance(unseen_engine.HeldOutError("x"), ValueError)


def test_real_synthspeech_plan_keeps_the_test_sentences_held_out(synth_corpus):
    """On the corpus the tests build (real sentence pool), the chosen
    sentences appear in no train or valid utterance."""
    plan = json.loads((synth_corpus / synthspeech.PLAN_FILE).read_text())
    chosen = unseen_engine.held_out_sentences(plan, num=8)
    assert len(chosen) == 8
    assert not {normalize_text(t) for t in chosen} & _texts(
        plan, ("train", "valid")
    )
    english_test = [
        u["text"]
        for u in plan["utterances"]
        if u["split"] == "test" and u["language"] == "en"
    ]
    assert chosen[: len(english_test)] == english_test


@needs_piper
def test_prepare_writes_resumes_and_checks(tmp_path, monkeypatch):
    plan = _plan()
    synth = _synth_folder(tmp_path, plan)
    out = tmp_path / "piper"
    manifest = unseen_engine.prepare_unseen_engine_test(
        synth, out, num=3, pool=POOL["en"]
    )
    rows = read_manifest(manifest, data_root=out)
    test = [u["text"] for u in plan["utterances"] if u["split"] == "test"]
    assert [r["transcript"] for r in rows][:2] == test
    assert [r["ID"] for r in rows] == [f"piper_en_00000{i}" for i in (1, 2, 3)]
    assert {r["speaker"] for r in rows} == {"piper:joe"}
    for r in rows:
        info = sf.info(r["wav"])
        assert (info.samplerate, info.channels) == (16000, 1)
        assert r["duration"] == pytest.approx(info.duration, abs=1e-3)

    made = []
    real = tts.synthesise_piper
    monkeypatch.setattr(
        tts, "synthesise_piper", lambda text, path, **kw: made.append(text)
    )
    # complete: nothing to do
    assert (
        unseen_engine.prepare_unseen_engine_test(
            synth, out, num=3, pool=POOL["en"]
        )
        == manifest
    )
    assert made == []
    # one wav lost (and a half-written temporary left): only it is redone
    lost = pathlib.Path(rows[1]["wav"])
    lost.unlink()
    (lost.parent / ".x.wav.123.tmp").write_bytes(b"RIFF")
    monkeypatch.setattr(tts, "synthesise_piper", real)
    unseen_engine.prepare_unseen_engine_test(synth, out, num=3, pool=POOL["en"])
    assert tts.is_complete_wav(lost)
    assert not list(out.rglob("*.tmp"))
    again = read_manifest(manifest, data_root=out)
    assert [(r["ID"], r["transcript"]) for r in again] == [
        (r["ID"], r["transcript"]) for r in rows
    ]

    # the corpus rebuilt so that a chosen sentence is now a training one:
    # the saved plan is refused
    train = next(u for u in plan["utterances"] if u["split"] == "train")
    train["text"] = test[0]
    (synth / synthspeech.PLAN_FILE).write_text(json.dumps(plan))
    with pytest.raises(unseen_engine.HeldOutError):
        unseen_engine.prepare_unseen_engine_test(
            synth, out, num=3, pool=POOL["en"]
        )


def test_missing_plan_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no SynthSpeech plan"):
        unseen_engine.prepare_unseen_engine_test(tmp_path, tmp_path / "out")
    assert unseen_engine.main([str(tmp_path)]) == 1
