"""The offline top-k teacher: writer, cache checks, training path.

* with k = V (float32 storage) the offline KD step equals the online one:
  same loss and same gradients, through the real data pipeline
  (``dataio_prepare``) and Brain, and without a teacher forward;
* the writer's command line is sharded and resumable (a SIGKILLed shard
  resumes) and its shards together equal one unsharded run;
* a cache written for another LLM, instruction or k is refused (or
  rebuilt with ``overwrite``), as are rows whose text changed or that are
  missing;
* ``scale_by_t2`` reaches the loss the Brain trains on.
"""

import copy
import json
import pathlib
import subprocess
import sys

import pytest
import speechbrain as sb
import torch
from speechbrain.dataio.batch import PaddedBatch
from speechbrain.utils.epoch_loop import EpochCounter

from speechbrain_blspkd.dataio.manifest import read_manifest, write_manifest
from speechbrain_blspkd.dataio.pipelines import dataio_prepare
from speechbrain_blspkd.dataprep import teacher_topk as topk_lib
from speechbrain_blspkd.dataprep.teacher_cache import (
    StaleTeacherCacheError,
    TopKTeacherCache,
    bytes_per_position,
)
from speechbrain_blspkd.dataprep.teacher_identity import teacher_settings
from speechbrain_blspkd.dataprep.teacher_topk import (
    prepare_teacher_topk,
    write_teacher_topk,
)
from speechbrain_blspkd.models.speech_llm import SpeechLLMModel
from speechbrain_blspkd.objectives import BLSPKDObjective
from speechbrain_blspkd.stages import Stage
from speechbrain_blspkd.testing import (
    count_llm_calls,
    tiny_brain,
    tiny_saved_speech_llm,
    tiny_speech_llm,
    write_speechlike_wav,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN = sb.Stage.TRAIN
INSTRUCTION = "Continue:"
ROWS = [
    ("u0", "the cat sat on the mat", "and then it slept.", "0"),
    ("u1", "a dog ran far away", "over the hill and", "1"),
    ("u2", "birds sing", "in the morning.", "0"),
    ("u3", "the sun is warm today", "so we walk.", "0"),
]
WEIGHTS = {"input_kl": 1.0, "response_kl": 1.0, "cif": 1.0, "align": 0.3}


def _corpus(folder, rows=ROWS):
    """Wavs and a KD manifest (with continuations) in ``folder``."""
    folder = pathlib.Path(folder)
    manifest = []
    for k, (uid, text, cont, trunc) in enumerate(rows):
        seconds = 0.4 + 0.15 * k
        write_speechlike_wav(folder / f"{uid}.wav", seconds, seed=k)
        manifest.append(
            dict(
                ID=uid,
                wav=f"$data_root/{uid}.wav",
                duration=seconds,
                transcript=text,
                language="en",
                speaker="s",
                continuation=cont,
                truncated=trunc,
            )
        )
    path = folder / "kd.csv"
    write_manifest(path, manifest)
    return path


def _hparams(folder, manifest, objective, model):
    stage = Stage("kd", objective, str(manifest), EpochCounter(1), {}, lr=1e-3)
    return dict(
        stages=[stage],
        valid_csv=str(manifest),
        test_csv=str(manifest),
        data_root=str(folder),
        sample_rate=16000,
        max_audio_seconds=30,
        sorting="random",
        model=model,
    )


def _batch(datasets, name="kd"):
    ds = datasets[name]
    return PaddedBatch([ds[i] for i in range(len(ds))])


def _step(brain, batch):
    """Loss and gradients of one training step (no optimiser step)."""
    torch.manual_seed(7)  # the adapter's dropout draws alike in both runs
    brain.modules.model.zero_grad(set_to_none=True)
    with count_llm_calls(brain.model) as calls:
        out = brain.compute_forward(batch, TRAIN)
        loss = brain.compute_objectives(out, batch, TRAIN)
        loss.backward()
    grads = {
        n: p.grad.clone()
        for n, p in brain.model.named_parameters()
        if p.grad is not None
    }
    return float(loss.detach()), grads, len(calls), brain._last_stats


@pytest.mark.parametrize("logprob_dtype", ["float32", "float16"])
def test_offline_step_equals_online_with_k_equal_vocab(tmp_path, logprob_dtype):
    manifest = _corpus(tmp_path)
    torch.manual_seed(0)
    online_model = tiny_speech_llm(instruction=INSTRUCTION)
    with torch.no_grad():  # a PLoRA that changes the student
        for name, p in online_model.llm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    offline_model = copy.deepcopy(online_model)
    vocab = online_model.llm.get_output_embeddings().weight.shape[0]
    cache = tmp_path / "topk"
    info = write_teacher_topk(
        online_model,
        manifest,
        cache,
        k=vocab,
        batch_size=3,
        logprob_dtype=logprob_dtype,
    )
    assert info["written"] == len(ROWS)
    assert info["bytes"] == info["positions"] * bytes_per_position(
        vocab, logprob_dtype
    )

    online = BLSPKDObjective(WEIGHTS)
    offline = BLSPKDObjective(
        WEIGHTS, teacher="offline", teacher_cache=str(cache), teacher_topk=vocab
    )
    assert online.request(TRAIN).teacher and not offline.request(TRAIN).teacher
    # validation keeps the online teacher (the exact KL)
    assert offline.request(sb.Stage.VALID).teacher

    batches, results = {}, {}
    for name, model, objective in (
        ("online", online_model, online),
        ("offline", offline_model, offline),
    ):
        hparams = _hparams(tmp_path, manifest, objective, model)
        datasets = dataio_prepare(hparams)
        batches[name] = _batch(datasets)
        brain = tiny_brain(model, hparams["stages"][0], str(tmp_path / "s"))
        results[name] = _step(brain, batches[name])
    assert not hasattr(batches["online"], "teacher_topk")
    assert len(batches["offline"].teacher_topk) == len(ROWS)

    loss_on, grads_on, calls_on, stats_on = results["online"]
    loss_off, grads_off, calls_off, stats_off = results["offline"]
    assert calls_on == 2 and calls_off == 1  # no teacher forward offline
    # measured: float32 storage gives the same loss (0 difference) and
    # gradients within 1e-6; float16 KL terms within 1e-5, gradients 3e-4
    tol = 1e-6 if logprob_dtype == "float32" else 1e-4
    for term in ("input_kl", "response_kl"):
        assert stats_on[term] > 1e-3
        assert stats_off[term] == pytest.approx(stats_on[term], rel=tol)
    assert loss_off == pytest.approx(loss_on, rel=tol)
    assert sorted(grads_off) == sorted(grads_on)
    assert any("lora_" in n for n in grads_on)
    for name, g in grads_on.items():
        scale = float(g.abs().max()) + 1e-12
        err = float((grads_off[name] - g).abs().max()) / scale
        assert err < (1e-5 if logprob_dtype == "float32" else 3e-3), name


def test_topk_below_vocab_trains_through_the_brain(tmp_path):
    """k = 8 < V: the default ``full`` student normalisation has a
    positive floor, the ``topk`` one is the exact conditional KL."""
    manifest = _corpus(tmp_path)
    torch.manual_seed(0)
    model = tiny_speech_llm(instruction=INSTRUCTION)
    cache = tmp_path / "topk"
    write_teacher_topk(model, manifest, cache, k=8, batch_size=2)
    stats = {}
    for norm in ("full", "topk"):
        objective = BLSPKDObjective(
            {"input_kl": 1.0, "response_kl": 1.0},
            teacher="offline",
            teacher_cache=str(cache),
            teacher_topk=8,
            topk_student_norm=norm,
        )
        hparams = _hparams(tmp_path, manifest, objective, model)
        brain = tiny_brain(model, hparams["stages"][0], str(tmp_path / "s"))
        batch = _batch(dataio_prepare(hparams))
        torch.manual_seed(7)
        out = brain.compute_forward(batch, TRAIN)
        brain.compute_objectives(out, batch, TRAIN)
        stats[norm] = brain._last_stats
    for term in ("input_kl", "response_kl"):
        assert stats["full"][term] > stats["topk"][term] > 0


def test_writer_command_line_is_sharded_and_resumable(tmp_path):
    manifest = _corpus(tmp_path)
    torch.manual_seed(0)
    trained = tiny_saved_speech_llm(tmp_path / "m", instruction=INSTRUCTION)
    llm_dir = tmp_path / "m" / "llm"
    cache = tmp_path / "topk"

    def cli(*extra):
        cmd = [
            sys.executable,
            "-m",
            "speechbrain_blspkd.dataprep.teacher_topk",
            str(manifest),
            str(cache),
            "--model-dir",
            str(llm_dir),
            "--k",
            "8",
            "--batch-size",
            "1",
            "--dtype",
            "float32",
            "--instruction",
            INSTRUCTION,
            "--threads",
            "1",
            *extra,
        ]
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)

    killed = cli("--shard", "0/2", "--stop-after-batches", "1")
    assert killed.returncode == -9, killed.stderr
    part = TopKTeacherCache(cache, {})
    assert len(part) == 1  # one batch of shard 0 survived
    done = cli("--shard", "0/2")
    assert done.returncode == 0, done.stderr
    assert "1 rows written, 1 already there" in done.stdout
    assert cli("--shard", "1/2").returncode == 0
    # the model being trained (PLoRA on) reads what the plain LLM wrote
    reader = TopKTeacherCache(cache, teacher_settings(trained, 8))
    reader.check_rows(read_manifest(manifest))
    # the same numbers as one unsharded run of the same LLM
    plain = SpeechLLMModel(str(llm_dir), None, instruction=INSTRUCTION)
    write_teacher_topk(plain, manifest, tmp_path / "one", k=8, batch_size=1)
    one = TopKTeacherCache(tmp_path / "one", teacher_settings(plain, 8))
    for uid, *_ in ROWS:
        a, b = reader.get(uid), one.get(uid)
        for span in ("input", "response"):
            assert a.count(span) > 0
            assert torch.equal(a.span(span)[1], b.span(span)[1])
            assert torch.equal(a.span(span)[0], b.span(span)[0])
        assert a.input_logp.dtype == torch.float16
        assert a.input_idx.dtype == torch.int32
    # the index says where every row is; chunk files are shard-named
    files = sorted(p.name for p in (cache / "chunks").iterdir())
    assert all(f.startswith(("s0of2-", "s1of2-")) for f in files)
    assert not any(f.endswith(".tmp") for f in files)


