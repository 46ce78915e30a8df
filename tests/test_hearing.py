"""The hearing measurement (speechbrain_blspkd/hearing.py) with tiny models:
token accuracies at the true and predicted count, caches, and the command
end to end on a tiny exported model, a tiny SynthSpeech corpus and piper."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import needs_piper

from speechbrain_blspkd import hearing, metrics
from speechbrain_blspkd.dataprep import tts
from speechbrain_blspkd.utils.testing import tiny_speech_llm


def _rows(tmp_path, n=3):
    rng = np.random.default_rng(0)
    texts = ["the cat sat on the mat", "a dog ran", "hello world, how are you"]
    rows = []
    for i in range(n):
        path = tmp_path / f"u{i}.wav"
        samples = 4000 + 2000 * i
        sf.write(path, 0.1 * rng.standard_normal(samples), 16000)
        rows.append(
            dict(
                ID=f"u{i}",
                wav=str(path),
                duration=samples / 16000,
                transcript=texts[i % len(texts)],
                language="en",
            )
        )
    return rows


def test_token_accuracy_true_count_matches_the_objective(tmp_path):
    """At the true count the accuracy is the validation ``token_acc`` of
    the BLSP-KD objective; at the predicted count the counts are those
    that generation uses."""
    from speechbrain_blspkd.nnet.adapter import AdapterTargets
    from speechbrain_blspkd.objectives.blsp_kd import nearest_token_accuracy

    model = tiny_speech_llm().eval()
    rows = _rows(tmp_path)
    out = hearing.adapter_token_accuracy(model, rows, batch_size=2)
    # the objective's read-out on the same utterances, one by one
    correct = positions = 0
    for r in rows:
        wav = torch.as_tensor(sf.read(r["wav"], dtype="float32")[0])[None]
        ids = model.transcript_ids([r["transcript"]])[0]
        with torch.no_grad():
            told = model.encode_speech(
                wav, targets=AdapterTargets(num_tokens=torch.tensor([len(ids)]))
            )
        acc = nearest_token_accuracy(model, told, torch.tensor([ids]))
        correct += acc * len(ids)
        positions += len(ids)
    assert out["true_count"]["positions"] == positions
    assert out["true_count"]["accuracy"] == pytest.approx(correct / positions)
    # the predicted counts are generation's (one padded batch)
    from speechbrain.utils.data_utils import batch_pad_right

    wavs, lens = batch_pad_right(
        [torch.as_tensor(sf.read(r["wav"], dtype="float32")[0]) for r in rows]
    )
    _, counts = model.generate(
        wavs, lens, max_new_tokens=1, return_num_tokens=True
    )
    assert [out["predicted_counts"][r["ID"]] for r in rows] == counts.tolist()
    targets = [
        len(x) for x in model.transcript_ids([r["transcript"] for r in rows])
    ]
    predicted = [out["predicted_counts"][r["ID"]] for r in rows]
    assert out["count"] == metrics.count_stats(predicted, targets)
    assert out["predicted_count"]["positions"] == sum(
        max(p, t) for p, t in zip(predicted, targets)
    )
    assert 0 < out["collapse_rate"] <= 1


def test_adapter_without_count_has_no_true_count_accuracy(tmp_path):
    from speechbrain_blspkd.nnet.conv_subsampler import ConvSubsampler

    model = tiny_speech_llm(adapter=ConvSubsampler(64, 64, bottleneck=16))
    out = hearing.adapter_token_accuracy(model.eval(), _rows(tmp_path, 2))
    # its outputs are not one per token: no token accuracy, but the
    # collapse rate and the counts (frames, not tokens) are still there
    assert out["true_count"] is None and out["predicted_count"] is None
    assert 0 < out["collapse_rate"] <= 1 and out["count"]["n"] == 2
    assert (
        hearing.adapter_token_accuracy(
            tiny_speech_llm(whisper=False), _rows(tmp_path, 1)
        )
        is None
    )  # no encoder: nothing to read the audio with


def test_teacher_cache_is_keyed_and_checked(tmp_path):
    path = tmp_path / "teacher.json"
    rows = [dict(ID="a", transcript="one"), dict(ID="b", transcript="two")]
    decoded = [
        dict(task="repeat", utt="a", transcript="one", teacher="One."),
        dict(task="repeat", utt="b", transcript="two", teacher="Two."),
    ]
    hearing._save_teacher(path, "k1", {}, decoded)
    got, _ = hearing._load_teacher(path, "k1", rows)
    assert got == {("repeat", "a"): "One.", ("repeat", "b"): "Two."}
    # another model / prompt / limit: nothing is reused
    assert hearing._load_teacher(path, "k2", rows)[0] == {}
    # a row whose transcript changed is answered again
    rows[1]["transcript"] = "three"
    assert hearing._load_teacher(path, "k1", rows)[0] == {
        ("repeat", "a"): "One."
    }


def test_fingerprint_follows_the_weights():
    model = tiny_speech_llm(whisper=False)
    before = hearing._fingerprint("x", model.llm)
    assert before == hearing._fingerprint("x", model.llm)
    with torch.no_grad():  # PLoRA weights are not part of the base LLM
        for name, p in model.llm.named_parameters():
            if "lora_" in name:
                p.add_(1.0)
    assert hearing._fingerprint("x", model.llm) == before
    with torch.no_grad():
        model.embed_tokens.weight[0, 0] += 1.0
    assert hearing._fingerprint("x", model.llm) != before
    assert hearing._fingerprint("y", model.llm) != before
    # the same base LLM with and without PLoRA layers: the same teacher
    from speechbrain_blspkd.nnet.plora import apply_plora

    plain = tiny_speech_llm(whisper=False, plora=None).llm
    plain_key = hearing._fingerprint(plain)
    apply_plora(plain, r=4, alpha=8, dropout=0.0, scope="audio")
    assert hearing._fingerprint(plain) == plain_key


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from speechbrain_blspkd.inference.export import export_model
    from speechbrain_blspkd.utils.testing import tiny_saved_speech_llm

    tmp = tmp_path_factory.mktemp("hearing")
    model = tiny_saved_speech_llm(tmp / "bases", instruction="Continue:")
    folder = export_model(model, tmp / "run" / "model", {"max_new_tokens": 4})
    # a recipe run folder also holds the recipe's own hyperparams.yaml
    (tmp / "run" / "hyperparams.yaml").write_text("seed: 1\n")
    return {"bases": tmp / "bases", "folder": folder, "run": tmp / "run"}


def _args(exported, synth_corpus, tmp_path, *extra):
    return [
        "--model",
        str(exported["run"]),  # a run folder holding model/
        "--synth-folder",
        str(synth_corpus),
        "--piper-folder",
        str(tmp_path / "piper"),
        "--piper-num",
        "3",
        "--out",
        str(tmp_path / "out"),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--asr",
        str(exported["bases"] / "whisper"),
        "--asr-max-new-tokens",
        "4",
        "--batch-size",
        "2",
        "--max-new-tokens",
        "3",
        "--device",
        "cpu",
        *extra,
    ]


@needs_piper
def test_command_end_to_end(
    exported, synth_corpus, tmp_path, monkeypatch, capsys
):
    from speechbrain_blspkd.dataio.manifest import read_manifest
    from speechbrain_blspkd.models.speech_llm import SpeechLLMModel
    from speechbrain_blspkd.nnet.whisper_asr import WhisperTranscriber

    assert hearing.main(_args(exported, synth_corpus, tmp_path)) == 0
    printed = capsys.readouterr().out
    out = tmp_path / "out"
    results = json.loads((out / "hearing.json").read_text())
    assert (out / "hearing.md").read_text() == printed.rstrip("\n") + "\n"
    assert list(results["sets"]) == [hearing.ESPEAK_SET, hearing.PIPER_SET]
    english = [
        r
        for r in read_manifest(synth_corpus / "test.csv")
        if r["language"] == "en"
    ]
    sizes = {hearing.ESPEAK_SET: len(english), hearing.PIPER_SET: 3}
    for name, entry in results["sets"].items():
        assert entry["n"] == sizes[name], name
        assert 0 <= entry["coverage"]["token_coverage"] <= 1
        systems = entry["systems"]
        assert list(systems) == ["teacher", "speech", "cascade"]
        teacher = systems["teacher"]
        assert teacher["repeat"]["chrf"] == 100.0
        assert teacher["continue"]["wer"] == 0.0
        assert teacher["repeat"]["shuffled_chrf"] is not None
        speech = systems["speech"]
        for task in ("repeat", "continue"):
            assert speech[task]["shuffled_wer"] is not None
        assert speech["repeat_wer_vs_transcript"] is not None
        assert speech["count"]["n"] == entry["n"]
        for key in (
            "token_accuracy_true_count",
            "token_accuracy_predicted_count",
        ):
            assert 0 <= speech[key]["accuracy"] <= 1
        # the decoded rows saw the counts the accuracy was measured at
        rows = metrics.EvalSummary.load_rows(out / name / "speech_rows.jsonl")
        assert len(rows) == 2 * entry["n"]
        positions = sum(
            max(r["num_pred"], r["num_target"])
            for r in rows
            if r["task"] == "repeat"
        )
        assert (
            speech["token_accuracy_predicted_count"]["positions"] == positions
        )
        cascade = systems["cascade"]
        assert cascade["transcript_wer"] >= 0
        assert 0 <= cascade["token_accuracy_predicted_count"]["accuracy"] <= 1
        # the cascade's teacher is the same LLM on the same transcripts
        casc_rows = metrics.EvalSummary.load_rows(
            out / name / "cascade_rows.jsonl"
        )
        assert {r["id"]: r["teacher"] for r in casc_rows} == {
            r["id"]: r["teacher"] for r in rows
        }
    md = (out / "hearing.md").read_text()
    for title in hearing.SET_TITLES.values():
        assert title in md
    assert md.count("| speech LLM |") == 2 and md.count("| cascade (") == 2

    # a second run: teacher answers and the cascade come from the cache,
    # the speech LLM is measured again and gives the same figures
    def refuse(*args, **kwargs):
        raise AssertionError("should have come from the cache")

    monkeypatch.setattr(SpeechLLMModel, "generate_text", refuse)
    monkeypatch.setattr(WhisperTranscriber, "transcribe", refuse)
    monkeypatch.setattr(tts, "synthesise_piper", refuse)
    assert hearing.main(_args(exported, synth_corpus, tmp_path)) == 0
    again = json.loads((out / "hearing.json").read_text())
    assert again["sets"] == results["sets"]

    # --tokens-only: no decoding at all (the refusing patches stay), the
    # same token and count figures, only the speech row
    quick = tmp_path / "quick"
    args = _args(exported, synth_corpus, tmp_path, "--tokens-only")
    args[args.index("--out") + 1] = str(quick)
    assert hearing.main(args) == 0
    tokens = json.loads((quick / "hearing.json").read_text())
    assert tokens["decoded"] is False and tokens["cascade_asr"] is None
    for name, entry in tokens["sets"].items():
        assert list(entry["systems"]) == ["speech"]
        speech, full = entry["systems"]["speech"], results["sets"][name]
        assert entry["coverage"] == full["coverage"]
        for key in (
            "token_accuracy_true_count",
            "token_accuracy_predicted_count",
            "count",
        ):
            assert speech[key] == full["systems"]["speech"][key], key


def test_command_errors_are_one_line(tmp_path, capsys):
    assert hearing.main(["--model", str(tmp_path), "--synth-folder", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hearing: error: ") and "hyperparams.yaml" in err
