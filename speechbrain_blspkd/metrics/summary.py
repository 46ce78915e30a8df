"""The evaluation summary: per-utterance rows (:class:`EvalSummary`, JSONL
plus a summary JSON), corpus metrics per task and language, and their
Markdown table.
"""

import json
import pathlib

import torch

from speechbrain_blspkd.metrics.agreement import (
    bleu,
    chrf,
    parity_agreement,
    spoken_qa_accuracy,
    wer,
)
from speechbrain_blspkd.metrics.tokens import count_stats
from speechbrain_blspkd.utils.atomic import atomic_write_text, read_jsonl


def _json_default(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return value.tolist()
    if isinstance(value, pathlib.PurePath):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


class EvalSummary:
    """Per-utterance evaluation rows, written as JSONL plus a summary JSON.

    Every row is a dict with at least ``id``; the usual keys are ``task``,
    ``language``, ``hyp``, ``ref`` (transcript or translation), ``teacher``
    (text-input response of the teacher) and ``answers`` (spoken QA).
    Rows are always kept in a deterministic order (sorted by ``id``), so the
    files of a run split over several ranks equal those of one process.

    Arguments
    ---------
    rows : list of dict, optional
        Initial rows.

    Example
    -------
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> s = EvalSummary()
    >>> s.add(id="b", task="asr", hyp="a cat", ref="a cat")
    >>> s.add({"id": "a", "task": "asr", "hyp": "dog", "ref": "a dog"})
    >>> [r["id"] for r in s.rows]
    ['a', 'b']
    >>> summary = s.summarize()
    >>> summary["asr"]["wer"]
    25.0
    >>> s.write(d / "utts.jsonl", d / "summary.json")
    >>> len(EvalSummary.load_rows(d / "utts.jsonl"))
    2
    """

    def __init__(self, rows=None):
        self._rows = {}
        for row in rows or []:
            self.add(row)

    def add(self, row=None, **fields):
        """Add one row (a dict and/or keyword fields); ``id`` is required.

        A row whose ``id`` is already present must be identical (ranks may
        score a padded duplicate); a differing one raises ValueError.
        """
        row = dict(row or {}, **fields)
        if "id" not in row:
            raise ValueError(f"EvalSummary.add: row without 'id': {row!r}")
        key = str(row["id"])
        row["id"] = key
        old = self._rows.get(key)
        if old is not None and _canonical(old) != _canonical(row):
            raise ValueError(
                f"EvalSummary: conflicting rows for id {key!r}: "
                f"{old!r} vs {row!r}"
            )
        self._rows[key] = row

    def extend(self, rows):
        """Add several rows."""
        for row in rows:
            self.add(row)

    @property
    def rows(self):
        """The rows sorted by ``id`` (a new list)."""
        return [self._rows[k] for k in sorted(self._rows)]

    def __len__(self):
        return len(self._rows)

    @classmethod
    def merge(cls, shards):
        """Merge row lists from several ranks into one sorted summary.

        Exact duplicates (a distributed sampler pads by repeating items)
        are kept once; conflicting rows for one ``id`` raise ValueError.

        Arguments
        ---------
        shards : list of (list of dict or EvalSummary)
            Rows of each rank (e.g. from ``all_gather_object``).

        Returns
        -------
        EvalSummary

        Example
        -------
        >>> m = EvalSummary.merge([[{"id": "2"}, {"id": "0"}], [{"id": "1"}]])
        >>> [r["id"] for r in m.rows]
        ['0', '1', '2']
        """
        merged = cls()
        for shard in shards:
            merged.extend(shard.rows if isinstance(shard, cls) else shard)
        return merged

    @staticmethod
    def load_rows(path):
        """Read rows back from a JSONL file written by :meth:`write_rows`."""
        return read_jsonl(path)

    def write_rows(self, path):
        """Write the rows as JSONL (one a line, sorted by id), atomically."""
        lines = [
            json.dumps(r, ensure_ascii=False, default=_json_default)
            for r in self.rows
        ]
        atomic_write_text(path, "".join(line + "\n" for line in lines))

    def summarize(self, seed=0):
        """Corpus metrics per task (and language when rows mix languages).

        Per group (key ``task`` or ``task/language``): ``n``; with ``hyp``
        and ``ref``: ``wer`` (+ ins/del/sub/num_words), ``chrf`` and
        ``bleu``; with ``hyp`` and ``teacher``: the
        :func:`parity_agreement` numbers prefixed ``parity_``; with ``hyp``
        and ``answers``: ``qa_accuracy`` and ``qa_exact_match``.  Each
        metric uses the rows of the group that have its fields.

        Arguments
        ---------
        seed : int
            Seed of the parity shuffled baseline.

        Returns
        -------
        dict
        """
        groups = {}
        for row in self.rows:
            task = str(row.get("task", "default"))
            lang = str(row.get("language") or "en")
            groups.setdefault(task, {}).setdefault(lang, []).append(row)
        summary = {}
        for task, by_lang in groups.items():
            for lang, rows in by_lang.items():
                key = task if len(by_lang) == 1 else f"{task}/{lang}"
                summary[key] = _summarize_group(rows, lang, seed)
        return summary

    def write_summary(self, path, extra=None, seed=0):
        """Write :meth:`summarize` (updated with ``extra``) as JSON, atomically.

        Returns
        -------
        dict
            What was written.
        """
        summary = self.summarize(seed=seed)
        summary.update(extra or {})
        text = json.dumps(
            summary, indent=2, ensure_ascii=False, default=_json_default
        )
        atomic_write_text(path, text + "\n")
        return summary

    def write(self, rows_path, summary_path, extra=None, seed=0):
        """Write both the per-utterance JSONL and the summary JSON."""
        self.write_rows(rows_path)
        self.write_summary(summary_path, extra=extra, seed=seed)


def _canonical(row):
    return json.dumps(row, sort_keys=True, default=_json_default)


def _summarize_group(rows, lang, seed):
    out = {"n": len(rows)}
    with_ref = [r for r in rows if r.get("ref") is not None and "hyp" in r]
    if with_ref:
        hyps = [r["hyp"] or "" for r in with_ref]
        refs = [r["ref"] for r in with_ref]
        scores = wer(hyps, refs, lang, ids=[r["id"] for r in with_ref])
        scores.pop("details")
        scores.pop("num_utts")
        out.update(scores)
        out["chrf"] = chrf(hyps, refs)
        out["bleu"] = bleu(hyps, refs, lang)
    with_teacher = [
        r for r in rows if r.get("teacher") is not None and "hyp" in r
    ]
    if with_teacher:
        parity = parity_agreement(
            [r["hyp"] or "" for r in with_teacher],
            [r["teacher"] for r in with_teacher],
            seed=seed,
            language=lang,
        )
        out.update({f"parity_{k}": v for k, v in parity.items()})
    with_answers = [r for r in rows if r.get("answers") and "hyp" in r]
    if with_answers:
        qa = spoken_qa_accuracy(
            [r["hyp"] or "" for r in with_answers],
            [r["answers"] for r in with_answers],
            language=lang,
        )
        out["qa_accuracy"] = qa["accuracy"]
        out["qa_exact_match"] = qa["exact_match"]
        out["qa_n"] = qa["n"]
    return out


def summarize_parity(rows, seed=0):
    """Overall and per-language numbers of
    :func:`~speechbrain_blspkd.evaluation.decode_rows` rows.

    Returns
    -------
    dict
        ``tasks``: per task ``speech`` (agreement of the speech answers with
        the teacher: chrF, WER, shuffled baseline), ``teacher`` (the
        teacher against itself: the upper bound) and, for ``repeat``, the
        teacher's and the speech answer's WER against the transcript;
        ``count``: exact-count rate and mean absolute count error;
        ``by_language``: :meth:`EvalSummary.summarize` output.
    """
    tasks = {}
    for task in sorted({r["task"] for r in rows}):
        sub = [r for r in rows if r["task"] == task]
        hyps = [r["hyp"] for r in sub]
        teach = [r["teacher"] for r in sub]
        entry = {
            "n": len(sub),
            "speech": parity_agreement(hyps, teach, seed=seed)
            if len(sub) > 1
            else parity_agreement(hyps, teach),
            "teacher": parity_agreement(teach, teach, seed=seed),
        }
        refs = [r.get("ref") for r in sub]
        if all(refs):
            entry["teacher_vs_ref_wer"] = wer(teach, refs)["wer"]
            entry["speech_vs_ref_wer"] = wer(hyps, refs)["wer"]
        tasks[task] = entry
    first_task = rows[0]["task"] if rows else None
    per_utt = [r for r in rows if r["task"] == first_task]
    count = count_stats(
        [r["num_pred"] for r in per_utt], [r["num_target"] for r in per_utt]
    )
    by_lang = EvalSummary(
        [{k: v for k, v in r.items() if k != "transcript"} for r in rows]
    ).summarize(seed=seed)
    return {"tasks": tasks, "count": count, "by_language": by_lang}


def format_summary(summary):
    """A Markdown table of a :func:`summarize_parity` summary: one line
    per task and language (agreement chrF / WER with the shuffled level,
    QA accuracy where the rows have answers).

    Example
    -------
    >>> rows = [dict(id=f"{u}/qa", utt=u, task="qa", language="en", hyp=h,
    ...     teacher=t, answers=[t], num_pred=1, num_target=1)
    ...     for u, h, t in [("a", "Paris", "Paris"), ("b", "Rome", "Oslo")]]
    >>> print(format_summary(summarize_parity(rows)))
    | task | language | n | chrF (shuffled) | WER (shuffled) | QA accuracy |
    |---|---|---|---|---|---|
    | qa | all | 2 | 70.1 (2.8) | 50.0 (100.0) | 50.0 |
    """
    head = (
        "| task | language | n | chrF (shuffled) | WER (shuffled) "
        "| QA accuracy |\n|---|---|---|---|---|---|"
    )

    def fmt(value, scale=1.0):
        return "-" if value is None else f"{scale * value:.1f}"

    lines = [head]
    for key, entry in sorted(summary["by_language"].items()):
        task, _, language = key.partition("/")
        language = language or "all"
        if "parity_chrf" not in entry:
            continue
        lines.append(
            f"| {task} | {language} | {entry['n']} "
            f"| {fmt(entry['parity_chrf'])} "
            f"({fmt(entry.get('parity_shuffled_chrf'))}) "
            f"| {fmt(entry['parity_wer'])} "
            f"({fmt(entry.get('parity_shuffled_wer'))}) "
            f"| {fmt(entry.get('qa_accuracy'), 100)} |"
        )
    return "\n".join(lines)
