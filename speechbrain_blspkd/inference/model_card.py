"""The model card (``README.md``) of an exported speech LLM folder.

:func:`~speechbrain_blspkd.inference.export.export_model` writes one into
every folder it exports, for every method, from what it can find:

* the method: the model class, the speech adapter class (with the first
  line of its documentation) and its options, Partial LoRA, the prompts;
* the base models, their asset descriptions and **licences** (from
  :data:`speechbrain_blspkd.assets.ASSETS`, or the marker file of an asset
  folder given by path);
* the training run, when one is found: the recipe, the training data
  (manifests: utterances, hours, languages), each stage (objective and its
  term weights, epochs, optimiser steps, learning rate), and the run's
  evaluation summary (``eval/<name>/summary.json``) as a table;
* intended use and limits (e.g. "trained on synthetic speech only" for the
  generated SynthSpeech corpus, the languages seen, the longest clip, a
  warning when the evaluated answers barely depend on the speech);
* the commands that load it (Python, ``blspkd-infer``, ``blspkd-demo-ui``).

How it is written
-----------------
The card is the Markdown template ``model_card.md`` shipped beside this
module (headings and fixed text, ``$name`` fields of
:class:`string.Template`), filled from one dict of values
(:func:`card_fields`): the blocks of
:mod:`speechbrain_blspkd.inference.card_sections`, from the export's
``hyperparams.yaml`` values and the training run
(:mod:`speechbrain_blspkd.inference.training_run`: how the run is found and
read). Without a run the card says that training data and evaluation are
not recorded.

``python -m speechbrain_blspkd.inference.model_card FOLDER [--run RUN]``
(re)writes the card of an existing folder.

Authors
 * speechbrain-blspkd contributors 2026
"""

import argparse
import functools
import importlib.resources
import json
import logging
import pathlib
import re
import string
import sys

from speechbrain_blspkd.assets.paths import base_model_info
from speechbrain_blspkd.inference import card_sections
from speechbrain_blspkd.inference.model_folder import (
    DEFAULT_CONFIG,
    HPARAMS_FILE,
    INFO_FILE,
    WEIGHTS_FILE,
)
from speechbrain_blspkd.inference.training_run import (
    find_run_folder,
    read_plain_yaml,
    read_run,
)
from speechbrain_blspkd.utils.atomic import atomic_write_text

__all__ = [
    "CARD_FILE",
    "TEMPLATE_FILE",
    "build_model_card",
    "card_fields",
    "find_run_folder",
    "read_run",
    "write_model_card",
]

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"

#: The card's Markdown template, a package file beside this module.
TEMPLATE_FILE = "model_card.md"


@functools.cache
def card_template():
    """The card's template (:data:`TEMPLATE_FILE`, read once).

    Returns
    -------
    string.Template

    Example
    -------
    >>> card_template().template.startswith("# $title: a speech LLM")
    True
    """
    files = importlib.resources.files("speechbrain_blspkd.inference")
    text = files.joinpath(TEMPLATE_FILE).read_text(encoding="utf-8")
    return string.Template(text)


def card_fields(values, destination, run=None, weights=None):
    """The values that fill the card's template.

    Arguments
    ---------
    values : dict
        The export's ``hyperparams.yaml`` values (all keys of
        :data:`~speechbrain_blspkd.inference.model_folder.DEFAULT_CONFIG`).
    destination : pathlib.Path
        Where the folder is (or will be): named in the commands.
    run : dict, optional
        :func:`~speechbrain_blspkd.inference.training_run.read_run` of the
        training run (None: not found).
    weights : dict, optional
        {group: parameter count} of ``model.ckpt``.

    Returns
    -------
    dict
        {template field: text}.

    Example
    -------
    >>> fields = card_fields(DEFAULT_CONFIG, pathlib.Path("/models/m"))
    >>> fields["title"], fields["kind"]
    ('m', 'CFormer adapter, smollm2-135m-instruct')
    """
    from speechbrain_blspkd.version import __version__

    adapter = values.get("adapter_class")
    kind = [f"{card_sections.short_name(adapter)} adapter"] if adapter else []
    if values.get("transcriber_source"):
        kind.append("cascade")
    llm = values.get("llm_source") or "?"
    asset = base_model_info(llm)["asset"]
    kind.append(asset or pathlib.Path(str(llm)).name)
    title = destination.name
    if run is not None and run["recipe"] and title in ("model", "export"):
        title = pathlib.PurePath(run["recipe"]).stem
        if run["corpus"]:
            title += f" on {run['corpus']}"
    rows, fetch = card_sections.base_model_rows(values)
    blocks = {
        "method": card_sections.method_lines(values, weights or {}),
        "base_models": rows,
        "fetch_assets": fetch,
        "training": card_sections.training_lines(run),
        "evaluation": card_sections.evaluation_lines(run),
        "limits": card_sections.limits_lines(values, run),
    }
    return {
        "title": title,
        "kind": ", ".join(kind),
        "version": __version__,
        "folder": str(destination),
        "folder_json": json.dumps(str(destination)),
        **{name: "\n".join(lines) for name, lines in blocks.items()},
    }


