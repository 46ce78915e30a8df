"""Does a speech LLM hear what was said?  One measurement, two test sets.

One command, meant to be run before and after every change that should
make the answers depend on the spoken content::

    python -m speechbrain_blspkd.hearing --model EXPORTED_FOLDER \\
        --synth-folder SYNTHSPEECH_FOLDER [--out results/hearing]

It measures an exported speech LLM (a folder of
:func:`~speechbrain_blspkd.inference.export.export_model`, or a run folder
holding one as ``model/``) on two English test sets:

* ``espeak_unseen_voices``: the English rows of the SynthSpeech test split
  (espeak-ng, voice variants held out from training);
* ``piper_unseen_engine``: the same held-out sentences (plus more held-out
  ones up to ``--piper-num``) spoken by piper, an engine the training never
  uses (:mod:`speechbrain_blspkd.dataprep.unseen_engine`, built on first
  use).

For each set and each system (the text teacher, the speech LLM, and the
cascade: Whisper-base transcribes, the same LLM answers the transcript)
it reports:

* agreement of the "repeat" and "continue" answers with the teacher's
  answer to the same instruction given the transcript as text (chrF, WER),
  beside the shuffled-pair level (the same answers scored against the
  teacher answers of other utterances), through
  :func:`speechbrain_blspkd.evaluation.decode_rows` and
  :func:`~speechbrain_blspkd.evaluation.summarize_parity`;
* the WER of the "repeat" answer against the transcript;
* the exact-count rate and mean ``|N^ - N|`` of the speech tokens (for the
  cascade: of the LLM tokens of Whisper's transcript);
* nearest-token accuracy at the true count ``N`` (the adapter run with the
  transcript's token count, position ``i`` against transcript token ``i``)
  and at the **predicted** count ``N^`` (what inference feeds the LLM;
  :func:`speechbrain_blspkd.metrics.positional_token_accuracy`: a missing
  or extra token shifts every later position); for the cascade the tokens
  of Whisper's transcript against the true ones;
* the cascade's transcript WER;

and, per set, the vocabulary coverage: the share of the test transcripts'
LLM tokens that occur in the training transcripts' LLM tokens
(:func:`speechbrain_blspkd.metrics.vocabulary_coverage`).

With ``--ladder``, each set also gets the **quality ladder**
(:func:`quality_ladder`): where the answer quality is lost between the
transcript and inference.  The speech LLM's own student path (its speech
prompt, PLoRA on the speech positions, the same batched greedy
generation, :func:`generate_from_embeddings`) answers the "repeat"
instruction on the same clips when fed, in place of the speech
embeddings:

a. the transcript's own LLM token embeddings;
b. the adapter's outputs at the true count ``N``, each snapped to its
   nearest LLM token embedding (cosine, as the nearest-token accuracy);
c. the adapter's outputs at the true count;
d. the adapter's outputs at the predicted count ``N^``, snapped;
e. the adapter's outputs at the predicted count: what inference does, so
   its answers are the speech row's ("repeat") answers, clip by clip
   (checked: ``e_matches_speech_rows``; a mismatch is noted under the
   table).

Each rung's answers are scored against the teacher's text answer (chrF,
WER, and the shuffled-pair level of the same answers).  a -> c is what the
adapter loses even when told the count, c -> e what the count prediction
loses, and b / d tell how much of it survives reading each embedding as
a token.  The ladder needs an adapter that emits one embedding per
transcript token when told the count (CIF, e.g. the CFormer); for the
others it is skipped with a note.  It is off by default: it decodes the
"repeat" task five more times per set (a cached re-measurement otherwise
decodes the speech LLM twice), and needs decoding (not with
``--tokens-only``).

Outputs in ``--out``: ``hearing.json`` and ``hearing.md`` (the tables; also
printed), written atomically, and per set the decoded rows
(``<set>/speech_rows.jsonl``, ``<set>/cascade_rows.jsonl``, and with
``--ladder`` ``<set>/ladder_rows.jsonl``: per clip the teacher's answer
and each rung's).  What does not
change between two measurements is cached in ``--cache-dir``: the teacher
answers (keyed by a fingerprint of the LLM weights, the prompts, the
instructions and the generation limit, each answer checked against its
transcript) and the cascade's rows and transcripts (keyed also by the
recogniser's weights and by the test rows with a hash of each audio file).

Authors
 * speechbrain-blspkd contributors 2026
"""

