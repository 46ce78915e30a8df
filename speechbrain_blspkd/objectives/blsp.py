"""The BLSP objective: continuation writing from speech.

BLSP (bootstrapping language-speech pre-training) trains only the adapter
(encoder and LLM frozen) so that, given the speech, the LLM writes the
continuation it wrote for the transcript: cross-entropy of the student on
the teacher continuation tokens (``docs/algorithms.md`` section 2.7).  The
continuation is the LLM's own answer to "Continue the following text ..."
on the transcript, written offline by the recipe.

Authors
 * speechbrain-blspkd contributors 2026
"""

from speechbrain_blspkd.losses import response_ce
from speechbrain_blspkd.models.passes import PassRequest
from speechbrain_blspkd.objectives.base import Objective

__all__ = ["BLSPObjective"]


class BLSPObjective(Objective):
    """Cross-entropy on the teacher continuation given the speech.

    Arguments
    ---------
    weights : dict, optional
        ``{"response_ce": w}`` (default 1).

    Example
    -------
    >>> import speechbrain as sb
    >>> import torch
    >>> from speechbrain_blspkd.nnet.conv_subsampler import ConvSubsampler
    >>> from speechbrain_blspkd.testing import tiny_speech_llm
    >>> model = tiny_speech_llm(adapter=ConvSubsampler(64, 64, bottleneck=16),
    ...     plora=None)
    >>> objective = BLSPObjective()
    >>> out = model(["the cat"], ["sat."], wavs=torch.randn(1, 8000),
    ...     request=objective.request(sb.Stage.TRAIN))
    >>> out.teacher is None
    True
    >>> loss, stats = objective(out, model, sb.Stage.TRAIN)
    >>> sorted(stats)
    ['loss', 'response_ce']
    """

    TERMS = ("response_ce",)
    DEFAULT_WEIGHTS = {"response_ce": 1.0}

    def request(self, stage):
        """The student pass with logits at the response positions."""
        return PassRequest(student=True, response=True, logits=("response",))

    def terms(self, outputs, model, stage):
        """``response_ce``."""
        student = outputs.student
        return {
            "response_ce": lambda: response_ce(
                student.logits["response"],
                student.response_targets,
                student.masks["response"],
            )
        }
