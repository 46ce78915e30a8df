"""A tokenised prompt and a padded batch of them.

:class:`Prompt` is what :class:`~speechbrain_blspkd.prompt.builder.
PromptBuilder` makes: the token ids, where the transcript (or the speech
slots) and the response lie.  :func:`collate_prompts` pads prompts into
the tensors the LLM passes and generation read (right padding for
training, left padding for generation).  :func:`per_item` reads the
arguments of a batch of prompts, as the builder and the length count
(:mod:`~speechbrain_blspkd.prompt.context`) both take them.

Authors
 * speechbrain-blspkd contributors 2025
"""

import dataclasses

import torch

__all__ = ["IGNORE_INDEX", "Prompt", "collate_prompts", "per_item"]

IGNORE_INDEX = -100


@dataclasses.dataclass
class Prompt:
    """One tokenised prompt from :class:`~speechbrain_blspkd.prompt.builder.
    PromptBuilder`.

    Arguments
    ---------
    input_ids : list of int
        Token ids; speech slots hold ``placeholder_id``.
    span : tuple of int
        ``(start, length)`` of the transcript tokens (text prompt) or of the
        speech slots (speech prompt).
    is_speech : bool
        Whether ``span`` holds speech slots.
    response_span : tuple of int
        ``(start, length)`` of the continuation (+ end-of-turn) tokens;
        length 0 for a generation prompt, whose ``start`` is then
        ``len(input_ids)``.

    Example
    -------
    >>> p = Prompt([5, 6, 0, 0, 7, 8, 9], (2, 2), True, (5, 2))
    >>> p.speech_span, p.transcript_span, p.prompt_length
    ((2, 2), None, 5)
    >>> p.labels
    [-100, -100, -100, -100, -100, 8, 9]
    """

    input_ids: list
    span: tuple
    is_speech: bool
    response_span: tuple

    @property
    def speech_span(self):
        """``(start, N)`` of the speech slots, None for a text prompt."""
        return self.span if self.is_speech else None

    @property
    def transcript_span(self):
        """``(start, N)`` of the transcript, None for a speech prompt."""
        return None if self.is_speech else self.span

    @property
    def prompt_length(self):
        """Number of tokens before the response (the generation prompt)."""
        return self.response_span[0]

    @property
    def labels(self):
        """Input ids with everything outside the response set to -100."""
        start, length = self.response_span
        return [
            t if start <= i < start + length else IGNORE_INDEX
            for i, t in enumerate(self.input_ids)
        ]


def per_item(
    instructions,
    transcripts=None,
    n_speech=None,
    continuations=None,
    add_eot=True,
):
    """The arguments of a batch of prompts, one list entry per item.

    The arguments are those of :meth:`~speechbrain_blspkd.prompt.builder.
    PromptBuilder.build_batch`: one instruction (or None) and one
    ``add_eot`` stand for every item, no ``continuations`` gives
    generation prompts.

    Returns
    -------
    spans : list
        The transcripts (text prompts) or the speech slot counts, as int
        (speech prompts).
    instructions : list of str or None
    continuations : list of str or None
        None items: generation prompts.
    add_eot : list of bool

    Raises
    ------
    ValueError
        Not exactly one of ``transcripts`` and ``n_speech``, or a list
        of another length than theirs.

    Example
    -------
    >>> per_item("Say:", n_speech=[2, 3], add_eot=[True, False])
    ([2, 3], ['Say:', 'Say:'], [None, None], [True, False])
    """
    if (transcripts is None) == (n_speech is None):
        raise ValueError(
            "give exactly one of `transcripts` (text prompts) and `n_speech` "
            "(speech prompts)"
        )
    if transcripts is not None:
        spans = list(transcripts)
    else:
        spans = [int(x) for x in n_speech]
    n = len(spans)
    if isinstance(instructions, str) or instructions is None:
        instructions = [instructions] * n
    if continuations is None:
        continuations = [None] * n
    if isinstance(add_eot, bool):
        add_eot = [add_eot] * n
    for name, seq in (
        ("instructions", instructions),
        ("continuations", continuations),
        ("add_eot", add_eot),
    ):
        if len(seq) != n:
            raise ValueError(f"`{name}` has {len(seq)} items, expected {n}")
    add_eot = [bool(x) for x in add_eot]
    return spans, list(instructions), list(continuations), add_eot