def test_stale_caches_are_refused_or_rebuilt(tmp_path):
    manifest = _corpus(tmp_path)
    torch.manual_seed(0)
    model = tiny_speech_llm(whisper=False, instruction=INSTRUCTION)
    cache = tmp_path / "topk"
    write_teacher_topk(model, manifest, cache, k=4)
    TopKTeacherCache(cache, teacher_settings(model, 4))  # the same: fine

    def refused(other, k=4, match=None):
        with pytest.raises(StaleTeacherCacheError, match=match) as err:
            TopKTeacherCache(cache, teacher_settings(other, k))
        assert "overwrite" in str(err.value)
        return str(err.value)

    assert "k 4 != 8" in refused(model, k=8)
    other_prompt = copy.deepcopy(model)
    other_prompt.instruction = "Repeat:"
    assert "instruction 'Continue:' != 'Repeat:'" in refused(other_prompt)
    other_system = copy.deepcopy(model)
    other_system.prompts.system_prompt = "Be brief."
    refused(other_system, match="system_prompt")
    other_llm = copy.deepcopy(model)
    with torch.no_grad():
        other_llm.llm.model.layers[0].mlp.up_proj.base.weight.mul_(1.01)
    refused(other_llm, match="llm")
    # the writer refuses too, and rebuilds when told to
    with pytest.raises(StaleTeacherCacheError):
        write_teacher_topk(other_prompt, manifest, cache, k=4)
    info = write_teacher_topk(
        other_prompt, manifest, cache, k=4, overwrite=True
    )
    assert info["written"] == len(ROWS) and info["skipped"] == 0
    TopKTeacherCache(cache, teacher_settings(other_prompt, 4))
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["instruction"] == "Repeat:" and meta["k"] == 4

    # rows: a changed continuation, a missing row
    reader = TopKTeacherCache(cache, teacher_settings(other_prompt, 4))
    rows = read_manifest(manifest)
    rows[1]["continuation"] = "something else"
    with pytest.raises(StaleTeacherCacheError, match="'u1'.*changed"):
        reader.check_rows(rows, source="kd.csv")
    extra = dict(read_manifest(manifest)[0], ID="u9")
    with pytest.raises(KeyError, match="1 of 5 rows of kd.csv"):
        reader.check_rows(read_manifest(manifest) + [extra], source="kd.csv")
    # the training path checks up front (dataio_prepare)
    objective = BLSPKDObjective(
        WEIGHTS, teacher="offline", teacher_cache=str(cache), teacher_topk=8
    )
    with pytest.raises(StaleTeacherCacheError, match="k 4 != 8"):
        dataio_prepare(_hparams(tmp_path, manifest, objective, other_prompt))
    missing = BLSPKDObjective(
        WEIGHTS, teacher="offline", teacher_cache=str(tmp_path / "none")
    )
    with pytest.raises(FileNotFoundError, match="teacher_topk"):
        dataio_prepare(_hparams(tmp_path, manifest, missing, other_prompt))


