"""The LAD objective: language ID + DiVA's distillation terms.

Language-aware distillation (``docs/algorithms.md`` section 2.7) trains the
:class:`~speechbrain_blspkd.nnet.language_aware_qformer.LanguageAwareQFormer`
with

    L = w_lid L_LID + w_in L_IN + w_out L_OUT

* ``l_lid``: cross-entropy of the gate's language logits against the
  utterance language (``AdapterTargets.language``, the manifest's code as
  an index into the adapter's ``languages``);
* ``l_in`` and ``l_out``: DiVA's input-embedding and response-state terms,
  inherited unchanged from :class:`~speechbrain_blspkd.objectives.diva.
  DiVAObjective`.

The weights come from the YAML. In validation and test the gate's language
accuracy is reported as ``lid_acc``.

Authors
 * speechbrain-blspkd contributors 2026
"""

import torch.nn.functional as F

from speechbrain_blspkd.objectives.diva import DiVAObjective

__all__ = ["LADObjective"]


class LADObjective(DiVAObjective):
    """``l_lid`` (gate cross-entropy) + ``l_out`` + ``l_in`` (DiVA).

    Arguments
    ---------
    weights : dict, optional
        Weights of ``l_lid``, ``l_out`` and ``l_in`` (default 1 each).

    Example
    -------
    >>> import speechbrain as sb
    >>> import torch
    >>> from speechbrain_blspkd.nnet.language_aware_qformer import (
    ...     LanguageAwareQFormer)
    >>> from speechbrain_blspkd.testing import tiny_speech_llm
    >>> model = tiny_speech_llm(plora=None, adapter=LanguageAwareQFormer(
    ...     64, 64, ["en", "de"], num_queries=4, num_layers=1,
    ...     num_heads=4, ffn_size=128, gate_size=16))
    >>> objective = LADObjective()
    >>> out = model(["the cat"], ["sat."], wavs=torch.randn(1, 8000),
    ...     languages=torch.tensor([1]),
    ...     request=objective.request(sb.Stage.VALID))
    >>> loss, stats = objective(out, model, sb.Stage.VALID)
    >>> sorted(stats)
    ['l_in', 'l_lid', 'l_out', 'lid_acc', 'loss']
    """

    TERMS = ("l_lid", "l_out", "l_in")
    DEFAULT_WEIGHTS = {"l_lid": 1.0, "l_out": 1.0, "l_in": 1.0}

    def terms(self, outputs, model, stage):
        """DiVA's ``l_out`` and ``l_in``, and ``l_lid``."""
        terms = super().terms(outputs, model, stage)
        terms["l_lid"] = lambda: F.cross_entropy(
            self.language_logits(outputs), self.language_labels(outputs)
        )
        return terms

    def metrics(self, outputs, model, stage):
        """``lid_acc``: share of utterances whose gate argmax is right."""
        return {"lid_acc": lambda: self.lid_accuracy(outputs)}

    @classmethod
    def lid_accuracy(cls, outputs):
        """Fraction of the batch whose most likely language is the true one.

        Returns
        -------
        torch.Tensor
            Scalar float.
        """
        guess = cls.language_logits(outputs).argmax(-1)
        return (guess == cls.language_labels(outputs)).float().mean()

    @staticmethod
    def language_logits(outputs):
        """(B, K) float32 gate logits of the adapter's output."""
        logits = getattr(outputs.adapter, "language_logits", None)
        if logits is None:
            raise ValueError(
                "LADObjective: the adapter returned no language logits; use "
                "an adapter with a language gate (LanguageAwareQFormer)"
            )
        return logits.float()

    @staticmethod
    def language_labels(outputs):
        """(B,) long true language indices of the batch."""
        labels = outputs.targets.language
        if labels is None:
            raise ValueError(
                "LADObjective: the batch has no language labels; the "
                "adapter must declare its languages (language_codes) so "
                "that the manifest's languages reach it"
            )
        return labels.long()
