"""Sequences longer than the LLM context: a clear error before any work.

The limit is the LLM's ``max_position_embeddings`` (a tiny Llama with a
small one here). Checked in the training data preparation (teacher and
student sequences of every KD / valid / test row), in parity decoding
(text prompts up front, speech prompts with the adapter's predicted count)
and in the inference interface (files, clips, texts). Each error names the
file and the row, the token count and the limit; a sequence of exactly the
limit passes.
"""

import numpy as np
import pytest
import soundfile as sf
import torch

from speechbrain_blspkd.dataio.manifest import write_manifest
from speechbrain_blspkd.dataio.pipelines import dataio_prepare
from speechbrain_blspkd.evaluation import decode_rows
from speechbrain_blspkd.prompt import (
    ContextLengthError,
    PromptBuilder,
    context_limit,
)
from speechbrain_blspkd.testing import build_test_tokenizer

LIMIT = 128
INSTRUCTION = "Continue:"


def _tiny(limit=LIMIT, whisper=False, **kwargs):
    from transformers import LlamaConfig, LlamaForCausalLM

    from speechbrain_blspkd.models.speech_llm import SpeechLLMModel
    from speechbrain_blspkd.nnet.cformer import CFormer
    from speechbrain_blspkd.nnet.whisper_encoder import WhisperEncoder
    from speechbrain_blspkd.testing import (
        tiny_llm_config,
        tiny_whisper_config,
    )

    torch.manual_seed(0)
    tok = build_test_tokenizer()
    config = tiny_llm_config(tok, max_position_embeddings=limit)
    llm = LlamaForCausalLM(LlamaConfig(**config))
    adapter = CFormer(64, 64, n_pre=1, n_post=1, nhead=4, d_ffn=128)
    encoder = WhisperEncoder(tiny_whisper_config()) if whisper else None
    return SpeechLLMModel(
        llm,
        adapter,
        encoder=encoder,
        tokenizer=tok,
        instruction=INSTRUCTION,
        plora=dict(r=4, alpha=8, dropout=0.0, scope="audio"),
        **kwargs,
    )


@pytest.fixture(scope="module")
def model():
    return _tiny()


def _row(uid, transcript, continuation="", truncated="0"):
    return dict(
        ID=uid,
        wav=f"$data_root/{uid}.wav",
        duration=1.0,
        transcript=transcript,
        language="en",
        speaker="s1",
        continuation=continuation,
        truncated=truncated,
    )


def test_context_limit_reads_the_llm_config(model):
    assert context_limit(model.llm) == LIMIT
    assert context_limit(model.llm.config) == LIMIT
    assert context_limit(object()) is None


def test_sequence_lengths_are_the_built_lengths():
    builder = PromptBuilder(build_test_tokenizer(), system_prompt="Be brief.")
    transcripts = ["the cat sat", " a dog ", "", "hello world, how are you"]
    conts = ["on the mat.", "", "ran", "fine"]
    eot = [True, False, True, False]
    for instruction in ("Repeat:", "Say {transcript} again", None):
        got = builder.sequence_lengths(
            instruction, transcripts, continuations=conts, add_eot=eot
        )
        want = [
            len(builder.build(instruction, t, None, c, e).input_ids)
            for t, c, e in zip(transcripts, conts, eot)
        ]
        assert got == want
        gen = builder.sequence_lengths(instruction, transcripts, None)
        assert gen == [
            len(builder.build(instruction, t).input_ids) for t in transcripts
        ]
        speech = builder.sequence_lengths(
            instruction, n_speech=[0, 3, 7], max_new_tokens=5
        )
        assert speech == [
            len(builder.build(instruction, n_speech=n).input_ids) + 5
            for n in (0, 3, 7)
        ]