import argparse
import contextlib
import datetime
import hashlib
import json
import logging
import pathlib
import sys

import speechbrain as sb
import torch

from speechbrain_blspkd import metrics
from speechbrain_blspkd.dataio.audio import load_row_audio
from speechbrain_blspkd.dataio.manifest import read_manifest
from speechbrain_blspkd.evaluation import (
    REPEAT_INSTRUCTION,
    decode_rows,
    speech_batch,
)
from speechbrain_blspkd.metrics import summarize_parity
from speechbrain_blspkd.teacher_answers import fingerprint as _fingerprint
from speechbrain_blspkd.utils.atomic import atomic_write_text
from speechbrain_blspkd.utils.cli import report_error, setup_logging

__all__ = [
    "DEFAULT_TASKS",
    "LADDER_RUNGS",
    "adapter_token_accuracy",
    "format_tables",
    "generate_from_embeddings",
    "ladder_table",
    "main",
    "measure",
    "quality_ladder",
    "resolve_model_folder",
]

logger = logging.getLogger(__name__)

#: The evaluation instructions (None: the model's own instruction, the
#: continuation prompt of the recipes).
DEFAULT_TASKS = {
    "repeat": REPEAT_INSTRUCTION,
    "continue": None,
}
ESPEAK_SET = "espeak_unseen_voices"
PIPER_SET = "piper_unseen_engine"
SET_TITLES = {
    ESPEAK_SET: "espeak-ng, unseen voices (SynthSpeech test split, English)",
    PIPER_SET: "piper, unseen engine (held-out English sentences)",
}
CACHE_VERSION = 1


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
    >>> import tempfile
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
    from speechbrain_blspkd.inference.export import HPARAMS_FILE, WEIGHTS_FILE

    path = pathlib.Path(path)
    for folder in (path, path / "model"):
        if all((folder / f).is_file() for f in (HPARAMS_FILE, WEIGHTS_FILE)):
            return folder
    raise FileNotFoundError(
        f"{path}: no exported model ({HPARAMS_FILE} + {WEIGHTS_FILE}) here "
        "or in model/"
    )


def _file_sha1(path):
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_cache(path, key):
    path = pathlib.Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None
    return data if data.get("key") == key else None


def _write_cache(path, key, data):
    text = json.dumps(dict(data, key=key), ensure_ascii=False)
    atomic_write_text(pathlib.Path(path), text)


def _tasks_of(model, tasks):
    return {
        k: (model.instruction if v is None else v) for k, v in tasks.items()
    }


def _teacher_key(model, tasks, max_new_tokens):
    return _fingerprint(
        CACHE_VERSION,
        "teacher",
        model.llm.config.to_dict(),
        model.prompts.system_prompt,
        model.prompts.transcript_separator,
        tasks,
        int(max_new_tokens),
        model.device.type,
        model.llm,
    )


def _load_teacher(path, key, rows):
    """``{(task, ID): answer}`` of the cached answers whose transcript is
    still the row's."""
    data = _read_cache(path, key) or {"answers": {}}
    transcripts = {r["ID"]: r["transcript"] for r in rows}
    out = {}
    for k, (transcript, answer) in data["answers"].items():
        task, uid = k.split("\t", 1)
        if transcripts.get(uid, transcript) == transcript:
            out[(task, uid)] = answer
    return out, data["answers"]


def _save_teacher(path, key, stored, decoded):
    for r in decoded:
        stored[f"{r['task']}\t{r['utt']}"] = [r["transcript"], r["teacher"]]
    _write_cache(path, key, {"answers": stored})


