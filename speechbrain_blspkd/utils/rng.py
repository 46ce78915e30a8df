"""Random-number-generator state as a checkpoint recoverable.

speechbrain checkpoints restore weights, optimiser, schedulers and epoch
counters, but not the random generators that drive dropout.  With this
recoverable in the ``Checkpointer``, a run killed at any point and resumed
from its last checkpoint replays the same dropout masks (the data order is
already reproducible: speechbrain's sampler is seeded per epoch), so it ends
with the same weights as an uninterrupted run.

Under ``torchrun`` every rank has generators of its own (each draws its own
dropout masks), so every rank's state is saved and each rank gets its own
back: the saver runs on every rank, the states travel to the main process
through the process group (:func:`~speechbrain_blspkd.utils.distributed.
all_gather`; the other nodes need no access to the checkpoint folder) and
one file holds them in rank order.  Each rank saves and restores the CPU
generators and its own CUDA device's only (``torch.cuda.current_device()``),
never another rank's device.
"""

import logging
import random

import numpy as np
import torch
from speechbrain.utils.checkpoints import (
    mark_as_loader,
    mark_as_saver,
    register_checkpoint_hooks,
)
from speechbrain.utils.distributed import ddp_barrier, if_main_process

from speechbrain_blspkd.utils.atomic import atomic_path
from speechbrain_blspkd.utils.distributed import all_gather, rank_world

logger = logging.getLogger(__name__)

#: Format of the saved file: ``{"format": 2, "ranks": [state of rank 0,
#: ...]}``.  Format 1 (no ``format`` key) held the main process's state.
FORMAT = 2


def _cuda_in_use():
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def local_state():
    """This process's generator states: Python, NumPy, torch CPU and, when
    CUDA is in use, the current CUDA device's.

    Returns
    -------
    dict

    Example
    -------
    >>> sorted(local_state())[:3]
    ['numpy', 'python', 'torch']
    """
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if _cuda_in_use():
        device = torch.cuda.current_device()
        state["cuda_device"] = device
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_local_state(state):
    """Set this process's generators from :func:`local_state` output.

    The CUDA state (if saved and CUDA is available here) goes to this
    process's current CUDA device only.  A format-1 CUDA entry (one state
    per device) contributes the entry of that device.

    Arguments
    ---------
    state : dict
    """
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None or not torch.cuda.is_available():
        return
    device = torch.cuda.current_device()
    if isinstance(cuda, (list, tuple)):  # format 1: every device's state
        if device >= len(cuda):
            return
        cuda = cuda[device]
    torch.cuda.set_rng_state(cuda, device)


class RNGState:
    """Saves and restores the Python, NumPy, torch (and CUDA) generators of
    every rank (see the module notes).

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
        """Write every rank's generator states to ``path`` atomically.

        Call it on every rank (a collective); the main process writes, the
        others wait until the file is there.
        """
        states = all_gather(local_state())
        if if_main_process():
            with atomic_path(path) as tmp:
                torch.save({"format": FORMAT, "ranks": states}, tmp)
        ddp_barrier()

    @mark_as_loader
    def load(self, path, end_of_epoch=None):
        """Restore this rank's generator states saved in ``path``.

        A file written by another number of processes restores the states
        of the ranks it has (a warning: the run is no longer an exact
        replay); a format-1 file restores its single state on every rank.
        """
        saved = torch.load(path, weights_only=False)
        if "ranks" not in saved:
            restore_local_state(saved)
            return
        rank, world = rank_world()
        states = saved["ranks"]
        if len(states) != world:
            logger.warning(
                "%s holds the generators of %d processes, this run has %d: "
                "the resumed run will not replay the same random draws",
                path,
                len(states),
                world,
            )
        if rank < len(states):
            restore_local_state(states[rank])


# the saver gathers from every rank, so it runs on every rank
register_checkpoint_hooks(RNGState, save_on_main_only=False)
