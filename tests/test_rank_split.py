"""Work that every rank shares, on two "nodes" that share no output folder.

One worker (this file run as a script) prepares the teacher continuations
(:func:`speechbrain_blspkd.recipe.prepare_continuations`) and the feature
cache (:func:`speechbrain_blspkd.recipe.prepare_features`), decodes a test
split (:func:`speechbrain_blspkd.evaluation.evaluate_parity`), saves and
recovers the random generators (:class:`~speechbrain_blspkd.utils.rng.
RNGState`, in a checkpoint folder both nodes see) and a checkpoint in each
node's own folder (:class:`~speechbrain_blspkd.utils.distributed.
Checkpointer`).  It runs once as a plain process (the reference) and once
as two ``torchrun`` nodes of one process each (``--nnodes=2``, gloo,
rendezvous on 127.0.0.1), each node writing into its own folder: the work
must be split across both ranks, both folders must end up with the whole
results (nothing read from the other node's folder), equal to the
reference, and each rank must get its own generators back.

Every step of the worker records its error instead of stopping the worker,
so each test below reports on its own step.

Run by hand: ``python tests/test_rank_split.py SHARED OWN CKPT``.
"""

import faulthandler
import json
import os
import pathlib
import random
import socket
import subprocess
import sys
import traceback
import warnings

import pytest
import torch

from speechbrain_blspkd.testing import run_together, torchrun_node

HERE = pathlib.Path(__file__).resolve()
ROOT = HERE.parents[1]
TASKS = {"repeat": "Repeat:", "continue": "Continue:"}
SECONDS = [0.5, 0.3, 0.7, 0.4, 0.6]
TRANSCRIPTS = [
    "the cat sat on the mat",
    "a dog ran to the park",
    "hello world how are you",
    "the quick brown fox",
    "jumps over the lazy dog",
]
KD_SUBSET = 4
HANG_SECONDS = 150  # a whole run takes 10-30 s


# ----------------------------------------------------------------------
# the worker
class FrameEncoder(torch.nn.Module):
    """A frozen toy encoder: one 4-dim frame per 10 ms of audio, padding
    ignored (non-overlapping windows)."""

    freeze = True
    dynamic_length = True

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv1d(1, 4, kernel_size=160, stride=160)
        self.encoded = 0

    def forward(self, wavs, wav_lens):
        self.encoded += len(wavs)
        feats = self.conv(wavs[:, None]).transpose(1, 2)
        return feats, wav_lens


def _step(report, name, fn):
    # the step each rank is in shows in the launch's output (a hang names it)
    print(f"rank {report['rank']}: step {name}", file=sys.stderr, flush=True)
    try:
        report[name] = fn()
    except Exception:  # recorded: the test of this step fails with it
        report[name] = {"error": traceback.format_exc()}


def _draws():
    import numpy as np

    return [random.random(), float(np.random.rand()), float(torch.rand(()))]


