"""The quality ladder: where the answer quality is lost between the
transcript and inference.

The speech LLM's own student path (its speech prompt, PLoRA on the speech
positions, the same batched greedy generation) answers the "repeat"
instruction when fed, in place of the speech embeddings, each rung of
:data:`LADDER_RUNGS`: from the transcript's own token embeddings down to
the adapter's outputs at the predicted count (what inference does).

Authors
 * speechbrain-blspkd contributors 2026
"""

import contextlib
import json
import logging

import torch

from speechbrain_blspkd import metrics
from speechbrain_blspkd.evaluation import REPEAT_INSTRUCTION
from speechbrain_blspkd.hearing.batches import (
    by_duration,
    encoded_batches,
)
from speechbrain_blspkd.models.llm_forward import eval_mode
from speechbrain_blspkd.models.passes import adapter_targets
from speechbrain_blspkd.utils.atomic import atomic_write_text

logger = logging.getLogger(__name__)

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
    >>> from speechbrain_blspkd.testing import tiny_speech_llm
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
    as the nearest-token accuracy does) and feeds that embedding: the
    model's own :meth:`~speechbrain_blspkd.models.speech_llm.
    SpeechLLMModel.snapped`, as generation with ``snap_speech``.  Rung
    ``e`` is what inference does: its answers are those of the speech row
    of :func:`~speechbrain_blspkd.hearing.measure.measure_set` decoded in
    the same batches.

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
    >>> import pathlib, tempfile
    >>> from speechbrain_blspkd.dataio.manifest import read_manifest
    >>> from speechbrain_blspkd.testing import (
    ...     tiny_speech_llm, write_speech_manifest)
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> manifest = write_speech_manifest(folder, ["the cat sat"])
    >>> rows = read_manifest(manifest, data_root=folder)
    >>> out = quality_ladder(tiny_speech_llm(), rows, {"u0": "the cat sat"},
    ...     max_new_tokens=2)
    >>> list(out["rungs"]), out["n"]
    (['a', 'b', 'c', 'd', 'e'], 1)
    """
    if model.adapter is None or model.encoder is None:
        return {"skipped": "no adapter or no encoder (no speech embeddings)"}
    device = model.device
    answers = {key: [] for key in LADDER_RUNGS}
    order = by_duration(rows)
    with eval_mode(model):
        batches = encoded_batches(model, order, batch_size, sample_rate, source)
        for chunk, feats, feat_lens in batches:
            ids, ids_mask, targets = adapter_targets(
                model, [r["transcript"] for r in chunk]
            )
            told = model.encode_speech(
                feats=feats, feat_lens=feat_lens, targets=targets
            )
            if not torch.equal(told.token_counts.to(device), ids_mask.sum(1)):
                return {
                    "skipped": f"the adapter ({type(model.adapter).__name__})"
                    " does not emit one embedding per transcript token when "
                    "told the count"
                }
            free = model.encode_speech(feats=feats, feat_lens=feat_lens)
            fed = {
                "a": (model.embed_tokens(ids), ids_mask),
                "b": (model.snapped(told).tokens, told.token_mask),
                "c": (told.tokens, told.token_mask),
                "d": (model.snapped(free).tokens, free.token_mask),
                "e": (free.tokens, free.token_mask),
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


def measure_ladder(model, rows, tasks, decoded, out_folder, options, source):
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
