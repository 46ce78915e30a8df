"""Reading a corpus for its manifests, with errors that name the file and line.

The pieces every corpus script (:mod:`speechbrain_blspkd.dataprep.
librispeech`, ``commonvoice``, ``covost2``, ``gigaspeech``, ``audio_mlqa``)
reads its corpus with: folder and split checks, tab-separated and JSON
files, audio durations, the warning about lines left out, and the manifest
row they all write.  Anything malformed raises :class:`PrepareError` naming
the file and the line (or the JSON location) at fault.  The course of a
preparation run (skip it when done, write the manifests atomically, record
the options) is :mod:`speechbrain_blspkd.dataprep.preparation`.
"""

import json
import pathlib
import re

import soundfile as sf

from speechbrain_blspkd.dataio.manifest import read_utf8


class PrepareError(ValueError):
    """A corpus cannot be prepared; the message names the file and line."""


def audio_duration(path, where=None):
    """Duration in seconds of an audio file, from its header (soundfile.info).

    Arguments
    ---------
    path : str or pathlib.Path
        Any format libsndfile reads (wav, flac, mp3, ogg/opus ...).
    where : str, optional
        Prefix for error messages (the listing file and line that named it).

    Returns
    -------
    float

    Raises
    ------
    PrepareError
        When the file is missing, unreadable or holds no samples.

    Example
    -------
    >>> import tempfile, pathlib, numpy
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.wav"
    >>> sf.write(p, numpy.zeros(8000, dtype="float32"), 16000)
    >>> audio_duration(p)
    0.5
    """
    path = pathlib.Path(path)
    prefix = f"{where}: " if where else ""
    if not path.is_file():
        raise PrepareError(f"{prefix}audio {path} not found")
    try:
        info = sf.info(str(path))
    except Exception as e:  # soundfile raises several types
        raise PrepareError(f"{prefix}cannot read audio {path} ({e})") from None
    if info.frames <= 0 or info.samplerate <= 0:
        raise PrepareError(f"{prefix}audio {path} holds no samples")
    return info.frames / info.samplerate


def data_root_path(path, root):
    """Write ``path`` as ``$data_root/<path relative to root>``.

    Arguments
    ---------
    path : str or pathlib.Path
        A file inside ``root``.
    root : str or pathlib.Path
        The folder that ``$data_root`` stands for.

    Returns
    -------
    str

    Example
    -------
    >>> data_root_path("/corpus/dev/a/b.flac", "/corpus")
    '$data_root/dev/a/b.flac'
    """
    rel = pathlib.Path(path).relative_to(pathlib.Path(root))
    return "$data_root/" + rel.as_posix()


def check_folder(path, what):
    """Return ``path`` as a ``pathlib.Path`` after checking it is a folder.

    Example
    -------
    >>> import tempfile
    >>> check_folder(tempfile.gettempdir(), "data folder").is_dir()
    True
    """
    path = pathlib.Path(path)
    if not path.is_dir():
        raise PrepareError(f"{what} {path} does not exist or is not a folder")
    return path


def check_splits(splits, valid=None):
    """Validate a split list; return it as a list of unique strings.

    Arguments
    ---------
    splits : str or iterable of str
        One split name or several.
    valid : iterable of str, optional
        The allowed names.

    Example
    -------
    >>> check_splits("dev", ["dev", "test"])
    ['dev']
    """
    if isinstance(splits, str):
        splits = [splits]
    splits = [str(s) for s in splits]
    if not splits:
        raise PrepareError("no split requested")
    if len(set(splits)) != len(splits):
        raise PrepareError(f"split listed twice in {splits}")
    if valid is not None:
        unknown = [s for s in splits if s not in valid]
        if unknown:
            raise PrepareError(
                f"unknown split(s) {unknown}; valid splits: {list(valid)}"
            )
    for s in splits:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", s):
            raise PrepareError(f"split name {s!r} cannot name a manifest")
    return splits


def language_code(name):
    """Turn a corpus language name into the manifest's ISO 639-1 code.

    CommonVoice folders and CoVoST language names carry a region
    (``zh-CN``, ``sv-SE``); the manifest keeps the language only.

    Example
    -------
    >>> language_code("zh-CN"), language_code("en"), language_code("EN")
    ('zh', 'en', 'en')
    """
    code = str(name).strip().split("-")[0].split("_")[0].lower()
    if not re.fullmatch(r"[a-z]{2,3}", code):
        raise PrepareError(
            f"{name!r} is not a language code (like 'en' or 'zh-CN'); "
            "pass the language explicitly"
        )
    return code


def normalise_space(text):
    """Collapse runs of white space and strip the ends.

    Example
    -------
    >>> normalise_space("  a \\t b\\n")
    'a b'
    """
    return " ".join(str(text).split())