@torch.no_grad()
def adapter_token_accuracy(
    model, rows, batch_size=8, sample_rate=16000, source=None
):
    """Nearest-token accuracy of the speech tokens at the true and at the
    predicted count.

    For each batch the encoder runs once and the adapter twice: with the
    transcripts' token counts (position ``i`` is transcript token ``i``)
    and without (its own count ``N^``, as in generation).  Every speech
    token is read as its nearest LLM input embedding (cosine over the whole
    table, :func:`speechbrain_blspkd.metrics.nearest_tokens`) and scored
    position by position against the transcript tokens
    (:func:`speechbrain_blspkd.metrics.positional_token_accuracy`).

    Arguments
    ---------
    model : speechbrain_blspkd.models.speech_llm.SpeechLLMModel
        The model (its adapter and encoder are used; no LLM pass).
    rows : list of dict
        Manifest rows (``wav`` resolved).
    batch_size : int
        Utterances per batch.
    sample_rate : int
        Audio rate.
    source : str, optional
        The manifest, named in audio errors.

    Returns
    -------
    dict
        ``true_count`` and ``predicted_count``: the
        :func:`~speechbrain_blspkd.metrics.positional_token_accuracy`
        dicts (both None when the adapter does not emit one token per
        transcript token when told the count: only count-aware adapters
        such as the CFormer do; the others' outputs are not tokens);
        ``collapse_rate`` of the outputs at the predicted count; ``count`` (:func:`~speechbrain_blspkd.metrics.
        count_stats` of ``N^``); ``predicted_counts`` per row ID.  None
        when the model has no adapter (the cascade).

    Example
    -------
    >>> import tempfile, numpy, soundfile
    >>> from speechbrain_blspkd.utils.testing import tiny_speech_llm
    >>> tmp = pathlib.Path(tempfile.mkdtemp())
    >>> soundfile.write(tmp / "a.wav", numpy.zeros(6000, "float32"), 16000)
    >>> rows = [dict(ID="a", wav=str(tmp / "a.wav"), duration=0.375,
    ...     transcript="the cat sat", language="en")]
    >>> out = adapter_token_accuracy(tiny_speech_llm(), rows)
    >>> 0 <= out["true_count"]["accuracy"] <= 1, out["count"]["n"]
    (True, 1)
    """
    from speechbrain_blspkd.nnet.adapter import AdapterTargets

    if model.adapter is None or model.encoder is None:
        return None
    device = model.device
    table = model.embed_tokens.weight
    true_pred, pred_pred, targets, counts = [], [], [], {}
    aligned = True
    was_training = model.training
    model.eval()
    try:
        order = sorted(rows, key=lambda r: (r["duration"], r["ID"]))
        for i in range(0, len(order), batch_size):
            chunk = order[i : i + batch_size]
            speech = speech_batch(chunk, None, sample_rate, device, source)
            feats, feat_lens = model.encoder(speech["wavs"], speech["wav_lens"])
            ids = model.transcript_ids([r["transcript"] for r in chunk])
            num = torch.tensor([len(x) for x in ids], device=device)
            told = model.encode_speech(
                feats=feats,
                feat_lens=feat_lens,
                targets=AdapterTargets(num_tokens=num),
            )
            free = model.encode_speech(feats=feats, feat_lens=feat_lens)
            aligned = aligned and torch.equal(told.token_counts.to(device), num)
            for out, dest in ((told, true_pred), (free, pred_pred)):
                nearest = metrics.nearest_tokens(
                    out.tokens[out.token_mask], table
                )
                sizes = out.token_counts.tolist()
                dest.extend(x.tolist() for x in nearest.split(sizes))
            targets.extend(ids)
            for r, n in zip(chunk, free.token_counts.tolist()):
                counts[r["ID"]] = int(n)
    finally:
        model.train(was_training)
    flat_free = [t for seq in pred_pred for t in seq]
    return {
        "true_count": (
            metrics.positional_token_accuracy(true_pred, targets)
            if aligned
            else None
        ),
        "predicted_count": (
            metrics.positional_token_accuracy(pred_pred, targets)
            if aligned
            else None
        ),
        "collapse_rate": metrics.collapse_rate(flat_free)
        if flat_free
        else None,
        "count": metrics.count_stats(
            [len(p) for p in pred_pred], [len(t) for t in targets]
        ),
        "predicted_counts": counts,
    }


#: The rungs of the quality ladder: what the LLM's student path (PLoRA on
#: the speech positions, the model's speech prompt) is fed in place of the
#: speech embeddings, from the transcript itself down to inference.
LADDER_RUNGS = {
    "a": "transcript token embeddings",
    "b": "adapter at true N, snapped to nearest tokens",
    "c": "adapter at true N",
    "d": "adapter at predicted N^, snapped to nearest tokens",
    "e": "adapter at predicted N^ (inference)",
}


