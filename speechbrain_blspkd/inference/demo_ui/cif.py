"""What the CIF of a model did on one clip, for the demo page's plot.

For a model whose adapter integrates and fires (CIF): the weights over the
clip, scaled to the count it fired, the frame where each token fired and
the LLM token nearest to each fired embedding (:func:`cif_view`); and,
given Whisper's transcript and a Whisper decoder with alignment heads
(:func:`load_timing_teacher`), where each LLM token of the transcript
starts (:func:`transcript_timings`, by
:mod:`speechbrain_blspkd.dataprep.token_timings` on the model's own encoder
features of the clip).
"""

import dataclasses
import logging

import torch

logger = logging.getLogger(__name__)


def _printable(text):
    """A token as a plot label: visible characters only ("␣" for blanks)."""
    text = "".join(c if c.isprintable() else "?" for c in text).strip()
    return text or "␣"


def _adapter_output(llm, wav):
    model = llm.model
    if getattr(model, "adapter", None) is None:
        return None
    wavs = wav[None].to(llm.device, torch.float32)
    with torch.no_grad():
        return model.encode_speech(wavs, torch.ones(1, device=llm.device))


def fires_tokens(llm):
    """Whether the adapter of ``llm`` (a SpeechLLM) integrates and fires:
    half a second of silence goes through it and its output is looked at
    (False when that fails)."""
    try:
        rate = int(llm.hparams.sample_rate)
        out = _adapter_output(llm, torch.zeros(rate // 2))
    except Exception as err:  # a probe must not stop the demo
        logger.warning("CIF probe failed (%s); no CIF plot", err)
        return False
    return (
        out is not None
        and hasattr(out, "alphas")
        and hasattr(out, "frame_mask")
    )


@dataclasses.dataclass
class CifView:
    """What the CIF did on one clip (:func:`cif_view`).

    Attributes
    ----------
    feats, feat_lens : torch.Tensor
        (1, T, d) the model's encoder output for the clip, (1,) its
        relative length.
    alphas : torch.Tensor
        (frames,) CIF weights, scaled so that they sum to the token count
        (times the threshold).
    fires : list of int
        Frame of each fired token.
    words : list of str
        The LLM token nearest to each fired embedding, printable.
    frame_rate : float
        CIF frames per second.
    count : int
        Tokens fired.
    alpha_sum : float
        Sum of the weights before scaling.
    """

    feats: torch.Tensor
    feat_lens: torch.Tensor
    alphas: torch.Tensor
    fires: list
    words: list
    frame_rate: float
    count: int
    alpha_sum: float


def cif_view(llm, wav):
    """The CIF of ``llm`` (a SpeechLLM whose adapter fires) on ``wav``.

    Arguments
    ---------
    llm : SpeechLLM
        The model.
    wav : torch.Tensor
        (samples,) the clip.

    Returns
    -------
    CifView
    """
    from speechbrain_blspkd.nnet.cif import fire_positions
    from speechbrain_blspkd.nnet.whisper_encoder import WhisperEncoder

    wavs = wav[None].to(llm.device, torch.float32)
    with torch.no_grad():
        feats, feat_lens = llm.model.speech_features(
            wavs, torch.ones(1, device=llm.device)
        )
        out = llm.model.encode_speech(feats=feats, feat_lens=feat_lens)
    frames = out.frame_mask[0]
    alphas = out.alphas[0][frames].float().cpu()
    count = int(out.token_counts[0])
    threshold = float(getattr(llm.model.adapter, "threshold", 1.0))
    scaled = alphas * (count * threshold) / alphas.sum().clamp(min=1e-6)
    fires = fire_positions(scaled, threshold).tolist()
    tokens = out.tokens[0, :count].float()
    table, _ = llm.model.embedding_table(device=tokens.device)
    unit = torch.nn.functional.normalize(tokens, dim=-1)
    nearest = (unit @ table.T).argmax(-1)
    words = [
        _printable(llm.model.tokenizer.decode([int(t)]))
        for t in nearest.tolist()
    ]
    stride = float(getattr(llm.model.adapter, "frame_stride", 1) or 1)
    frame_rate = WhisperEncoder.frame_rate() / stride
    return CifView(
        feats=feats,
        feat_lens=feat_lens,
        alphas=scaled,
        fires=fires,
        words=words,
        frame_rate=frame_rate,
        count=count,
        alpha_sum=float(alphas.sum()),
    )


def load_timing_teacher(source, encoder, llm):
    """The Whisper decoder of ``source`` that times transcripts over the
    features of ``encoder`` (on ``llm``'s device), or None (logged) when
    it cannot be loaded, lists no alignment heads or is not the encoder's
    partner (another width)."""
    from speechbrain_blspkd.nnet import whisper_decoder

    why = None
    try:
        teacher = whisper_decoder.WhisperDecoderTeacher(source)
    except Exception as err:  # no decoder: the plot goes without marks
        teacher, why = None, f"its decoder cannot be loaded ({err})"
    if teacher is not None and not teacher.alignment_heads:
        teacher, why = None, "it lists no alignment heads"
    if teacher is not None and teacher.width != encoder.output_size:
        teacher, why = None, "its decoder is not the encoder's partner"
    if teacher is None:
        logger.info("CIF plot without token timings: %s: %s", source, why)
        return None
    logger.info("token timings on the CIF plot: Whisper decoder %s", source)
    return teacher.to(llm.device)


def transcript_timings(llm, teacher, feats, feat_lens, transcript, language):
    """Where each LLM token of ``transcript`` starts in the clip.

    Arguments
    ---------
    llm : SpeechLLM
        The model (its prompts and tokenizer).
    teacher : WhisperDecoderTeacher
        From :func:`load_timing_teacher`.
    feats : torch.Tensor
        (1, T, d) the model's encoder output for the clip.
    feat_lens : torch.Tensor or None
        (1,) its relative length.
    transcript : str
        Whisper's transcript of the clip.
    language : str
        The transcript's language.

    Returns
    -------
    timings : torch.Tensor or None
        (N, 2) seconds, one row per LLM token of the transcript (None when
        the transcript cannot be timed).
    labels : list of str or None
        The N tokens, printable.
    """
    from speechbrain_blspkd.nnet.token_alignment import (
        llm_token_spans,
        utterance_timings,
    )
    from speechbrain_blspkd.nnet.whisper_encoder import WhisperEncoder

    prompts = llm.model.prompts
    frames = feats.shape[1]
    if feat_lens is not None:
        frames = max(1, min(frames, round(float(feat_lens[0]) * frames)))
    row = {"ID": "clip", "transcript": transcript, "language": language}
    try:
        ids, _ = llm_token_spans(prompts, transcript)
        timings = utterance_timings(
            teacher,
            prompts,
            [feats[0, :frames].detach()],
            [row],
            WhisperEncoder.frame_rate(),
        )[0]
    except Exception as err:  # e.g. a transcript over the positions
        logger.warning("CIF plot without token timings: %s", err)
        return None, None
    labels = [_printable(llm.model.tokenizer.decode([i])) for i in ids]
    return timings, labels
