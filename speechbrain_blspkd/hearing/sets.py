"""What the hearing measurement measures: its two English test sets and
its tasks.

Authors
 * speechbrain-blspkd contributors 2026
"""

from speechbrain_blspkd.dataio.manifest import read_manifest
from speechbrain_blspkd.evaluation import REPEAT_INSTRUCTION

#: The evaluation instructions (None: the model's own instruction, the
#: continuation prompt of the recipes).
DEFAULT_TASKS = {
    "repeat": REPEAT_INSTRUCTION,
    "continue": None,
}
ESPEAK_SET = "espeak_unseen_voices"
PIPER_SET = "piper_unseen_engine"
SET_TITLES = {
    ESPEAK_SET: "espeak-ng, unseen voices (SynthSpeech test split, English)",
    PIPER_SET: "piper, unseen engine (held-out English sentences)",
}


def tasks_of(model, tasks):
    """``tasks`` with each None instruction replaced by the model's own."""
    return {
        k: (model.instruction if v is None else v) for k, v in tasks.items()
    }


def english_rows(manifest, data_root, max_utterances):
    """The English rows of a manifest (the first ``max_utterances``)."""
    rows = [
        r
        for r in read_manifest(manifest, data_root=data_root)
        if r["language"] == "en"
    ]
    if not rows:
        raise ValueError(f"{manifest}: no English rows")
    return rows[: int(max_utterances)] if max_utterances else rows
