"""Generation: answering speech (or text) with the LLM and its KV cache.

One loop serves every model: :func:`answer` takes the prompts, fills the
speech slots with the adapter's embeddings (or reads the text as is, PLoRA
off), runs the LLM's ``generate`` (:func:`hf_generate`) on the left-padded
batch and cuts each answer at the end of turn (:func:`decode`).

* :func:`generate` answers speech: the model's ``_hear`` hook says what
  stands in each prompt's speech span (:class:`Heard`): the adapter's
  embeddings for the speech LLM (:func:`hear_speech`, snapped to the
  nearest token embeddings when ``snap_speech`` is set: :func:`snapped`),
  the recogniser's transcripts for the cascade
  (:class:`~speechbrain_blspkd.models.cascade.CascadeModel`). Every prompt
  plus the generation budget is checked against the LLM context first
  (:func:`check_fits`).
* :func:`generate_text` answers transcripts with the teacher (PLoRA off).

These are the methods ``generate``, ``generate_text``, ``snapped`` and
``check_fits`` of :class:`~speechbrain_blspkd.models.speech_llm.
SpeechLLMModel`; the functions take the model as their first argument.

Authors
 * speechbrain-blspkd contributors 2025
"""

import contextlib
import dataclasses

import torch

from speechbrain_blspkd.models.llm_forward import eval_mode
from speechbrain_blspkd.nnet import plora as plora_lib
from speechbrain_blspkd.prompt import context_limit

__all__ = [
    "Heard",
    "answer",
    "check_fits",
    "decode",
    "generate",
    "generate_text",
    "hear_speech",
    "hf_generate",
    "snapped",
]


@dataclasses.dataclass
class Heard:
    """What stands in the speech span of each generation prompt.

    Arguments
    ---------
    adapter : speechbrain_blspkd.nnet.adapter.AdapterOutput, optional
        The speech embeddings (a speech LLM).
    texts : list of str, optional
        The text the LLM reads instead (a cascade: the transcripts).
    transcripts : list of str, optional
        What a recogniser heard (returned by ``return_transcripts``).

    Example
    -------
    >>> heard = Heard(texts=["a cat", " "], transcripts=["a cat", ""])
    >>> len(heard), heard.span()
    (2, {'transcripts': ['a cat', ' ']})
    """

    adapter: object = None
    texts: list = None
    transcripts: list = None

    def __len__(self):
        if self.adapter is not None:
            return self.adapter.token_counts.shape[0]
        return len(self.texts)

    def span(self):
        """The :meth:`~speechbrain_blspkd.prompt.PromptBuilder.build_batch`
        argument of the span: ``n_speech`` or ``transcripts``."""
        if self.adapter is not None:
            return {"n_speech": self.adapter.token_counts.tolist()}
        return {"transcripts": self.texts}

    def counts(self, model):
        """(B,) the number of LLM positions of each span."""
        if self.adapter is not None:
            return self.adapter.token_counts
        counts = [len(x) for x in model.transcript_ids(self.texts)]
        return torch.tensor(counts, dtype=torch.long)


