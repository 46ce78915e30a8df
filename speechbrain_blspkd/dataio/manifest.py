"""The one manifest schema shared by every recipe and preparation script.

A manifest is a SpeechBrain-style CSV file, one utterance per row:

============  ========  ====================================================
column        required  meaning
============  ========  ====================================================
ID            yes       unique utterance identifier
wav           yes       audio path, usually ``$data_root/...`` so manifests
                        move between machines (SpeechBrain replacement)
duration      yes       seconds (float > 0)
transcript    yes       what is said (non-empty)
language      yes       ISO 639-1 code of the speech (``en``, ``de`` ...)
speaker       yes       speaker / voice identifier
translation   no        translation target (speech translation evaluation)
instruction   no        an instruction to pair with this utterance
answer        no        reference answer (spoken QA), ``|``-separated if many
context       no        context passage (spoken QA)
continuation  no        the teacher LLM's continuation of the transcript
truncated     no        ``1`` when the continuation hit the token limit
============  ========  ====================================================

Optional columns are always present in written files (empty when unknown),
so every manifest has the same header.  :func:`write_manifest` is the only
writer and :func:`read_manifest` the only reader; both validate.
"""

import csv
import io
import logging
import math
import pathlib

from speechbrain_blspkd.utils.atomic import atomic_write_text

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = (
    "ID",
    "wav",
    "duration",
    "transcript",
    "language",
    "speaker",
)
OPTIONAL_COLUMNS = (
    "translation",
    "instruction",
    "answer",
    "context",
    "continuation",
    "truncated",
)
COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS


class ManifestError(ValueError):
    """A manifest file is malformed; the message names the file and row."""


def _check_row(row, where):
    uid = row.get("ID", "")
    if not uid or not uid.strip():
        raise ManifestError(f"{where}: empty ID")
    if not row.get("wav", "").strip():
        raise ManifestError(f"{where} (ID {uid}): empty wav path")
    try:
        dur = float(row["duration"])
    except (TypeError, ValueError):
        raise ManifestError(
            f"{where} (ID {uid}): duration {row.get('duration')!r} is not a number"
        ) from None
    if not math.isfinite(dur) or dur <= 0:
        raise ManifestError(
            f"{where} (ID {uid}): duration must be > 0 seconds, got {dur}"
        )
    if not str(row.get("transcript", "")).strip():
        raise ManifestError(
            f"{where} (ID {uid}): empty or whitespace transcript"
        )
    if not str(row.get("language", "")).strip():
        raise ManifestError(f"{where} (ID {uid}): empty language")
    trunc = str(row.get("truncated", "") or "")
    if trunc not in ("", "0", "1"):
        raise ManifestError(
            f"{where} (ID {uid}): truncated must be empty, 0 or 1, got {trunc!r}"
        )


def write_manifest(path, rows):
    """Validate ``rows`` and write them to ``path`` atomically.

    Arguments
    ---------
    path : str or pathlib.Path
        Destination CSV file.
    rows : iterable of dict
        Each with at least the required columns; unknown keys are an error,
        missing optional columns are written empty.

    Example
    -------
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "m.csv"
    >>> write_manifest(p, [dict(ID="u1", wav="$data_root/u1.wav",
    ...     duration=1.5, transcript="hello world", language="en",
    ...     speaker="s1")])
    >>> read_manifest(p)[0]["transcript"]
    'hello world'
    """
    path = pathlib.Path(path)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    seen = set()
    for i, row in enumerate(rows):
        where = f"{path} row {i + 1}"
        extra = set(row) - set(COLUMNS)
        if extra:
            raise ManifestError(f"{where}: unknown column(s) {sorted(extra)}")
        missing = [c for c in REQUIRED_COLUMNS if c not in row]
        if missing:
            raise ManifestError(f"{where}: missing column(s) {missing}")
        out = {
            c: "" if row.get(c) is None else str(row.get(c)) for c in COLUMNS
        }
        if isinstance(row.get("truncated"), bool):
            out["truncated"] = "1" if row["truncated"] else "0"
        _check_row(out, where)
        if out["ID"] in seen:
            raise ManifestError(f"{where}: duplicate ID {out['ID']!r}")
        seen.add(out["ID"])
        writer.writerow(out)
    atomic_write_text(path, buf.getvalue())


