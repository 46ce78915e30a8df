"""CoVoST 2 speech-translation manifests.

CoVoST 2 translates Common Voice sentences, so the audio is a Common Voice
release of the source language (``<data_folder>/clips/*.mp3``) and the
translations come in tab-separated files, looked up in
``translation_folder`` (default: ``data_folder``) in this order:

1. ``covost_v2.<src>_<tgt>.<split>.tsv`` (what the official
   ``get_covost_splits.py`` writes), one file per split;
2. ``covost_v2.<src>_<tgt>.tsv`` (the released file), whose ``split`` column
   picks the rows; ``train`` also takes the ``train_covost`` rows.

The columns used are ``path``, ``translation`` and, when the file has them,
``sentence`` and ``client_id``; when it has not (the released file), those
two come from the Common Voice ``<data_folder>/validated.tsv`` by ``path``.

One manifest per split goes to ``<save_folder>/<split>.csv`` (``$data_root``
= ``data_folder``) with the ``translation`` column filled and ``language``
the source language.  Lines with an empty sentence or translation are left
out with a warning; anything malformed stops preparation with an error
naming the file and line.

Command line::

    python -m speechbrain_blspkd.dataprep.covost2 cv-corpus/fr SAVE \\
        --src fr --tgt en --splits dev test
"""

import functools
import logging

from speechbrain_blspkd.dataprep.common import (
    PrepareError,
    check_folder,
    check_splits,
    language_code,
)
from speechbrain_blspkd.dataprep.commonvoice import (
    check_clips,
    clip_rows,
    tsv_entries,
)
from speechbrain_blspkd.dataprep.preparation import (
    prepare_corpus,
    prepare_parser,
    run_parsed,
)

logger = logging.getLogger(__name__)

CORPUS = "covost2"
DEFAULT_SPLITS = ("train", "dev", "test")


def prepare_covost2(
    data_folder,
    save_folder,
    src_lang,
    tgt_lang,
    splits=DEFAULT_SPLITS,
    skip_prep=False,
    translation_folder=None,
    lowercase=False,
):
    """Write ``<save_folder>/<split>.csv`` with CoVoST 2 translations.

    Arguments
    ---------
    data_folder : str or pathlib.Path
        Common Voice folder of the source language (``clips/``,
        ``validated.tsv``).
    save_folder : str or pathlib.Path
        Where the manifests (and the options record) go.
    src_lang : str
        CoVoST source language as in the file names (``fr``, ``zh-CN``).
    tgt_lang : str
        Target language as in the file names (``en``, ``de`` ...).
    splits : str or list of str
        ``train``, ``dev``, ``test``.
    skip_prep : bool
        Do nothing at all (SpeechBrain convention).
    translation_folder : str or pathlib.Path, optional
        Folder of the CoVoST tsv files (default: ``data_folder``).
    lowercase : bool
        Lower-case the source sentences (translations are kept as they are).

    Returns
    -------
    dict
        Split name -> manifest path (empty when ``skip_prep``).

    Example
    -------
    >>> from speechbrain_blspkd.testing import write_clip_folder
    >>> data = write_clip_folder("covost_v2.fr_en.tsv",
    ...     "path\\tsentence\\ttranslation\\tclient_id\\tsplit\\n"
    ...     "c1.wav\\tBonjour.\\tHello.\\tspk\\ttest\\n")
    >>> out = prepare_covost2(data, data / "save", "fr", "en", ["test"])
    >>> from speechbrain_blspkd.dataio.manifest import read_manifest
    >>> row = read_manifest(out["test"])[0]
    >>> row["transcript"], row["translation"], row["language"]
    ('Bonjour.', 'Hello.', 'fr')
    """
    if skip_prep:
        return {}
    splits = check_splits(splits, DEFAULT_SPLITS)
    data_folder = check_folder(data_folder, "Common Voice data folder")
    tr_folder = check_folder(
        translation_folder or data_folder, "CoVoST translation folder"
    )
    language = language_code(src_lang)
    language_code(tgt_lang)
    options = {
        "data_folder": data_folder,
        "translation_folder": tr_folder,
        "src_lang": src_lang,
        "tgt_lang": tgt_lang,
        "lowercase": bool(lowercase),
    }
    validated = functools.cache(lambda: _validated_lines(data_folder))

    def check():
        check_clips(data_folder)
        return {
            s: _split_source(tr_folder, src_lang, tgt_lang, s) for s in splits
        }

    def split_rows(split, sources):
        entries = _split_entries(*sources[split], split)
        if entries and any(
            "sentence" not in f or "client_id" not in f for _, f in entries
        ):
            entries = _join_validated(entries, validated(), data_folder)
        return clip_rows(
            data_folder, entries, language, lowercase, ["translation"]
        )

    return prepare_corpus(
        CORPUS,
        "CoVoST 2",
        save_folder,
        splits,
        options,
        split_rows,
        check=check,
        unit="clips",
        hours=False,
        log=logger,
    )


