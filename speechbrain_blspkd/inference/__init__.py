"""Inference with trained speech LLMs (SpeechBrain ``Pretrained`` style).

* :class:`SpeechLLM` (``speechbrain_blspkd.inference.speech_llm``): load an
  exported folder with ``SpeechLLM.from_hparams(source=FOLDER)`` and answer
  audio files, batches or transcripts.
* ``speechbrain_blspkd.inference.model_folder``: what an exported folder
  holds (file names, the ``hyperparams.yaml`` values and their defaults)
  and ``check_model_folder``.
* ``speechbrain_blspkd.inference.export``: write such a folder
  (``export_model``; the values read off a model by ``model_config``) and
  the wiring its ``hyperparams.yaml`` builds the model with.
* ``speechbrain_blspkd.inference.model_card``: the folder's ``README.md``,
  the template ``model_card.md`` filled from ``card_sections`` and the
  training run (``training_run``).
* ``blspkd-infer`` (``speechbrain_blspkd.inference.cli``): the command
  line; its inputs (``batch_inputs``) and answers file (``answers_file``).
* ``blspkd-demo-ui`` (``speechbrain_blspkd.inference.demo_ui``): the
  browser demo.

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
