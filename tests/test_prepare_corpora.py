"""Corpus preparation scripts on miniature copies of the real layouts."""

import json
import pathlib
import shutil

import numpy as np
import pytest
import soundfile as sf
from corpus_fixtures import (
    CV,
    cv_extension,
    make_commonvoice,
    make_covost,
    make_gigaspeech,
    make_librispeech,
    make_mlqa,
    tone,
)

from speechbrain_blspkd.dataio.manifest import read_manifest
from speechbrain_blspkd.dataprep import (
    audio_mlqa,
    commonvoice,
    covost2,
    gigaspeech,
    librispeech,
)
from speechbrain_blspkd.dataprep.common import PrepareError
from speechbrain_blspkd.dataprep.preparation import options_file


def _stamp(path):
    st = pathlib.Path(path).stat()
    return st.st_ino, st.st_mtime_ns


def _check_paths(rows, root):
    for row in rows:
        assert row["wav"].startswith("$data_root/")
        path = pathlib.Path(row["wav"].replace("$data_root", str(root)))
        assert path.is_file(), row["wav"]
        info = sf.info(str(path))
        assert abs(info.frames / info.samplerate - row["duration"]) < 1e-3


# -------------------------------------------------------------- LibriSpeech
def test_librispeech_rows(tmp_path):
    data = tmp_path / "LibriSpeech"
    expected = make_librispeech(data)
    save = tmp_path / "save"
    out = librispeech.prepare_librispeech(
        data, save, splits=["dev-clean", "test-clean"]
    )
    assert set(out) == {"dev-clean", "test-clean"}
    for split, utts in expected.items():
        rows = read_manifest(save / f"{split}.csv")
        assert [r["ID"] for r in rows] == sorted(utts)
        _check_paths(rows, data)
        for row in rows:
            rel, expected_len, text = utts[row["ID"]]
            assert row["wav"] == f"$data_root/{rel}"
            assert row["duration"] == pytest.approx(expected_len, abs=0.01)
            assert row["transcript"] == text.lower()
            assert row["language"] == "en"
            assert row["speaker"] == row["ID"].split("-")[0]


def test_librispeech_idempotent_and_options(tmp_path):
    data = tmp_path / "LibriSpeech"
    make_librispeech(data)
    save = tmp_path / "save"
    librispeech.prepare_librispeech(data, save, splits=["dev-clean"])
    manifest = save / "dev-clean.csv"
    before = _stamp(manifest)
    librispeech.prepare_librispeech(data, save, splits=["dev-clean"])
    assert _stamp(manifest) == before
    # Another option redoes the work: capitals kept.
    librispeech.main(
        [str(data), str(save), "--splits", "dev-clean", "--keep-case"]
    )
    assert _stamp(manifest) != before
    rows = {r["ID"]: r for r in read_manifest(manifest)}
    assert rows["84-121123-0000"]["transcript"] == "GO DO YOU HEAR"
    assert (
        json.loads(options_file(save, "librispeech").read_text())["lowercase"]
        is False
    )
    # A deleted manifest is rewritten even with the same options.
    manifest.unlink()
    librispeech.prepare_librispeech(
        data, save, splits=["dev-clean"], lowercase=False
    )
    assert manifest.is_file()
    # skip_prep does nothing at all.
    manifest.unlink()
    assert librispeech.prepare_librispeech(data, save, skip_prep=True) == {}
    assert not manifest.exists()


def test_librispeech_bad_transcript_line(tmp_path):
    data = tmp_path / "LibriSpeech"
    make_librispeech(data)
    trans = data / "dev-clean" / "84" / "121123" / "84-121123.trans.txt"
    lines = trans.read_text().splitlines()
    trans.write_text(lines[0] + "\n84-121123-0001\n")
    with pytest.raises(PrepareError, match=r"84-121123\.trans\.txt line 2"):
        librispeech.prepare_librispeech(data, tmp_path / "s", ["dev-clean"])
    # The command line reports it in one line instead of a traceback.
    with pytest.raises(SystemExit, match=r"error: .*trans\.txt line 2"):
        librispeech.main(
            [str(data), str(tmp_path / "s"), "--splits", "dev-clean"]
        )
    trans.write_text(lines[0] + "\n99-121123-0001 WRONG SPEAKER\n")
    with pytest.raises(PrepareError, match="line 2.*does not belong"):
        librispeech.prepare_librispeech(data, tmp_path / "s", ["dev-clean"])


