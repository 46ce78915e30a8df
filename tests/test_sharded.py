"""Sharded data parallelism (``distributed_strategy: fsdp``, FSDP2) on CPU.

* fast, one process: strategy checks, the choice of FSDP units, clipping;
* two processes (``torchrun``, gloo) with a tiny model: a ``SpeechLLMBrain``
  trained with ``fsdp`` writes the checkpoint a ``ddp`` one writes (same
  global batch, gradient accumulation, clipping); checkpoints in both
  directions between a sharded and a single-process model (weights and
  optimiser state); teacher / student passes and decoding (in step under
  the sharded model, and rank-local inside ``gathered``);
* the SynthSpeech recipe with ``--distributed_strategy=fsdp`` (2 processes):
  training, decoding, export, and a single-process run resuming from its
  checkpoint.

Run as a script (``torchrun ... tests/test_sharded.py OUT``) this file is
the two-process worker.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from speechbrain_blspkd.testing import tiny_speech_llm
from speechbrain_blspkd.utils import sharding

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------
# one process
def test_resolve_strategy_choices_and_errors(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert sharding.resolve_strategy("ddp") == "ddp"
    # fsdp without a launch: nothing to shard, one process trains it all
    assert sharding.resolve_strategy("fsdp") == "ddp"
    assert sharding.resolve_strategy("fsdp", distributed=True) == "fsdp"
    with pytest.raises(sharding.ShardingError, match="'zero3' is not one"):
        sharding.resolve_strategy("zero3")
    with pytest.raises(sharding.ShardingError, match="fp16"):
        sharding.resolve_strategy("fsdp", precision="fp16", distributed=True)
    with pytest.raises(sharding.ShardingError, match="data_parallel"):
        sharding.resolve_strategy("fsdp", data_parallel=True)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(sharding.ShardingError, match="ddp_init_group"):
        sharding.resolve_strategy("fsdp")


def test_units_are_the_decoder_layers():

    llm = tiny_speech_llm(whisper=False, llm_type="qwen2").llm
    names = [n for n, _ in sharding.decoder_layers(llm)]
    assert names == ["model.layers.0", "model.layers.1"]
    # without _no_split_modules the layers are found in base_model.layers
    llm._no_split_modules = None
    assert [n for n, _ in sharding.decoder_layers(llm)] == names
    with pytest.raises(sharding.ShardingError, match="decoder layers"):
        sharding.decoder_layers(torch.nn.Linear(2, 2))
    with pytest.raises(sharding.ShardingError, match="process group"):
        sharding.shard_model(tiny_speech_llm(whisper=False))


def test_clip_grad_norm_matches_torch():
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for p, q in zip(a, b):
        p.grad = torch.randn_like(p) * 3
        q.grad = p.grad.clone()
    a[1].grad = b[1].grad = None
    ref = torch.nn.utils.clip_grad_norm_(a, 0.5)
    norm = sharding.clip_grad_norm_(b, 0.5)
    assert torch.equal(norm, ref)
    for p, q in zip(a, b):
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad)


def test_fsdp_in_one_process_trains_unsharded(tmp_path):
    from speechbrain_blspkd.brain import SpeechLLMBrain

    model = tiny_speech_llm(whisper=False)
    brain = SpeechLLMBrain(
        modules={"model": model},
        opt_class=lambda params: torch.optim.AdamW(params, lr=1e-3),
        hparams={"distributed_strategy": "fsdp"},
        run_opts={"device": "cpu"},
    )
    assert not brain.sharded and not sharding.is_sharded(model)
    with pytest.raises(sharding.ShardingError, match="not one of"):
        SpeechLLMBrain(
            modules={"model": model},
            hparams={"distributed_strategy": "zero"},
            run_opts={"device": "cpu"},
        )


# ----------------------------------------------------------------------
# two processes
def _env():
    return dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(ROOT),
    )


def _torchrun(args, cwd, port):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={port}",
        *args,
    ]
    proc = subprocess.run(
        cmd, cwd=cwd, env=_env(), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.mark.slow
def test_sharded_model_checkpoints_and_decoding(tmp_path):
    _torchrun([__file__, str(tmp_path)], ROOT, 29551)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["checks"] == WORKER_CHECKS, result


def _assert_same(a, b, what):
    assert list(a) == list(b), what
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


WORKER_CHECKS = [
    "fsdp_brain_equals_ddp_brain",
    "sharded",
    "sharded_to_single_weights",
    "sharded_to_single_optimizer",
    "single_to_sharded_weights",
    "single_to_sharded_optimizer",
    "teacher_student_passes",
    "generate_in_step",
    "generate_rank_local",
    "resharded",
]


def _speech_batch(rank, step):
    from speechbrain.dataio.batch import PaddedBatch

    g = torch.Generator().manual_seed(100 * rank + step)
    texts = [("the cat sat", "on the mat."), ("a dog ran", "far away")]
    return PaddedBatch(
        [
            dict(
                id=f"r{rank}s{step}u{i}",
                sig=torch.randn(3000 + 900 * i + 300 * step, generator=g) * 0.1,
                transcript=t,
                continuation=c,
                truncated_flag=i == 1,
            )
            for i, (t, c) in enumerate(texts)
        ]
    )


def _trained_brain(strategy, folder):
    """A SpeechLLMBrain trained for 4 micro-batches (2 optimiser steps) on this
    rank's data, checkpointed to ``folder``."""
    from functools import partial

    from speechbrain.utils.checkpoints import Checkpointer
    from speechbrain.utils.epoch_loop import EpochCounter
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    from speechbrain_blspkd.brain import SpeechLLMBrain
    from speechbrain_blspkd.models.trainable import TrainableWeights
    from speechbrain_blspkd.objectives import BLSPKDObjective
    from speechbrain_blspkd.stages import Stage

    torch.manual_seed(0)
    model = tiny_speech_llm(llm_dtype="bfloat16")
    checkpointer = Checkpointer(
        folder, recoverables={"weights": TrainableWeights(model)}
    )
    weights = {"input_kl": 1.0, "response_kl": 1.0, "cif": 1.0, "align": 0.3}
    brain = SpeechLLMBrain(
        modules={"model": model},
        opt_class=lambda params: torch.optim.AdamW(params, lr=1e-2),
        hparams=dict(
            distributed_strategy=strategy,
            log_every_n_steps=0,
            step_log=str(folder / "steps.jsonl"),
        ),
        run_opts=dict(
            device="cpu",
            distributed_backend="gloo",
            precision="bf16",
            grad_accumulation_factor=2,
            max_grad_norm=1.0,
        ),
        checkpointer=checkpointer,
    )
    brain.stage = Stage(
        "kd",
        BLSPKDObjective(weights),
        "unused.csv",
        EpochCounter(1),
        {},
        lr=1e-2,
        scheduler=partial(
            get_cosine_with_min_lr_schedule_with_warmup,
            num_warmup_steps=0,
            min_lr_rate=0.0,
        ),
        total_steps=10,
    )
    brain._wrap_distributed()
    brain.init_optimizers()
    brain.on_stage_start(None)
    brain.modules.train()
    torch.manual_seed(1)  # the same dropout masks in both runs
    rank = torch.distributed.get_rank()
    for step in range(4):
        brain.step += 1
        brain.fit_batch(_speech_batch(rank, step))
    checkpointer.save_checkpoint(name="E1")
    return brain


