"""The AuRA objective: distil a speech encoder into the LLM, layer by layer.

AuRA (``docs/algorithms.md`` section 2.7) feeds the log-mels of an
utterance to a LoRA-adapted LLM through a lightweight audio embedding layer
(:class:`~speechbrain_blspkd.nnet.audio_embedding.AudioEmbedding`) and, on
the same frames, to a frozen Whisper encoder (the teacher, owned by this
objective and never part of the model, so inference runs no encoder).  The
LLM's hidden states at the speech positions are pulled, layer by layer,
towards the teacher's:

* **layer map** (:class:`LayerMap`): LLM hidden-state index ``l_k`` <-
  Whisper hidden-state index ``w_k`` for k = 1..K (both as Hugging Face's
  ``output_hidden_states``: 0 the embeddings, ``k`` after layer ``k``);
  each pair has a small linear map from the LLM width to the teacher's;
* **time alignment** (:func:`align_frames`): the teacher's frames (50 a
  second) are resampled to the LLM's speech positions (``100 / stride`` a
  second) by overlap-weighted average pooling (``"pool"``) or linear
  interpolation (``"interpolate"``);
* **loss form**: ``layer_l2``, the mean squared error over the teacher
  layer's variance, and/or ``layer_cos``, one minus the cosine similarity,
  each averaged over the valid positions and then over the K pairs;
* **output side**: BLSP-KD's ``response_kl`` against the text teacher (the
  LLM with LoRA off on the transcript) and/or ``response_ce`` on the
  teacher's continuation, computed exactly as
  :class:`~speechbrain_blspkd.objectives.blsp_kd.BLSPKDObjective` does.

Every weight is a YAML value; a term of weight 0 is never computed, and a
stage with only the layer terms runs the student pass without the
continuation (no text-teacher pass).

Authors
 * speechbrain-blspkd contributors 2026
"""

import speechbrain as sb
import torch
import torch.nn.functional as F
from torch import nn

from speechbrain_blspkd.models.passes import PassRequest
from speechbrain_blspkd.objectives.base import Objective
from speechbrain_blspkd.objectives.blsp_kd import BLSPKDObjective

__all__ = ["AuRAObjective", "LayerMap", "align_frames", "evenly_spaced"]

ALIGNMENTS = ("pool", "interpolate")
LAYER_TERMS = ("layer_l2", "layer_cos")
RESPONSE_TERMS = ("response_kl", "response_ce")


def evenly_spaced(count, last):
    """``count`` evenly spaced layer indices ending at ``last``.

    Index ``k`` (1-based) is ``round(last * k / count)``, so the map covers
    layers 1..``last`` evenly; for a YAML layer map, e.g.
    ``!apply:speechbrain_blspkd.objectives.aura.evenly_spaced [3, 6]``.

    Arguments
    ---------
    count : int
        Number of layers (at most ``last``).
    last : int
        The deepest layer.

    Returns
    -------
    list of int

    Example
    -------
    >>> evenly_spaced(3, 6), evenly_spaced(6, 30), evenly_spaced(4, 6)
    ([2, 4, 6], [5, 10, 15, 20, 25, 30], [2, 3, 5, 6])
    """
    count, last = int(count), int(last)
    if not 1 <= count <= last:
        raise ValueError(
            f"evenly_spaced: need 1 <= count <= last, got {count}, {last}"
        )
    # floor(x + 0.5), not Python's round-half-to-even
    return [int(last * k / count + 0.5) for k in range(1, count + 1)]


