"""Audio loading through soundfile, with the checks every entry point shares.

Training, decoding and :class:`speechbrain_blspkd.inference.SpeechLLM` all
load audio with :func:`load_audio`, so a bad file gets the same clear error
(or the same documented recovery) everywhere:

* missing, unreadable or corrupt file, zero-length audio: :class:`AudioError`
  naming the file;
* another sample rate: resampled to ``sample_rate`` with a warning;
* several channels: averaged to mono (logged once per file at debug level);
* longer than ``max_seconds``: :class:`AudioError` (Whisper's window is 30 s;
  split long recordings before use).
"""

import logging
import pathlib

import numpy as np
import soundfile as sf
import torch

logger = logging.getLogger(__name__)


class AudioError(ValueError):
    """An audio file cannot be used; the message names the file."""


def load_audio(path, sample_rate=16000, max_seconds=None):
    """Load ``path`` as a mono float32 waveform at ``sample_rate``.

    Arguments
    ---------
    path : str or pathlib.Path
        Audio file in any format libsndfile reads (wav, flac, ogg, mp3 ...).
    sample_rate : int
        Target rate; other rates are resampled with a warning.
    max_seconds : float, optional
        Refuse audio longer than this.

    Returns
    -------
    torch.Tensor
        Shape ``(samples,)``, float32.

    Example
    -------
    >>> import tempfile, pathlib, soundfile
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.wav"
    >>> soundfile.write(p, np.zeros((8000, 2), dtype="float32"), 8000)
    >>> load_audio(p).shape  # stereo 8 kHz -> mono 16 kHz
    torch.Size([16000])
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: audio file not found")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises several types
        raise AudioError(f"{path}: cannot read audio ({e})") from None
    if data.shape[0] == 0:
        raise AudioError(f"{path}: zero-length audio")
    if data.shape[1] > 1:
        logger.debug("%s: %d channels averaged to mono", path, data.shape[1])
        data = data.mean(axis=1, keepdims=True)
    wav = torch.from_numpy(np.ascontiguousarray(data[:, 0]))
    if not torch.isfinite(wav).all():
        raise AudioError(f"{path}: audio contains NaN or infinite samples")
    if sr != sample_rate:
        import torchaudio

        logger.warning(
            "%s: resampling from %d Hz to %d Hz", path, sr, sample_rate
        )
        wav = torchaudio.functional.resample(wav, sr, sample_rate)
    if max_seconds is not None and wav.numel() > max_seconds * sample_rate:
        raise AudioError(
            f"{path}: {wav.numel() / sample_rate:.1f} s is longer than the "
            f"{max_seconds:g} s the encoder accepts; split it first"
        )
    return wav


def load_row_audio(row, source=None, **kwargs):
    """:func:`load_audio` for a manifest row; errors also name the row.

    Training (the data pipeline and the feature cache), decoding and the
    evaluation read audio through this, so a broken clip stops the run
    with the manifest, the row ID and the file.

    Arguments
    ---------
    row : dict
        A manifest row with ``ID`` and ``wav``.
    source : str or pathlib.Path, optional
        The manifest the row comes from.
    **kwargs
        Passed to :func:`load_audio` (``sample_rate``, ``max_seconds``).

    Returns
    -------
    torch.Tensor
        The waveform :func:`load_audio` returns for ``row["wav"]``.

    Example
    -------
    >>> load_row_audio({"ID": "u7", "wav": "/nowhere/u7.wav"}, "train.csv")
    Traceback (most recent call last):
    ...
    speechbrain_blspkd.dataio.audio.AudioError: train.csv, row 'u7': /nowhere/u7.wav: audio file not found
    """
    try:
        return load_audio(row["wav"], **kwargs)
    except AudioError as e:
        where = f"{source}, " if source else ""
        raise AudioError(f"{where}row {row['ID']!r}: {e}") from None
