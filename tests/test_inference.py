"""Export -> SpeechLLM.from_hparams -> generation, CLI and error paths."""

import json
import os
import pathlib
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from speechbrain_blspkd.assets.paths import resolve_source  # noqa: E402
from speechbrain_blspkd.dataio.audio import AudioError, load_audio  # noqa: E402
from speechbrain_blspkd.inference.cli import main as cli_main  # noqa: E402
from speechbrain_blspkd.inference.export import (  # noqa: E402
    export_model,
    render_hparams,
)
from speechbrain_blspkd.inference.model_folder import (  # noqa: E402
    ModelFolderError,
    file_sha256,
)
from speechbrain_blspkd.models.trainable import (  # noqa: E402
    WeightsMismatchError,
    trainable_state_dict,
)
from speechbrain_blspkd.testing import (  # noqa: E402
    tiny_saved_speech_llm as _tiny_model,
)

REPO = pathlib.Path(__file__).resolve().parents[1]
CPU = {"device": "cpu"}
GEN = dict(max_new_tokens=6)


def _load(folder, **kwargs):
    from speechbrain_blspkd.inference import SpeechLLM

    return SpeechLLM.from_hparams(source=folder, run_opts=CPU, **kwargs)


def _wav(path, seconds, seed, sr=16000, channels=1):
    rng = np.random.default_rng(seed)
    data = (0.1 * rng.standard_normal((int(seconds * sr), channels))).astype(
        "float32"
    )
    sf.write(path, data, sr)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inference")
    model = _tiny_model(tmp / "bases", seed=0, instruction="Repeat:")
    # fp32 like the model it is compared with (dtype auto picks bf16 on a
    # CPU with AMX, where a random tiny model's greedy tokens can differ)
    folder = export_model(
        model,
        tmp / "model",
        {"max_new_tokens": 4, "llm_dtype": None, "encoder_dtype": None},
    )
    wavs = [
        _wav(tmp / "a.wav", 0.6, 1),
        _wav(tmp / "b.wav", 0.35, 2),
    ]
    return {"model": model, "folder": folder, "wavs": wavs, "tmp": tmp}


@pytest.fixture(scope="module")
def loaded(exported):
    return _load(exported["folder"])


def test_template_is_rendered_defaults():
    text = (REPO / "hparams" / "speech_llm.yaml").read_text(encoding="utf-8")
    assert text == render_hparams(), (
        "hparams/speech_llm.yaml is stale: run "
        "`python -m speechbrain_blspkd.inference.export`"
    )


def test_export_folder_contents(exported):
    folder = exported["folder"]
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "export.json",
        "hyperparams.yaml",
        "model.ckpt",
    ]
    info = json.loads((folder / "export.json").read_text())
    assert info["files"]["model.ckpt"]["sha256"] == file_sha256(
        folder / "model.ckpt"
    )
    assert info["config"]["adapter_options"]["n_post"] == 1
    # no leftover temporary folders beside the export
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]


def test_weights_equal_after_load(exported, loaded):
    want = trainable_state_dict(exported["model"])
    got = trainable_state_dict(loaded.model)
    assert sorted(want) == sorted(got)
    assert any(k.startswith("plora.") for k in want)
    for key in want:
        assert torch.equal(want[key], got[key]), key
    assert loaded.model.instruction == "Repeat:"


def test_generate_file_matches_model(exported, loaded):
    path = exported["wavs"][0]
    wav = load_audio(path)
    direct = exported["model"].generate(wav[None], torch.ones(1), **GEN)[0]
    assert loaded.generate_file(path, **GEN) == direct
    other = exported["model"].generate(
        wav[None], torch.ones(1), instructions="Say:", **GEN
    )[0]
    assert loaded.generate_file(path, instruction="Say:", **GEN) == other


def test_generate_batch_matches_one_by_one(exported, loaded):
    wavs = [load_audio(p) for p in exported["wavs"]]
    singles = [loaded.generate_batch(w[None], **GEN)[0] for w in wavs]
    assert loaded.generate_files(exported["wavs"], **GEN) == singles
    batch = torch.zeros(2, wavs[0].numel())
    batch[0] = wavs[0]
    batch[1, : wavs[1].numel()] = wavs[1]
    lens = torch.tensor([1.0, wavs[1].numel() / wavs[0].numel()])
    assert loaded.generate_batch(batch, lens, **GEN) == singles


