"""The hearing measurement (speechbrain_blspkd/hearing/) with tiny models:
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
from speechbrain_blspkd.hearing.cache import load_teacher, save_teacher
from speechbrain_blspkd.teacher_answers import fingerprint
from speechbrain_blspkd.testing import tiny_speech_llm


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
    from speechbrain_blspkd.objectives.alignment import nearest_token_accuracy

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
    # the error rate reads the same tokens at N^: it scores every true
    # token, and its insertions less its deletions are the count's excess
    ter = out["error_rate_predicted_count"]
    assert ter["tokens"] == sum(targets)
    assert ter["insertions"] - ter["deletions"] == sum(predicted) - sum(targets)
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
    save_teacher(path, "k1", {}, decoded)
    got, _ = load_teacher(path, "k1", rows)
    assert got == {("repeat", "a"): "One.", ("repeat", "b"): "Two."}
    # another model / prompt / limit: nothing is reused
    assert load_teacher(path, "k2", rows)[0] == {}
    # a row whose transcript changed is answered again
    rows[1]["transcript"] = "three"
    assert load_teacher(path, "k1", rows)[0] == {("repeat", "a"): "One."}


def test_fingerprint_follows_the_weights():
    model = tiny_speech_llm(whisper=False)
    before = fingerprint("x", model.llm)
    assert before == fingerprint("x", model.llm)
    with torch.no_grad():  # PLoRA weights are not part of the base LLM
        for name, p in model.llm.named_parameters():
            if "lora_" in name:
                p.add_(1.0)
    assert fingerprint("x", model.llm) == before
    with torch.no_grad():
        model.embed_tokens.weight[0, 0] += 1.0
    assert fingerprint("x", model.llm) != before
    assert fingerprint("y", model.llm) != before
    # the same base LLM with and without PLoRA layers: the same teacher
    from speechbrain_blspkd.nnet.plora import apply_plora

    plain = tiny_speech_llm(whisper=False, plora=None).llm
    plain_key = fingerprint(plain)
    apply_plora(plain, r=4, alpha=8, dropout=0.0, scope="audio")
    assert fingerprint(plain) == plain_key


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from speechbrain_blspkd.inference.export import export_model
    from speechbrain_blspkd.testing import tiny_saved_speech_llm

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
        # both token error rates score every true token of the set (the
        # positions of the accuracy at the true count)
        true_tokens = speech["token_accuracy_true_count"]["positions"]
        for system in (speech, cascade):
            ter = system["token_error_rate_predicted_count"]
            assert ter["tokens"] == true_tokens and ter["ter"] >= 0
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
    assert "token error rate (predicted N)" in md

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
    assert "Quality ladder" not in md  # off by default

    # --ladder: the same figures plus the ladder of each set, whose rung e
    # is the speech row's repeat answer clip by clip
    laddered = tmp_path / "ladder"
    args = _args(exported, synth_corpus, tmp_path, "--ladder")
    args[args.index("--out") + 1] = str(laddered)
    assert hearing.main(args) == 0
    with_ladder = json.loads((laddered / "hearing.json").read_text())
    assert with_ladder["ladder"] is True and results["ladder"] is False
    for name, entry in with_ladder["sets"].items():
        assert entry["systems"] == results["sets"][name]["systems"]
        ladder = entry["ladder"]
        assert list(ladder["rungs"]) == list(hearing.LADDER_RUNGS)
        assert ladder["e_matches_speech_rows"] == {
            "same": entry["n"],
            "n": entry["n"],
        }
        speech_repeat = entry["systems"]["speech"]["repeat"]
        assert ladder["rungs"]["e"]["chrf"] == pytest.approx(
            speech_repeat["chrf"]
        )
        lines = (laddered / name / "ladder_rows.jsonl").read_text()
        assert len(lines.splitlines()) == entry["n"]
    table = (laddered / "hearing.md").read_text()
    assert "## Quality ladder" in table
    for key, label in hearing.LADDER_RUNGS.items():
        assert f"| {key}. {label} |" in table


def test_command_errors_are_one_line(tmp_path, capsys):
    assert hearing.main(["--model", str(tmp_path), "--synth-folder", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hearing: error: ") and "hyperparams.yaml" in err


def _direct_transcript_answers(model, rows, instruction, batch_size, limit):
    """Rung a decoded by hand: the speech prompt's slots hold the
    transcript's own token ids, the whole prompt is embedded by the LLM's
    table and generated with PLoRA on the slots (no adapter at all)."""
    from speechbrain_blspkd.models import generation
    from speechbrain_blspkd.nnet import plora

    order = sorted(rows, key=lambda r: (r["duration"], r["ID"]))
    answers = {}
    for i in range(0, len(order), batch_size):
        chunk = order[i : i + batch_size]
        ids = model.transcript_ids([r["transcript"] for r in chunk])
        prompts = model.prompts.build_batch(
            [instruction] * len(chunk), n_speech=[len(x) for x in ids]
        )
        batch = model.prompts.collate(prompts, padding_side="left")
        slots = batch["speech_mask"]
        input_ids = batch["input_ids"].clone()
        input_ids[slots] = torch.tensor([t for seq in ids for t in seq])
        with torch.no_grad():
            embeds = model.embed_tokens(input_ids)
            mask = model._student_mask(slots, batch["attention_mask"])
            with plora.plora_mask(model.llm, mask):
                options = {"max_new_tokens": limit, "num_beams": 1}
                seqs = generation.hf_generate(model, embeds, batch, options)
        for r, text in zip(chunk, generation.decode(model, seqs)):
            answers[r["ID"]] = text
    return answers


def test_quality_ladder_rungs_and_inference(tmp_path):
    """Five rungs; rung a is the transcript's embeddings decoded by hand,
    rung e the speech answer of decode_rows (same batches)."""
    from speechbrain_blspkd.evaluation import REPEAT_INSTRUCTION, decode_rows
    from speechbrain_blspkd.metrics import summarize_parity

    model = tiny_speech_llm().eval()
    rows = _rows(tmp_path)
    decoded = decode_rows(
        model,
        rows,
        {"repeat": REPEAT_INSTRUCTION},
        batch_size=2,
        max_new_tokens=4,
    )
    teacher = {r["utt"]: r["teacher"] for r in decoded}
    out = hearing.quality_ladder(
        model, rows, teacher, batch_size=2, max_new_tokens=4
    )
    assert list(out["rungs"]) == ["a", "b", "c", "d", "e"] and out["n"] == 3
    answers = {key: {r["ID"]: r[key] for r in out["rows"]} for key in "abcde"}
    # every rung is scored against the teacher with the shuffled level
    for key, rung in out["rungs"].items():
        ids = sorted(answers[key])
        agree = metrics.parity_agreement(
            [answers[key][i] for i in ids], [teacher[i] for i in ids]
        )
        assert rung["chrf"] == pytest.approx(agree["chrf"]), key
        assert rung["shuffled_chrf"] is not None
        assert rung["label"] == hearing.LADDER_RUNGS[key]
    direct = _direct_transcript_answers(
        model, rows, REPEAT_INSTRUCTION, batch_size=2, limit=4
    )
    assert answers["a"] == direct
    # rung e is inference: the speech rows' answers and chrF
    assert answers["e"] == {r["utt"]: r["hyp"] for r in decoded}
    speech = summarize_parity(decoded)["tasks"]["repeat"]["speech"]
    assert out["rungs"]["e"]["chrf"] == pytest.approx(speech["chrf"])


class _AmplitudeEncoder(torch.nn.Module):
    """One frame per clip: its first sample (each test clip is constant)."""

    def forward(self, wavs, wav_lens=None):
        feats = wavs[:, :1, None].expand(-1, -1, 64).contiguous()
        return feats, torch.ones(wavs.shape[0])


def _oracle_adapter_class():
    from speechbrain_blspkd.nnet.adapter import AdapterOutput, SpeechAdapter

    class Oracle(SpeechAdapter):
        """Emits the LLM token embeddings of the clip's transcript (clip
        ``k`` has amplitude ``0.1 (k + 1)``); without a count it drops the
        last token."""

        def __init__(self, ids):
            super().__init__()
            self.ids = ids
            self.table = None
            self.scale = 1.0

        def output_size(self):
            return 64

        def forward(self, feats, lengths=None, targets=None):
            keys = torch.round(feats[:, 0, 0] * 10).long() - 1
            rows = [self.ids[k] for k in keys.tolist()]
            if targets is None or targets.num_tokens is None:
                rows = [seq[:-1] for seq in rows]
            width = max(len(seq) for seq in rows)
            padded = torch.zeros(len(rows), width, dtype=torch.long)
            mask = torch.zeros(len(rows), width, dtype=torch.bool)
            for b, seq in enumerate(rows):
                padded[b, : len(seq)] = torch.tensor(seq)
                mask[b, : len(seq)] = True
            tokens = self.table(padded).detach() * self.scale
            return AdapterOutput(tokens, mask)

    return Oracle


def test_quality_ladder_with_token_embedding_adapter(tmp_path):
    """An adapter that outputs exactly the transcript's token embeddings:
    snapping changes nothing (b = c) and both are the transcript (= a); at
    its predicted count (one token short) snapping changes nothing either
    (d = e)."""
    texts = ["the cat sat on the mat", "a dog ran", "hello world, how are you"]
    rows = []
    for k, text in enumerate(texts):
        path = tmp_path / f"c{k}.wav"
        sf.write(path, np.full(3000 + 500 * k, 0.1 * (k + 1)), 16000)
        rows.append(
            dict(
                ID=f"c{k}",
                wav=str(path),
                duration=(3000 + 500 * k) / 16000,
                transcript=text,
                language="en",
            )
        )
    base = tiny_speech_llm(whisper=False)
    oracle = _oracle_adapter_class()(base.transcript_ids(texts))
    model = tiny_speech_llm(encoder=_AmplitudeEncoder(), adapter=oracle)
    oracle.table = model.embed_tokens
    model.eval()
    # PLoRA's B starts at zero: give the speech positions a real delta
    with torch.no_grad():
        for name, p in model.llm.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    teacher = {r["ID"]: r["transcript"] for r in rows}
    out = hearing.quality_ladder(
        model, rows, teacher, batch_size=2, max_new_tokens=5
    )
    answers = {key: [r[key] for r in out["rows"]] for key in "abcde"}
    assert answers["b"] == answers["a"] and answers["c"] == answers["a"]
    assert answers["d"] == answers["e"]
    for key in "bc":
        assert out["rungs"][key]["chrf"] == out["rungs"]["a"]["chrf"]
    # outputs three times the embeddings: the same nearest tokens, so the
    # snapped rung is still the transcript, the raw one is not
    oracle.scale = 3.0
    scaled = hearing.quality_ladder(
        model, rows, teacher, batch_size=2, max_new_tokens=5
    )
    got = {key: [r[key] for r in scaled["rows"]] for key in "abc"}
    assert got["a"] == answers["a"] and got["b"] == answers["a"]
    assert got["c"] != answers["a"]


def test_quality_ladder_skipped_without_cif(tmp_path, monkeypatch):
    from speechbrain_blspkd.models.speech_llm import SpeechLLMModel
    from speechbrain_blspkd.nnet.conv_subsampler import ConvSubsampler

    def refuse(*args, **kwargs):
        raise AssertionError("a skipped ladder decodes nothing")

    monkeypatch.setattr(SpeechLLMModel, "generate", refuse)
    rows = _rows(tmp_path, 2)
    teacher = {r["ID"]: r["transcript"] for r in rows}
    model = tiny_speech_llm(adapter=ConvSubsampler(64, 64, bottleneck=16))
    out = hearing.quality_ladder(model.eval(), rows, teacher)
    assert set(out) == {"skipped"} and "ConvSubsampler" in out["skipped"]
    no_encoder = hearing.quality_ladder(
        tiny_speech_llm(whisper=False), rows, teacher
    )
    assert set(no_encoder) == {"skipped"}
    # the CFormer of the same model family is not skipped
    monkeypatch.undo()
    cif = hearing.quality_ladder(
        tiny_speech_llm().eval(), rows, teacher, max_new_tokens=2
    )
    assert "skipped" not in cif and len(cif["rows"]) == 2