def worker(shared, own, ckpt_dir):
    """Run every step; write ``own/report.json``."""
    from types import SimpleNamespace

    import numpy as np
    import speechbrain as sb
    from speechbrain.utils.checkpoints import Checkpointer

    from speechbrain_blspkd import recipe
    from speechbrain_blspkd.dataprep import continuations
    from speechbrain_blspkd.evaluation import evaluate_parity
    from speechbrain_blspkd.testing import tiny_speech_llm
    from speechbrain_blspkd.utils.rng import RNGState

    shared, own = pathlib.Path(shared), pathlib.Path(own)
    own.mkdir(parents=True, exist_ok=True)
    # a worker still running after HANG_SECONDS prints every thread's stack
    # and exits, so a hang ends the launch with the place it hung
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
    sb.utils.distributed.ddp_init_group({"distributed_backend": "gloo"})
    rank, world = 0, 1
    if torch.distributed.is_initialized():
        rank = torch.distributed.get_rank()
        world = torch.distributed.get_world_size()
    report = {"rank": rank, "world": world}
    torch.manual_seed(0)
    model = tiny_speech_llm()  # the same weights in every process
    model.eval()

    def rng():
        seed = 100 + rank  # every rank its own generators
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        checkpointer = Checkpointer(ckpt_dir, {"rng": RNGState()})
        checkpointer.save_checkpoint(name="rng")
        first = _draws()
        checkpointer.recover_if_possible()
        return {"first": first, "again": _draws()}

    generated = []
    real_generate = continuations.generate_greedy

    def counting_generate(model, tokenizer, todo, *args, **kwargs):
        generated.extend(r["ID"] for r in todo)
        return real_generate(model, tokenizer, todo, *args, **kwargs)

    continuations.generate_greedy = counting_generate
    manifest = str(shared / "m.csv")

    def teacher():
        hparams = {
            "model": SimpleNamespace(
                prompts=SimpleNamespace(
                    system_prompt=None, transcript_separator=" "
                )
            ),
            "kd_train_subset": KD_SUBSET,
            "train_manifest": manifest,
            "valid_manifest": manifest,
            "test_manifest": manifest,
            "train_csv": str(own / "train_kd.csv"),
            "valid_csv": str(own / "valid.csv"),
            "test_csv": str(own / "test.csv"),
            "llm_source": str(shared / "lm"),
            "continuation_batch_size": 1,
            "continuation_max_new_tokens": 4,
            "instruction": "Continue:",
            "continuation_device": None,
            "continuation_dtype": "float32",
        }
        recipe.prepare_continuations(hparams, device="cpu")
        return {"generated": generated}

    encoder = FrameEncoder()

    def features():
        hparams = {
            "use_feature_cache": True,
            "feature_cache_folder": str(own / "features"),
            "train_manifest": manifest,
            "valid_csv": manifest,
            "test_csv": manifest,
            "feature_batch_size": 2,
            "data_root": str(shared),
            "sample_rate": 16000,
            "max_audio_seconds": 30,
        }
        cache = recipe.prepare_features(hparams, encoder, "cpu")
        uids = [f"u{k}" for k in range(len(SECONDS))]
        found = [uid for uid in uids if cache.get(uid) is not None]
        return {"encoded": encoder.encoded, "cached": found}

    def decode():
        evaluate_parity(
            model,
            manifest,
            str(shared),
            TASKS,
            own / "eval" / "parity",
            batch_size=2,
            max_new_tokens=4,
        )
        return {"done": True}

    def checkpoints():
        from speechbrain_blspkd.utils.distributed import Checkpointer

        lin = torch.nn.Linear(2, 2)
        save = own / "save"  # every node its own folder
        checkpointer = Checkpointer(save, {"lin": lin, "rng": RNGState()})
        for name, value in (("a", 1.0), ("b", 2.0)):
            with torch.no_grad():
                lin.weight.fill_(value + rank)  # the main process's counts
            # the second save deletes "a" (a broadcast on the main process)
            checkpointer.save_and_keep_only(name=name, num_to_keep=1)
        with torch.no_grad():
            lin.weight.fill_(-1.0)
        found = checkpointer.recover_if_possible()
        return {
            "found": found.path.name,
            "weight": lin.weight.flatten().tolist(),
            "folder": sorted(p.name for p in save.iterdir()),
        }

    _step(report, "rng", rng)
    _step(report, "continuations", teacher)
    _step(report, "features", features)
    _step(report, "decode", decode)
    _step(report, "checkpoints", checkpoints)  # last: may hang on failure
    (own / "report.json").write_text(json.dumps(report, indent=1))
    # as the recipe does: a process group left to the interpreter's exit
    # can abort or hang there (gloo's threads torn down in any order)
    recipe.close_process_group()
    faulthandler.cancel_dump_traceback_later()