def test_generate_text_matches_model(exported, loaded):
    text = "the cat sat on the mat"
    want = exported["model"].generate_text([text], **GEN)[0]
    assert loaded.generate_text(text, **GEN) == want
    assert loaded.generate_text([text, "a dog"], **GEN)[0] == want


def test_generation_defaults_from_hparams(exported, loaded):
    path = exported["wavs"][0]
    assert loaded.hparams.max_new_tokens == 4
    assert loaded.hparams.num_beams == 1
    wav = load_audio(path)[None]
    ids = exported["model"].generate(wav, max_new_tokens=4, return_ids=True)
    assert 0 < len(ids[0]) <= 4
    want = exported["model"].generate(wav, max_new_tokens=4)
    assert loaded.generate_file(path) == want[0]
    beams = exported["model"].generate(wav, max_new_tokens=4, num_beams=2)
    assert loaded.generate_file(path, num_beams=2) == beams[0]


def test_cli_prints_answers(exported, loaded, capsys):
    folder, (a, b) = exported["folder"], exported["wavs"]
    want = loaded.generate_file(a, **GEN)
    code = cli_main(
        ["--model", str(folder), "--wav", str(a), "--max-new-tokens", "6"]
    )
    assert code == 0
    assert capsys.readouterr().out == want + "\n"
    text_want = loaded.generate_text("a dog ran", **GEN)
    code = cli_main(
        [
            "--model", str(folder), "--wav", str(a), "--wav", str(b),
            "--text", "a dog ran", "--max-new-tokens", "6", "--device", "cpu",
        ]
    )  # fmt: skip
    assert code == 0
    # split on newlines only: an answer may hold other line-break characters
    lines = capsys.readouterr().out.split("\n")[:-1]
    answers = loaded.generate_files([a, b], **GEN)
    assert lines == [
        f"{a}: {answers[0]}",
        f"{b}: {answers[1]}",
        f"a dog ran: {text_want}",
    ]


