"""The answers file of ``blspkd-infer``: JSON lines, appended, resumable.

:class:`JsonlWriter` appends one whole line per answer (synced, so an
interruption can only cut the last line) to a file, or writes to stdout;
:func:`read_done_ids` reads back the ids a file already answers, cutting a
truncated last line first, so that a rerun goes on where a run stopped.

Authors
 * speechbrain-blspkd contributors 2025
"""

import json
import logging
import os
import pathlib
import sys

from speechbrain_blspkd.utils.atomic import drop_unfinished_tail

__all__ = ["JsonlWriter", "read_done_ids"]

logger = logging.getLogger(__name__)


def read_done_ids(path):
    """Ids already answered in a JSON-lines output; repair its end.

    A last line without its newline (a write interrupted mid-line) is cut
    off the file, so appending goes on from a complete line. Lines that are
    not JSON objects with an ``id`` are ignored (with a warning).

    Arguments
    ---------
    path : str or pathlib.Path
        The ``--out`` file (missing: nothing done).

    Returns
    -------
    set of str
        The ids of the complete records.

    Example
    -------
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "out.jsonl"
    >>> _ = p.write_text('{"id": "a", "answer": "x"}\\n{"id": "b", "ans')
    >>> sorted(read_done_ids(p)), p.read_text()
    (['a'], '{"id": "a", "answer": "x"}\\n')
    """
    path = pathlib.Path(path)
    if not path.is_file():
        return set()
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    drop_unfinished_tail(path, end, "a truncated last line")
    done = set()
    for number, line in enumerate(data[:end].split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
            done.add(str(record["id"]))
        except (ValueError, KeyError, TypeError):
            logger.warning(
                "%s line %d: not an answer record; ignored", path, number
            )
    return done


class JsonlWriter:
    """Appends JSON lines to a file (each line whole, synced) or stdout.

    Arguments
    ---------
    path : str or pathlib.Path, optional
        The file (created when missing; None: stdout).
    overwrite : bool
        Empty the file first.

    Example
    -------
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "out.jsonl"
    >>> with JsonlWriter(p) as out:
    ...     out.write([{"id": "a", "answer": "ü"}])
    >>> p.read_text(encoding="utf-8")
    '{"id": "a", "answer": "ü"}\\n'
    """

    def __init__(self, path=None, overwrite=False):
        self.path = None if path is None else pathlib.Path(path)
        self._fd = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
            if overwrite:
                flags |= os.O_TRUNC
            self._fd = os.open(self.path, flags, 0o644)

    def write(self, records):
        """Write ``records`` (dicts), one line each, and sync.

        Arguments
        ---------
        records : list of dict
            JSON-serialisable records.
        """
        lines = [
            json.dumps(r, ensure_ascii=False, default=str) + "\n"
            for r in records
        ]
        if self._fd is None:
            sys.stdout.write("".join(lines))
            sys.stdout.flush()
            return
        for line in lines:
            data = line.encode("utf-8")
            # one write per line: an interruption can only cut the last one
            while data:
                written = os.write(self._fd, data)
                data = data[written:]
        os.fsync(self._fd)

    def close(self):
        """Close the file."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