def test_prepare_step_writes_each_offline_stage(tmp_path):
    manifest = _corpus(tmp_path)
    torch.manual_seed(0)
    model = tiny_speech_llm(whisper=False, instruction=INSTRUCTION)
    offline = BLSPKDObjective(
        WEIGHTS,
        teacher="offline",
        teacher_cache=str(tmp_path / "c"),
        teacher_topk=4,
    )
    hparams = _hparams(tmp_path, manifest, offline, model)
    hparams["stages"].insert(
        0,
        Stage(
            "align",
            BLSPKDObjective({"align": 1.0}),
            str(manifest),
            EpochCounter(1),
            {},
            lr=1e-3,
        ),
    )
    hparams["continuation_batch_size"] = 2
    assert [s.name for s in topk_lib.offline_stages(hparams)] == ["kd"]
    assert prepare_teacher_topk(hparams) == [tmp_path / "c"]
    assert (
        len(TopKTeacherCache(tmp_path / "c", teacher_settings(model, 4))) == 4
    )
    datasets = dataio_prepare(hparams)
    assert "teacher_topk" in datasets["kd"][0]
    assert "teacher_topk" not in datasets["align"][0]
    assert "teacher_topk" not in datasets["valid"][0]


def _two_node_worker(rank, store, folder):
    """Rank ``rank`` of two, alone on its node: its own cache folder."""
    import os

    import torch.distributed as dist

    os.environ["LOCAL_RANK"] = "0"  # each process is the first of a node
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=2
    )
    try:
        torch.manual_seed(0)
        model = tiny_speech_llm(whisper=False, instruction=INSTRUCTION)
        node = pathlib.Path(folder) / f"node{rank}"
        objective = BLSPKDObjective(
            WEIGHTS,
            teacher="offline",
            teacher_cache=str(node / "topk"),
            teacher_topk=4,
        )
        hparams = _hparams(
            folder, pathlib.Path(folder) / "kd.csv", objective, model
        )
        hparams["continuation_batch_size"] = 1
        prepare_teacher_topk(hparams)
    finally:
        dist.destroy_process_group()