class _ReplayAdapter(torch.nn.Module):
    """Stands in for a model's adapter and returns a fixed output."""

    def __init__(self, output):
        super().__init__()
        self.output = output

    def forward(self, feats, lengths=None, targets=None):
        return self.output


@contextlib.contextmanager
def _replaying(model, output):
    """The model's adapter replaced by one that returns ``output``."""
    adapter, snap = model.adapter, getattr(model, "snap_speech", False)
    model.adapter = _ReplayAdapter(output)
    model.snap_speech = False  # each rung is fed exactly as given
    try:
        yield
    finally:
        model.adapter = adapter
        model.snap_speech = snap


@torch.no_grad()
def generate_from_embeddings(
    model,
    tokens,
    mask,
    instructions=None,
    max_new_tokens=32,
    names=None,
    source=None,
):
    """Answers of ``model`` when given speech embeddings are fed in place of
    the adapter's.

    The generation is the model's own speech generation
    (:meth:`~speechbrain_blspkd.models.speech_llm.SpeechLLMModel.generate`:
    the speech prompt, the embeddings at its speech slots, PLoRA on those
    positions, left-padded batch, greedy with the KV cache): during the call
    the model's adapter is replaced by one that returns ``tokens``.

    Arguments
    ---------
    model : speechbrain_blspkd.models.speech_llm.SpeechLLMModel
        The speech LLM.
    tokens : torch.Tensor
        (B, N, D) embeddings in the LLM input space.
    mask : torch.Tensor
        (B, N) bool: the embeddings of each row that enter its prompt.
    instructions : str or list of str, optional
        Speech prompt instructions (default: the model's).
    max_new_tokens : int
        Generation limit.
    names, source : optional
        How rows are named in a context-length error.

    Returns
    -------
    list of str

    Example
    -------
    >>> from speechbrain_blspkd.utils.testing import tiny_speech_llm
    >>> model = tiny_speech_llm().eval()
    >>> ids = torch.tensor([model.transcript_ids(["the cat"])[0]])
    >>> texts = generate_from_embeddings(model, model.embed_tokens(ids),
    ...     torch.ones_like(ids, dtype=torch.bool), "Repeat:", 3)
    >>> len(texts)
    1
    """
    from speechbrain_blspkd.nnet.adapter import AdapterOutput

    output = AdapterOutput(tokens=tokens, token_mask=mask.bool())
    with _replaying(model, output):
        return model.generate(
            feats=tokens,
            instructions=instructions,
            max_new_tokens=max_new_tokens,
            names=names,
            source=source,
        )


