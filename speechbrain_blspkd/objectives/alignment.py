"""The alignment of a CIF adapter's outputs with the LLM's embeddings.

An adapter that emits one speech embedding per transcript token (the
CIF-based CFormer, given the transcript's token counts) puts embedding
``i`` where the LLM expects transcript token ``i``.  Here that position is
scored against the token (``docs/algorithms.md`` section 2.9):

* :func:`alignment_loss`: the outputs pulled towards the LLM embeddings of
  the transcript tokens (cross-entropy over cosine logits against the
  embedding table, ``1 - cos`` and MSE over the embedding variance; the
  ``align`` term of :class:`~speechbrain_blspkd.objectives.blsp_kd.
  BLSPKDObjective`), optionally with a sampled softmax
  (:func:`~speechbrain_blspkd.losses.sampled_vocabulary`);
* :func:`nearest_token_accuracy`: the share of outputs whose nearest
  embedding is their transcript token (``token_acc``);
* :func:`predicted_count_accuracy`: the same at the count the adapter
  predicts itself, as at inference (``token_acc_pred``).

Authors
 * speechbrain-blspkd contributors 2026
"""

import torch
import torch.nn.functional as F

from speechbrain_blspkd.losses import sampled_vocabulary

__all__ = [
    "alignment_loss",
    "nearest_token_accuracy",
    "predicted_count_accuracy",
]


def _aligned(output, transcript_ids, transcript_mask=None):
    """Predictions and targets at the positions an aligned adapter filled."""
    mask = output.token_mask
    counts = output.token_counts.tolist()
    wanted = counts
    if transcript_mask is not None:
        wanted = transcript_mask.sum(1).tolist()
    if mask.shape[1] > transcript_ids.shape[1] or counts != wanted:
        raise ValueError(
            "alignment: the adapter must emit one embedding per transcript "
            f"token (a CIF adapter); it emitted {counts} for transcripts of "
            f"{wanted} tokens"
        )
    ids = transcript_ids.to(mask.device)[:, : mask.shape[1]][mask]
    return output.tokens[mask].float(), ids


def alignment_loss(
    model,
    output,
    transcript_ids,
    temperature=0.05,
    transcript_mask=None,
    negatives=None,
):
    """Pull an aligned adapter's outputs towards the transcript embeddings.

    Arguments
    ---------
    model : speechbrain_blspkd.models.speech_llm.SpeechLLMModel
        Gives the embedding table.
    output : speechbrain_blspkd.nnet.adapter.AdapterOutput
        Produced with the transcript token counts (position i is token i).
    transcript_ids : torch.Tensor
        (B, N) target ids.
    temperature : float
        Temperature of the cosine logits.
    transcript_mask : torch.Tensor, optional
        (B, N) bool; when given, each row's embedding count must equal its
        transcript length.
    negatives : int, optional
        Score the cross-entropy against the batch's tokens plus this many
        random others (:func:`~speechbrain_blspkd.losses.
        sampled_vocabulary`); None: the whole table.

    Returns
    -------
    loss : torch.Tensor
        ``ce + (1 - cos) + mse / var`` (a scalar).
    accuracy : torch.Tensor
        Nearest-token accuracy within the scored tokens (no grad).

    Example
    -------
    >>> from speechbrain_blspkd.nnet.adapter import AdapterTargets
    >>> from speechbrain_blspkd.testing import tiny_speech_llm
    >>> model = tiny_speech_llm(whisper=False)
    >>> out = model.adapter(torch.randn(2, 20, 64),
    ...     targets=AdapterTargets(torch.tensor([3, 2])))
    >>> loss, acc = alignment_loss(model, out, torch.tensor([[5, 6, 7], [8, 9, 0]]))
    >>> bool(loss > 0), 0 <= float(acc) <= 1
    (True, True)
    """
    pred, ids = _aligned(output, transcript_ids, transcript_mask)
    table, var = model.embedding_table(pred.device)
    with torch.no_grad():
        target = model.embed_tokens(ids).float()
    vocab = sampled_vocabulary(ids, table.shape[0], negatives)
    if negatives is not None:
        table = table[vocab]
        ids_in = torch.searchsorted(vocab, ids)
    else:
        ids_in = ids
    # 1 / temperature scales the (K, D) unit outputs, not the (K, V) logits:
    # the same cross-entropy without a division over the whole table
    logits = (F.normalize(pred, dim=-1) / temperature) @ table.T
    ce = F.cross_entropy(logits, ids_in)
    cos = (1 - F.cosine_similarity(pred, target, dim=-1)).mean()
    mse = ((pred - target) ** 2).mean() / var
    accuracy = (logits.detach().argmax(-1) == ids_in).float().mean()
    return ce + cos + mse, accuracy


@torch.no_grad()
def nearest_token_accuracy(model, output, transcript_ids, transcript_mask=None):
    """Share of aligned adapter outputs whose nearest embedding (cosine) is
    the transcript token at their position.

    Returns
    -------
    float
    """
    pred, ids = _aligned(output, transcript_ids, transcript_mask)
    if ids.numel() == 0:
        return 0.0
    table, _ = model.embedding_table(pred.device)
    nearest = (F.normalize(pred, dim=-1) @ table.T).argmax(-1)
    return float((nearest == ids).float().mean())


@torch.no_grad()
def predicted_count_accuracy(model, outputs):
    """Nearest-token accuracy of a CIF adapter at the count it predicts.

    The adapter runs again on the batch's features without targets (what
    inference feeds the LLM); position ``i`` of its nearest tokens is
    scored against transcript token ``i`` and a missing or extra position
    is an error (:func:`speechbrain_blspkd.metrics.
    positional_token_accuracy`).

    Returns
    -------
    float
    """
    from speechbrain_blspkd.metrics import positional_token_accuracy

    out = model.adapter(outputs.feats, lengths=outputs.feat_lens)
    table, _ = model.embedding_table(out.tokens.device)
    nearest = (F.normalize(out.tokens.float(), dim=-1) @ table.T).argmax(-1)
    predicted = [
        row[mask].tolist() for row, mask in zip(nearest, out.token_mask)
    ]
    truth = [
        row[mask].tolist()
        for row, mask in zip(outputs.transcript_ids, outputs.transcript_mask)
    ]
    return positional_token_accuracy(predicted, truth)["accuracy"]
