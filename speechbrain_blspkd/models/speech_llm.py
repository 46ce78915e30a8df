"""Speech LLM for BLSP-KD: Whisper encoder -> CFormer -> LLM with PLoRA.

:class:`SpeechLLMModel` holds the three parts, the LLM tokenizer and the one
:class:`~speechbrain_blspkd.prompt.PromptBuilder`, and computes everything
the BLSP-KD objectives need (DESIGN 2.3-2.5):

* :meth:`SpeechLLMModel.compute_kd_inputs` builds the teacher text input and
  the student speech input with the same builder, runs the teacher (PLoRA
  off, eval mode, no grad) and the student (PLoRA on the speech positions),
  and returns logits **only at the distilled positions**: the N transcript /
  speech positions (``input_kl``) and every position that predicts a
  response token, the first one being the last prompt position
  (``response_kl``, ``response_ce``). The LM head is applied only to the
  gathered hidden states.
* :meth:`SpeechLLMModel.alignment_loss` and
  :meth:`SpeechLLMModel.token_accuracy`: the alignment stage of DESIGN 2.9
  (no LLM pass).
* :meth:`SpeechLLMModel.generate` (speech) and
  :meth:`SpeechLLMModel.generate_text` (the teacher on the transcript):
  batched greedy / beam decoding with the KV cache and left padding; the
  PLoRA mask covers the speech positions of the prompt pass only.

Position conventions (``p`` = a prompt from the builder)::

    input positions      span_start + i,          i < N
    response positions   response_start - 1 + j,  j < R   (predicting
    response targets     input_ids[response_start + j])

Authors
 * speechbrain-blspkd contributors 2025
"""

import contextlib
import pathlib

import torch
import torch.nn.functional as F
from torch import nn

from speechbrain_blspkd.nnet import plora as plora_lib
from speechbrain_blspkd.prompt import PromptBuilder
from speechbrain_blspkd.utils.precision import resolve_dtype

__all__ = ["SpeechLLMModel"]


def _pad_lists(lists, pad, device):
    """(B, max len) long tensor and bool mask from a list of int lists."""
    width = max(1, max(len(x) for x in lists))
    out = torch.full((len(lists), width), pad, dtype=torch.long)
    mask = torch.zeros(len(lists), width, dtype=torch.bool)
    for i, x in enumerate(lists):
        out[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = True
    return out.to(device), mask.to(device)


def _positions(start, length):
    """(B, max(length)) positions start + i and their mask."""
    width = max(1, int(length.max()))
    steps = torch.arange(width, device=start.device)
    mask = steps[None] < length[:, None]
    return start[:, None] + steps[None], mask


@contextlib.contextmanager
def _eval_mode(module):
    was = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was)


