"""Common Voice manifests (any language).

The layout of one language of a Common Voice release::

    <data_folder>/train.tsv, dev.tsv, test.tsv, validated.tsv, other.tsv ...
    <data_folder>/clips/<clip>.mp3

Every ``.tsv`` file has a header line and tab-separated fields; the columns
used are ``client_id`` (the speaker), ``path`` (the clip's file name in
``clips/``) and ``sentence`` (the transcript).  One manifest per requested
tsv goes to ``<save_folder>/<split>.csv`` with ``$data_root`` =
``data_folder``, ``ID`` the clip's file name without extension, the original
sentence (white space collapsed; ``lowercase=True`` lower-cases it) and the
duration read from the clip's header with ``soundfile.info``.  MP3 decoding
needs libsndfile >= 1.1 (soundfile 0.12+ wheels bundle it); other formats
libsndfile reads (wav, flac, ogg) work as well.

Rows whose sentence is empty are left out with a warning; anything else that
is wrong (missing column, wrong field count, missing or unreadable clip,
duplicate clip) stops preparation with an error naming the tsv file and line.

The language defaults to the folder name (``de``, ``zh-CN`` -> ``zh``).

Command line::

    python -m speechbrain_blspkd.dataprep.commonvoice cv-corpus/de SAVE \\
        --splits train dev test
"""

import logging
import pathlib

from speechbrain_blspkd.dataprep.common import (
    PrepareError,
    check_folder,
    check_splits,
    language_code,
    manifest_row,
    normalise_space,
    read_tsv,
    warn_left_out,
)
from speechbrain_blspkd.dataprep.preparation import (
    prepare_corpus,
    prepare_parser,
    run_parsed,
)

logger = logging.getLogger(__name__)

CORPUS = "commonvoice"
DEFAULT_SPLITS = ("train", "dev", "test")
TSV_COLUMNS = ("client_id", "path", "sentence")


def prepare_commonvoice(
    data_folder,
    save_folder,
    splits=DEFAULT_SPLITS,
    skip_prep=False,
    language=None,
    lowercase=False,
):
    """Write ``<save_folder>/<split>.csv`` for each Common Voice ``<split>.tsv``.

    Arguments
    ---------
    data_folder : str or pathlib.Path
        One language of a release: holds the tsv files and ``clips/``.
    save_folder : str or pathlib.Path
        Where the manifests (and the options record) go.
    splits : str or list of str
        Names of tsv files without ``.tsv`` (``train``, ``validated`` ...).
    skip_prep : bool
        Do nothing at all (SpeechBrain convention).
    language : str, optional
        Language of the speech; default: the name of ``data_folder``.
    lowercase : bool
        Lower-case the sentences.

    Returns
    -------
    dict
        Split name -> manifest path (empty when ``skip_prep``).

    Example
    -------
    >>> from speechbrain_blspkd.testing import write_clip_folder
    >>> data = write_clip_folder("dev.tsv", "client_id\\tpath\\tsentence\\n"
    ...     "spk1\\tc1.wav\\tGuten Tag.\\n", name="de")
    >>> out = prepare_commonvoice(data, data / "save", splits=["dev"])
    >>> from speechbrain_blspkd.dataio.manifest import read_manifest
    >>> row = read_manifest(out["dev"])[0]
    >>> row["ID"], row["wav"], row["duration"], row["transcript"], row["language"]
    ('c1', '$data_root/clips/c1.wav', 0.25, 'Guten Tag.', 'de')
    """
    if skip_prep:
        return {}
    splits = check_splits(splits)
    data_folder = check_folder(data_folder, "Common Voice data folder")
    language = language_code(language or data_folder.resolve().name)
    options = {
        "data_folder": data_folder,
        "language": language,
        "lowercase": bool(lowercase),
    }

    def check():
        check_clips(data_folder)
        for split in splits:
            if not (data_folder / f"{split}.tsv").is_file():
                raise PrepareError(
                    f"{data_folder / (split + '.tsv')}: file not found "
                    f"(split {split!r})"
                )

    def split_rows(split, _):
        tsv = data_folder / f"{split}.tsv"
        return clip_rows(data_folder, tsv, language, lowercase)

    return prepare_corpus(
        CORPUS,
        "Common Voice",
        save_folder,
        splits,
        options,
        split_rows,
        check=check,
        unit="clips",
        log=logger,
    )


def check_clips(data_folder):
    """Check that a Common Voice folder holds the ``clips/`` folder.

    Example
    -------
    >>> import tempfile
    >>> check_clips(tempfile.mkdtemp())  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    speechbrain_blspkd.dataprep.common.PrepareError: Common Voice clips folder ...
    """
    check_folder(
        pathlib.Path(data_folder) / "clips", "Common Voice clips folder"
    )