def align_frames(frames, frame_counts, num_positions, ratio, mode="pool"):
    """Resample teacher frames to the student's positions (another rate).

    Teacher frame ``t`` covers the time ``[t, t + 1)`` (in teacher frames);
    student position ``j`` covers ``[j r, (j + 1) r)`` with ``r = ratio``,
    the teacher frames per student position (Whisper at 50 frames/s and a
    student at 25 positions/s: ``r = 2``).

    * ``"pool"``: position ``j`` is the average of the teacher frames,
      each weighted by how much of its time lies in the position's span
      (exact average pooling when ``r`` is a whole number; a non-integer
      ``r`` splits the frames at the boundaries; ``r < 1`` takes the frame
      the span lies in).
    * ``"interpolate"``: position ``j`` is the teacher read by linear
      interpolation at the centre of its span, ``(j + 0.5) r - 0.5`` in
      frame indices, clamped to the row's first and last real frame.

    Only each row's first ``frame_counts[b]`` frames are read.  A position
    is valid when it is one of the row's first ``num_positions[b]`` and
    (``"pool"``) its span overlaps a real frame.

    Arguments
    ---------
    frames : torch.Tensor
        (B, T, d) teacher frames.
    frame_counts : torch.Tensor
        (B,) real frames of each row.
    num_positions : torch.Tensor
        (B,) student positions of each row.
    ratio : float
        Teacher frames per student position (> 0).
    mode : str
        ``"pool"`` or ``"interpolate"``.

    Returns
    -------
    aligned : torch.Tensor
        (B, P, d), P = ``max(num_positions)`` (0 where invalid).
    valid : torch.Tensor
        (B, P) bool.

    Example
    -------
    >>> x = torch.arange(6.0).reshape(1, 6, 1)
    >>> pooled, valid = align_frames(x, torch.tensor([6]), torch.tensor([3]), 2)
    >>> pooled[..., 0]
    tensor([[0.5000, 2.5000, 4.5000]])
    >>> align_frames(x, torch.tensor([6]), torch.tensor([4]), 1.5)[0][..., 0]
    tensor([[0.3333, 1.6667, 3.3333, 4.6667]])
    >>> align_frames(x, torch.tensor([6]), torch.tensor([3]), 2,
    ...     "interpolate")[0][..., 0]
    tensor([[0.5000, 2.5000, 4.5000]])
    """
    if mode not in ALIGNMENTS:
        raise ValueError(
            f"align_frames: mode {mode!r} is not one of {ALIGNMENTS}"
        )
    if not ratio > 0:
        raise ValueError(f"align_frames: ratio must be > 0, got {ratio}")
    device = frames.device
    counts = frame_counts.to(device).long()
    wanted = num_positions.to(device).long()
    positions = int(wanted.max())
    t = torch.arange(frames.shape[1], device=device, dtype=torch.float64)
    j = torch.arange(positions, device=device, dtype=torch.float64)
    real = t[None] < counts[:, None]  # (B, T)
    if mode == "pool":
        start, end = j * ratio, (j + 1) * ratio
        overlap = torch.minimum(end[:, None], t[None] + 1) - torch.maximum(
            start[:, None], t[None]
        )
        weights = overlap.clamp(min=0)[None] * real[:, None, :]  # (B, P, T)
    else:
        centre = (j + 0.5) * ratio - 0.5
        last = (counts - 1).clamp(min=0).to(torch.float64)
        centre = torch.minimum(centre[None].clamp(min=0), last[:, None])
        weights = (1 - (centre[..., None] - t[None, None]).abs()).clamp(min=0)
        weights = weights * real[:, None, :]
    total = weights.sum(-1)
    valid = (total > 0) & (j[None] < wanted[:, None])
    weights = weights / total.clamp(min=1e-12)[..., None]
    weights = weights * valid[..., None]
    aligned = weights.to(frames.dtype) @ frames
    return aligned, valid


