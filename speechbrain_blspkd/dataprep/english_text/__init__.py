"""English text of the SynthSpeech corpus: the command line
``python -m speechbrain_blspkd.dataprep.english_text --count`` (sentences
per source) or ``--coverage LLM`` (:mod:`.coverage`: the vocabulary
coverage of English plans).

The sources themselves are in
:mod:`~speechbrain_blspkd.dataprep.english_sources`; this package hands on
their names, so ``from speechbrain_blspkd.dataprep.english_text import
bible_sentences`` still works.
"""

from speechbrain_blspkd.dataprep.english_sources import *  # noqa: F403
from speechbrain_blspkd.dataprep.sentences import sentence_key as sentence_key
