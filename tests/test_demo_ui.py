"""The browser demo's backend (no browser): input checks, streamed answers
equal to SpeechLLM's, the cascade, the CIF plot, several models."""

import os

import numpy as np
import pytest
import soundfile as sf
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from speechbrain_blspkd.inference import demo_ui  # noqa: E402
from speechbrain_blspkd.inference.demo_ui import (  # noqa: E402
    DemoBackend,
    DemoInputError,
)
from speechbrain_blspkd.inference.demo_ui import (  # noqa: E402
    backend as demo_backend,
)
from speechbrain_blspkd.inference.demo_ui import cli as demo_cli  # noqa: E402
from speechbrain_blspkd.inference.export import export_model  # noqa: E402
from speechbrain_blspkd.testing import (  # noqa: E402
    tiny_saved_speech_llm,
    write_speechlike_wav,
)

CPU = {"device": "cpu"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from speechbrain_blspkd.inference import SpeechLLM
    from speechbrain_blspkd.nnet.conv_subsampler import ConvSubsampler
    from speechbrain_blspkd.nnet.whisper_asr import WhisperTranscriber

    tmp = tmp_path_factory.mktemp("demo")
    cif = tiny_saved_speech_llm(tmp / "cif", seed=0, instruction="Repeat:")
    conv = tiny_saved_speech_llm(
        tmp / "conv", seed=1, adapter=ConvSubsampler(64, 64, bottleneck=16)
    )
    folders = [
        export_model(cif, tmp / "cif" / "model", {"max_new_tokens": 6}),
        export_model(conv, tmp / "conv" / "model", {"max_new_tokens": 6}),
    ]
    models = [
        (f.parent.name, SpeechLLM.from_hparams(source=f, run_opts=CPU))
        for f in folders
    ]
    asr = WhisperTranscriber(tmp / "cif" / "whisper", max_new_tokens=8)
    backend = DemoBackend(models, asr, plot_dir=tmp / "plots")
    clip = write_speechlike_wav(tmp / "clip.wav", 1.2)
    return {"backend": backend, "models": models, "tmp": tmp, "clip": clip}


def test_bad_input_gets_a_message(setup):
    backend, tmp = setup["backend"], setup["tmp"]
    with pytest.raises(DemoInputError, match="No audio"):
        backend.load_clip(None)
    silent = tmp / "silent.wav"
    sf.write(silent, np.zeros(16000, "float32"), 16000)
    with pytest.raises(DemoInputError, match="silent .no signal"):
        backend.load_clip(silent)
    quiet = tmp / "quiet.wav"
    sf.write(quiet, np.full(16000, 1e-4, "float32"), 16000)
    with pytest.raises(DemoInputError, match=r"silent .peak -8\d dBFS"):
        backend.load_clip(quiet)
    long = write_speechlike_wav(tmp / "long.wav", 40, sample_rate=8000)
    with pytest.raises(DemoInputError, match="40.0 s long.*at most 30 s"):
        backend.load_clip(long)
    fake = tmp / "fake.wav"
    fake.write_text("this is a note, not audio\n")
    with pytest.raises(DemoInputError, match="'fake.wav' is not an audio"):
        backend.load_clip(fake)
    empty = tmp / "empty.wav"
    sf.write(empty, np.zeros((0, 1), "float32"), 16000)
    with pytest.raises(DemoInputError, match="empty"):
        backend.load_clip(empty)
    # a request with bad input yields one state: the message, no answers
    states = [dict(s) for s in backend.respond(str(fake), "Repeat:")]
    assert len(states) == 1
    assert states[0]["status"].startswith("**Cannot answer:**")
    assert states[0]["answers"] == ["", ""]


def test_answers_stream_and_equal_generate_file(setup):
    backend, clip = setup["backend"], setup["clip"]
    wav = backend.load_clip(clip)
    for i, (_, llm) in enumerate(setup["models"]):
        for instruction in (None, "Say it again:"):
            pieces = list(backend.stream_answer(i, wav, instruction))
            want = llm.generate_file(clip, instruction=instruction)
            assert pieces[-1] == want
            # streamed token by token: the partial texts grow to the answer
            assert len(pieces) >= 3, pieces
            for a, b in zip(pieces[:-1], pieces[1:]):
                assert b.strip().startswith(a.strip()), (a, b)
            assert pieces[-2].strip() == want.strip()


def test_a_request_answers_every_model_and_the_cascade(setup):
    backend, clip = setup["backend"], setup["clip"]
    states = []
    for state in backend.respond(str(clip), "Say it again:"):
        states.append(
            {k: list(v) if isinstance(v, list) else v for k, v in state.items()}
        )
    final = states[-1]
    assert final["status"].startswith("**Done** in")
    wav = backend.load_clip(clip)
    transcript = backend.transcribe(wav)
    for i, (_, llm) in enumerate(setup["models"]):
        assert final["answers"][i] == llm.generate_file(
            clip, instruction="Say it again:"
        )
        if transcript.strip():
            assert final["cascade"][i] == llm.generate_text(
                transcript, "Say it again:"
            )
    assert final["transcript"] == (transcript or "(Whisper heard nothing)")
    # the CIF model has its plot, the convolutional one none
    assert backend.has_cif == [True, False]
    assert final["plots"][0].read_bytes()[:4] == b"\x89PNG"
    assert final["plots"][1] is None
    # the answers appeared step by step ("", partial texts, the final one)
    assert len({s["answers"][0] for s in states}) > 2


def test_a_failing_model_leaves_a_message_not_a_dead_server(setup, monkeypatch):
    backend, clip = setup["backend"], setup["clip"]

    def boom(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    llm = setup["models"][0][1]
    monkeypatch.setattr(llm, "generate_waveforms", boom)
    states = list(backend.respond(str(clip), None))
    assert "Something went wrong" in states[-1]["status"]
    assert "out of memory" in states[-1]["status"]
    monkeypatch.undo()
    assert list(backend.respond(str(clip), None))[-1]["status"].startswith(
        "**Done**"
    )


def test_page_builds_with_one_column_per_model(setup):
    pytest.importorskip("gradio", reason="gradio (the demo extra) missing")
    app = demo_ui.build_app(setup["backend"], ["Tell me more:"])
    ids = {getattr(block, "elem_id", None) for block in app.blocks.values()} - {
        None
    }
    assert {"audio", "instruction", "answer", "status", "transcript"} <= ids
    assert {"answer-0", "answer-1", "cascade-0", "cif-0", "cif-1"} <= ids
    dropdown = next(
        b for b in app.blocks.values() if b.elem_id == "instruction"
    )
    choices = [c[0] if isinstance(c, tuple) else c for c in dropdown.choices]
    assert choices[0] == "Tell me more:" and "Repeat:" in choices


def test_command_line_errors(tmp_path, capsys):
    assert demo_ui.main(["--model", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    args = demo_ui.build_parser().parse_args(
        ["--model", "a", "--asr", "none", "--port", "0"]
    )
    assert demo_cli._asr_source(args, []) is None
    assert demo_cli._labels(["x/model", "y/model", "z/other", "z/other"]) == [
        "x/model",
        "y/model",
        "other (3)",
        "other (4)",
    ]


def test_cif_plot_function(tmp_path):
    out = demo_ui.plot_cif_over_waveform(
        torch.randn(16000),
        16000,
        torch.full((50,), 0.2),
        [4, 9, 14],
        ["a", "b"],
        50.0,
        tmp_path / "p.png",
        title="t",
    )
    assert out.read_bytes()[:4] == b"\x89PNG"


def _method_model(method, folder):
    """A tiny exported model of ``method`` (adapters not in ``setup``)."""
    from speechbrain_blspkd.nnet.audio_embedding import AudioEmbedding
    from speechbrain_blspkd.nnet.qformer import QFormer
    from speechbrain_blspkd.nnet.whisper_encoder import WhisperLogMel
    from speechbrain_blspkd.testing import tiny_language_aware_qformer

    options = {"instruction": "Repeat:"}
    if method == "qformer":
        options["adapter"] = QFormer(
            64, 64, num_queries=4, num_layers=1, num_heads=4, ffn_size=128
        )
    elif method == "lad":
        options["adapter"] = tiny_language_aware_qformer(("en", "de"))
    else:  # aura: log-mel front end, no Whisper encoder at inference
        options["adapter"] = AudioEmbedding(80, 64, stride=4, out_init_std=0.3)
        options["encoder"] = WhisperLogMel()
    model = tiny_saved_speech_llm(folder, seed=2, **options)
    return export_model(model, folder / "model", {"max_new_tokens": 5})


@pytest.mark.parametrize("method", ["qformer", "lad", "aura"])
def test_every_method_answers_through_the_page_backend(method, setup, tmp_path):
    from speechbrain_blspkd.inference import SpeechLLM

    llm = SpeechLLM.from_hparams(
        source=_method_model(method, tmp_path), run_opts=CPU
    )
    backend = DemoBackend([(method, llm)], None, plot_dir=tmp_path / "plots")
    clip = setup["clip"]
    pieces = list(backend.stream_answer(0, backend.load_clip(clip), None))
    assert pieces, method
    assert pieces[-1] == llm.generate_file(clip)


def _record_plots(monkeypatch):
    """Keep the arguments of each CIF plot the page draws."""
    calls = []
    real_plot = demo_backend.plot_cif_over_waveform

    def record(*args, **kwargs):
        calls.append(kwargs)
        return real_plot(*args, **kwargs)

    monkeypatch.setattr(demo_backend, "plot_cif_over_waveform", record)
    return calls


def test_cif_plot_marks_token_timings_of_the_transcript(
    setup, tmp_path, monkeypatch
):
    from speechbrain_blspkd.nnet import whisper_decoder

    loads = []
    real_teacher = whisper_decoder.WhisperDecoderTeacher

    def counted(*args, **kwargs):
        loads.append(args)
        return real_teacher(*args, **kwargs)

    monkeypatch.setattr(whisper_decoder, "WhisperDecoderTeacher", counted)
    models, asr = setup["models"], setup["backend"].transcriber
    backend = DemoBackend(models, asr, plot_dir=tmp_path / "plots")
    calls = _record_plots(monkeypatch)
    wav = backend.load_clip(setup["clip"])
    assert loads == []  # lazily, not with the server
    # no transcript: the plot as before, and no decoder is loaded for it
    assert backend.cif_plot(0, wav).read_bytes()[:4] == b"\x89PNG"
    assert calls[-1]["token_timings"] is None
    assert calls[-1]["timing_labels"] is None
    assert loads == []
    # a transcript: one (start, end) per LLM token of it, in order
    llm = models[0][1]
    for text in ("the cat sat on the mat", "a dog"):
        path = backend.cif_plot(0, wav, transcript=text)
        assert path.read_bytes()[:4] == b"\x89PNG"
        timings = calls[-1]["token_timings"]
        ids = llm.model.prompts.transcript_ids(text)
        assert timings.shape == (len(ids), 2)
        assert len(calls[-1]["timing_labels"]) == len(ids)
        seconds = wav.numel() / 16000
        assert bool((timings[1:, 0] >= timings[:-1, 0]).all())
        assert 0 <= float(timings[0, 0]) and float(timings[-1, 1]) <= seconds
    assert len(loads) == 1  # once per server
    assert backend.cif_plot(0, wav, transcript="  ") is not None
    assert calls[-1]["token_timings"] is None
    # a non-CIF model draws nothing and needs no decoder
    assert backend.cif_plot(1, wav, transcript="the cat") is None
    # a request: the final CIF plot has the timings of Whisper's transcript
    monkeypatch.setattr(backend, "transcribe", lambda wav: "the cat sat")
    calls.clear()
    final = list(backend.respond(str(setup["clip"]), "Repeat:"))[-1]
    assert final["status"].startswith("**Done**")
    assert [c["token_timings"] is None for c in calls] == [True, False]
    want = len(llm.model.prompts.transcript_ids("the cat sat"))
    assert calls[-1]["token_timings"].shape == (want, 2)
    assert final["plots"][0].name == f"cif-0-{backend._count}.png"
    assert final["plots"][1] is None
    assert len(loads) == 1


def test_cif_plot_without_timings_when_they_cannot_be_had(
    setup, tmp_path, monkeypatch
):
    import json
    import shutil

    models = setup["models"][:1]
    calls = _record_plots(monkeypatch)
    clip = str(setup["clip"])
    # --asr none: no transcript, so no timings
    backend = DemoBackend(models, None, plot_dir=tmp_path / "a")
    assert list(backend.respond(clip, None))[-1]["status"].startswith("**Done")
    assert [c["token_timings"] for c in calls] == [None]
    assert backend._teachers == {}
    # a Whisper without alignment heads: no timings, no error on the page
    llm = models[0][1]
    bare = tmp_path / "whisper-bare"
    shutil.copytree(llm.hparams.encoder_source, bare)
    config = json.loads((bare / "generation_config.json").read_text())
    config.pop("alignment_heads")
    (bare / "generation_config.json").write_text(json.dumps(config))
    monkeypatch.setattr(llm.hparams, "encoder_source", str(bare))
    backend = DemoBackend(models, None, plot_dir=tmp_path / "b")
    monkeypatch.setattr(backend, "transcriber", setup["backend"].transcriber)
    monkeypatch.setattr(backend, "transcribe", lambda wav: "the cat sat")
    calls.clear()
    states = [dict(s) for s in backend.respond(clip, None)]
    assert states[-1]["status"].startswith("**Done**")
    assert not any("timing" in s["status"] for s in states)
    assert [c["token_timings"] for c in calls] == [None]
    assert backend.timing_teacher(0) is None
    # no encoder source (not a pretrained Whisper): nothing is loaded
    monkeypatch.setattr(llm.hparams, "encoder_source", None)
    backend = DemoBackend(models, None, plot_dir=tmp_path / "c")
    wav = backend.load_clip(clip)
    backend.cif_plot(0, wav, transcript="the cat sat")
    assert calls[-1]["token_timings"] is None
    assert backend._teachers == {}
