"""precision: auto — the decision with the hardware capability mocked both
ways, explicit values winning, the log said once, and the places that use
it (Brain run options, Whisper encoder, LLM, continuations, export)."""

import logging
import subprocess
import sys

import pytest
import torch

from speechbrain_blspkd.testing import tiny_speech_llm
from speechbrain_blspkd.utils import precision


@pytest.fixture(autouse=True)
def fresh_decision():
    precision.choose.cache_clear()
    precision.set_run_device(None)
    yield
    precision.choose.cache_clear()
    precision.set_run_device(None)


def mock_cpu(monkeypatch, native, speedup=None):
    """CPU with/without native bf16; ``speedup`` the measured ratio (None:
    the benchmark must not run)."""
    monkeypatch.setattr(
        precision, "bf16_supported", lambda t: (native, f"mocked {native}")
    )

    def bench(*args, **kwargs):
        if speedup is None:
            raise AssertionError("micro-benchmark ran without bf16 support")
        return speedup

    monkeypatch.setattr(precision, "matmul_speedup", bench)


def test_cpu_without_bf16_gives_fp32_without_benchmark(monkeypatch):
    mock_cpu(monkeypatch, native=False)
    assert precision.resolve_precision("auto", "cpu") == "fp32"
    assert precision.resolve_dtype("auto", "cpu") == torch.float32
    assert "emulated" in precision.choose("cpu").reason


def test_cpu_with_fast_bf16_gives_bf16(monkeypatch):
    mock_cpu(monkeypatch, native=True, speedup=4.8)
    assert precision.resolve_precision("auto", "cpu") == "bf16"
    assert precision.resolve_dtype("auto", "cpu") == torch.bfloat16
    assert "4.80x" in precision.choose("cpu").reason


def test_cpu_reporting_bf16_but_measured_slow_gives_fp32(monkeypatch):
    # e.g. an AMX machine restricted with ONEDNN_MAX_CPU_ISA=AVX2: the
    # capability check still says yes, the kernels are emulated
    mock_cpu(monkeypatch, native=True, speedup=0.05)
    assert precision.resolve_precision("auto", "cpu") == "fp32"


@pytest.mark.parametrize("bf16, expected", [(True, "bf16"), (False, "fp32")])
def test_cuda_follows_bf16_support(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "mock GPU")
    monkeypatch.setattr(
        torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16
    )
    assert precision.resolve_precision("auto", "cuda:0") == expected


def test_explicit_values_win(monkeypatch):
    mock_cpu(monkeypatch, native=True, speedup=4.8)
    assert precision.resolve_precision("fp32", "cpu") == "fp32"
    assert precision.resolve_precision("float16", "cpu") == "fp16"
    assert precision.resolve_dtype("float32", "cpu") == torch.float32
    mock_cpu(monkeypatch, native=False)
    precision.choose.cache_clear()
    assert precision.resolve_precision("bf16", "cpu") == "bf16"
    assert precision.resolve_dtype(torch.bfloat16) == torch.bfloat16


def test_bad_values_are_refused():
    with pytest.raises(ValueError, match="expected auto, fp32, bf16"):
        precision.resolve_precision("fp8")
    with pytest.raises(ValueError, match="unknown torch dtype"):
        precision.resolve_dtype("float99")


def test_decision_logged_once_per_device(monkeypatch, caplog):
    mock_cpu(monkeypatch, native=False)
    with caplog.at_level(logging.INFO, logger=precision.__name__):
        for _ in range(3):
            precision.resolve_precision("auto", "cpu")
            precision.resolve_dtype("auto", "cpu")
    said = [r for r in caplog.records if "precision auto" in r.getMessage()]
    assert len(said) == 1
    assert "fp32" in said[0].getMessage()


