"""The chat template, rendered into the token pieces of every prompt.

Every prompt the toolkit feeds the LLM goes through
:class:`~speechbrain_blspkd.prompt.builder.PromptBuilder`, so training
(teacher and student) and decoding see the same tokens. It uses the LLM's
own chat template:

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
target count, :meth:`~speechbrain_blspkd.prompt.builder.PromptBuilder.
transcript_ids`) and teacher and student sequences agree token for token
outside the span.

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

logger = logging.getLogger(__name__)

__all__ = [
    "CONTINUATION_SENTINEL",
    "TRANSCRIPT_SENTINEL",
    "TemplatePieces",
    "render",
    "template_pieces",
]

TRANSCRIPT_SENTINEL = "@@BLSPKD-TRANSCRIPT@@"
CONTINUATION_SENTINEL = "@@BLSPKD-CONTINUATION@@"


@dataclasses.dataclass
class TemplatePieces:
    """Token pieces of one rendered template (per instruction/system)."""

    prefix: list
    middle: list
    suffix: list


def render(tokenizer, system_prompt, user_content, with_system):
    """The chat template applied to a system (``with_system``) and a user
    message and an assistant turn holding the continuation sentinel."""
    messages = []
    if with_system:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": user_content})
    messages.append({"role": "assistant", "content": CONTINUATION_SENTINEL})
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=False
    )
    if not isinstance(text, str):  # some versions return a list
        text = text[0]
    return text


def template_pieces(builder, instruction):
    """Token pieces for ``instruction`` (cached in ``builder``): the
    template of :class:`~speechbrain_blspkd.prompt.builder.PromptBuilder`
    ``builder`` rendered with the sentinels, split and tokenised."""
    instruction = instruction or ""
    if instruction in builder._cache:
        return builder._cache[instruction]
    if "{transcript}" in instruction:
        before, after = instruction.split("{transcript}", 1)
    else:
        before, after = instruction, ""
    content = before.rstrip() + TRANSCRIPT_SENTINEL + after
    has_system = builder.system_prompt is not None
    text = None
    if has_system and builder._system_supported is not False:
        try:
            text = render(
                builder.tokenizer, builder.system_prompt, content, True
            )
            builder._system_supported = True
        except Exception as e:  # jinja raise_exception -> TemplateError
            logger.info(
                "chat template refuses a system role (%s); folding the "
                "system prompt into the user turn",
                e,
            )
            builder._system_supported = False
    if text is None:
        if has_system:
            content = builder.system_prompt + "\n\n" + content
        text = render(builder.tokenizer, builder.system_prompt, content, False)
    for sentinel in (TRANSCRIPT_SENTINEL, CONTINUATION_SENTINEL):
        if text.count(sentinel) != 1:
            raise ValueError(
                "PromptBuilder: the chat template does not copy message "
                f"contents verbatim (sentinel {sentinel!r} found "
                f"{text.count(sentinel)} times in {text!r})"
            )
    prefix, rest = text.split(TRANSCRIPT_SENTINEL)
    middle, suffix = rest.split(CONTINUATION_SENTINEL)
    pieces = TemplatePieces(
        prefix=builder._encode(prefix),
        middle=builder._encode(middle),
        # the end-of-turn marker without the template's line break;
        # a turn closed by whitespace alone (a base model's plain-text
        # turns, assets.gguf.COMPLETION_TEMPLATE) keeps it: it is the
        # marker
        suffix=builder._encode(suffix.rstrip() or suffix),
    )
    builder._cache[instruction] = pieces
    return pieces
