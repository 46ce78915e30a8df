"""The hearing measurement: an exported speech LLM on both test sets.

:func:`measure` loads the model, builds the test sets and writes the
report; :func:`measure_set` gathers every figure of one set (the teacher,
the speech LLM, the cascade, and with ``ladder`` the quality ladder).

Authors
 * speechbrain-blspkd contributors 2026
"""

import datetime
import json
import logging
import pathlib

import speechbrain as sb

from speechbrain_blspkd import metrics
from speechbrain_blspkd.dataio.manifest import read_manifest
from speechbrain_blspkd.evaluation import decode_rows
from speechbrain_blspkd.hearing.cache import (
    CACHE_VERSION,
    load_teacher,
    save_teacher,
    teacher_key_of,
)
from speechbrain_blspkd.hearing.cascade import build_cascade, measure_cascade
from speechbrain_blspkd.hearing.ladder import measure_ladder
from speechbrain_blspkd.hearing.report import format_tables
from speechbrain_blspkd.hearing.sets import (
    DEFAULT_TASKS,
    ESPEAK_SET,
    PIPER_SET,
    english_rows,
    tasks_of,
)
from speechbrain_blspkd.hearing.tokens import adapter_token_accuracy
from speechbrain_blspkd.metrics import summarize_parity
from speechbrain_blspkd.teacher_answers import fingerprint as _fingerprint
from speechbrain_blspkd.utils.atomic import atomic_write_text

logger = logging.getLogger(__name__)


def resolve_model_folder(path):
    """The exported model folder: ``path`` itself or ``path/model``.

    Arguments
    ---------
    path : str or pathlib.Path
        An exported folder (``hyperparams.yaml`` and ``model.ckpt``) or a
        recipe run folder holding its export in ``model/`` (a run folder
        has a ``hyperparams.yaml`` of its own: the recipe's).

    Returns
    -------
    pathlib.Path

    Example
    -------
    >>> import pathlib, tempfile
    >>> run = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (run / "hyperparams.yaml").touch(), (run / "model").mkdir()
    >>> for name in ("hyperparams.yaml", "model.ckpt"):
    ...     (run / "model" / name).touch()
    >>> resolve_model_folder(run) == run / "model"
    True
    >>> resolve_model_folder(run / "nothing")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    FileNotFoundError: .../nothing: no exported model (hyperparams.yaml + model.ckpt) here or in model/
    """
    from speechbrain_blspkd.inference.model_folder import (
        HPARAMS_FILE,
        WEIGHTS_FILE,
    )

    path = pathlib.Path(path)
    for folder in (path, path / "model"):
        if all((folder / f).is_file() for f in (HPARAMS_FILE, WEIGHTS_FILE)):
            return folder
    raise FileNotFoundError(
        f"{path}: no exported model ({HPARAMS_FILE} + {WEIGHTS_FILE}) here "
        "or in model/"
    )


def _agreement(summary, side):
    """Per task chrF/WER of one side of :func:`summarize_parity`."""
    out = {}
    for task, entry in summary["tasks"].items():
        agree = entry[side]
        out[task] = {
            k: agree[k]
            for k in ("chrf", "wer", "shuffled_chrf", "shuffled_wer")
        }
    ref_key = "teacher_vs_ref_wer" if side == "teacher" else "speech_vs_ref_wer"
    out["repeat_wer_vs_transcript"] = (
        summary["tasks"].get("repeat", {}).get(ref_key)
    )
    return out


def _token_figures(tokens):
    """The speech row's figures of :func:`adapter_token_accuracy`."""
    return {
        "token_accuracy_true_count": tokens["true_count"],
        "token_accuracy_predicted_count": tokens["predicted_count"],
        "token_error_rate_predicted_count": tokens[
            "error_rate_predicted_count"
        ],
        "collapse_rate": tokens["collapse_rate"],
    }


