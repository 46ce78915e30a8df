"""Does a speech LLM hear what was said?  One measurement, two test sets.

One command, meant to be run before and after every change that should
make the answers depend on the spoken content::

    python -m speechbrain_blspkd.hearing --model EXPORTED_FOLDER \\
        --synth-folder SYNTHSPEECH_FOLDER [--out results/hearing]

It measures an exported speech LLM (a folder of
:func:`~speechbrain_blspkd.inference.export.export_model`, or a run folder
holding one as ``model/``) on two English test sets:

* ``espeak_unseen_voices``: the English rows of the SynthSpeech test split
  (espeak-ng, voice variants held out from training);
* ``piper_unseen_engine``: the same held-out sentences (plus more held-out
  ones up to ``--piper-num``) spoken by piper, an engine the training never
  uses (:mod:`speechbrain_blspkd.dataprep.unseen_engine`, built on first
  use).

For each set and each system (the text teacher, the speech LLM, and the
cascade: Whisper-base transcribes, the same LLM answers the transcript)
it reports:

* agreement of the "repeat" and "continue" answers with the teacher's
  answer to the same instruction given the transcript as text (chrF, WER),
  beside the shuffled-pair level (the same answers scored against the
  teacher answers of other utterances), through
  :func:`speechbrain_blspkd.evaluation.decode_rows` and
  :func:`~speechbrain_blspkd.metrics.summarize_parity`;
* the WER of the "repeat" answer against the transcript;
* the exact-count rate and mean ``|N^ - N|`` of the speech tokens (for the
  cascade: of the LLM tokens of Whisper's transcript);
* nearest-token accuracy at the true count ``N`` (the adapter run with the
  transcript's token count, position ``i`` against transcript token ``i``)
  and at the **predicted** count ``N^`` (what inference feeds the LLM;
  :func:`speechbrain_blspkd.metrics.positional_token_accuracy`: a missing
  or extra token shifts every later position); for the cascade the tokens
  of Whisper's transcript against the true ones;
* the token error rate at the predicted count (the edit distance between
  those token sequences over the true tokens,
  :func:`speechbrain_blspkd.metrics.token_error_rate`: a missing or extra
  token is one error), for the speech LLM and the cascade alike;
* the cascade's transcript WER;

and, per set, the vocabulary coverage: the share of the test transcripts'
LLM tokens that occur in the training transcripts' LLM tokens
(:func:`speechbrain_blspkd.metrics.vocabulary_coverage`).

With ``--ladder``, each set also gets the **quality ladder**
(:func:`quality_ladder`): where the answer quality is lost between the
transcript and inference.  The speech LLM's own student path (its speech
prompt, PLoRA on the speech positions, the same batched greedy
generation, :func:`generate_from_embeddings`) answers the "repeat"
instruction on the same clips when fed, in place of the speech
embeddings:

a. the transcript's own LLM token embeddings;
b. the adapter's outputs at the true count ``N``, each snapped to its
   nearest LLM token embedding (cosine, as the nearest-token accuracy);
c. the adapter's outputs at the true count;
d. the adapter's outputs at the predicted count ``N^``, snapped;
e. the adapter's outputs at the predicted count: what inference does, so
   its answers are the speech row's ("repeat") answers, clip by clip
   (checked: ``e_matches_speech_rows``; a mismatch is noted under the
   table).

Each rung's answers are scored against the teacher's text answer (chrF,
WER, and the shuffled-pair level of the same answers).  a -> c is what the
adapter loses even when told the count, c -> e what the count prediction
loses, and b / d tell how much of it survives reading each embedding as
a token.  The ladder needs an adapter that emits one embedding per
transcript token when told the count (CIF, e.g. the CFormer); for the
others it is skipped with a note.  It is off by default: it decodes the
"repeat" task five more times per set (a cached re-measurement otherwise
decodes the speech LLM twice), and needs decoding (not with
``--tokens-only``).

Outputs in ``--out``: ``hearing.json`` and ``hearing.md`` (the tables; also
printed), written atomically, and per set the decoded rows
(``<set>/speech_rows.jsonl``, ``<set>/cascade_rows.jsonl``, and with
``--ladder`` ``<set>/ladder_rows.jsonl``: per clip the teacher's answer
and each rung's).  What does not
change between two measurements is cached in ``--cache-dir``: the teacher
answers (keyed by a fingerprint of the LLM weights, the prompts, the
instructions and the generation limit, each answer checked against its
transcript) and the cascade's rows and transcripts (keyed also by the
recogniser's weights and by the test rows with a hash of each audio file).

The package, by concept:

* :mod:`~speechbrain_blspkd.hearing.sets`: the two test sets and the tasks;
* :mod:`~speechbrain_blspkd.hearing.batches`: the rows in encoded batches;
* :mod:`~speechbrain_blspkd.hearing.tokens`: the nearest-token accuracy;
* :mod:`~speechbrain_blspkd.hearing.ladder`: the quality ladder;
* :mod:`~speechbrain_blspkd.hearing.cascade`: the Whisper cascade;
* :mod:`~speechbrain_blspkd.hearing.cache`: what is kept between runs;
* :mod:`~speechbrain_blspkd.hearing.measure`: the measurement itself;
* :mod:`~speechbrain_blspkd.hearing.report`: the markdown tables;
* :mod:`~speechbrain_blspkd.hearing.cli`: the command line (``__main__``).

Authors
 * speechbrain-blspkd contributors 2026
"""

from speechbrain_blspkd.hearing.cache import CACHE_VERSION
from speechbrain_blspkd.hearing.cascade import build_cascade
from speechbrain_blspkd.hearing.cli import build_parser, main
from speechbrain_blspkd.hearing.ladder import (
    LADDER_RUNGS,
    generate_from_embeddings,
    quality_ladder,
)
from speechbrain_blspkd.hearing.measure import (
    measure,
    measure_set,
    resolve_model_folder,
)
from speechbrain_blspkd.hearing.report import format_tables, ladder_table
from speechbrain_blspkd.hearing.sets import (
    DEFAULT_TASKS,
    ESPEAK_SET,
    PIPER_SET,
    SET_TITLES,
)
from speechbrain_blspkd.hearing.tokens import adapter_token_accuracy

__all__ = [
    "CACHE_VERSION",
    "DEFAULT_TASKS",
    "ESPEAK_SET",
    "LADDER_RUNGS",
    "PIPER_SET",
    "SET_TITLES",
    "adapter_token_accuracy",
    "build_cascade",
    "build_parser",
    "format_tables",
    "generate_from_embeddings",
    "ladder_table",
    "main",
    "measure",
    "measure_set",
    "quality_ladder",
    "resolve_model_folder",
]
