"""Random-number-generator state as a checkpoint recoverable.

speechbrain checkpoints restore weights, optimiser, schedulers and epoch
counters, but not the random generators that drive dropout.  With this
recoverable in the ``Checkpointer``, a run killed at any point and resumed
from its last checkpoint replays the same dropout masks (the data order is
already reproducible: speechbrain's sampler is seeded per epoch), so it ends
with the same weights as an uninterrupted run.
"""

import random

import numpy as np
import torch
from speechbrain.utils.checkpoints import (
    mark_as_loader,
    mark_as_saver,
    register_checkpoint_hooks,
)

from speechbrain_blspkd.utils.atomic import atomic_path


@register_checkpoint_hooks
class RNGState:
    """Saves and restores the Python, NumPy, torch (and CUDA) generators.

    Example
    -------
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "rng.ckpt"
    >>> state = RNGState()
    >>> _ = torch.manual_seed(1)
    >>> state.save(path)
    >>> a = torch.rand(3)
    >>> state.load(path)
    >>> torch.equal(a, torch.rand(3))
    True
    """

    @mark_as_saver
    def save(self, path):
        """Write the generator states to ``path`` atomically."""
        state = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        with atomic_path(path) as tmp:
            torch.save(state, tmp)

    @mark_as_loader
    def load(self, path, end_of_epoch=None):
        """Restore the generator states saved in ``path``."""
        state = torch.load(path, weights_only=False)
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
