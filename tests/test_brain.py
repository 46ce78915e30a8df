"""The generic Brain with a tiny model: stages, non-finite losses,
determinism, schedules."""

import math

import pytest
import speechbrain as sb
import torch
from speechbrain.dataio.batch import PaddedBatch
from speechbrain.utils.epoch_loop import EpochCounter

from speechbrain_blspkd.models.trainable import trainable_state_dict
from speechbrain_blspkd.objectives import BLSPKDObjective
from speechbrain_blspkd.stages import Stage
from speechbrain_blspkd.testing import tiny_brain, tiny_speech_llm


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    items = [
        dict(
            id=f"u{i}",
            sig=torch.randn(3000 + 700 * i, generator=g) * 0.1,
            transcript=t,
            continuation=c,
            truncated_flag=i == 1,
        )
        for i, (t, c) in enumerate(
            [("the cat sat", "on the mat."), ("a dog ran", "far away")]
        )
    ]
    return PaddedBatch(items)


def _stages():
    align = BLSPKDObjective({"align": 1.0, "cif": 1.0})
    kd = BLSPKDObjective(
        {"input_kl": 1.0, "response_kl": 1.0, "cif": 1.0, "align": 0.3}
    )
    return [
        Stage("align", align, "train.csv", EpochCounter(1), {}, lr=1e-3),
        Stage("kd", kd, "train_kd.csv", EpochCounter(1), {}, lr=1e-3),
    ]


def _brain(tmp_path, patience=3, seed=0, adapter=None, **run_opts):
    torch.manual_seed(seed)
    return tiny_brain(
        tiny_speech_llm(adapter=adapter),
        _stages()[1],
        str(tmp_path / "steps.jsonl"),
        nonfinite_patience=patience,
        **run_opts,
    )


def test_kd_and_align_stages_train(tmp_path):
    brain = _brain(tmp_path)
    batch = _batch()
    losses = [float(brain.fit_batch(batch)) for _ in range(4)]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    brain.stage = _stages()[0]
    out = brain.compute_forward(batch, sb.Stage.TRAIN)
    assert out.student is None and out.teacher is None  # no LLM pass
    loss = brain.compute_objectives(out, batch, sb.Stage.TRAIN)
    assert math.isfinite(float(loss.detach()))
    lines = (tmp_path / "steps.jsonl").read_text().splitlines()
    assert len(lines) == 4 and '"stage": "kd"' in lines[0]


def test_nonfinite_loss_is_skipped_counted_and_stops(tmp_path, monkeypatch):
    brain = _brain(tmp_path, patience=2)
    batch = _batch()
    # clone: a state dict holds the live parameter tensors
    before = {
        k: v.clone() for k, v in trainable_state_dict(brain.model).items()
    }
    real = brain.compute_objectives
    monkeypatch.setattr(
        brain, "compute_objectives", lambda *a: real(*a) * float("nan")
    )
    for _ in range(2):
        assert math.isnan(float(brain.fit_batch(batch)))
    after = trainable_state_dict(brain.model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert brain.nonfinite_skipped == 2
    # a finite batch resets the run of failures
    monkeypatch.setattr(brain, "compute_objectives", real)
    assert math.isfinite(float(brain.fit_batch(batch)))
    assert brain.nonfinite_in_a_row == 0
    stepped = trainable_state_dict(brain.model)
    assert not all(torch.equal(before[k], stepped[k]) for k in before)
    monkeypatch.setattr(
        brain, "compute_objectives", lambda *a: real(*a) * float("inf")
    )
    brain.fit_batch(batch)
    brain.fit_batch(batch)
    with pytest.raises(FloatingPointError, match=r"3 batches in a row.*u0"):
        brain.fit_batch(batch)
    assert brain.nonfinite_skipped == 5


def test_same_seed_gives_identical_losses(tmp_path):
    runs = []
    for _ in range(2):
        brain = _brain(tmp_path, seed=7)
        runs.append([float(brain.fit_batch(_batch())) for _ in range(3)])
    assert runs[0] == runs[1]


def _scalar_events(folder):
    from tensorboard.backend.event_processing.event_accumulator import (
        EventAccumulator,
    )

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
    }


