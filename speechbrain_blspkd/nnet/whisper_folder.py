"""Reading a local transformers Whisper folder (no hub is contacted).

The encoder (:class:`~speechbrain_blspkd.nnet.whisper_encoder.
WhisperEncoder`) and DiVA's Q-Former
(:class:`~speechbrain_blspkd.nnet.qformer.QFormer`) start from the same
pretrained ``WhisperModel``; a folder without ``config.json`` is refused
with the command that fetches the asset.

Authors
 * speechbrain-blspkd contributors 2026
"""

import pathlib

__all__ = ["load_whisper_model"]


def load_whisper_model(folder, who):
    """The transformers ``WhisperModel`` saved in ``folder``.

    Arguments
    ---------
    folder : str or pathlib.Path
        A local transformers Whisper folder (e.g. the ``whisper-base``
        asset).
    who : str
        The caller's name, for the message.

    Returns
    -------
    transformers.WhisperModel

    Raises
    ------
    FileNotFoundError
        When ``folder`` holds no ``config.json``.

    Example
    -------
    >>> load_whisper_model("/nonexistent", "QFormer")
    Traceback (most recent call last):
    ...
    FileNotFoundError: QFormer: /nonexistent is not a transformers Whisper folder (no config.json); fetch it with `python -m speechbrain_blspkd.assets fetch whisper-base`
    """
    from transformers import WhisperModel

    folder = pathlib.Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{who}: {folder} is not a transformers Whisper folder (no "
            "config.json); fetch it with "
            "`python -m speechbrain_blspkd.assets fetch whisper-base`"
        )
    return WhisperModel.from_pretrained(str(folder))
