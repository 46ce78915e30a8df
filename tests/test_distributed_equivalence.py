"""Two processes (torchrun, gloo) train and decode exactly like one.

One run of this file's worker under ``torchrun --nproc_per_node=2`` with a
per-rank batch of ``b`` is compared with a plain single-process run with a
batch of ``2b``. Both go through the real code: :func:`dataio_prepare`,
:class:`SpeechLLMBrain` (``fit``, DDP wrapping and its gradient all-reduce,
both stages) and :func:`evaluate_parity` (rank sharding + merge).

Why the training data are equal-length: every BLSP-KD loss term is a mean
over positions (KL and CE over the distilled token positions, alignment over
the CIF tokens) or over utterances (quantity loss). DDP averages the ranks'
gradients, i.e. the mean of per-rank means, which equals the mean over the
global batch only when every rank holds the same number of positions. With
utterances of different lengths the two differ by design (the same holds for
gradient accumulation), so the utterances here all have the same transcript
token count, continuation token count and audio length: the test then checks
the code path (sampler split, DDP averaging, optimiser, schedulers, stage
switch) at 1e-5, not a weighting convention.

Why SGD and not the recipe's AdamW: Adam's first step is ``lr * sign(g)``
per element, so a parameter whose true gradient is zero moves by a full
``lr`` in the direction of its rounding noise. The key bias of every
attention layer is such a parameter (softmax ignores a constant added to
all keys): summing the gradient over one batch of 4 or over two of 2 gives
noise of different signs, and the weights differ by ~lr (seen: 4e-4 with
lr 1e-3). That is Adam, not DDP; with SGD the update is linear in the
averaged gradient, which is what this test checks.

The decoding test uses clips of different lengths: sharded decoding must
give exactly the merged rows of one process.

Run by hand: ``python tests/test_distributed_equivalence.py DATA OUT B``.
"""

import json
import os
import pathlib
import random
import socket
import subprocess
import sys

import pytest
import torch

HERE = pathlib.Path(__file__).resolve()
ROOT = HERE.parents[1]
TASKS = {"repeat": "Repeat:", "continue": "Continue:"}
INSTRUCTION = "Continue:"
NUM_TRAIN = 8
PER_RANK_BATCH = 2
WORDS = (
    "the cat sat on mat and dog ran to park a quick brown fox jumps over "
    "lazy hello world how are you today"
).split()


# ----------------------------------------------------------------------
# the worker (one process, or one rank under torchrun)
def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    from speechbrain_blspkd.models.speech_llm import SpeechLLMModel
    from speechbrain_blspkd.nnet.cformer import CFormer
    from speechbrain_blspkd.nnet.whisper_encoder import WhisperEncoder
    from speechbrain_blspkd.testing import (
        build_test_tokenizer,
        tiny_llm_config,
        tiny_whisper_config,
    )

    torch.manual_seed(0)
    tok = build_test_tokenizer()
    llm = LlamaForCausalLM(
        LlamaConfig(**tiny_llm_config(tok, initializer_range=0.3))
    )
    adapter = CFormer(64, 64, n_pre=1, n_post=1, nhead=4, d_ffn=128, dropout=0)
    model = SpeechLLMModel(
        llm,
        adapter,
        encoder=WhisperEncoder(tiny_whisper_config()),
        tokenizer=tok,
        instruction=INSTRUCTION,
        plora=dict(r=4, alpha=8, dropout=0.0, scope="audio"),
    )
    with torch.no_grad():  # non-zero PLoRA B: the student differs
        for p in model.parameters():
            if p.requires_grad and p.abs().sum() == 0:
                p.normal_(0, 0.2)
    return model