def _split_source(folder, src, tgt, split):
    """(tsv path, whether it is the all-splits file) for one split."""
    per_split = folder / f"covost_v2.{src}_{tgt}.{split}.tsv"
    if per_split.is_file():
        return per_split, False
    combined = folder / f"covost_v2.{src}_{tgt}.tsv"
    if combined.is_file():
        return combined, True
    raise PrepareError(
        f"CoVoST 2 split {split!r}: neither {per_split} nor {combined} exists"
    )


def _split_entries(tsv, combined, split):
    """Lines of ``tsv`` that belong to ``split``."""
    required = ("path", "translation") + (("split",) if combined else ())
    entries = tsv_entries(tsv, required)
    if combined:
        wanted = {split, f"{split}_covost"} if split == "train" else {split}
        entries = [(w, f) for w, f in entries if f["split"].strip() in wanted]
    if not entries:
        raise PrepareError(f"{tsv}: no lines for split {split!r}")
    return entries


def _validated_lines(data_folder):
    """Common Voice ``validated.tsv`` lines by clip name."""
    tsv = data_folder / "validated.tsv"
    if not tsv.is_file():
        raise PrepareError(
            f"{tsv}: file not found; it is needed for the sentence and "
            "client_id columns the CoVoST file lacks"
        )
    return {f["path"].strip(): (w, f) for w, f in tsv_entries(tsv)}


def _join_validated(entries, cv_lines, data_folder):
    """Add sentence and client_id from Common Voice to CoVoST lines."""
    joined = []
    for where, fields in entries:
        name = fields["path"].strip()
        found = cv_lines.get(name) or cv_lines.get(name.removesuffix(".mp3"))
        if found is None:
            raise PrepareError(
                f"{where}: clip {name!r} is not in "
                f"{data_folder / 'validated.tsv'}"
            )
        cv = found[1]
        joined.append(
            (
                where,
                {
                    **fields,
                    "sentence": fields.get("sentence", cv["sentence"]),
                    "client_id": fields.get("client_id", cv["client_id"]),
                },
            )
        )
    return joined


def main(argv=None):
    """Write CoVoST 2 manifests from the command line (module docstring)."""
    parser = prepare_parser(
        "Write CoVoST 2 manifests (one CSV per split).",
        "Common Voice source-language folder",
        DEFAULT_SPLITS,
        "splits to prepare (default: %(default)s)",
        lowercase=False,
        choices=DEFAULT_SPLITS,
    )
    parser.add_argument(
        "--src",
        dest="src_lang",
        metavar="SRC",
        required=True,
        help="source language (fr)",
    )
    parser.add_argument(
        "--tgt",
        dest="tgt_lang",
        metavar="TGT",
        required=True,
        help="target language (en)",
    )
    parser.add_argument(
        "--translation-folder",
        help="folder of the covost_v2.*.tsv files (default: DATA)",
    )
    run_parsed(prepare_covost2, parser, argv)


if __name__ == "__main__":
    main()