def test_every_rank_writes_its_shard_and_every_node_gets_all(tmp_path):
    """Two processes, each with its own folder (two nodes, no shared
    disk): each writes half the rows, and both folders end up with every
    row, as one process writes them."""
    import torch.multiprocessing as mp

    manifest = _corpus(tmp_path)
    mp.spawn(
        _two_node_worker,
        args=(str(tmp_path / "store"), str(tmp_path)),
        nprocs=2,
        join=True,
    )
    torch.manual_seed(0)
    model = tiny_speech_llm(whisper=False, instruction=INSTRUCTION)
    write_teacher_topk(model, manifest, tmp_path / "one", k=4, batch_size=1)
    one = TopKTeacherCache(tmp_path / "one", teacher_settings(model, 4))
    for node in ("node0", "node1"):
        cache = TopKTeacherCache(
            tmp_path / node / "topk", teacher_settings(model, 4)
        )
        cache.check_rows(read_manifest(manifest))
        for uid, *_ in ROWS:
            a, b = cache.get(uid), one.get(uid)
            for span in ("input", "response"):
                assert torch.equal(a.span(span)[0], b.span(span)[0])
                assert torch.equal(a.span(span)[1], b.span(span)[1])


def test_scale_by_t2_reaches_the_trained_loss(tmp_path):
    """The Brain trains on the objective's loss: with ``scale_by_t2`` the
    KL terms (here the whole loss) are tau^2 times larger."""
    batch = PaddedBatch(
        [
            dict(
                id="a",
                sig=torch.randn(4000) * 0.1,
                transcript="the cat sat",
                continuation="on the mat.",
                truncated_flag=False,
            )
        ]
    )
    losses = {}
    for scaled in (False, True):
        torch.manual_seed(0)
        model = tiny_speech_llm()
        objective = BLSPKDObjective(
            {"input_kl": 1.0, "response_kl": 1.0},
            temperature=3.0,
            scale_by_t2=scaled,
        )
        stage = Stage("kd", objective, "kd.csv", EpochCounter(1), {}, lr=1e-3)
        brain = tiny_brain(model, stage, str(tmp_path / "s"))
        torch.manual_seed(1)
        losses[scaled] = float(brain.fit_batch(batch))
    assert losses[True] == pytest.approx(9.0 * losses[False], rel=1e-5)


