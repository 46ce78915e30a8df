"""Training steps of the demo configuration: speed, FLOPs, utilisation.

Measured on the demo's model (SmolLM2-135M-Instruct with PLoRA r=16, the
demo CFormer) and its batch sizes, from cached-feature-sized random encoder
frames (the demo trains from the feature cache):

* ``kd``: one BLSP-KD step with the demo's weights (input KL, response KL,
  quantity loss, alignment term), teacher run online, AdamW step included;
* ``align``: one alignment-stage step (adapter + alignment loss over the LLM
  embedding table, no LLM pass);
* teacher cost (``teacher_*``): the KD step with the online teacher, the
  same step with the offline teacher (``kd_offline``: the real training
  path of ``teacher: offline``: the batch's top-k teacher, written
  beforehand by :func:`~speechbrain_blspkd.dataprep.teacher_topk.
  write_teacher_topk` into a temporary cache folder, is read from that
  cache in the step and the objective computes the KL terms with
  :func:`~speechbrain_blspkd.losses.kd_kl_topk`; no teacher forward), and
  a CE-only step (BLSP's objective, no teacher).

For each step: seconds, tokens per second (real positions of every LLM
sequence the step runs, teacher and student; for the alignment step, which
runs no LLM, the transcript tokens), executed FLOPs
(:func:`benchmarks.common.count_flops`), achieved GFLOP/s and model FLOP
utilisation (MFU: achieved / the machine's peak from
:mod:`benchmarks.hardware`). ``--profile`` prints where the KD step's time
goes (``torch.profiler``, top operators by self time).

``--ablations`` also times the design choices of the step against their
straightforward versions: the KD step without prefix reuse (the shared
system + instruction prefix recomputed for every row), with the PLoRA delta
computed densely over every position and masked (instead of the row-sparse
delta of :class:`~speechbrain_blspkd.nnet.plora.PLoRALinear`), and the
alignment step with ``frame_stride`` 1 instead of the demo's 2.
"""

import contextlib
import pathlib
import shutil
import tempfile

import speechbrain as sb
import torch
import torch.nn.functional as F

from benchmarks.common import (
    CONTINUATION,
    autocast,
    compare,
    count_flops,
    demo_adapter,
    demo_model,
    texts,
)
from speechbrain_blspkd.dataio.manifest import write_manifest
from speechbrain_blspkd.dataprep.teacher_cache import (
    TopKTeacherCache,
    bytes_per_position,
)
from speechbrain_blspkd.dataprep.teacher_identity import teacher_settings
from speechbrain_blspkd.dataprep.teacher_topk import write_teacher_topk
from speechbrain_blspkd.nnet import plora as plora_lib
from speechbrain_blspkd.objectives import BLSPKDObjective
from speechbrain_blspkd.objectives.blsp import BLSPObjective


def _dense_plora_forward(self, x):
    """Reference PLoRA forward: the delta over every position, masked."""
    y = self.base(x)
    m = self.state.weights(
        x, training=self.training and torch.is_grad_enabled()
    )
    if m is None:
        return y
    h = self.dropout(x.to(self.lora_A.dtype))
    d = F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling
    if m is not True:
        d = d * m.to(d.dtype)
    return y + d.to(y.dtype)


@contextlib.contextmanager
def dense_plora():
    """Within: every PLoRA layer computes its delta densely."""
    cls = plora_lib.PLoRALinear
    sparse = cls.forward
    cls.forward = _dense_plora_forward
    try:
        yield
    finally:
        cls.forward = sparse


def _tokens(out):
    """Real positions of every LLM sequence of one forward pass; without
    an LLM pass (the alignment stage), the transcript tokens the loss
    reads."""
    total = 0
    for side in (out.teacher, out.student):
        if side is not None:
            total += sum(len(p.input_ids) for p in side.prompts)
    return total or int(out.transcript_mask.sum())


