"""Whisper's log-mel front end, computed in torch.

The Whisper log-mel spectrogram computed on the input's device, for the
whole batch at once. It reproduces ``WhisperFeatureExtractor`` (which pads
every clip to 30 s first): a Hann window of 400 samples, hop 160, the Slaney
mel filters, log10 clamped at 1e-10, floored at the utterance maximum minus
8 and mapped with ``(x + 4) / 4``; frames are computed as if the clip were
followed by zeros, so the frames kept are the same as in the 30-s version
(see the tests).

:func:`whisper_log_mel` is the spectrogram of a batch;
:func:`_batch_log_mel` the frames the encoder
(:class:`~speechbrain_blspkd.nnet.whisper_encoder.WhisperEncoder`) and the
front end alone
(:class:`~speechbrain_blspkd.nnet.whisper_encoder.WhisperLogMel`) feed
Whisper's convolutions, padding zeroed and two silent frames after the
longest clip in the dynamic-length path.

Authors
 * speechbrain-blspkd contributors 2025
"""

import torch
from torch import nn

__all__ = ["CHUNK_SECONDS", "HOP", "N_FFT", "SAMPLE_RATE", "whisper_log_mel"]

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160
CHUNK_SECONDS = 30


def _mel_filters(n_mels, device):
    from transformers.audio_utils import mel_filter_bank

    filters = mel_filter_bank(
        num_frequency_bins=1 + N_FFT // 2,
        num_mel_filters=n_mels,
        min_frequency=0.0,
        max_frequency=SAMPLE_RATE / 2,
        sampling_rate=SAMPLE_RATE,
        norm="slaney",
        mel_scale="slaney",
    )
    return torch.tensor(filters, dtype=torch.float32, device=device).T


def whisper_log_mel(wavs, num_frames, n_mels=80, filters=None):
    """Whisper log-mel features of a batch, computed in torch.

    Arguments
    ---------
    wavs : torch.Tensor
        (B, S) 16-kHz waveforms, zero-padded on the right.
    num_frames : int
        Number of mel frames to return (e.g. 3000 for 30 s); the waveforms
        are zero-padded or cut to ``num_frames * 160`` samples.
    n_mels : int
        Number of mel bins (80, or 128 for large-v3).
    filters : torch.Tensor, optional
        (n_mels, 201) mel filter bank (computed when not given).

    Returns
    -------
    torch.Tensor
        (B, n_mels, num_frames) float32, equal to ``WhisperFeatureExtractor``
        output on the same clips (its first ``num_frames`` frames).  Always
        computed in float32: an enclosing autocast (bf16 training with
        features computed on the fly) is switched off here.

    Example
    -------
    >>> mel = whisper_log_mel(torch.randn(2, 16000) * 0.1, num_frames=100)
    >>> mel.shape
    torch.Size([2, 80, 100])
    >>> with torch.autocast("cpu", dtype=torch.bfloat16):
    ...     whisper_log_mel(torch.randn(1, 1600), num_frames=10).dtype
    torch.float32
    """
    device_type = wavs.device.type
    if torch.amp.is_autocast_available(device_type):
        with torch.autocast(device_type, enabled=False):
            return _log_mel_fp32(wavs, num_frames, n_mels, filters)
    return _log_mel_fp32(wavs, num_frames, n_mels, filters)


def _log_mel_fp32(wavs, num_frames, n_mels, filters):
    """:func:`whisper_log_mel` itself (float32, no autocast around it)."""
    wavs = wavs.to(torch.float32)
    if filters is None:
        filters = _mel_filters(n_mels, wavs.device)
    samples = num_frames * HOP
    if wavs.shape[1] >= samples:
        wavs = wavs[:, :samples]
    else:
        wavs = nn.functional.pad(wavs, (0, samples - wavs.shape[1]))
    # torch.stft(center=True) on the 30-s zero-padded clip = reflect on the
    # left, zeros on the right (the padding of the 30-s clip is silence).
    left = wavs[:, 1 : N_FFT // 2 + 1].flip(1)
    right = wavs.new_zeros(wavs.shape[0], N_FFT // 2)
    framed = torch.cat([left, wavs, right], dim=1)
    window = torch.hann_window(N_FFT, device=wavs.device)
    spec = torch.stft(
        framed,
        N_FFT,
        HOP,
        window=window,
        center=False,
        return_complex=True,
    )
    power = spec[..., :num_frames].abs() ** 2
    mel = filters.to(power.device, torch.float32) @ power
    log_spec = torch.clamp(mel, min=1e-10).log10()
    peak = log_spec.amax(dim=(1, 2), keepdim=True)
    log_spec = torch.maximum(log_spec, peak - 8.0)
    return (log_spec + 4.0) / 4.0


def _mel_frames(num_samples):
    """Mel frames holding clips of ``num_samples``: ceil(samples / 160)."""
    return torch.div(num_samples + HOP - 1, HOP, rounding_mode="floor")


def _batch_log_mel(wavs, wav_lens, n_mels, filters, max_frames, dynamic, who):
    """The log-mels :class:`WhisperEncoder` feeds its convolutions.

    Arguments
    ---------
    wavs : torch.Tensor
        (B, S) 16-kHz waveforms, zero-padded on the right, at most 30 s.
    wav_lens : torch.Tensor or None
        (B,) relative lengths (None: all full).
    n_mels : int
        Mel bins.
    filters : torch.Tensor
        (n_mels, 201) mel filter bank.
    max_frames : int
        Encoder positions of a 30-s window (1500).
    dynamic : bool
        Batch length (plus two silent mel frames) instead of 30 s.
    who : str
        Class name for the messages.

    Returns
    -------
    mel : torch.Tensor
        (B, n_mels, M) float32.
    mel_counts : torch.Tensor
        (B,) long: mel frames holding each clip.
    length : int
        Encoder positions to compute (the longest clip's frames, or 1500).
    """
    if wavs.dim() != 2:
        raise ValueError(
            f"{who}: `wavs` must be (B, samples), got {tuple(wavs.shape)}"
        )
    batch, samples = wavs.shape
    if wav_lens is None:
        wav_lens = torch.ones(batch, device=wavs.device)
    num_samples = torch.round(wav_lens.to(wavs.device) * samples).long()
    num_samples = num_samples.clamp(min=1, max=samples)
    max_samples = int(num_samples.max())
    limit = CHUNK_SECONDS * SAMPLE_RATE
    if max_samples > limit:
        raise ValueError(
            f"{who}: a clip of {max_samples / SAMPLE_RATE:.1f} s exceeds "
            f"Whisper's {CHUNK_SECONDS} s window; split it first"
        )
    mel_counts = _mel_frames(num_samples)
    out_frames = int(torch.div(mel_counts.max() + 1, 2, rounding_mode="floor"))
    if dynamic:
        # two extra (silent) mel frames: the convolutions at the end of
        # the longest clip see silence, as in the 30-s version, so a
        # clip's frames do not depend on the batch padding
        num_mel = min(2 * out_frames + 2, 2 * max_frames)
        length = out_frames
    else:
        num_mel = 2 * max_frames
        length = max_frames
    # zero the samples beyond each clip's length (padding may be garbage)
    positions = torch.arange(samples, device=wavs.device)
    wavs = wavs * (positions[None] < num_samples[:, None])
    mel = whisper_log_mel(wavs, num_mel, n_mels, filters)
    return mel, mel_counts, length
