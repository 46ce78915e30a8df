"""What identifies a stored teacher: checksums of its LLM and tokenizer.

A stored top-k teacher (:mod:`speechbrain_blspkd.dataprep.teacher_cache`)
is only valid for the teacher that wrote it.  :func:`teacher_settings`
gathers what makes a teacher (a checksum of the LLM's base weights, PLoRA
left out, a checksum of the tokenizer and chat template, the prompts, ``k``
and the vocabulary size) into the label ``meta.json`` of the cache folder.
"""

import hashlib
import json

from speechbrain_blspkd.dataprep.teacher_cache import (
    CACHE_VERSION,
    DEFAULT_K,
    bytes_per_position,
)
from speechbrain_blspkd.utils.cache_label import hash_tensors

__all__ = ["llm_checksum", "teacher_settings", "tokenizer_checksum"]


def _base_weights(llm):
    """``(name, tensor)`` of the LLM's base weights, PLoRA left out.

    A PLoRA-wrapped layer ``x`` holds its base weight as ``x.base.weight``
    and its adapter as ``x.lora_A`` / ``x.lora_B``; names are given as in
    the unwrapped LLM, so an LLM with and without PLoRA hash alike.
    """
    from speechbrain_blspkd.nnet import plora as plora_lib

    wrapped = {name for name, _ in plora_lib._wrapped(llm)}
    for key, tensor in sorted(llm.state_dict().items()):
        module, _, leaf = key.rpartition(".")
        if module in wrapped and leaf.startswith("lora_"):
            continue
        if module.endswith(".base") and module[: -len(".base")] in wrapped:
            key = f"{module[: -len('.base')]}.{leaf}"
        yield key, tensor


def llm_checksum(llm):
    """SHA-256 of an LLM's base weights (names, dtypes, shapes, bytes).

    PLoRA matrices are left out and PLoRA-wrapped layers named as unwrapped
    ones, so the model being trained (PLoRA on) and the plain LLM loaded
    from the same folder give the same checksum. A different dtype is a
    different teacher (other numbers).

    Arguments
    ---------
    llm : torch.nn.Module
        The causal LM (not sharded).

    Returns
    -------
    str
        The SHA-256 in hexadecimal (64 characters).

    Example
    -------
    >>> import torch
    >>> from speechbrain_blspkd.testing import tiny_speech_llm
    >>> torch.manual_seed(0)
    <torch._C.Generator object at ...>
    >>> model = tiny_speech_llm(whisper=False)
    >>> a = llm_checksum(model.llm)
    >>> with torch.no_grad():
    ...     _ = model.llm.model.layers[0].self_attn.q_proj.lora_A.add_(1)
    >>> a == llm_checksum(model.llm)  # PLoRA is not the teacher
    True
    >>> with torch.no_grad():
    ...     _ = model.llm.model.norm.weight.add_(1)
    >>> a == llm_checksum(model.llm)
    False
    """
    h = hashlib.sha256()
    hash_tensors(h, _base_weights(llm), end="\n")
    return h.hexdigest()


def tokenizer_checksum(tokenizer):
    """SHA-256 of the vocabulary, special tokens and chat template."""
    h = hashlib.sha256()
    vocab = sorted(tokenizer.get_vocab().items())
    h.update(json.dumps(vocab, ensure_ascii=False).encode())
    special = getattr(tokenizer, "special_tokens_map", {})
    h.update(json.dumps(special, sort_keys=True, default=str).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    return h.hexdigest()


def teacher_settings(model, k=DEFAULT_K, logprob_dtype=None):
    """What identifies the stored teacher of ``model`` (``meta.json``).

    Arguments
    ---------
    model : speechbrain_blspkd.models.speech_llm.SpeechLLMModel
        The speech LLM (its LLM with PLoRA off is the teacher) or a text-only
        one (``adapter=None``).
    k : int
        Entries per position.
    logprob_dtype : str, optional
        Storage dtype of the log-probs; None leaves it out (a reader
        accepts either).

    Returns
    -------
    dict
        JSON-ready settings.

    Example
    -------
    >>> from speechbrain_blspkd.testing import tiny_speech_llm
    >>> s = teacher_settings(tiny_speech_llm(whisper=False, instruction="Say:"), 8)
    >>> s["k"], s["vocab_size"], s["instruction"]
    (8, 300, 'Say:')
    """
    vocab = int(model.llm.get_output_embeddings().weight.shape[0])
    k = int(k)
    if not 1 <= k <= vocab:
        raise ValueError(
            f"teacher top-k: k must be in 1..{vocab} (the vocabulary), got {k}"
        )
    settings = dict(
        version=CACHE_VERSION,
        k=k,
        vocab_size=vocab,
        llm=llm_checksum(model.llm),
        tokenizer=tokenizer_checksum(model.tokenizer),
        instruction=model.instruction,
        system_prompt=model.prompts.system_prompt,
        transcript_separator=model.prompts.transcript_separator,
    )
    if logprob_dtype is not None:
        bytes_per_position(k, logprob_dtype)  # validates the name
        settings["logprob_dtype"] = logprob_dtype
    return settings
