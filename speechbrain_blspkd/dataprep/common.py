"""Shared pieces of the corpus preparation scripts.

Every ``prepare_<corpus>`` function in :mod:`speechbrain_blspkd.dataprep`
follows the same contract:

* it writes one manifest per split, ``<save_folder>/<split>.csv``, through
  :func:`speechbrain_blspkd.dataio.manifest.write_manifest`, with ``wav``
  written as ``$data_root/<path relative to the audio root>``;
* it is idempotent: after a successful run it writes the options it ran with
  to ``<save_folder>/<corpus>_prepare.json`` (atomically, last of all); a
  later call with the same options whose manifests all exist does nothing,
  a call with other options redoes the work (see :func:`is_prepared`);
* anything malformed in the corpus stops it with :class:`PrepareError`
  naming the file and the line (or the JSON location) at fault.
"""

import argparse
import json
import logging
import pathlib
import re

import soundfile as sf

from speechbrain_blspkd.dataio.manifest import ManifestError, write_manifest
from speechbrain_blspkd.utils.atomic import atomic_write_text
from speechbrain_blspkd.utils.cli import exit_on_error, setup_logging

logger = logging.getLogger(__name__)

#: Bumped when a change in the scripts makes older manifests stale.
PREPARE_VERSION = 1


class PrepareError(ValueError):
    """A corpus cannot be prepared; the message names the file and line."""


def options_file(save_folder, corpus):
    """Return the path of the options record of ``corpus`` in ``save_folder``.

    Arguments
    ---------
    save_folder : str or pathlib.Path
        Where the manifests go.
    corpus : str
        Short corpus name (``librispeech`` ...).

    Returns
    -------
    pathlib.Path

    Example
    -------
    >>> options_file("/tmp/save", "librispeech").name
    'librispeech_prepare.json'
    """
    return pathlib.Path(save_folder) / f"{corpus}_prepare.json"


def _canonical(options):
    """Options as they are stored: JSON types only, version included."""
    return json.loads(
        json.dumps(
            {"version": PREPARE_VERSION, **options}, sort_keys=True, default=str
        )
    )


def is_prepared(save_folder, corpus, options, outputs):
    """Whether a previous run with the same ``options`` left all ``outputs``.

    Arguments
    ---------
    save_folder : str or pathlib.Path
        Where the manifests and the options record live.
    corpus : str
        Short corpus name.
    options : dict
        Everything that changes the outputs (folders, splits, flags); values
        must be JSON-serialisable (paths are turned into strings).
    outputs : iterable of str or pathlib.Path
        Files the run writes.

    Returns
    -------
    bool

    Example
    -------
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "a.csv").write_text("x")
    >>> is_prepared(d, "toy", {"n": 1}, [d / "a.csv"])
    False
    >>> mark_prepared(d, "toy", {"n": 1})
    >>> is_prepared(d, "toy", {"n": 1}, [d / "a.csv"])
    True
    >>> is_prepared(d, "toy", {"n": 2}, [d / "a.csv"])
    False
    """
    record = options_file(save_folder, corpus)
    if not record.is_file():
        return False
    if not all(pathlib.Path(p).is_file() for p in outputs):
        return False
    try:
        stored = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        logger.warning("%s: unreadable options record; preparing again", record)
        return False
    return stored == _canonical(options)


def mark_prepared(save_folder, corpus, options):
    """Record (atomically) that ``options`` produced the outputs now present.

    Call it last, after every output is written, so an interrupted run leaves
    no record and the next one starts over.

    Example
    -------
    >>> import tempfile, pathlib, json
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> mark_prepared(d, "toy", {"splits": ["a"]})
    >>> json.loads(options_file(d, "toy").read_text())["splits"]
    ['a']
    """
    text = json.dumps(_canonical(options), indent=2, sort_keys=True) + "\n"
    atomic_write_text(options_file(save_folder, corpus), text)