class Steps:
    """The demo's training steps on one model, ready to time."""

    def __init__(self, dtype, device, kd_batch, align_batch, seconds):
        torch.manual_seed(0)
        self.device = device
        self.dtype = dtype
        self.model = demo_model(dtype, device)
        self.model.train()
        # what the forward runs through (e.g. a DistributedDataParallel
        # wrapper of ``model``); objectives read the bare model
        self.runner = self.model
        frames = int(seconds * 50)
        self.kd_texts = texts(kd_batch)
        self.continuations = [CONTINUATION] * kd_batch
        self.kd_feats = torch.randn(kd_batch, frames, 512, device=device)
        self.kd_lens = torch.linspace(0.6, 1.0, kd_batch, device=device)
        self.align_texts = texts(align_batch)
        self.align_feats = torch.randn(align_batch, frames, 512, device=device)
        self.align_lens = torch.linspace(0.4, 1.0, align_batch, device=device)
        self.kd_weights = {
            "input_kl": 1.0,
            "response_kl": 1.0,
            "cif": 1.0,
            "align": 0.3,
        }
        self.kd_objective = BLSPKDObjective(self.kd_weights)
        self.align_objective = BLSPKDObjective({"align": 1.0, "cif": 1.0})
        self.ce_objective = BLSPObjective()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-5)
        self.tokens = {}
        self._topk = None
        self.offline_objective = None

    def _forward(self, request, align=False):
        """The model on the KD batch (or the alignment batch)."""
        if align:
            texts_, conts = self.align_texts, None
            feats, lens = self.align_feats, self.align_lens
        else:
            texts_, conts = self.kd_texts, self.continuations
            feats, lens = self.kd_feats, self.kd_lens
        return self.runner(
            texts_, conts, feats=feats, feat_lens=lens, request=request
        )

    def _finish(self, name, loss, out):
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.tokens[name] = _tokens(out)

    def _objective_step(self, name, objective, align=False):
        request = objective.request(sb.Stage.TRAIN)
        with autocast(self.device, self.dtype):
            out = self._forward(request, align)
            loss, _ = objective(out, self.model, sb.Stage.TRAIN)
        self._finish(name, loss, out)

    def kd(self):
        """BLSP-KD step, online teacher."""
        self._objective_step("kd", self.kd_objective)

    def align(self):
        """Alignment-stage step."""
        self._objective_step("align", self.align_objective, align=True)

    def kd_no_prefix_reuse(self):
        """The KD step recomputing the shared prompt prefix per row."""
        self.model.prefix_reuse = False
        try:
            self._objective_step("kd_no_prefix_reuse", self.kd_objective)
        finally:
            self.model.prefix_reuse = True

    def kd_dense_plora(self):
        """The KD step with the PLoRA delta computed densely."""
        with dense_plora():
            self._objective_step("kd_dense_plora", self.kd_objective)

    def align_stride1(self):
        """The alignment step with ``frame_stride`` 1."""
        if not hasattr(self, "_stride1"):
            self._stride1 = demo_adapter(frame_stride=1).to(self.device)
        plain = self.model.adapter
        self.model.adapter = self._stride1
        try:
            self._objective_step(
                "align_stride1", self.align_objective, align=True
            )
        finally:
            self.model.adapter = plain

    def ce(self):
        """CE-only step (BLSP's objective)."""
        self._objective_step("ce", self.ce_objective)

    def topk_teacher(self, k, folder=None):
        """Write the KD batch's top-k teacher with the real writer.

        The rows (the KD batch's transcripts and continuation) go to a
        manifest in ``folder`` (default: a new temporary folder) and
        :func:`~speechbrain_blspkd.dataprep.teacher_topk.write_teacher_topk`
        stores their teacher there; :meth:`kd_offline` reads it back.

        Returns
        -------
        pathlib.Path
            The cache folder.
        """
        folder = pathlib.Path(folder or tempfile.mkdtemp(prefix="topk_"))
        self.kd_ids = [f"b{i}" for i in range(len(self.kd_texts))]
        rows = [
            dict(
                ID=uid,
                wav="unused.wav",
                duration=1.0,
                transcript=text,
                language="en",
                speaker="s",
                continuation=cont,
                truncated="0",
            )
            for uid, text, cont in zip(
                self.kd_ids, self.kd_texts, self.continuations
            )
        ]
        write_manifest(folder / "kd.csv", rows)
        cache = folder / "cache"
        with autocast(self.device, self.dtype):
            write_teacher_topk(
                self.model, folder / "kd.csv", cache, k=k, batch_size=len(rows)
            )
        self._topk = TopKTeacherCache(cache, teacher_settings(self.model, k))
        self.offline_objective = BLSPKDObjective(
            self.kd_weights,
            teacher="offline",
            teacher_cache=str(cache),
            teacher_topk=k,
        )
        return cache

    def kd_offline(self):
        """The KD step of ``teacher: offline``: the stored top-k teacher
        read from the cache, no teacher forward."""
        objective = self.offline_objective
        with autocast(self.device, self.dtype):
            out = self._forward(objective.request(sb.Stage.TRAIN))
            out.data = {
                "teacher_topk": [self._topk.get(u) for u in self.kd_ids]
            }
            loss, _ = objective(out, self.model, sb.Stage.TRAIN)
        self._finish("kd_offline", loss, out)


