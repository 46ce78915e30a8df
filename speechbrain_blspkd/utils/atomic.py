"""Atomic file writing: a file either holds its complete content or is absent.

Everything this project writes that a rerun trusts (manifests, converted
weights, generated audio, checkpoints of generation) goes through these
helpers, so that a run killed at any point never leaves a half-written file
that looks complete.  :func:`read_jsonl` reads such a JSONL file back;
:func:`read_json` reads a record that is remade when it cannot be read.
"""

import contextlib
import json
import os
import pathlib
import tempfile


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; rename it over ``path`` on success.

    The temporary file lives in the same folder (same filesystem) so the final
    ``os.replace`` is atomic.  On an exception the temporary file is removed
    and ``path`` is left untouched.

    Arguments
    ---------
    path : str or pathlib.Path
        The final destination.

    Example
    -------
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> with atomic_path(d / "x.txt") as tmp:
    ...     _ = pathlib.Path(tmp).write_text("hello")
    >>> (d / "x.txt").read_text()
    'hello'
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=".tmp", dir=path.parent
    )
    os.close(fd)
    try:
        yield pathlib.Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text, encoding="utf-8"):
    """Write ``text`` to ``path`` atomically.

    Example
    -------
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "a" / "b.txt"
    >>> atomic_write_text(p, "ok")
    >>> p.read_text()
    'ok'
    """
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding=encoding) as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_bytes(path, data):
    """Write ``data`` (bytes) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def remove_stray_tmp(folder, pattern=".*.tmp", recursive=True):
    """Delete the temporary files that killed writers left in ``folder``.

    :func:`atomic_path` names its temporary files ``.<name>.<random>.tmp``
    beside their destination; a run killed mid-write leaves one behind
    (never a half-written destination). Resumable writers call this on
    start.

    Arguments
    ---------
    folder : str or pathlib.Path
        Where to look (nothing happens when it does not exist).
    pattern : str
        Glob of the temporary files, relative to ``folder``.
    recursive : bool
        Also look in every subfolder.

    Returns
    -------
    int
        The number of files removed.

    Example
    -------
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / ".a.wav.x1.tmp").write_text("half")
    >>> _ = (d / "a.wav").write_text("whole")
    >>> remove_stray_tmp(d), sorted(p.name for p in d.iterdir())
    (1, ['a.wav'])
    """
    folder = pathlib.Path(folder)
    found = folder.rglob(pattern) if recursive else folder.glob(pattern)
    removed = 0
    for p in list(found):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed += 1
    return removed


def drop_unfinished_tail(path, keep, what="an unfinished last line"):
    """Cut ``path`` to its first ``keep`` bytes, durably (append-only logs).

    Resumable writers append whole lines; a run killed mid-append leaves a
    partial last line, which the reader drops before appending again.

    Arguments
    ---------
    path : str or pathlib.Path
        The file.
    keep : int
        Bytes to keep (the end of the last complete line).
    what : str
        How the dropped bytes are named in the log.

    Example
    -------
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "log.jsonl"
    >>> _ = p.write_bytes(b'{"a": 1}\\n{"b"')
    >>> drop_unfinished_tail(p, 9); p.read_bytes()
    b'{"a": 1}\\n'
    """
    import logging

    size = os.path.getsize(path)
    if keep >= size:
        return
    logging.getLogger(__name__).warning(
        "%s: dropping %d bytes of %s", path, size - keep, what
    )
    with open(path, "r+b") as f:
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())


def read_json(path):
    """The JSON value in ``path``; None when it is missing or unreadable.

    For the records a run remakes when they cannot be trusted (a saved
    plan, a cache of answers, an options record): a missing file, one that
    is not UTF-8, and one that is not JSON all read as None. A file that
    must exist is read with ``json.loads`` and its own error.

    Arguments
    ---------
    path : str or pathlib.Path
        The file.

    Example
    -------
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "plan.json"
    >>> read_json(p) is None
    True
    >>> _ = p.write_text('{"options": {"n": 2}}')
    >>> read_json(p)
    {'options': {'n': 2}}
    >>> _ = p.write_text('{"options": ')
    >>> read_json(p) is None
    True
    """
    try:
        return json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
        return None


def read_jsonl(path):
    """The JSON objects of a JSONL file, one a non-blank line.

    Arguments
    ---------
    path : str or pathlib.Path
        The file (UTF-8); blank lines are skipped.

    Returns
    -------
    list
        The decoded lines, in file order.

    Raises
    ------
    ValueError
        On a line that is not JSON, naming ``path:line``.

    Example
    -------
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "rows.jsonl"
    >>> _ = p.write_text('{"a": 1}\\n\\n{"b": 2}\\n')
    >>> read_jsonl(p)
    [{'a': 1}, {'b': 2}]
    >>> _ = p.write_text('{"a": 1}\\n{"b"\\n')
    >>> read_jsonl(p)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: ...rows.jsonl:2: invalid JSON line (...)
    """
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path}:{lineno}: invalid JSON line ({err})"
                ) from err
    return rows
