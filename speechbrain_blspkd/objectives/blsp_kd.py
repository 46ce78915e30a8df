"""The BLSP-KD objective: distil the LLM's text behaviour into speech.

Teacher: the LLM with PLoRA off on the transcript; student: the LLM with
PLoRA on the adapter's speech embeddings (``docs/algorithms.md`` section
2.4).  The terms, each with a weight in the YAML (weight 0: not computed):

* ``input_kl``: forward KL(p_T || p_S) of the next-token distributions at
  the N transcript positions against the N speech positions (needs an
  adapter that emits one embedding per transcript token: the CIF-based
  CFormer);
* ``response_kl``: the same KL at every position that predicts a
  continuation token, the first one (from the last prompt position)
  included;
* ``response_ce``: cross-entropy of the student on the continuation;
* ``cif``: the CIF quantity loss mean_b |sum_t alpha_bt / N_b - 1|;
* ``timing``: where the CIF weights fire against where the token timings
  say each token is (:func:`~speechbrain_blspkd.nnet.cif.timing_loss`:
  the mean distance in frames between the running sums of the predicted
  and the target weights; needs ``token_timings_folder`` in the recipe;
  weight 0, the paper's configuration, leaves the quantity loss alone);
* ``align``: the adapter outputs at the N CIF positions pulled towards the
  LLM embeddings of the transcript tokens
  (:func:`~speechbrain_blspkd.objectives.alignment.alignment_loss`; no LLM
  pass; cross-entropy over
  cosine logits against the whole embedding table, ``1 - cos`` and MSE
  over the embedding variance; section 2.9); ``align_negatives`` restricts
  the cross-entropy to the batch's tokens plus that many random ones (a
  sampled softmax, much cheaper than all V).

The teacher runs online in every step (``teacher="online"``, default) or
is read from a stored top-k cache (``teacher="offline"``: the top-k
teacher log-probs written once by
:mod:`speechbrain_blspkd.dataprep.teacher_topk`, the KL terms computed by
:func:`~speechbrain_blspkd.losses.kd_kl_topk`; training only, validation
and test keep the online teacher, so their KL is the exact one).

A stage with only ``cif`` and ``align`` weights runs no LLM pass (the
alignment stage); in validation and test the KL terms are still reported
when ``eval_kl`` is set, and the nearest-token accuracy of the adapter
outputs is always reported (``token_acc``).

Authors
 * speechbrain-blspkd contributors 2026
"""

import speechbrain as sb
import torch

from speechbrain_blspkd.losses import kd_kl, kd_kl_topk, response_ce
from speechbrain_blspkd.models.passes import PassRequest
from speechbrain_blspkd.nnet.cif import quantity_loss, timing_loss
from speechbrain_blspkd.objectives.alignment import (
    alignment_loss,
    nearest_token_accuracy,
    predicted_count_accuracy,
)
from speechbrain_blspkd.objectives.base import Objective

__all__ = ["BLSPKDObjective"]

LLM_TERMS = ("input_kl", "response_kl", "response_ce")


