"""The course of a corpus preparation: skip it when done, else write it all.

Every ``prepare_<corpus>`` function in :mod:`speechbrain_blspkd.dataprep`
follows the same contract:

* it writes one manifest per split, ``<save_folder>/<split>.csv``, through
  :func:`speechbrain_blspkd.dataio.manifest.write_manifest`, with ``wav``
  written as ``$data_root/<path relative to the audio root>``;
* it is idempotent: after a successful run it writes the options it ran with
  to ``<save_folder>/<corpus>_prepare.json`` (atomically, last of all); a
  later call with the same options whose manifests all exist does nothing,
  a call with other options redoes the work (see :func:`is_prepared`);
* anything malformed in the corpus stops it with
  :class:`~speechbrain_blspkd.dataprep.common.PrepareError`
  naming the file and the line (or the JSON location) at fault.

:func:`prepare_corpus` runs that course; a corpus script gives it its own
parts (the checks of its inputs, the work shared by the splits, the rows of
a split).  :func:`prepare_parser` and :func:`run_cli` make the scripts'
command lines.
"""

import argparse
import json
import logging
import pathlib

from speechbrain_blspkd.dataio.manifest import ManifestError, write_manifest
from speechbrain_blspkd.dataprep.common import PrepareError
from speechbrain_blspkd.utils.atomic import atomic_write_text, read_json
from speechbrain_blspkd.utils.cli import exit_on_error, setup_logging

logger = logging.getLogger(__name__)

#: Bumped when a change in the scripts makes older manifests stale.
PREPARE_VERSION = 1


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
    """Options as they are stored: JSON types only, version included.

    A ``pathlib.Path`` is stored resolved, so that two spellings of one
    folder (relative, absolute) record the same options.
    """
    return json.loads(
        json.dumps(
            {"version": PREPARE_VERSION, **options},
            sort_keys=True,
            default=_json_value,
        )
    )


def _json_value(value):
    """A value JSON lacks a type for, as it is stored: a path resolved."""
    if isinstance(value, pathlib.Path):
        return str(value.resolve())
    return str(value)


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
        must be JSON-serialisable, or paths (stored resolved).
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
    stored = read_json(record)
    if stored is None:
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
    >>> from speechbrain_blspkd.dataprep.common import manifest_row
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


def prepare_corpus(
    corpus,
    title,
    save_folder,
    splits,
    options,
    split_rows,
    check=None,
    walk=None,
    unit="utterances",
    hours=True,
    manifest_name=None,
    log=None,
):
    """Prepare one corpus: skip it when done, else write every split's manifest.

    The course every ``prepare_<corpus>`` function follows once its
    arguments are checked; the corpus-specific parts come as functions:

    1. when an earlier run with the same ``splits`` and ``options`` left
       every manifest, log that and stop (:func:`skip_if_prepared`);
    2. ``check()`` checks and reads the inputs; nothing is written yet, so a
       :class:`~speechbrain_blspkd.dataprep.common.PrepareError` there
       leaves an earlier run's outputs valid;
    3. the options record is removed (:func:`start_preparation`);
    4. ``walk(inputs)`` does the work shared by the splits (cutting or
       synthesising audio) with what ``check`` returned;
    5. each split's rows, ``split_rows(split, walked)`` with what ``walk``
       returned (without ``walk``: what ``check`` returned), are written
       atomically (:func:`write_split`);
    6. the options record (``options`` with the ``splits``) is written,
       last of all (:func:`mark_prepared`).

    Arguments
    ---------
    corpus : str
        Short corpus name (names the options record).
    title : str
        Corpus name for the log.
    save_folder : str or pathlib.Path
        Where the manifests and the options record go.
    splits : list of str
        The checked split names.
    options : dict
        Everything else that changes the outputs (:func:`is_prepared`):
        the corpus folders (paths, recorded resolved) and flags.
    split_rows : callable
        ``(split, walked) -> list of dict``: the manifest rows of a split.
    check : callable, optional
        ``() -> inputs``.
    walk : callable, optional
        ``(inputs) -> walked``.
    unit : str
        What a row is, for the log (``clips`` ...).
    hours : bool
        Log the hours of audio of each split too.
    manifest_name : callable, optional
        ``split -> file name``; default ``<split>.csv``.
    log : logging.Logger, optional
        The corpus script's logger.

    Returns
    -------
    dict
        Split name -> manifest path.

    Example
    -------
    >>> import tempfile, pathlib
    >>> from speechbrain_blspkd.dataprep.common import manifest_row
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> def rows(split, inputs):
    ...     return [manifest_row("a", "/c/a.wav", "/c", split, "en", "s", 1)]
    >>> out = prepare_corpus("toy", "Toy", d, ["dev"], {"folder": d}, rows)
    >>> record = {"folder": str(d.resolve()), "splits": ["dev"]}
    >>> out["dev"].name, is_prepared(d, "toy", record, out.values())
    ('dev.csv', True)
    """
    save_folder = pathlib.Path(save_folder)
    name = manifest_name or (lambda split: f"{split}.csv")
    manifests = {s: save_folder / name(s) for s in splits}
    options = {**options, "splits": list(splits)}
    if skip_if_prepared(save_folder, corpus, options, manifests, title, log):
        return manifests
    inputs = None if check is None else check()
    start_preparation(save_folder, corpus)
    walked = inputs if walk is None else walk(inputs)
    for split, path in manifests.items():
        write_split(path, split_rows(split, walked), unit, hours, log)
    mark_prepared(save_folder, corpus, options)
    return manifests


def prepare_parser(
    description, data_help, splits, splits_help=None, lowercase=None, **kw
):
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
    lowercase : bool, optional
        The default of the script's ``lowercase`` option: ``False`` adds
        ``--lowercase``, ``True`` adds ``--keep-case`` (``None``: neither).
    **kw
        More ``add_argument`` options for ``--splits`` (``choices``).

    Example
    -------
    >>> parser = prepare_parser("Toy.", "the corpus", ["dev"])
    >>> parser.parse_args(["data", "save"]).splits
    ['dev']
    >>> parser = prepare_parser("Toy.", "the corpus", ["dev"], lowercase=True)
    >>> parser.parse_args(["data", "save", "--keep-case"]).lowercase
    False
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("data_folder", help=data_help)
    parser.add_argument("save_folder", help="where the manifests go")
    parser.add_argument(
        "--splits", nargs="+", default=list(splits), help=splits_help, **kw
    )
    if lowercase is True:
        parser.add_argument(
            "--keep-case",
            dest="lowercase",
            action="store_false",
            help="keep the upper-case text instead of lower-casing it",
        )
    elif lowercase is False:
        parser.add_argument(
            "--lowercase", action="store_true", help="lower-case the text"
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


def run_parsed(prepare, parser, argv=None, **keywords):
    """Parse ``argv``, then :func:`run_cli` ``prepare`` with every argument.

    The parser's destinations are the names of ``prepare``'s parameters
    (``data_folder``, ``save_folder``, ``splits`` ...); ``keywords`` add
    or replace some.

    Example
    -------
    >>> def prepare(data_folder, save_folder, splits):
    ...     return data_folder, splits
    >>> run_parsed(prepare, prepare_parser("Toy.", "the corpus", ["dev"]),
    ...     ["data", "save"])
    ('data', ['dev'])
    """
    args = vars(parser.parse_args(argv))
    return run_cli(prepare, **{**args, **keywords})


def setup_cli_logging():
    """Log INFO messages to stderr when a script runs from the command line."""
    setup_logging("%(asctime)s %(levelname)s %(message)s")
