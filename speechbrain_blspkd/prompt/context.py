"""Sequence lengths and the LLM context check.

Every sequence the prompt builder makes must fit in the LLM's positions
(:func:`context_limit`).  The lengths are counted with batched
tokenisation, without building the prompts (fast on a whole manifest):
:func:`sequence_lengths`.  Given a limit (:func:`check_fits`), it raises,
as :func:`check_rows` does, a :class:`ContextLengthError` that names the
item too long, its token count split into prompt / transcript or speech /
response / generation budget, and what to do.

The functions are methods of :class:`~speechbrain_blspkd.prompt.builder.
PromptBuilder` (``builder.check_fits`` ...) and take the builder first.

Authors
 * speechbrain-blspkd contributors 2025
"""

__all__ = [
    "ContextLengthError",
    "check_fits",
    "check_rows",
    "context_limit",
    "sequence_lengths",
]


from speechbrain_blspkd.prompt.batch import per_item
from speechbrain_blspkd.prompt.chat_template import template_pieces


class ContextLengthError(ValueError):
    """A sequence is longer than the LLM context (see
    :meth:`~speechbrain_blspkd.prompt.builder.PromptBuilder.check_fits`)."""


def context_limit(llm):
    """The number of positions the LLM takes (``max_position_embeddings``).

    Arguments
    ---------
    llm : transformers.PreTrainedModel or transformers.PretrainedConfig
        The LLM or its config (multimodal configs: the text config).

    Returns
    -------
    int or None
        None when the config does not say.

    Example
    -------
    >>> from transformers import LlamaConfig
    >>> context_limit(LlamaConfig(max_position_embeddings=128))
    128
    """
    config = getattr(llm, "config", llm)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    limit = getattr(config, "max_position_embeddings", None)
    return int(limit) if limit else None


def _encode_many(builder, texts, chunk_size=4096):
    """The token ids of many texts, with batched tokenizer calls (an empty
    text has none)."""
    out = [[] for _ in texts]
    todo = [i for i, text in enumerate(texts) if text]
    for k in range(0, len(todo), chunk_size):
        part = todo[k : k + chunk_size]
        enc = builder.tokenizer(
            [texts[i] for i in part], add_special_tokens=False
        )["input_ids"]
        for i, ids in zip(part, enc):
            out[i] = ids
    return out


def _length_parts(
    builder, instructions, transcripts, n_speech, continuations, add_eot
):
    """Per item ``(prompt, span, response)`` token counts (batched)."""
    spans, instructions, continuations, add_eot = per_item(
        instructions, transcripts, n_speech, continuations, add_eot
    )
    if transcripts is not None:
        sep = builder.transcript_separator
        texts = [sep + t.strip() for t in spans]
        spans = [len(x) for x in _encode_many(builder, texts)]
    responses = [len(x) for x in _encode_many(builder, continuations)]
    parts = []
    for instruction, span, response, continuation, eot in zip(
        instructions, spans, responses, continuations, add_eot
    ):
        pieces = template_pieces(builder, instruction)
        prompt = len(pieces.prefix) + len(pieces.middle)
        if continuation is not None and eot:
            response += len(pieces.suffix)
        parts.append((prompt, span, response))
    return parts


def sequence_lengths(
    builder,
    instructions,
    transcripts=None,
    n_speech=None,
    continuations=None,
    add_eot=True,
    max_new_tokens=0,
    limit=None,
    ids=None,
    source=None,
    item="row",
):
    """Lengths of the sequences :meth:`build_batch` makes, plus
    ``max_new_tokens``, with batched tokenisation (fast on a manifest).

    With ``limit``, every length must fit in ``limit`` LLM positions
    (:func:`context_limit`), else :class:`ContextLengthError` names
    ``source`` (a file), the first item that does not fit (by ``ids``),
    its token count split into prompt / transcript or speech / response /
    generation budget, the limit, and the other items too long.

    Arguments
    ---------
    instructions : str or list of str
        One instruction, or one per item.
    transcripts : list of str, optional
        Transcripts (teacher text sequences).
    n_speech : list of int, optional
        Speech slot counts (student sequences).
    continuations : list of str, optional
        Responses; None for generation prompts.
    add_eot : bool or list of bool
        End-of-turn after each continuation.
    max_new_tokens : int
        Generation budget added to every length.
    limit : int, optional
        LLM positions every length must fit in; None checks nothing.
    ids : list of str, optional
        Names of the items (manifest row IDs, files), for the error.
    source : str, optional
        Where the items come from (manifest path), for the error.
    item : str
        What an item is called in the error ("row", "file" ...).

    Returns
    -------
    list of int

    Example
    -------
    >>> from speechbrain_blspkd.prompt import PromptBuilder
    >>> from speechbrain_blspkd.testing import doctest_tokenizer
    >>> builder = PromptBuilder(doctest_tokenizer())
    >>> p = builder.build("Say:", transcript="a b", continuation="ok")
    >>> n = builder.sequence_lengths("Say:", ["a b"], continuations=["ok"])
    >>> n == [len(p.input_ids)]
    True
    """
    parts = _length_parts(
        builder, instructions, transcripts, n_speech, continuations, add_eot
    )
    if limit is not None:
        span_name = "transcript" if transcripts is not None else "speech"
        _raise_if_too_long(
            parts, limit, max_new_tokens, ids, source, span_name, item
        )
    return [sum(p) + int(max_new_tokens) for p in parts]