class BLSPKDObjective(Objective):
    """BLSP-KD: input/response KL, response CE, quantity and alignment.

    Arguments
    ---------
    weights : dict
        Weights of ``input_kl``, ``response_kl``, ``response_ce``, ``cif``,
        ``align`` (missing: 0).
    temperature : float
        KD temperature tau (p = softmax(z / tau)).
    align_temperature : float
        Temperature of the alignment term's cosine logits.
    eval_kl : bool
        Report ``input_kl`` and ``response_kl`` in validation and test even
        when their weight is 0 (runs the LLM passes there).
    scale_by_t2 : bool
        Multiply the KL terms by tau^2 (Hinton's scaling).
    teacher : str
        ``"online"`` (the teacher pass runs in every training step) or
        ``"offline"`` (training reads the teacher's stored top-k log-probs
        from ``teacher_cache``; validation and test run it online).
    teacher_cache : str, optional
        The stored teacher's folder (``teacher="offline"``).
    teacher_topk : int
        The k the stored teacher must have (a cache of another k is
        refused).
    topk_student_norm : str
        How the offline KL normalises the student
        (:func:`~speechbrain_blspkd.losses.kd_kl_topk`): ``"full"``
        (default; log-softmax over the whole vocabulary, read at the
        teacher's top-k) or ``"topk"`` (renormalised over those k).
    align_negatives : int, optional
        Sampled softmax of the ``align`` cross-entropy: the batch's tokens
        plus this many random ones (None: the whole embedding table).
    predicted_count_fraction : float
        Share of the training batches in which a CIF adapter fires the
        count it predicts instead of the transcript's (a
        :class:`~speechbrain_blspkd.models.speech_llm.PassRequest` with
        ``predicted_count``), so that the LLM (PLoRA) learns to answer
        from speech tokens with count errors, as at inference.  Those
        batches have no one-to-one input positions: ``input_kl`` and
        ``align`` are left out of them, the response terms, the quantity
        and timing losses stay.  Needs a weighted response term.  0: never.

    Example
    -------
    >>> from speechbrain_blspkd.testing import tiny_speech_llm
    >>> model = tiny_speech_llm()
    >>> objective = BLSPKDObjective({"input_kl": 1.0, "response_kl": 1.0,
    ...     "cif": 1.0})
    >>> out = model(["the cat"], ["sat."], wavs=torch.randn(1, 8000),
    ...     request=objective.request(sb.Stage.TRAIN))
    >>> loss, stats = objective(out, model, sb.Stage.TRAIN)
    >>> sorted(stats)
    ['cif', 'input_kl', 'loss', 'response_kl']
    """

    TERMS = (
        "input_kl",
        "response_kl",
        "response_ce",
        "cif",
        "timing",
        "align",
    )
    DEFAULT_WEIGHTS = {"input_kl": 1.0, "response_kl": 1.0, "cif": 1.0}

    def __init__(
        self,
        weights=None,
        temperature=2.0,
        align_temperature=0.05,
        eval_kl=True,
        scale_by_t2=False,
        teacher="online",
        teacher_cache=None,
        teacher_topk=64,
        topk_student_norm="full",
        align_negatives=None,
        predicted_count_fraction=0.0,
    ):
        super().__init__(weights)
        if temperature <= 0 or align_temperature <= 0:
            raise ValueError("BLSPKDObjective: temperatures must be > 0")
        if teacher not in ("online", "offline"):
            raise ValueError(
                f"BLSPKDObjective: teacher must be 'online' or 'offline', got "
                f"{teacher!r}"
            )
        if teacher == "offline" and not teacher_cache:
            raise ValueError(
                "BLSPKDObjective: teacher 'offline' needs `teacher_cache` (the "
                "folder of the stored top-k teacher)"
            )
        if topk_student_norm not in ("full", "topk"):
            raise ValueError(
                "BLSPKDObjective: topk_student_norm must be 'full' or 'topk', "
                f"got {topk_student_norm!r}"
            )
        self.temperature = float(temperature)
        self.align_temperature = float(align_temperature)
        self.predicted_count_fraction = float(predicted_count_fraction)
        if not 0.0 <= self.predicted_count_fraction <= 1.0:
            raise ValueError(
                "BLSPKDObjective: predicted_count_fraction must be in "
                f"[0, 1], got {predicted_count_fraction}"
            )
        if self.predicted_count_fraction > 0 and not (
            self.active("response_kl") or self.active("response_ce")
        ):
            raise ValueError(
                "BLSPKDObjective: predicted_count_fraction needs a weighted "
                "response term (response_kl or response_ce): the batches at "
                "the predicted count have nothing else to learn from"
            )
        self.align_negatives = (
            None if align_negatives is None else int(align_negatives)
        )
        self.eval_kl = bool(eval_kl)
        self.scale_by_t2 = bool(scale_by_t2)
        self.teacher = teacher
        self.teacher_cache = teacher_cache
        self.teacher_topk = int(teacher_topk)
        self.topk_student_norm = topk_student_norm

    def _offline(self, stage):
        """Whether ``stage`` reads the stored teacher (offline training)."""
        return self.teacher == "offline" and stage == sb.Stage.TRAIN

    def request(self, stage):
        """LLM passes only where a weighted term (or ``eval_kl``) needs one;
        no teacher pass where the stored teacher is read."""
        evaluating = stage is not None and stage != sb.Stage.TRAIN
        kl = self.active("input_kl") or self.active("response_kl")
        kl = kl or (evaluating and self.eval_kl)
        student = kl or self.active("response_ce")
        if not student:
            return PassRequest()
        if (
            stage == sb.Stage.TRAIN
            and self.predicted_count_fraction > 0
            and float(torch.rand(())) < self.predicted_count_fraction
        ):
            return PassRequest(
                teacher=self.active("response_kl") and not self._offline(stage),
                student=True,
                response=True,
                logits=("response",),
                predicted_count=True,
            )
        return PassRequest(
            teacher=kl and not self._offline(stage),
            student=True,
            response=True,
            logits=("input", "response") if kl else ("response",),
        )

    def data_keys(self):
        """``("teacher_topk",)`` with the offline teacher."""
        return ("teacher_topk",) if self.teacher == "offline" else ()

    def data_items(self, model, dataset, source=None):
        """With the offline teacher: the item that reads each utterance's
        stored teacher, after checking the cache against ``model`` (LLM,
        tokenizer, prompt, k: :class:`~speechbrain_blspkd.dataprep.
        teacher_cache.StaleTeacherCacheError` otherwise) and every row of
        ``dataset`` (present, text unchanged)."""
        if self.teacher != "offline":
            return []
        from speechbrain_blspkd.dataprep.teacher_cache import TopKTeacherCache
        from speechbrain_blspkd.dataprep.teacher_identity import (
            teacher_settings,
        )

        if model is None:
            raise ValueError(
                "BLSPKDObjective: the offline teacher needs the model to "
                "check its cache"
            )
        cache = TopKTeacherCache(
            self.teacher_cache, teacher_settings(model, self.teacher_topk)
        )
        cache.check_rows(
            [dict(dataset.data[uid], ID=uid) for uid in dataset.data_ids],
            source,
        )

        @sb.utils.data_pipeline.takes("id")
        @sb.utils.data_pipeline.provides("teacher_topk")
        def stored_teacher(uid):
            return cache.get(uid)

        return [stored_teacher]

    def _stored(self, outputs, span, mask):
        """The batch's stored teacher at ``span`` as ``(B, P, k)`` tensors
        laid out like the student's ``mask``."""
        rows = outputs.data.get("teacher_topk")
        if rows is None:
            raise ValueError(
                "BLSPKDObjective: teacher 'offline' needs the batch item "
                "'teacher_topk' (dataio_prepare adds it through data_items)"
            )
        if len(rows) != mask.shape[0]:
            raise ValueError(
                f"BLSPKDObjective: {len(rows)} stored teachers for a batch "
                f"of {mask.shape[0]}"
            )
        counts = mask.sum(1).tolist()
        k = rows[0].k
        logp = torch.zeros(*mask.shape, k, dtype=torch.float32)
        idx = torch.zeros(*mask.shape, k, dtype=torch.long)
        for b, row in enumerate(rows):
            values, indices = row.span(span)
            if values.shape[0] != counts[b] or row.k != k:
                raise ValueError(
                    f"BLSPKDObjective: the stored teacher of batch row {b} "
                    f"has {values.shape[0]} {span} positions of top-{row.k}, "
                    f"the student {counts[b]} of top-{k}; the cache was "
                    "written for other prompts"
                )
            logp[b, : counts[b]] = values.float()
            idx[b, : counts[b]] = indices.long()
        return logp.to(mask.device), idx.to(mask.device)

    def _kl_offline(self, outputs, span):
        student = outputs.student
        mask = student.masks[span]
        if span == "input":
            wanted = outputs.transcript_mask.sum(1).to(mask.device)
            if not torch.equal(mask.sum(1), wanted):
                raise ValueError(
                    "BLSPKDObjective: input_kl needs as many speech "
                    "embeddings as transcript tokens (a CIF adapter); got "
                    f"{mask.sum(1).tolist()} vs {wanted.tolist()}"
                )
        logp, idx = self._stored(outputs, span, mask)
        return kd_kl_topk(
            student.logits[span],
            logp,
            idx,
            mask,
            self.temperature,
            self.scale_by_t2,
            self.topk_student_norm,
        )

    def _kl(self, outputs, span):
        if outputs.teacher is None:
            return self._kl_offline(outputs, span)
        student, teacher = outputs.student, outputs.teacher
        if not torch.equal(student.masks[span], teacher.masks[span]):
            raise ValueError(
                f"BLSPKDObjective: {span}_kl needs as many speech "
                "embeddings as transcript tokens (a CIF adapter); got "
                f"student {tuple(student.logits[span].shape[:2])} vs teacher "
                f"{tuple(teacher.logits[span].shape[:2])}"
            )
        return kd_kl(
            student.logits[span],
            teacher.logits[span],
            teacher.masks[span],
            self.temperature,
            self.scale_by_t2,
        )

    def terms(self, outputs, model, stage):
        """Each term as a callable (computed only when weighted)."""
        terms = {}
        stored = outputs.student is not None and "teacher_topk" in outputs.data
        # a batch at the predicted count (PassRequest.predicted_count):
        # its student pass returns no input span
        predicted = (
            outputs.student is not None
            and "input" not in outputs.student.logits
            and (self.active("input_kl") or self.active("align"))
        )
        if outputs.teacher is not None or stored:
            terms["input_kl"] = lambda: (
                None if predicted else self._kl(outputs, "input")
            )
            terms["response_kl"] = lambda: self._kl(outputs, "response")
        if outputs.student is not None:
            student = outputs.student
            terms["response_ce"] = lambda: response_ce(
                student.logits["response"],
                student.response_targets,
                student.masks["response"],
            )
        adapter = outputs.adapter
        if hasattr(adapter, "alphas"):
            terms["cif"] = lambda: quantity_loss(
                adapter.alphas, adapter.frame_mask, outputs.targets.num_tokens
            )
            terms["timing"] = lambda: self._timing(adapter, outputs, stage)
        terms["align"] = lambda: (
            None
            if predicted
            else alignment_loss(
                model,
                adapter,
                outputs.transcript_ids,
                self.align_temperature,
                outputs.transcript_mask,
                negatives=self.align_negatives,
            )[0]
        )
        return terms

    def _timing(self, adapter, outputs, stage):
        """The ``timing`` term; None in validation and test when the rows
        carry no timings."""
        target = getattr(adapter, "target_alphas", None)
        if target is None:
            if stage is not None and stage != sb.Stage.TRAIN:
                return None
            raise ValueError(
                "BLSPKDObjective: the timing term needs token timings: set "
                "token_timings_folder in the recipe (dataprep.token_timings)"
            )
        return timing_loss(
            adapter.alphas,
            target,
            adapter.frame_mask,
            outputs.targets.num_tokens,
        )

    def stat_counts(self, outputs):
        """Positions behind each statistic: the KL and CE terms are means
        over the distilled positions, the alignment term and the token
        accuracy over the transcript tokens (the quantity loss: per
        utterance)."""
        counts = {}
        side = (
            outputs.teacher if outputs.teacher is not None else outputs.student
        )
        if side is not None:
            for span, name in (
                ("input", "input_kl"),
                ("response", "response_kl"),
            ):
                if span in side.masks:
                    counts[name] = int(side.masks[span].sum())
            if "response" in side.masks:
                counts["response_ce"] = int(side.masks["response"].sum())
        tokens = int(outputs.transcript_mask.sum())
        counts["align"] = counts["token_acc"] = tokens
        counts["token_acc_pred"] = tokens
        return counts

    def metrics(self, outputs, model, stage):
        """KL values (when the passes ran) and the token accuracy; the
        input KL and the token accuracy only for an adapter that emitted
        one embedding per transcript token."""
        values = {}
        aligned = torch.equal(
            outputs.adapter.token_counts.cpu(),
            outputs.transcript_mask.sum(1).cpu(),
        )
        if outputs.teacher is not None and outputs.student is not None:
            values["response_kl"] = lambda: self._kl(outputs, "response")
            if aligned:
                values["input_kl"] = lambda: self._kl(outputs, "input")
        if aligned:
            values["token_acc"] = lambda: nearest_token_accuracy(
                model,
                outputs.adapter,
                outputs.transcript_ids,
                outputs.transcript_mask,
            )
        if hasattr(outputs.adapter, "alphas") and outputs.feats is not None:
            values["token_acc_pred"] = lambda: predicted_count_accuracy(
                model, outputs
            )
        return values
