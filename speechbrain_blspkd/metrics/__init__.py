"""Evaluation metrics shared by every system, by kind: ``text``
(normalisation, tokens), ``agreement`` (WER, BLEU, chrF, parity, QA),
``tokens`` (counts, nearest tokens), ``confusion`` (the language gate) and
``summary`` (per-utterance rows, corpus summaries, their tables).
"""

from speechbrain_blspkd.metrics.agreement import (  # noqa: F401
    bleu,
    chrf,
    derangement,
    parity_agreement,
    spoken_qa_accuracy,
    wer,
)
from speechbrain_blspkd.metrics.confusion import (  # noqa: F401
    confusion_from_stats,
    format_confusion,
)
from speechbrain_blspkd.metrics.summary import (  # noqa: F401
    EvalSummary,
    format_summary,
    summarize_parity,
)
from speechbrain_blspkd.metrics.text import (  # noqa: F401
    CHARACTER_LANGUAGES,
    is_character_language,
    normalize_text,
    tokenize,
)
from speechbrain_blspkd.metrics.tokens import (  # noqa: F401
    collapse_rate,
    count_stats,
    exact_count_rate,
    mean_abs_count_error,
    nearest_token_accuracy,
    nearest_tokens,
    positional_token_accuracy,
    token_error_rate,
    vocabulary_coverage,
)