class LayerMap(nn.Module):
    """Which LLM layer learns which teacher layer, and the maps between.

    Pair ``k`` pulls the LLM hidden state ``llm_layers[k]``, mapped to the
    teacher width, towards the teacher hidden state ``teacher_layers[k]``.
    Indices follow Hugging Face's ``output_hidden_states`` (0 the
    embeddings, ``k`` the output of layer ``k``; -1 the final, normed
    state).  The map of pair ``k`` is a parameter-free LayerNorm followed by
    its own Linear (``maps[k]``): the LLM's residual stream is not
    normalised between layers (its scale changes with depth and a few
    channels can be far larger than the rest), so without the norm those
    channels would set the loss and its gradient into the LLM.  The maps
    are trained with the model and used in training only (the export never
    holds them).

    Arguments
    ---------
    student_size : int
        LLM hidden width.
    teacher_size : int
        Teacher (Whisper encoder) width.
    llm_layers : sequence of int
        LLM hidden-state indices, one per pair.
    teacher_layers : sequence of int
        Teacher hidden-state indices, as many.

    Example
    -------
    >>> layer_map = LayerMap(576, 512, [2, 4, 6], [2, 4, 6])
    >>> layer_map.pairs
    [(2, 2), (4, 4), (6, 6)]
    >>> layer_map(1, torch.zeros(3, 576)).shape
    torch.Size([3, 512])
    """

    def __init__(self, student_size, teacher_size, llm_layers, teacher_layers):
        super().__init__()
        llm_layers, teacher_layers = list(llm_layers), list(teacher_layers)
        if not llm_layers or len(llm_layers) != len(teacher_layers):
            raise ValueError(
                f"LayerMap: need as many LLM layers as teacher layers (at "
                f"least one), got {llm_layers} and {teacher_layers}"
            )
        for layer in llm_layers + teacher_layers:
            if int(layer) != layer or layer < -1:
                raise ValueError(f"LayerMap: bad layer index {layer!r}")
        if len(set(llm_layers)) != len(llm_layers):
            raise ValueError(f"LayerMap: LLM layers repeat: {llm_layers}")
        self.student_size = int(student_size)
        self.teacher_size = int(teacher_size)
        self.pairs = [
            (int(a), int(b)) for a, b in zip(llm_layers, teacher_layers)
        ]
        self.maps = nn.ModuleList(
            nn.Linear(self.student_size, self.teacher_size) for _ in self.pairs
        )

    @property
    def llm_layers(self):
        """The LLM hidden-state index of each pair."""
        return [a for a, _ in self.pairs]

    @property
    def teacher_layers(self):
        """The teacher hidden-state index of each pair."""
        return [b for _, b in self.pairs]

    def forward(self, index, states):
        """Pair ``index``'s map applied to LLM states (..., student_size).

        States of another dtype than the map (a bf16 LLM beside fp32 maps,
        outside autocast) are cast to the map's dtype.
        """
        linear = self.maps[index]
        states = states.to(linear.weight.dtype)
        return linear(F.layer_norm(states, (self.student_size,)))


