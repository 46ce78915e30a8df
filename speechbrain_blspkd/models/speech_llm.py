"""The generic speech LLM: encoder -> adapter -> causal LLM (with PLoRA).

:class:`SpeechLLMModel` assembles injected parts behind small interfaces: a
speech encoder (``encoder(wavs, wav_lens) -> (feats, feat_lens)``), an
adapter (:class:`~speechbrain_blspkd.nnet.adapter.SpeechAdapter`) and a
Hugging Face causal LM, optionally with Partial LoRA.  It builds every
prompt with the one :class:`~speechbrain_blspkd.prompt.PromptBuilder` and
splices the adapter's embeddings where the transcript would be.

This module holds the model itself: loading and PLoRA wiring, the text
and speech sides, and ``forward``, which computes in one call what an
objective asks for in a :class:`~speechbrain_blspkd.models.passes.
PassRequest`.  The rest lives beside it, as functions taking the model,
bound as its methods:

* :mod:`speechbrain_blspkd.models.passes`: the teacher and student passes
  (``teacher_pass``, ``student_pass``) and what they return;
* :mod:`speechbrain_blspkd.models.llm_forward`: the LLM forward of a pass
  (shared-prefix reuse, early stop);
* :mod:`speechbrain_blspkd.models.generation`: ``generate`` (speech) and
  ``generate_text`` (the transcript), batched with the KV cache, with
  snapping at generation (``snapped``) and the context check
  (``check_fits``).

It computes no loss: the objectives (:mod:`speechbrain_blspkd.objectives`)
do.

Position conventions (``docs/algorithms.md`` section 2.4;
:mod:`speechbrain_blspkd.models.positions`)::

    input positions      span_start + i,          i < span_length
    response positions   response_start - 1 + j,  j < R   (predicting
    response targets     input_ids[response_start + j])

Hidden-state layers follow Hugging Face's ``output_hidden_states``: 0 is
the embedding output, ``k`` the output of decoder layer ``k``, and the
last (``num_hidden_layers``, or -1) the final hidden state after the final
norm (what the LM head reads).

Authors
 * speechbrain-blspkd contributors 2025
"""

import contextlib
import dataclasses
import pathlib

import torch
import torch.nn.functional as F
from torch import nn

from speechbrain_blspkd.models import generation, passes
from speechbrain_blspkd.models.passes import PassRequest, SpeechLLMOutput
from speechbrain_blspkd.nnet import plora as plora_lib
from speechbrain_blspkd.prompt import PromptBuilder
from speechbrain_blspkd.utils.precision import resolve_dtype

__all__ = ["SpeechLLMModel"]