def test_librispeech_missing_audio(tmp_path):
    data = tmp_path / "LibriSpeech"
    make_librispeech(data)
    (data / "dev-clean" / "84" / "121123" / "84-121123-0001.flac").unlink()
    with pytest.raises(
        PrepareError,
        match=r"84-121123\.trans\.txt line 2: audio .*84-121123-0001\.flac "
        "not found",
    ):
        librispeech.prepare_librispeech(data, tmp_path / "s", ["dev-clean"])
    assert not (tmp_path / "s" / "dev-clean.csv").exists()
    assert not options_file(tmp_path / "s", "librispeech").exists()


def test_librispeech_bad_split_arguments(tmp_path):
    data = tmp_path / "LibriSpeech"
    make_librispeech(data)
    with pytest.raises(PrepareError, match="unknown split"):
        librispeech.prepare_librispeech(data, tmp_path / "s", ["dev-dirty"])
    with pytest.raises(PrepareError, match="dev-other"):
        librispeech.prepare_librispeech(data, tmp_path / "s", ["dev-other"])


# ------------------------------------------------------------- CommonVoice
def test_commonvoice_rows(tmp_path):
    data = tmp_path / "cv-corpus" / "de"
    expected = make_commonvoice(data)
    save = tmp_path / "save"
    commonvoice.prepare_commonvoice(data, save)
    for split, clips in expected.items():
        rows = read_manifest(save / f"{split}.csv")
        assert sorted(r["ID"] for r in rows) == sorted(clips)
        _check_paths(rows, data)
        for row in rows:
            rel, expected_len, sentence, client = clips[row["ID"]]
            assert row["wav"] == f"$data_root/{rel}"
            assert row["duration"] == pytest.approx(expected_len, abs=0.01)
            assert row["transcript"] == " ".join(sentence.split())
            assert row["speaker"] == client
            assert row["language"] == "de"


def test_commonvoice_language_and_idempotency(tmp_path):
    data = tmp_path / "zh-CN"
    make_commonvoice(data, {"dev": CV["dev"]}, lang="zh-CN")
    save = tmp_path / "save"
    commonvoice.prepare_commonvoice(data, save, splits="dev")
    assert read_manifest(save / "dev.csv")[0]["language"] == "zh"
    before = _stamp(save / "dev.csv")
    commonvoice.prepare_commonvoice(data, save, splits="dev")
    assert _stamp(save / "dev.csv") == before
    commonvoice.main(
        [str(data), str(save), "--splits", "dev", "--language", "yue"]
    )
    assert read_manifest(save / "dev.csv")[0]["language"] == "yue"
    with pytest.raises(PrepareError, match="not a language code"):
        commonvoice.prepare_commonvoice(data, save, "dev", language="12")


def test_commonvoice_empty_sentence_skipped(tmp_path, caplog):
    data = tmp_path / "de"
    make_commonvoice(data)
    tsv = data / "train.tsv"
    lines = tsv.read_text().splitlines()
    fields = lines[2].split("\t")
    fields[3] = "  "
    tsv.write_text("\n".join([lines[0], lines[1], "\t".join(fields)]) + "\n")
    commonvoice.prepare_commonvoice(data, tmp_path / "s", splits=["train"])
    rows = read_manifest(tmp_path / "s" / "train.csv")
    assert [r["ID"] for r in rows] == ["common_voice_de_1"]
    assert (
        f"1 line(s) with an empty sentence left out (first: {tsv} line 3)"
        in caplog.messages
    )