def profile_kd(steps, top=15):
    """Print the KD step's operators by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.device(steps.device).type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        steps.kd()
    print(
        prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
    )


def run(args, peak_gflops):
    """Figures of the KD, alignment, offline-teacher and CE steps."""
    device = args.device
    dtype = args.dtype
    steps = Steps(
        dtype,
        device,
        kd_batch=args.kd_batch,
        align_batch=args.align_batch,
        seconds=args.clip_seconds,
    )
    cache = steps.topk_teacher(args.topk)
    configs = {
        "kd": steps.kd,
        "align": steps.align,
        "kd_offline": steps.kd_offline,
        "ce": steps.ce,
    }
    if args.ablations:
        configs.update(
            kd_no_prefix_reuse=steps.kd_no_prefix_reuse,
            kd_dense_plora=steps.kd_dense_plora,
            align_stride1=steps.align_stride1,
        )
    flops = {name: count_flops(fn) for name, fn in configs.items()}
    timing = compare(configs, args.rounds, device)
    out = {
        "kd_batch": args.kd_batch,
        "align_batch": args.align_batch,
        "clip_seconds": args.clip_seconds,
        "topk": args.topk,
        "dtype": str(dtype).replace("torch.", ""),
    }
    for name, t in timing.items():
        gflops = flops[name] / t.best / 1e9
        out[f"{name}.seconds"] = t.best
        out[f"{name}.seconds_median"] = t.median
        out[f"{name}.tokens_per_s"] = steps.tokens[name] / t.best
        out[f"{name}.gflop"] = flops[name] / 1e9
        out[f"{name}.gflops"] = gflops
        out[f"{name}.mfu"] = gflops / peak_gflops
    out["mfu"] = out["kd.mfu"]
    out["kd_offline.bytes_per_position"] = bytes_per_position(args.topk)
    out["teacher.online_over_offline"] = (
        out["kd.seconds"] / out["kd_offline.seconds"]
    )
    out["teacher.online_over_ce"] = out["kd.seconds"] / out["ce.seconds"]
    if args.ablations:
        out["prefix_reuse_speedup"] = (
            out["kd_no_prefix_reuse.seconds"] / out["kd.seconds"]
        )
        out["sparse_plora_speedup"] = (
            out["kd_dense_plora.seconds"] / out["kd.seconds"]
        )
        out["frame_stride2_speedup"] = (
            out["align_stride1.seconds"] / out["align.seconds"]
        )
    if args.profile:
        profile_kd(steps)
    shutil.rmtree(cache.parent, ignore_errors=True)
    return out