def test_cli_bad_inputs(exported, capsys):
    folder = exported["folder"]
    missing = exported["tmp"] / "missing.wav"
    # a bad input fails alone (exit 1), named, before the model loads
    assert cli_main(["--model", str(folder), "--wav", str(missing)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "missing.wav" in err[0] and "1 failed" in err[-1]
    assert len(err) == 2
    nowhere = exported["tmp"] / "nowhere"
    assert cli_main(["--model", str(nowhere), "--text", "x"]) == 2
    assert "nowhere" in capsys.readouterr().err
    if not torch.cuda.is_available():
        argv = ["--model", str(folder), "--text", "x", "--device", "cuda"]
        assert cli_main(argv) == 2
        assert "CUDA" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli_main(["--model", str(folder)])
    assert exc.value.code == 2


def test_audio_errors(exported, loaded):
    tmp = exported["tmp"]
    with pytest.raises(AudioError, match="missing.wav"):
        loaded.generate_file(tmp / "missing.wav")
    empty = tmp / "empty.wav"
    sf.write(empty, np.zeros((0, 1), "float32"), 16000)
    with pytest.raises(AudioError, match="empty.wav"):
        loaded.generate_file(empty)
    corrupt = tmp / "corrupt.wav"
    corrupt.write_bytes(b"RIFF not really a wav")
    with pytest.raises(AudioError, match="corrupt.wav"):
        loaded.generate_file(corrupt)
    long = _wav(tmp / "long.wav", 31, 3, sr=8000)
    with pytest.raises(AudioError, match="long.wav"):
        loaded.generate_file(long)
    with pytest.raises(ValueError, match="max_audio_seconds"):
        loaded.generate_batch(torch.zeros(1, 16000 * 31))


def test_resampled_stereo_input_matches(exported, loaded, caplog):
    stereo = _wav(exported["tmp"] / "stereo.wav", 0.5, 4, sr=8000, channels=2)
    wav = load_audio(stereo)
    want = loaded.generate_batch(wav[None], **GEN)[0]
    with caplog.at_level("WARNING"):
        assert loaded.generate_file(stereo, **GEN) == want
    assert "resampling" in caplog.text


def test_missing_files_named(exported):
    bad = exported["tmp"] / "no_ckpt"
    shutil.copytree(exported["folder"], bad)
    (bad / "model.ckpt").unlink()
    with pytest.raises(ModelFolderError, match="model.ckpt"):
        _load(bad)
    (bad / "hyperparams.yaml").unlink()
    with pytest.raises(ModelFolderError, match="hyperparams.yaml"):
        _load(bad)


def test_corrupted_weights_named(exported):
    bad = exported["tmp"] / "corrupt_ckpt"
    shutil.copytree(exported["folder"], bad)
    (bad / "model.ckpt").write_bytes(b"garbage")
    with pytest.raises(ModelFolderError, match="model.ckpt.*sha256"):
        _load(bad)
    (bad / "export.json").unlink()  # a hand-assembled folder
    with pytest.raises(WeightsMismatchError, match="model.ckpt"):
        _load(bad)


def test_mismatched_hparams_named(exported):
    bad = exported["tmp"] / "mismatch"
    shutil.copytree(exported["folder"], bad)
    path = bad / "hyperparams.yaml"
    text = path.read_text()
    assert "\n  n_post: 1\n" in text
    path.write_text(text.replace("\n  n_post: 1\n", "\n  n_post: 2\n"))
    with pytest.raises(WeightsMismatchError, match="model.ckpt.*adapter"):
        _load(bad)


def test_export_is_atomic(exported, monkeypatch):
    tmp = exported["tmp"] / "atomic"
    tmp.mkdir()
    model = exported["model"]
    with pytest.raises(FileExistsError):
        export_model(model, exported["folder"])

    def boom(self, path):
        raise RuntimeError("interrupted")

    from speechbrain_blspkd.models.trainable import TrainableWeights

    monkeypatch.setattr(TrainableWeights, "save", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        export_model(model, tmp / "model")
    assert list(tmp.iterdir()) == []
    monkeypatch.undo()
    (tmp / "model").mkdir()
    (tmp / "model" / "stale.txt").write_text("old")
    folder = export_model(model, tmp / "model", overwrite=True)
    assert not (folder / "stale.txt").exists()
    assert (folder / "model.ckpt").is_file()
    assert [p.name for p in tmp.iterdir()] == ["model"]


def test_config_overrides_and_unknown_keys(exported):
    tmp = exported["tmp"] / "cfg"
    folder = export_model(
        exported["model"],
        tmp,
        {
            "max_new_tokens": 3,
            "prompts": {"instruction": "Answer <this>: '2 * 6'"},
        },
    )
    llm = _load(folder)
    assert llm.hparams.max_new_tokens == 3
    assert llm.model.instruction == "Answer <this>: '2 * 6'"
    assert llm.model.audio_instruction is None
    llm = _load(folder, overrides={"prompts": {"audio_instruction": "<s>"}})
    assert llm.model.audio_instruction == "<s>"
    assert llm.model.instruction == "Answer <this>: '2 * 6'"
    with pytest.raises(ValueError, match="n_posts"):
        export_model(exported["model"], tmp / "x", {"n_posts": 2})
    with pytest.raises(ValueError, match="instrution"):
        export_model(
            exported["model"], tmp / "x", {"prompts": {"instrution": "a"}}
        )


def test_resolve_source(tmp_path):
    assert resolve_source(tmp_path) == tmp_path
    with pytest.raises(FileNotFoundError, match="nope"):
        resolve_source(tmp_path / "nope")
    with pytest.raises(ValueError):
        resolve_source("")


def test_every_method_exports_and_loads(tmp_path):
    """Export + from_hparams for each adapter and for the cascade: the
    loaded model answers exactly like the one exported."""
    import torch

    from speechbrain_blspkd.inference import SpeechLLM
    from speechbrain_blspkd.nnet.conv_subsampler import ConvSubsampler
    from speechbrain_blspkd.nnet.qformer import QFormer
    from speechbrain_blspkd.testing import tiny_cascade

    wav = torch.randn(1, 12000) * 0.1
    adapters = {
        "conv": ConvSubsampler(64, 64, bottleneck=16),
        "qformer": QFormer(
            64, 64, num_queries=3, num_layers=1, num_heads=4, ffn_size=128
        ),
    }
    for name, adapter in adapters.items():
        model = _tiny_model(tmp_path / name / "bases", adapter=adapter)
        model.eval()
        want = model.generate(wav, max_new_tokens=5)
        folder = export_model(model, tmp_path / name / "model")
        loaded = SpeechLLM.from_hparams(source=str(folder))
        assert type(loaded.model.adapter) is type(adapter), name
        assert loaded.generate_batch(wav, max_new_tokens=5) == want, name
    # the cascade: a saved random recogniser and LLM
    cascade = tiny_cascade()
    bases = tmp_path / "cascade" / "bases"
    cascade.llm.save_pretrained(bases / "llm")
    cascade.tokenizer.save_pretrained(bases / "llm")
    cascade.transcriber.model.save_pretrained(bases / "asr")
    cascade.transcriber.tokenizer.save_pretrained(bases / "asr")
    from speechbrain_blspkd.models.cascade import CascadeModel
    from speechbrain_blspkd.nnet.whisper_asr import WhisperTranscriber

    cascade = CascadeModel(
        str(bases / "llm"),
        WhisperTranscriber(str(bases / "asr"), max_new_tokens=4),
    )
    want = cascade.generate(wav, max_new_tokens=5)
    folder = export_model(cascade, tmp_path / "cascade" / "model")
    loaded = SpeechLLM.from_hparams(source=str(folder))
    assert isinstance(loaded.model, CascadeModel)
    assert loaded.generate_batch(wav, max_new_tokens=5) == want


def test_cascade_transcribes_the_same_speech_once(monkeypatch):
    """Evaluation answers each clip to several instructions: the cascade
    reuses the transcripts of the same audio (and only of the same)."""
    import torch

    from speechbrain_blspkd.testing import tiny_cascade

    cascade = tiny_cascade()
    calls = []
    real = cascade.transcriber.transcribe

    def counting(wavs, wav_lens=None, languages=None):
        calls.append(wavs.shape[0])
        return real(wavs, wav_lens)

    monkeypatch.setattr(cascade.transcriber, "transcribe", counting)
    wavs = torch.randn(2, 8000) * 0.1
    first = cascade.generate(wavs, instructions="Repeat:", max_new_tokens=2)
    cascade.generate(wavs, instructions="Continue:", max_new_tokens=2)
    assert calls == [2]
    cascade.generate(wavs * 0.5, instructions="Repeat:", max_new_tokens=2)
    assert calls == [2, 2]
    again = cascade.generate(wavs, instructions="Repeat:", max_new_tokens=2)
    assert again == first


def test_snap_speech_is_exported_and_snaps_only_generation(exported, tmp_path):
    """snap_speech: generation feeds the LLM its own embedding of each
    speech vector's nearest token; the flag survives export and loading,
    and the loaded model answers as the model does."""
    model = exported["model"]
    path = exported["wavs"][0]
    wav = load_audio(path)
    model.eval()
    with torch.no_grad():
        raw = model.encode_speech(wav[None], torch.ones(1))
    snapped = model.snapped(raw)
    table, _ = model.embedding_table(raw.tokens.device)
    ids = (
        torch.nn.functional.normalize(raw.tokens.float(), dim=-1) @ table.T
    ).argmax(-1)
    assert torch.equal(snapped.tokens, model.embed_tokens(ids))
    assert not torch.equal(snapped.tokens, raw.tokens)
    model.snap_speech = True
    try:
        want = model.generate(wav[None], torch.ones(1), **GEN)[0]
        folder = export_model(
            model,
            tmp_path / "snap",
            {"max_new_tokens": 4, "llm_dtype": None, "encoder_dtype": None},
        )
    finally:
        model.snap_speech = False
    info = json.loads((folder / "export.json").read_text())
    assert info["config"]["snap_speech"] is True
    loaded = _load(folder)
    assert loaded.model.snap_speech
    assert loaded.generate_file(path, **GEN) == want
    # the default export does not snap
    assert (
        json.loads((exported["folder"] / "export.json").read_text())["config"][
            "snap_speech"
        ]
        is False
    )