def test_commonvoice_malformed_tsv(tmp_path):
    data = tmp_path / "de"
    make_commonvoice(data)
    tsv = data / "dev.tsv"
    good = tsv.read_text()
    tsv.write_text(good.replace("sentence\t", "text\t", 1))
    with pytest.raises(
        PrepareError, match=r"dev\.tsv line 1: missing column.*"
    ):
        commonvoice.prepare_commonvoice(data, tmp_path / "s", ["dev"])
    tsv.write_text(good + "spkZ\tcommon_voice_de_9.mp3\tToo few\n")
    with pytest.raises(PrepareError, match=r"dev\.tsv line 3: 3 tab-separated"):
        commonvoice.prepare_commonvoice(data, tmp_path / "s", ["dev"])
    bad = good.splitlines()[1].replace("common_voice_de_3", "missing_clip")
    tsv.write_text(good + bad + "\n")
    with pytest.raises(
        PrepareError, match=r"dev\.tsv line 3: audio .*missing_clip"
    ):
        commonvoice.prepare_commonvoice(data, tmp_path / "s", ["dev"])
    tsv.write_text(good + good.splitlines()[1] + "\n")
    with pytest.raises(PrepareError, match=r"line 3: clip .* already listed"):
        commonvoice.prepare_commonvoice(data, tmp_path / "s", ["dev"])
    tsv.unlink()
    with pytest.raises(PrepareError, match=r"dev\.tsv: file not found"):
        commonvoice.prepare_commonvoice(data, tmp_path / "s", ["dev"])


def test_commonvoice_corrupt_clip(tmp_path):
    data = tmp_path / "de"
    expected = make_commonvoice(data, {"dev": CV["dev"]})
    rel = expected["dev"]["common_voice_de_3"][0]
    (data / rel).write_bytes(b"not audio at all" * 10)
    with pytest.raises(
        PrepareError, match=r"dev\.tsv line 2: cannot read audio"
    ):
        commonvoice.prepare_commonvoice(data, tmp_path / "s", ["dev"])


# ----------------------------------------------------------------- CoVoST 2
@pytest.mark.parametrize("released", [False, True])
def test_covost2_rows(tmp_path, released):
    data = tmp_path / "fr"
    expected = make_covost(data, released=released)
    save = tmp_path / "save"
    covost2.prepare_covost2(data, save, "fr", "en")
    for split in ("train", "dev", "test"):
        rows = read_manifest(save / f"{split}.csv")
        want = {
            k for k, v in expected.items() if v[4] in (split, f"{split}_covost")
        }
        assert {r["ID"] for r in rows} == want
        _check_paths(rows, data)
        for row in rows:
            rel, expected_len, sentence, translation, _ = expected[row["ID"]]
            assert row["wav"] == f"$data_root/{rel}"
            assert row["duration"] == pytest.approx(expected_len, abs=0.01)
            assert row["transcript"] == sentence
            assert row["translation"] == translation
            assert row["language"] == "fr"
            assert row["speaker"].startswith("c")


def test_covost2_per_split_file_and_errors(tmp_path, caplog):
    data = tmp_path / "fr"
    make_covost(data)
    tr = tmp_path / "covost"
    tr.mkdir()
    ext = cv_extension()
    tsv = tr / "covost_v2.fr_en.test.tsv"
    tsv.write_text(
        "path\tsentence\ttranslation\tclient_id\n"
        f"common_voice_fr_12{ext}\tOù ?\tWhere?\tc9\n"
        f"common_voice_fr_10{ext}\tBonjour.\t \tc1\n"
    )
    save = tmp_path / "save"
    covost2.prepare_covost2(
        data, save, "fr", "en", ["test"], translation_folder=tr
    )
    rows = read_manifest(save / "test.csv")
    assert [(r["ID"], r["translation"]) for r in rows] == [
        ("common_voice_fr_12", "Where?")
    ]
    assert (
        f"1 line(s) with an empty translation left out (first: {tsv} line 3)"
        in caplog.messages
    )
    (tr / "covost_v2.fr_en.test.tsv").write_text("path\tsentence\nx\ty\n")
    with pytest.raises(
        PrepareError, match=r"fr_en\.test\.tsv line 1: missing.*translation"
    ):
        covost2.prepare_covost2(
            data, tmp_path / "s2", "fr", "en", ["test"], translation_folder=tr
        )
    with pytest.raises(PrepareError, match="neither"):
        covost2.prepare_covost2(data, save, "fr", "de", ["test"])


def test_covost2_released_clip_not_in_validated(tmp_path):
    data = tmp_path / "fr"
    make_covost(data, released=True)
    lines = (data / "validated.tsv").read_text().splitlines()
    (data / "validated.tsv").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(
        PrepareError, match=r"fr_en\.tsv line 5: clip .* not in"
    ):
        covost2.prepare_covost2(data, tmp_path / "s", "fr", "en", ["test"])