def _padded_ids(ids, device):
    """(B, N) right-padded token ids (0 beyond a row) and their mask."""
    width = max(1, max(len(x) for x in ids))
    padded = torch.zeros(len(ids), width, dtype=torch.long)
    for k, seq in enumerate(ids):
        padded[k, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    lengths = torch.tensor([len(x) for x in ids])
    mask = torch.arange(width)[None] < lengths[:, None]
    return padded.to(device), mask.to(device)


def _snapped(model, tokens, mask):
    """``tokens`` with every masked vector replaced by the LLM input
    embedding of its nearest token (cosine over the whole table)."""
    nearest = metrics.nearest_tokens(
        tokens[mask].float(), model.embed_tokens.weight
    )
    embeds = model.embed_tokens(nearest)
    out = torch.zeros(
        tokens.shape[:2] + embeds.shape[-1:],
        dtype=embeds.dtype,
        device=embeds.device,
    )
    out[mask.to(out.device)] = embeds
    return out


@torch.no_grad()
def quality_ladder(
    model,
    rows,
    teacher,
    instruction=REPEAT_INSTRUCTION,
    batch_size=8,
    max_new_tokens=32,
    sample_rate=16000,
    source=None,
):
    """Where the answer quality is lost: the "repeat" agreement with the
    teacher when the LLM is fed, in place of the speech embeddings, each
    rung of :data:`LADDER_RUNGS`.

    The rows are batched as :func:`~speechbrain_blspkd.evaluation.
    decode_rows` batches them (sorted by duration, ``batch_size`` at a
    time); per batch the encoder runs once, the adapter twice (told the
    transcripts' token counts, and free: its own count, as in inference),
    and each rung is decoded through :func:`generate_from_embeddings`.
    Snapping reads each vector as its nearest LLM input embedding (cosine,
    as the nearest-token accuracy does) and feeds that embedding.  Rung
    ``e`` is what inference does: its answers are those of the speech row
    of :func:`measure_set` decoded in the same batches.

    Only for adapters that emit one embedding per transcript token when
    told the count (CIF, e.g. the CFormer); for the others (and models
    with no adapter or no encoder) the ladder is skipped.

    Arguments
    ---------
    model : speechbrain_blspkd.models.speech_llm.SpeechLLMModel
        The speech LLM.
    rows : list of dict
        Manifest rows (``wav`` resolved).
    teacher : dict
        ``{row ID: the teacher's answer to the instruction}``.
    instruction : str
        The "repeat" instruction (the speech prompt's).
    batch_size, max_new_tokens : int
        Decoding settings.
    sample_rate : int
        Audio rate.
    source : str, optional
        The manifest, named in errors.

    Returns
    -------
    dict
        ``n``, ``rungs`` (per rung its ``label`` and the
        :func:`~speechbrain_blspkd.metrics.parity_agreement` of its answers
        with the teacher's: ``chrf``, ``wer`` and their shuffled levels)
        and ``rows`` (per row ``ID``, ``transcript``, ``teacher`` and the
        answer of each rung); or ``{"skipped": why}``.

    Example
    -------
    >>> import tempfile, numpy, soundfile
    >>> from speechbrain_blspkd.utils.testing import tiny_speech_llm
    >>> tmp = pathlib.Path(tempfile.mkdtemp())
    >>> soundfile.write(tmp / "a.wav", numpy.zeros(6000, "float32"), 16000)
    >>> rows = [dict(ID="a", wav=str(tmp / "a.wav"), duration=0.375,
    ...     transcript="the cat sat", language="en")]
    >>> out = quality_ladder(tiny_speech_llm(), rows, {"a": "the cat sat"},
    ...     max_new_tokens=2)
    >>> list(out["rungs"]), out["n"]
    (['a', 'b', 'c', 'd', 'e'], 1)
    """
    from speechbrain_blspkd.nnet.adapter import AdapterTargets

    if model.adapter is None or model.encoder is None:
        return {"skipped": "no adapter or no encoder (no speech embeddings)"}
    device = model.device
    answers = {key: [] for key in LADDER_RUNGS}
    order = sorted(rows, key=lambda r: (r["duration"], r["ID"]))
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(order), batch_size):
            chunk = order[i : i + batch_size]
            speech = speech_batch(chunk, None, sample_rate, device, source)
            feats, feat_lens = model.encoder(speech["wavs"], speech["wav_lens"])
            ids, ids_mask = _padded_ids(
                model.transcript_ids([r["transcript"] for r in chunk]), device
            )
            told = model.encode_speech(
                feats=feats,
                feat_lens=feat_lens,
                targets=AdapterTargets(num_tokens=ids_mask.sum(1)),
            )
            if not torch.equal(told.token_counts.to(device), ids_mask.sum(1)):
                return {
                    "skipped": f"the adapter ({type(model.adapter).__name__})"
                    " does not emit one embedding per transcript token when "
                    "told the count"
                }
            free = model.encode_speech(feats=feats, feat_lens=feat_lens)
            told_pair = (told.tokens, told.token_mask)
            free_pair = (free.tokens, free.token_mask)
            fed = {
                "a": (model.embed_tokens(ids), ids_mask),
                "b": (_snapped(model, *told_pair), told.token_mask),
                "c": told_pair,
                "d": (_snapped(model, *free_pair), free.token_mask),
                "e": free_pair,
            }
            for key, (tokens, mask) in fed.items():
                answers[key].extend(
                    generate_from_embeddings(
                        model,
                        tokens,
                        mask,
                        instruction,
                        max_new_tokens,
                        names=[r["ID"] for r in chunk],
                        source=source,
                    )
                )
    finally:
        model.train(was_training)
    teach = [teacher[r["ID"]] for r in order]
    rungs = {
        key: dict(
            label=label,
            **metrics.parity_agreement(answers[key], teach, seed=0),
        )
        for key, label in LADDER_RUNGS.items()
    }
    out_rows = [
        dict(
            ID=r["ID"],
            transcript=r["transcript"],
            teacher=teach[k],
            **{key: answers[key][k] for key in LADDER_RUNGS},
        )
        for k, r in enumerate(order)
    ]
    return {"n": len(order), "rungs": rungs, "rows": out_rows}


