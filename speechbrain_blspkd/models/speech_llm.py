"""The generic speech LLM: encoder -> adapter -> causal LLM (with PLoRA).

:class:`SpeechLLMModel` assembles injected parts behind small interfaces: a
speech encoder (``encoder(wavs, wav_lens) -> (feats, feat_lens)``), an
adapter (:class:`~speechbrain_blspkd.nnet.adapter.SpeechAdapter`) and a
Hugging Face causal LM, optionally with Partial LoRA.  It builds every
prompt with the one :class:`~speechbrain_blspkd.prompt.PromptBuilder`,
splices the adapter's embeddings where the transcript would be, and
computes, in one forward pass, what an objective asks for in a
:class:`PassRequest`:

* the **teacher** pass: the transcript as text, PLoRA off, eval mode, no
  gradient (the same LLM, so no second copy);
* the **student** pass: the speech embeddings, PLoRA on the speech
  positions;
* for either pass, logits (float32, the LM head applied to the selected
  positions only) and hidden states (any layer) at the spans ``"input"``
  (the transcript tokens / the speech embeddings) and ``"response"`` (the
  positions that predict the continuation tokens, the first one being the
  last prompt position).

It computes no loss: the objectives (:mod:`speechbrain_blspkd.objectives`)
do.  :meth:`SpeechLLMModel.generate` answers speech and
:meth:`SpeechLLMModel.generate_text` the transcript (batched, KV cache).

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

from speechbrain_blspkd.models import positions as pos_lib
from speechbrain_blspkd.nnet import plora as plora_lib
from speechbrain_blspkd.nnet.adapter import AdapterTargets
from speechbrain_blspkd.prompt import PromptBuilder, context_limit
from speechbrain_blspkd.utils import sharding
from speechbrain_blspkd.utils.precision import resolve_dtype

__all__ = ["LLMPass", "PassRequest", "SpeechLLMModel", "SpeechLLMOutput"]

SPANS = ("input", "response")


@dataclasses.dataclass(frozen=True)
class PassRequest:
    """What one forward pass of :class:`SpeechLLMModel` computes.

    Arguments
    ---------
    teacher : bool
        Run the teacher pass (text input, PLoRA off, no grad).
    student : bool
        Run the student pass (speech input).
    response : bool
        Put the teacher continuation in the prompts (needed for anything
        at the ``"response"`` span).
    logits : tuple of str
        Spans where logits are returned (``"input"``, ``"response"``).
    hidden : tuple of (int, str)
        ``(layer, span)`` pairs where hidden states are returned.
    predicted_count : bool
        The adapter is not told the transcript's token counts: a CIF
        adapter fires the count it predicts, as at inference (the input
        span then has no one-to-one teacher positions; only the response
        can be distilled).

    Example
    -------
    >>> PassRequest(student=True, logits=("response",)).runs_llm
    True
    >>> PassRequest().runs_llm
    False
    """

    teacher: bool = False
    student: bool = False
    response: bool = True
    logits: tuple = ()
    hidden: tuple = ()
    predicted_count: bool = False

    def __post_init__(self):
        bad = [s for s in self.logits if s not in SPANS]
        bad += [s for _, s in self.hidden if s not in SPANS]
        if bad:
            raise ValueError(f"PassRequest: unknown span(s) {bad}; use {SPANS}")
        needs_response = "response" in self.logits or any(
            s == "response" for _, s in self.hidden
        )
        if needs_response and not self.response:
            raise ValueError(
                "PassRequest: the response span needs response=True"
            )
        if self.predicted_count and "input" in self.logits:
            raise ValueError(
                "PassRequest: with predicted_count the input span has no "
                "teacher positions to compare; ask for response logits only"
            )

    @property
    def runs_llm(self):
        """Whether an LLM pass runs at all."""
        return self.teacher or self.student


@dataclasses.dataclass
class LLMPass:
    """The outputs of one LLM pass (teacher or student).

    Arguments
    ---------
    logits : dict
        span -> (B, P, V) float32 logits (0 where masked).
    hidden : dict
        (layer, span) -> (B, P, D) hidden states (0 where masked).
    masks : dict
        span -> (B, P) bool: the real positions of each span.
    response_targets : torch.Tensor or None
        (B, R) ids of the response tokens (0 where masked).
    prompts : list
        The :class:`~speechbrain_blspkd.prompt.Prompt` of each row.
    """

    logits: dict
    hidden: dict
    masks: dict
    response_targets: torch.Tensor
    prompts: list


@dataclasses.dataclass
class SpeechLLMOutput:
    """Everything one forward pass computed.

    Arguments
    ---------
    adapter : speechbrain_blspkd.nnet.adapter.AdapterOutput
        The adapter's output (with its method-specific extras).
    targets : speechbrain_blspkd.nnet.adapter.AdapterTargets
        What the adapter was given (transcript token counts, languages).
    transcript_ids : torch.Tensor
        (B, N) LLM token ids of the transcripts (0 where masked).
    transcript_mask : torch.Tensor
        (B, N) bool.
    teacher : LLMPass or None
        The teacher pass, when requested.
    student : LLMPass or None
        The student pass, when requested.
    feats : torch.Tensor or None
        (B, T, d) the frames the adapter read: the encoder's output on the
        waveforms, or the cached features given (for an objective that
        distils another model's view of the same frames, e.g. AuRA's
        Whisper teacher reading the adapter's log-mels).
    feat_lens : torch.Tensor or None
        (B,) relative lengths of ``feats``.
    data : dict
        Per-utterance batch items the objective declared
        (:meth:`~speechbrain_blspkd.objectives.Objective.data_keys`, e.g. a
        stored teacher), set by the training loop; the model fills none.
    """

    adapter: object
    targets: AdapterTargets
    transcript_ids: torch.Tensor
    transcript_mask: torch.Tensor
    teacher: LLMPass = None
    student: LLMPass = None
    feats: torch.Tensor = None
    feat_lens: torch.Tensor = None
    data: dict = dataclasses.field(default_factory=dict)


@contextlib.contextmanager
def _eval_mode(module):
    was = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was)


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
    >>> from speechbrain_blspkd.utils.testing import tiny_speech_llm
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

    def _backbone(self):
        return self.llm.base_model

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

    def _run_llm(
        self, embeds, batch, plora_mask=None, hidden_layers=(), final=True
    ):
        """Final hidden states (B, L, D) and any requested layers.

        ``batch`` is a right-padded collated prompt batch; ``plora_mask``
        the student's PLoRA mask (None: no delta, e.g. the teacher). With
        ``prefix_reuse`` the shared prefix comes from the cache and the
        returned states cover the prefix positions with zeros (nothing is
        read there: every span starts after the instruction).  With
        ``final=False`` (no logits and no final state wanted) the pass
        stops after the deepest requested layer and the returned final
        state is None (:meth:`_truncated_forward`).
        """
        attention_mask = batch["attention_mask"]
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        start = self._reusable_prefix(batch, plora_mask)
        collective = self._collective_prefix()
        if collective and not sharding.agree(start > 0, "all", embeds.device):
            start = 0  # another process cannot reuse: none does
        past = None
        if start:
            past = self._prefix_keys_values(
                batch["input_ids"][0, :start], embeds.shape[0], collective
            )
            embeds = embeds[:, start:]
            position_ids = position_ids[:, start:]
            if plora_mask is not None:
                plora_mask = plora_mask[:, start:]
        # The mask stays set after this call: with gradient checkpointing
        # the student forward is re-run in backward().
        if self.has_plora:
            plora_lib.set_plora_mask(self.llm, plora_mask)
        kwargs = dict(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past,
            use_cache=False,
        )
        stop = self._stop_layer(hidden_layers, final)
        if stop is not None:
            layers = self._truncated_forward(kwargs, hidden_layers, stop)
            final = None
        else:
            out = self._backbone()(
                **kwargs, output_hidden_states=bool(hidden_layers)
            )
            layers = {k: out.hidden_states[k] for k in hidden_layers}
            final = out.last_hidden_state
        if start:
            if final is not None:
                final = F.pad(final, (0, 0, start, 0))
            layers = {k: F.pad(v, (0, 0, start, 0)) for k, v in layers.items()}
        return final, layers

    def _stop_layer(self, hidden_layers, final):
        """The number of decoder layers a pass must run, or None (all).

        A pass that needs neither logits nor the final state stops after
        the deepest requested layer (AuRA's layer-wise distillation reads
        LLM layers 2, 4, 6 of 30: a fifth of the forward and backward).
        Not under FSDP, where every process must run the same layer calls,
        and not for LLMs whose decoder layers are not ``base_model.layers``.
        """
        if final or not hidden_layers:
            return None
        layers = getattr(self._backbone(), "layers", None)
        deepest = max(hidden_layers)
        if not isinstance(layers, nn.ModuleList):
            return None
        if not 1 <= deepest < len(layers):
            return None
        if sharding.is_sharded(self.llm):
            return None
        return deepest

    class _Stop(Exception):
        """Raised by the hook on the last decoder layer a pass needs."""

    def _truncated_forward(self, kwargs, hidden_layers, stop):
        """Hidden states ``hidden_layers`` (each <= ``stop``) from a
        forward that runs decoder layers ``0 .. stop - 1`` only.

        Why by hand: Hugging Face models have no "stop after layer k"
        argument. Forward pre-hooks record the input of each requested
        layer (state ``k`` is the input of layer ``k``, the embedding
        output for ``k = 0``) and a forward hook on layer ``stop - 1``
        records its output (state ``stop``) and raises to end the pass;
        the hooks are removed before backward, so gradient checkpointing's
        recomputation does not meet them.
        """
        blocks = self._backbone().layers
        wanted = set(hidden_layers)
        states = {}

        def before(index):
            def hook(module, args, kw):
                states[index] = args[0] if args else kw["hidden_states"]

            return hook

        def after(module, args, output):
            if isinstance(output, (tuple, list)):
                output = output[0]
            states[stop] = output
            raise SpeechLLMModel._Stop

        handles = [
            blocks[k].register_forward_pre_hook(before(k), with_kwargs=True)
            for k in sorted(wanted - {stop})
        ]
        handles.append(blocks[stop - 1].register_forward_hook(after))
        try:
            self._backbone()(**kwargs)
        except SpeechLLMModel._Stop:
            pass
        else:
            raise RuntimeError(
                f"SpeechLLMModel: the forward did not reach decoder layer "
                f"{stop - 1}"
            )
        finally:
            for handle in handles:
                handle.remove()
        return {k: states[k] for k in hidden_layers}

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

    def _collective_prefix(self):
        """Whether prefix reuse must be decided by every process together.

        Under FSDP (the LLM's layers sharded across processes) every
        forward all-gathers each layer, so all processes must run the same
        layer calls.  Whether a process reuses a prefix (its batch may have
        left padding or a shorter shared prefix) and whether its cache
        misses (the prefix forward) are local facts; deciding them alone
        would make one process run a prefix forward that the others never
        join, and the run would hang.  So under FSDP the processes reuse a
        prefix only when all can, and all recompute it when any misses.
        """
        if not sharding._process_group_ready():
            return False
        return sharding.is_sharded(self.llm)

    def _prefix_keys_values(self, prefix_ids, batch_size, collective=False):
        """A fresh cache holding the prefix keys/values for the batch.

        ``collective``: the cache is (re)filled on every process when it
        misses on any (:meth:`_collective_prefix`).
        """
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
        missing = key not in self._prefix_cache
        if collective:
            missing = sharding.agree(missing, "any", device)
        if missing:
            if len(self._prefix_cache) >= 8:
                self._prefix_cache.clear()
            with torch.no_grad(), self.plora_off():
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
        >>> from speechbrain_blspkd.utils.testing import tiny_speech_llm
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
        >>> from speechbrain_blspkd.utils.testing import tiny_speech_llm
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
        >>> from speechbrain_blspkd.utils.testing import tiny_speech_llm
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

    @torch.no_grad()
    def snapped(self, output):
        """``output`` with every speech embedding replaced by the LLM's
        embedding of its nearest token (cosine; rows beyond the mask stay
        zero): what generation feeds the LLM when ``snap_speech`` is set.

        Example
        -------
        >>> from speechbrain_blspkd.utils.testing import tiny_speech_llm
        >>> model = tiny_speech_llm()
        >>> ids = torch.tensor([[5, 9, 2]])
        >>> from speechbrain_blspkd.nnet.adapter import AdapterOutput
        >>> out = AdapterOutput(model.embed_tokens(ids) * 3 + 0.01,
        ...     torch.ones(1, 3, dtype=torch.bool))
        >>> torch.equal(model.snapped(out).tokens, model.embed_tokens(ids))
        True
        """
        tokens = output.tokens
        table, _ = self.embedding_table(tokens.device)
        nearest = (
            torch.nn.functional.normalize(tokens.float(), dim=-1) @ table.T
        ).argmax(-1)
        snapped = self.embed_tokens(nearest).to(tokens.dtype)
        snapped = snapped * output.token_mask[..., None].to(snapped.dtype)
        return dataclasses.replace(output, tokens=snapped)

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
        >>> from speechbrain_blspkd.utils.testing import tiny_speech_llm
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
    # LLM passes
    def _read_pass(self, final, layers, batch, prompts, request):
        """Logits / hidden states at the requested spans of one pass."""
        spans = {}
        wanted = set(request.logits) | {s for _, s in request.hidden}
        if "input" in wanted:
            spans["input"] = pos_lib.span_positions(
                batch["span_start"], batch["span_length"]
            )
        response_targets = None
        if request.response:
            index, mask = pos_lib.next_token_positions(
                batch["response_start"].clamp(min=1), batch["response_length"]
            )
            spans["response"] = (index, mask)
            ids = batch["input_ids"]
            response_targets = ids.gather(
                1, (index + 1).clamp(max=ids.shape[1] - 1)
            ).masked_fill(~mask, 0)
        logits = {
            span: pos_lib.gather_logits(final, self.lm_head, *spans[span])
            for span in request.logits
        }
        hidden = {}
        for layer, span in request.hidden:
            index, mask = spans[span]
            states = final if layer == -1 else layers[layer]
            picked = pos_lib.gather_positions(states, index, mask)
            hidden[(layer, span)] = picked * mask[..., None].to(picked.dtype)
        return LLMPass(
            logits=logits,
            hidden=hidden,
            masks={span: mask for span, (_, mask) in spans.items()},
            response_targets=response_targets,
            prompts=prompts,
        )

    @staticmethod
    def _needs_final(request):
        """Whether a pass must run to the end: logits or the final state."""
        return bool(request.logits) or any(k == -1 for k, _ in request.hidden)

    def _hidden_layers(self, request):
        layers = sorted({layer for layer, _ in request.hidden} - {-1})
        depth = self.llm.config.get_text_config().num_hidden_layers
        bad = [layer for layer in layers if not 0 <= layer <= depth]
        if bad:
            raise ValueError(
                f"SpeechLLMModel: hidden layer(s) {bad} requested; the LLM "
                f"has hidden states 0..{depth} (or -1)"
            )
        return tuple(layers)

    def teacher_pass(
        self,
        transcripts,
        continuations=None,
        instructions=None,
        add_eot=True,
        request=None,
    ):
        """The teacher: transcript text, PLoRA off, eval mode, no grad.

        Arguments
        ---------
        transcripts : list of str
            Transcripts.
        continuations : list of str, optional
            Teacher continuations (the response; needed when
            ``request.response``).
        instructions : str or list of str, optional
            Text instructions (default: ``self.instruction``).
        add_eot : bool or list of bool
            End-of-turn after each continuation (False when truncated).
        request : PassRequest, optional
            What to return (default: logits at both spans).

        Returns
        -------
        LLMPass

        Example
        -------
        >>> from speechbrain_blspkd.utils.testing import tiny_speech_llm
        >>> model = tiny_speech_llm(whisper=False)
        >>> out = model.teacher_pass(["a b"], ["c"], "Say:")
        >>> out.logits["input"].shape[1] == len(model.transcript_ids(["a b"])[0])
        True
        """
        request = request or PassRequest(
            teacher=True, logits=("input", "response")
        )
        n = len(transcripts)
        prompts = self.prompts.build_batch(
            self._instructions(instructions, n),
            transcripts=transcripts,
            continuations=self._continuations(continuations, request, n),
            add_eot=_as_list(add_eot),
        )
        batch = self.prompts.collate(prompts, device=self.device)
        with torch.no_grad(), self.plora_off(), _eval_mode(self.llm):
            embeds = self.embed_tokens(batch["input_ids"])
            final, layers = self._run_llm(
                embeds,
                batch,
                hidden_layers=self._hidden_layers(request),
                final=self._needs_final(request),
            )
            return self._read_pass(final, layers, batch, prompts, request)

    def student_pass(
        self,
        adapter_out,
        continuations=None,
        instructions=None,
        add_eot=True,
        request=None,
    ):
        """The student: the adapter's embeddings, PLoRA on their positions.

        Arguments
        ---------
        adapter_out : speechbrain_blspkd.nnet.adapter.AdapterOutput
            From :meth:`encode_speech`.
        continuations : list of str, optional
            Teacher continuations (the response).
        instructions : str or list of str, optional
            Speech prompt instructions (default ``audio_instruction``, else
            ``instruction``).
        add_eot : bool or list of bool
            End-of-turn after each continuation.
        request : PassRequest, optional
            What to return (default: logits at both spans).

        Returns
        -------
        LLMPass
        """
        request = request or PassRequest(
            student=True, logits=("input", "response")
        )
        counts = adapter_out.token_counts.tolist()
        n = len(counts)
        prompts = self.prompts.build_batch(
            self._instructions(instructions, n, audio=True),
            n_speech=counts,
            continuations=self._continuations(continuations, request, n),
            add_eot=_as_list(add_eot),
        )
        batch = self.prompts.collate(prompts, device=self.device)
        embeds = self._speech_embeds(batch, adapter_out)
        mask = self._student_mask(batch["speech_mask"], batch["attention_mask"])
        final, layers = self._run_llm(
            embeds,
            batch,
            mask,
            hidden_layers=self._hidden_layers(request),
            final=self._needs_final(request),
        )
        return self._read_pass(final, layers, batch, prompts, request)

    @staticmethod
    def _continuations(continuations, request, n):
        if not request.response:
            return None
        if continuations is None:
            raise ValueError(
                "SpeechLLMModel: the response span needs `continuations`"
            )
        if len(continuations) != n:
            raise ValueError(
                f"SpeechLLMModel: {len(continuations)} continuations for a "
                f"batch of {n}"
            )
        return list(continuations)

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
        ids = self.transcript_ids(transcripts)
        device = self.device
        transcript_ids, transcript_mask = _pad_ids(ids, device)
        targets = AdapterTargets(
            num_tokens=transcript_mask.sum(1),
            language=None if languages is None else languages.to(device),
            token_spans=_checked_spans(token_spans, transcript_mask),
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

    def check_fits(
        self,
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
        limit = context_limit(self.llm)
        if limit is None:
            return
        self.prompts.check_fits(
            limit,
            instructions,
            n_speech=None if n_speech is None else list(n_speech),
            transcripts=transcripts,
            max_new_tokens=max_new_tokens,
            ids=names,
            source=source,
            item=item,
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
        names=None,
        source=None,
        item="row",
        **generate_kwargs,
    ):
        """Answers the speech: batched decoding with the KV cache.

        Every speech prompt plus ``max_new_tokens`` is checked against the
        LLM context first (``ContextLengthError`` names the item).

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
            Also return the number of speech embeddings of each row (B,).
        return_ids : bool
            Return the generated token ids (cut at the end of turn) instead
            of text.
        names, source, item : optional
            How the rows are named in a context-length error (e.g. row IDs
            and the manifest, or file names and ``item="file"``).
        **generate_kwargs
            Passed to ``transformers`` ``generate``.

        Returns
        -------
        list of str (and the counts when ``return_num_tokens``)

        Example
        -------
        >>> from speechbrain_blspkd.utils.testing import tiny_speech_llm
        >>> model = tiny_speech_llm()
        >>> texts = model.generate(torch.randn(2, 4000), max_new_tokens=3)
        >>> len(texts)
        2
        """
        with _eval_mode(self):
            adapter_out = self.encode_speech(
                wavs, wav_lens, feats=feats, feat_lens=feat_lens
            )
            if self.snap_speech:
                adapter_out = self.snapped(adapter_out)
            counts = adapter_out.token_counts
            n = counts.shape[0]
            instructions = self._instructions(instructions, n, audio=True)
            self.check_fits(
                instructions,
                max_new_tokens,
                n_speech=counts.tolist(),
                names=names,
                source=source,
                item=item,
            )
            prompts = self.prompts.build_batch(
                instructions, n_speech=counts.tolist()
            )
            batch = self.prompts.collate(
                prompts, padding_side="left", device=self.device
            )
            embeds = self._speech_embeds(batch, adapter_out)
            if self.has_plora:
                mask = self._student_mask(
                    batch["speech_mask"], batch["attention_mask"]
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
        >>> from speechbrain_blspkd.utils.testing import tiny_speech_llm
        >>> model = tiny_speech_llm(whisper=False)
        >>> len(model.generate_text(["a b", "c"], max_new_tokens=2))
        2
        """
        n = len(transcripts)
        prompts = self.prompts.build_batch(
            self._instructions(instructions, n), transcripts=transcripts
        )
        batch = self.prompts.collate(
            prompts, padding_side="left", device=self.device
        )
        with _eval_mode(self), self.plora_off():
            embeds = self.embed_tokens(batch["input_ids"])
            seqs = self._generate(
                embeds, batch, max_new_tokens, num_beams, generate_kwargs
            )
        return self._decode(seqs, return_ids)


def _as_list(flags):
    if isinstance(flags, torch.Tensor):
        return flags.tolist()
    return flags


def _checked_spans(token_spans, transcript_mask):
    """``token_spans`` on the transcripts' device, checked to hold one
    span per transcript token of every row (None stays None)."""
    if token_spans is None:
        return None
    spans = torch.as_tensor(token_spans).to(transcript_mask.device)
    batch, width = transcript_mask.shape
    if spans.dim() != 3 or spans.shape[0] != batch or spans.shape[2] != 2:
        raise ValueError(
            f"SpeechLLMModel: `token_spans` must be ({batch}, N, 2), got "
            f"{tuple(spans.shape)}"
        )
    if spans.shape[1] < width:
        spans = torch.nn.functional.pad(
            spans, (0, 0, 0, width - spans.shape[1]), value=-1.0
        )
    spans = spans[:, :width]
    have = (spans[..., 0] >= 0).sum(1)
    if not torch.equal(have, transcript_mask.sum(1)):
        raise ValueError(
            "SpeechLLMModel: the token timings hold "
            f"{have.tolist()} spans for transcripts of "
            f"{transcript_mask.sum(1).tolist()} tokens"
        )
    return spans


def _pad_ids(ids, device):
    """(B, N) long ids (0-padded) and their mask from lists of ids."""
    from torch.nn.utils.rnn import pad_sequence

    rows = [torch.tensor(x, dtype=torch.long) for x in ids]
    if not rows or max(len(x) for x in ids) == 0:
        rows = rows + [torch.zeros(1, dtype=torch.long)]
    padded = pad_sequence(rows, batch_first=True)[: len(ids)]
    lengths = torch.tensor([len(x) for x in ids], dtype=torch.long)
    mask = torch.arange(padded.shape[1])[None] < lengths[:, None]
    return padded.to(device), mask.to(device)
