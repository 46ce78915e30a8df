"""The SynthSpeech recipe end to end with tiny models: one process, resume,
and two processes (torchrun, gloo).

The recipe YAML is the real one (``recipes/SynthSpeech/speech_llm``); only its
sizes and model sources are overridden: a tiny random Llama and Whisper saved
to folders, a corpus of a few espeak-ng utterances.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "SynthSpeech" / "speech_llm"


@pytest.fixture(scope="module")
def tiny_bases(tmp_path_factory):
    from speechbrain_blspkd.testing import (
        tiny_saved_speech_llm as _tiny_model,
    )

    folder = tmp_path_factory.mktemp("bases")
    _tiny_model(folder)
    return folder


def _common(bases, data, out):
    return [
        f"--output_folder={out}",
        f"--data_folder={data}",
        f"--llm_asset={bases / 'llm'}",
        "--num_train=8",
        "--num_valid=4",
        "--num_test=4",
        "--languages=[en, de]",
        "--kd_train_subset=4",
        "--continuation_max_new_tokens=4",
        "--eval_max_new_tokens=4",
        "--eval_max_utterances=4",
        "--plot_utterances=1",
        # the untrained adapter's evaluation too (the demo skips it)
        "--eval_untrained=True",
    ]


#: Per-method overrides of the tiny runs (besides the common ones).
METHOD_OVERRIDES = {
    "blsp": [
        "--encoder_dim=64",
        "--llm_dim=64",
        "--blsp_epochs_limit=1",
        "--blsp_dataloader_opts={batch_size: 2, shuffle: True}",
    ],
    "diva": [
        "--encoder_dim=64",
        "--llm_dim=64",
        "--num_queries=4",
        "--qformer_layers=1",
        "--diva_epochs_limit=1",
        "--diva_dataloader_opts={batch_size: 2, shuffle: True}",
    ],
    "lad": [
        "--encoder_dim=64",
        "--llm_dim=64",
        "--num_queries=4",
        "--qformer_layers=1",
        "--gate_size=16",
        "--lad_epochs_limit=1",
        "--lad_dataloader_opts={batch_size: 2, shuffle: True}",
    ],
    "diva_multilingual": [
        "--encoder_dim=64",
        "--llm_dim=64",
        "--num_queries=4",
        "--qformer_layers=1",
        "--diva_epochs_limit=1",
        "--diva_dataloader_opts={batch_size: 2, shuffle: True}",
    ],
    "cascade": ["--asr_max_new_tokens=6"],
    "aura": [
        "--encoder_dim=64",
        "--llm_dim=64",
        "--llm_layers=[1, 2]",
        "--teacher_layers=[1, 2]",
        "--distill_epochs_limit=1",
        "--aura_epochs_limit=1",
        "--distill_dataloader_opts={batch_size: 4, shuffle: True}",
        "--aura_dataloader_opts={batch_size: 2, shuffle: True}",
    ],
}


def _overrides(bases, data, out):
    """The tiny BLSP-KD run (``blsp_kd.yaml``)."""
    return _common(bases, data, out) + [
        f"--encoder_asset={bases / 'whisper'}",
        "--encoder_dim=64",
        "--llm_dim=64",
        "--cformer_layers_pre=1",
        "--cformer_layers_post=1",
        "--align_dataloader_opts={batch_size: 4, shuffle: True}",
        "--kd_dataloader_opts={batch_size: 2, shuffle: True}",
        "--align_epochs_limit=1",
        "--kd_epochs_limit=1",
    ]


def _run(cmd, cwd):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _check_outputs(out):
    trained = json.loads(
        (out / "eval" / "trained" / "summary.json").read_text()
    )
    assert set(trained["tasks"]) == {"repeat", "continue"}
    assert trained["tasks"]["repeat"]["n"] == 4
    assert 0.0 <= trained["count"]["exact_rate"] <= 1.0
    assert 0.0 <= trained["adapter"]["token_acc"] <= 1.0
    assert 0.0 <= trained["adapter"]["exact_count"] <= 1.0
    rows = [
        json.loads(line)
        for line in (out / "eval" / "trained" / "rows.jsonl").open()
    ]
    assert len(rows) == 8
    assert {r["task"] for r in rows} == {"repeat", "continue"}
    model = out / "model"
    assert {p.name for p in model.iterdir()} >= {
        "hyperparams.yaml",
        "model.ckpt",
    }
    # the model card names the run: its stages, steps and evaluation
    card = (model / "README.md").read_text(encoding="utf-8")
    assert "| align | BLSPKDObjective | align 1, cif 1, timing 1 | 1 |" in card
    assert "| trained | repeat | 4 |" in card
    assert "synthetic speech only" in card
    assert list((out / "eval" / "trained").glob("adapter_*.png"))
    assert (out / "train_log.txt").read_text().count("stage: kd, epoch") == 1
    return rows


@pytest.mark.slow
def test_recipe_single_process_and_resume(tiny_bases, tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    cmd = [sys.executable, "train.py", "hparams/blsp_kd.yaml"]
    cmd += _overrides(tiny_bases, data, out)
    _run(cmd, RECIPE)
    rows = _check_outputs(out)
    # The exported folder loads through the inference interface and answers
    # like the recipe's own decoding (greedy, same limits).
    from speechbrain_blspkd.inference import SpeechLLM

    llm = SpeechLLM.from_hparams(
        source=str(out / "model"), overrides={"max_new_tokens": 4}
    )
    first = rows[0]
    manifest = {line.split(",")[0]: line for line in (data / "test.csv").open()}
    assert first["utt"] in manifest
    text = llm.generate_text(first["transcript"], instruction=None)
    assert isinstance(text, str)
    # A rerun finds everything done: no new epoch, same evaluation rows.
    log_before = (out / "train_log.txt").read_text()
    _run(cmd, RECIPE)
    assert (out / "train_log.txt").read_text().count("stage: kd, epoch") == 1
    assert log_before.count("stage: align, epoch") == 1
    assert _check_outputs(out) == rows


@pytest.fixture(scope="module")
def one_node_two_processes(tiny_bases, tmp_path_factory):
    """The tiny recipe on one node of two processes (torchrun, gloo)."""
    tmp = tmp_path_factory.mktemp("one_node")
    data, out = tmp / "data", tmp / "out"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29533",
        "train.py",
        "hparams/blsp_kd.yaml",
        "--distributed_backend=gloo",
    ]
    cmd += _overrides(tiny_bases, data, out)
    _run(cmd, RECIPE)
    return data, out


@pytest.mark.slow
def test_recipe_two_processes_gloo(one_node_two_processes):
    data, out = one_node_two_processes
    _check_outputs(out)
    assert not list((out / "eval" / "trained").glob("rows.rank*.jsonl"))


@pytest.mark.slow
def test_two_nodes_train_and_decode_like_one_node(
    tiny_bases, one_node_two_processes, tmp_path
):
    """A multi-node rehearsal: two torchrun launches (``--nnodes=2``, one
    process each, static rendezvous on 127.0.0.1:29541) whose nodes share
    only the corpus (manifests, audio) and the base models; each writes
    its teacher continuations, feature cache, checkpoints and evaluation
    into a folder of its own, and no path of one node's folder reaches the
    other.  The trained weights and the decoded rows are those of one node
    of two processes."""
    import torch

    from speechbrain_blspkd.dataio.manifest import read_manifest
    from speechbrain_blspkd.testing import run_together, torchrun_node

    data, one_node = one_node_two_processes
    nodes = [tmp_path / "node0", tmp_path / "node1"]

    def node_args(folder):
        work = folder / "work"  # what the shared data folder would hold
        return [
            "train.py",
            "hparams/blsp_kd.yaml",
            "--distributed_backend=gloo",
            *_overrides(tiny_bases, data, folder / "out"),
            f"--train_csv={work / 'train_kd.csv'}",
            f"--valid_csv={work / 'valid.csv'}",
            f"--test_csv={work / 'test.csv'}",
            f"--feature_cache_folder={work / 'features'}",
        ]

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    run_together(
        [
            torchrun_node(n, 2, 29541, *node_args(f))
            for n, f in enumerate(nodes)
        ],
        cwd=RECIPE,
        env=env,
        timeout=600,  # about a minute here: a hang fails instead
    )
    # every node prepared the whole data into its own folder, as one node
    for name in ("train_kd.csv", "valid.csv", "test.csv"):
        rows = [read_manifest(f / "work" / name) for f in nodes]
        assert rows[0] == rows[1] and rows[0][0]["continuation"], name
    expected = read_manifest(data / "test.csv")
    assert [r["ID"] for r in rows[0]] == [r["ID"] for r in expected]
    for folder in nodes:
        assert len(list((folder / "work" / "features").glob("feats/*/*.pt")))
        assert not list((folder / "work").glob("*shard*"))
    # the trained weights: the checkpoint and the export
    out = nodes[0] / "out"

    def last_weights(run):
        (ckpt,) = sorted((run / "save").glob("CKPT+kd-E1*"))
        return torch.load(ckpt / "weights.ckpt")

    for a, b in (
        (last_weights(out), last_weights(one_node)),
        (
            torch.load(out / "model" / "model.ckpt"),
            torch.load(one_node / "model" / "model.ckpt"),
        ),
    ):
        assert a.keys() == b.keys() and len(a) > 0
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    # the decoded rows and scores (written by the main process, node 0)
    for tag in ("untrained", "trained"):
        got, want = (
            (run / "eval" / tag / "rows.jsonl").read_text()
            for run in (out, one_node)
        )
        assert got == want and got, tag
    assert _check_outputs(out) == _check_outputs(one_node)


@pytest.mark.slow
def test_killed_training_resumes_to_the_same_weights(tiny_bases, tmp_path):
    """SIGKILL during the second epoch, rerun: the same final weights."""
    import random
    import signal
    import time

    import torch

    data = tmp_path / "data"

    def cmd(out):
        over = _overrides(tiny_bases, data, out)
        over = [
            o
            for o in over
            if not o.startswith(("--align_epochs_limit", "--eval_untrained"))
        ]
        return (
            [sys.executable, "train.py", "hparams/blsp_kd.yaml"]
            + over
            + [
                "--align_epochs_limit=3",
                "--eval_untrained=False",
            ]
        )

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    _run(cmd(tmp_path / "straight"), RECIPE)

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        cmd(out),
        cwd=RECIPE,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 600
    while not list((out / "save").glob("CKPT+align-E1*")):
        assert proc.poll() is None, "run ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.02)
    time.sleep(random.Random(0).uniform(0.0, 0.3))
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (out / "model").exists()
    _run(cmd(out), RECIPE)

    a = torch.load(tmp_path / "straight" / "model" / "model.ckpt")
    b = torch.load(out / "model" / "model.ckpt")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHOD_OVERRIDES))
def test_every_method_runs_from_its_yaml(method, tiny_bases, tmp_path):
    """BLSP, DiVA, LAD, the multilingual DiVA baseline, AuRA and the
    cascade through the same train.py: training (if any), parity decoding
    on the test split, export, and the exported folder answers through the
    inference interface like the recipe (AuRA's without a speech
    encoder)."""
    from speechbrain_blspkd.inference import SpeechLLM

    data, out = tmp_path / "data", tmp_path / "out"
    cmd = [sys.executable, "train.py", f"hparams/{method}.yaml"]
    cmd += _common(tiny_bases, data, out) + METHOD_OVERRIDES[method]
    if method == "cascade":
        cmd.append(f"--asr_asset={tiny_bases / 'whisper'}")
    else:
        cmd.append(f"--encoder_asset={tiny_bases / 'whisper'}")
    _run(cmd, RECIPE)
    trained = json.loads(
        (out / "eval" / "trained" / "summary.json").read_text()
    )
    assert set(trained["tasks"]) == {"repeat", "continue"}
    assert trained["tasks"]["repeat"]["n"] == 4
    log = out / "train_log.txt"
    if method == "cascade":  # nothing trained, nothing checkpointed
        assert not log.is_file() or "epoch" not in log.read_text()
        assert "adapter" not in trained
    else:
        assert log.read_text().count(f"stage: {method}, epoch") == 1
        assert trained["adapter"]["loss"] > 0
    if method == "lad":  # the gate's confusion over the test split
        from speechbrain_blspkd.metrics import confusion_from_stats

        confusion = confusion_from_stats(trained["adapter"])
        assert sum(confusion["support"].values()) == pytest.approx(1.0)
        assert confusion["accuracy"] == pytest.approx(
            trained["adapter"]["lid_acc"], abs=1e-6
        )
        # the breakdown stays out of the log file's lines
        assert "lid_acc" in log.read_text()
        assert "lid_confusion" not in log.read_text()
    rows = [
        json.loads(line)
        for line in (out / "eval" / "trained" / "rows.jsonl").open()
    ]
    if method == "aura":  # encoder-free: the front end only, no Whisper
        exported = (out / "model" / "hyperparams.yaml").read_text()
        assert "\nencoder_source: null\n" in exported
        assert "WhisperLogMel" in exported
    llm = SpeechLLM.from_hparams(
        source=str(out / "model"), overrides={"max_new_tokens": 4}
    )
    import soundfile as sf
    import torch
    from speechbrain.utils.data_utils import batch_pad_right

    # the recipe's test batch (its "repeat" rows in decoding order, padded
    # alike): bf16 decoding (dtype auto on a CPU with AMX) of a random tiny
    # model is not bit-stable between a batch and a single clip
    repeats = [r for r in rows if r["task"] == "repeat"]
    manifest = {
        line.split(",")[0]: line.split(",")[1]
        for line in (data / "test.csv").open()
    }
    audio = [
        torch.from_numpy(
            sf.read(
                manifest[r["utt"]].replace("$data_root", str(data)),
                dtype="float32",
            )[0]
        )
        for r in repeats
    ]
    batch, lens = batch_pad_right(audio)
    answers = llm.generate_batch(
        batch, lens, instructions="Repeat the following text exactly:"
    )
    assert answers == [r["hyp"] for r in repeats]


@pytest.mark.slow
def test_no_eval_tasks_scores_the_test_objective_without_decoding(
    tiny_bases, tmp_path
):
    data, out = tmp_path / "data", tmp_path / "out"
    cmd = [sys.executable, "train.py", "hparams/diva.yaml"]
    cmd += _common(tiny_bases, data, out) + METHOD_OVERRIDES["diva"]
    cmd += [f"--encoder_asset={tiny_bases / 'whisper'}", "--eval_tasks=null"]
    _run(cmd, RECIPE)
    trained = json.loads(
        (out / "eval" / "trained" / "summary.json").read_text()
    )
    assert set(trained) == {"adapter"}
    assert trained["adapter"]["l_in"] > 0
    assert not (out / "eval" / "trained" / "rows.jsonl").exists()
    assert (out / "model" / "model.ckpt").is_file()


@pytest.mark.slow
def test_hearing_levers_and_offline_teacher_through_the_recipe(
    tiny_bases, tmp_path
):
    """The YAML switches of the hearing levers and of the stored teacher
    reach the run: English-only first rows for the alignment stage, the
    sampled alignment softmax and the offline top-k teacher for the KD
    stage (written before training, no teacher pass)."""
    data, out = tmp_path / "data", tmp_path / "out"
    cmd = [sys.executable, "train.py", "hparams/blsp_kd.yaml"]
    cmd += _overrides(tiny_bases, data, out) + [
        "--align_languages=[en]",
        "--align_max_utterances=3",
        "--align_negatives=16",
        "--teacher=offline",
        "--teacher_topk=8",
        "--log_every_n_steps=1",
    ]
    _run(cmd, RECIPE)
    steps = [json.loads(line) for line in (out / "train_steps.jsonl").open()]
    align = [r for r in steps if r["stage"] == "align"]
    kd = [r for r in steps if r["stage"] == "kd"]
    # 3 English rows at batch 4: one alignment step with every lever's term
    assert len(align) == 1
    assert {"align", "cif"} <= set(align[0])
    assert kd and all("input_kl" in r for r in kd)
    # the stored teacher was written
    # (the tiny run names its LLM by a path, so the folders nest)
    topk = [p for p in data.rglob("*.top8") if p.is_dir()]
    assert len(topk) == 1 and any(p.is_file() for p in topk[0].rglob("*"))
