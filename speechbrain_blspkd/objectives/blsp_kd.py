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
* ``align``: the adapter outputs at the N CIF positions pulled towards the
  LLM embeddings of the transcript tokens (no LLM pass; cross-entropy over
  cosine logits against the whole embedding table, ``1 - cos`` and MSE
  over the embedding variance; section 2.9).

A stage with only ``cif`` and ``align`` weights runs no LLM pass (the
alignment stage); in validation and test the KL terms are still reported
when ``eval_kl`` is set, and the nearest-token accuracy of the adapter
outputs is always reported (``token_acc``).

Authors
 * speechbrain-blspkd contributors 2026
"""

import speechbrain as sb
import torch
import torch.nn.functional as F

from speechbrain_blspkd.losses import kd_kl, response_ce
from speechbrain_blspkd.models.speech_llm import PassRequest
from speechbrain_blspkd.nnet.cif import quantity_loss
from speechbrain_blspkd.objectives.base import Objective

__all__ = ["BLSPKDObjective", "alignment_loss", "nearest_token_accuracy"]

LLM_TERMS = ("input_kl", "response_kl", "response_ce")


def _aligned(output, transcript_ids, transcript_mask=None):
    """Predictions and targets at the positions an aligned adapter filled."""
    mask = output.token_mask
    counts = output.token_counts.tolist()
    wanted = counts
    if transcript_mask is not None:
        wanted = transcript_mask.sum(1).tolist()
    if mask.shape[1] > transcript_ids.shape[1] or counts != wanted:
        raise ValueError(
            "alignment: the adapter must emit one embedding per transcript "
            f"token (a CIF adapter); it emitted {counts} for transcripts of "
            f"{wanted} tokens"
        )
    ids = transcript_ids.to(mask.device)[:, : mask.shape[1]][mask]
    return output.tokens[mask].float(), ids


def alignment_loss(
    model, output, transcript_ids, temperature=0.05, transcript_mask=None
):
    """Pull an aligned adapter's outputs towards the transcript embeddings.

    Arguments
    ---------
    model : speechbrain_blspkd.models.speech_llm.SpeechLLMModel
        Gives the embedding table.
    output : speechbrain_blspkd.nnet.adapter.AdapterOutput
        Produced with the transcript token counts (position i is token i).
    transcript_ids : torch.Tensor
        (B, N) target ids.
    temperature : float
        Temperature of the cosine logits.
    transcript_mask : torch.Tensor, optional
        (B, N) bool; when given, each row's embedding count must equal its
        transcript length.

    Returns
    -------
    loss : torch.Tensor
        ``ce + (1 - cos) + mse / var`` (a scalar).
    accuracy : torch.Tensor
        Nearest-token accuracy (no grad).

    Example
    -------
    >>> from speechbrain_blspkd.nnet.adapter import AdapterTargets
    >>> from speechbrain_blspkd.utils.testing import tiny_speech_llm
    >>> model = tiny_speech_llm(whisper=False)
    >>> out = model.adapter(torch.randn(2, 20, 64),
    ...     targets=AdapterTargets(torch.tensor([3, 2])))
    >>> loss, acc = alignment_loss(model, out, torch.tensor([[5, 6, 7], [8, 9, 0]]))
    >>> bool(loss > 0), 0 <= float(acc) <= 1
    (True, True)
    """
    pred, ids = _aligned(output, transcript_ids, transcript_mask)
    table, var = model.embedding_table(pred.device)
    with torch.no_grad():
        target = model.embed_tokens(ids).float()
    logits = F.normalize(pred, dim=-1) @ table.T
    ce = F.cross_entropy(logits / temperature, ids)
    cos = (1 - F.cosine_similarity(pred, target, dim=-1)).mean()
    mse = ((pred - target) ** 2).mean() / var
    accuracy = (logits.detach().argmax(-1) == ids).float().mean()
    return ce + cos + mse, accuracy


@torch.no_grad()
def nearest_token_accuracy(model, output, transcript_ids, transcript_mask=None):
    """Share of aligned adapter outputs whose nearest embedding (cosine) is
    the transcript token at their position.

    Returns
    -------
    float
    """
    pred, ids = _aligned(output, transcript_ids, transcript_mask)
    if ids.numel() == 0:
        return 0.0
    table, _ = model.embedding_table(pred.device)
    nearest = (F.normalize(pred, dim=-1) @ table.T).argmax(-1)
    return float((nearest == ids).float().mean())


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

    Example
    -------
    >>> from speechbrain_blspkd.utils.testing import tiny_speech_llm
    >>> model = tiny_speech_llm()
    >>> objective = BLSPKDObjective({"input_kl": 1.0, "response_kl": 1.0,
    ...     "cif": 1.0})
    >>> out = model(["the cat"], ["sat."], wavs=torch.randn(1, 8000),
    ...     request=objective.request(sb.Stage.TRAIN))
    >>> loss, stats = objective(out, model, sb.Stage.TRAIN)
    >>> sorted(stats)
    ['cif', 'input_kl', 'loss', 'response_kl']
    """

    TERMS = ("input_kl", "response_kl", "response_ce", "cif", "align")

    def __init__(
        self,
        weights=None,
        temperature=2.0,
        align_temperature=0.05,
        eval_kl=True,
        scale_by_t2=False,
    ):
        if weights is None:
            weights = {"input_kl": 1.0, "response_kl": 1.0, "cif": 1.0}
        super().__init__(weights)
        if temperature <= 0 or align_temperature <= 0:
            raise ValueError("BLSPKDObjective: temperatures must be > 0")
        self.temperature = float(temperature)
        self.align_temperature = float(align_temperature)
        self.eval_kl = bool(eval_kl)
        self.scale_by_t2 = bool(scale_by_t2)

    def request(self, stage):
        """LLM passes only where a weighted term (or ``eval_kl``) needs one."""
        evaluating = stage is not None and stage != sb.Stage.TRAIN
        kl = self.active("input_kl") or self.active("response_kl")
        kl = kl or (evaluating and self.eval_kl)
        student = kl or self.active("response_ce")
        if not student:
            return PassRequest()
        return PassRequest(
            teacher=kl,
            student=True,
            response=True,
            logits=("input", "response") if kl else ("response",),
        )

    def _kl(self, outputs, span):
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
        if outputs.teacher is not None:
            terms["input_kl"] = lambda: self._kl(outputs, "input")
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
        terms["align"] = lambda: alignment_loss(
            model,
            adapter,
            outputs.transcript_ids,
            self.align_temperature,
            outputs.transcript_mask,
        )[0]
        return terms

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
        return values