def clip_path(data_folder, name, where):
    """Resolve a tsv ``path`` field to the clip file in ``clips/``.

    Older releases list clips without their ``.mp3`` extension; both forms
    are accepted.

    Example
    -------
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> (d / "clips").mkdir()
    >>> _ = (d / "clips" / "a.mp3").write_bytes(b"")
    >>> clip_path(d, "a", "x.tsv line 2").name
    'a.mp3'
    """
    name = name.strip()
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise PrepareError(f"{where}: invalid clip name {name!r}")
    clip = pathlib.Path(data_folder) / "clips" / name
    if not clip.is_file() and not clip.suffix:
        alt = clip.with_name(name + ".mp3")
        if alt.is_file():
            return alt
    if not clip.is_file():
        raise PrepareError(f"{where}: audio {clip} not found")
    return clip


def clip_rows(data_folder, entries, language, lowercase=False, columns=()):
    """Manifest rows for Common Voice clips listed by tsv lines.

    A line whose sentence (or one of ``columns``) is empty is left out, with
    one warning per field naming the first such line.

    Arguments
    ---------
    data_folder : pathlib.Path
        The language folder (``$data_root``), holding ``clips/``.
    entries : pathlib.Path or list of (str, dict)
        A tsv file with ``client_id``, ``path`` and ``sentence`` columns, or
        its lines already read: (``"<file> line <n>"``, fields) pairs.
    language : str
        Manifest language code.
    lowercase : bool
        Lower-case the sentences.
    columns : sequence of str
        More text columns of the lines (``translation`` ...) that the rows
        carry, white space collapsed; the lines must have them.

    Returns
    -------
    list of dict
        Sorted by ID.

    Example
    -------
    >>> from speechbrain_blspkd.testing import write_clip_folder
    >>> d = write_clip_folder("t.tsv", "client_id\\tpath\\tsentence\\n"
    ...     "s\\ta.wav\\tHi\\n", clip="a.wav", frames=160)
    >>> clip_rows(d, d / "t.tsv", "en", lowercase=True)[0]["transcript"]
    'hi'
    >>> entries = [("x line 2", {"client_id": "s", "path": "a.wav",
    ...     "sentence": "Hi", "translation": " Salut "})]
    >>> clip_rows(d, entries, "en", columns=["translation"])[0]["translation"]
    'Salut'
    """
    if isinstance(entries, (str, pathlib.Path)):
        entries = tsv_entries(entries, TSV_COLUMNS)
    rows, seen = [], {}
    empty = {field: [] for field in ("sentence", *columns)}
    for where, fields in entries:
        texts = {field: normalise_space(fields[field]) for field in empty}
        if lowercase:
            texts["sentence"] = texts["sentence"].lower()
        blank = [field for field, text in texts.items() if not text]
        if blank:
            empty[blank[0]].append(where)
            continue
        text = texts.pop("sentence")
        clip = clip_path(data_folder, fields["path"], where)
        uid = clip.stem
        if uid in seen:
            raise PrepareError(
                f"{where}: clip {clip.name} already listed ({seen[uid]})"
            )
        seen[uid] = where
        speaker = fields["client_id"].strip()
        rows.append(
            manifest_row(
                uid,
                clip,
                data_folder,
                text,
                language,
                speaker,
                where=where,
                **texts,
            )
        )
    for field, wheres in empty.items():
        warn_left_out(logger, wheres, field)
    rows.sort(key=lambda r: r["ID"])
    return rows


def tsv_entries(tsv, required=TSV_COLUMNS):
    """Read a tsv file into (``"<file> line <n>"``, fields) pairs.

    Example
    -------
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "t.tsv"
    >>> _ = p.write_text("client_id\\tpath\\tsentence\\ns\\ta.mp3\\tHi\\n")
    >>> where, fields = tsv_entries(p)[0]
    >>> where.endswith("t.tsv line 2"), fields["sentence"]
    (True, 'Hi')
    """
    return [(f"{tsv} line {n}", f) for n, f in read_tsv(tsv, required)]


def main(argv=None):
    """Write Common Voice manifests from the command line (module docstring)."""
    parser = prepare_parser(
        "Write Common Voice manifests (one CSV per tsv file).",
        "one language of a release",
        DEFAULT_SPLITS,
        "tsv files to read, without .tsv (default: %(default)s)",
        lowercase=False,
    )
    parser.add_argument(
        "--language", help="language code (default: the folder's name)"
    )
    run_parsed(prepare_commonvoice, parser, argv)


if __name__ == "__main__":
    main()
