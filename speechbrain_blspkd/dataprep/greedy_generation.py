"""Greedy, batched answers of an instruction LLM, cut at its end of turn.

The generation behind the teacher continuations
(:mod:`speechbrain_blspkd.dataprep.continuations`): the LLM loaded from a
local transformers folder (:func:`load_causal_lm`; default: the
``smollm2-135m-instruct`` asset), its prompts decoded greedily in batches of
similar lengths with left padding and the KV cache (:func:`generate_greedy`),
each answer cut before the first end-of-turn token and flagged
``truncated`` when the token limit came first (:func:`finish_sequence`).
Every finished batch is appended to the caller's progress file
(:mod:`speechbrain_blspkd.dataprep.shard_progress`).
"""

import time

import torch

from speechbrain_blspkd.dataprep.shard_progress import (
    append_records,
    stop_for_resume_test,
)
from speechbrain_blspkd.utils.precision import resolve_dtype

__all__ = [
    "DEFAULT_MODEL",
    "LLM_DTYPES",
    "end_of_turn_ids",
    "finish_sequence",
    "generate_greedy",
    "load_causal_lm",
]

#: The asset generating when no model folder is given.
DEFAULT_MODEL = "smollm2-135m-instruct"
#: The ``dtype`` choices of :func:`load_causal_lm`.
LLM_DTYPES = ("auto", "bfloat16", "float32")


def end_of_turn_ids(model, tokenizer):
    """The end-of-turn token ids of ``model``'s generation config and
    ``tokenizer`` (sorted); a ``ValueError`` when there are none."""
    ids = set()
    for src in (model.generation_config.eos_token_id, tokenizer.eos_token_id):
        if src is None:
            continue
        ids.update([src] if isinstance(src, int) else list(src))
    if not ids:
        raise ValueError("the model and tokenizer define no end-of-turn token")
    return sorted(ids)


def finish_sequence(tokenizer, new_ids, eos_ids, max_new_tokens):
    """Text and ``truncated`` flag of one generated token sequence.

    The text stops before the first end-of-turn token; ``truncated`` is 1
    when none was generated within ``max_new_tokens``.

    Arguments
    ---------
    tokenizer : transformers.PreTrainedTokenizerBase
    new_ids : list of int
        Generated ids (after the prompt; may include padding).
    eos_ids : list of int
    max_new_tokens : int

    Returns
    -------
    (str, int, int)
        Continuation, truncated flag, number of generated tokens
        (the end-of-turn token included).

    Example
    -------
    >>> from speechbrain_blspkd.testing import toy_word_tokenizer
    >>> tok = toy_word_tokenizer(["a", "b"])
    >>> a, b, eos = tok.convert_tokens_to_ids(["a", "b", "<|im_end|>"])
    >>> finish_sequence(tok, [a, b, eos, 0], [eos], 4)
    ('a b', 0, 3)
    >>> finish_sequence(tok, [a, b], [eos], 2)
    ('a b', 1, 2)
    """
    new_ids = list(new_ids)
    stop = next((k for k, t in enumerate(new_ids) if t in eos_ids), None)
    if stop is None:
        kept, truncated, n = (
            new_ids[:max_new_tokens],
            1,
            min(len(new_ids), max_new_tokens),
        )
    else:
        kept, truncated, n = new_ids[:stop], 0, stop + 1
    text = tokenizer.decode(kept, skip_special_tokens=True).strip()
    return text, truncated, n


def load_causal_lm(model_dir, device, dtype):
    """Load a transformers causal LM and its tokenizer onto ``device``.

    Arguments
    ---------
    model_dir : str or pathlib.Path or None
        A local model folder; None: the :data:`DEFAULT_MODEL` asset.
    device : str or torch.device
        Where the model runs (in eval mode).
    dtype : str
        One of :data:`LLM_DTYPES` (``"auto"``: see
        :func:`~speechbrain_blspkd.utils.precision.resolve_dtype`).

    Returns
    -------
    (model, tokenizer, str)
        The last is the model folder, as the name of the model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model_dir is None:
        from speechbrain_blspkd.assets import asset_path

        model_dir = asset_path(DEFAULT_MODEL)
    if dtype not in LLM_DTYPES:
        raise ValueError(
            f"dtype must be one of {sorted(LLM_DTYPES)}, got {dtype!r}"
        )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=resolve_dtype(dtype, device)
    )
    model.to(device).eval()
    return model, tokenizer, str(model_dir)


def generate_greedy(
    model,
    tokenizer,
    todo,
    progress,
    prompts,
    batch_size,
    max_new_tokens,
    stop_after_batches,
):
    """Answer every row of ``todo`` greedily; log each batch to ``progress``.

    Arguments
    ---------
    model, tokenizer
        A transformers causal LM (:func:`load_causal_lm`) and its tokenizer.
    todo : list of dict
        The rows (``ID``) to answer.
    progress : pathlib.Path
        The progress file; each batch appends one record per row: ``ID``,
        ``continuation`` and ``truncated`` (:func:`finish_sequence`).
    prompts : list of list of int
        The prompt token ids of each row of ``todo``.
    batch_size, max_new_tokens : int
        Rows per ``generate`` call; the generation limit.
    stop_after_batches : int or None
        Resume tests: SIGKILL this process after that many batches.

    Returns
    -------
    dict
        ``generated`` rows, new ``tokens`` and ``seconds`` in ``generate``.
    """
    from tqdm import tqdm
    from transformers import GenerationConfig

    eos_ids = end_of_turn_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = eos_ids[0]
    gen_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
    )
    # longest first: similar lengths share a batch, memory peaks early
    order = sorted(range(len(todo)), key=lambda k: (-len(prompts[k]), k))
    device = next(model.parameters()).device
    stats = dict(generated=0, tokens=0, seconds=0.0)
    bar = tqdm(total=len(todo), desc="continuations", unit="row")
    for b, start in enumerate(range(0, len(order), batch_size)):
        idx = order[start : start + batch_size]
        width = max(len(prompts[k]) for k in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, k in enumerate(idx):  # left padding
            p = prompts[k]
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                generation_config=gen_config,
            )
        stats["seconds"] += time.perf_counter() - t0
        records = []
        for row, k in enumerate(idx):
            text, trunc, n_tok = finish_sequence(
                tokenizer, out[row, width:].tolist(), eos_ids, max_new_tokens
            )
            stats["tokens"] += n_tok
            records.append(
                dict(ID=todo[k]["ID"], continuation=text, truncated=trunc)
            )
        append_records(progress, records)
        stats["generated"] += len(records)
        bar.update(len(records))
        stop_for_resume_test(b + 1, stop_after_batches)
    bar.close()
    return stats