def build_model_card(values, destination, run_folder=None, weights_file=None):
    """The text of a model card: the template filled by :func:`card_fields`.

    Arguments
    ---------
    values : dict
        The ``hyperparams.yaml`` values of the export (keys of
        :data:`speechbrain_blspkd.inference.model_folder.DEFAULT_CONFIG`).
    destination : str or pathlib.Path
        Where the folder is (or will be): named in the commands and used
        to find the training run.
    run_folder : str or pathlib.Path, optional
        The training run (default: found, see :func:`find_run_folder`).
    weights_file : str or pathlib.Path, optional
        The ``model.ckpt`` whose parameters are counted.

    Returns
    -------
    str

    Example
    -------
    >>> card = build_model_card(DEFAULT_CONFIG, "/models/blsp-kd")
    >>> card.splitlines()[0]
    '# blsp-kd: a speech LLM (CFormer adapter, smollm2-135m-instruct)'
    >>> "| LLM | `smollm2-135m-instruct` |" in card and "Apache-2.0" in card
    True
    """
    values = {**DEFAULT_CONFIG, **values}  # what render_hparams writes
    destination = pathlib.Path(destination)
    run = find_run_folder(destination, run_folder)
    info = None
    if run is not None:
        try:
            info = read_run(run)
        except Exception as err:  # a card must never break an export
            logger.warning("%s: run left out of the model card (%s)", run, err)
    weights = card_sections.weights_summary(weights_file)
    card = card_template().substitute(
        card_fields(values, destination, info, weights)
    )
    # an empty block leaves no blank line of its own
    return re.sub(r"\n{3,}", "\n\n", card)


def write_model_card(folder, values=None, destination=None, run_folder=None):
    """Write ``folder/README.md`` (atomically).

    Arguments
    ---------
    folder : str or pathlib.Path
        The model folder (during export: its temporary folder).
    values : dict, optional
        The ``hyperparams.yaml`` values (default: ``export.json``'s
        ``config``, else read from ``hyperparams.yaml``).
    destination : str or pathlib.Path, optional
        The folder's final place (default ``folder``).
    run_folder : str or pathlib.Path, optional
        The training run (default: found).

    Returns
    -------
    pathlib.Path
        The card.

    Example
    -------
    >>> import tempfile
    >>> from speechbrain_blspkd.inference.export import render_hparams
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (folder / "hyperparams.yaml").write_text(render_hparams())
    >>> write_model_card(folder).read_text().count("## ")
    7
    """
    folder = pathlib.Path(folder)
    if values is None:
        values = _folder_values(folder)
    card = build_model_card(
        values,
        destination or folder,
        run_folder=run_folder,
        weights_file=folder / WEIGHTS_FILE,
    )
    path = folder / CARD_FILE
    atomic_write_text(path, card)
    return path


def _folder_values(folder):
    info = folder / INFO_FILE
    if info.is_file():
        try:
            return json.loads(info.read_text(encoding="utf-8"))["config"]
        except (ValueError, KeyError, TypeError):
            pass
    hparams = read_plain_yaml(folder / HPARAMS_FILE) or {}
    return {k: hparams.get(k, v) for k, v in DEFAULT_CONFIG.items()}


def main(argv=None):
    """``python -m speechbrain_blspkd.inference.model_card FOLDER [--run R]``.

    Returns
    -------
    int
        0, or 2 when FOLDER is not a model folder.
    """
    from speechbrain_blspkd.utils.cli import report_error

    parser = argparse.ArgumentParser(
        prog="python -m speechbrain_blspkd.inference.model_card",
        description="(Re)write the README.md model card of an exported "
        "model folder.",
    )
    parser.add_argument("folder", help="exported model folder")
    parser.add_argument(
        "--run", default=None, help="the training run's output folder"
    )
    args = parser.parse_args(argv)
    folder = pathlib.Path(args.folder)
    if not (folder / "hyperparams.yaml").is_file():
        return report_error(
            f"{folder}: no hyperparams.yaml; not an exported model folder",
            status=2,
        )
    path = write_model_card(folder, run_folder=args.run)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
