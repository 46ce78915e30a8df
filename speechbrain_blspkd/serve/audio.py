"""Decoding of the ``input_audio`` content parts of a chat request.

The base64 bytes are written to a temporary file and read by
:func:`speechbrain_blspkd.dataio.audio.load_audio`, the loader of
:meth:`SpeechLLM.generate_file
<speechbrain_blspkd.inference.speech_llm.SpeechLLM.generate_file>`, so a
clip sent to the server is the very waveform the Python interface answers
(same resampling, same channel averaging).

Example
-------
>>> import base64, io, numpy, soundfile
>>> buf = io.BytesIO()
>>> soundfile.write(buf, 0.1 * numpy.ones(1600, "float32"), 8000, format="WAV")
>>> wav = decode_audio(base64.b64encode(buf.getvalue()).decode(), "wav")
>>> wav.shape  # 0.2 s resampled to 16 kHz
torch.Size([3200])
>>> decode_audio("not base64!", "wav")
Traceback (most recent call last):
...
speechbrain_blspkd.serve.errors.ServeError: input_audio.data is not valid base64 (...)
"""

import base64
import binascii
import logging
import math
import os
import tempfile

from speechbrain_blspkd.serve.errors import ServeError

__all__ = ["FORMATS", "SILENCE_PEAK", "decode_audio"]

#: The ``input_audio.format`` values accepted.
FORMATS = ("wav", "mp3", "flac")

#: Peak level under which a clip counts as silence (-60 dBFS, as the
#: browser demo).
SILENCE_PEAK = 1e-3


def decode_audio(
    data,
    fmt,
    sample_rate=16000,
    max_seconds=None,
    max_bytes=None,
    param="input_audio",
):
    """The waveform of a base64 ``input_audio`` part, or a clear refusal.

    Arguments
    ---------
    data : str
        Base64 text (a ``data:audio/...;base64,`` prefix is allowed).
    fmt : str
        ``wav``, ``mp3`` or ``flac`` (the container libsndfile reads).
    sample_rate : int
        The model's rate (other rates are resampled).
    max_seconds : float, optional
        Longest clip accepted (the model's ``max_audio_seconds``).
    max_bytes : int, optional
        Largest decoded file accepted.
    param : str
        How the part is named in errors.

    Returns
    -------
    torch.Tensor
        (samples,) float32 at ``sample_rate``.

    Raises
    ------
    ServeError
        400: not base64, not audio, empty, silent, unknown format;
        413: too many bytes or seconds.
    """
    from speechbrain_blspkd.dataio.audio import AudioError, load_audio

    if fmt not in FORMATS:
        raise ServeError(
            400,
            f"{param}.format {fmt!r} is not supported (use one of "
            f"{', '.join(FORMATS)})",
            param=f"{param}.format",
            code="unsupported_format",
        )
    text = data.strip()
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    if max_bytes is not None and len(text) > math.ceil(max_bytes / 3) * 4:
        raise ServeError(
            413,
            f"{param}.data holds about {len(text) * 3 // 4} bytes; the "
            f"server takes at most {max_bytes} bytes of audio",
            param=f"{param}.data",
            code="audio_too_large",
        )
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ServeError(
            400,
            f"{param}.data is not valid base64 ({err})",
            param=f"{param}.data",
            code="invalid_base64",
        ) from None
    if not raw:
        raise ServeError(
            400,
            f"{param}.data is empty: no audio was sent",
            param=f"{param}.data",
            code="empty_audio",
        )
    fd, path = tempfile.mkstemp(suffix=f".{fmt}", prefix="blspkd-serve-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        level = logging.getLogger("speechbrain_blspkd.dataio.audio")
        old = level.level
        level.setLevel(logging.ERROR)  # no resampling warning per request
        try:
            wav = load_audio(path, sample_rate=sample_rate)
        finally:
            level.setLevel(old)
    except AudioError as err:
        reason = str(err).split(": ", 1)[-1]
        if "zero-length" in reason:
            raise ServeError(
                400,
                f"{param}: the {fmt} file holds no samples (empty audio)",
                param=f"{param}.data",
                code="empty_audio",
            ) from None
        raise ServeError(
            400,
            f"{param}: the data is not {fmt} audio the server can read "
            f"({reason})",
            param=f"{param}.data",
            code="invalid_audio",
        ) from None
    finally:
        os.unlink(path)
    seconds = wav.numel() / sample_rate
    if max_seconds is not None and seconds > float(max_seconds) + 1e-6:
        raise ServeError(
            413,
            f"{param}: the clip is {seconds:.1f} s long; the model takes at "
            f"most {float(max_seconds):g} s (split it first)",
            param=f"{param}.data",
            code="audio_too_long",
        )
    peak = float(wav.abs().max())
    if peak < SILENCE_PEAK:
        level = (
            "no signal"
            if peak == 0
            else f"peak {20 * math.log10(max(peak, 1e-12)):.0f} dBFS"
        )
        raise ServeError(
            400,
            f"{param}: the clip is silent ({level}); send audio with speech",
            param=f"{param}.data",
            code="silent_audio",
        )
    return wav