class AuRAObjective(Objective):
    """Layer-wise distillation of a frozen encoder + the response terms.

    Arguments
    ---------
    teacher : speechbrain_blspkd.nnet.whisper_encoder.WhisperEncoder
        The frozen speech encoder (``freeze=True``), read on the frames the
        model's adapter read (:class:`~speechbrain_blspkd.nnet.
        whisper_encoder.WhisperLogMel` log-mels) through its
        ``layer_states``.
    layer_map : LayerMap
        The LLM <- teacher layer pairs and their linear maps (share one
        between the stages of a recipe, so the maps keep what they learnt).
    weights : dict, optional
        Weights of ``layer_l2``, ``layer_cos``, ``response_kl``,
        ``response_ce`` (default: ``layer_l2``, ``layer_cos`` and
        ``response_kl`` 1 each).
    time_alignment : str
        ``"pool"`` or ``"interpolate"`` (:func:`align_frames`).
    temperature : float
        KD temperature of ``response_kl``.
    eval_kl : bool
        Report ``response_kl`` in validation and test even when its weight
        is 0 (runs the text-teacher pass there).
    scale_by_t2 : bool
        Multiply ``response_kl`` by the squared temperature.

    Example
    -------
    >>> from speechbrain_blspkd.testing import tiny_aura
    >>> model, objective = tiny_aura()
    >>> out = model(["the cat"], ["sat."], wavs=torch.randn(1, 8000) * 0.1,
    ...     request=objective.request(sb.Stage.TRAIN))
    >>> loss, stats = objective(out, model, sb.Stage.TRAIN)
    >>> sorted(stats)
    ['layer_cos', 'layer_l2', 'loss', 'response_kl']
    """

    TERMS = LAYER_TERMS + RESPONSE_TERMS
    DEFAULT_WEIGHTS = {"layer_l2": 1.0, "layer_cos": 1.0, "response_kl": 1.0}

    def __init__(
        self,
        teacher,
        layer_map,
        weights=None,
        time_alignment="pool",
        temperature=2.0,
        eval_kl=True,
        scale_by_t2=False,
    ):
        super().__init__(weights)
        if not getattr(teacher, "freeze", False):
            raise ValueError("AuRAObjective: the teacher must be frozen")
        if layer_map.teacher_size != teacher.output_size:
            raise ValueError(
                f"AuRAObjective: the layer map's teacher width "
                f"{layer_map.teacher_size} != the teacher's "
                f"{teacher.output_size}"
            )
        depth = len(teacher.encoder.layers)
        bad = [w for w in layer_map.teacher_layers if not -1 <= w <= depth]
        if bad:
            raise ValueError(
                f"AuRAObjective: teacher layer(s) {bad} not in 0..{depth}"
            )
        if time_alignment not in ALIGNMENTS:
            raise ValueError(
                f"AuRAObjective: time_alignment {time_alignment!r} is not "
                f"one of {ALIGNMENTS}"
            )
        self.teacher = teacher
        self.layer_map = layer_map
        self.time_alignment = time_alignment
        self.eval_kl = bool(eval_kl)
        # the response terms exactly as BLSP-KD computes them
        self.response_terms = BLSPKDObjective(
            {"response_kl": 1.0},
            temperature=temperature,
            eval_kl=False,
            scale_by_t2=scale_by_t2,
        )
        self._pair_cos = {}

    def _layers_active(self):
        return any(self.active(term) for term in LAYER_TERMS)

    def request(self, stage):
        """The student's hidden states at the mapped layers (speech span);
        the response logits (and the text teacher) when a response term
        is weighted, or in validation and test with ``eval_kl``."""
        evaluating = stage is not None and stage != sb.Stage.TRAIN
        kl = self.active("response_kl") or (evaluating and self.eval_kl)
        response = kl or self.active("response_ce")
        hidden = ()
        if self._layers_active():
            hidden = tuple(
                (layer, "input") for layer in self.layer_map.llm_layers
            )
        return PassRequest(
            teacher=kl,
            student=True,
            response=response,
            logits=("response",) if response else (),
            hidden=hidden,
        )

    def layer_pairs(self, outputs, model):
        """The mapped LLM states and the aligned teacher states, per pair.

        Arguments
        ---------
        outputs : speechbrain_blspkd.models.speech_llm.SpeechLLMOutput
            With the student's hidden states at the mapped layers and the
            frames the adapter read (``feats``).
        model : speechbrain_blspkd.models.speech_llm.SpeechLLMModel
            The model (its LLM depth is checked).

        Returns
        -------
        list of (torch.Tensor, torch.Tensor)
            ``(prediction, target)``, each (K, teacher width) float32 over
            the K valid speech positions of the batch; the target carries
            no gradient.
        """
        depth = model.llm.config.get_text_config().num_hidden_layers
        bad = [a for a in self.layer_map.llm_layers if not -1 <= a <= depth]
        if bad:
            raise ValueError(
                f"AuRAObjective: LLM layer(s) {bad} not in 0..{depth}"
            )
        if outputs.feats is None:
            raise ValueError(
                "AuRAObjective: the outputs carry no frames (feats) for the "
                "teacher"
            )
        stride = getattr(outputs.adapter, "frames_per_token", None)
        if stride is None:
            raise ValueError(
                "AuRAObjective: the adapter output has no frames_per_token "
                "(use nnet.audio_embedding.AudioEmbedding)"
            )
        with torch.no_grad():
            states, frames = self.teacher.layer_states(
                outputs.feats,
                outputs.feat_lens,
                layers=sorted(set(self.layer_map.teacher_layers)),
            )
        mask = outputs.student.masks["input"]
        counts = mask.sum(1)
        ratio = stride / self.teacher.mel_stride()
        pairs = []
        for k, (llm_layer, teacher_layer) in enumerate(self.layer_map.pairs):
            target, valid = align_frames(
                states[teacher_layer].float(),
                frames,
                counts,
                ratio,
                self.time_alignment,
            )
            valid = valid & mask[:, : valid.shape[1]]
            student = outputs.student.hidden[(llm_layer, "input")]
            prediction = self.layer_map(k, student[:, : valid.shape[1]])
            pairs.append((prediction.float()[valid], target[valid]))
        return pairs

    @staticmethod
    def l2_loss(prediction, target):
        """Mean squared error over the target's variance (a scalar).

        Example
        -------
        >>> t = torch.tensor([[1.0, -1.0], [3.0, 1.0]])
        >>> AuRAObjective.l2_loss(t, t), AuRAObjective.l2_loss(t * 0 + 1, t)
        (tensor(0.), tensor(1.))
        """
        if target.numel() == 0:
            return prediction.sum() * 0.0
        variance = target.var(unbiased=False).clamp(min=1e-6)
        return ((prediction - target) ** 2).mean() / variance

    @staticmethod
    def cosine_loss(prediction, target):
        """Mean of one minus the cosine similarity per position (a scalar).

        Example
        -------
        >>> t = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> AuRAObjective.cosine_loss(t, t), AuRAObjective.cosine_loss(-t, t)
        (tensor(0.), tensor(2.))
        """
        if target.numel() == 0:
            return prediction.sum() * 0.0
        return (1 - F.cosine_similarity(prediction, target, dim=-1)).mean()

    def terms(self, outputs, model, stage):
        """The layer terms (the teacher runs once for both) and BLSP-KD's
        response terms, each computed only when weighted."""
        terms = {}
        self._pair_cos = {}
        if outputs.student is None:
            return terms
        borrowed = self.response_terms.terms(outputs, model, stage)
        for name in RESPONSE_TERMS:
            if name in borrowed:
                terms[name] = borrowed[name]
        if not outputs.student.hidden:
            return terms
        cache = []

        def pairs():
            if not cache:
                cache.append(self.layer_pairs(outputs, model))
                if stage is None or stage == sb.Stage.TRAIN:
                    return cache[0]  # the per-pair figures are for metrics
                with torch.no_grad():
                    for (a, b), (p, t) in zip(self.layer_map.pairs, cache[0]):
                        cos = 1 - self.cosine_loss(p, t)
                        self._pair_cos[f"cos_{a}_{b}"] = float(cos)
            return cache[0]

        def mean(loss):
            values = [loss(p, t) for p, t in pairs()]
            return torch.stack(values).mean()

        terms["layer_l2"] = lambda: mean(self.l2_loss)
        terms["layer_cos"] = lambda: mean(self.cosine_loss)
        return terms

    def metrics(self, outputs, model, stage):
        """``response_kl`` when both passes ran, and the cosine similarity
        of each layer pair (``cos_<llm layer>_<teacher layer>``) when the
        layer terms were computed."""
        values = dict(self._pair_cos)
        if outputs.teacher is not None and outputs.student is not None:
            borrowed = self.response_terms.terms(outputs, model, stage)
            values["response_kl"] = borrowed["response_kl"]
        return values
