"""Prompts: the one prompt builder and what it needs.

:mod:`~speechbrain_blspkd.prompt.builder` holds :class:`PromptBuilder`;
:mod:`~speechbrain_blspkd.prompt.chat_template` the chat template as token
pieces (and the tokenisation conventions); :mod:`~speechbrain_blspkd.
prompt.batch` :class:`Prompt` and :func:`collate_prompts`;
:mod:`~speechbrain_blspkd.prompt.context` the sequence lengths and the
LLM context check.  Their names are importable from here.
"""

from speechbrain_blspkd.prompt.batch import (
    IGNORE_INDEX,
    Prompt,
    collate_prompts,
)
from speechbrain_blspkd.prompt.builder import PromptBuilder
from speechbrain_blspkd.prompt.chat_template import (
    CONTINUATION_SENTINEL,
    TRANSCRIPT_SENTINEL,
)
from speechbrain_blspkd.prompt.context import ContextLengthError, context_limit

__all__ = [
    "CONTINUATION_SENTINEL",
    "IGNORE_INDEX",
    "TRANSCRIPT_SENTINEL",
    "ContextLengthError",
    "Prompt",
    "PromptBuilder",
    "collate_prompts",
    "context_limit",
]