def measure_set(
    model,
    rows,
    tasks,
    train_ids,
    out_folder,
    cache_dir,
    cascade_factory=None,
    batch_size=8,
    max_new_tokens=32,
    source=None,
    teacher_key=None,
    decode=True,
    ladder=False,
):
    """Every figure of one test set (see the package notes,
    :mod:`speechbrain_blspkd.hearing`).

    Arguments
    ---------
    model : SpeechLLMModel
        The speech LLM.
    rows : list of dict
        Manifest rows (``wav`` resolved).
    tasks : dict
        ``{task: instruction}`` (instructions resolved).
    train_ids : list of (list of int)
        LLM token ids of the training transcripts (coverage).
    out_folder : pathlib.Path
        Where the decoded rows go.
    cache_dir : pathlib.Path
        Teacher answers and cascade results.
    cascade_factory : callable, optional
        ``() -> (cascade model, its cache key parts)``; None: no cascade.
    batch_size, max_new_tokens : int
        Decoding settings.
    source : str, optional
        The manifest (named in errors).
    teacher_key : str, optional
        Cache key of the teacher answers (default: computed, which hashes
        the LLM weights).
    decode : bool
        Decode the tasks (agreement figures); False: only the adapter's
        token and count figures (no LLM generation, no cascade; the quick
        measurement of an ablation).
    ladder : bool
        With ``decode``: also the quality ladder (:func:`quality_ladder`
        on the "repeat" task; its answers go to ``ladder_rows.jsonl``).

    Returns
    -------
    dict
        ``n``, ``coverage`` and ``systems`` (``teacher``, ``speech`` and
        ``cascade`` when measured); ``ladder`` when asked for (see
        :func:`~speechbrain_blspkd.hearing.ladder.measure_ladder`).
    """
    out_folder = pathlib.Path(out_folder)
    cache_dir = pathlib.Path(cache_dir)
    test_ids = model.transcript_ids([r["transcript"] for r in rows])
    coverage = metrics.vocabulary_coverage(test_ids, train_ids)
    if not decode:
        tokens = adapter_token_accuracy(model, rows, batch_size, source=source)
        speech = {}
        if tokens is not None:
            speech = {"count": tokens["count"], **_token_figures(tokens)}
        return {
            "n": len(rows),
            "coverage": coverage,
            "systems": {"speech": speech},
        }
    options = dict(batch_size=batch_size, max_new_tokens=max_new_tokens)
    key = teacher_key or teacher_key_of(model, tasks, max_new_tokens)
    teacher_path = cache_dir / f"teacher_{key[:20]}.json"
    teacher, stored = load_teacher(teacher_path, key, rows)
    logger.info("speech LLM: decoding %d utterances", len(rows))
    decoded = decode_rows(
        model, rows, tasks, teacher_cache=teacher, source=source, **options
    )
    save_teacher(teacher_path, key, stored, decoded)
    metrics.EvalSummary(decoded).write_rows(out_folder / "speech_rows.jsonl")
    summary = summarize_parity(decoded)
    systems = {"teacher": _agreement(summary, "teacher")}
    speech = _agreement(summary, "speech")
    speech["count"] = summary["count"]
    tokens = adapter_token_accuracy(model, rows, batch_size, source=source)
    if tokens is not None:
        speech.update(_token_figures(tokens))
    systems["speech"] = speech
    extra = {}
    if ladder:
        extra["ladder"] = measure_ladder(
            model, rows, tasks, decoded, out_folder, options, source
        )
    if cascade_factory is not None:
        logger.info("cascade: decoding %d utterances", len(rows))
        casc_rows, transcripts = measure_cascade(
            cascade_factory, rows, tasks, options, teacher, cache_dir, source
        )
        metrics.EvalSummary(casc_rows).write_rows(
            out_folder / "cascade_rows.jsonl"
        )
        casc_summary = summarize_parity(casc_rows)
        cascade = _agreement(casc_summary, "speech")
        cascade["count"] = casc_summary["count"]
        heard = [transcripts[r["ID"]] for r in rows]
        cascade["transcript_wer"] = metrics.wer(
            heard, [r["transcript"] for r in rows]
        )["wer"]
        heard_ids = model.transcript_ids([t or " " for t in heard])
        cascade["token_accuracy_predicted_count"] = (
            metrics.positional_token_accuracy(heard_ids, test_ids)
        )
        cascade["token_error_rate_predicted_count"] = metrics.token_error_rate(
            heard_ids, test_ids
        )
        systems["cascade"] = cascade
    return {"n": len(rows), "coverage": coverage, "systems": systems, **extra}