def test_recipes_offer_the_teacher_switch():
    """Every BLSP-KD recipe has ``teacher`` (online by default) and passes
    it, the cache, k and ``scale_by_t2`` to its KD objective."""
    paths = sorted(ROOT.glob("recipes/*/speech_llm/hparams/blsp_kd.yaml"))
    assert paths
    for path in paths:
        text = path.read_text()
        assert "\nteacher: online" in text, path
        for key in ("teacher", "teacher_cache", "teacher_topk", "scale_by_t2"):
            assert f"    {key}: !ref <" in text, (path, key)


def test_benchmark_offline_step_is_the_training_path(monkeypatch):
    """``benchmarks.train_step``'s ``kd_offline`` reads the cache the real
    writer filled, through the offline objective: with k = V its loss is the
    online step's, without a teacher forward."""
    from benchmarks import train_step
    from speechbrain_blspkd.nnet.cformer import CFormer

    def small_model(dtype, device, **kwargs):
        adapter = CFormer(512, 64, n_pre=1, n_post=1, nhead=4, d_ffn=128)
        return tiny_speech_llm(
            whisper=False, adapter=adapter, instruction=INSTRUCTION
        )

    monkeypatch.setattr(train_step, "demo_model", small_model)
    steps = train_step.Steps(torch.float32, "cpu", 2, 2, seconds=0.6)
    steps.model.eval()  # no dropout: the two steps see the same student
    cache = steps.topk_teacher(k=300)
    assert (cache / "meta.json").is_file()
    seen = {}
    monkeypatch.setattr(
        steps,
        "_finish",
        lambda name, loss, out: seen.update(
            {name: (float(loss.detach()), out)}
        ),
    )
    with count_llm_calls(steps.model) as calls:
        steps.kd()
        online_calls = len(calls)
        steps.kd_offline()
    assert online_calls == 2 and len(calls) == 3
    (on, out_on), (off, out_off) = seen["kd"], seen["kd_offline"]
    assert out_on.teacher is not None and out_off.teacher is None
    assert off == pytest.approx(on, rel=1e-3)  # float16 storage