def test_check_rows_teacher_student_boundary_and_truncation():
    builder = PromptBuilder(build_test_tokenizer())
    rows = [
        _row("short", "a b", "c"),
        _row("long", "the cat sat on the mat", "and the dog ran to the park"),
        _row("cut", "the cat sat on the mat", "and the dog ran to the park"),
    ]
    rows[2]["truncated"] = "1"  # no end-of-turn tokens after it
    lengths = builder.check_rows(1000, rows, INSTRUCTION)
    suffix = len(builder._template(INSTRUCTION).suffix)
    assert suffix > 0 and lengths[1] == lengths[2] + suffix
    assert lengths[1] == len(
        builder.build(
            INSTRUCTION,
            rows[1]["transcript"],
            None,
            "and the dog ran to the park",
        ).input_ids
    )
    # exactly the limit fits; one less names the file, row, count, limit
    assert builder.check_rows(lengths[1], rows, INSTRUCTION) == lengths
    with pytest.raises(ContextLengthError) as err:
        builder.check_rows(lengths[1] - 1, rows, INSTRUCTION, source="kd.csv")
    msg = str(err.value)
    assert msg.startswith("kd.csv: row 'long': the text (teacher) sequence")
    assert f"has {lengths[1]} tokens" in msg
    assert f"context of {lengths[1] - 1} positions" in msg
    assert "'cut'" not in msg  # the truncated row is one token shorter
    # the student's own (longer) instruction is checked on its own
    audio = "Listen to the speech and continue it in the same style:"
    longest = builder.check_rows(1000, rows, INSTRUCTION, audio)
    assert longest[1] > lengths[1] and longest[1] > longest[0]
    with pytest.raises(ContextLengthError, match=r"'long': the speech \("):
        builder.check_rows(longest[1] - 1, rows, INSTRUCTION, audio)
    # several rows too long: the first is detailed, the others listed
    with pytest.raises(ContextLengthError, match=r"'long'.*1 more.*'cut'"):
        builder.check_rows(lengths[0], rows, INSTRUCTION)
    assert builder.check_rows(None, rows, INSTRUCTION) == []


def _hparams(tmp_path, model, kd_rows):
    base = [_row("u1", "the cat sat", "on the mat.")]
    paths = {}
    for key, rows in (
        ("train_manifest", base),
        ("train_csv", kd_rows),
        ("valid_csv", base),
        ("test_csv", base),
    ):
        paths[key] = str(tmp_path / f"{key}.csv")
        write_manifest(paths[key], rows)
    return dict(
        paths,
        stages=_stages(paths),
        data_root=str(tmp_path),
        sample_rate=16000,
        max_audio_seconds=30,
        sorting="ascending",
        model=model,
    )


def _stages(paths):
    from speechbrain.utils.epoch_loop import EpochCounter

    from speechbrain_blspkd.stages import Stage

    return [
        Stage(
            "align", None, paths["train_manifest"], EpochCounter(1), {}, 1e-3
        ),
        Stage("kd", None, paths["train_csv"], EpochCounter(1), {}, 1e-3),
    ]


def test_dataio_prepare_stops_on_a_row_longer_than_the_llm(model, tmp_path):
    long_text = "the quick brown fox jumps over the lazy dog " * 6
    rows = [
        _row("ok1", "the cat sat", "on the mat."),
        _row("toolong", "a dog ran to the park", long_text),
        _row("ok2", "hello world", "how are you today?"),
    ]
    hparams = _hparams(tmp_path, model, rows)
    need = model.prompts.sequence_lengths(
        INSTRUCTION,
        [r["transcript"] for r in rows],
        continuations=[r["continuation"] for r in rows],
    )
    assert need[1] > LIMIT >= max(need[0], need[2])
    with pytest.raises(ContextLengthError) as err:
        dataio_prepare(hparams)
    msg = str(err.value)
    assert msg.startswith(f"{hparams['train_csv']}: row 'toolong'")
    assert f"{need[1]} tokens" in msg and f"{LIMIT} positions" in msg
    # the same manifest passes with an LLM that takes exactly that length
    model.llm.config.max_position_embeddings = need[1]
    try:
        datasets = dataio_prepare(hparams)
    finally:
        model.llm.config.max_position_embeddings = LIMIT
    assert len(datasets["kd"]) == 3
    # the valid / test manifests are checked too
    hparams["test_csv"] = hparams["train_csv"]
    hparams["train_csv"] = hparams["valid_csv"]
    hparams["stages"] = _stages(hparams)
    with pytest.raises(ContextLengthError, match=r"test_csv|train_csv"):
        dataio_prepare(hparams)


class _FeatureCache:
    """Fixed encoder features per utterance (what FeatureCache.get gives)."""

    def __init__(self, frames):
        g = torch.Generator().manual_seed(1)
        self.feats = {
            uid: torch.randn(n, 64, generator=g) for uid, n in frames.items()
        }

    def get(self, uid):
        return self.feats[uid]


def _rows(**transcripts):
    return [
        dict(ID=uid, transcript=t, duration=1.0, language="en", wav="")
        for uid, t in transcripts.items()
    ]