def read_utf8(path, error=ManifestError, what="file", encoding="utf-8"):
    """The text of a UTF-8 file; a bad byte raises ``error`` naming its line.

    Arguments
    ---------
    path : str or pathlib.Path
        The file.
    error : type
        Exception raised for a missing file or a byte that is not UTF-8.
    what : str
        Name of the file in the "not found" message.
    encoding : str
        ``utf-8``, or ``utf-8-sig`` to drop a leading byte-order mark.

    Returns
    -------
    str

    Example
    -------
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "t.txt"
    >>> _ = p.write_bytes(b"ok\\n\\xff\\n")
    >>> read_utf8(p)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    speechbrain_blspkd.dataio.manifest.ManifestError: ...t.txt line 2: not valid UTF-8 (invalid start byte at byte 3)
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise error(f"{path}: {what} not found")
    raw = path.read_bytes()
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise error(
            f"{path} line {line}: not valid UTF-8 ({e.reason} at byte {e.start})"
        ) from None


def read_manifest(path, data_root=None):
    """Read and validate a manifest; return a list of row dicts.

    Arguments
    ---------
    path : str or pathlib.Path
        The CSV file.
    data_root : str, optional
        When given, ``$data_root`` in the ``wav`` column is replaced by it.

    Returns
    -------
    list of dict
        One dict per row with every column of :data:`COLUMNS` (optional
        columns missing from an older file are filled with ``""``);
        ``duration`` is a float.

    Raises
    ------
    ManifestError
        Naming the file and row for: non-UTF-8 bytes, missing required
        columns, duplicate IDs, empty transcript, bad duration.
    """
    text = read_utf8(path, what="manifest file")
    reader = csv.DictReader(io.StringIO(text))
    header = reader.fieldnames or []
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise ManifestError(
            f"{path}: missing required column(s) {missing}; header is {header}"
        )
    rows, seen = [], {}
    for i, row in enumerate(reader):
        where = f"{path} row {i + 1} (line {reader.line_num})"
        if None in row:
            raise ManifestError(f"{where}: more fields than the header has")
        row = {c: row.get(c) or "" for c in COLUMNS} | {
            k: v for k, v in row.items() if k not in COLUMNS
        }
        _check_row(row, where)
        if row["ID"] in seen:
            raise ManifestError(
                f"{where}: duplicate ID {row['ID']!r} (first at row {seen[row['ID']]})"
            )
        seen[row["ID"]] = i + 1
        row["duration"] = float(row["duration"])
        if data_root is not None:
            row["wav"] = row["wav"].replace("$data_root", str(data_root))
        rows.append(row)
    return rows


def manifest_to_dataset(path, data_root, output_keys=None):
    """Build a speechbrain ``DynamicItemDataset`` from a validated manifest.

    Arguments
    ---------
    path : str or pathlib.Path
        The manifest.
    data_root : str
        Replaces ``$data_root`` in the ``wav`` column.
    output_keys : list of str, optional
        Keys the dataset returns (default: every column).

    Example
    -------
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "m.csv"
    >>> write_manifest(p, [dict(ID="u1", wav="$data_root/u1.wav",
    ...     duration=1.0, transcript="hi", language="en", speaker="s")])
    >>> ds = manifest_to_dataset(p, "/data", ["id", "wav"])
    >>> ds[0]
    {'id': 'u1', 'wav': '/data/u1.wav'}
    """
    from speechbrain.dataio.dataset import DynamicItemDataset

    rows = read_manifest(path, data_root=data_root)
    data = {r["ID"]: {k: v for k, v in r.items() if k != "ID"} for r in rows}
    ds = DynamicItemDataset(data)
    ds.set_output_keys(
        output_keys or ["id"] + [c for c in COLUMNS if c != "ID"]
    )
    return ds


def language_index(languages, rows, source="manifest"):
    """``{code: index}`` of ``languages``, checked against manifest rows.

    Arguments
    ---------
    languages : sequence of str
        An adapter's :meth:`~speechbrain_blspkd.nnet.adapter.SpeechAdapter.language_codes` (index order).
    rows : iterable of dict
        Manifest rows (``ID`` and ``language``).
    source : str
        Name of the manifest, for the message.

    Returns
    -------
    dict
        Language code -> index.

    Raises
    ------
    ValueError
        Naming each language code of ``rows`` that ``languages`` lacks
        and the first row that has it.

    Example
    -------
    >>> rows = [dict(ID="a", language="de"), dict(ID="b", language="en")]
    >>> language_index(["en", "de"], rows)
    {'en': 0, 'de': 1}
    >>> language_index(["en"], rows, "train.csv")
    Traceback (most recent call last):
    ...
    ValueError: train.csv: language 'de' (row a) is not one of the adapter's languages ['en']; add it to the languages of the YAML or remove those rows
    """
    index = {}
    for i, code in enumerate(languages):
        if code in index:
            raise ValueError(f"language {code!r} is listed twice")
        index[str(code)] = i
    unknown = {}
    for row in rows:
        code = row["language"]
        if code not in index:
            unknown.setdefault(code, row["ID"])
    if unknown:
        named = ", ".join(f"{c!r} (row {uid})" for c, uid in unknown.items())
        which = "is not one" if len(unknown) == 1 else "are not"
        raise ValueError(
            f"{source}: language {named} {which} of the adapter's "
            f"languages {list(index)}; add it to the languages of the YAML "
            "or remove those rows"
        )
    return index
