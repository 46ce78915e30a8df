"""The language gate's confusion matrix (true against chosen language),
from the joint shares an adapter with a language gate reports.
"""


def confusion_from_stats(stats, prefix="lid_confusion/"):
    """Row-normalised confusion matrix from joint-share statistics.

    An adapter with a language gate reports, per evaluation batch, the
    share of utterances of true language ``t`` sent to ``p`` as
    ``<prefix><t>/<p>``; averaged over a pass these are joint shares.
    Dividing each row by its sum gives P(predicted | true).

    Arguments
    ---------
    stats : dict
        Evaluation means (e.g. ``summary.json``'s ``adapter``); other keys
        are ignored.
    prefix : str
        The key prefix of the joint shares.

    Returns
    -------
    dict
        ``languages`` (the true languages, in first-seen order), ``matrix``
        (``{t: {p: P(p | t)}}``), ``support`` (``{t: share of the pass}``)
        and ``accuracy`` (the trace of the joint shares: the overall LID
        accuracy), or None when ``stats`` holds no such key.

    Example
    -------
    >>> c = confusion_from_stats({"lid_confusion/en/en": 0.375,
    ...     "lid_confusion/en/zh": 0.125, "lid_confusion/zh/en": 0.0,
    ...     "lid_confusion/zh/zh": 0.5, "loss": 1.0})
    >>> c["matrix"]["en"], round(c["accuracy"], 3)
    ({'en': 0.75, 'zh': 0.25}, 0.875)
    """
    joint = {}
    for key, value in stats.items():
        if not key.startswith(prefix):
            continue
        true, _, guess = key[len(prefix) :].partition("/")
        joint.setdefault(true, {})[guess] = float(value)
    if not joint:
        return None
    matrix, support = {}, {}
    for true, row in joint.items():
        total = sum(row.values())
        support[true] = total
        matrix[true] = {
            p: (v / total if total > 0 else 0.0) for p, v in row.items()
        }
    accuracy = sum(row.get(t, 0.0) for t, row in joint.items())
    return {
        "languages": list(joint),
        "matrix": matrix,
        "support": support,
        "accuracy": accuracy,
    }


def format_confusion(confusion):
    """A Markdown table of a :func:`confusion_from_stats` result: rows are
    the true languages, columns the predicted ones, cells % of the row.

    Example
    -------
    >>> print(format_confusion(confusion_from_stats({
    ...     "lid_confusion/en/en": 0.5, "lid_confusion/en/zh": 0.0,
    ...     "lid_confusion/zh/en": 0.125, "lid_confusion/zh/zh": 0.375})))
    | true \\ predicted | en | zh |
    |---|---|---|
    | en | 100 | 0 |
    | zh | 25 | 75 |
    """
    langs = confusion["languages"]
    lines = [
        "| true \\ predicted | " + " | ".join(langs) + " |",
        "|---" * (len(langs) + 1) + "|",
    ]
    for true in langs:
        row = confusion["matrix"][true]
        cells = " | ".join(f"{100 * row.get(p, 0.0):.0f}" for p in langs)
        lines.append(f"| {true} | {cells} |")
    return "\n".join(lines)
