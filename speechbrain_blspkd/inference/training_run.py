"""What a recipe's training run folder tells about the model it exported.

A recipe run (``train.py``) keeps in its ``output_folder`` the resolved
``hyperparams.yaml``, ``train_steps.jsonl``, ``save/`` and ``eval/``.
:func:`find_run_folder` finds the run of an exported folder;
:func:`read_run` reads what the model card
(:mod:`speechbrain_blspkd.inference.model_card`) tells about it: the recipe,
the training data (manifests: utterances, hours, languages), each stage
(objective and its term weights, epochs, optimiser steps, learning rate)
and the run's evaluation summaries (``eval/<name>/summary.json``).

Finding the run
---------------
The run whose ``hyperparams.yaml`` names the exported folder as its
``export_folder`` is used: the one given as ``run_folder``, else the
export's parent folder (the recipes' default ``<output_folder>/model``),
else the folder of a ``log.txt`` the current process logs to (speechbrain
logs a run there, which covers an ``export_folder`` placed elsewhere).

Authors
 * speechbrain-blspkd contributors 2026
"""

import collections
import csv
import importlib
import inspect
import json
import logging
import pathlib

import yaml

__all__ = [
    "class_doc_line",
    "find_run_folder",
    "read_plain_yaml",
    "read_run",
]

logger = logging.getLogger(__name__)


class _TolerantLoader(yaml.SafeLoader):
    """Reads HyperPyYAML as plain YAML: a tagged node keeps its value and,
    for mappings, gets its tag under ``"__tag__"``."""


def _tagged(loader, suffix, node):
    if isinstance(node, yaml.MappingNode):
        value = loader.construct_mapping(node, deep=True)
        return {"__tag__": suffix, **value}
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


_TolerantLoader.add_multi_constructor("!", _tagged)


def read_plain_yaml(path):
    """A HyperPyYAML file as plain data (tags kept as ``__tag__``)."""
    with open(path, encoding="utf-8") as f:
        return yaml.load(f, Loader=_TolerantLoader)


def _same_path(a, b):
    try:
        return pathlib.Path(a).expanduser().resolve() == (
            pathlib.Path(b).expanduser().resolve()
        )
    except (OSError, RuntimeError, TypeError):
        return False


def _names_export(run, destination):
    """Whether ``run/hyperparams.yaml`` exports to ``destination``."""
    path = pathlib.Path(run) / "hyperparams.yaml"
    if not path.is_file():
        return False
    try:
        hparams = read_plain_yaml(path)
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return False
    if not isinstance(hparams, dict) or not hparams.get("export_folder"):
        return False
    return _same_path(hparams["export_folder"], destination)


def _logged_folders():
    """Folders of the files the root logger (and its children) write to."""
    seen = []
    loggers = [logging.getLogger()] + [
        lg
        for lg in logging.Logger.manager.loggerDict.values()
        if isinstance(lg, logging.Logger)
    ]
    for lg in loggers:
        for handler in lg.handlers:
            name = getattr(handler, "baseFilename", None)
            if name:
                folder = pathlib.Path(name).parent
                if folder not in seen:
                    seen.append(folder)
    return seen


def find_run_folder(destination, run_folder=None):
    """The training run that exports to ``destination``, or None.

    Arguments
    ---------
    destination : str or pathlib.Path
        The exported folder (its final place).
    run_folder : str or pathlib.Path, optional
        A run folder to use when it holds a ``hyperparams.yaml`` (it need
        not name ``destination``: the caller vouches for it).

    Returns
    -------
    pathlib.Path or None

    Example
    -------
    >>> import tempfile
    >>> run = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (run / "hyperparams.yaml").write_text(
    ...     f"export_folder: {run / 'model'}\\n")
    >>> find_run_folder(run / "model") == run
    True
    >>> find_run_folder(run / "elsewhere") is None
    True
    """
    if run_folder is not None:
        run_folder = pathlib.Path(run_folder)
        if (run_folder / "hyperparams.yaml").is_file():
            return run_folder
        logger.warning("%s: no hyperparams.yaml; not a run folder", run_folder)
        return None
    destination = pathlib.Path(destination)
    for candidate in [destination.parent] + _logged_folders():
        if _names_export(candidate, destination):
            return candidate
    return None


def _read_jsonl(path):
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue  # a line cut by an interruption
    return rows


def _stage_steps(step_log, total=None):
    """{stage: optimiser steps} from the step log (global step counter)."""
    last = collections.OrderedDict()
    for row in _read_jsonl(step_log):
        stage, step = row.get("stage"), row.get("step")
        if stage is None or not isinstance(step, (int, float)):
            continue
        last[stage] = max(int(step), last.get(stage, 0))
    if total is not None and last:
        final = next(reversed(last))
        last[final] = max(last[final], int(total))
    steps, previous = {}, 0
    for stage, end in last.items():
        steps[stage] = end - previous
        previous = end
    return steps


def _total_steps(save_folder):
    """Optimiser steps of the latest checkpoint in ``save_folder``."""
    best = None
    for ckpt in pathlib.Path(save_folder).glob("CKPT*/brain.ckpt"):
        try:
            meta = yaml.safe_load((ckpt.parent / "CKPT.yaml").read_text())
            info = yaml.safe_load(ckpt.read_text())
            when, step = float(meta["unixtime"]), int(info["optimizer_step"])
        except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
            continue
        if best is None or when > best[0]:
            best = (when, step)
    return None if best is None else best[1]