def test_steps_go_to_tensorboard(tmp_path):
    """Real event files (speechbrain's TensorboardLogger) read back: one
    scalar per number of the step log, at the optimiser step."""
    import json

    brain = _brain(tmp_path)
    brain.hparams.log_every_n_steps = 2
    for seed in range(5):
        brain.fit_batch(_batch(seed))
    brain._tensorboard(
        {"loss": 0.25, "wer": 12, "stage": "kd", "step": 99}, 5, "valid_kd"
    )
    rows = [
        json.loads(line)
        for line in (tmp_path / "steps.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in rows] == [2, 4]
    scalars = _scalar_events(tmp_path / "tensorboard")
    numbers = [k for k, v in rows[0].items() if k not in ("stage", "step")]
    assert {"loss", "input_kl", "lr"} <= set(numbers)
    expected = {f"train_step/{k}" for k in numbers}
    assert set(scalars) == expected | {"valid_kd/loss", "valid_kd/wer"}
    for key in numbers:
        got = scalars[f"train_step/{key}"]
        assert [step for step, _ in got] == [2, 4], key
        assert [value for _, value in got] == pytest.approx(
            [float(r[key]) for r in rows], rel=1e-6, abs=1e-7
        ), key
    assert scalars["valid_kd/loss"] == [(5, 0.25)]
    assert scalars["valid_kd/wer"] == [(5, 12.0)]


def test_without_tensorboard_only_the_step_log(tmp_path, monkeypatch, caplog):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    brain = _brain(tmp_path)
    with caplog.at_level("INFO", logger="speechbrain_blspkd.brain"):
        brain.fit_batch(_batch())
        brain.fit_batch(_batch())
    assert caplog.text.count("tensorboard not installed") == 1
    assert len((tmp_path / "steps.jsonl").read_text().splitlines()) == 2
    assert not (tmp_path / "tensorboard").exists()


def test_dynamic_batching_buckets_by_duration_and_follows_the_epoch():
    from speechbrain.dataio.dataset import DynamicItemDataset

    from speechbrain_blspkd.dataio.sampler import loader_kwargs

    durations = [1.0, 9.0, 1.2, 8.5, 1.1, 9.5, 0.9, 8.8, 1.05, 9.2]
    data = {f"u{i}": {"duration": d} for i, d in enumerate(durations)}
    dataset = DynamicItemDataset(data)
    opts = {
        "batch_size": 4,
        "shuffle": True,
        "num_workers": 0,
        "dynamic_batching": {
            "max_batch_length": 20,
            "num_buckets": 2,
            "shuffle": True,
            "batch_ordering": "random",
            "seed": 3,
        },
    }
    kwargs = loader_kwargs(opts, dataset)
    assert "batch_size" not in kwargs and "shuffle" not in kwargs
    assert kwargs["num_workers"] == 0
    sampler = kwargs["batch_sampler"]

    def epoch(n):
        sampler.set_epoch(n)
        return [list(b) for b in sampler]

    first = epoch(1)
    seen = sorted(i for b in first for i in b)
    assert seen == list(range(len(durations)))  # each utterance once
    for batch in first:  # short and long clips never share a batch
        lengths = {durations[i] > 5 for i in batch}
        assert len(lengths) == 1
    assert epoch(1) == first  # a resumed epoch sees the same batches
    # fixed-size options pass through untouched
    assert loader_kwargs({"batch_size": 4}, dataset) == {"batch_size": 4}


def test_stage_schedule_warms_up_decays_and_resumes(tmp_path):
    """The stage's schedule sets the learning rate per optimiser step, from
    lr/warmup up to lr and down to min_lr_rate x lr; its state is what a
    resumed run continues from."""
    from functools import partial

    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    brain = _brain(tmp_path)
    stage = _stages()[1]
    stage.lr = 0.01
    stage.scheduler = partial(
        get_cosine_with_min_lr_schedule_with_warmup,
        num_warmup_steps=2,
        min_lr_rate=0.1,
    )
    brain.stage = stage
    brain.steps_per_epoch = 5
    brain.init_optimizers()
    assert stage.total_steps == 5
    lrs = []
    for _ in range(5):
        brain.fit_batch(_batch())
        lrs.append(brain.optimizer.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.005) and lrs[1] == pytest.approx(0.01)
    assert lrs[1] > lrs[2] > lrs[3] > lrs[4] == pytest.approx(0.001)
    state = brain.scheduler.state_dict()
    again = _brain(tmp_path)
    again.stage = stage
    again.steps_per_epoch = 5
    again.init_optimizers()
    again.scheduler.load_state_dict(state)
    again.fit_batch(_batch())
    # continues after step 5 instead of restarting the warm-up
    assert again.optimizer.param_groups[0]["lr"] < 0.005


def test_validation_stats_come_from_the_objective_and_the_adapter(tmp_path):
    brain = _brain(tmp_path)
    brain.on_stage_start(sb.Stage.VALID)
    with torch.no_grad():
        brain.evaluate_batch(_batch(), sb.Stage.VALID)
        brain.evaluate_batch(_batch(1), sb.Stage.VALID)
    summary = brain.eval_summary()
    # objective terms and metrics, and the CFormer's count diagnostics
    for key in ("input_kl", "response_kl", "token_acc", "exact_count"):
        assert key in summary, key
    assert 0.0 <= summary["exact_count"] <= 1.0
    assert summary["input_kl"] > 0


def test_encoder_fn_pads_right_and_crops_each_row():
    """Feature-cache encoding: right zero-padding with SpeechBrain relative
    lengths in, each row cut back to its own frames out."""
    from speechbrain_blspkd.recipe import _encoder_fn

    calls = []

    def encoder(batch, rel):  # one frame per 10 samples: (sum, frame index)
        calls.append((batch.clone(), rel.clone()))
        sums = batch.reshape(batch.shape[0], -1, 10).sum(-1)
        index = torch.arange(sums.shape[1]).expand_as(sums).float()
        return torch.stack([sums, index], -1), rel

    encode = _encoder_fn(encoder, "cpu")
    wavs = [torch.full((30,), 1.0), torch.full((50,), 2.0, dtype=torch.float64)]
    wavs.append(torch.full((20,), 3.0))
    feats = encode(wavs)
    batch, rel = calls[0]
    assert batch.shape == (3, 50) and batch.dtype == torch.float32
    assert torch.equal(batch[0, 30:], torch.zeros(20))  # padding is zeros
    assert torch.equal(
        batch[2], torch.cat([torch.full((20,), 3.0), torch.zeros(30)])
    )
    torch.testing.assert_close(rel, torch.tensor([0.6, 1.0, 0.4]))
    assert [f.shape for f in feats] == [(3, 2), (5, 2), (2, 2)]
    assert feats[1][:, 0].tolist() == [20.0] * 5
    assert feats[2][:, 1].tolist() == [0.0, 1.0]
    assert all(f.dtype == torch.float32 for f in feats)
    # a batch of one
    (alone,) = encode([torch.ones(40)])
    assert alone.shape == (4, 2)
    torch.testing.assert_close(calls[1][1], torch.tensor([1.0]))


def test_the_adapter_is_told_the_fraction_of_the_stage_done(tmp_path):
    """The generic progress hook: before every training batch the adapter
    gets the optimiser steps done over the stage's total (here 1 epoch of
    2 steps, gradient accumulation 2: 4 batches); evaluation never calls
    it."""
    from speechbrain_blspkd.nnet.cformer import CFormer

    told = []

    class Recording(CFormer):
        def set_training_progress(self, fraction):
            told.append(fraction)

    brain = _brain(
        tmp_path,
        adapter=Recording(64, 64, n_pre=1, n_post=1, nhead=4, d_ffn=128),
        grad_accumulation_factor=2,
    )
    brain.steps_per_epoch = 2
    brain.stage.epochs.current = 1
    for step in range(1, 5):
        brain.step = step
        brain.fit_batch(_batch())
    assert told == [0.0, 0.0, 0.5, 0.5]
    brain.on_stage_start(sb.Stage.VALID)
    with torch.no_grad():
        brain.evaluate_batch(_batch(), sb.Stage.VALID)
    assert len(told) == 4


def test_objective_owned_parameters_are_trained_and_checkpointed(tmp_path):
    """An objective may own modules (a frozen teacher, trainable heads):
    the Brain optimises the trainable ones with the model and places the
    objective on its device; the checkpoint hooks save those only."""

    class WithHead(BLSPKDObjective):
        def __init__(self):
            super().__init__({"response_kl": 1.0})
            self.head = torch.nn.Parameter(torch.ones(()))
            self.teacher = torch.nn.Linear(2, 2).requires_grad_(False)

        def terms(self, outputs, model, stage):
            terms = super().terms(outputs, model, stage)
            kl = terms["response_kl"]
            terms["response_kl"] = lambda: kl() * self.head
            return terms

    objective = WithHead()
    stage = Stage("kd", objective, "train_kd.csv", EpochCounter(1), {}, lr=0.1)
    torch.manual_seed(0)
    brain = tiny_brain(tiny_speech_llm(), stage, str(tmp_path / "s.jsonl"))
    params = [p for g in brain.optimizer.param_groups for p in g["params"]]
    assert any(p is objective.head for p in params)
    assert not any(p is objective.teacher.weight for p in params)
    assert objective.head.device == torch.device(brain.device)
    brain.fit_batch(_batch())
    assert objective.head.item() != 1.0
    objective.save_trainable(tmp_path / "objective.ckpt")
    assert list(torch.load(tmp_path / "objective.ckpt")) == ["head"]
    other = WithHead()
    other.load_trainable(tmp_path / "objective.ckpt")
    assert other.head.item() == objective.head.item()