def collate_prompts(prompts, pad_id, padding_side="right", device=None):
    """Pads prompts into a batch of tensors.

    Arguments
    ---------
    prompts : list of Prompt
        Prompts from :class:`~speechbrain_blspkd.prompt.builder.
        PromptBuilder`.
    pad_id : int
        Id for padding positions.
    padding_side : str
        "right" or "left"; spans and starts are given in padded coordinates.
    device : torch.device, optional
        Where to put the tensors.

    Returns
    -------
    dict
        ``input_ids`` (B, L) long; ``attention_mask`` (B, L) long;
        ``span_mask`` (B, L) bool (transcript or speech span);
        ``speech_mask`` (B, L) bool (span_mask of speech prompts, else
        False); ``span_start``, ``span_length``, ``response_start``,
        ``response_length``, ``lengths`` (B,) long; ``response_mask``
        (B, L) bool; ``labels`` (B, L) long with -100 outside responses.

    Example
    -------
    >>> p1 = Prompt([1, 0, 2, 3], (1, 1), True, (3, 1))
    >>> p2 = Prompt([1, 0, 0, 2, 3, 4], (1, 2), True, (3, 3))
    >>> b = collate_prompts([p1, p2], pad_id=9, padding_side="left")
    >>> b["input_ids"].tolist()
    [[9, 9, 1, 0, 2, 3], [1, 0, 0, 2, 3, 4]]
    >>> b["span_start"].tolist(), b["response_start"].tolist()
    ([3, 1], [5, 3])
    """
    if padding_side not in ("left", "right"):
        raise ValueError(
            f"collate_prompts: padding_side must be 'left' or 'right', got "
            f"{padding_side!r}"
        )
    batch = len(prompts)
    if batch == 0:
        raise ValueError("collate_prompts: empty list of prompts")
    lengths = [len(p.input_ids) for p in prompts]
    width = max(lengths)
    input_ids = torch.full((batch, width), int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros(batch, width, dtype=torch.long)
    span_mask = torch.zeros(batch, width, dtype=torch.bool)
    response_mask = torch.zeros(batch, width, dtype=torch.bool)
    starts = torch.zeros(batch, 4, dtype=torch.long)
    is_speech = torch.zeros(batch, dtype=torch.bool)
    for i, p in enumerate(prompts):
        off = width - lengths[i] if padding_side == "left" else 0
        input_ids[i, off : off + lengths[i]] = torch.tensor(
            p.input_ids, dtype=torch.long
        )
        attention_mask[i, off : off + lengths[i]] = 1
        s0, sn = p.span
        r0, rn = p.response_span
        span_mask[i, off + s0 : off + s0 + sn] = True
        response_mask[i, off + r0 : off + r0 + rn] = True
        starts[i] = torch.tensor([off + s0, sn, off + r0, rn])
        is_speech[i] = p.is_speech
    labels = input_ids.masked_fill(~response_mask, IGNORE_INDEX)
    out = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "span_mask": span_mask,
        "speech_mask": span_mask & is_speech[:, None],
        "span_start": starts[:, 0],
        "span_length": starts[:, 1],
        "response_start": starts[:, 2],
        "response_length": starts[:, 3],
        "response_mask": response_mask,
        "labels": labels,
        "lengths": torch.tensor(lengths, dtype=torch.long),
    }
    if device is not None:
        out = {k: v.to(device) for k, v in out.items()}
    return out
