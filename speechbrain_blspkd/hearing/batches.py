"""The test rows in encoded batches, as the hearing measurement reads them.

The token accuracy (:mod:`speechbrain_blspkd.hearing.tokens`) and the
quality ladder (:mod:`speechbrain_blspkd.hearing.ladder`) batch the rows
as :func:`~speechbrain_blspkd.evaluation.decode_rows` does (sorted by
duration, ``batch_size`` at a time), run the encoder once per batch, and
run the model in evaluation mode
(:func:`~speechbrain_blspkd.models.llm_forward.eval_mode`).

Authors
 * speechbrain-blspkd contributors 2026
"""

from speechbrain_blspkd.evaluation import speech_batch


def by_duration(rows):
    """``rows`` sorted by duration, then ID (the decoding order).

    Example
    -------
    >>> rows = [dict(ID="b", duration=1.0), dict(ID="a", duration=1.0),
    ...     dict(ID="c", duration=0.5)]
    >>> [r["ID"] for r in by_duration(rows)]
    ['c', 'a', 'b']
    """
    return sorted(rows, key=lambda r: (r["duration"], r["ID"]))


def encoded_batches(model, order, batch_size, sample_rate, source):
    """Per batch of ``order`` (``batch_size`` rows at a time): the rows and
    the encoder's features.

    Arguments
    ---------
    model : speechbrain_blspkd.models.speech_llm.SpeechLLMModel
        The model (its encoder runs, on the model's device).
    order : list of dict
        Manifest rows (``wav`` resolved), in decoding order
        (:func:`by_duration`).
    batch_size, sample_rate, source
        As :func:`~speechbrain_blspkd.hearing.tokens.adapter_token_accuracy`
        takes them.

    Yields
    ------
    chunk : list of dict
        The rows of the batch.
    feats, feat_lens : torch.Tensor
        The encoder's output for them.
    """
    for i in range(0, len(order), batch_size):
        chunk = order[i : i + batch_size]
        speech = speech_batch(chunk, None, sample_rate, model.device, source)
        feats, feat_lens = model.encoder(speech["wavs"], speech["wav_lens"])
        yield chunk, feats, feat_lens