def warn_left_out(log, wheres, what):
    """Warn once about the lines left out because their ``what`` is empty.

    Arguments
    ---------
    log : logging.Logger
        The corpus script's logger.
    wheres : list of str
        Where each line left out stands (``"<file> line <n>"``); nothing is
        logged when it is empty.
    what : str
        The field that was empty (``sentence``, ``translation`` ...).

    Example
    -------
    >>> import logging, sys
    >>> log = logging.getLogger("toy_corpus")
    >>> log.addHandler(logging.StreamHandler(sys.stdout))
    >>> warn_left_out(log, ["t.tsv line 3", "t.tsv line 9"], "sentence")
    2 line(s) with an empty sentence left out (first: t.tsv line 3)
    >>> warn_left_out(log, [], "sentence")
    """
    if wheres:
        log.warning(
            "%d line(s) with an empty %s left out (first: %s)",
            len(wheres),
            what,
            wheres[0],
        )


def read_tsv(path, required):
    """Read a tab-separated file with a header line, checking every line.

    Fields are split on tabs only (no quoting), as CommonVoice and CoVoST
    write them.

    Arguments
    ---------
    path : str or pathlib.Path
        The file.
    required : iterable of str
        Columns the header must have.

    Returns
    -------
    list of (int, dict)
        The line number (the header is line 1) and the fields of each
        non-empty line.

    Raises
    ------
    PrepareError
        Naming the file (and line) when it is missing, not UTF-8, lacks a
        required column or a line has the wrong number of fields.

    Example
    -------
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "t.tsv"
    >>> _ = p.write_text("path\\tsentence\\na.mp3\\tHello.\\n")
    >>> read_tsv(p, ["path", "sentence"])
    [(2, {'path': 'a.mp3', 'sentence': 'Hello.'})]
    """
    text = read_utf8(path, PrepareError, encoding="utf-8-sig")
    lines = text.split("\n")
    header = [h.strip() for h in lines[0].rstrip("\r").split("\t")]
    missing = [c for c in required if c not in header]
    if missing:
        raise PrepareError(
            f"{path} line 1: missing column(s) {missing}; header is {header}"
        )
    rows = []
    for num, line in enumerate(lines[1:], start=2):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise PrepareError(
                f"{path} line {num}: {len(fields)} tab-separated fields, "
                f"the header has {len(header)}"
            )
        rows.append((num, dict(zip(header, fields))))
    return rows


def load_json(path):
    """Load a JSON file; syntax errors name the file, line and column.

    Example
    -------
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.json"
    >>> _ = p.write_text('{"a": [1,]}')
    >>> load_json(p)
    Traceback (most recent call last):
    ...
    speechbrain_blspkd.dataprep.common.PrepareError: ...a.json line 1 column 10: ...
    """
    text = read_utf8(path, PrepareError, encoding="utf-8-sig")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise PrepareError(
            f"{path} line {e.lineno} column {e.colno}: invalid JSON ({e.msg})"
        ) from None


def require_key(obj, key, where, kind=None):
    """Return ``obj[key]``, raising :class:`PrepareError` naming ``where``.

    Arguments
    ---------
    obj : dict
        A JSON object.
    key : str
        The key it must hold.
    where : str
        File and location for the error message.
    kind : type or tuple of type, optional
        The type the value must have.

    Example
    -------
    >>> require_key({"a": 1}, "a", "f.json data[0]", int)
    1
    """
    if not isinstance(obj, dict):
        raise PrepareError(f"{where}: expected a JSON object")
    if key not in obj:
        raise PrepareError(f"{where}: missing key {key!r}")
    value = obj[key]
    if kind is not None and not isinstance(value, kind):
        raise PrepareError(
            f"{where}: {key!r} has type {type(value).__name__}, expected "
            f"{getattr(kind, '__name__', kind)}"
        )
    return value


def manifest_row(
    uid,
    audio,
    root,
    transcript,
    language,
    speaker,
    duration=None,
    where=None,
    **extra,
):
    """One manifest row for the audio file ``audio`` inside ``root``.

    Arguments
    ---------
    uid : str
        The row ``ID``.
    audio : str or pathlib.Path
        The audio file; ``wav`` is written relative to ``root``.
    root : str or pathlib.Path
        The folder that ``$data_root`` stands for.
    transcript, language, speaker : str
        The other required columns.
    duration : float, optional
        Seconds; default: read from the file's header (:func:`audio_duration`).
    where : str, optional
        File and line for the error message when reading the duration fails.
    **extra
        More manifest columns (``translation``, ``answer`` ...).

    Returns
    -------
    dict
        With the duration rounded to 5 decimals.

    Example
    -------
    >>> row = manifest_row("u1", "/c/dev/u1.wav", "/c", "hi", "en", "s1", 1.5)
    >>> row["wav"], row["duration"], row["speaker"]
    ('$data_root/dev/u1.wav', 1.5, 's1')
    """
    if duration is None:
        duration = audio_duration(audio, where)
    return {
        "ID": uid,
        "wav": data_root_path(audio, root),
        "duration": round(duration, 5),
        "transcript": transcript,
        "language": language,
        "speaker": speaker,
        **extra,
    }
