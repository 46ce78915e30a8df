"""Inference with trained speech LLMs (SpeechBrain ``Pretrained`` style).

* :class:`SpeechLLM` (``speechbrain_blspkd.inference.speech_llm``): load an
  exported folder with ``SpeechLLM.from_hparams(source=FOLDER)`` and answer
  audio files, batches or transcripts.
* ``speechbrain_blspkd.inference.export``: write such a folder
  (``export_model``) and resolve base-model sources.
* ``blspkd-infer`` (``speechbrain_blspkd.inference.cli``): the command line.

Imports are lazy: ``import speechbrain_blspkd.inference`` loads neither
speechbrain nor transformers until :class:`SpeechLLM` is used.
"""

__all__ = ["SpeechLLM"]


def __getattr__(name):
    if name == "SpeechLLM":
        from speechbrain_blspkd.inference.speech_llm import SpeechLLM

        return SpeechLLM
    raise AttributeError(
        f"module 'speechbrain_blspkd.inference' has no attribute {name!r}"
    )