def forget_prepared(save_folder, corpus):
    """Remove the options record before outputs are rewritten.

    A run that is interrupted while it replaces the outputs of an earlier run
    then cannot be mistaken for a complete one.

    Example
    -------
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> mark_prepared(d, "toy", {})
    >>> forget_prepared(d, "toy")
    >>> options_file(d, "toy").exists()
    False
    """
    options_file(save_folder, corpus).unlink(missing_ok=True)


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
        raise PrepareError(f"{prefix}audio file {path} not found")
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
    path = pathlib.Path(path)
    if not path.is_file():
        raise PrepareError(f"{path}: file not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise PrepareError(f"{path} line {line}: not valid UTF-8") from None
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
    path = pathlib.Path(path)
    if not path.is_file():
        raise PrepareError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise PrepareError(
            f"{path} line {e.lineno} column {e.colno}: invalid JSON ({e.msg})"
        ) from None
    except UnicodeDecodeError as e:
        raise PrepareError(f"{path}: not valid UTF-8 ({e.reason})") from None


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


def skip_if_prepared(save_folder, corpus, options, manifests, title, log=None):
    """Whether an earlier run left the same outputs (then log the skip).

    :func:`is_prepared` for ``manifests`` (a dict split -> path) with an INFO
    message ``<title> manifests in <save_folder> exist ...`` when it is true.

    Example
    -------
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> skip_if_prepared(d, "toy", {}, {}, "Toy")
    False
    >>> mark_prepared(d, "toy", {})
    >>> skip_if_prepared(d, "toy", {}, {}, "Toy")
    True
    """
    if not is_prepared(save_folder, corpus, options, manifests.values()):
        return False
    (log or logger).info(
        "%s manifests in %s exist with the same options; skipping preparation",
        title,
        save_folder,
    )
    return True


def start_preparation(save_folder, corpus):
    """Forget the options record of ``corpus`` and create ``save_folder``.

    Call it once the inputs are checked, before the first output is written.

    Example
    -------
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp()) / "save"
    >>> start_preparation(d, "toy")
    >>> d.is_dir(), options_file(d, "toy").exists()
    (True, False)
    """
    forget_prepared(save_folder, corpus)
    pathlib.Path(save_folder).mkdir(parents=True, exist_ok=True)


def write_split(path, rows, unit, hours=True, log=None):
    """Write one split's manifest and log how many ``unit`` (and hours) it has.

    Example
    -------
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "dev.csv"
    >>> write_split(p, [manifest_row("a", "/c/a.wav", "/c", "hi", "en", "s", 2)],
    ...     "clips")
    >>> p.is_file()
    True
    """
    write_manifest(path, rows)
    if hours:
        total = sum(r["duration"] for r in rows) / 3600
        (log or logger).info("%s: %d %s, %.1f h", path, len(rows), unit, total)
    else:
        (log or logger).info("%s: %d %s", path, len(rows), unit)


def prepare_parser(description, data_help, splits, splits_help=None, **kw):
    """Argument parser with ``data_folder``, ``save_folder`` and ``--splits``.

    Arguments
    ---------
    description : str
        What the script does.
    data_help : str
        Help for the ``data_folder`` argument.
    splits : sequence of str
        Default ``--splits``.
    splits_help : str, optional
        Help for ``--splits``.
    **kw
        More ``add_argument`` options for ``--splits`` (``choices``).

    Example
    -------
    >>> parser = prepare_parser("Toy.", "the corpus", ["dev"])
    >>> parser.parse_args(["data", "save"]).splits
    ['dev']
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("data_folder", help=data_help)
    parser.add_argument("save_folder", help="where the manifests go")
    parser.add_argument(
        "--splits", nargs="+", default=list(splits), help=splits_help, **kw
    )
    return parser


def run_cli(prepare, *args, **kwargs):
    """Call ``prepare`` for a command line; bad input exits with its message.

    Sets up INFO logging (:func:`setup_cli_logging`) first.
    :class:`PrepareError` and :class:`ManifestError` become ``SystemExit``
    with a one-line ``error: ...`` message instead of a traceback.

    Example
    -------
    >>> def prepare():
    ...     raise PrepareError("x.tsv line 3: empty path")
    >>> run_cli(prepare)
    Traceback (most recent call last):
    ...
    SystemExit: error: x.tsv line 3: empty path
    """
    setup_cli_logging()
    return exit_on_error(
        (PrepareError, ManifestError), prepare, *args, **kwargs
    )


def setup_cli_logging():
    """Log INFO messages to stderr when a script runs from the command line."""
    setup_logging("%(asctime)s %(levelname)s %(message)s")
