"""The speech tokens read as LLM tokens: nearest-token accuracy at the true
and at the predicted count.

Authors
 * speechbrain-blspkd contributors 2026
"""

import torch

from speechbrain_blspkd import metrics
from speechbrain_blspkd.hearing.batches import (
    by_duration,
    encoded_batches,
)
from speechbrain_blspkd.models.llm_forward import eval_mode


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
        dicts and ``error_rate_predicted_count`` (the
        :func:`~speechbrain_blspkd.metrics.token_error_rate` dict at the
        predicted count), all None when the adapter does not emit one token
        per transcript token when told the count (only count-aware adapters
        such as the CFormer do; the others' outputs are not tokens);
        ``collapse_rate`` of the outputs at the predicted count; ``count`` (:func:`~speechbrain_blspkd.metrics.
        count_stats` of ``N^``); ``predicted_counts`` per row ID.  None
        when the model has no adapter (the cascade).

    Example
    -------
    >>> import pathlib, tempfile, numpy, soundfile
    >>> from speechbrain_blspkd.testing import tiny_speech_llm
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
    order = by_duration(rows)
    with eval_mode(model):
        batches = encoded_batches(model, order, batch_size, sample_rate, source)
        for chunk, feats, feat_lens in batches:
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
        "error_rate_predicted_count": (
            metrics.token_error_rate(pred_pred, targets) if aligned else None
        ),
        "collapse_rate": metrics.collapse_rate(flat_free)
        if flat_free
        else None,
        "count": metrics.count_stats(
            [len(p) for p in pred_pred], [len(t) for t in targets]
        ),
        "predicted_counts": counts,
    }