def measure(
    model_folder,
    synth_folder,
    out_folder="results/hearing",
    cache_dir="results/hearing_cache",
    train_manifest=None,
    piper_folder=None,
    piper_num=100,
    asr="whisper-base",
    asr_max_new_tokens=96,
    cascade=True,
    tasks=None,
    batch_size=8,
    max_new_tokens=32,
    max_utterances=None,
    device=None,
    decode=True,
    ladder=False,
):
    """Measure an exported speech LLM on both test sets and write the report.

    Arguments
    ---------
    model_folder : str or pathlib.Path
        Exported model folder, or a run folder with ``model/``.
    synth_folder : str or pathlib.Path
        The SynthSpeech corpus the model was trained on (its ``test.csv``,
        ``train.csv`` and plan).
    out_folder : str or pathlib.Path
        Where ``hearing.json``, ``hearing.md`` and the decoded rows go.
    cache_dir : str or pathlib.Path
        Teacher answers and cascade results (safe to share between runs).
    train_manifest : str or pathlib.Path, optional
        Training transcripts for the coverage (default
        ``synth_folder/train.csv``).
    piper_folder : str or pathlib.Path, optional
        The piper test set (built there when missing; default
        :func:`~speechbrain_blspkd.dataprep.unseen_engine.default_folder`).
    piper_num : int
        Its number of sentences.
    asr : str
        Whisper of the cascade (asset name or folder).
    asr_max_new_tokens : int
        Transcript length limit of the cascade.
    cascade : bool
        Measure the cascade row.
    tasks : dict, optional
        ``{task: instruction or None}`` (default :data:`DEFAULT_TASKS`).
    batch_size, max_new_tokens : int
        Decoding settings.
    max_utterances : int, optional
        Use only the first rows of each set (quick checks).
    device : str, optional
        ``cpu``, ``cuda`` ... (default: speechbrain's ``infer_device``:
        the GPU when there is one).
    decode : bool
        False: only the token and count figures (see :func:`measure_set`).
    ladder : bool
        Also the quality ladder of each set (:func:`quality_ladder`; only
        with ``decode``: it needs the teacher's answers).

    Returns
    -------
    dict
        What ``hearing.json`` holds.
    """
    from speechbrain_blspkd.dataprep.unseen_engine import (
        default_folder,
        prepare_unseen_engine_test,
    )
    from speechbrain_blspkd.inference.speech_llm import SpeechLLM

    folder = resolve_model_folder(model_folder)
    synth_folder = pathlib.Path(synth_folder)
    out_folder = pathlib.Path(out_folder)
    piper_folder = pathlib.Path(piper_folder or default_folder(synth_folder))
    train_manifest = pathlib.Path(train_manifest or synth_folder / "train.csv")
    device = device or sb.utils.distributed.infer_device()
    if ladder and not decode:
        logger.warning("the quality ladder needs decoding: not measured")
    piper_manifest = prepare_unseen_engine_test(
        synth_folder, piper_folder, num=piper_num
    )
    sets = {
        ESPEAK_SET: (synth_folder / "test.csv", synth_folder),
        PIPER_SET: (piper_manifest, piper_folder),
    }
    set_rows = {
        name: english_rows(manifest, root, max_utterances)
        for name, (manifest, root) in sets.items()
    }
    model = SpeechLLM.from_hparams(
        source=folder, run_opts={"device": device}
    ).model
    model.eval()
    tasks = tasks_of(model, tasks or DEFAULT_TASKS)
    train_rows = read_manifest(train_manifest)
    train_ids = model.transcript_ids([r["transcript"] for r in train_rows])
    teacher_key = teacher_key_of(model, tasks, max_new_tokens)
    built = {}

    def cascade_factory():
        if "model" not in built:
            casc = build_cascade(model, asr, asr_max_new_tokens)
            asr_key = _fingerprint(
                CACHE_VERSION,
                "cascade",
                str(asr),
                int(asr_max_new_tokens),
                str(next(casc.transcriber.inner.parameters()).dtype),
                casc.transcriber.inner.model,
                teacher_key,
            )
            built["model"] = (casc, asr_key)
        return built["model"]

    results = {
        "model": str(folder),
        "date": datetime.date.today().isoformat(),
        "device": device,
        "tasks": tasks,
        "max_new_tokens": max_new_tokens,
        "train_manifest": str(train_manifest),
        "cascade_asr": str(asr) if cascade and decode else None,
        "decoded": bool(decode),
        "ladder": bool(ladder and decode),
        "sets": {},
    }
    for name, rows in set_rows.items():
        logger.info("== %s: %d utterances", name, len(rows))
        results["sets"][name] = measure_set(
            model,
            rows,
            tasks,
            train_ids,
            out_folder / name,
            cache_dir,
            cascade_factory if cascade and decode else None,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            source=str(sets[name][0]),
            teacher_key=teacher_key,
            decode=decode,
            ladder=ladder and decode,
        )
        results["sets"][name]["manifest"] = str(sets[name][0])
    out_folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        out_folder / "hearing.json", json.dumps(results, indent=1)
    )
    atomic_write_text(out_folder / "hearing.md", format_tables(results))
    return results
