"""LibriSpeech manifests.

The corpus layout (as unpacked from openslr.org/12)::

    <data_folder>/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac
    <data_folder>/<split>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt

Each ``trans.txt`` line is ``<utterance id> <TRANSCRIPT IN UPPER CASE>``.
One manifest per split goes to ``<save_folder>/<split>.csv``; ``wav`` is
``$data_root/<split>/...flac`` with ``$data_root`` = ``data_folder``,
language ``en``, speaker the LibriSpeech speaker number.  Transcripts are
lower-cased by default (``lowercase=False`` keeps the original capitals),
which is how the LLMs this project distils read text best.

Command line::

    python -m speechbrain_blspkd.dataprep.librispeech DATA SAVE \\
        --splits dev-clean test-clean
"""

import logging
import re

from speechbrain_blspkd.dataio.manifest import read_utf8
from speechbrain_blspkd.dataprep.common import (
    PrepareError,
    check_folder,
    check_splits,
    manifest_row,
    normalise_space,
)
from speechbrain_blspkd.dataprep.preparation import (
    prepare_corpus,
    prepare_parser,
    run_parsed,
)

logger = logging.getLogger(__name__)

CORPUS = "librispeech"
SPLITS = (
    "train-clean-100",
    "train-clean-360",
    "train-other-500",
    "dev-clean",
    "dev-other",
    "test-clean",
    "test-other",
)
DEFAULT_SPLITS = (
    "train-clean-100",
    "dev-clean",
    "dev-other",
    "test-clean",
    "test-other",
)
_UTT_ID = re.compile(r"(\d+)-(\d+)-(\d+)")


def prepare_librispeech(
    data_folder,
    save_folder,
    splits=DEFAULT_SPLITS,
    skip_prep=False,
    lowercase=True,
):
    """Write ``<save_folder>/<split>.csv`` for each LibriSpeech split.

    Arguments
    ---------
    data_folder : str or pathlib.Path
        The ``LibriSpeech`` folder holding the split folders.
    save_folder : str or pathlib.Path
        Where the manifests (and the options record) go.
    splits : str or list of str
        Any of :data:`SPLITS`.
    skip_prep : bool
        Do nothing at all (SpeechBrain convention).
    lowercase : bool
        Lower-case the transcripts (LibriSpeech writes them in capitals).

    Returns
    -------
    dict
        Split name -> manifest path (empty when ``skip_prep``).

    Raises
    ------
    PrepareError
        For a missing split folder, a malformed ``trans.txt`` line or audio
        that a transcript names but that is missing or unreadable (the
        message names the ``trans.txt`` file and line).

    Example
    -------
    >>> import tempfile, pathlib, numpy, soundfile
    >>> data = pathlib.Path(tempfile.mkdtemp())
    >>> chap = data / "dev-clean" / "84" / "121123"
    >>> chap.mkdir(parents=True)
    >>> soundfile.write(chap / "84-121123-0000.flac",
    ...     numpy.zeros(8000, dtype="float32"), 16000)
    >>> _ = (chap / "84-121123.trans.txt").write_text("84-121123-0000 GO ON\\n")
    >>> out = prepare_librispeech(data, data / "save", splits=["dev-clean"])
    >>> from speechbrain_blspkd.dataio.manifest import read_manifest
    >>> row = read_manifest(out["dev-clean"])[0]
    >>> row["ID"], row["wav"], row["duration"], row["transcript"]
    ('84-121123-0000', '$data_root/dev-clean/84/121123/84-121123-0000.flac', 0.5, 'go on')
    """
    if skip_prep:
        return {}
    splits = check_splits(splits, SPLITS)
    data_folder = check_folder(data_folder, "LibriSpeech data folder")
    options = {"data_folder": data_folder, "lowercase": bool(lowercase)}

    def check():
        for split in splits:
            check_folder(data_folder / split, f"LibriSpeech split {split!r}:")

    return prepare_corpus(
        CORPUS,
        "LibriSpeech",
        save_folder,
        splits,
        options,
        lambda split, _: _split_rows(data_folder, split, lowercase),
        check=check,
        unit="utterances",
        log=logger,
    )


def _split_rows(data_folder, split, lowercase):
    """Rows of one split, sorted by utterance ID."""
    split_dir = data_folder / split
    trans_files = sorted(split_dir.glob("*/*/*.trans.txt"))
    if not trans_files:
        raise PrepareError(
            f"{split_dir}: no <speaker>/<chapter>/*.trans.txt files found"
        )
    rows, seen = [], {}
    for trans in trans_files:
        for row, where in _trans_rows(trans, data_folder, lowercase):
            if row["ID"] in seen:
                raise PrepareError(
                    f"{where}: utterance {row['ID']} already listed at "
                    f"{seen[row['ID']]}"
                )
            seen[row["ID"]] = where
            rows.append(row)
    rows.sort(key=lambda r: r["ID"])
    return rows


def _trans_rows(trans, data_folder, lowercase):
    """Yield (row, 'file line N') for each line of one ``trans.txt`` file."""
    chapter_dir = trans.parent
    speaker, chapter = chapter_dir.parent.name, chapter_dir.name
    expected = f"{speaker}-{chapter}.trans.txt"
    if trans.name != expected:
        raise PrepareError(
            f"{trans}: a transcript file in {chapter_dir} must be named "
            f"{expected}"
        )
    lines = read_utf8(trans, PrepareError).split("\n")
    for num, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{trans} line {num}"
        parts = line.strip().split(maxsplit=1)
        match = _UTT_ID.fullmatch(parts[0])
        if not match or len(parts) < 2:
            raise PrepareError(
                f"{where}: expected '<speaker>-<chapter>-<utt> TRANSCRIPT', "
                f"got {line.strip()[:80]!r}"
            )
        if match.group(1) != speaker or match.group(2) != chapter:
            raise PrepareError(
                f"{where}: utterance {parts[0]} does not belong to speaker "
                f"{speaker} chapter {chapter}"
            )
        text = normalise_space(parts[1])
        if lowercase:
            text = text.lower()
        audio = chapter_dir / f"{parts[0]}.flac"
        row = manifest_row(
            parts[0], audio, data_folder, text, "en", speaker, where=where
        )
        yield row, where


def main(argv=None):
    """Write LibriSpeech manifests from the command line (module docstring)."""
    parser = prepare_parser(
        "Write LibriSpeech manifests (one CSV per split).",
        "the LibriSpeech folder",
        DEFAULT_SPLITS,
        "splits to prepare (default: %(default)s)",
        lowercase=True,
        choices=SPLITS,
    )
    run_parsed(prepare_librispeech, parser, argv)


if __name__ == "__main__":
    main()