def test_decode_rows_checks_text_prompts_before_decoding(model, monkeypatch):
    rows = _rows(a="the cat sat", b="the quick brown fox jumps " * 4)
    tasks = {"repeat": "Repeat:", "continue": INSTRUCTION}
    cache = _FeatureCache({"a": 20, "b": 20})
    text = model.prompts.sequence_lengths(
        "Repeat:", [r["transcript"] for r in rows]
    )

    def never(*args, **kwargs):
        raise AssertionError("decoding started before the check")

    monkeypatch.setattr(model, "generate", never)
    monkeypatch.setattr(model, "generate_text", never)
    new = LIMIT - text[1] + 1
    assert text[0] + new <= LIMIT
    with pytest.raises(ContextLengthError) as err:
        decode_rows(
            model,
            rows,
            tasks,
            max_new_tokens=new,
            feature_cache=cache,
            source="test.csv",
        )
    msg = str(err.value)
    assert msg.startswith("test.csv: row 'b': the text (teacher) sequence")
    assert f"max_new_tokens {new}" in msg and f"{LIMIT} positions" in msg


def test_decode_rows_checks_the_predicted_speech_length(model):
    rows = _rows(a="hi")
    cache = _FeatureCache({"a": 80})
    model.eval()
    n_pred = int(model.encode_speech(feats=cache.get("a")[None]).num_tokens)
    speech = model.prompts.sequence_lengths("Repeat:", n_speech=[n_pred])[0]
    text = model.prompts.sequence_lengths("Repeat:", ["hi"])[0]
    assert speech > text  # the speech prompt is the longer one here
    tasks = {"repeat": "Repeat:"}
    with pytest.raises(ContextLengthError) as err:
        decode_rows(
            model,
            rows,
            tasks,
            max_new_tokens=LIMIT - speech + 1,
            feature_cache=cache,
            source="test.csv",
        )
    msg = str(err.value)
    assert msg.startswith("test.csv: row 'a': the speech (student) sequence")
    assert f"speech {n_pred} " in msg and f"{LIMIT} positions" in msg
    out = decode_rows(
        model,
        rows,
        tasks,
        max_new_tokens=LIMIT - speech,
        feature_cache=cache,
        source="test.csv",
    )
    assert [r["id"] for r in out] == ["a/repeat"]
    assert out[0]["num_pred"] == n_pred


@pytest.fixture(scope="module")
def interface(tmp_path_factory):
    from speechbrain_blspkd.inference import SpeechLLM
    from speechbrain_blspkd.inference.export import export_model
    from speechbrain_blspkd.testing import (
        tiny_saved_speech_llm as _tiny_model,
    )

    tmp = tmp_path_factory.mktemp("ctx")
    folder = export_model(_tiny_model(tmp / "bases"), tmp / "model")
    llm = SpeechLLM.from_hparams(source=folder, run_opts={"device": "cpu"})
    llm.model.llm.config.max_position_embeddings = LIMIT
    wav = tmp / "long.wav"
    rng = np.random.default_rng(0)
    sf.write(wav, (0.1 * rng.standard_normal(16000)).astype("float32"), 16000)
    return llm, wav


def test_speech_llm_names_the_file_too_long(interface):
    llm, wav = interface
    model = llm.model
    model.eval()
    audio = llm.load_file(wav)[None]
    n_pred = int(model.encode_speech(audio, torch.ones(1)).num_tokens)
    prompt = model.prompts.sequence_lengths(
        model._instructions(None, 1, audio=True), n_speech=[n_pred]
    )[0]
    fits = LIMIT - prompt
    assert fits > 0
    with pytest.raises(ContextLengthError) as err:
        llm.generate_file(wav, max_new_tokens=fits + 1)
    msg = str(err.value)
    assert msg.startswith(f"file {str(wav)!r}: the speech (student)")
    assert f"{LIMIT + 1} tokens" in msg and f"{LIMIT} positions" in msg
    assert isinstance(llm.generate_file(wav, max_new_tokens=fits), str)
    # a batch: the half clip fits, the full one (index 1) does not
    batch = torch.zeros(2, audio.shape[1])
    batch[0, :8000], batch[1] = audio[0, :8000], audio[0]
    with pytest.raises(ContextLengthError, match=r"^clip #1: "):
        llm.generate_batch(
            batch, torch.tensor([0.5, 1.0]), max_new_tokens=fits + 1
        )


def test_speech_llm_text_too_long(interface):
    llm, _ = interface
    prompts = llm.model.prompts
    text = "the quick brown fox jumps over the lazy dog"
    n = prompts.sequence_lengths(
        llm.model._instructions(None, 1), [text], max_new_tokens=0
    )[0]
    with pytest.raises(ContextLengthError) as err:
        llm.generate_text(["a b", text], max_new_tokens=LIMIT - n + 1)
    msg = str(err.value)
    assert msg.startswith("text #1: the text (teacher) sequence")
    assert f"{LIMIT + 1} tokens" in msg
    assert isinstance(llm.generate_text(text, max_new_tokens=LIMIT - n), str)
