#!/usr/bin/env python3
"""Compare recipe runs per language (the README's multilingual tables).

Usage::

    python compare.py NAME=RUN_FOLDER [NAME=RUN_FOLDER ...] [--out FILE.md]

Each ``RUN_FOLDER`` is a finished ``train.py`` run (its
``eval/trained/summary.json`` and ``eval/trained/rows.jsonl``, as
:func:`speechbrain_blspkd.evaluation.evaluate_parity` writes them). For
every task the table has one line per system: the agreement of its speech
answers with the text teacher's answers (chrF, the shuffled-pair level in
brackets) per language and over all utterances, and, for systems whose
adapter has a language gate, its LID accuracy on the test split. A last
line per task shows what the text teacher itself does with the
transcript: for ``repeat``, the chrF of its answer against the transcript
(how well the LLM repeats each language: the ceiling of every speech
system), for other tasks the share of its answers that merely repeat the
transcript. After the tables come the gates' confusion matrices.
"""

import argparse
import json
import pathlib
import sys

from speechbrain_blspkd import metrics
from speechbrain_blspkd.utils.atomic import atomic_write_text


def load_run(folder):
    """``(summary, rows)`` of a run's trained-model evaluation.

    Raises ``ValueError`` naming the file that is missing or unreadable.
    """
    folder = pathlib.Path(folder) / "eval" / "trained"
    summary_path, rows_path = folder / "summary.json", folder / "rows.jsonl"
    for path in (summary_path, rows_path):
        if not path.is_file():
            raise ValueError(f"{path}: missing (has the run finished?)")
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{summary_path}: unreadable JSON ({err})") from err
    rows = metrics.EvalSummary.load_rows(rows_path)
    return summary, rows


def _chrf_cell(chrf, shuffled):
    """``chrF (shuffled)``, ``-`` when there is no chrF."""
    if chrf is None:
        return "-"
    return f"{chrf:.1f}" if shuffled is None else f"{chrf:.1f} ({shuffled:.1f})"


def teacher_cells(rows, task, languages):
    """What the text teacher does with the transcript, per language.

    ``repeat``: chrF of its answer against the transcript; other tasks: %
    of its answers that equal the transcript (after normalisation).

    Example
    -------
    >>> rows = [dict(task="continue", language="en", teacher="A b.",
    ...     transcript="a b"), dict(task="continue", language="en",
    ...     teacher="c d", transcript="a b")]
    >>> teacher_cells(rows, "continue", ["en"])
    ['50 %', '50 %']
    """
    cells = []
    for language in [*languages, None]:
        sub = [
            r
            for r in rows
            if r["task"] == task
            and (language is None or r["language"] == language)
        ]
        if not sub:
            cells.append("-")
        elif task == "repeat":
            score = metrics.chrf(
                [r["teacher"] for r in sub], [r["transcript"] for r in sub]
            )
            cells.append(f"{score:.1f}")
        else:
            same = sum(
                metrics.normalize_text(r["teacher"], r["language"])
                == metrics.normalize_text(r["transcript"], r["language"])
                for r in sub
            )
            cells.append(f"{100 * same / len(sub):.0f} %")
    return cells


def compare(runs):
    """The Markdown report of ``runs`` (``{name: (summary, rows)}``)."""
    first_rows = next(iter(runs.values()))[1]
    tasks = sorted({r["task"] for r in first_rows})
    languages = list(dict.fromkeys(r["language"] for r in first_rows))
    confusions = {
        name: metrics.confusion_from_stats(summary.get("adapter") or {})
        for name, (summary, _) in runs.items()
    }
    out = []
    for task in tasks:
        out += [
            f"**{task}**: chrF of the speech answer against the text "
            "answer (shuffled-pair level)",
            "",
            "| system | " + " | ".join(languages) + " | all | LID acc. |",
            "|---" * (len(languages) + 3) + "|",
        ]
        for name, (summary, _) in runs.items():
            by_language = summary.get("by_language") or {}
            cells = []
            for language in languages:
                entry = by_language.get(f"{task}/{language}") or {}
                cells.append(
                    _chrf_cell(
                        entry.get("parity_chrf"),
                        entry.get("parity_shuffled_chrf"),
                    )
                )
            speech = ((summary.get("tasks") or {}).get(task) or {}).get(
                "speech"
            ) or {}
            cells.append(
                _chrf_cell(speech.get("chrf"), speech.get("shuffled_chrf"))
            )
            confusion = confusions[name]
            cells.append(
                "-"
                if confusion is None
                else f"{100 * confusion['accuracy']:.1f} %"
            )
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        what = (
            "chrF vs transcript" if task == "repeat" else "answers = transcript"
        )
        out.append(
            f"| text teacher ({what}) | "
            + " | ".join(teacher_cells(first_rows, task, languages))
            + " | - |"
        )
        out.append("")
    for name, confusion in confusions.items():
        if confusion is None:
            continue
        out += [
            f"**{name}**: the gate's language decisions on the test split "
            f"(LID accuracy {100 * confusion['accuracy']:.1f} %; % of each "
            "true language)",
            "",
            metrics.format_confusion(confusion),
            "",
        ]
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="NAME=RUN_FOLDER")
    parser.add_argument("--out", help="also write the report here")
    args = parser.parse_args(argv)
    runs = {}
    for item in args.runs:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            parser.error(f"{item!r} is not NAME=RUN_FOLDER")
        try:
            runs[name] = load_run(folder)
        except ValueError as err:
            print(f"compare.py: {err}", file=sys.stderr)
            return 1
    report = compare(runs)
    print(report)
    if args.out:
        atomic_write_text(args.out, report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