def _worker(out):
    """The two-process checks (see the module notes); writes rankN.json."""
    import torch.distributed as dist

    from speechbrain_blspkd.models.trainable import (
        TrainableWeights,
        trainable_state_dict,
    )

    out = pathlib.Path(out)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    checks = []

    # The same global batch (2 processes x 2 utterances x 2 accumulation
    # steps), 2 optimiser steps of the KD objective (teacher and student LLM
    # passes): DDP and FSDP brains write the same checkpoint.  Tolerance 0:
    # the FSDP run does the same float operations (all-gathered weights are
    # bit copies, averaging over 2 processes is an exact halving in both,
    # clipping combines per-tensor norms in the same order; only a sharded
    # tensor's squared norm is summed over its 2 shards, which was exact in
    # every run here: loosen to 1e-6 if a platform rounds it differently).
    brains = {s: _trained_brain(s, out / s) for s in ("ddp", "fsdp")}
    assert brains["fsdp"].sharded and not brains["ddp"].sharded
    # speechbrain's Checkpointer writes on the main process only and does
    # not wait: without this, rank 1 read a half-written optimizer file
    # (FileNotFoundError, one launch in five under load)
    dist.barrier()
    files = {
        s: {
            name: torch.load(out / s / "CKPT+E1" / f"{name}.ckpt")
            for name in ("weights", "optimizer_kd")
        }
        for s in brains
    }
    _assert_same(files["fsdp"]["weights"], files["ddp"]["weights"], "weights")
    lora_b = [k for k in files["fsdp"]["weights"] if k.endswith("lora_B")]
    assert lora_b and all(
        float(files["fsdp"]["weights"][k].abs().max()) > 0 for k in lora_b
    )
    opt_files = {s: f["optimizer_kd"] for s, f in files.items()}
    assert opt_files["fsdp"]["param_groups"] == opt_files["ddp"]["param_groups"]
    for idx, entry in opt_files["ddp"]["state"].items():
        assert int(entry["step"]) == 2
        _assert_same(opt_files["fsdp"]["state"][idx], entry, f"state {idx}")
    checks.append("fsdp_brain_equals_ddp_brain")

    def build():
        torch.manual_seed(0)
        return tiny_speech_llm(llm_dtype="bfloat16")

    def trainable(m):
        return [p for p in m.parameters() if p.requires_grad]

    g = torch.Generator().manual_seed(1)
    wavs = torch.randn(2, 4000, generator=g) * 0.1
    batch = dict(
        wavs=wavs,
        wav_lens=torch.tensor([1.0, 0.7]),
        transcripts=["the cat", "a dog ran"],
        continuations=["sat.", "away"],
        instructions="Repeat:",
    )
    model, opt, plain = brains["fsdp"].model, brains["fsdp"].optimizer, build()
    lora = model.llm.model.layers[0].self_attn.q_proj.lora_A
    assert sharding.is_dtensor(lora)
    assert lora.to_local().shape[0] < lora.shape[0]
    assert not sharding.is_dtensor(model.adapter.out_proj.weight)
    checks.append("sharded")

    # sharded -> the single-process format
    saved = files["fsdp"]["weights"]
    _assert_same(trainable_state_dict(model), saved, "gathered weights")
    assert list(saved) == list(trainable_state_dict(plain))
    TrainableWeights(plain).load(out / "fsdp" / "CKPT+E1" / "weights.ckpt")
    _assert_same(trainable_state_dict(plain), saved, "single-process load")
    checks.append("sharded_to_single_weights")
    popt = torch.optim.AdamW(trainable(plain), lr=1e-2)
    popt.load_state_dict(opt_files["fsdp"])
    ref = sharding.full_optimizer_state(opt)
    for idx, entry in popt.state_dict()["state"].items():
        _assert_same(entry, ref["state"][idx], f"optimizer state {idx}")
    checks.append("sharded_to_single_optimizer")

    # a single-process file -> each process keeps its shards
    other = {k: v + 0.01 * (i + 1) for i, (k, v) in enumerate(saved.items())}
    if rank == 0:
        torch.save(other, out / "single.ckpt")
        popt.param_groups[0]["lr"] = 0.5
        torch.save(popt.state_dict(), out / "single_opt.ckpt")
    dist.barrier()
    TrainableWeights(model).load(out / "single.ckpt")
    assert sharding.is_dtensor(lora)
    _assert_same(trainable_state_dict(model), other, "sharded load")
    checks.append("single_to_sharded_weights")
    sharding.load_optimizer(opt, out / "single_opt.ckpt")
    single = torch.load(out / "single_opt.ckpt")
    gathered_opt = sharding.full_optimizer_state(opt)
    assert gathered_opt["param_groups"][0]["lr"] == 0.5
    for idx, entry in single["state"].items():
        _assert_same(gathered_opt["state"][idx], entry, f"loaded state {idx}")
    checks.append("single_to_sharded_optimizer")

    # teacher (PLoRA off) and student passes: the same numbers as one process
    TrainableWeights(plain).load(out / "single.ckpt")
    model.eval()
    plain.eval()
    from speechbrain_blspkd.models.speech_llm import PassRequest

    request = PassRequest(teacher=True, student=True, logits=("input",))
    with torch.no_grad():
        a = model(**batch, request=request)
        b = plain(**batch, request=request)
    for side in ("teacher", "student"):
        torch.testing.assert_close(
            getattr(a, side).logits["input"],
            getattr(b, side).logits["input"],
            rtol=0,
            atol=0,
        )
    checks.append("teacher_student_passes")

    # decoding under the sharded model: every rank in step (HF synced_gpus)
    # even when the ranks decode different inputs
    mine = wavs[rank : rank + 1]
    assert model.generate(mine, max_new_tokens=5) == plain.generate(
        mine, max_new_tokens=5
    )
    assert model.generate_text(["a b", "c"], max_new_tokens=3) == (
        plain.generate_text(["a b", "c"], max_new_tokens=3)
    )
    checks.append("generate_in_step")
    # rank-local decoding (different numbers of calls) inside gathered()
    with sharding.gathered(model):
        up = model.llm.model.layers[0].mlp.up_proj.lora_A
        assert not sharding.is_dtensor(up)
        for n in range(rank + 2):
            texts = model.generate(wavs[: n % 2 + 1], max_new_tokens=5)
            assert texts == plain.generate(wavs[: n % 2 + 1], max_new_tokens=5)
    checks.append("generate_rank_local")
    assert sharding.is_dtensor(lora)
    with torch.no_grad():
        again = model(**batch, request=request)
    torch.testing.assert_close(
        again.student.logits["input"],
        b.student.logits["input"],
        rtol=0,
        atol=0,
    )
    checks.append("resharded")
    (out / f"rank{rank}.json").write_text(json.dumps({"checks": checks}))
    dist.destroy_process_group()