class SpeechLLMModel(nn.Module):
    """Encoder -> CFormer adapter -> causal LLM with Partial LoRA.

    Arguments
    ---------
    llm : transformers.PreTrainedModel or str or pathlib.Path
        A causal LM or a local transformers folder (loaded with
        ``AutoModelForCausalLM``).
    adapter : speechbrain_blspkd.nnet.cformer.CFormer
        Maps encoder frames to LLM embeddings; its ``output_size`` must be
        the LLM hidden size.
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
        the run's device computes it fast, e.g. ~1.4x faster on AMX CPUs,
        else float32; :mod:`speechbrain_blspkd.utils.precision`). PLoRA
        weights stay float32.
    gradient_checkpointing : bool
        Enable HF gradient checkpointing in the LLM.
    prefix_reuse : bool
        Reuse the keys and values of the prompt prefix the whole batch
        shares (system prompt and instruction, about a third of a
        continuation prompt): computed once with batch 1, kept while the
        base LLM is frozen and the prefix gets no PLoRA delta, expanded over
        the batch, and the LLM runs (forward and backward) on the rest of
        the sequence only. Off with gradient checkpointing (which re-runs
        the forward) and for PLoRA scopes that reach the prefix.

    Example
    -------
    >>> model = SpeechLLMModel.tiny_for_tests()
    >>> wavs = torch.randn(2, 8000) * 0.1
    >>> out = model.compute_kd_inputs(wavs, torch.tensor([1.0, 0.7]),
    ...     transcripts=["the cat", "a dog ran"],
    ...     continuations=["sat.", "away"], instructions="Repeat:")
    >>> out["student_input_logits"].shape == out["teacher_input_logits"].shape
    True
    >>> out["input_mask"].sum(1).tolist() == out["num_tokens"].tolist()
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
    ):
        super().__init__()
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
        out_size = adapter.output_size()
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
    @classmethod
    def tiny_for_tests(
        cls, llm_type="llama", whisper=True, init_std=0.3, **kwargs
    ):
        """A tiny random model (test tokenizer, 2-layer LLM, CFormer).

        Arguments
        ---------
        llm_type : str
            "llama" or "qwen2".
        whisper : bool
            Include a tiny random Whisper encoder (d_model 64, 2 layers).
        init_std : float
            LLM weight init std (large enough for varied greedy outputs).
        **kwargs
            Passed to the constructor.

        Returns
        -------
        SpeechLLMModel

        Example
        -------
        >>> SpeechLLMModel.tiny_for_tests().llm.config.hidden_size
        64
        """
        from transformers import (
            LlamaConfig,
            LlamaForCausalLM,
            Qwen2Config,
            Qwen2ForCausalLM,
        )

        from speechbrain_blspkd.nnet.cformer import CFormer
        from speechbrain_blspkd.nnet.whisper_encoder import WhisperEncoder
        from speechbrain_blspkd.prompt import build_test_tokenizer
        from speechbrain_blspkd.utils.testing import (
            tiny_llm_config,
            tiny_whisper_config,
        )

        tok = build_test_tokenizer()
        common = tiny_llm_config(
            tok, tie_word_embeddings=True, initializer_range=init_std
        )
        if llm_type == "llama":
            llm = LlamaForCausalLM(LlamaConfig(**common))
        elif llm_type == "qwen2":
            llm = Qwen2ForCausalLM(Qwen2Config(**common))
        else:
            raise ValueError(f"tiny_for_tests: unknown llm_type {llm_type!r}")
        encoder = None
        if whisper:
            encoder = WhisperEncoder(tiny_whisper_config())
        adapter = CFormer(64, 64, n_pre=1, n_post=1, nhead=4, d_ffn=128)
        kwargs.setdefault(
            "plora", dict(r=4, alpha=8, dropout=0.0, scope="audio")
        )
        return cls(llm, adapter, encoder=encoder, tokenizer=tok, **kwargs)

    @property
    def embed_tokens(self):
        """The LLM input embedding module."""
        return self.llm.get_input_embeddings()

    def _backbone(self):
        return self.llm.base_model

    def _lm_head(self, hidden):
        head = self.llm.get_output_embeddings()
        logits = head(hidden.to(head.weight.dtype))
        cap = getattr(
            self.llm.config.get_text_config(), "final_logit_softcapping", None
        )
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()

    def _plora_off(self):
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

    def _hidden(self, embeds, batch, plora_mask=None):
        """Final hidden states (B, L, D) of the LLM backbone.

        ``batch`` is a right-padded collated prompt batch; ``plora_mask``
        the student's PLoRA mask (None: no delta, e.g. the teacher). With
        ``prefix_reuse`` the shared prefix comes from the cache and the
        returned states cover the prefix positions with zeros (nothing is
        read there: distilled positions start after the instruction).
        """
        attention_mask = batch["attention_mask"]
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        start = self._reusable_prefix(batch, plora_mask)
        past = None
        if start:
            past = self._prefix_keys_values(
                batch["input_ids"][0, :start], embeds.shape[0]
            )
            embeds = embeds[:, start:]
            position_ids = position_ids[:, start:]
            if plora_mask is not None:
                plora_mask = plora_mask[:, start:]
        # The mask stays set after this call: with gradient checkpointing
        # the student forward is re-run in backward().
        if self.has_plora:
            plora_lib.set_plora_mask(self.llm, plora_mask)
        out = self._backbone()(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past,
            use_cache=False,
        )
        hidden = out.last_hidden_state
        if start:
            hidden = F.pad(hidden, (0, 0, start, 0))
        return hidden

    def _reusable_prefix(self, batch, plora_mask):
        """Length of the batch's shared prefix to reuse (0: none)."""
        if not self.prefix_reuse or self.gradient_checkpointing:
            return 0
        ids = batch["input_ids"]
        start = int(batch["span_start"].min())
        if start < 1 or ids.shape[1] - start < 1:
            return 0
        same = (ids[:, :start] == ids[:1, :start]).all(0)
        if not bool(same.all()):
            start = int(same.long().cumprod(0).sum())
        if not bool(batch["attention_mask"][:, :start].bool().all()):
            return 0  # left padding: no shared prefix
        if plora_mask is not None and bool(plora_mask[:, :start].any()):
            return 0  # the delta reaches the prefix (scope text / global)
        frozen = all(
            not p.requires_grad
            for n, p in self.llm.named_parameters()
            if "lora_" not in n
        )
        return start if frozen else 0

    def _prefix_keys_values(self, prefix_ids, batch_size):
        """A fresh cache holding the prefix keys/values for the batch."""
        from transformers import DynamicCache

        device = prefix_ids.device
        autocast = torch.is_autocast_enabled(device.type)
        key = (
            tuple(prefix_ids.tolist()),
            str(device),
            autocast,
            torch.get_autocast_dtype(device.type) if autocast else None,
            self.embed_tokens.weight.dtype,
            self.llm.training,
        )
        if key not in self._prefix_cache:
            if len(self._prefix_cache) >= 8:
                self._prefix_cache.clear()
            with torch.no_grad(), self._plora_off():
                cache = DynamicCache(config=self.llm.config)
                self._backbone()(
                    inputs_embeds=self.embed_tokens(prefix_ids[None]),
                    past_key_values=cache,
                    use_cache=True,
                )
            self._prefix_cache[key] = [
                (layer.keys, layer.values) for layer in cache.layers
            ]
        cache = DynamicCache(config=self.llm.config)
        for i, (k, v) in enumerate(self._prefix_cache[key]):
            shape = (batch_size,) + tuple(k.shape[1:])
            cache.update(k.expand(shape), v.expand(shape), i)
        return cache

    def _gather_logits(self, hidden, positions, mask):
        """LM-head logits (B, P, V) float32 at ``positions`` (0 if masked)."""
        batch, width = positions.shape
        idx = positions.clamp(0, hidden.shape[1] - 1)
        picked = hidden.gather(
            1, idx[..., None].expand(-1, -1, hidden.shape[-1])
        )
        logits = self._lm_head(picked[mask])
        out = logits.new_zeros(batch, width, logits.shape[-1])
        return out.index_put((mask,), logits)

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
        >>> model = SpeechLLMModel.tiny_for_tests(whisper=False)
        >>> [len(x) > 0 for x in model.transcript_ids(["a", "b c"])]
        [True, True]
        """
        return [self.prompts.transcript_ids(t) for t in transcripts]

    def num_tokens(self, transcripts, device=None):
        """(B,) long: the CIF target counts of ``transcripts``.

        Example
        -------
        >>> model = SpeechLLMModel.tiny_for_tests(whisper=False)
        >>> model.num_tokens(["hello world"]).shape
        torch.Size([1])
        """
        return torch.tensor(
            [len(x) for x in self.transcript_ids(transcripts)],
            dtype=torch.long,
            device=device,
        )

    def trainable_parameters(self):
        """Parameters with ``requires_grad`` (adapter, PLoRA, encoder if
        unfrozen).

        Example
        -------
        >>> model = SpeechLLMModel.tiny_for_tests(whisper=False)
        >>> all(p.requires_grad for p in model.trainable_parameters())
        True
        """
        return [p for p in self.parameters() if p.requires_grad]

    # ------------------------------------------------------------------
    # speech side
    def encode_speech(
        self,
        wavs=None,
        wav_lens=None,
        num_tokens=None,
        feats=None,
        feat_lens=None,
    ):
        """Encoder (unless ``feats`` are given) and CFormer.

        Arguments
        ---------
        wavs : torch.Tensor, optional
            (B, S) waveforms.
        wav_lens : torch.Tensor, optional
            (B,) relative lengths.
        num_tokens : torch.Tensor, optional
            (B,) target counts (training); None predicts them.
        feats : torch.Tensor, optional
            (B, T, d) cached encoder features instead of ``wavs``.
        feat_lens : torch.Tensor, optional
            (B,) relative lengths of ``feats``.

        Returns
        -------
        speechbrain_blspkd.nnet.cformer.CFormerOutput

        Example
        -------
        >>> model = SpeechLLMModel.tiny_for_tests()
        >>> out = model.encode_speech(torch.randn(1, 4000), num_tokens=[3])
        >>> out.tokens.shape
        torch.Size([1, 3, 64])
        """
        if feats is None:
            if wavs is None:
                raise ValueError("encode_speech: give `wavs` or `feats`")
            if self.encoder is None:
                raise ValueError(
                    "encode_speech: the model has no encoder; pass cached "
                    "`feats`"
                )
            feats, feat_lens = self.encoder(wavs, wav_lens)
        if num_tokens is not None:
            num_tokens = torch.as_tensor(num_tokens, device=feats.device)
        return self.adapter(feats, lengths=feat_lens, num_tokens=num_tokens)

    def _speech_embeds(self, batch, adapter_out):
        """Prompt embeddings with the speech slots filled by the adapter."""
        embeds = self.embed_tokens(batch["input_ids"])
        speech_mask = batch["speech_mask"]
        per_row = speech_mask.sum(1)
        counts = adapter_out.token_mask.sum(1).to(per_row.device)
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
    # training
    def teacher_logits(
        self, transcripts, continuations, instructions=None, add_eot=True
    ):
        """Teacher (PLoRA off, eval, no grad) logits at distilled positions.

        Arguments
        ---------
        transcripts : list of str
            Transcripts.
        continuations : list of str
            Teacher continuations (the response).
        instructions : str or list of str, optional
            Text instructions (default: ``self.instruction``).
        add_eot : bool or list of bool
            End-of-turn after each continuation (False when truncated).

        Returns
        -------
        dict
            ``input_logits`` (B, N, V), ``input_mask`` (B, N),
            ``response_logits`` (B, R, V), ``response_mask`` (B, R),
            ``response_targets`` (B, R) (0 where masked), ``prompts``.

        Example
        -------
        >>> model = SpeechLLMModel.tiny_for_tests(whisper=False)
        >>> out = model.teacher_logits(["a b"], ["c"], "Say:")
        >>> out["input_logits"].shape[1] == len(model.transcript_ids(["a b"])[0])
        True
        """
        n = len(transcripts)
        instructions = self._instructions(instructions, n)
        if isinstance(add_eot, torch.Tensor):
            add_eot = add_eot.tolist()
        prompts = self.prompts.build_batch(
            instructions,
            transcripts=transcripts,
            continuations=list(continuations),
            add_eot=add_eot,
        )
        device = self.embed_tokens.weight.device
        batch = self.prompts.collate(prompts, device=device)
        with torch.no_grad(), self._plora_off(), _eval_mode(self.llm):
            embeds = self.embed_tokens(batch["input_ids"])
            hidden = self._hidden(embeds, batch)
            pos, in_mask = _positions(batch["span_start"], batch["span_length"])
            input_logits = self._gather_logits(hidden, pos, in_mask)
            rpos, r_mask = _positions(
                batch["response_start"] - 1, batch["response_length"]
            )
            response_logits = self._gather_logits(hidden, rpos, r_mask)
        targets = (
            batch["input_ids"]
            .gather(1, (rpos + 1).clamp(max=batch["input_ids"].shape[1] - 1))
            .masked_fill(~r_mask, 0)
        )
        return {
            "input_logits": input_logits,
            "input_mask": in_mask,
            "response_logits": response_logits,
            "response_mask": r_mask,
            "response_targets": targets,
            "prompts": prompts,
        }

    def compute_kd_inputs(
        self,
        wavs=None,
        wav_lens=None,
        transcripts=None,
        continuations=None,
        instructions=None,
        audio_instructions=None,
        add_eot=True,
        feats=None,
        feat_lens=None,
        run_teacher=True,
        run_student=True,
    ):
        """Teacher and student logits at the distilled positions.

        Arguments
        ---------
        wavs, wav_lens : torch.Tensor, optional
            (B, S) waveforms and (B,) relative lengths.
        transcripts : list of str
            Transcripts (their token count is the CIF target N).
        continuations : list of str
            Teacher continuations (response).
        instructions : str or list of str, optional
            Text instructions (teacher).
        audio_instructions : str or list of str, optional
            Speech prompt instructions (default ``audio_instruction`` or the
            text ones).
        add_eot : bool or list of bool
            End-of-turn after each continuation (False when truncated).
        feats, feat_lens : torch.Tensor, optional
            Cached encoder features instead of ``wavs``.
        run_teacher : bool
            Run the online teacher (False with offline top-k teachers).
        run_student : bool
            Run the student LLM pass (False for the alignment stage, which
            only needs the adapter).

        Returns
        -------
        dict
            Student: ``student_input_logits`` (B, N, V),
            ``student_response_logits`` (B, R, V) (float32; absent when
            ``run_student`` is False). Teacher (when ``run_teacher``):
            ``teacher_input_logits``, ``teacher_response_logits`` (same
            shapes). Masks and targets: ``input_mask`` (B, N) bool,
            ``response_mask`` (B, R) bool, ``response_targets`` (B, R) long
            (0 where masked). Adapter: ``adapter`` (the CFormerOutput),
            ``alphas`` (B, T), ``frame_mask`` (B, T), ``num_tokens`` (B,),
            ``alpha_sum`` (B,), ``transcript_ids`` (B, N) (0 where masked).
            ``speech_prompts`` (list of Prompt).
        """
        if transcripts is None:
            raise ValueError("compute_kd_inputs: `transcripts` is required")
        n = len(transcripts)
        if continuations is None and (run_student or run_teacher):
            raise ValueError(
                "compute_kd_inputs: `continuations` is required for the "
                "LLM passes"
            )
        if isinstance(add_eot, torch.Tensor):
            add_eot = add_eot.tolist()
        ids = self.transcript_ids(transcripts)
        device = self.embed_tokens.weight.device
        num_tokens = torch.tensor([len(x) for x in ids], device=device)
        adapter_out = self.encode_speech(
            wavs,
            wav_lens,
            num_tokens=num_tokens,
            feats=feats,
            feat_lens=feat_lens,
        )
        transcript_ids, _ = _pad_lists(ids, 0, device)
        out = {
            "adapter": adapter_out,
            "alphas": adapter_out.alphas,
            "frame_mask": adapter_out.frame_mask,
            "num_tokens": adapter_out.num_tokens,
            "alpha_sum": adapter_out.alpha_sum,
            "transcript_ids": transcript_ids,
        }
        if run_teacher:
            teacher = self.teacher_logits(
                transcripts, continuations, instructions, add_eot
            )
            out["teacher_input_logits"] = teacher["input_logits"]
            out["teacher_response_logits"] = teacher["response_logits"]
            out["input_mask"] = teacher["input_mask"]
            out["response_mask"] = teacher["response_mask"]
            out["response_targets"] = teacher["response_targets"]
        if run_student:
            audio = audio_instructions
            if audio is None and self.audio_instruction is None:
                audio = instructions
            audio = self._instructions(audio, n, audio=True)
            prompts = self.prompts.build_batch(
                audio,
                n_speech=[len(x) for x in ids],
                continuations=list(continuations),
                add_eot=add_eot,
            )
            batch = self.prompts.collate(prompts, device=device)
            embeds = self._speech_embeds(batch, adapter_out)
            mask = self._student_mask(
                batch["speech_mask"], batch["attention_mask"]
            )
            hidden = self._hidden(embeds, batch, mask)
            pos, in_mask = _positions(batch["span_start"], batch["span_length"])
            rpos, r_mask = _positions(
                batch["response_start"] - 1, batch["response_length"]
            )
            out["student_input_logits"] = self._gather_logits(
                hidden, pos, in_mask
            )
            out["student_response_logits"] = self._gather_logits(
                hidden, rpos, r_mask
            )
            targets = (
                batch["input_ids"]
                .gather(
                    1, (rpos + 1).clamp(max=batch["input_ids"].shape[1] - 1)
                )
                .masked_fill(~r_mask, 0)
            )
            if run_teacher and not torch.equal(
                targets, out["response_targets"]
            ):
                raise RuntimeError(
                    "compute_kd_inputs: student and teacher responses differ"
                )
            out["input_mask"] = in_mask
            out["response_mask"] = r_mask
            out["response_targets"] = targets
            out["speech_prompts"] = prompts
        return out

    forward = compute_kd_inputs

    # ------------------------------------------------------------------
    # alignment stage (no LLM pass)
    def _embedding_table(self, device):
        """Unit-norm float32 embedding table and the embedding variance."""
        weight = self.embed_tokens.weight
        key = (weight.data_ptr(), str(device), tuple(weight.shape))
        if self._table is None or self._table[0] != key:
            with torch.no_grad():
                table = weight.detach().to(device=device, dtype=torch.float32)
                scale = self._embed_scale()
                var = (table * scale).var()
                self._table = (key, F.normalize(table, dim=-1), var)
        return self._table[1], self._table[2]

    def _embed_scale(self):
        scale = getattr(self.embed_tokens, "embed_scale", 1.0)
        return float(scale) if not torch.is_tensor(scale) else scale.item()

    def alignment_loss(
        self,
        adapter_out,
        transcript_ids,
        temperature=0.05,
        weights=None,
    ):
        """Pull the N adapter outputs towards the transcript's embeddings.

        At the N CIF positions: cross-entropy over cosine logits against the
        whole embedding table (``cos / temperature``), ``1 - cos`` with the
        true token embedding and MSE divided by the embedding variance
        (DESIGN 2.9). Needs no LLM pass.

        Arguments
        ---------
        adapter_out : CFormerOutput
            With ``tokens`` (B, N, D) and ``token_mask`` (B, N) (trained with
            the target counts, so position i is transcript token i).
        transcript_ids : torch.Tensor
            (B, N) target ids (as returned in ``compute_kd_inputs``).
        temperature : float
            Temperature of the cosine logits.
        weights : dict, optional
            Weights of ``ce``, ``cos``, ``mse`` (default 1 each).

        Returns
        -------
        dict
            ``loss`` (weighted sum), ``ce``, ``cos``, ``mse`` (scalars) and
            ``accuracy`` (nearest-token accuracy, no grad).

        Example
        -------
        >>> model = SpeechLLMModel.tiny_for_tests(whisper=False)
        >>> feats = torch.randn(2, 20, 64)
        >>> ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
        >>> out = model.encode_speech(feats=feats, num_tokens=[3, 2])
        >>> losses = model.alignment_loss(out, ids)
        >>> sorted(losses)
        ['accuracy', 'ce', 'cos', 'loss', 'mse']
        """
        weights = {"ce": 1.0, "cos": 1.0, "mse": 1.0, **(weights or {})}
        mask = adapter_out.token_mask
        ids = transcript_ids.to(mask.device)[:, : mask.shape[1]]
        pred = adapter_out.tokens[mask].float()
        target_ids = ids[mask]
        table, var = self._embedding_table(pred.device)
        with torch.no_grad():
            target = self.embed_tokens(target_ids).float()
        logits = F.normalize(pred, dim=-1) @ table.T
        ce = F.cross_entropy(logits / temperature, target_ids)
        cos = (1 - F.cosine_similarity(pred, target, dim=-1)).mean()
        mse = ((pred - target) ** 2).mean() / var
        loss = weights["ce"] * ce + weights["cos"] * cos + weights["mse"] * mse
        acc = (logits.detach().argmax(-1) == target_ids).float().mean()
        return {"loss": loss, "ce": ce, "cos": cos, "mse": mse, "accuracy": acc}

    @torch.no_grad()
    def token_accuracy(self, adapter_out, transcript_ids):
        """Nearest-token (cosine) accuracy of the adapter outputs.

        Arguments
        ---------
        adapter_out : CFormerOutput
            Adapter output (target counts).
        transcript_ids : torch.Tensor
            (B, N) true ids.

        Returns
        -------
        dict
            ``correct`` and ``total`` (ints, to accumulate over a set),
            ``accuracy`` (float) and ``top_token_share`` (share of the most
            frequent nearest token: near 1 means the adapter collapsed).

        Example
        -------
        >>> model = SpeechLLMModel.tiny_for_tests(whisper=False)
        >>> out = model.encode_speech(feats=torch.randn(1, 9, 64),
        ...     num_tokens=[2])
        >>> model.token_accuracy(out, torch.tensor([[3, 4]]))["total"]
        2
        """
        mask = adapter_out.token_mask
        ids = transcript_ids.to(mask.device)[:, : mask.shape[1]][mask]
        pred = adapter_out.tokens[mask].float()
        table, _ = self._embedding_table(pred.device)
        nearest = (F.normalize(pred, dim=-1) @ table.T).argmax(-1)
        total = int(ids.numel())
        correct = int((nearest == ids).sum())
        share = 0.0
        if total:
            share = float(torch.bincount(nearest).max()) / total
        return {
            "correct": correct,
            "total": total,
            "accuracy": correct / max(total, 1),
            "top_token_share": share,
        }

    # ------------------------------------------------------------------
    # inference
    def _decode(self, sequences, return_ids=False):
        stops = set(self.prompts.eot_ids)
        pad = self.tokenizer.pad_token_id
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
            self.tokenizer.decode(r, skip_special_tokens=True).strip()
            for r in rows
        ]

    def _generate(self, embeds, batch, max_new_tokens, num_beams, kwargs):
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.prompts.placeholder_id
        gen = dict(
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            do_sample=False,
            eos_token_id=self.prompts.eot_ids,
            pad_token_id=pad,
        )
        gen.update(kwargs)
        if not gen.get("do_sample"):
            gen.setdefault("temperature", None)
            gen.setdefault("top_p", None)
            gen.setdefault("top_k", None)
        return self.llm.generate(
            inputs_embeds=embeds,
            attention_mask=batch["attention_mask"],
            **gen,
        )

    @torch.no_grad()
    def generate(
        self,
        wavs=None,
        wav_lens=None,
        instructions=None,
        max_new_tokens=64,
        num_beams=1,
        feats=None,
        feat_lens=None,
        return_num_tokens=False,
        return_ids=False,
        **generate_kwargs,
    ):
        """Answers the speech: batched decoding with the KV cache.

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
            Cached encoder features.
        return_num_tokens : bool
            Also return the predicted token counts (B,).
        return_ids : bool
            Return the generated token ids (cut at the end of turn) instead
            of text.
        **generate_kwargs
            Passed to ``transformers`` ``generate``.

        Returns
        -------
        list of str (and the counts when ``return_num_tokens``)

        Example
        -------
        >>> model = SpeechLLMModel.tiny_for_tests()
        >>> texts = model.generate(torch.randn(2, 4000), max_new_tokens=3)
        >>> len(texts)
        2
        """
        with _eval_mode(self):
            adapter_out = self.encode_speech(
                wavs, wav_lens, feats=feats, feat_lens=feat_lens
            )
            counts = adapter_out.num_tokens
            n = counts.shape[0]
            prompts = self.prompts.build_batch(
                self._instructions(instructions, n, audio=True),
                n_speech=counts.tolist(),
            )
            device = self.embed_tokens.weight.device
            batch = self.prompts.collate(
                prompts, padding_side="left", device=device
            )
            embeds = self._speech_embeds(batch, adapter_out)
            if self.has_plora:
                scope = plora_lib._state(self.llm).scope
                mask = plora_lib.scope_mask(
                    batch["speech_mask"], scope, batch["attention_mask"]
                )
                context = plora_lib.plora_mask(self.llm, mask)
            else:
                context = contextlib.nullcontext()
            with context:
                seqs = self._generate(
                    embeds, batch, max_new_tokens, num_beams, generate_kwargs
                )
        texts = self._decode(seqs, return_ids)
        return (texts, counts) if return_num_tokens else texts

    @torch.no_grad()
    def generate_text(
        self,
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
        >>> model = SpeechLLMModel.tiny_for_tests(whisper=False)
        >>> len(model.generate_text(["a b", "c"], max_new_tokens=2))
        2
        """
        n = len(transcripts)
        prompts = self.prompts.build_batch(
            self._instructions(instructions, n), transcripts=transcripts
        )
        device = self.embed_tokens.weight.device
        batch = self.prompts.collate(
            prompts, padding_side="left", device=device
        )
        with _eval_mode(self), self._plora_off():
            embeds = self.embed_tokens(batch["input_ids"])
            seqs = self._generate(
                embeds, batch, max_new_tokens, num_beams, generate_kwargs
            )
        return self._decode(seqs, return_ids)
