"""What one forward of the speech LLM computes: the request, the teacher
and student passes, and their outputs.

An objective states in a :class:`PassRequest` what it reads; the model's
``forward`` runs the adapter and then, as requested, the two passes of
the one LLM (:func:`teacher_pass`, :func:`student_pass`), and returns a
:class:`SpeechLLMOutput` holding an :class:`LLMPass` for each:

* the **teacher** pass: the transcript as text, PLoRA off, eval mode, no
  gradient (the same LLM, so no second copy);
* the **student** pass: the speech embeddings, PLoRA on the speech
  positions;
* for either pass, logits (float32, the LM head applied to the selected
  positions only) and hidden states (any layer) at the spans ``"input"``
  (the transcript tokens / the speech embeddings) and ``"response"`` (the
  positions that predict the continuation tokens, the first one being the
  last prompt position): :func:`read_pass`.

What the adapter is told of a batch (the transcripts' token counts,
languages, token timings) is :func:`adapter_targets`.

The passes are methods of
:class:`~speechbrain_blspkd.models.speech_llm.SpeechLLMModel`
(``model.teacher_pass``, ``model.student_pass``); the functions here take
the model as their first argument.

Authors
 * speechbrain-blspkd contributors 2025
"""

import dataclasses

import torch

from speechbrain_blspkd.models import positions as pos_lib
from speechbrain_blspkd.models.llm_forward import eval_mode, run_llm
from speechbrain_blspkd.nnet.adapter import AdapterTargets

__all__ = [
    "LLMPass",
    "PassRequest",
    "SpeechLLMOutput",
    "adapter_targets",
    "read_pass",
    "student_pass",
    "teacher_pass",
]

SPANS = ("input", "response")


@dataclasses.dataclass(frozen=True)
class PassRequest:
    """What one forward pass of :class:`~speechbrain_blspkd.models.
    speech_llm.SpeechLLMModel` computes.

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


def teacher_pass(
    model,
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
        Text instructions (default: ``model.instruction``).
    add_eot : bool or list of bool
        End-of-turn after each continuation (False when truncated).
    request : PassRequest, optional
        What to return (default: logits at both spans).

    Returns
    -------
    LLMPass

    Example
    -------
    >>> from speechbrain_blspkd.testing import tiny_speech_llm
    >>> model = tiny_speech_llm(whisper=False)
    >>> out = model.teacher_pass(["a b"], ["c"], "Say:")
    >>> out.logits["input"].shape[1] == len(model.transcript_ids(["a b"])[0])
    True
    """
    request, prompts, batch = _pass_batch(
        model,
        request,
        instructions,
        continuations,
        add_eot,
        transcripts=transcripts,
    )
    with torch.no_grad(), model.plora_off(), eval_mode(model.llm):
        embeds = model.embed_tokens(batch["input_ids"])
        return _run_and_read(model, embeds, batch, prompts, request)


def student_pass(
    model,
    adapter_out,
    continuations=None,
    instructions=None,
    add_eot=True,
    request=None,
):
    """The student: the adapter's embeddings, PLoRA on their positions.

    The arguments are those of :func:`teacher_pass`, the adapter's output
    (:meth:`~speechbrain_blspkd.models.speech_llm.SpeechLLMModel.
    encode_speech`) in place of the transcripts, and ``instructions`` the
    speech prompt's (default ``audio_instruction``, else ``instruction``).

    Returns
    -------
    LLMPass
    """
    request, prompts, batch = _pass_batch(
        model,
        request,
        instructions,
        continuations,
        add_eot,
        n_speech=adapter_out.token_counts.tolist(),
    )
    embeds = model._speech_embeds(batch, adapter_out)
    mask = model._student_mask(batch["speech_mask"], batch["attention_mask"])
    return _run_and_read(model, embeds, batch, prompts, request, mask)


def read_pass(model, final, layers, batch, prompts, request):
    """Logits / hidden states at the requested spans of one pass (the
    final states ``final`` and ``layers`` of :func:`~speechbrain_blspkd.
    models.llm_forward.run_llm` on ``batch``)."""
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
        span: pos_lib.gather_logits(final, model.lm_head, *spans[span])
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


def needs_final(request):
    """Whether a pass must run to the end: logits or the final state."""
    return bool(request.logits) or any(k == -1 for k, _ in request.hidden)


def hidden_layers(model, request):
    """The LLM layers ``request`` reads (sorted; -1, the final state, left
    out), checked against the LLM's depth."""
    layers = sorted({layer for layer, _ in request.hidden} - {-1})
    depth = model.llm.config.get_text_config().num_hidden_layers
    bad = [layer for layer in layers if not 0 <= layer <= depth]
    if bad:
        raise ValueError(
            f"SpeechLLMModel: hidden layer(s) {bad} requested; the LLM "
            f"has hidden states 0..{depth} (or -1)"
        )
    return tuple(layers)


def check_continuations(continuations, request, n):
    """The continuations as a list, checked (None when the pass has no
    response span)."""
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


def _pass_batch(model, request, instructions, continuations, add_eot, **span):
    """The request of one pass (default: logits at both spans), its
    prompts and their right-padded batch; ``span`` is ``transcripts=``
    (teacher) or ``n_speech=`` (student)."""
    (items,) = span.values()
    n = len(items)
    speech = "n_speech" in span
    request = request or PassRequest(
        teacher=not speech, student=speech, logits=SPANS
    )
    prompts = model.prompts.build_batch(
        model._instructions(instructions, n, audio=speech),
        continuations=check_continuations(continuations, request, n),
        add_eot=_as_list(add_eot),
        **span,
    )
    return request, prompts, model.prompts.collate(prompts, device=model.device)


def _run_and_read(model, embeds, batch, prompts, request, plora_mask=None):
    """The LLM on one pass's embeddings, read at the requested spans."""
    final, layers = run_llm(
        model,
        embeds,
        batch,
        plora_mask,
        hidden_layers=hidden_layers(model, request),
        final=needs_final(request),
    )
    return read_pass(model, final, layers, batch, prompts, request)


def adapter_targets(model, transcripts, languages=None, token_spans=None):
    """What the adapter is told of a batch, and the transcripts' ids.

    Returns
    -------
    transcript_ids : torch.Tensor
        (B, N) LLM token ids of the transcripts (0 where masked).
    transcript_mask : torch.Tensor
        (B, N) bool.
    targets : speechbrain_blspkd.nnet.adapter.AdapterTargets
        The transcripts' token counts, the ``languages`` and the token
        timings ``token_spans`` (checked: one span per token).
    """
    ids = model.transcript_ids(transcripts)
    device = model.device
    transcript_ids, transcript_mask = _pad_ids(ids, device)
    targets = AdapterTargets(
        num_tokens=transcript_mask.sum(1),
        language=None if languages is None else languages.to(device),
        token_spans=_checked_spans(token_spans, transcript_mask),
    )
    return transcript_ids, transcript_mask, targets


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


def _as_list(flags):
    if isinstance(flags, torch.Tensor):
        return flags.tolist()
    return flags