def _manifest_stats(path):
    """Utterances, hours, languages and speakers of a manifest CSV."""
    path = pathlib.Path(path)
    stats = {"path": str(path), "name": path.name}
    if not path.is_file():
        return stats
    languages, speakers, seconds, n = collections.Counter(), set(), 0.0, 0
    try:
        with open(path, encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f):
                n += 1
                languages[(row.get("language") or "?").strip()] += 1
                speakers.add(row.get("speaker") or "")
                try:
                    seconds += float(row.get("duration") or 0.0)
                except ValueError:
                    pass
    except (OSError, UnicodeDecodeError, csv.Error):
        return stats
    stats.update(
        utterances=n,
        hours=seconds / 3600.0,
        languages=dict(languages.most_common()),
        speakers=len(speakers - {""}),
    )
    return stats


def _recipe_of(run):
    """The recipe YAML named in the header of the run's hyperparams copy."""
    try:
        with open(
            pathlib.Path(run) / "hyperparams.yaml", encoding="utf-8"
        ) as f:
            for _ in range(5):
                line = f.readline()
                if line.startswith("#") and line.strip().endswith(".yaml"):
                    name = line.lstrip("# ").strip()
                    if name.startswith("/"):
                        return name
    except OSError:
        pass
    return None


def _corpus_of(recipe):
    """The corpus folder name of a recipe path (recipes/<Corpus>/...)."""
    if not recipe:
        return None
    parts = pathlib.PurePath(recipe).parts
    if "recipes" in parts:
        index = parts.index("recipes")
        if index + 1 < len(parts):
            return parts[index + 1]
    return None


def _objective_summary(objective):
    """(class name, first doc line, non-zero weights) of an objective."""
    if not isinstance(objective, dict):
        return None
    tag = str(objective.get("__tag__", ""))
    class_path = tag.split(":", 1)[1] if ":" in tag else ""
    weights = objective.get("weights") or {}
    nonzero = {}
    if isinstance(weights, dict):
        for key, value in weights.items():
            try:
                if float(value) != 0.0:
                    nonzero[key] = float(value)
            except (TypeError, ValueError):
                continue
    return {
        "class": class_path.rsplit(".", 1)[-1] or "?",
        "class_path": class_path,
        "doc": class_doc_line(class_path),
        "weights": nonzero,
    }


def read_run(run):
    """What the card tells about a run folder.

    Arguments
    ---------
    run : str or pathlib.Path
        A recipe run's ``output_folder``.

    Returns
    -------
    dict
        ``folder``, ``recipe``, ``corpus``, ``seed``, ``stages`` (list of
        dicts: ``name``, ``objective``, ``epochs``, ``steps``, ``lr``,
        ``data``), ``total_steps``, ``data`` (manifest statistics, each
        manifest once) and ``evaluation`` ({name: summary dict}).

    Example
    -------
    >>> import tempfile
    >>> run = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (run / "hyperparams.yaml").write_text("seed: 3\\nstages: []\\n")
    >>> info = read_run(run)
    >>> info["seed"], info["stages"], info["evaluation"]
    (3, [], {})
    """
    run = pathlib.Path(run)
    try:
        hparams = read_plain_yaml(run / "hyperparams.yaml") or {}
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as err:
        logger.warning("%s: cannot read the run's hyperparams (%s)", run, err)
        hparams = {}
    recipe = _recipe_of(run)
    step_log = hparams.get("step_log") or run / "train_steps.jsonl"
    save = hparams.get("save_folder") or run / "save"
    total = _total_steps(save)
    steps = {}
    if pathlib.Path(step_log).is_file():
        steps = _stage_steps(step_log, total)
    stages, data = [], {}
    for stage in hparams.get("stages") or []:
        if not isinstance(stage, dict):
            continue
        name = str(stage.get("name", "?"))
        epochs = stage.get("epochs")
        if isinstance(epochs, dict):
            epochs = epochs.get("limit")
        manifest = stage.get("train_manifest")
        stats = None
        if manifest:
            key = str(manifest)
            if key not in data:
                data[key] = _manifest_stats(manifest)
            stats = data[key]
        stages.append(
            {
                "name": name,
                "objective": _objective_summary(stage.get("objective")),
                "epochs": epochs,
                "steps": steps.get(name, 0 if steps else None),
                "lr": stage.get("lr"),
                "data": stats,
            }
        )
    evaluation = {}
    for name in ("untrained", "trained"):
        path = run / "eval" / name / "summary.json"
        if path.is_file():
            try:
                evaluation[name] = json.loads(path.read_text(encoding="utf-8"))
            except ValueError:
                logger.warning("%s: unreadable; left out of the card", path)
    test = hparams.get("test_manifest") or hparams.get("test_csv")
    return {
        "folder": str(run),
        "recipe": recipe,
        "corpus": _corpus_of(recipe),
        "seed": hparams.get("seed"),
        "stages": stages,
        "total_steps": total,
        "data": list(data.values()),
        "test_data": _manifest_stats(test) if isinstance(test, str) else None,
        "evaluation": evaluation,
    }


def class_doc_line(class_path):
    """The first paragraph of a class's documentation ("" when unknown)."""
    if not class_path:
        return ""
    module, _, name = str(class_path).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return ""
    doc = inspect.getdoc(cls) or ""
    return " ".join(doc.split("\n\n")[0].split())
