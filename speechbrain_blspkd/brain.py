"""The training loop: a method-agnostic speechbrain ``Brain``.

:class:`SpeechLLMBrain` trains through the stages a recipe declares
(:class:`~speechbrain_blspkd.stages.Stage`: objective, data, epochs,
learning rate, schedule); :func:`speechbrain_blspkd.recipe.run_recipe`
builds it and runs it stage by stage.  The Brain knows no
method: each batch it asks the stage's objective what the model must
compute (:meth:`~speechbrain_blspkd.objectives.Objective.request`), runs the
model once, and lets the objective turn the outputs into ``(loss, stats)``;
validation and test average those stats and the adapter's own diagnostics
(:meth:`~speechbrain_blspkd.nnet.adapter.SpeechAdapter.diagnostics`).
It also owns one optimiser per stage, the checkpoints, the step log and
the skipping of batches with a non-finite loss.

Under ``torchrun`` the model is data-parallel: ``distributed_strategy: ddp``
(DistributedDataParallel, the whole model on every process) or ``fsdp``
(the LLM decoder layers sharded across the processes, FSDP2; see
:mod:`speechbrain_blspkd.utils.sharding`).
"""

import contextlib
import logging
import os
import time

import speechbrain as sb
import torch

from speechbrain_blspkd.stages import Stage
from speechbrain_blspkd.utils import sharding
from speechbrain_blspkd.utils.run_options import resolve_run_precision

logger = logging.getLogger(__name__)


def unwrap(module):
    """The module inside DDP / DataParallel wrappers (or itself)."""
    while isinstance(
        module,
        (
            torch.nn.parallel.DistributedDataParallel,
            torch.nn.DataParallel,
        ),
    ):
        module = module.module
    return module