def worker(data, out, batch_size):
    """Decode the test split, train both stages, save what each rank has."""
    from functools import partial

    import speechbrain as sb
    from speechbrain.utils.epoch_loop import EpochCounter
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    from speechbrain_blspkd.brain import SpeechLLMBrain
    from speechbrain_blspkd.dataio.pipelines import dataio_prepare
    from speechbrain_blspkd.evaluation import evaluate_parity
    from speechbrain_blspkd.models.trainable import trainable_state_dict
    from speechbrain_blspkd.objectives import BLSPKDObjective
    from speechbrain_blspkd.recipe import close_process_group
    from speechbrain_blspkd.stages import Stage

    data, out = pathlib.Path(data), pathlib.Path(out)
    run_opts = {
        "device": "cpu",
        "distributed_backend": "gloo",
        "find_unused_parameters": True,
        "noprogressbar": True,
    }
    sb.utils.distributed.ddp_init_group(run_opts)
    rank, world = 0, 1
    if torch.distributed.is_initialized():
        rank = torch.distributed.get_rank()
        world = torch.distributed.get_world_size()
    model = _model()
    schedule = partial(
        get_cosine_with_min_lr_schedule_with_warmup,
        num_warmup_steps=1,
        min_lr_rate=0.0,
    )
    kd = BLSPKDObjective(
        {
            "input_kl": 1.0,
            "response_kl": 1.0,
            "response_ce": 0.5,
            "cif": 1.0,
            "align": 0.3,
        }
    )
    stages = [
        Stage(
            "align",
            BLSPKDObjective({"align": 1.0, "cif": 1.0}),
            str(data / "train.csv"),
            EpochCounter(1),
            {},
            lr=0.2,
            scheduler=schedule,
            total_steps=4,
        ),
        Stage(
            "kd",
            kd,
            str(data / "train.csv"),
            EpochCounter(1),
            {},
            lr=0.2,
            scheduler=schedule,
            total_steps=4,
        ),
    ]
    hparams = dict(
        stages=stages,
        valid_csv=str(data / "test.csv"),
        test_csv=str(data / "test.csv"),
        data_root=str(data),
        sample_rate=16000,
        max_audio_seconds=30,
        # equal durations: "ascending" keeps the manifest order, and it
        # also turns off the shuffling of speechbrain's DDP sampler (which
        # follows `sorting == "random"`, not the loader's `shuffle`)
        sorting="ascending",
        model=model,
        log_every_n_steps=0,
        step_log=str(out / "steps.jsonl"),
    )
    datasets = dataio_prepare(hparams)
    evaluate_parity(
        model,
        hparams["test_csv"],
        hparams["data_root"],
        TASKS,
        out / "eval" / "parity",
        batch_size=2,
        max_new_tokens=6,
    )
    # (a copy: on the CPU the state dict shares the parameters' storage)
    init = {k: v.clone() for k, v in trainable_state_dict(model).items()}
    brain = SpeechLLMBrain(
        modules={"model": model},
        # SGD, not Adam: see the module docstring
        opt_class=lambda params: torch.optim.SGD(params, lr=0, momentum=0.9),
        hparams=hparams,
        run_opts=run_opts,
    )
    seen = []
    fit_batch = brain.fit_batch

    def recording_fit_batch(batch):  # which utterances each step sees
        seen.append([brain.stage.name, list(batch.id)])
        return fit_batch(batch)

    brain.fit_batch = recording_fit_batch
    for stage in stages:
        brain.stage = stage
        brain.fit(
            stage.epochs,
            datasets[stage.name],
            train_loader_kwargs={"batch_size": batch_size, "shuffle": False},
        )
    wrapped = type(brain.modules.model).__name__
    torch.save(
        {
            "init": init,
            "final": trainable_state_dict(brain.model),
            "seen": seen,
            "world": world,
            "wrapped": wrapped,
        },
        out / f"rank{rank}.pt",
    )
    close_process_group()  # as the recipe does: no teardown at exit


# ----------------------------------------------------------------------
# the test side
def _texts(tokenize, count, n_tokens, seed):
    """``count`` distinct word strings of exactly ``n_tokens`` tokens."""
    rng = random.Random(seed)
    found = []
    while len(found) < count:
        text = " ".join(rng.sample(WORDS, 4))
        if text not in found and len(tokenize(text)) == n_tokens:
            found.append(text)
    return found


def _write_data(folder):
    import numpy as np
    import soundfile as sf

    from speechbrain_blspkd.dataio.manifest import write_manifest
    from speechbrain_blspkd.prompt import PromptBuilder
    from speechbrain_blspkd.testing import build_test_tokenizer

    builder = PromptBuilder(build_test_tokenizer())
    transcripts = _texts(builder.transcript_ids, NUM_TRAIN, 10, seed=1)
    continuations = _texts(builder._encode, NUM_TRAIN, 10, seed=2)
    rng = np.random.default_rng(0)

    def rows(prefix, seconds, texts, conts):
        out = []
        for i, (sec, t, c) in enumerate(zip(seconds, texts, conts)):
            uid = f"{prefix}{i:02d}"
            wav = (0.1 * rng.standard_normal(int(sec * 16000))).astype("f4")
            sf.write(folder / f"{uid}.wav", wav, 16000)
            out.append(
                dict(
                    ID=uid,
                    wav=f"$data_root/{uid}.wav",
                    duration=sec,
                    transcript=t,
                    language="en" if i % 2 else "de",
                    speaker=f"s{i % 3}",
                    continuation=c,
                    truncated="0",
                )
            )
        return out

    folder.mkdir(parents=True)
    train = rows("tr", [0.5] * NUM_TRAIN, transcripts, continuations)
    write_manifest(folder / "train.csv", train)
    seconds = [0.7, 0.3, 0.55, 0.4, 0.62]  # different lengths, odd count
    test = rows("te", seconds, transcripts[:5], continuations[:5])
    write_manifest(folder / "test.csv", test)
    # the premise of the training comparison: equal-length sequences
    lengths = builder.sequence_lengths(
        INSTRUCTION,
        [r["transcript"] for r in train],
        continuations=[r["continuation"] for r in train],
    )
    assert len(set(lengths)) == 1, lengths


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd):
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(ROOT),
    )
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    data = tmp / "data"
    _write_data(data)
    single, double = tmp / "one", tmp / "two"
    _run([sys.executable, str(HERE), str(data), str(single), "4"])
    _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={_free_port()}",
            str(HERE),
            str(data),
            str(double),
            str(PER_RANK_BATCH),
        ]
    )
    return single, double


