#!/usr/bin/env python3
"""BLSP-KD on SynthSpeech, the embedded generated corpus.

Usage::

    python train.py hparams/blsp_kd.yaml
    torchrun --nproc_per_node=2 train.py hparams/blsp_kd.yaml \
        --distributed_backend=gloo

The corpus is generated (espeak-ng), the teacher continuations written by
the LLM, the frozen encoder's features cached, then the model is trained
(alignment stage, then BLSP-KD), evaluated on the unseen-voice test split
and exported to ``<output_folder>/model`` for
``speechbrain_blspkd.inference.SpeechLLM.from_hparams``.
"""

import sys

from speechbrain_blspkd.recipe import run_recipe

if __name__ == "__main__":
    run_recipe(sys.argv[1:])