# ----------------------------------------------------------------------
# the test side
def _write_shared(folder):
    from speechbrain_blspkd.dataio.manifest import write_manifest
    from speechbrain_blspkd.testing import (
        build_test_tokenizer,
        save_toy_llm,
        write_speechlike_wav,
    )

    folder.mkdir(parents=True)
    save_toy_llm(folder / "lm", build_test_tokenizer())
    rows = []
    for k, (sec, text) in enumerate(zip(SECONDS, TRANSCRIPTS)):
        write_speechlike_wav(folder / f"u{k}.wav", sec, seed=k)
        rows.append(
            dict(
                ID=f"u{k}",
                wav=f"$data_root/u{k}.wav",
                duration=sec,
                transcript=text,
                language="en",
                speaker=f"s{k % 2}",
            )
        )
    write_manifest(folder / "m.csv", rows)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    return dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(ROOT),
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ranks")
    shared = tmp / "shared"
    _write_shared(shared)
    ref = tmp / "ref"
    proc = subprocess.run(
        [sys.executable, str(HERE), str(shared), str(ref), str(tmp / "c1")],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    # the two-node launch; a failed launch is tried once more in fresh
    # folders, and the first failure (with the stacks of a hang) is shown
    # as a warning.  CI once saw a hang; here, before the worker closed its
    # process group, one launch in four hung on a loaded CPU, none since
    failures = []
    for attempt in range(2):
        nodes = [tmp / f"try{attempt}" / f"node{n}" for n in range(2)]
        # the one folder both nodes see: RNG test only
        ckpt = str(tmp / f"try{attempt}" / "c2")
        port = _free_port()
        try:
            run_together(
                [
                    torchrun_node(
                        n, 2, port, str(HERE), str(shared), str(node), ckpt
                    )
                    for n, node in enumerate(nodes)
                ],
                cwd=ROOT,
                env=_env(),
                timeout=300,  # a hang ends after HANG_SECONDS instead
            )
            break
        except AssertionError as e:
            failures.append(str(e))
    else:
        pytest.fail("the two-node launch failed twice:\n" + "\n".join(failures))
    if failures:
        warnings.warn(
            f"the first two-node launch failed:\n{failures[0]}", stacklevel=2
        )
    reports = [json.loads((f / "report.json").read_text()) for f in nodes]
    return json.loads((ref / "report.json").read_text()), ref, nodes, reports


def _ok(report, step):
    value = report[step]
    assert "error" not in value, f"rank {report['rank']}: {value['error']}"
    return value


@pytest.mark.slow
def test_continuations_split_across_ranks_every_node_gets_all(runs):
    from speechbrain_blspkd.dataio.manifest import read_manifest

    ref_report, ref, nodes, reports = runs
    assert [r["rank"] for r in reports] == [0, 1]
    assert [r["world"] for r in reports] == [2, 2]
    ref_ids = _ok(ref_report, "continuations")["generated"]
    assert len(ref_ids) == KD_SUBSET + 2 * len(SECONDS)
    mine = [_ok(r, "continuations")["generated"] for r in reports]
    # every row generated once, by one of the two ranks
    assert all(mine), mine
    assert sorted(mine[0] + mine[1]) == sorted(ref_ids)
    for name in ("train_kd.csv", "valid.csv", "test.csv"):
        expected = read_manifest(ref / name)
        assert expected[0]["continuation"] != ""
        for node in nodes:
            assert read_manifest(node / name) == expected, (node, name)
    for node in nodes:  # rank-local shard files are gone
        assert not list(node.glob("*shard*")), list(node.iterdir())


@pytest.mark.slow
def test_feature_cache_split_across_ranks_every_node_gets_all(runs):
    from speechbrain_blspkd.dataprep.feature_cache import FeatureCache

    ref_report, ref, nodes, reports = runs
    ids = [f"u{k}" for k in range(len(SECONDS))]
    assert _ok(ref_report, "features") == {"encoded": 5, "cached": ids}
    done = [_ok(r, "features") for r in reports]
    assert [d["cached"] for d in done] == [ids, ids]
    assert sorted(d["encoded"] for d in done) == [2, 3]

    def cache(folder):
        meta = json.loads((folder / "features" / "meta.json").read_text())
        return FeatureCache(folder / "features", meta["checksum"])

    expected = cache(ref)
    for node in nodes:
        got = cache(node)
        assert len(got) == len(ids)
        for uid in ids:
            assert torch.equal(got.get(uid), expected.get(uid))


@pytest.mark.slow
def test_decoding_merges_through_the_process_group(runs):
    ref_report, ref, nodes, reports = runs
    _ok(ref_report, "decode")
    for report in reports:
        _ok(report, "decode")

    def rows(folder):
        path = folder / "eval" / "parity" / "rows.jsonl"
        return [json.loads(line) for line in path.open()]

    expected = rows(ref)
    assert len(expected) == len(SECONDS) * len(TASKS)
    assert rows(nodes[0]) == expected
    summary = [
        json.loads((f / "eval" / "parity" / "summary.json").read_text())
        for f in (ref, nodes[0])
    ]
    assert summary[0] == summary[1]
    # the main process writes the results; every node keeps the teacher
    # answers for its next evaluation
    assert not (nodes[1] / "eval" / "parity" / "rows.jsonl").exists()
    teacher = [
        json.loads((f / "eval" / "teacher_answers.json").read_text())
        for f in (ref, *nodes)
    ]
    assert teacher[1] == teacher[0] and teacher[2] == teacher[0]
    for node in nodes:
        assert not list((node / "eval" / "parity").glob("rows.rank*"))


@pytest.mark.slow
def test_every_rank_recovers_its_own_random_generators(runs):
    ref_report, _, _, reports = runs
    assert _ok(ref_report, "rng")["again"] == _ok(ref_report, "rng")["first"]
    draws = [_ok(r, "rng") for r in reports]
    assert draws[0]["first"] != draws[1]["first"]  # the ranks differ
    for rank, d in enumerate(draws):
        assert d["again"] == d["first"], f"rank {rank}"


@pytest.mark.slow
def test_every_node_recovers_the_main_process_checkpoint(runs):
    """Checkpoints are written by the main process into its node's folder;
    a node that cannot read them lists and loads them through the process
    group (and deletes in step with the main process)."""
    ref_report, _, _, reports = runs
    expected = {"found": "CKPT+b", "weight": [2.0] * 4, "folder": ["CKPT+b"]}
    assert _ok(ref_report, "checkpoints") == expected
    assert _ok(reports[0], "checkpoints") == expected
    assert _ok(reports[1], "checkpoints") == dict(expected, folder=[])


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2], sys.argv[3])
