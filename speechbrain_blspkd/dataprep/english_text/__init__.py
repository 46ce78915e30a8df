"""English text of the SynthSpeech corpus: the sentence sources beyond the
core fortunes (:mod:`.sources`, whose names this package hands on), the
vocabulary coverage of English plans (:mod:`.coverage`) and the command
line (``python -m speechbrain_blspkd.dataprep.english_text --count``).
"""

from speechbrain_blspkd.dataprep.english_text.sources import *  # noqa: F403
from speechbrain_blspkd.dataprep.sentences import sentence_key as sentence_key