# --------------------------------------------------------------- GigaSpeech
def test_gigaspeech_segments(tmp_path):
    data = tmp_path / "GigaSpeech"
    make_gigaspeech(data)
    save = tmp_path / "save"
    out = gigaspeech.prepare_gigaspeech(data, save, splits=["xs", "{DEV}", "S"])
    assert set(out) == {"XS", "DEV", "S"}
    seg_root = save / "segments"
    xs = read_manifest(save / "xs.csv")
    s = read_manifest(save / "s.csv")
    dev = read_manifest(save / "dev.csv")
    assert [r["ID"] for r in xs] == ["POD0000000001_S0000000"]
    assert [r["ID"] for r in s] == [
        "POD0000000001_S0000000",
        "POD0000000001_S0000001",
    ]
    assert [r["transcript"] for r in s] == ["hello, world.", "is it?"]
    assert [r["transcript"] for r in dev] == ["good morning!", "see you."]
    assert [r["speaker"] for r in s + dev] == ["POD0000000001"] * 2 + ["S1"] * 2
    for rows in (xs, s, dev):
        _check_paths(rows, seg_root)
    assert [r["duration"] for r in s] == pytest.approx([1.25, 1.25], abs=0.01)
    assert [r["duration"] for r in dev] == pytest.approx([1.2, 1.8], abs=0.01)
    assert xs[0]["wav"] == "$data_root/POD0000000001/POD0000000001_S0000000.wav"
    # The cut is where the metadata says: 220 Hz before 2 s, 880 Hz after.
    full = np.concatenate([tone(2.0, 220), tone(2.0, 880)])
    for row, (a, b) in zip(s, [(0.5, 1.75), (2.25, 3.5)]):
        wav, sr = sf.read(row["wav"].replace("$data_root", str(seg_root)))
        assert sr == 16000
        ref = full[round(a * 16000) : round(b * 16000)]
        assert np.abs(wav - ref).max() < 1e-3


def test_gigaspeech_resume_and_options(tmp_path):
    data = tmp_path / "GigaSpeech"
    make_gigaspeech(data)
    save = tmp_path / "save"
    gigaspeech.prepare_gigaspeech(data, save, splits=["DEV"])
    seg = save / "segments" / "YOU0000000002" / "YOU0000000002_S0000000.wav"
    manifest_before, seg_before = _stamp(save / "dev.csv"), _stamp(seg)
    gigaspeech.prepare_gigaspeech(data, save, splits=["DEV"])
    assert _stamp(save / "dev.csv") == manifest_before
    # New text options: manifest redone, finished segments reused.
    gigaspeech.main(
        [str(data), str(save), "--splits", "DEV", "--no-punctuation"]
    )
    assert _stamp(save / "dev.csv") != manifest_before
    assert _stamp(seg) == seg_before
    assert read_manifest(save / "dev.csv")[0]["transcript"] == "good morning"
    # A different rate rewrites the segments.
    gigaspeech.prepare_gigaspeech(data, save, splits=["DEV"], sample_rate=8000)
    assert sf.info(str(seg)).samplerate == 8000
    assert read_manifest(save / "dev.csv")[1]["duration"] == pytest.approx(1.8)


def test_gigaspeech_opus_and_resampling(tmp_path):
    data = tmp_path / "opus"
    make_gigaspeech(data, fmt="opus")
    gigaspeech.prepare_gigaspeech(data, tmp_path / "s1", splits=["DEV"])
    rows = read_manifest(tmp_path / "s1" / "dev.csv")
    assert [r["duration"] for r in rows] == pytest.approx([1.2, 1.8], abs=0.01)
    _check_paths(rows, tmp_path / "s1" / "segments")
    data8 = tmp_path / "wav8k"
    make_gigaspeech(data8, sample_rate=8000)
    gigaspeech.prepare_gigaspeech(data8, tmp_path / "s2", splits=["XS"])
    row = read_manifest(tmp_path / "s2" / "xs.csv", data_root="X")[0]
    wav, sr = sf.read(
        row["wav"].replace("X", str(tmp_path / "s2" / "segments"))
    )
    assert sr == 16000 and len(wav) == 20000  # 1.25 s
    spectrum = np.abs(np.fft.rfft(wav))
    assert np.argmax(spectrum) * sr / len(wav) == pytest.approx(220, abs=2)


