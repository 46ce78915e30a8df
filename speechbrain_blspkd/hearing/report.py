"""The hearing report: the markdown tables of the measurement's results.

Authors
 * speechbrain-blspkd contributors 2026
"""

from speechbrain_blspkd.hearing.ladder import LADDER_RUNGS
from speechbrain_blspkd.hearing.sets import SET_TITLES


def _num(value, digits=1):
    return "-" if value is None else f"{value:.{digits}f}"


def _pct(value):
    return "-" if value is None else f"{100 * value:.1f} %"


def _task_cell(entry, key):
    if entry is None:
        return "-"
    shuffled = entry.get(f"shuffled_{key}")
    return f"{_num(entry[key])} ({_num(shuffled)})"


def format_tables(results):
    """The markdown report of :func:`measure`'s results.

    Example
    -------
    >>> agree = {"chrf": 50.0, "wer": 60.0, "shuffled_chrf": 12.0,
    ...     "shuffled_wer": 99.0}
    >>> system = {"repeat": agree, "continue": agree,
    ...     "repeat_wer_vs_transcript": 70.0}
    >>> results = {"model": "m", "date": "2026-12-02", "sets": {"s": {"n": 2,
    ...     "coverage": {"token_coverage": 0.9, "type_coverage": 0.8},
    ...     "systems": {"teacher": system}}}}
    >>> print(format_tables(results).splitlines()[-1])
    | teacher (text input) | 50.0 (12.0) | 60.0 (99.0) | 50.0 (12.0) | 60.0 (99.0) | 70.0 | - | - | - | - | - | - |
    """
    names = {
        "teacher": "teacher (text input)",
        "speech": "speech LLM",
        "cascade": f"cascade ({results.get('cascade_asr') or 'Whisper'} -> same LLM)",
    }
    lines = [f"# Hearing: {results['model']} ({results['date']})", ""]
    lines.append(
        "chrF / WER: agreement with the teacher's answer to the same "
        "instruction given the transcript as text; in brackets the "
        "shuffled-pair level. Token accuracy: nearest LLM token of each "
        "speech token (cascade: the LLM tokens of Whisper's transcript) "
        "against the transcript's, at the true count N and at the "
        "predicted count N^ (a count error shifts later tokens); token error "
        "rate: the edit distance of the tokens at N^ over the true tokens "
        "(a missing or extra token is one error)."
    )
    for name, entry in results["sets"].items():
        cov = entry["coverage"]
        lines += [
            "",
            f"## {SET_TITLES.get(name, name)}: {entry['n']} utterances",
            "",
            f"Vocabulary coverage: {_pct(cov['token_coverage'])} of the test "
            f"tokens ({_pct(cov['type_coverage'])} of the distinct ones) occur "
            "in the training transcripts.",
            "",
            "| system | repeat chrF (shuf) | repeat WER (shuf) | continue chrF "
            "(shuf) | continue WER (shuf) | repeat WER vs transcript | "
            "exact N | mean abs(N^-N) | token acc. (true N) | token acc. "
            "(predicted N) | token error rate (predicted N) | transcript WER |",
            "|" + "---|" * 12,
        ]
        for key, system in entry["systems"].items():
            count = system.get("count") or {}
            true_acc = system.get("token_accuracy_true_count")
            pred_acc = system.get("token_accuracy_predicted_count")
            ter = system.get("token_error_rate_predicted_count")
            cells = [
                names.get(key, key),
                _task_cell(system.get("repeat"), "chrf"),
                _task_cell(system.get("repeat"), "wer"),
                _task_cell(system.get("continue"), "chrf"),
                _task_cell(system.get("continue"), "wer"),
                _num(system.get("repeat_wer_vs_transcript")),
                _pct(count.get("exact_rate")),
                _num(count.get("mean_abs_error"), 2),
                _pct(true_acc and true_acc["accuracy"]),
                _pct(pred_acc and pred_acc["accuracy"]),
                _pct(ter and ter["ter"]),
                _num(system.get("transcript_wer")),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ladder_table(results)
    return "\n".join(lines) + "\n"


def ladder_table(results):
    """The quality ladder's markdown lines (none when no set has one):
    rungs a-e as rows, the test sets as columns.

    Example
    -------
    >>> rung = {"chrf": 50.0, "shuffled_chrf": 12.0}
    >>> results = {"sets": {"s": {"ladder": {"n": 2, "rungs": dict.fromkeys(
    ...     "abcde", rung), "e_matches_speech_rows": {"same": 1, "n": 2}}},
    ...     "t": {"ladder": {"skipped": "not CIF"}}}}
    >>> for line in ladder_table(results)[5:]:
    ...     print(line)
    | fed to the LLM in place of the speech embeddings | s | t |
    |---|---|---|
    | a. transcript token embeddings | 50.0 (12.0) | - |
    | b. adapter at true N, snapped to nearest tokens | 50.0 (12.0) | - |
    | c. adapter at true N | 50.0 (12.0) | - |
    | d. adapter at predicted N^, snapped to nearest tokens | 50.0 (12.0) | - |
    | e. adapter at predicted N^ (inference) | 50.0 (12.0) | - |
    <BLANKLINE>
    s: rung e differs from the speech LLM's repeat answer on 1 of 2 clips.
    t: skipped (not CIF).
    """
    sets = {
        name: entry["ladder"]
        for name, entry in results["sets"].items()
        if "ladder" in entry
    }
    if not sets:
        return []
    lines = [
        "",
        "## Quality ladder: repeat chrF (shuffled)",
        "",
        'Agreement of the "repeat" answer with the teacher\'s when the '
        "speech LLM (PLoRA on the speech positions, its speech prompt) is "
        "fed, in place of the speech embeddings, each rung; snapped: every "
        "vector replaced by the embedding of its nearest LLM token (cosine). "
        "Rung e is what inference does (the speech LLM row above).",
        "",
        "| fed to the LLM in place of the speech embeddings | "
        + " | ".join(sets)
        + " |",
        "|" + "---|" * (len(sets) + 1),
    ]
    for key, label in LADDER_RUNGS.items():
        cells = [f"{key}. {label}"]
        for ladder in sets.values():
            rung = ladder.get("rungs", {}).get(key)
            cells.append(_task_cell(rung, "chrf"))
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    for name, ladder in sets.items():
        if "skipped" in ladder:
            notes.append(f"{name}: skipped ({ladder['skipped']}).")
            continue
        match = ladder.get("e_matches_speech_rows")
        rung = ladder.get("inference_rung", "e")
        if rung != "e":
            notes.append(
                f"{name}: this model snaps its speech embeddings to the "
                f"nearest tokens at generation (snap_speech): inference is "
                f"rung {rung}."
            )
        if match and match["same"] != match["n"]:
            notes.append(
                f"{name}: rung {rung} differs from the speech LLM's repeat "
                f"answer on {match['n'] - match['same']} of {match['n']} "
                "clips."
            )
    if notes:
        lines += [""] + notes
    return lines
