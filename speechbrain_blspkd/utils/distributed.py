"""Work shared by every rank: its slice of the rows, the others' results.

speechbrain's :mod:`speechbrain.utils.distributed` says which process is
the main one (``if_main_process``) or the first of its node
(``is_local_rank_zero``), runs work on the main process only
(``run_on_main``) and offers barriers, broadcasts and tensor reductions.
Data preparation and decoding that all ranks share (teacher continuations,
the feature cache, parity decoding) need three more things, which this
module adds:

* :func:`rank_world`: this process's rank and the number of processes;
* :func:`shard` / :func:`unshard`: rank ``r`` of ``n`` takes items
  ``r, r + n, r + 2n ...`` (the ``--shard r/n`` convention of
  :mod:`speechbrain_blspkd.dataprep.continuations`), and the inverse;
* :func:`all_gather`: every rank's (picklable) result, received through
  the process group, so that no node needs another node's files;
  :func:`gather_results` runs a function on every rank and gathers its
  results, and an exception on any rank is raised on every rank (instead
  of leaving the others waiting in the next collective).

Checkpoints need one more: speechbrain's ``Checkpointer`` writes on the
main process but lets every rank list the checkpoint folder on its own
disk, so on a node that does not see the main process's folder the ranks
recover nothing (and drift apart from the main node's) and skip the
deletions whose broadcast the main process then waits for (a hang).
:class:`Checkpointer` gives every rank the main process's listing and
sends a checkpoint's files through the process group to the ranks that
cannot read them.

Inside speechbrain's main-process-only sections (``run_on_main``,
``main_process_only``, ``once_per_node``) these functions behave as in a
single process, as speechbrain's own collectives do there
(``ddp_prevent_block``): a collective that only some ranks reach would
hang.
"""

import os
import pathlib
import tempfile

import torch
from speechbrain.utils import checkpoints as sb_checkpoints
from speechbrain.utils.distributed import (
    ddp_barrier,
    ddp_broadcast,
    ddp_prevent_block,
    if_main_process,
)

__all__ = [
    "Checkpointer",
    "all_gather",
    "gather_results",
    "rank_world",
    "shard",
    "unshard",
]


def rank_world():
    """This process's rank and the number of processes.

    Returns
    -------
    (int, int)
        ``(rank, world size)``; ``(0, 1)`` without a process group or
        inside a main-process-only section.

    Example
    -------
    >>> rank_world()
    (0, 1)
    """
    if ddp_prevent_block():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def all_gather(obj):
    """Every rank's ``obj``, in rank order (a collective: all ranks call it).

    Objects travel pickled through the process group
    (``torch.distributed.all_gather_object``); with NCCL they pass through
    the rank's current CUDA device, so keep each call's payload to what
    fits there (e.g. one batch of features per call).

    Arguments
    ---------
    obj : object
        Any picklable value.

    Returns
    -------
    list
        One entry per rank; ``[obj]`` in a single process.

    Example
    -------
    >>> all_gather({"rows": 3})
    [{'rows': 3}]
    """
    rank, world = rank_world()
    if world == 1:
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


class RankError(RuntimeError):
    """Another rank failed in a step that every rank takes together."""


def gather_results(fn, *args, **kwargs):
    """Run ``fn(*args, **kwargs)`` on every rank; every rank's result.

    A collective: every rank calls it.  When ``fn`` raises on some rank,
    that rank re-raises its exception and every other rank raises
    :class:`RankError` naming the failed rank and its error, so no rank is
    left waiting for the others in a later collective.

    Arguments
    ---------
    fn : callable
        Returns a picklable value.
    *args, **kwargs
        Passed to ``fn``.

    Returns
    -------
    list
        One result per rank, in rank order.

    Example
    -------
    >>> gather_results(len, "abc")
    [3]
    """
    rank, world = rank_world()
    if world == 1:
        return [fn(*args, **kwargs)]
    try:
        result, error, failure = fn(*args, **kwargs), None, None
    except Exception as e:  # every rank must learn of it
        result, error, failure = None, f"{type(e).__name__}: {e}", e
    parts = all_gather((result, error))
    if failure is not None:
        raise failure
    failed = [(r, err) for r, (_, err) in enumerate(parts) if err is not None]
    if failed:
        other, err = failed[0]
        raise RankError(f"rank {other} failed: {err}")
    return [value for value, _ in parts]


def shard(items, rank=None, world=None):
    """The items of one rank: ``items[rank::world]``.

    Arguments
    ---------
    items : sequence
        All items, in the same order on every rank.
    rank, world : int, optional
        Default: :func:`rank_world`.

    Returns
    -------
    list

    Example
    -------
    >>> shard(list("abcde"), rank=1, world=2)
    ['b', 'd']
    """
    if rank is None or world is None:
        rank, world = rank_world()
    return list(items[rank::world])