@pytest.mark.slow
def test_two_ranks_train_to_the_weights_of_one_process(runs):
    single, double = runs
    one = torch.load(single / "rank0.pt")
    ranks = [torch.load(double / f"rank{r}.pt") for r in (0, 1)]
    assert one["world"] == 1 and one["wrapped"] == "SpeechLLMModel"
    assert [r["world"] for r in ranks] == [2, 2]
    assert {r["wrapped"] for r in ranks} == {"DistributedDataParallel"}
    # every global step is the same set of utterances as the big batch
    steps = len(one["seen"])
    assert steps == 2 * NUM_TRAIN // (2 * PER_RANK_BATCH)  # both stages
    for k in range(steps):
        stage, ids = one["seen"][k]
        assert [r["seen"][k][0] for r in ranks] == [stage, stage]
        split = [r["seen"][k][1] for r in ranks]
        assert len(split[0]) == len(split[1]) == PER_RANK_BATCH
        assert sorted(split[0] + split[1]) == sorted(ids)
    # training moved the weights, the ranks agree exactly, and they match
    # the single process within 1e-5
    final = one["final"]
    assert final.keys() == ranks[0]["final"].keys()
    assert {k.split(".")[0] for k in final} == {"adapter", "plora"}
    moved = max((final[k] - one["init"][k]).abs().max() for k in final)
    assert moved > 1e-4
    for key in final:
        assert torch.equal(ranks[0]["final"][key], ranks[1]["final"][key])
        torch.testing.assert_close(
            ranks[0]["final"][key], final[key], rtol=0, atol=1e-5, msg=key
        )


@pytest.mark.slow
def test_two_ranks_decode_the_rows_of_one_process(runs):
    single, double = runs

    def rows(out):
        folder = out / "eval" / "parity"
        assert not list(folder.glob("rows.rank*.jsonl"))
        return [json.loads(line) for line in (folder / "rows.jsonl").open()]

    one, two = rows(single), rows(double)
    assert len(one) == 5 * len(TASKS)
    assert {r["utt"] for r in one} == {f"te{i:02d}" for i in range(5)}
    assert any(r["hyp"] for r in one) and any(r["teacher"] for r in one)
    assert [r["id"] for r in two] == [r["id"] for r in one]
    assert two == one  # same text, counts, order
    summary = [
        json.loads((o / "eval" / "parity" / "summary.json").read_text())
        for o in (single, double)
    ]
    assert summary[0] == summary[1]


def test_checkpoint_killed_mid_save_is_not_listed(tmp_path):
    """speechbrain writes a checkpoint's meta file before its parameter
    files; a save cut short must leave nothing that recovery would load."""
    from speechbrain.utils.checkpoints import (
        mark_as_loader,
        mark_as_saver,
        register_checkpoint_hooks,
    )

    from speechbrain_blspkd.utils.distributed import Checkpointer

    @register_checkpoint_hooks
    class Dies:
        @mark_as_saver
        def save(self, path):
            raise KeyboardInterrupt  # the process is killed here

        @mark_as_loader
        def load(self, path, end_of_epoch=False):
            pass

    lin = torch.nn.Linear(2, 2)
    good = Checkpointer(tmp_path, {"lin": lin})
    good.save_checkpoint(name="complete")
    dying = Checkpointer(tmp_path, {"lin": lin, "z": Dies()})
    with pytest.raises(KeyboardInterrupt):
        dying.save_checkpoint(name="cut")
    assert (tmp_path / "CKPT+cut").is_dir()  # the folder was started
    names = [c.path.name for c in Checkpointer(tmp_path).list_checkpoints()]
    assert names == ["CKPT+complete"]
    # and the complete one still recovers
    assert good.recover_if_possible().path.name == "CKPT+complete"


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2], int(sys.argv[3]))
