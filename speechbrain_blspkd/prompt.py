"""The one prompt builder: teacher text input, student speech input, inference.

Every prompt the toolkit feeds the LLM goes through :class:`PromptBuilder`,
so training (teacher and student) and decoding see the same tokens. It uses
the LLM's own chat template:

* teacher (text): ``[system] user: {instruction}{transcript}`` followed by
  the assistant turn ``{continuation}<end-of-turn>``;
* student (speech): the identical token sequence with the transcript span
  replaced by N placeholder slots, to be overwritten by the N CFormer
  outputs (the instruction may be replaced by an audio-specific one);
* generation: the same sequence cut after the assistant header.

How it works: the template is rendered once per (instruction, system) with
sentinel strings standing for the transcript and the continuation, the text
is split at the sentinels and every piece is tokenised on its own::

    prefix | transcript | middle (to the assistant header) | continuation
    | end-of-turn suffix

so the transcript is exactly its N tokens under the LLM tokenizer (the CIF
target count, :meth:`PromptBuilder.transcript_ids`) and teacher and student
sequences agree token for token outside the span.

Conventions (documented tokenisation boundaries):

* The transcript is joined to the instruction with ``transcript_separator``
  (default one space) which belongs to the transcript span: the span is
  ``tokenizer(separator + transcript.strip())``. Trailing whitespace of the
  part of the instruction before the transcript is dropped. With a GPT-2
  style byte-level BPE (Llama 3, SmolLM2, Qwen2) this is exactly how the
  whole string tokenises (``": hello"`` -> ``":"`` ``" hello"``); with other
  tokenizers the ids can differ from tokenising the whole rendered string
  at the piece boundaries only (the decoded text is always identical).
* An instruction may contain ``{transcript}`` to put the transcript inside
  it; otherwise the transcript follows the instruction.
* Trailing whitespace after the end-of-turn marker of the assistant turn
  (e.g. the ``"\\n"`` after ``<|im_end|>``) is not part of the sequence.
* Templates that inject a default system prompt when none is given
  (SmolLM2) keep doing so when ``system_prompt`` is None; pass a string to
  replace it. Templates without a system role (Gemma 2: they raise) get the
  system prompt folded into the user turn (``system + "\\n\\n" + user``).

Authors
 * speechbrain-blspkd contributors 2025
"""

import dataclasses
import logging

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "ContextLengthError",
    "Prompt",
    "PromptBuilder",
    "collate_prompts",
    "context_limit",
]

TRANSCRIPT_SENTINEL = "@@BLSPKD-TRANSCRIPT@@"
CONTINUATION_SENTINEL = "@@BLSPKD-CONTINUATION@@"
IGNORE_INDEX = -100


class ContextLengthError(ValueError):
    """A sequence is longer than the LLM context (see
    :meth:`PromptBuilder.check_fits`)."""


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