class SpeechLLMModel(nn.Module):
    """Encoder -> adapter -> causal LLM with Partial LoRA (generic).

    Arguments
    ---------
    llm : transformers.PreTrainedModel or str or pathlib.Path
        A causal LM or a local transformers folder (loaded with
        ``AutoModelForCausalLM``).
    adapter : speechbrain_blspkd.nnet.adapter.SpeechAdapter or None
        Maps encoder frames to LLM embeddings; its ``output_size()`` must be
        the LLM hidden size. None only for models that do not feed speech
        embeddings to the LLM (the cascade).
    encoder : torch.nn.Module, optional
        ``encoder(wavs, wav_lens) -> (feats, feat_lens)``, e.g.
        :class:`~speechbrain_blspkd.nnet.whisper_encoder.WhisperEncoder`.
        May be None when cached encoder features are always given.
    tokenizer : transformers tokenizer, optional
        Loaded from ``llm`` when it is a folder.
    system_prompt : str, optional
        See :class:`~speechbrain_blspkd.prompt.PromptBuilder`.
    instruction : str
        Default text instruction (teacher; e.g. the continuation prompt).
    audio_instruction : str, optional
        Default instruction of speech prompts (None: same as the text one).
    transcript_separator : str
        See :class:`~speechbrain_blspkd.prompt.PromptBuilder`.
    plora : dict, optional
        Keyword arguments of :func:`~speechbrain_blspkd.nnet.plora.
        apply_plora` (``r``, ``alpha``, ``dropout``, ``scope``,
        ``target_modules``); None: no adapter in the LLM (the LLM is frozen
        and the student differs from the teacher only by its input). An LLM
        that already has PLoRA layers is used as is.
    llm_dtype : torch.dtype or str, optional
        Cast the LLM weights: a dtype or name, or ``"auto"`` (bfloat16 where
        the run's device computes it fast, else float32;
        :mod:`speechbrain_blspkd.utils.precision`). PLoRA weights stay
        float32.
    gradient_checkpointing : bool
        Enable HF gradient checkpointing in the LLM.
    snap_speech : bool
        At generation only (never in training or in the objectives' passes):
        every speech embedding is replaced by the LLM's own embedding of its
        nearest token (cosine). The quality ladder of
        :mod:`speechbrain_blspkd.hearing` measured it after the KD stage
        (the token-side CIF of the SynthSpeech recipe, 2026-12-06): repeat
        chrF with the text teacher 31.8 / 28.6 (unseen voices / unseen
        engine) against 22.5 / 19.7 for the adapter's raw vectors, i.e. the
        LLM reads its own token embeddings far better than the adapter's
        soft ones, even with half of them wrong.
    prefix_reuse : bool
        Reuse the keys and values of the prompt prefix the whole batch
        shares (system prompt and instruction): computed once with batch 1,
        kept while the base LLM is frozen and the prefix gets no PLoRA
        delta, expanded over the batch; the LLM runs (forward and backward)
        on the rest of the sequence only. Off with gradient checkpointing
        (which re-runs the forward) and for PLoRA scopes that reach the
        prefix.

    Example
    -------
    >>> from speechbrain_blspkd.testing import tiny_speech_llm
    >>> model = tiny_speech_llm()
    >>> request = PassRequest(teacher=True, student=True,
    ...     logits=("input", "response"))
    >>> out = model(transcripts=["the cat", "a dog ran"],
    ...     continuations=["sat.", "away"], instructions="Repeat:",
    ...     wavs=torch.randn(2, 8000) * 0.1, wav_lens=torch.tensor([1.0, 0.7]),
    ...     request=request)
    >>> s, t = out.student.logits["input"], out.teacher.logits["input"]
    >>> s.shape == t.shape
    True
    >>> out.teacher.masks["input"].sum(1).tolist() == out.targets.num_tokens.tolist()
    True
    """

    def __init__(
        self,
        llm,
        adapter,
        encoder=None,
        tokenizer=None,
        system_prompt=None,
        instruction="",
        audio_instruction=None,
        transcript_separator=" ",
        plora=None,
        llm_dtype=None,
        gradient_checkpointing=False,
        prefix_reuse=False,
        snap_speech=False,
    ):
        super().__init__()
        self.snap_speech = bool(snap_speech)
        llm_dtype = resolve_dtype(llm_dtype)
        if isinstance(llm, (str, pathlib.Path)):
            from transformers import AutoModelForCausalLM, AutoTokenizer

            folder = pathlib.Path(llm)
            if not (folder / "config.json").is_file():
                raise FileNotFoundError(
                    f"SpeechLLMModel: {folder} is not a transformers model "
                    "folder (no config.json)"
                )
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(str(folder))
            llm = AutoModelForCausalLM.from_pretrained(
                str(folder), dtype=llm_dtype or torch.float32
            )
        if tokenizer is None:
            raise ValueError(
                "SpeechLLMModel: `tokenizer` is required when `llm` is a module"
            )
        if llm_dtype is not None:
            llm.to(llm_dtype)
        self.llm = llm
        self.adapter = adapter
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.prompts = PromptBuilder(
            tokenizer,
            system_prompt=system_prompt,
            transcript_separator=transcript_separator,
        )
        self.instruction = instruction
        self.audio_instruction = audio_instruction
        hidden = llm.config.get_text_config().hidden_size
        out_size = hidden if adapter is None else adapter.output_size()
        if out_size != hidden:
            raise ValueError(
                f"SpeechLLMModel: adapter output_size {out_size} != LLM "
                f"hidden size {hidden}"
            )
        has_plora = bool(plora_lib._wrapped(llm))
        if plora is not None and not has_plora:
            plora_lib.apply_plora(llm, **dict(plora))
            has_plora = True
        elif not has_plora:
            llm.requires_grad_(False)
        self.has_plora = has_plora
        if gradient_checkpointing:
            llm.gradient_checkpointing_enable()
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self.prefix_reuse = bool(prefix_reuse)
        self._prefix_cache = {}
        self._table = None

    # ------------------------------------------------------------------
    # helpers
    @property
    def embed_tokens(self):
        """The LLM input embedding module."""
        return self.llm.get_input_embeddings()

    @property
    def device(self):
        """Where the LLM embeddings live."""
        return self.embed_tokens.weight.device

    def lm_head(self, hidden):
        """Float32 logits of final hidden states (Gemma soft-capping kept).

        Arguments
        ---------
        hidden : torch.Tensor
            (..., D) final hidden states.

        Returns
        -------
        torch.Tensor
            (..., V) float32.
        """
        head = self.llm.get_output_embeddings()
        logits = head(hidden.to(head.weight.dtype))
        cap = getattr(
            self.llm.config.get_text_config(), "final_logit_softcapping", None
        )
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()

    def plora_off(self):
        """Context in which the LLM is the base model (the teacher)."""
        if self.has_plora:
            return plora_lib.disable_plora(self.llm)
        return contextlib.nullcontext()

    def _student_mask(self, speech_mask, attention_mask):
        if not self.has_plora:
            return None
        scope = plora_lib._state(self.llm).scope
        return plora_lib.scope_mask(speech_mask, scope, attention_mask)

    def _instructions(self, instructions, n, audio=False):
        if instructions is None:
            default = self.instruction
            if audio and self.audio_instruction is not None:
                default = self.audio_instruction
            instructions = default
        if isinstance(instructions, str):
            instructions = [instructions] * n
        if len(instructions) != n:
            raise ValueError(
                f"SpeechLLMModel: {len(instructions)} instructions for a "
                f"batch of {n}"
            )
        return list(instructions)

    # ------------------------------------------------------------------
    # text side
    def transcript_ids(self, transcripts):
        """The LLM token ids of each transcript (N = their number).

        Arguments
        ---------
        transcripts : list of str
            Transcripts.

        Returns
        -------
        list of list of int

        Example
        -------
        >>> from speechbrain_blspkd.testing import tiny_speech_llm
        >>> model = tiny_speech_llm(whisper=False)
        >>> [len(x) > 0 for x in model.transcript_ids(["a", "b c"])]
        [True, True]
        """
        return [self.prompts.transcript_ids(t) for t in transcripts]

    def trainable_parameters(self):
        """Parameters with ``requires_grad`` (adapter, PLoRA, encoder if
        unfrozen).

        Example
        -------
        >>> from speechbrain_blspkd.testing import tiny_speech_llm
        >>> model = tiny_speech_llm(whisper=False)
        >>> all(p.requires_grad for p in model.trainable_parameters())
        True
        """
        return [p for p in self.parameters() if p.requires_grad]

    def embedding_table(self, device=None):
        """Unit-norm float32 embedding table and the embedding variance.

        Cached while the embedding weights stay the same tensor (for
        nearest-token read-outs and alignment objectives).

        Returns
        -------
        table : torch.Tensor
            (V, D) rows of unit norm.
        variance : torch.Tensor
            Scalar variance of the (scaled) embeddings.
        """
        weight = self.embed_tokens.weight
        device = device or weight.device
        key = (weight.data_ptr(), str(device), tuple(weight.shape))
        if self._table is None or self._table[0] != key:
            with torch.no_grad():
                table = weight.detach().to(device=device, dtype=torch.float32)
                scale = getattr(self.embed_tokens, "embed_scale", 1.0)
                scale = scale.item() if torch.is_tensor(scale) else float(scale)
                var = (table * scale).var()
                self._table = (key, F.normalize(table, dim=-1), var)
        return self._table[1], self._table[2]

    # ------------------------------------------------------------------
    # speech side
    def encode_speech(
        self,
        wavs=None,
        wav_lens=None,
        targets=None,
        feats=None,
        feat_lens=None,
    ):
        """Encoder (unless ``feats`` are given) and adapter.

        Arguments
        ---------
        wavs : torch.Tensor, optional
            (B, S) waveforms.
        wav_lens : torch.Tensor, optional
            (B,) relative lengths.
        targets : AdapterTargets, optional
            Training information for the adapter (None at inference).
        feats : torch.Tensor, optional
            (B, T, d) cached encoder features instead of ``wavs``.
        feat_lens : torch.Tensor, optional
            (B,) relative lengths of ``feats``.

        Returns
        -------
        speechbrain_blspkd.nnet.adapter.AdapterOutput

        Example
        -------
        >>> from speechbrain_blspkd.testing import tiny_speech_llm
        >>> from speechbrain_blspkd.nnet.adapter import AdapterTargets
        >>> model = tiny_speech_llm()
        >>> out = model.encode_speech(torch.randn(1, 4000),
        ...     targets=AdapterTargets(num_tokens=torch.tensor([3])))
        >>> out.tokens.shape
        torch.Size([1, 3, 64])
        """
        if self.adapter is None:
            raise ValueError(
                f"{type(self).__name__}: no adapter (it does not embed speech)"
            )
        feats, feat_lens = self.speech_features(
            wavs, wav_lens, feats, feat_lens
        )
        return self.adapter(feats, lengths=feat_lens, targets=targets)

    def speech_features(
        self, wavs=None, wav_lens=None, feats=None, feat_lens=None
    ):
        """The frames the adapter reads: ``feats`` when given, else the
        encoder's output on ``wavs``.

        Arguments
        ---------
        wavs, wav_lens : torch.Tensor, optional
            (B, S) waveforms and (B,) relative lengths.
        feats, feat_lens : torch.Tensor, optional
            Cached encoder features and their relative lengths.

        Returns
        -------
        feats : torch.Tensor
            (B, T, d) frames.
        feat_lens : torch.Tensor or None
            (B,) relative lengths.

        Example
        -------
        >>> from speechbrain_blspkd.testing import tiny_speech_llm
        >>> feats, lens = tiny_speech_llm().speech_features(torch.randn(1, 4000))
        >>> feats.shape
        torch.Size([1, 13, 64])
        """
        if feats is not None:
            return feats, feat_lens
        if wavs is None:
            raise ValueError("encode_speech: give `wavs` or `feats`")
        if self.encoder is None:
            raise ValueError(
                "encode_speech: the model has no encoder; pass cached `feats`"
            )
        return self.encoder(wavs, wav_lens)

    def _speech_embeds(self, batch, adapter_out):
        """Prompt embeddings with the speech slots filled by the adapter."""
        embeds = self.embed_tokens(batch["input_ids"])
        speech_mask = batch["speech_mask"]
        per_row = speech_mask.sum(1)
        counts = adapter_out.token_counts.to(per_row.device)
        if not torch.equal(per_row, counts):
            raise ValueError(
                f"SpeechLLMModel: speech slots {per_row.tolist()} != adapter "
                f"tokens {counts.tolist()}"
            )
        tokens = adapter_out.tokens[adapter_out.token_mask]
        return embeds.masked_scatter(
            speech_mask[..., None], tokens.to(embeds.dtype)
        )

    # ------------------------------------------------------------------
    # training: the passes are functions of models/passes.py
    teacher_pass = passes.teacher_pass
    student_pass = passes.student_pass

    def forward(
        self,
        transcripts,
        continuations=None,
        instructions=None,
        audio_instructions=None,
        add_eot=True,
        wavs=None,
        wav_lens=None,
        feats=None,
        feat_lens=None,
        languages=None,
        request=None,
        token_spans=None,
    ):
        """Adapter and the requested LLM passes, in one call.

        One entry point, so that data-parallel wrappers (DDP) see every
        trainable computation in their ``forward``.

        Arguments
        ---------
        transcripts : list of str
            Transcripts (their LLM token counts go to the adapter as
            :class:`~speechbrain_blspkd.nnet.adapter.AdapterTargets`).
        continuations : list of str, optional
            Teacher continuations (the response).
        instructions : str or list of str, optional
            Text instructions (teacher).
        audio_instructions : str or list of str, optional
            Speech prompt instructions (default ``audio_instruction``, else
            the text ones).
        add_eot : bool or list of bool
            End-of-turn after each continuation (False when truncated).
        wavs, wav_lens : torch.Tensor, optional
            (B, S) waveforms and (B,) relative lengths.
        feats, feat_lens : torch.Tensor, optional
            Cached encoder features instead of ``wavs``.
        languages : torch.Tensor, optional
            (B,) language indices (for adapters that use them).
        request : PassRequest, optional
            What to compute (default: the adapter only).
        token_spans : torch.Tensor, optional
            (B, N, 2) seconds: where each transcript token is spoken
            (:mod:`speechbrain_blspkd.dataprep.token_timings`), for
            adapters that use them; rows padded with -1.

        Returns
        -------
        SpeechLLMOutput
        """
        request = request or PassRequest()
        transcript_ids, transcript_mask, targets = passes.adapter_targets(
            self, transcripts, languages, token_spans
        )
        if self.adapter is not None:  # else encode_speech says why not
            feats, feat_lens = self.speech_features(
                wavs, wav_lens, feats, feat_lens
            )
        told = targets
        if request.predicted_count:  # the adapter counts for itself
            told = dataclasses.replace(targets, num_tokens=None)
        adapter_out = self.encode_speech(
            targets=told, feats=feats, feat_lens=feat_lens
        )
        out = SpeechLLMOutput(
            adapter=adapter_out,
            targets=targets,
            transcript_ids=transcript_ids,
            transcript_mask=transcript_mask,
            feats=feats,
            feat_lens=feat_lens,
        )
        if request.teacher:
            out.teacher = self.teacher_pass(
                transcripts, continuations, instructions, add_eot, request
            )
        if request.student:
            audio = audio_instructions
            if audio is None and self.audio_instruction is None:
                audio = instructions
            out.student = self.student_pass(
                adapter_out, continuations, audio, add_eot, request
            )
            if out.teacher is not None and request.response:
                if not torch.equal(
                    out.teacher.response_targets, out.student.response_targets
                ):
                    raise RuntimeError(
                        "SpeechLLMModel: student and teacher responses differ"
                    )
        return out

    # ------------------------------------------------------------------
    # inference: functions of models/generation.py
    generate = generation.generate
    generate_text = generation.generate_text
    snapped = generation.snapped
    check_fits = generation.check_fits
    _hear = generation.hear_speech  # what stands in the speech span