# ----------------------------------------------------------------------
# the recipe
@pytest.mark.slow
def test_recipe_fsdp_run_and_single_process_resume(tmp_path):
    from test_recipe_run import RECIPE, _overrides, _run

    from speechbrain_blspkd.testing import (
        tiny_saved_speech_llm as _tiny_model,
    )

    bases = tmp_path / "bases"
    _tiny_model(bases)
    data, out = tmp_path / "data", tmp_path / "out"
    replaced = (
        "--kd_train_subset",
        "--align_epochs_limit",
        "--kd_epochs_limit",
        "--kd_dataloader_opts",
        "--eval_untrained",
    )

    def overrides(kd_epochs, batch):
        over = [
            o
            for o in _overrides(bases, data, out)
            if not o.startswith(replaced)
        ]
        return over + [
            "--kd_train_subset=8",
            "--align_epochs_limit=0",
            f"--kd_epochs_limit={kd_epochs}",
            # fixed-size batches (the YAML's length buckets switched off)
            f"--kd_dataloader_opts={{batch_size: {batch}, shuffle: True, "
            "dynamic_batching: null}",
            "--eval_untrained=False",
            "--distributed_strategy=fsdp",
        ]

    # 2 processes x 1 utterance x 2 accumulation steps: 2 optimiser steps
    _torchrun(
        [
            "train.py",
            "hparams/blsp_kd.yaml",
            "--distributed_backend=gloo",
            "--grad_accumulation_factor=2",
            *overrides(kd_epochs=1, batch=1),
        ],
        RECIPE,
        29552,
    )
    ckpt = next((out / "save").glob("CKPT+kd-E1*"))
    weights = torch.load(ckpt / "weights.ckpt")
    lora_b = [v for k, v in weights.items() if k.endswith("lora_B")]
    assert lora_b and all(float(v.abs().max()) > 0 for v in lora_b)
    optim = torch.load(ckpt / "optimizer_kd.ckpt")
    assert all(int(e["step"]) == 2 for e in optim["state"].values())
    # decoding ran under FSDP; the export holds the trained weights
    summary = json.loads(
        (out / "eval" / "trained" / "summary.json").read_text()
    )
    assert summary["tasks"]["repeat"]["n"] == 4
    rows = (out / "eval" / "trained" / "rows.jsonl").read_text().splitlines()
    assert len(rows) == 8
    assert not list((out / "eval" / "trained").glob("rows.rank*"))
    exported = torch.load(out / "model" / "model.ckpt")
    assert list(exported) == list(weights)
    for key, value in exported.items():
        assert torch.equal(value, weights[key]), key

    # the FSDP checkpoint resumes in one process for a second epoch (the
    # same YAML option: fsdp without torchrun trains unsharded)
    cmd = [sys.executable, "train.py", "hparams/blsp_kd.yaml"]
    _run(cmd + overrides(kd_epochs=2, batch=4), RECIPE)
    log = (out / "train_log.txt").read_text()
    assert log.count("stage: kd, epoch: 1") == 1
    assert log.count("stage: kd, epoch: 2") == 1
    # 2 steps under FSDP + 2 here (8 utterances, batch 4): the optimiser
    # state of the FSDP run was loaded and continued
    resumed = torch.load(
        next((out / "save").glob("CKPT+kd-E2*")) / "optimizer_kd.ckpt"
    )
    assert all(int(e["step"]) == 4 for e in resumed["state"].values())
    resumed = json.loads(
        (out / "eval" / "trained" / "summary.json").read_text()
    )
    assert resumed["tasks"]["continue"]["n"] == 4


if __name__ == "__main__":
    _worker(sys.argv[1])
