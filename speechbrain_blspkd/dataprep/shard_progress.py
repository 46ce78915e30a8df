"""Resumable, sharded writers: their progress files and command-line options.

The teacher continuations (:mod:`speechbrain_blspkd.dataprep.continuations`)
and the stored top-k teacher (:mod:`speechbrain_blspkd.dataprep.teacher_topk`)
go through the rows of a manifest in shards and can be killed and restarted
at any time.  They share the bookkeeping held here:

* ``shard=(i, n)`` takes rows ``i, i + n, i + 2n ...`` (:func:`check_shard`,
  ``--shard i/n`` on the command line: :func:`parse_shard`);
* each shard appends to its own JSONL progress file
  (``<out>.shard<i>of<n>.progress.jsonl``, :func:`progress_path`): a first
  line ``{"_meta": settings}`` with the settings the shard runs with, then
  one JSON record per finished row, each batch flushed and synced to disk
  (:func:`append_records`);
* a restarted run reads the records back (:func:`load_progress`), cutting
  off a half-written last line and refusing a file written with other
  settings, and goes on with the rows still missing.
"""

import argparse
import json
import os
import pathlib
import signal

import torch

from speechbrain_blspkd.utils.atomic import drop_unfinished_tail
from speechbrain_blspkd.utils.cli import setup_logging

__all__ = [
    "WORKER_ERRORS",
    "add_worker_options",
    "append_records",
    "check_finished",
    "check_shard",
    "load_progress",
    "open_progress",
    "parse_shard",
    "parse_worker_args",
    "progress_path",
    "settings_line",
    "stop_for_resume_test",
]


#: What the cache writers' command lines report in one line instead of a
#: traceback: bad input or settings, a missing file, an unknown row.
WORKER_ERRORS = (RuntimeError, ValueError, KeyError, FileNotFoundError)


def check_shard(shard):
    """Return ``shard`` as ``(i, n)`` after checking ``0 <= i < n``.

    Example
    -------
    >>> check_shard((1, 2))
    (1, 2)
    >>> check_shard((2, 2))
    Traceback (most recent call last):
    ...
    ValueError: shard must be (i, n) with 0 <= i < n, got (2, 2)
    """
    i, n = shard
    if not 0 <= i < n:
        raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard}")
    return i, n


def progress_path(out, shard):
    """The progress file of ``shard = (i, n)`` of the output ``out``.

    Example
    -------
    >>> progress_path("/d/out.csv", (0, 2)).name
    'out.csv.shard0of2.progress.jsonl'
    """
    i, n = shard
    out = pathlib.Path(out)
    return out.with_name(f"{out.name}.shard{i}of{n}.progress.jsonl")


def load_progress(path, meta):
    """Return ``{ID: record}`` from a progress file, repairing a torn tail.

    Arguments
    ---------
    path : pathlib.Path
        The progress file (missing: nothing done yet).
    meta : dict
        The settings of this run; the file's first line must hold them.

    Returns
    -------
    dict
        The record of each utterance already done, by its ``ID`` (empty
        when the file is missing).

    Raises
    ------
    ValueError
        When the file was written with other settings.

    Example
    -------
    >>> import tempfile
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.progress.jsonl"
    >>> append_records(p, [{"ID": "a"}], meta={"k": 1})
    >>> _ = p.open("ab").write(b'{"ID": "b"')  # a write cut short
    >>> load_progress(p, {"k": 1})
    {'a': {'ID': 'a'}}
    """
    done = {}
    if not path.is_file():
        return done
    raw = path.read_bytes()
    good_end = 0
    lines = raw.split(b"\n")
    header_seen = False
    pos = 0
    for k, line in enumerate(lines):
        end = pos + len(line) + 1
        last = k == len(lines) - 1
        if last:  # text after the final newline is an unfinished write
            break
        try:
            rec = json.loads(line)
        except ValueError:
            break
        if not header_seen:
            if rec.get("_meta") != meta:
                raise ValueError(
                    f"{path}: progress file was written with other settings "
                    f"({rec.get('_meta')}) than this run ({meta}); delete it "
                    "to start this shard again"
                )
            header_seen = True
        else:
            done[rec["ID"]] = rec
        good_end = end
        pos = end
    drop_unfinished_tail(path, good_end)
    return done


def append_records(path, records, meta=None):
    """Append ``records`` (and first the settings line ``meta``) and sync."""
    with open(path, "ab") as f:
        if meta is not None:
            f.write(json.dumps({"_meta": meta}).encode() + b"\n")
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False).encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())


def open_progress(path, meta):
    """The records already in ``path``; a new (or empty) file gets ``meta``.

    Example
    -------
    >>> import tempfile
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.progress.jsonl"
    >>> open_progress(p, {"k": 1}), settings_line(p)
    ({}, {'k': 1})
    """
    done = load_progress(path, meta)
    if not path.is_file() or path.stat().st_size == 0:
        append_records(path, [], meta=meta)
    return done


def check_finished(path, meta, rows):
    """The records of ``path`` once every row of ``rows`` has one (else a
    ``RuntimeError`` naming the file and how many rows are missing)."""
    done = load_progress(path, meta)
    missing = [r["ID"] for r in rows if r["ID"] not in done]
    if missing:
        raise RuntimeError(
            f"{path}: {len(missing)} rows still missing (e.g. {missing[:3]})"
        )
    return done


def settings_line(path):
    """The settings (``_meta``) on the first line of ``path``; None if none."""
    with open(path, "rb") as f:
        first = f.readline()
    try:
        return json.loads(first)["_meta"]
    except (ValueError, KeyError):
        return None


def stop_for_resume_test(batches_done, stop_after_batches):
    """Kill this process (SIGKILL) once ``stop_after_batches`` are saved.

    The ``--stop-after-batches`` option of the resume tests; None never
    stops.
    """
    if stop_after_batches is not None and batches_done >= stop_after_batches:
        os.kill(os.getpid(), signal.SIGKILL)


def parse_shard(text):
    """``--shard i/n`` as ``(i, n)``.

    Example
    -------
    >>> parse_shard("1/4")
    (1, 4)
    """
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--shard must look like i/n (e.g. 0/2), got {text!r}"
        ) from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard {text}: need 0 <= i < n")
    return i, n


def add_worker_options(parser, threads_help=None):
    """Add ``--threads`` and the hidden ``--stop-after-batches`` to ``parser``.

    Example
    -------
    >>> parser = argparse.ArgumentParser()
    >>> add_worker_options(parser)
    >>> parser.parse_args(["--threads", "2"]).threads
    2
    """
    parser.add_argument("--threads", type=int, default=None, help=threads_help)
    parser.add_argument(
        "--stop-after-batches", type=int, default=None, help=argparse.SUPPRESS
    )


def parse_worker_args(parser, argv):
    """Parse ``argv``, log to the console and apply ``--threads``."""
    args = parser.parse_args(argv)
    setup_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args
