"""Token and count figures of a speech adapter: CIF token counts, nearest
tokens in the LLM's embedding table, positional token accuracy, collapse
and vocabulary coverage.

Rates and accuracies are fractions in [0, 1].
"""

import torch

from speechbrain_blspkd.metrics.text import _check_pair


def _as_long_list(values, what):
    if isinstance(values, torch.Tensor):
        values = values.detach().reshape(-1).tolist()
    values = list(values)
    if not values:
        raise ValueError(f"{what}: no counts given")
    return [int(round(float(v))) for v in values]


def count_stats(predicted_counts, target_counts):
    """Exact-count rate and count errors of the CIF token counts.

    Arguments
    ---------
    predicted_counts : list or torch.Tensor
        Predicted number of tokens per utterance (N^).
    target_counts : list or torch.Tensor
        True number of tokens (N).

    Returns
    -------
    dict
        ``exact_rate`` (fraction with N^ == N), ``mean_abs_error``
        (mean |N^ - N|), ``mean_error`` (mean N^ - N) and ``n``.

    Example
    -------
    >>> stats = count_stats([3, 4, 6], [3, 5, 5])
    >>> stats["exact_rate"], stats["mean_abs_error"], stats["mean_error"]
    (0.333..., 0.666..., 0.0)
    """
    pred = _as_long_list(predicted_counts, "count_stats (predicted)")
    true = _as_long_list(target_counts, "count_stats (target)")
    if len(pred) != len(true):
        raise ValueError(
            f"count_stats: {len(pred)} predicted counts but "
            f"{len(true)} target counts"
        )
    n = len(pred)
    diffs = [p - t for p, t in zip(pred, true)]
    return {
        "exact_rate": sum(d == 0 for d in diffs) / n,
        "mean_abs_error": sum(abs(d) for d in diffs) / n,
        "mean_error": sum(diffs) / n,
        "n": n,
    }


def exact_count_rate(predicted_counts, target_counts):
    """Fraction of utterances whose predicted token count is exact: the
    ``exact_rate`` of :func:`count_stats` (same arguments), a float.

    Example
    -------
    >>> exact_count_rate([3, 4], [3, 5])
    0.5
    """
    return count_stats(predicted_counts, target_counts)["exact_rate"]


def mean_abs_count_error(predicted_counts, target_counts):
    """Mean |N^ - N| of the predicted token counts: the ``mean_abs_error``
    of :func:`count_stats` (same arguments), a float.

    Example
    -------
    >>> mean_abs_count_error(torch.tensor([3, 7]), torch.tensor([3, 5]))
    1.0
    """
    return count_stats(predicted_counts, target_counts)["mean_abs_error"]


def nearest_tokens(
    outputs, embedding_table, metric="cosine", row_chunk=1024, vocab_chunk=16384
):
    """Index of the nearest embedding-table row for every output vector.

    Computed in float32 in chunks of rows and of the vocabulary, so tables
    of 262k rows never need a (K, V) score matrix.  Runs on the device of
    ``outputs``; the table is moved chunk by chunk.

    Arguments
    ---------
    outputs : torch.Tensor
        (K, D) vectors (e.g. adapter outputs at the CIF positions).
    embedding_table : torch.Tensor
        (V, D) token embeddings of the LLM.
    metric : str
        "cosine" (largest cosine), "l2" (smallest Euclidean distance) or
        "dot" (largest inner product).
    row_chunk : int
        Rows of ``outputs`` scored at once.
    vocab_chunk : int
        Table rows scored at once.

    Returns
    -------
    torch.Tensor
        (K,) long indices on the device of ``outputs``.

    Example
    -------
    >>> table = torch.eye(4)
    >>> nearest_tokens(torch.tensor([[0.1, 0.9, 0, 0], [0, 0, 0, 2.0]]), table)
    tensor([1, 3])
    """
    if metric not in ("cosine", "l2", "dot"):
        raise ValueError(
            f"nearest_tokens: metric must be cosine, l2 or dot, got {metric!r}"
        )
    if outputs.dim() != 2 or embedding_table.dim() != 2:
        raise ValueError(
            "nearest_tokens: expected outputs (K, D) and embedding_table "
            f"(V, D), got {tuple(outputs.shape)} and "
            f"{tuple(embedding_table.shape)}"
        )
    if outputs.shape[1] != embedding_table.shape[1]:
        raise ValueError(
            f"nearest_tokens: outputs have dimension {outputs.shape[1]} but "
            f"the embedding table {embedding_table.shape[1]}"
        )
    device = outputs.device
    result = torch.empty(outputs.shape[0], dtype=torch.long, device=device)
    with torch.no_grad():
        for r0 in range(0, outputs.shape[0], row_chunk):
            x = outputs[r0 : r0 + row_chunk].float()
            if metric == "cosine":
                x = torch.nn.functional.normalize(x, dim=-1)
            best = torch.full(
                (x.shape[0],), -float("inf"), dtype=torch.float32, device=device
            )
            best_idx = torch.zeros(x.shape[0], dtype=torch.long, device=device)
            for v0 in range(0, embedding_table.shape[0], vocab_chunk):
                e = embedding_table[v0 : v0 + vocab_chunk].to(device).float()
                if metric == "cosine":
                    e = torch.nn.functional.normalize(e, dim=-1)
                scores = x @ e.T
                if metric == "l2":
                    # argmin |x - e|^2 == argmax (2 x.e - |e|^2)
                    scores = 2 * scores - (e * e).sum(-1)
                val, idx = scores.max(dim=-1)
                better = val > best
                best = torch.where(better, val, best)
                best_idx = torch.where(better, idx + v0, best_idx)
            result[r0 : r0 + x.shape[0]] = best_idx
    return result