class SpeechLLMBrain(sb.Brain):
    """Trains a :class:`~speechbrain_blspkd.models.speech_llm.SpeechLLMModel`.

    The current :class:`~speechbrain_blspkd.stages.Stage` is ``self.stage``
    (set before ``fit``/``evaluate``); its objective gives the loss, its
    ``lr`` and schedule the learning rate. One optimiser (``opt_class``) is
    built per stage over the trainable parameters.

    ``hparams["distributed_strategy"]`` (default ``"ddp"``) chooses the
    data parallelism of a ``torchrun`` launch.  With ``"fsdp"`` the model's
    LLM decoder layers are sharded here, before the model moves to its
    device (so only the shards reach it), with
    ``hparams["fsdp_cpu_offload"]`` (default False; with offload on a GPU
    the layers are sharded right after speechbrain moved the model to the
    device, so that the shards stay in CPU memory:
    :func:`~speechbrain_blspkd.utils.sharding.shards_after_move`);
    training, evaluation, checkpoints and decoding then follow
    :mod:`speechbrain_blspkd.utils.sharding`.  ``"fsdp"`` without a launch
    trains in one process (logged); unsupported combinations raise
    :class:`~speechbrain_blspkd.utils.sharding.ShardingError`.
    """

    stage = None

    def __init__(
        self,
        modules=None,
        opt_class=None,
        hparams=None,
        run_opts=None,
        checkpointer=None,
    ):
        run_opts = resolve_run_precision(hparams, run_opts)
        # given run options win over hparams, as in speechbrain's Brain
        given = getattr(run_opts, "overridden_args", run_opts)
        opts = {
            **(hparams or {}),
            **{k: v for k, v in run_opts.items() if k in given},
        }
        strategy, cpu_offload, shard_later = "ddp", False, False
        if hparams is not None:
            strategy = hparams.get("distributed_strategy", "ddp")
            cpu_offload = bool(hparams.get("fsdp_cpu_offload", False))
        self.distributed_strategy = sharding.resolve_strategy(
            strategy,
            precision=opts.get("precision") or "fp32",
            data_parallel=bool(opts.get("data_parallel_backend", False)),
        )
        if self.distributed_strategy == "fsdp":
            model = (modules or {}).get("model")
            if model is None or not hasattr(model, "llm"):
                raise sharding.ShardingError(
                    "distributed_strategy: fsdp needs modules['model'], a "
                    "SpeechLLMModel"
                )
            device = opts.get("device") or sb.utils.distributed.infer_device()
            if str(device).startswith("cuda:"):
                torch.cuda.set_device(int(str(device).split(":")[1]))
            shard_later = sharding.shards_after_move(device, cpu_offload)
            if not shard_later:  # only the shards reach the device
                sharding.shard_model(
                    model,
                    device=device,
                    cpu_offload=cpu_offload,
                )
        super().__init__(
            modules=modules,
            opt_class=opt_class,
            hparams=hparams,
            run_opts=run_opts,
            checkpointer=checkpointer,
        )
        if shard_later:
            # speechbrain moved every module to the device; the offloaded
            # shards must live in CPU memory: shard now (they leave the GPU)
            sharding.shard_model(model, device=self.device, cpu_offload=True)
            sharding.check_offloaded(model)

    @property
    def model(self):
        """The (unwrapped) speech-LLM model."""
        return unwrap(self.modules.model)

    @property
    def sharded(self):
        """Whether the model is sharded (``distributed_strategy: fsdp``)."""
        return self.distributed_strategy == "fsdp"

    def _wrap_distributed(self):
        """Wrap once: ``fit`` runs once per stage and must not re-wrap.

        A sharded model (sharded at construction) is not wrapped again.
        """
        if self.sharded:
            return
        wrapped = (
            torch.nn.parallel.DistributedDataParallel,
            torch.nn.DataParallel,
        )
        if any(isinstance(m, wrapped) for m in self.modules.values()):
            return
        super()._wrap_distributed()

    def _objective_parameters(self):
        """The current stage objective's own trainable parameters (e.g.
        projection heads; :meth:`~speechbrain_blspkd.objectives.Objective.
        trainable_parameters`), or none."""
        objective = getattr(self.stage, "objective", None)
        params = getattr(objective, "trainable_parameters", None)
        return list(params()) if params is not None else []

    def _place_objective(self, stage=None):
        """Move the stage's objective (its heads, a frozen teacher) to the
        run's device; train mode only in training."""
        objective = getattr(self.stage, "objective", None)
        if isinstance(objective, torch.nn.Module):
            objective.to(self.device)
            objective.train(stage == sb.Stage.TRAIN)

    def init_optimizers(self):
        """The stage's optimiser (trainable parameters only) and schedule.

        The optimiser trains the model's trainable parameters and those the
        stage's objective owns (training-only heads, never exported).  The
        optimiser state and the schedule are registered in the checkpointer
        under the stage's name (optional on load: a checkpoint of an
        earlier stage has none, so each stage starts with a fresh
        optimiser).
        """
        if self.opt_class is None:
            return
        self._place_objective(sb.Stage.TRAIN)
        params = [p for p in self.modules.parameters() if p.requires_grad]
        known = {id(p) for p in params}
        params += [
            p for p in self._objective_parameters() if id(p) not in known
        ]
        self.optimizer = self.opt_class(params)
        self.optimizers_dict = {"opt_class": self.optimizer}
        self.scheduler = None
        if self.stage is not None:
            self.scheduler = self.stage.make_scheduler(
                self.optimizer, getattr(self, "steps_per_epoch", None)
            )
            name = f"scheduler_{self.stage.name}"
            if self.scheduler is not None and self.checkpointer is not None:
                self.checkpointer.recoverables.pop(name, None)
                self.checkpointer.add_recoverable(
                    name, self.scheduler, optional_load=True
                )
        if self.checkpointer is None:
            return
        # One optimiser state per stage: a stage starts with a fresh one
        # (its objective may own other heads than the previous stage's, so
        # the parameter groups differ) and a resumed stage recovers its own.
        for key in [
            k
            for k in self.checkpointer.recoverables
            if k.startswith("optimizer")
        ]:
            self.checkpointer.recoverables.pop(key)
        name = (
            "optimizer"
            if self.stage is None
            else f"optimizer_{self.stage.name}"
        )
        if self.sharded:
            # gathered on save (every process), one file format for all runs
            self.checkpointer.add_recoverable(
                name,
                self.optimizer,
                custom_load_hook=sharding.load_optimizer,
                custom_save_hook=sharding.save_optimizer,
                optional_load=True,
            )
        else:
            self.checkpointer.add_recoverable(
                name, self.optimizer, optional_load=True
            )

    def optimizers_step(self):
        """The optimiser step; sharded runs average and clip here.

        Without sharding: speechbrain's step (DDP has averaged the
        gradients).  Sharded: FSDP has reduced the sharded gradients; the
        replicated ones (adapter, unfrozen encoder) are averaged across
        processes, then the global norm of both is clipped to
        ``max_grad_norm`` as in one process.
        """
        if not self.sharded:
            # the objective's own parameters are outside DDP: average here
            sharding.sync_replicated_grads(self._objective_parameters())
            return super().optimizers_step()
        params = [
            p for group in self.optimizer.param_groups for p in group["params"]
        ]
        sharding.sync_replicated_grads(params)
        norm = sharding.clip_grad_norm_(
            self.optimizer.param_groups[0]["params"], self.max_grad_norm
        )
        if self.skip_nonfinite_grads and not torch.isfinite(norm):
            logger.warning("non-finite gradient norm: step skipped")
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_step += 1

    @contextlib.contextmanager
    def no_sync(self, use=True):
        """No gradient reduction inside (accumulation steps), DDP or FSDP."""
        if use and self.sharded:
            with sharding.gradient_sync(self.modules, False):
                yield
        else:
            with super().no_sync(use):
                yield

    # ------------------------------------------------------------------
    nonfinite_in_a_row = 0
    nonfinite_skipped = 0

    def fit_batch(self, batch):
        """One training step; a batch with a non-finite loss is skipped.

        The skip is agreed across DDP ranks (all skip, so no rank waits in a
        gradient all-reduce), counted (``nonfinite_skipped``) and logged;
        after more than ``nonfinite_patience`` (a speechbrain run option)
        such batches in a row training stops with an error.
        """
        should_step = (self.step % self.grad_accumulation_factor) == 0
        self.on_fit_batch_start(batch, should_step)
        with self.no_sync(not should_step):
            with self.training_ctx:
                outputs = self.compute_forward(batch, sb.Stage.TRAIN)
                loss = self.compute_objectives(outputs, batch, sb.Stage.TRAIN)
            if not _all_finite(loss):
                self._skip_nonfinite(batch)
                return loss.detach().cpu()
            self.nonfinite_in_a_row = 0
            scaled = self.scaler.scale(loss / self.grad_accumulation_factor)
            scaled.backward()
        if should_step:
            self.optimizers_step()
        self.on_fit_batch_end(batch, outputs, loss, should_step)
        return loss.detach().cpu()

    def _skip_nonfinite(self, batch):
        self.nonfinite_in_a_row += 1
        self.nonfinite_skipped += 1
        self.zero_grad(set_to_none=True)
        logger.warning(
            "non-finite loss on batch %s: skipped (%d in a row, %d in all)",
            list(batch.id),
            self.nonfinite_in_a_row,
            self.nonfinite_skipped,
        )
        if self.nonfinite_in_a_row > self.nonfinite_patience:
            raise FloatingPointError(
                f"{self.nonfinite_in_a_row} batches in a row had a "
                f"non-finite loss (nonfinite_patience="
                f"{self.nonfinite_patience}); last batch: {list(batch.id)}. "
                "Lower the learning rate or check the data."
            )

    # ------------------------------------------------------------------
    def _speech_inputs(self, batch):
        if hasattr(batch, "feats"):
            feats, feat_lens = batch.feats
            return {"feats": feats, "feat_lens": feat_lens}
        wavs, wav_lens = batch.sig
        return {"wavs": wavs, "wav_lens": wav_lens}

    def compute_forward(self, batch, stage):
        """One model call computing what the stage's objective requests.

        The utterance languages go to the model as indices (``languages``)
        when the adapter declares its language codes (the datasets then
        carry ``language_id``, see :func:`~speechbrain_blspkd.dataio.
        pipelines.dataio_prepare`).  The batch items
        the objective declares (:meth:`~speechbrain_blspkd.objectives.
        Objective.data_keys`) go to it as ``outputs.data``.
        """
        batch = batch.to(self.device)
        objective = self.stage.objective
        out = self.modules.model(
            transcripts=batch.transcript,
            continuations=batch.continuation,
            add_eot=[not t for t in batch.truncated_flag],
            request=objective.request(stage),
            languages=getattr(batch, "language_id", None),
            token_spans=_token_spans(batch),
            **self._speech_inputs(batch),
        )
        keys = objective.data_keys() if hasattr(objective, "data_keys") else ()
        out.data = {k: getattr(batch, k) for k in keys if hasattr(batch, k)}
        return out

    def compute_objectives(self, predictions, batch, stage):
        """The stage objective's loss; its stats logged / accumulated."""
        loss, stats = self.stage.objective(predictions, self.model, stage)
        if stage != sb.Stage.TRAIN:
            with torch.no_grad():
                stats.update(
                    self.model.adapter.diagnostics(
                        predictions.adapter, predictions.targets
                    )
                )
            n = len(batch.id)
            # a stat that is a mean over positions is weighted by its
            # positions (Objective.stat_counts), others by the utterances
            counts = getattr(self.stage.objective, "stat_counts", None)
            counts = counts(predictions) if counts is not None else {}
            for key, value in stats.items():
                w = counts.get(key, n)
                self._eval_sums[key] = self._eval_sums.get(key, 0.0) + value * w
                self._eval_weights[key] = self._eval_weights.get(key, 0) + w
            self._eval_count += n
        self._last_stats = stats
        return loss

    def on_stage_start(self, stage, epoch=None):
        """Reset the evaluation accumulators; the objective on the device."""
        self._eval_sums, self._eval_count, self._eval_weights = {}, 0, {}
        self._place_objective(stage)

    def eval_summary(self):
        """Means of the stats of the last valid/test pass: over every
        position for the stats an objective counts in positions (the KL
        terms: the mean over all distilled positions of the pass), else
        over the utterances."""
        n = max(self._eval_count, 1)
        return {
            k: v / max(self._eval_weights.get(k, n), 1e-12)
            for k, v in self._eval_sums.items()
            if k != "loss"
        }

    def on_fit_batch_end(self, batch, outputs, loss, should_step):
        """Step-level log (JSONL, main process) for the training curves.

        Every process calls the TensorBoard logger (speechbrain's loggers
        broadcast from the main process, a collective); only the main
        process writes.
        """
        if not should_step:
            return
        every = self.hparams.log_every_n_steps
        if every and self.optimizer_step % every == 0:
            row = {
                "stage": self.stage.name,
                "step": self.optimizer_step,
                **getattr(self, "_last_stats", {}),
                "loss": float(loss.detach()),
            }
            row["lr"] = self.optimizer.param_groups[0]["lr"]
            row["time"] = round(time.time(), 3)  # wall clock: s/step
            if sb.utils.distributed.if_main_process():
                _append_jsonl(self.hparams.step_log, row)
            self._tensorboard(row, self.optimizer_step, prefix="train_step")

    def _tensorboard(self, stats, step, prefix):
        """Also log the numbers of ``stats`` to TensorBoard.

        Through speechbrain's ``TensorboardLogger`` (created on first use;
        events go to ``<step_log folder>/tensorboard``): each number becomes
        the scalar ``<prefix>/<key>`` at the optimiser step ``step``, so the
        training steps (``train_step/...``) and the validations of each
        stage (``valid_<stage>/...``) share one x axis.  Without the
        ``tensorboard`` package this does nothing (said once in the log).

        Arguments
        ---------
        stats : dict
            Name -> value; values that are not numbers, and ``step``, are
            left out.
        step : int
            The optimiser step the values belong to.
        prefix : str
            Tag prefix.
        """
        tb = getattr(self, "_tb_logger", None)
        if tb is None:
            from speechbrain.utils.train_logger import TensorboardLogger

            folder = os.path.join(
                os.path.dirname(self.hparams.step_log), "tensorboard"
            )
            try:
                self._tb_logger = tb = TensorboardLogger(folder)
            except ImportError:
                logger.info("tensorboard not installed: step log only")
                self._tb_logger = tb = False
        if tb is False:
            return
        scalars = {
            f"{prefix}/{key}": value
            for key, value in stats.items()
            if isinstance(value, (int, float)) and key != "step"
        }
        # log_stats writes stats_meta at global_step["meta"] + 1
        tb.global_step["meta"] = step - 1
        tb.log_stats(stats_meta=scalars)  # main process only (broadcast)
        if tb.writer is not None:
            tb.writer.flush()

    def on_fit_batch_start(self, batch, should_step):
        """Advance the stage's schedule before each optimiser step, and
        tell the adapter how far the stage is
        (:meth:`~speechbrain_blspkd.nnet.adapter.SpeechAdapter.
        set_training_progress`)."""
        if should_step:
            Stage.step(self.scheduler)
        adapter = getattr(self.model, "adapter", None)
        if adapter is not None:
            adapter.set_training_progress(self.stage_progress())

    def stage_progress(self):
        """Fraction of the current stage's optimiser steps done, in [0, 1).

        ``(epoch - 1) * steps_per_epoch + steps done in this epoch`` over
        ``epochs.limit * steps_per_epoch``, from the stage's epoch counter
        and the batch counter of the epoch, so a resumed run continues from
        where it stopped. 0 when the steps per epoch are unknown.
        """
        steps = getattr(self, "steps_per_epoch", None)
        limit = self.stage.epochs.limit if self.stage is not None else 0
        if not steps or not limit:
            return 0.0
        epoch = max(int(self.stage.epochs.current), 1)
        in_epoch = max(self.step - 1, 0) // self.grad_accumulation_factor
        done = (epoch - 1) * steps + min(in_epoch, steps - 1)
        return min(max(done / (limit * steps), 0.0), 1.0)

    def on_stage_end(self, stage, stage_loss, epoch=None):
        """Log and checkpoint (keep the best by valid loss)."""
        stats = {"loss": stage_loss}
        if stage == sb.Stage.TRAIN:
            self.train_stats = stats
            return
        stats.update(self.eval_summary())
        # a stat named "<name>/<part>" is a breakdown (e.g. the language
        # gate's confusion, one per pair of languages): kept in the test
        # summary and TensorBoard, left out of the log file's lines
        summary = {k: v for k, v in stats.items() if "/" not in k}
        if stage == sb.Stage.VALID:
            self.hparams.train_logger.log_stats(
                stats_meta={"stage": self.stage.name, "epoch": epoch},
                train_stats=self.train_stats,
                valid_stats=summary,
            )
            # every process: speechbrain's loggers are collectives
            self._tensorboard(
                stats, self.optimizer_step, f"valid_{self.stage.name}"
            )
            self.checkpointer.save_and_keep_only(
                meta={"loss": stage_loss, "stage": self.stage.name},
                min_keys=["loss"],
                num_to_keep=self.hparams.ckpt_keep,
                name=f"{self.stage.name}-E{epoch}",
            )
        else:
            self.test_stats = stats
            self.hparams.train_logger.log_stats(
                stats_meta={"objective of stage": self.stage.name},
                test_stats=summary,
            )


def _all_finite(loss):
    """Whether the loss is finite on every DDP rank."""
    flag = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def _append_jsonl(path, row):
    import json

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def _token_spans(batch):
    """The batch's token timings as (B, N, 2) seconds, padding marked -1
    (None when the recipe stores no timings)."""
    if not hasattr(batch, "token_spans"):
        return None
    spans, lengths = batch.token_spans
    counts = torch.round(lengths * spans.shape[1]).long()
    real = torch.arange(spans.shape[1], device=spans.device)[None]
    real = real < counts.to(spans.device)[:, None]
    return spans.masked_fill(~real[..., None], -1.0)
