"""The random-generator recoverable (exact resume): per-process states.

Its multi-process behaviour (each rank gets its own generators back) is
tested under ``torchrun`` in ``tests/test_rank_split.py``.
"""

import random

import numpy as np
import torch

from speechbrain_blspkd.utils.rng import RNGState


def _draws():
    return [random.random(), float(np.random.rand()), float(torch.rand(()))]


def test_only_this_process_cuda_device_is_saved_and_restored(
    monkeypatch, tmp_path
):
    """A rank on CUDA device 1 reads and sets device 1's generator only:
    never every device's (``get_rng_state_all`` / ``set_rng_state_all``
    would touch, and create contexts on, the other ranks' GPUs)."""
    calls = []

    def get_state(device="cuda"):
        calls.append(("get", device))
        return torch.tensor([7, int(device)], dtype=torch.uint8)

    def set_state(state, device="cuda"):
        calls.append(("set", device, state.tolist()))

    def every_device(*args):
        calls.append(("every device",))
        return [torch.zeros(2, dtype=torch.uint8)] * 2

    for name, value in {
        "is_available": lambda: True,
        "is_initialized": lambda: True,
        "device_count": lambda: 2,
        "current_device": lambda: 1,
        "get_rng_state": get_state,
        "set_rng_state": set_state,
        "get_rng_state_all": every_device,
        "set_rng_state_all": every_device,
    }.items():
        monkeypatch.setattr(torch.cuda, name, value)
    path = tmp_path / "rng.ckpt"
    RNGState().save(path)
    RNGState().load(path)
    assert calls == [("get", 1), ("set", 1, [7, 1])]


def test_cpu_generators_are_replayed_and_old_files_still_load(tmp_path):
    path = tmp_path / "rng.ckpt"
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    RNGState().save(path)
    first = _draws()
    RNGState().load(path)
    assert _draws() == first
    # a file of the earlier format (one state, no rank list)
    random.seed(4)
    np.random.seed(4)
    torch.manual_seed(4)
    old = tmp_path / "old.ckpt"
    torch.save(
        {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
        },
        old,
    )
    expected = _draws()
    RNGState().load(old)
    assert _draws() == expected