def nearest_token_accuracy(
    adapter_outputs,
    embedding_table,
    target_ids,
    metric="cosine",
    row_chunk=1024,
    vocab_chunk=16384,
):
    """Fraction of adapter outputs whose nearest token embedding is the target.

    Arguments
    ---------
    adapter_outputs : torch.Tensor
        (K, D) adapter outputs aligned with the target tokens.
    embedding_table : torch.Tensor
        (V, D) LLM input embedding table.
    target_ids : torch.Tensor or list
        (K,) true token ids.
    metric : str
        "cosine", "l2" or "dot" (see :func:`nearest_tokens`).
    row_chunk : int
        Rows scored at once.
    vocab_chunk : int
        Table rows scored at once.

    Returns
    -------
    float
        Accuracy in [0, 1].

    Example
    -------
    >>> table = torch.eye(3)
    >>> outs = torch.tensor([[1.0, 0.1, 0], [0, 0, 1.0]])
    >>> nearest_token_accuracy(outs, table, torch.tensor([0, 1]))
    0.5
    """
    target = torch.as_tensor(target_ids, dtype=torch.long).reshape(-1)
    if target.numel() != adapter_outputs.shape[0]:
        raise ValueError(
            f"nearest_token_accuracy: {adapter_outputs.shape[0]} outputs "
            f"but {target.numel()} target ids"
        )
    if target.numel() == 0:
        raise ValueError("nearest_token_accuracy: no outputs to score")
    pred = nearest_tokens(
        adapter_outputs, embedding_table, metric, row_chunk, vocab_chunk
    )
    return float((pred == target.to(pred.device)).float().mean())


def collapse_rate(nearest_ids):
    """Fraction of outputs whose nearest token is the most common one.

    A collapsed adapter maps (almost) every position to the same token
    (docs/algorithms.md §2.9.2 measured 90-100 %); a healthy one stays low.

    Arguments
    ---------
    nearest_ids : torch.Tensor or list
        (K,) nearest-token ids (see :func:`nearest_tokens`).

    Returns
    -------
    float
        In [1/K, 1].

    Example
    -------
    >>> collapse_rate(torch.tensor([5, 5, 5, 2]))
    0.75
    """
    ids = torch.as_tensor(nearest_ids, dtype=torch.long).reshape(-1)
    if ids.numel() == 0:
        raise ValueError("collapse_rate: no ids given")
    _, counts = torch.unique(ids, return_counts=True)
    return float(counts.max()) / ids.numel()


def positional_token_accuracy(predicted_ids, target_ids):
    """Token accuracy of predicted id sequences, position by position.

    For utterance ``b`` with ``N^_b`` predicted ids (e.g. the nearest tokens
    of the adapter outputs at the count it predicted itself, what the LLM
    sees at inference) and ``N_b`` true ids, positions
    ``0 <= i < max(N^_b, N_b)`` are scored.  Position ``i`` is correct when
    ``i < min(N^_b, N_b)`` and ``predicted[b][i] == target[b][i]``; a
    missing position (``N^_b < N_b``) and an extra one (``N^_b > N_b``)
    are errors.  The accuracy is::

        sum_b correct_b / sum_b max(N^_b, N_b)

    Positions are not re-aligned: one token missing early shifts every
    later one, which is what a count error does to the speech tokens the
    LLM reads.  With ``N^_b = N_b`` for every ``b`` it is the plain share
    of correct positions (the nearest-token accuracy at the true count).

    Arguments
    ---------
    predicted_ids : list of (list of int)
        Per utterance, the predicted token ids.
    target_ids : list of (list of int)
        Per utterance, the true token ids, same number of utterances.

    Returns
    -------
    dict
        ``accuracy`` (fraction, 0.0 when no position is scored),
        ``correct`` and ``positions`` (the sums above) and ``n``
        (utterances).

    Example
    -------
    One of four tokens is missing at position 1: the two later tokens are
    right but one place early, so only position 0 counts as correct.

    >>> out = positional_token_accuracy([[7, 9, 4]], [[7, 8, 9, 4]])
    >>> out["accuracy"], out["correct"], out["positions"]
    (0.25, 1, 4)
    >>> positional_token_accuracy([[1, 2], [3]], [[1, 5], [3]])["accuracy"]
    0.666...
    """
    pred, true = _check_pair(
        predicted_ids, target_ids, "positional_token_accuracy"
    )
    correct = positions = 0
    for p, t in zip(pred, true):
        p, t = [int(x) for x in p], [int(x) for x in t]
        positions += max(len(p), len(t))
        correct += sum(a == b for a, b in zip(p, t))
    return {
        "accuracy": correct / positions if positions else 0.0,
        "correct": correct,
        "positions": positions,
        "n": len(pred),
    }