def test_gigaspeech_malformed(tmp_path):
    data = tmp_path / "GigaSpeech"
    meta = make_gigaspeech(data)
    meta_path = data / "GigaSpeech.json"
    text = meta_path.read_text()
    meta_path.write_text(text.replace('"sid"', '"sid":', 1))
    with pytest.raises(PrepareError, match=r"GigaSpeech\.json line \d+ column"):
        gigaspeech.prepare_gigaspeech(data, tmp_path / "s", ["DEV"])

    def write(change):
        m = json.loads(json.dumps(meta))
        change(m)
        meta_path.write_text(json.dumps(m))

    write(lambda m: m["audios"][1]["segments"][0].update(text_tn="HI <FOO>"))
    with pytest.raises(
        PrepareError, match=r"audios\[1\] .*segments\[0\] .*unknown tag <FOO>"
    ):
        gigaspeech.prepare_gigaspeech(data, tmp_path / "s", ["DEV"])
    write(lambda m: m["audios"][1]["segments"][1].update(end_time=9.0))
    with pytest.raises(PrepareError, match=r"segments\[1\].*past the end"):
        gigaspeech.prepare_gigaspeech(data, tmp_path / "s", ["DEV"])
    write(lambda m: m["audios"][1]["segments"][1].pop("begin_time"))
    with pytest.raises(
        PrepareError, match=r"segments\[1\].*missing key 'begin_time'"
    ):
        gigaspeech.prepare_gigaspeech(data, tmp_path / "s", ["DEV"])
    write(lambda m: m["audios"][1].update(path="audio/nowhere.opus"))
    with pytest.raises(
        PrepareError, match=r"audios\[1\].*nowhere\.opus not found"
    ):
        gigaspeech.prepare_gigaspeech(data, tmp_path / "s", ["DEV"])
    with pytest.raises(PrepareError, match="unknown split"):
        gigaspeech.prepare_gigaspeech(data, tmp_path / "s", ["XXL"])


# --------------------------------------------------------------- Audio-MLQA
needs_tts = pytest.mark.skipif(
    shutil.which("espeak-ng") is None or shutil.which("sox") is None,
    reason="espeak-ng and sox are needed to synthesise questions",
)


@needs_tts
def test_audio_mlqa_build_resume_and_skip(tmp_path):
    expected = make_mlqa(tmp_path / "mlqa")
    save = tmp_path / "save"
    langs = ["en", "de", "zh"]
    audio_mlqa.prepare_audio_mlqa(
        tmp_path / "mlqa", save, languages=langs, max_questions=1
    )
    rows = read_manifest(save / "test.csv")
    assert [r["ID"] for r in rows] == ["en-q1en", "de-q1de", "zh-q1zh"]
    first_wav = save / "audio" / "de" / "de" / "q1de.wav"
    first = _stamp(first_wav)
    # More questions: only the new ones are synthesised.
    audio_mlqa.main(
        [
            str(tmp_path / "mlqa"),
            str(save),
            "--languages",
            *langs,
            "--max-questions",
            "2",
        ]
    )
    assert _stamp(first_wav) == first
    rows = read_manifest(save / "test.csv")
    assert len(rows) == 6
    _check_paths(rows, save / "audio")
    for row in rows:
        lang = row["language"]
        qid = row["ID"].split("-", 1)[1]
        _, question, context, answers = next(
            e for e in expected[lang] if e[0] == qid
        )
        assert row["transcript"] == question
        assert row["context"] == context
        assert row["answer"].split("|") == list(dict.fromkeys(answers))
        assert context in row["instruction"]
        assert row["speaker"] == "espeak-ng:" + audio_mlqa.VOICES[lang]
        info = sf.info(row["wav"].replace("$data_root", str(save / "audio")))
        assert (info.samplerate, info.channels, info.subtype) == (
            16000,
            1,
            "PCM_16",
        )
        assert 0.3 < row["duration"] < 10
    # Same options: nothing is redone.
    before = _stamp(save / "test.csv")
    audio_mlqa.prepare_audio_mlqa(
        tmp_path / "mlqa", save, languages=langs, max_questions=2
    )
    assert _stamp(save / "test.csv") == before