class _RecordingTranscriber(torch.nn.Module):
    """A recogniser that remembers each clip's transcript (by its audio)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.seen = {}

    @staticmethod
    def clip_key(wav):
        data = wav.detach().float().cpu().contiguous()
        return hashlib.sha1(data.numpy().tobytes()).hexdigest()

    def transcribe(self, wavs, wav_lens=None, languages=None):
        texts = self.inner.transcribe(wavs, wav_lens, languages)
        if wav_lens is None:
            wav_lens = torch.ones(wavs.shape[0])
        sizes = torch.round(wav_lens.float().cpu() * wavs.shape[1]).long()
        for wav, size, text in zip(wavs, sizes.tolist(), texts):
            self.seen[self.clip_key(wav[:size])] = text
        return texts


def build_cascade(
    model, asr="whisper-base", asr_max_new_tokens=96, dtype="auto"
):
    """The cascade beside ``model``: Whisper transcribes, the **same** LLM
    (shared, not a copy; PLoRA off) answers with the same prompts.

    Arguments
    ---------
    model : speechbrain_blspkd.models.speech_llm.SpeechLLMModel
        The speech LLM whose LLM and prompts are used.
    asr : str or pathlib.Path
        Whisper asset name or folder.
    asr_max_new_tokens : int
        Most tokens per transcript.
    dtype : str
        Recogniser weight dtype (``auto``: bf16 only where fast).

    Returns
    -------
    speechbrain_blspkd.models.cascade.CascadeModel
        Its ``transcriber`` remembers every transcript it made.
    """
    from speechbrain_blspkd.models.cascade import CascadeModel
    from speechbrain_blspkd.nnet.whisper_asr import WhisperTranscriber
    from speechbrain_blspkd.utils.precision import resolve_dtype

    transcriber = WhisperTranscriber(
        asr,
        dtype=resolve_dtype(dtype, model.device),
        max_new_tokens=asr_max_new_tokens,
    ).to(model.device)
    return CascadeModel(
        model.llm,
        _RecordingTranscriber(transcriber),
        tokenizer=model.tokenizer,
        system_prompt=model.prompts.system_prompt,
        instruction=model.instruction,
        audio_instruction=model.audio_instruction,
        transcript_separator=model.prompts.transcript_separator,
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


def _rows_digest(rows):
    return _fingerprint(
        [
            (r["ID"], r["transcript"], r["language"], _file_sha1(r["wav"]))
            for r in rows
        ]
    )


def _measure_cascade(
    cascade_factory, rows, tasks, options, teacher, cache_dir, source
):
    """Cascade rows and transcripts, from the cache when nothing changed."""
    cascade, key = cascade_factory()
    key = _fingerprint(key, _rows_digest(rows), tasks, options)
    path = pathlib.Path(cache_dir) / f"cascade_{key[:20]}.json"
    cached = _read_cache(path, key)
    if cached is not None:
        logger.info("cascade: cached rows %s", path)
        return cached["rows"], cached["transcripts"]
    decoded = decode_rows(
        cascade, rows, tasks, teacher_cache=teacher, source=source, **options
    )
    recorder = cascade.transcriber
    transcripts = {}
    for r in rows:
        wav = load_row_audio(r, source, sample_rate=16000)
        transcripts[r["ID"]] = recorder.seen[recorder.clip_key(wav)]
    _write_cache(path, key, {"rows": decoded, "transcripts": transcripts})
    return decoded, transcripts


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
    """Every figure of one test set (see the module notes).

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
        :func:`_measure_ladder`).
    """
    out_folder = pathlib.Path(out_folder)
    cache_dir = pathlib.Path(cache_dir)
    test_ids = model.transcript_ids([r["transcript"] for r in rows])
    coverage = metrics.vocabulary_coverage(test_ids, train_ids)
    if not decode:
        tokens = adapter_token_accuracy(model, rows, batch_size, source=source)
        speech = {}
        if tokens is not None:
            speech = {
                "count": tokens["count"],
                "token_accuracy_true_count": tokens["true_count"],
                "token_accuracy_predicted_count": tokens["predicted_count"],
                "collapse_rate": tokens["collapse_rate"],
            }
        return {
            "n": len(rows),
            "coverage": coverage,
            "systems": {"speech": speech},
        }
    options = dict(batch_size=batch_size, max_new_tokens=max_new_tokens)
    key = teacher_key or _teacher_key(model, tasks, max_new_tokens)
    teacher_path = cache_dir / f"teacher_{key[:20]}.json"
    teacher, stored = _load_teacher(teacher_path, key, rows)
    logger.info("speech LLM: decoding %d utterances", len(rows))
    decoded = decode_rows(
        model, rows, tasks, teacher_cache=teacher, source=source, **options
    )
    _save_teacher(teacher_path, key, stored, decoded)
    metrics.EvalSummary(decoded).write_rows(out_folder / "speech_rows.jsonl")
    summary = summarize_parity(decoded)
    systems = {"teacher": _agreement(summary, "teacher")}
    speech = _agreement(summary, "speech")
    speech["count"] = summary["count"]
    tokens = adapter_token_accuracy(model, rows, batch_size, source=source)
    if tokens is not None:
        speech["token_accuracy_true_count"] = tokens["true_count"]
        speech["token_accuracy_predicted_count"] = tokens["predicted_count"]
        speech["collapse_rate"] = tokens["collapse_rate"]
    systems["speech"] = speech
    extra = {}
    if ladder:
        extra["ladder"] = _measure_ladder(
            model, rows, tasks, decoded, out_folder, options, source
        )
    if cascade_factory is not None:
        logger.info("cascade: decoding %d utterances", len(rows))
        casc_rows, transcripts = _measure_cascade(
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
        cascade["token_accuracy_predicted_count"] = (
            metrics.positional_token_accuracy(
                model.transcript_ids([t or " " for t in heard]), test_ids
            )
        )
        systems["cascade"] = cascade
    return {"n": len(rows), "coverage": coverage, "systems": systems, **extra}


def _measure_ladder(model, rows, tasks, decoded, out_folder, options, source):
    """The quality ladder of one set, beside its decoded speech rows.

    Returns :func:`quality_ladder`'s result without its rows (written to
    ``out_folder/ladder_rows.jsonl``) and with ``e_matches_speech_rows``:
    how many of the inference rung's answers (``inference_rung``: e, or d
    for a model with ``snap_speech``) are the speech row's answer to the
    same clip (``same`` of ``n``; all of them unless the replayed generation
    differs from the model's own).
    """
    if "repeat" not in tasks:
        return {"skipped": "no repeat task"}
    repeat = {r["utt"]: r for r in decoded if r["task"] == "repeat"}
    logger.info("quality ladder: decoding %d utterances x 5", len(rows))
    result = quality_ladder(
        model,
        rows,
        {uid: r["teacher"] for uid, r in repeat.items()},
        tasks["repeat"],
        source=source,
        **options,
    )
    if "skipped" in result:
        logger.info("quality ladder skipped: %s", result["skipped"])
        return result
    ladder_rows = result.pop("rows")
    out_folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        out_folder / "ladder_rows.jsonl",
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ladder_rows),
    )
    # what inference feeds the LLM: rung e, or d when the model snaps
    rung = "d" if getattr(model, "snap_speech", False) else "e"
    same = sum(r[rung] == repeat[r["ID"]]["hyp"] for r in ladder_rows)
    if same != len(ladder_rows):
        logger.warning(
            "quality ladder: rung %s differs from the speech rows on %d of "
            "%d clips",
            rung,
            len(ladder_rows) - same,
            len(ladder_rows),
        )
    result["inference_rung"] = rung
    result["e_matches_speech_rows"] = {"same": same, "n": len(ladder_rows)}
    return result


def _english_rows(manifest, data_root, max_utterances):
    rows = [
        r
        for r in read_manifest(manifest, data_root=data_root)
        if r["language"] == "en"
    ]
    if not rows:
        raise ValueError(f"{manifest}: no English rows")
    return rows[: int(max_utterances)] if max_utterances else rows


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
        name: _english_rows(manifest, root, max_utterances)
        for name, (manifest, root) in sets.items()
    }
    model = SpeechLLM.from_hparams(
        source=folder, run_opts={"device": device}
    ).model
    model.eval()
    tasks = _tasks_of(model, tasks or DEFAULT_TASKS)
    train_rows = read_manifest(train_manifest)
    train_ids = model.transcript_ids([r["transcript"] for r in train_rows])
    teacher_key = _teacher_key(model, tasks, max_new_tokens)
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
    | teacher (text input) | 50.0 (12.0) | 60.0 (99.0) | 50.0 (12.0) | 60.0 (99.0) | 70.0 | - | - | - | - | - |
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
        "predicted count N^ (a count error shifts later tokens)."
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
            "(predicted N) | transcript WER |",
            "|" + "---|" * 11,
        ]
        for key, system in entry["systems"].items():
            count = system.get("count") or {}
            true_acc = system.get("token_accuracy_true_count")
            pred_acc = system.get("token_accuracy_predicted_count")
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


def build_parser():
    """The argument parser of ``python -m speechbrain_blspkd.hearing``.

    Example
    -------
    >>> args = build_parser().parse_args(["--model", "m", "--synth-folder", "d"])
    >>> args.piper_num, args.cascade, args.max_new_tokens, args.decode
    (100, True, 32, True)
    >>> args.ladder
    False
    """
    parser = argparse.ArgumentParser(
        prog="python -m speechbrain_blspkd.hearing",
        description="Does a speech LLM hear what was said? Measure an "
        "exported model on the SynthSpeech unseen-voice English test and on "
        "a piper (unseen engine) test, beside the cascade.",
    )
    parser.add_argument(
        "--model", required=True, help="exported model folder (or run folder)"
    )
    parser.add_argument(
        "--synth-folder", required=True, help="the SynthSpeech corpus folder"
    )
    parser.add_argument(
        "--out", default="results/hearing", help="report folder"
    )
    parser.add_argument(
        "--cache-dir",
        default="results/hearing_cache",
        help="teacher answers and cascade results (keyed by content)",
    )
    parser.add_argument(
        "--train-manifest", default=None, help="default: SYNTH_FOLDER/train.csv"
    )
    parser.add_argument("--piper-folder", default=None)
    parser.add_argument("--piper-num", type=int, default=100)
    parser.add_argument(
        "--asr", default="whisper-base", help="cascade recogniser"
    )
    parser.add_argument("--asr-max-new-tokens", type=int, default=96)
    parser.add_argument(
        "--no-cascade",
        dest="cascade",
        action="store_false",
        help="skip the cascade",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--max-utterances", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument(
        "--tokens-only",
        dest="decode",
        action="store_false",
        help="only the adapter's token and count figures (no decoding, no "
        "cascade): the quick measurement of an ablation",
    )
    parser.add_argument(
        "--ladder",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also the quality ladder: repeat agreement when the LLM is fed "
        "the transcript's token embeddings, the adapter's outputs at the "
        "true and at the predicted count, raw and snapped to their nearest "
        "tokens (CIF adapters only; 5 more repeat decodings per set, so "
        "off by default)",
    )
    return parser


def main(argv=None):
    """Run the measurement; print the tables; return the exit status.

    Example
    -------
    >>> import tempfile
    >>> main(["--model", tempfile.mkdtemp(), "--synth-folder", "d"])
    2
    """
    args = build_parser().parse_args(argv)
    setup_logging()
    from speechbrain_blspkd.inference.export import ModelFolderError

    try:
        results = measure(
            args.model,
            args.synth_folder,
            out_folder=args.out,
            cache_dir=args.cache_dir,
            train_manifest=args.train_manifest,
            piper_folder=args.piper_folder,
            piper_num=args.piper_num,
            asr=args.asr,
            asr_max_new_tokens=args.asr_max_new_tokens,
            cascade=args.cascade,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            max_utterances=args.max_utterances,
            device=args.device,
            decode=args.decode,
            ladder=args.ladder,
        )
    except (
        ModelFolderError,
        FileNotFoundError,
        RuntimeError,
        ValueError,
    ) as err:
        return report_error(err, prog="hearing", status=2)
    print(format_tables(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