def unshard(parts):
    """Rebuild the full list from the :func:`shard` of every rank.

    Arguments
    ---------
    parts : list of list
        ``parts[r]`` is ``shard(items, r, len(parts))``, e.g. the output of
        :func:`all_gather`.

    Returns
    -------
    list
        ``items`` in their original order.

    Example
    -------
    >>> items = list("abcde")
    >>> unshard([shard(items, r, 3) for r in range(3)]) == items
    True
    """
    world = len(parts)
    total = sum(len(p) for p in parts)
    sizes = [len(range(r, total, world)) for r in range(world)]
    if [len(p) for p in parts] != sizes:
        raise ValueError(
            f"parts of sizes {[len(p) for p in parts]} are not the rank "
            f"shards of {total} items (expected {sizes})"
        )
    return [parts[k % world][k // world] for k in range(total)]


class Checkpointer(sb_checkpoints.Checkpointer):
    """speechbrain's ``Checkpointer`` for nodes that share no disk.

    Saving is speechbrain's: the main process writes each checkpoint into
    its ``checkpoints_dir``.  Listing and loading go through the process
    group: every rank gets the main process's list of checkpoints (so all
    ranks recover the same checkpoint and delete the same ones, in step),
    and a rank that cannot read a checkpoint's files from its own disk
    receives their bytes from the main process into a temporary folder of
    its own, loads them there and deletes the folder.  With a shared disk
    the only cost is one broadcast of the listing per call.  Use it as
    speechbrain's (same arguments); every rank must call what lists or
    loads (``find_checkpoint``, ``recover_if_possible``,
    ``save_and_keep_only``), as ``Brain`` does.

    Example
    -------
    >>> import tempfile
    >>> lin = torch.nn.Linear(2, 2)
    >>> ckpt = Checkpointer(tempfile.mkdtemp(), {"lin": lin})
    >>> _ = ckpt.save_checkpoint(name="a")
    >>> with torch.no_grad():
    ...     _ = lin.weight.zero_()
    >>> ckpt.recover_if_possible().path.name, bool(lin.weight.abs().sum())
    ('CKPT+a', True)
    """

    #: suffix of a checkpoint's meta file while its parameter files are
    #: still being written (speechbrain writes the meta file first)
    PARTIAL = ".partial"

    def _save_checkpoint_metafile(self, fpath, meta=None, end_of_epoch=True):
        """Write the meta file under a temporary name; :meth:`save_checkpoint`
        renames it once every parameter file is written, so a process killed
        mid-save leaves a folder no listing finds (speechbrain lists the
        folders holding a meta file, and writes it before the files)."""
        fpath = pathlib.Path(fpath)
        partial = fpath.with_name(fpath.name + self.PARTIAL)
        saved = super()._save_checkpoint_metafile(partial, meta, end_of_epoch)
        self._pending_meta = (partial, fpath)
        return saved

    def save_checkpoint(self, *args, **kwargs):
        """speechbrain's save, listed only when complete (see above)."""
        checkpoint = super().save_checkpoint(*args, **kwargs)
        if not ddp_prevent_block():
            ddp_barrier()  # every rank's files are written
        pending, self._pending_meta = getattr(self, "_pending_meta", None), None
        if pending is not None:
            os.replace(*pending)
        return checkpoint

    def list_checkpoints(self):
        """The main process's checkpoints, on every rank (a collective)."""
        if ddp_prevent_block():
            return super().list_checkpoints()
        mine = super().list_checkpoints() if if_main_process() else None
        return ddp_broadcast(mine)

    def load_checkpoint(self, checkpoint):
        """Load ``checkpoint`` on every rank (a collective), its files sent
        by the main process to the ranks that cannot read them."""
        if ddp_prevent_block():
            return super().load_checkpoint(checkpoint)
        files = {k: pathlib.Path(v) for k, v in checkpoint.paramfiles.items()}
        missing = not all(path.is_file() for path in files.values())
        if not any(all_gather(missing)):
            return super().load_checkpoint(checkpoint)
        data = None
        if if_main_process():
            data = {name: path.read_bytes() for name, path in files.items()}
        data = ddp_broadcast(data)
        if not missing:
            return super().load_checkpoint(checkpoint)
        with tempfile.TemporaryDirectory(prefix="checkpoint.") as tmp:
            local = {}
            for name, blob in data.items():
                local[name] = pathlib.Path(tmp) / files[name].name
                local[name].write_bytes(blob)
            return super().load_checkpoint(
                checkpoint._replace(paramfiles=local)
            )