def token_error_rate(predicted_ids, target_ids):
    """Token error rate of predicted id sequences after alignment.

    The edit distance (substitutions, deletions, insertions) between each
    utterance's predicted and true token ids, summed over utterances and
    divided by the true tokens: the word error rate computed on LLM tokens
    (speechbrain's :func:`~speechbrain.utils.edit_distance.
    accumulatable_wer_stats`).  Unlike :func:`positional_token_accuracy`,
    a missing or extra token costs one error, not every later position: it
    tells how many tokens were heard, the positional figure how many reach
    the LLM in their place.  It also scores a transcript's tokens (the
    cascade) on the same scale.

    Arguments
    ---------
    predicted_ids, target_ids : list of (list of int)
        As in :func:`positional_token_accuracy`.

    Returns
    -------
    dict
        ``ter`` (fraction; may exceed 1 with many insertions),
        ``substitutions``, ``deletions``, ``insertions``, ``tokens`` (true
        tokens) and ``n`` (utterances).

    Example
    -------
    The token missing at position 1 is one error of four (the positional
    accuracy of the same pair is 0.25):

    >>> out = token_error_rate([[7, 9, 4]], [[7, 8, 9, 4]])
    >>> out["ter"], out["deletions"], out["tokens"]
    (0.25, 1, 4)
    >>> token_error_rate([[1, 2, 6], [3]], [[1, 5], [3]])["ter"]
    0.666...
    """
    import collections

    from speechbrain.utils.edit_distance import accumulatable_wer_stats

    pred, true = _check_pair(predicted_ids, target_ids, "token_error_rate")
    stats = accumulatable_wer_stats(
        [[int(x) for x in t] for t in true],
        [[int(x) for x in p] for p in pred],
        collections.Counter(),
    )
    tokens = int(stats["num_ref_tokens"])
    errors = sum(
        int(stats[k]) for k in ("substitutions", "deletions", "insertions")
    )
    return {
        "ter": errors / tokens if tokens else 0.0,
        "substitutions": int(stats["substitutions"]),
        "deletions": int(stats["deletions"]),
        "insertions": int(stats["insertions"]),
        "tokens": tokens,
        "n": len(pred),
    }


def vocabulary_coverage(test_ids, train_ids):
    """Share of test tokens whose id occurs in the training token ids.

    A speech model can hardly produce a token it never heard; this tells
    how much of a test set is in the training vocabulary at all.

    Arguments
    ---------
    test_ids : list of (list of int)
        Token ids of each test transcript (e.g. under the LLM tokenizer).
    train_ids : iterable of (list of int)
        Token ids of each training transcript.

    Returns
    -------
    dict
        ``token_coverage``: fraction of test token occurrences whose id is
        in the training ids; ``type_coverage``: the same over distinct test
        ids; ``tokens`` and ``types`` (test occurrences and distinct ids);
        ``unseen_types`` (the distinct test ids never seen in training,
        sorted).

    Example
    -------
    >>> out = vocabulary_coverage([[1, 2, 2], [3]], [[1, 2], [4]])
    >>> out["token_coverage"], out["type_coverage"], out["unseen_types"]
    (0.75, 0.666..., [3])
    """
    known = {int(i) for ids in train_ids for i in ids}
    flat = [int(i) for ids in test_ids for i in ids]
    if not flat:
        raise ValueError("vocabulary_coverage: no test tokens given")
    types = set(flat)
    unseen = sorted(types - known)
    return {
        "token_coverage": sum(i in known for i in flat) / len(flat),
        "type_coverage": 1 - len(unseen) / len(types),
        "tokens": len(flat),
        "types": len(types),
        "unseen_types": unseen,
    }