@needs_tts
def test_audio_mlqa_rewrites_incomplete_wav(tmp_path):
    make_mlqa(
        tmp_path / "mlqa", layout={"en": [("Ctx.", [("q1", "Why?", ["x"])])]}
    )
    wav = tmp_path / "save" / "audio" / "en" / "en-us" / "q1.wav"
    wav.parent.mkdir(parents=True)
    wav.write_bytes(b"RIFF")  # e.g. copied in half
    audio_mlqa.prepare_audio_mlqa(
        tmp_path / "mlqa", tmp_path / "save", languages="en"
    )
    assert sf.info(str(wav)).frames > 1000


def test_audio_mlqa_tts_errors_name_the_program_and_question(tmp_path):
    make_mlqa(
        tmp_path / "mlqa", layout={"en": [("Ctx.", [("q1", "Why?", ["x"])])]}
    )
    with pytest.raises(PrepareError, match="^no-such-sox not found; install"):
        audio_mlqa.prepare_audio_mlqa(
            tmp_path / "mlqa", tmp_path / "s", languages="en", sox="no-such-sox"
        )
    if shutil.which("espeak-ng") and shutil.which("sox"):
        with pytest.raises(
            PrepareError, match=r"qas\[0\]: espeak-ng failed .*exit 1"
        ):
            audio_mlqa.prepare_audio_mlqa(
                tmp_path / "mlqa",
                tmp_path / "s",
                languages="en",
                voices={"en": "zzzz"},
            )
    assert not (tmp_path / "s" / "test.csv").exists()


def test_audio_mlqa_malformed(tmp_path):
    root = tmp_path / "mlqa"
    make_mlqa(root, layout={"en": [("C", [("q1", "Q?", ["a"])])]})
    path = root / "MLQA_V1" / "test" / "test-context-en-question-en.json"
    good = json.loads(path.read_text())
    path.write_text('{"data": [\n  {"paragraphs": [}\n]}')
    with pytest.raises(PrepareError, match=r"question-en\.json line 2 column"):
        audio_mlqa.prepare_audio_mlqa(root, tmp_path / "s", languages=["en"])
    del good["data"][0]["paragraphs"][0]["qas"][0]["question"]
    path.write_text(json.dumps(good))
    with pytest.raises(
        PrepareError,
        match=r"data\[0\]\.paragraphs\[0\]\.qas\[0\]: missing key 'question'",
    ):
        audio_mlqa.prepare_audio_mlqa(root, tmp_path / "s", languages=["en"])
    with pytest.raises(
        PrepareError, match=r"question-de\.json: file not found"
    ):
        audio_mlqa.prepare_audio_mlqa(root, tmp_path / "s", languages=["de"])
    with pytest.raises(PrepareError, match="no espeak-ng voice known"):
        audio_mlqa.prepare_audio_mlqa(root, tmp_path / "s", languages=["xx"])
    assert not (tmp_path / "s" / "test.csv").exists()


# ------------------------------------------------------------ Command lines
@pytest.mark.parametrize(
    "module, folder, options",
    [
        (librispeech, "LibriSpeech", ["--splits", "dev-clean"]),
        (commonvoice, "Common Voice", ["--splits", "dev"]),
        (covost2, "Common Voice", ["--src", "fr", "--tgt", "en"]),
        (gigaspeech, "GigaSpeech", ["--splits", "DEV"]),
        (audio_mlqa, "MLQA", ["--languages", "en"]),
    ],
)
def test_command_line_names_a_missing_data_folder(
    tmp_path, module, folder, options
):
    # Every script's command line turns the error into one line that names
    # the folder, and writes nothing.
    missing = tmp_path / "no" / "such"
    save = tmp_path / "save"
    with pytest.raises(SystemExit) as stop:
        module.main([str(missing), str(save), *options])
    assert str(stop.value) == (
        f"error: {folder} data folder {missing} does not exist or is not "
        "a folder"
    )
    assert not save.exists()
