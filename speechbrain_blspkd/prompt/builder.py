"""The one prompt builder: teacher text input, student speech input, inference.

Every prompt the toolkit feeds the LLM goes through :class:`PromptBuilder`,
so training (teacher and student) and decoding see the same tokens; how
the LLM's chat template becomes token pieces, and the tokenisation
conventions, are told in :mod:`speechbrain_blspkd.prompt.chat_template`.

Authors
 * speechbrain-blspkd contributors 2025
"""

from speechbrain_blspkd.prompt.batch import Prompt, collate_prompts, per_item
from speechbrain_blspkd.prompt.chat_template import template_pieces
from speechbrain_blspkd.prompt.context import (
    check_fits,
    check_rows,
    sequence_lengths,
)

__all__ = ["PromptBuilder"]


class PromptBuilder:
    """Builds teacher, student and generation prompts with a chat template.

    Arguments
    ---------
    tokenizer : transformers.PreTrainedTokenizerBase
        The LLM tokenizer, with a ``chat_template``.
    system_prompt : str, optional
        System message; None keeps the template's default behaviour
        (SmolLM2 then injects its own default system prompt).
    transcript_separator : str
        Text joining the instruction and the transcript; tokenised as part
        of the transcript span (see :mod:`~speechbrain_blspkd.prompt.
        chat_template`).
    placeholder_id : int, optional
        Id written in the speech slots (they are replaced by embeddings
        before the LLM sees them); default: the pad, else the eos id, else 0.

    Example
    -------
    >>> from speechbrain_blspkd.testing import doctest_tokenizer
    >>> tok = doctest_tokenizer()
    >>> builder = PromptBuilder(tok, system_prompt="Be brief.")
    >>> t = builder.build("Repeat:", transcript="a b", continuation="b a")
    >>> n = len(builder.transcript_ids("a b"))  # N: the CIF target count
    >>> s = builder.build("Repeat:", n_speech=n, continuation="b a")
    >>> t.transcript_span == s.speech_span, t.response_span == s.response_span
    (True, True)
    >>> tok.decode(t.input_ids[t.response_span[0]:])
    'b a<|im_end|>'
    >>> g = builder.build("Repeat:", transcript="a b")  # generation prompt
    >>> g.input_ids == t.input_ids[: t.prompt_length]
    True
    """

    def __init__(
        self,
        tokenizer,
        system_prompt=None,
        transcript_separator=" ",
        placeholder_id=None,
    ):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                "PromptBuilder: the tokenizer has no chat_template; use the "
                "instruction-tuned tokenizer or set tokenizer.chat_template"
            )
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.transcript_separator = transcript_separator
        if placeholder_id is None:
            placeholder_id = tokenizer.pad_token_id
        if placeholder_id is None:
            placeholder_id = tokenizer.eos_token_id
        self.placeholder_id = int(placeholder_id or 0)
        self._cache = {}
        self._system_supported = None
        self._transcript_cache = {}

    # ------------------------------------------------------------------
    # tokenisation pieces
    def _encode(self, text):
        if not text:
            return []
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def transcript_ids(self, transcript):
        """The transcript span's token ids (N = their number).

        This is the CIF target count and the alignment target, so it must be
        the only place transcripts are tokenised.

        Arguments
        ---------
        transcript : str
            The transcript text.

        Returns
        -------
        list of int

        Example
        -------
        >>> from speechbrain_blspkd.testing import doctest_tokenizer
        >>> builder = PromptBuilder(doctest_tokenizer())
        >>> builder.tokenizer.decode(builder.transcript_ids(" a b "))
        ' a b'
        """
        ids = self._transcript_cache.get(transcript)
        if ids is None:
            text = self.transcript_separator + transcript.strip()
            ids = self._encode(text)
            if len(self._transcript_cache) < 100000:
                self._transcript_cache[transcript] = ids
        return list(ids)

    @property
    def eot_ids(self):
        """Ids that end the assistant turn (stop tokens for generation)."""
        ids = []
        suffix = self._template("").suffix
        if suffix:
            ids.append(suffix[0])
        if self.tokenizer.eos_token_id is not None:
            ids.append(int(self.tokenizer.eos_token_id))
        return list(dict.fromkeys(ids))

    # ------------------------------------------------------------------
    def build(
        self,
        instruction,
        transcript=None,
        n_speech=None,
        continuation=None,
        add_eot=True,
    ):
        """Builds one prompt.

        Arguments
        ---------
        instruction : str
            The user instruction (may contain ``{transcript}``).
        transcript : str, optional
            Transcript text (teacher prompt). Give this or ``n_speech``.
        n_speech : int, optional
            Number of speech slots (student prompt).
        continuation : str, optional
            Assistant answer; None gives a generation prompt that ends with
            the assistant header.
        add_eot : bool
            Append the end-of-turn tokens after the continuation (False for
            continuations cut at a length limit).

        Returns
        -------
        Prompt

        Example
        -------
        >>> from speechbrain_blspkd.testing import doctest_tokenizer
        >>> builder = PromptBuilder(doctest_tokenizer())
        >>> p = builder.build("Say:", n_speech=3, continuation="ok")
        >>> start, n = p.speech_span
        >>> n, p.input_ids[start:start + n] == [builder.placeholder_id] * 3
        (3, True)
        """
        if (transcript is None) == (n_speech is None):
            raise ValueError(
                "PromptBuilder.build: give exactly one of `transcript` "
                "(text prompt) and `n_speech` (speech prompt)"
            )
        pieces = self._template(instruction)
        if transcript is not None:
            span_ids = self.transcript_ids(transcript)
        else:
            if int(n_speech) < 0:
                raise ValueError(
                    f"PromptBuilder.build: n_speech must be >= 0, got "
                    f"{n_speech}"
                )
            span_ids = [self.placeholder_id] * int(n_speech)
        ids = pieces.prefix + span_ids + pieces.middle
        span = (len(pieces.prefix), len(span_ids))
        response_start = len(ids)
        if continuation is not None:
            ids = ids + self._encode(continuation)
            if add_eot:
                ids = ids + pieces.suffix
        return Prompt(
            input_ids=ids,
            span=span,
            is_speech=n_speech is not None,
            response_span=(response_start, len(ids) - response_start),
        )

    def build_batch(
        self,
        instructions,
        transcripts=None,
        n_speech=None,
        continuations=None,
        add_eot=True,
    ):
        """:meth:`build` over lists (``add_eot`` may be a list of bools).

        Arguments
        ---------
        instructions : list of str or str
            One instruction per item, or one for all.
        transcripts : list of str, optional
            Transcripts (teacher prompts).
        n_speech : list of int, optional
            Speech slot counts (student prompts).
        continuations : list of str, optional
            Continuations; None for generation prompts.
        add_eot : bool or list of bool
            Per item end-of-turn switch.

        Returns
        -------
        list of Prompt

        Example
        -------
        >>> from speechbrain_blspkd.testing import doctest_tokenizer
        >>> builder = PromptBuilder(doctest_tokenizer())
        >>> ps = builder.build_batch("Say:", n_speech=[1, 2])
        >>> [p.speech_span[1] for p in ps]
        [1, 2]
        """
        spans, instructions, continuations, add_eot = per_item(
            instructions, transcripts, n_speech, continuations, add_eot
        )
        name = "transcript" if transcripts is not None else "n_speech"
        return [
            self.build(instruction, continuation=c, add_eot=e, **{name: span})
            for instruction, span, c, e in zip(
                instructions, spans, continuations, add_eot
            )
        ]

    def collate(self, prompts, padding_side="right", device=None):
        """:func:`collate_prompts` with the tokenizer's pad id.

        Arguments
        ---------
        prompts : list of Prompt
            Prompts to batch.
        padding_side : str
            "right" (training) or "left" (generation).
        device : torch.device, optional
            Where to put the tensors.

        Returns
        -------
        dict of torch.Tensor
            See :func:`collate_prompts`.

        Example
        -------
        >>> from speechbrain_blspkd.testing import doctest_tokenizer
        >>> builder = PromptBuilder(doctest_tokenizer())
        >>> b = builder.collate(builder.build_batch("Say:", n_speech=[1, 3]))
        >>> b["speech_mask"].sum(1).tolist()
        [1, 3]
        """
        return collate_prompts(
            prompts, self.placeholder_id, padding_side, device=device
        )

    # ------------------------------------------------------------------
    # methods defined beside the builder, as functions taking it: the
    # template pieces (chat_template.py) and the lengths and context check
    # (context.py)
    _template = template_pieces
    sequence_lengths = sequence_lengths
    check_fits = check_fits
    check_rows = check_rows