@dataclasses.dataclass
class Prompt:
    """One tokenised prompt from :class:`PromptBuilder`.

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


@dataclasses.dataclass
class _Template:
    """Token pieces of one rendered template (per instruction/system)."""

    prefix: list
    middle: list
    suffix: list


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
        of the transcript span (see the module docstring).
    placeholder_id : int, optional
        Id written in the speech slots (they are replaced by embeddings
        before the LLM sees them); default: the pad, else the eos id, else 0.

    Example
    -------
    >>> from speechbrain_blspkd.utils.testing import doctest_tokenizer
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

    def _render(self, user_content, with_system):
        messages = []
        if with_system:
            messages.append({"role": "system", "content": self.system_prompt})
        messages.append({"role": "user", "content": user_content})
        messages.append({"role": "assistant", "content": CONTINUATION_SENTINEL})
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=False
        )
        if not isinstance(text, str):  # some versions return a list
            text = text[0]
        return text

    def _template(self, instruction):
        """Token pieces for ``instruction`` (cached)."""
        instruction = instruction or ""
        if instruction in self._cache:
            return self._cache[instruction]
        if "{transcript}" in instruction:
            before, after = instruction.split("{transcript}", 1)
        else:
            before, after = instruction, ""
        content = before.rstrip() + TRANSCRIPT_SENTINEL + after
        has_system = self.system_prompt is not None
        text = None
        if has_system and self._system_supported is not False:
            try:
                text = self._render(content, with_system=True)
                self._system_supported = True
            except Exception as e:  # jinja raise_exception -> TemplateError
                logger.info(
                    "chat template refuses a system role (%s); folding the "
                    "system prompt into the user turn",
                    e,
                )
                self._system_supported = False
        if text is None:
            if has_system:
                content = self.system_prompt + "\n\n" + content
            text = self._render(content, with_system=False)
        for sentinel in (TRANSCRIPT_SENTINEL, CONTINUATION_SENTINEL):
            if text.count(sentinel) != 1:
                raise ValueError(
                    "PromptBuilder: the chat template does not copy message "
                    f"contents verbatim (sentinel {sentinel!r} found "
                    f"{text.count(sentinel)} times in {text!r})"
                )
        prefix, rest = text.split(TRANSCRIPT_SENTINEL)
        middle, suffix = rest.split(CONTINUATION_SENTINEL)
        pieces = _Template(
            prefix=self._encode(prefix),
            middle=self._encode(middle),
            # the end-of-turn marker without the template's line break;
            # a turn closed by whitespace alone (a base model's plain-text
            # turns, assets.gguf.COMPLETION_TEMPLATE) keeps it: it is the
            # marker
            suffix=self._encode(suffix.rstrip() or suffix),
        )
        self._cache[instruction] = pieces
        return pieces

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
        >>> from speechbrain_blspkd.utils.testing import doctest_tokenizer
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
        >>> from speechbrain_blspkd.utils.testing import doctest_tokenizer
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
        >>> from speechbrain_blspkd.utils.testing import doctest_tokenizer
        >>> builder = PromptBuilder(doctest_tokenizer())
        >>> ps = builder.build_batch("Say:", n_speech=[1, 2])
        >>> [p.speech_span[1] for p in ps]
        [1, 2]
        """
        items = transcripts if transcripts is not None else n_speech
        if items is None:
            raise ValueError("build_batch: give `transcripts` or `n_speech`")
        n = len(items)
        if isinstance(instructions, str):
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
                raise ValueError(
                    f"build_batch: `{name}` has {len(seq)} items, expected {n}"
                )
        out = []
        for i in range(n):
            kwargs = (
                {"transcript": items[i]}
                if transcripts is not None
                else {"n_speech": int(items[i])}
            )
            out.append(
                self.build(
                    instructions[i],
                    continuation=continuations[i],
                    add_eot=bool(add_eot[i]),
                    **kwargs,
                )
            )
        return out

    # ------------------------------------------------------------------
    # sequence lengths and the context check
    def _encode_many(self, texts, chunk_size=4096):
        """:meth:`_encode` of many texts with batched tokenizer calls."""
        out = [[] for _ in texts]
        todo = [i for i, text in enumerate(texts) if text]
        for k in range(0, len(todo), chunk_size):
            part = todo[k : k + chunk_size]
            enc = self.tokenizer(
                [texts[i] for i in part], add_special_tokens=False
            )["input_ids"]
            for i, ids in zip(part, enc):
                out[i] = ids
        return out

    def _length_parts(
        self,
        instructions,
        transcripts=None,
        n_speech=None,
        continuations=None,
        add_eot=True,
    ):
        """Per item ``(prompt, span, response)`` token counts (batched)."""
        items = transcripts if transcripts is not None else n_speech
        if (transcripts is None) == (n_speech is None):
            raise ValueError("give exactly one of `transcripts`, `n_speech`")
        n = len(items)
        if isinstance(instructions, str) or instructions is None:
            instructions = [instructions] * n
        if isinstance(add_eot, bool):
            add_eot = [add_eot] * n
        if transcripts is not None:
            sep = self.transcript_separator
            spans = [
                len(x)
                for x in self._encode_many([sep + t.strip() for t in items])
            ]
        else:
            spans = [int(x) for x in items]
        responses = [0] * n
        if continuations is not None:
            responses = [len(x) for x in self._encode_many(continuations)]
        parts = []
        for i in range(n):
            pieces = self._template(instructions[i])
            prompt = len(pieces.prefix) + len(pieces.middle)
            response = responses[i]
            if continuations is not None and continuations[i] is not None:
                response += len(pieces.suffix) if add_eot[i] else 0
            parts.append((prompt, spans[i], response))
        return parts

    def sequence_lengths(
        self,
        instructions,
        transcripts=None,
        n_speech=None,
        continuations=None,
        add_eot=True,
        max_new_tokens=0,
    ):
        """Lengths of the sequences :meth:`build_batch` makes, plus
        ``max_new_tokens``, with batched tokenisation (fast on a manifest).

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

        Returns
        -------
        list of int

        Example
        -------
        >>> from speechbrain_blspkd.utils.testing import doctest_tokenizer
        >>> builder = PromptBuilder(doctest_tokenizer())
        >>> p = builder.build("Say:", transcript="a b", continuation="ok")
        >>> n = builder.sequence_lengths("Say:", ["a b"], continuations=["ok"])
        >>> n == [len(p.input_ids)]
        True
        """
        parts = self._length_parts(
            instructions, transcripts, n_speech, continuations, add_eot
        )
        return [sum(p) + int(max_new_tokens) for p in parts]

    def check_fits(
        self,
        limit,
        instructions,
        transcripts=None,
        n_speech=None,
        continuations=None,
        add_eot=True,
        max_new_tokens=0,
        ids=None,
        source=None,
        item="row",
    ):
        """Raises :class:`ContextLengthError` when a sequence is too long.

        Every sequence :meth:`build_batch` makes from the arguments, plus
        ``max_new_tokens`` (when generating), must fit in ``limit`` LLM
        positions (:func:`context_limit`). The error names ``source`` (a
        file), the first item that does not fit (by ``ids``), its token
        count split into prompt / transcript or speech / response /
        generation budget, the limit, and the other items too long.

        Arguments
        ---------
        limit : int or None
            LLM positions; None checks nothing.
        instructions : str or list of str
            See :meth:`sequence_lengths` (and the other sequence arguments).
        transcripts, n_speech, continuations, add_eot
            See :meth:`sequence_lengths`.
        max_new_tokens : int
            Generation budget.
        ids : list of str, optional
            Names of the items (manifest row IDs, files).
        source : str, optional
            Where the items come from (manifest path), for the message.
        item : str
            What an item is called in the message ("row", "file" ...).

        Returns
        -------
        list of int
            The lengths (empty when ``limit`` is None).

        Example
        -------
        >>> from speechbrain_blspkd.utils.testing import doctest_tokenizer
        >>> builder = PromptBuilder(doctest_tokenizer())
        >>> builder.check_fits(  # doctest: +ELLIPSIS
        ...     70, "Say:", ["a b", "the cat " * 9], max_new_tokens=8,
        ...     ids=["u1", "u2"], source="test.csv")
        Traceback (most recent call last):
        ...
        speechbrain_blspkd.prompt.ContextLengthError: test.csv: row 'u2': ...
        """
        if limit is None:
            return []
        parts = self._length_parts(
            instructions, transcripts, n_speech, continuations, add_eot
        )
        span_name = "transcript" if transcripts is not None else "speech"
        self._raise_if_too_long(
            parts, limit, max_new_tokens, ids, source, span_name, item
        )
        return [sum(p) + int(max_new_tokens) for p in parts]

    def check_rows(
        self, limit, rows, instruction, audio_instruction=None, source=None
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
        >>> from speechbrain_blspkd.utils.testing import doctest_tokenizer
        >>> builder = PromptBuilder(doctest_tokenizer())
        >>> rows = [dict(ID="u1", transcript="a b", continuation="c",
        ...     truncated="0")]
        >>> n = builder.check_rows(64, rows, "Say:")[0]
        >>> builder.check_rows(  # doctest: +ELLIPSIS
        ...     n - 1, rows, "Say:", source="m.csv")
        Traceback (most recent call last):
        ...
        speechbrain_blspkd.prompt.ContextLengthError: m.csv: row 'u1': the text ...
        """
        if limit is None or not rows:
            return []
        ids = [r["ID"] for r in rows]
        continuations = [r.get("continuation") or "" for r in rows]
        add_eot = [str(r.get("truncated") or "0") != "1" for r in rows]
        parts = self._length_parts(
            instruction,
            transcripts=[r["transcript"] for r in rows],
            continuations=continuations,
            add_eot=add_eot,
        )
        self._raise_if_too_long(parts, limit, 0, ids, source, "transcript")
        lengths = [sum(p) for p in parts]
        if audio_instruction is not None and audio_instruction != instruction:
            audio = self._template(audio_instruction)
            prompt = len(audio.prefix) + len(audio.middle)
            speech = [(prompt, n, r) for _, n, r in parts]
            self._raise_if_too_long(speech, limit, 0, ids, source, "speech")
            lengths = [max(a, sum(b)) for a, b in zip(lengths, speech)]
        return lengths

    @staticmethod
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
        >>> from speechbrain_blspkd.utils.testing import doctest_tokenizer
        >>> builder = PromptBuilder(doctest_tokenizer())
        >>> b = builder.collate(builder.build_batch("Say:", n_speech=[1, 3]))
        >>> b["speech_mask"].sum(1).tolist()
        [1, 3]
        """
        return collate_prompts(
            prompts, self.placeholder_id, padding_side, device=device
        )


def collate_prompts(prompts, pad_id, padding_side="right", device=None):
    """Pads prompts into a batch of tensors.

    Arguments
    ---------
    prompts : list of Prompt
        Prompts from :class:`PromptBuilder`.
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