def test_run_device_is_what_auto_resolves_for(monkeypatch):
    mock_cpu(monkeypatch, native=True, speedup=3.0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    precision.set_run_device("cpu")
    assert precision.resolve_dtype("auto") == torch.bfloat16
    precision.set_run_device("meta")
    assert precision.resolve_dtype("auto") == torch.float32


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_brain_run_options(monkeypatch, native, expected):
    from speechbrain_blspkd.utils.run_options import resolve_run_precision

    mock_cpu(monkeypatch, native=native, speedup=2.0 if native else None)
    opts = resolve_run_precision({"precision": "auto"}, {"device": "cpu"})
    assert opts["precision"] == expected
    assert "eval_precision" not in opts  # speechbrain's default stays
    # the command line wins over the YAML
    opts = resolve_run_precision(
        {"precision": "auto"}, {"device": "cpu", "precision": "fp32"}
    )
    assert opts["precision"] == "fp32"
    opts = resolve_run_precision(
        {"precision": "fp32", "eval_precision": "auto"}, {"device": "cpu"}
    )
    assert opts["eval_precision"] == expected


@pytest.mark.parametrize(
    "native, expected", [(True, torch.bfloat16), (False, torch.float32)]
)
def test_model_parts_follow_auto(monkeypatch, native, expected):
    from speechbrain_blspkd.nnet.whisper_encoder import WhisperEncoder
    from speechbrain_blspkd.testing import tiny_whisper_config

    mock_cpu(monkeypatch, native=native, speedup=2.0 if native else None)
    precision.set_run_device("cpu")
    encoder = WhisperEncoder(tiny_whisper_config(), dtype="auto")
    assert next(encoder.encoder.parameters()).dtype == expected

    model = tiny_speech_llm(whisper=False, llm_dtype="auto")
    assert model.embed_tokens.weight.dtype == expected
    lora = [p for n, p in model.llm.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)


def test_export_leaves_the_dtype_to_the_loading_machine():
    from speechbrain_blspkd.inference.model_config import config_from_model

    model = tiny_speech_llm(llm_dtype="bfloat16")
    config = config_from_model(model)
    assert config.get("llm_dtype", "auto") == "auto"
    assert config.get("encoder_dtype", "auto") == "auto"


def test_this_machine_decides_consistently():
    """The real decision on this CPU: fp32 whenever oneDNN has no native
    bf16 (an AVX2-only CPU); with native bf16 it follows the benchmark."""
    native, _ = precision.bf16_supported("cpu")
    choice = precision.choose("cpu")
    if not native:
        assert choice.precision == "fp32"
        assert "emulated" in choice.reason
    else:
        assert "matmul" in choice.reason


def test_restricted_isa_environment_is_never_bf16_when_slow():
    """With the kernels restricted to AVX2 (how an AMX machine reproduces
    an AVX2-only CPU) ``auto`` must not pick an emulated bf16: the
    capability check may still say yes, the benchmark then says no."""
    code = (
        "from speechbrain_blspkd.utils import precision as p\n"
        "c = p.choose('cpu')\n"
        "r = p.matmul_speedup('cpu')\n"
        "print(c.precision, r)\n"
    )
    env = {
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "PATH": "/usr/bin:/bin",
    }
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    choice, ratio = out[0], float(out[1])
    assert choice in ("fp32", "bf16")
    if choice == "bf16":
        assert ratio > 1.0


def test_parsed_run_options_keep_their_defaults_below_the_yaml(monkeypatch):
    """speechbrain's parser fills every run option with a default; only the
    given ones (and the resolved precision) may override the YAML."""
    import speechbrain as sb

    from speechbrain_blspkd.brain import SpeechLLMBrain
    from speechbrain_blspkd.testing import tiny_speech_llm
    from speechbrain_blspkd.utils.run_options import resolve_run_precision

    mock_cpu(monkeypatch, native=True, speedup=3.0)
    _, parsed, _ = sb.parse_arguments(["x.yaml", "--device=cpu"])
    hparams = {"precision": "auto", "max_grad_norm": 1.0}
    opts = resolve_run_precision(hparams, parsed)
    assert opts.precision == "bf16"  # the YAML's auto, not the parser's fp32
    brain = SpeechLLMBrain(
        modules={"model": tiny_speech_llm(whisper=False)},
        hparams=hparams,
        run_opts=opts,
    )
    assert brain.precision == "bf16"
    assert brain.max_grad_norm == 1.0  # not the parser default 5.0
    _, parsed, _ = sb.parse_arguments(["x.yaml", "--precision=fp32"])
    assert resolve_run_precision(hparams, parsed).precision == "fp32"
