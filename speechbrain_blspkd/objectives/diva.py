"""The DiVA objective: distil the LLM's response states and its inputs.

DiVA (distilled voice assistant) keeps the LLM frozen and trains a Q-Former
connector so that (``docs/algorithms.md`` section 2.7):

* ``l_out``: the LLM's **final hidden states** at the response positions
  given the speech match those given the transcript (an L2 loss: cheaper
  than a KL over the vocabulary, and with a frozen output layer equal
  states give equal distributions);
* ``l_in``: the connector's speech embeddings match the transcript's token
  embeddings (L2).

The two sequences of ``l_in`` have different lengths: the Q-Former emits L
embeddings whatever the utterance, the transcript has N tokens.  Our
choice: the N transcript embeddings are linearly interpolated along the
sequence to L positions (position j of the L reads the transcript at
relative position j / (L - 1)), and the mean squared error is taken over
the L positions and the width.  Both sequences describe the same utterance
from start to end, so stretching one onto the other keeps the order of the
content; truncating or padding instead would compare unrelated positions
whenever N != L.  The loss is divided by the variance of the LLM's
embedding table, so its scale does not depend on the LLM.

``l_out`` is the mean over response positions of the squared difference
of the final hidden states, averaged over the width.

Authors
 * speechbrain-blspkd contributors 2026
"""

import torch
import torch.nn.functional as F

from speechbrain_blspkd.models.passes import PassRequest
from speechbrain_blspkd.objectives.base import Objective

__all__ = ["DiVAObjective", "stretch"]

FINAL = (-1, "response")


def stretch(sequences, mask, length):
    """Linearly resample each row's valid positions to ``length`` positions.

    Arguments
    ---------
    sequences : torch.Tensor
        (B, N, D) values.
    mask : torch.Tensor
        (B, N) bool: the valid prefix of each row (at least one position).
    length : int
        Output positions L.

    Returns
    -------
    torch.Tensor
        (B, L, D): row b's position j is row b read at relative position
        j / (L - 1) of its valid positions (linear interpolation).

    Example
    -------
    >>> x = torch.tensor([[[0.0], [1.0], [2.0]], [[5.0], [7.0], [0.0]]])
    >>> mask = torch.tensor([[True, True, True], [True, True, False]])
    >>> stretch(x, mask, 5)[..., 0]
    tensor([[0.0000, 0.5000, 1.0000, 1.5000, 2.0000],
            [5.0000, 5.5000, 6.0000, 6.5000, 7.0000]])
    """
    counts = mask.sum(1)
    if bool((counts < 1).any()):
        raise ValueError("stretch: every row needs a valid position")
    steps = torch.linspace(0.0, 1.0, length, device=sequences.device)
    where = steps[None, :] * (counts[:, None] - 1).to(steps.dtype)
    low = where.floor().long()
    high = torch.minimum(low + 1, counts[:, None] - 1)
    frac = (where - low.to(where.dtype))[..., None].to(sequences.dtype)
    rows = torch.arange(sequences.shape[0], device=sequences.device)[:, None]
    return sequences[rows, low] * (1 - frac) + sequences[rows, high] * frac


class DiVAObjective(Objective):
    """``l_out`` (response hidden states) + ``l_in`` (input embeddings).

    Arguments
    ---------
    weights : dict, optional
        Weights of ``l_out`` and ``l_in`` (default 1 each).

    Example
    -------
    >>> import speechbrain as sb
    >>> from speechbrain_blspkd.nnet.qformer import QFormer
    >>> from speechbrain_blspkd.testing import tiny_speech_llm
    >>> model = tiny_speech_llm(plora=None, adapter=QFormer(64, 64,
    ...     num_queries=4, num_layers=1, num_heads=4, ffn_size=128))
    >>> objective = DiVAObjective()
    >>> out = model(["the cat"], ["sat."], wavs=torch.randn(1, 8000),
    ...     request=objective.request(sb.Stage.TRAIN))
    >>> loss, stats = objective(out, model, sb.Stage.TRAIN)
    >>> sorted(stats)
    ['l_in', 'l_out', 'loss']
    """

    TERMS = ("l_out", "l_in")
    DEFAULT_WEIGHTS = {"l_out": 1.0, "l_in": 1.0}

    def request(self, stage):
        """Teacher and student final hidden states at the response."""
        if not self.active("l_out"):
            return PassRequest()
        return PassRequest(teacher=True, student=True, hidden=(FINAL,))

    def terms(self, outputs, model, stage):
        """``l_out`` and ``l_in`` (each computed only when weighted)."""
        return {
            "l_out": lambda: self.output_loss(outputs),
            "l_in": lambda: self.input_loss(outputs, model),
        }

    @staticmethod
    def output_loss(outputs):
        """Mean squared difference of the response hidden states."""
        student = outputs.student.hidden[FINAL].float()
        teacher = outputs.teacher.hidden[FINAL].float()
        mask = outputs.teacher.masks["response"]
        diff = (student - teacher)[mask]
        return (diff**2).mean()

    @staticmethod
    def input_loss(outputs, model):
        """MSE between the speech embeddings and the stretched transcript
        embeddings, over the embedding variance."""
        adapter = outputs.adapter
        with torch.no_grad():
            # what the LLM receives for these tokens: the embedding
            # module's output, already scaled where the model scales its
            # embeddings (Gemma's embed_scale is applied in its forward)
            target = model.embed_tokens(outputs.transcript_ids).float()
        _, variance = model.embedding_table(target.device)
        losses = []
        for b in range(target.shape[0]):
            speech = adapter.tokens[b][adapter.token_mask[b]].float()
            stretched = stretch(
                target[b : b + 1],
                outputs.transcript_mask[b : b + 1],
                speech.shape[0],
            )[0]
            losses.append(
                F.mse_loss(speech, stretched, reduction="none").mean(-1)
            )
        return torch.cat(losses).mean() / variance