@torch.no_grad()
def generate(
    model,
    wavs=None,
    wav_lens=None,
    instructions=None,
    max_new_tokens=64,
    num_beams=1,
    feats=None,
    feat_lens=None,
    return_num_tokens=False,
    return_ids=False,
    names=None,
    source=None,
    item="row",
    return_transcripts=False,
    **generate_kwargs,
):
    """Answers the speech: batched decoding with the KV cache.

    The model hears the speech (its ``_hear``: :func:`hear_speech`, or the
    cascade's recogniser), then every speech prompt plus ``max_new_tokens``
    is checked against the LLM context (``ContextLengthError`` names the
    item) and answered (:func:`answer`).

    Arguments
    ---------
    wavs, wav_lens : torch.Tensor, optional
        (B, S) waveforms and relative lengths.
    instructions : str or list of str, optional
        Speech prompt instructions (default ``audio_instruction``, else
        ``instruction``).
    max_new_tokens : int
        Generation limit.
    num_beams : int
        1 = greedy.
    feats, feat_lens : torch.Tensor, optional
        Cached encoder features (the cascade refuses them: its recogniser
        reads audio).
    return_num_tokens : bool
        Also return the number of speech embeddings of each row (B,); for
        the cascade, the LLM token count of each transcript.
    return_ids : bool
        Return the generated token ids (cut at the end of turn) instead
        of text.
    names, source, item : optional
        How the rows are named in a context-length error (e.g. row IDs
        and the manifest, or file names and ``item="file"``).
    return_transcripts : bool
        Also return the transcripts the LLM answered (the cascade; a
        speech LLM has none and raises ``ValueError``).
    **generate_kwargs
        Passed to ``transformers`` ``generate``.

    Returns
    -------
    list of str (then the counts, then the transcripts, when asked)

    Example
    -------
    >>> from speechbrain_blspkd.testing import tiny_speech_llm
    >>> model = tiny_speech_llm()
    >>> texts = model.generate(torch.randn(2, 4000), max_new_tokens=3)
    >>> len(texts)
    2
    """
    heard = model._hear(wavs, wav_lens, feats=feats, feat_lens=feat_lens)
    instructions = model._instructions(instructions, len(heard), audio=True)
    span = heard.span()
    model.check_fits(
        instructions,
        max_new_tokens,
        names=names,
        source=source,
        item=item,
        **span,
    )
    prompts = model.prompts.build_batch(instructions, **span)
    options = dict(generate_kwargs, max_new_tokens=max_new_tokens)
    options["num_beams"] = num_beams
    texts = answer(model, prompts, options, return_ids, heard.adapter)
    out = [texts]
    if return_num_tokens:
        out.append(heard.counts(model))
    if return_transcripts:
        if heard.transcripts is None:
            raise ValueError(
                f"{type(model).__name__}.generate: no transcripts (the "
                "model reads speech embeddings, not a recogniser's text)"
            )
        out.append(heard.transcripts)
    return out[0] if len(out) == 1 else tuple(out)


@torch.no_grad()
def generate_text(
    model,
    transcripts,
    instructions=None,
    max_new_tokens=64,
    num_beams=1,
    return_ids=False,
    **generate_kwargs,
):
    """The teacher's answer to the transcript (PLoRA off), same builder.

    Arguments
    ---------
    transcripts : list of str
        Transcripts.
    instructions : str or list of str, optional
        Text instructions (default ``instruction``).
    max_new_tokens : int
        Generation limit.
    num_beams : int
        1 = greedy.
    return_ids : bool
        Return token ids instead of text.
    **generate_kwargs
        Passed to ``transformers`` ``generate``.

    Returns
    -------
    list of str

    Example
    -------
    >>> from speechbrain_blspkd.testing import tiny_speech_llm
    >>> model = tiny_speech_llm(whisper=False)
    >>> len(model.generate_text(["a b", "c"], max_new_tokens=2))
    2
    """
    prompts = model.prompts.build_batch(
        model._instructions(instructions, len(transcripts)),
        transcripts=transcripts,
    )
    options = dict(generate_kwargs, max_new_tokens=max_new_tokens)
    options["num_beams"] = num_beams
    return answer(model, prompts, options, return_ids)


def answer(model, prompts, options, return_ids=False, adapter_out=None):
    """The one generation loop: ``prompts`` answered with the KV cache.

    ``options`` are the ``generate`` keywords (``max_new_tokens``,
    ``num_beams`` ...); ``return_ids`` returns token ids, not text.
    With ``adapter_out`` the speech slots of the prompts get its
    embeddings and PLoRA acts on them (the student); without, the prompts
    are text and PLoRA is off (the teacher). The model runs in eval mode.

    Returns
    -------
    list of str, or list of list of int with ``return_ids``
    """
    batch = model.prompts.collate(
        prompts, padding_side="left", device=model.device
    )
    with eval_mode(model):
        if adapter_out is None:
            embeds = model.embed_tokens(batch["input_ids"])
            context = model.plora_off()
        else:
            embeds = model._speech_embeds(batch, adapter_out)
            context = contextlib.nullcontext()
            if model.has_plora:
                mask = model._student_mask(
                    batch["speech_mask"], batch["attention_mask"]
                )
                context = plora_lib.plora_mask(model.llm, mask)
        with context:
            seqs = hf_generate(model, embeds, batch, options)
    return decode(model, seqs, return_ids)