def check_fits(builder, limit, *args, **kwargs):
    """Raises :class:`ContextLengthError` when a sequence is too long.

    :meth:`sequence_lengths` with the ``limit`` first.

    Arguments
    ---------
    limit : int or None
        LLM positions (:func:`context_limit`); None checks nothing.
    *args, **kwargs
        The other arguments of :meth:`sequence_lengths` (the sequences,
        ``max_new_tokens`` and how the error names the items).

    Returns
    -------
    list of int
        The lengths (empty when ``limit`` is None).

    Example
    -------
    >>> from speechbrain_blspkd.prompt import PromptBuilder
    >>> from speechbrain_blspkd.testing import doctest_tokenizer
    >>> builder = PromptBuilder(doctest_tokenizer())
    >>> builder.check_fits(  # doctest: +ELLIPSIS
    ...     70, "Say:", ["a b", "the cat " * 9], max_new_tokens=8,
    ...     ids=["u1", "u2"], source="test.csv")
    Traceback (most recent call last):
    ...
    speechbrain_blspkd.prompt.context.ContextLengthError: test.csv: row 'u2': ...
    """
    if limit is None:
        return []
    return sequence_lengths(builder, *args, limit=limit, **kwargs)


def check_rows(
    builder, limit, rows, instruction, audio_instruction=None, source=None
):
    """Check the training sequences of manifest rows fit the LLM.

    The teacher sequence is the chat prompt with the instruction and the
    transcript, then the continuation and (unless the row is
    ``truncated``) the end-of-turn tokens; the student sequence has N
    speech slots (N = the transcript's token count) in place of the
    transcript, so it differs only when ``audio_instruction`` differs.
    All rows are tokenised in batches (one pass over the manifest).

    Arguments
    ---------
    limit : int or None
        LLM positions (:func:`context_limit`); None checks nothing.
    rows : list of dict
        Manifest rows: ``ID``, ``transcript``, ``continuation``,
        ``truncated``.
    instruction : str
        Text instruction of the teacher.
    audio_instruction : str, optional
        Instruction of the student (None: ``instruction``).
    source : str, optional
        The manifest file, for the message.

    Returns
    -------
    list of int
        The longest of the teacher and student lengths of each row.

    Example
    -------
    >>> from speechbrain_blspkd.prompt import PromptBuilder
    >>> from speechbrain_blspkd.testing import doctest_tokenizer
    >>> builder = PromptBuilder(doctest_tokenizer())
    >>> rows = [dict(ID="u1", transcript="a b", continuation="c",
    ...     truncated="0")]
    >>> n = builder.check_rows(64, rows, "Say:")[0]
    >>> builder.check_rows(  # doctest: +ELLIPSIS
    ...     n - 1, rows, "Say:", source="m.csv")
    Traceback (most recent call last):
    ...
    speechbrain_blspkd.prompt.context.ContextLengthError: m.csv: row 'u1': the text ...
    """
    if limit is None or not rows:
        return []
    ids = [r["ID"] for r in rows]
    continuations = [r.get("continuation") or "" for r in rows]
    add_eot = [str(r.get("truncated") or "0") != "1" for r in rows]
    parts = _length_parts(
        builder,
        instruction,
        transcripts=[r["transcript"] for r in rows],
        n_speech=None,
        continuations=continuations,
        add_eot=add_eot,
    )
    _raise_if_too_long(parts, limit, 0, ids, source, "transcript")
    lengths = [sum(p) for p in parts]
    if audio_instruction is not None and audio_instruction != instruction:
        audio = template_pieces(builder, audio_instruction)
        prompt = len(audio.prefix) + len(audio.middle)
        speech = [(prompt, n, r) for _, n, r in parts]
        _raise_if_too_long(speech, limit, 0, ids, source, "speech")
        lengths = [max(a, sum(b)) for a, b in zip(lengths, speech)]
    return lengths


def _raise_if_too_long(
    parts, limit, max_new_tokens, ids, source, span, item="row"
):
    new = int(max_new_tokens)
    bad = [i for i, p in enumerate(parts) if sum(p) + new > limit]
    if not bad:
        return
    names = [str(ids[i]) if ids is not None else f"#{i}" for i in bad]
    names = [repr(x) if ids is not None else x for x in names]
    prompt, n, response = parts[bad[0]]
    kind = "text (teacher)" if span == "transcript" else "speech (student)"
    terms = f"prompt {prompt} + {span} {n}"
    if response:
        terms += f" + response {response}"
    if new:
        terms += f" + max_new_tokens {new}"
    where = f"{source}: " if source else ""
    msg = (
        f"{where}{item} {names[0]}: the {kind} sequence has "
        f"{sum(parts[bad[0]]) + new} tokens ({terms}), more than the "
        f"LLM context of {limit} positions (max_position_embeddings)"
    )
    if len(bad) > 1:
        shown = ", ".join(names[1:6]) + (", ..." if len(bad) > 6 else "")
        msg += f"; {len(bad) - 1} more too long: {shown}"
    hint = "drop or shorten these rows (shorter transcript/continuation)"
    if new:
        hint = "split the audio into shorter clips"
        if span == "transcript":
            hint = "shorten the text"
        hint += ", lower max_new_tokens"
    raise ContextLengthError(
        f"{msg}. Fix: {hint}, or use an LLM with a longer context."
    )