def hear_speech(model, wavs=None, wav_lens=None, feats=None, feat_lens=None):
    """The speech LLM's :class:`Heard`: the adapter's embeddings (encoder
    and adapter in eval mode), snapped when ``model.snap_speech``."""
    with eval_mode(model):
        adapter_out = model.encode_speech(
            wavs, wav_lens, feats=feats, feat_lens=feat_lens
        )
        if model.snap_speech:
            adapter_out = model.snapped(adapter_out)
    return Heard(adapter=adapter_out)


@torch.no_grad()
def snapped(model, output):
    """``output`` with every speech embedding replaced by the LLM's
    embedding of its nearest token (cosine; rows beyond the mask stay
    zero): what generation feeds the LLM when ``snap_speech`` is set.

    Example
    -------
    >>> from speechbrain_blspkd.testing import tiny_speech_llm
    >>> model = tiny_speech_llm()
    >>> ids = torch.tensor([[5, 9, 2]])
    >>> from speechbrain_blspkd.nnet.adapter import AdapterOutput
    >>> out = AdapterOutput(model.embed_tokens(ids) * 3 + 0.01,
    ...     torch.ones(1, 3, dtype=torch.bool))
    >>> torch.equal(model.snapped(out).tokens, model.embed_tokens(ids))
    True
    """
    tokens = output.tokens
    table, _ = model.embedding_table(tokens.device)
    nearest = (
        torch.nn.functional.normalize(tokens.float(), dim=-1) @ table.T
    ).argmax(-1)
    snapped = model.embed_tokens(nearest).to(tokens.dtype)
    snapped = snapped * output.token_mask[..., None].to(snapped.dtype)
    return dataclasses.replace(output, tokens=snapped)


def check_fits(
    model,
    instructions,
    max_new_tokens,
    n_speech=None,
    transcripts=None,
    names=None,
    source=None,
    item="row",
):
    """Raise ``ContextLengthError`` when a prompt plus
    ``max_new_tokens`` exceeds the LLM context (the item named).

    The prompts are speech prompts of ``n_speech`` embeddings, or text
    prompts of ``transcripts``
    (:meth:`~speechbrain_blspkd.prompt.PromptBuilder.check_fits`).
    """
    limit = context_limit(model.llm)
    if limit is None:
        return
    model.prompts.check_fits(
        limit,
        instructions,
        n_speech=None if n_speech is None else list(n_speech),
        transcripts=transcripts,
        max_new_tokens=max_new_tokens,
        ids=names,
        source=source,
        item=item,
    )


def hf_generate(model, embeds, batch, options):
    """The LLM's own ``generate`` (KV cache) on left-padded prompt
    embeddings: greedy or beam search unless ``options`` sample, stopping
    at the end of turn. ``options`` are ``generate`` keywords
    (``max_new_tokens``, ``num_beams`` ...)."""
    pad = model.tokenizer.pad_token_id
    if pad is None:
        pad = model.prompts.placeholder_id
    gen = dict(
        do_sample=False, eos_token_id=model.prompts.eot_ids, pad_token_id=pad
    )
    gen.update(options)
    if not gen.get("do_sample"):
        gen.setdefault("temperature", None)
        gen.setdefault("top_p", None)
        gen.setdefault("top_k", None)
    return model.llm.generate(
        inputs_embeds=embeds,
        attention_mask=batch["attention_mask"],
        **gen,
    )


def decode(model, sequences, return_ids=False):
    """Generated ``sequences`` cut at the first end of turn or pad: token
    ids (``return_ids``) or text."""
    stops = set(model.prompts.eot_ids)
    pad = model.tokenizer.pad_token_id
    rows = []
    for row in sequences.tolist():
        cut = []
        for t in row:
            if t in stops or t == pad:
                break
            cut.append(t)
        rows.append(cut)
    if return_ids:
        return rows
    return [
        model.tokenizer.decode(r, skip_special_tokens=True).strip()
        for r in rows
    ]
