"""Scale-out defects (issue 15, items 3 and 6), one test each, on CPU.

* the Whisper log-mel stays float32 under bf16 autocast (features computed
  on the fly in a bf16 run);
* validation and test KL are means over every distilled position of the
  pass, not means of batch means weighted by utterances;
* the top-level parity WER scores unspaced scripts (Chinese ...) per
  character, as the per-language figures do;
* under FSDP the prompt-prefix reuse is decided by every process together
  (a process alone running a prefix forward would hang the others);
* ``fsdp_cpu_offload``: on an accelerator the Brain shards after
  speechbrain moved the modules (FSDP2 wants the offloaded shards in CPU
  memory); a shard moved off the CPU is reported at once; on CPU an FSDP
  run with the flag trains (offload ignored).  The offload path itself
  needs CUDA.
"""

import copy
import logging

import pytest
import speechbrain as sb
import torch
import torch.distributed as dist
from speechbrain.dataio.batch import PaddedBatch
from speechbrain.utils.epoch_loop import EpochCounter

from speechbrain_blspkd import brain as brain_lib
from speechbrain_blspkd import metrics
from speechbrain_blspkd.losses import kd_kl
from speechbrain_blspkd.metrics import summarize_parity
from speechbrain_blspkd.models import llm_forward
from speechbrain_blspkd.models.passes import PassRequest
from speechbrain_blspkd.nnet.whisper_encoder import (
    WhisperEncoder,
    WhisperLogMel,
    whisper_log_mel,
)
from speechbrain_blspkd.objectives import BLSPKDObjective
from speechbrain_blspkd.stages import Stage
from speechbrain_blspkd.testing import (
    count_llm_calls,
    tiny_brain,
    tiny_speech_llm,
    tiny_whisper_config,
)
from speechbrain_blspkd.utils import sharding


@pytest.fixture
def one_process_group():
    """A real (gloo) process group of one process: FSDP runs for real, no
    port is opened, and the group is gone after the test."""
    dist.init_process_group(
        "gloo", store=dist.HashStore(), rank=0, world_size=1
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------
# (a) log-mel in float32 under autocast
def test_log_mel_is_float32_under_bf16_autocast():
    torch.manual_seed(0)
    wavs = torch.randn(2, 12000) * 0.1
    lens = torch.tensor([1.0, 0.6])
    ref = whisper_log_mel(wavs, 80)
    front, (ref_front, _) = WhisperLogMel(), WhisperLogMel()(wavs, lens)
    encoder = WhisperEncoder(tiny_whisper_config()).eval()
    mels = []
    real = encoder._encode
    encoder._encode = lambda mel, *a, **k: (
        mels.append(mel),
        real(mel, *a, **k),
    )[1]
    encoder(wavs, lens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = whisper_log_mel(wavs, 80)
        got_front, _ = front(wavs, lens)
        encoder(wavs, lens)
    assert got.dtype == got_front.dtype == torch.float32
    assert torch.equal(got, ref)
    assert torch.equal(got_front, ref_front)
    # the on-the-fly features the encoder reads: identical with autocast
    assert mels[1].dtype == torch.float32
    assert torch.equal(mels[0], mels[1])


# ----------------------------------------------------------------------
# (b) validation KL per position
def _batch(rows, seed):
    g = torch.Generator().manual_seed(seed)
    return PaddedBatch(
        [
            dict(
                id=f"u{seed}_{i}",
                sig=torch.randn(2500 + 600 * i, generator=g) * 0.1,
                transcript=text,
                continuation=cont,
                truncated_flag=False,
            )
            for i, (text, cont) in enumerate(rows)
        ]
    )


def test_validation_kl_is_a_mean_over_all_positions(tmp_path):
    torch.manual_seed(0)
    model = tiny_speech_llm().eval()
    objective = BLSPKDObjective({"input_kl": 1.0, "response_kl": 1.0})
    stage = Stage("kd", objective, "kd.csv", EpochCounter(1), {}, lr=1e-3)
    brain = tiny_brain(model, stage, str(tmp_path / "s"))
    # one long utterance, then three short ones: many positions per
    # utterance in the first batch, few in the second
    long = [("the cat sat on the mat and looked at the dog", "then it ran off")]
    short = [("a b", "c."), ("d e", "f."), ("g", "h.")]
    batches = [_batch(long, 0), _batch(short, 1)]
    brain.on_stage_start(sb.Stage.VALID)
    sums, positions, utterances = {}, {}, {}
    with torch.no_grad():
        for batch in batches:
            brain.evaluate_batch(batch, sb.Stage.VALID)
            out = brain.compute_forward(batch, sb.Stage.VALID)
            for span in ("input", "response"):
                mask = out.teacher.masks[span]
                kl = float(
                    kd_kl(
                        out.student.logits[span],
                        out.teacher.logits[span],
                        mask,
                        objective.temperature,
                    )
                )
                key = f"{span}_kl"
                sums[key] = sums.get(key, 0.0) + kl * int(mask.sum())
                positions[key] = positions.get(key, 0) + int(mask.sum())
                utterances.setdefault(key, []).append((kl, len(batch.id)))
    summary = brain.eval_summary()
    for key in ("input_kl", "response_kl"):
        per_position = sums[key] / positions[key]
        per_utterance = sum(kl * n for kl, n in utterances[key]) / 4
        assert abs(per_position - per_utterance) > 1e-3 * per_position
        assert summary[key] == pytest.approx(per_position, rel=1e-5)
    # per-utterance statistics stay per utterance (CIF count diagnostics)
    assert 0.0 <= summary["exact_count"] <= 1.0


# ----------------------------------------------------------------------
# (c) parity WER of unspaced scripts
def test_top_level_parity_wer_is_per_character_for_chinese():
    rows = []
    pairs = [("我爱你", "我爱他"), ("北京很大", "北京很小"), ("你好", "你好")]
    for i, (hyp, teacher) in enumerate(pairs):
        rows.append(
            dict(
                id=f"z{i}/continue",
                utt=f"z{i}",
                task="continue",
                language="zh",
                hyp=hyp,
                teacher=teacher,
                num_pred=3,
                num_target=3,
            )
        )
    summary = summarize_parity(rows)
    top = summary["tasks"]["continue"]["speech"]["wer"]
    per_language = summary["by_language"]["continue"]["parity_wer"]
    # 2 substituted characters of 9; word splitting would give 2 of 3
    assert top == pytest.approx(100 * 2 / 9)
    assert top == pytest.approx(per_language)
    # a mixed corpus: each text by its script, English words stay words
    mixed = metrics.wer(["the cat", "我爱他"], ["the dog", "我爱你"])
    assert mixed["num_words"] == 5 and mixed["sub"] == 2
    assert metrics.wer(["我爱他"], ["我爱你"], language="en")["wer"] == 100.0


# ----------------------------------------------------------------------
# (d) prefix reuse under FSDP
def _spy_agree(monkeypatch, override=None):
    calls = []

    def agree(flag, how="all", device=None):
        calls.append(how)
        if override is not None and how in override:
            return override[how]
        return bool(flag)

    monkeypatch.setattr(sharding, "agree", agree)
    return calls


def test_prefix_reuse_is_decided_by_every_process_under_fsdp(
    one_process_group, monkeypatch
):
    torch.manual_seed(0)
    model = tiny_speech_llm(
        whisper=False, prefix_reuse=True, instruction="Continue the text:"
    )
    texts, conts = ["the cat sat", "a dog ran"], ["on the mat.", "away."]
    feats = torch.randn(2, 20, 64)
    request = PassRequest(teacher=True, logits=("input", "response"))
    reference = copy.deepcopy(model)
    reference.prefix_reuse = False
    want = reference(texts, conts, feats=feats, request=request).teacher
    sharding.shard_model(model, device="cpu")
    assert llm_forward.collective_prefix(model)
    assert not llm_forward.collective_prefix(reference)

    def run():
        with count_llm_calls(model) as calls:
            out = model(texts, conts, feats=feats, request=request).teacher
        for span in ("input", "response"):
            assert torch.allclose(
                out.logits[span], want.logits[span], atol=1e-4
            )
        return len(calls)

    asked = _spy_agree(monkeypatch)
    assert run() == 2  # a miss: the prefix forward, then the rest
    assert asked == ["all", "any"]
    assert run() == 1  # a hit everywhere
    # another process missed: this one recomputes its prefix too, so every
    # process runs the same layer calls (all-gathers)
    _spy_agree(monkeypatch, {"any": True})
    assert run() == 2
    # another process cannot reuse (e.g. left padding): none does
    _spy_agree(monkeypatch, {"all": False})
    spans = []
    real = llm_forward.prefix_keys_values
    monkeypatch.setattr(
        llm_forward,
        "prefix_keys_values",
        lambda *a: spans.append(a) or real(*a),
    )
    assert run() == 1 and not spans


def _prefix_worker(rank, store, results):
    """One of two FSDP processes: rank 1 changes its instruction in the
    second step, so its prefix cache misses where rank 0's hits."""
    import datetime

    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        torch.manual_seed(0)
        model = tiny_speech_llm(whisper=False, prefix_reuse=True)
        reference = copy.deepcopy(model)
        reference.prefix_reuse = False
        sharding.shard_model(model, device="cpu")
        request = PassRequest(teacher=True, logits=("input", "response"))
        texts, conts = ["the cat sat", "a dog ran"], ["on the mat.", "away."]
        feats = torch.randn(2, 20, 64)
        steps = ["Continue the text:", "Continue the text:"]
        if rank == 1:
            steps[1] = "Repeat after me, please:"
        errors = []
        for instruction in steps:
            out = model(texts, conts, instruction, feats=feats, request=request)
            want = reference(
                texts, conts, instruction, feats=feats, request=request
            )
            for span in ("input", "response"):
                a, b = out.teacher.logits[span], want.teacher.logits[span]
                errors.append(float((a - b).abs().max()))
        dist.barrier()
        torch.save(errors, f"{results}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_fsdp_processes_with_different_prefix_misses_do_not_hang(
    tmp_path,
):
    import torch.multiprocessing as mp

    mp.spawn(
        _prefix_worker,
        args=(str(tmp_path / "store"), str(tmp_path)),
        nprocs=2,
        join=True,
    )
    for rank in (0, 1):
        errors = torch.load(tmp_path / f"rank{rank}.pt")
        assert len(errors) == 4 and max(errors) < 1e-4, (rank, errors)


# ----------------------------------------------------------------------
# item 3: FSDP with CPU offload
def test_offload_shards_after_speechbrain_moved_the_modules(monkeypatch):
    assert sharding.shards_after_move("cuda:0", True)
    assert not sharding.shards_after_move("cuda:0", False)
    assert not sharding.shards_after_move("cpu", True)
    events = []

    def fake_brain_init(self, modules=None, **kwargs):
        events.append("speechbrain moves the modules")
        self.modules = torch.nn.ModuleDict(modules)
        self.device = kwargs["run_opts"]["device"]

    monkeypatch.setattr(sb.Brain, "__init__", fake_brain_init)
    monkeypatch.setattr(sharding, "resolve_strategy", lambda *a, **k: "fsdp")
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    monkeypatch.setattr(
        sharding,
        "shard_model",
        lambda model, device=None, cpu_offload=False: events.append(
            f"shard on {device}, offload {cpu_offload}"
        ),
    )
    monkeypatch.setattr(
        sharding, "check_offloaded", lambda model: events.append("checked")
    )
    model = tiny_speech_llm(whisper=False)
    for offload, want in (
        (
            True,
            [
                "speechbrain moves the modules",
                "shard on cuda:0, offload True",
                "checked",
            ],
        ),
        (
            False,
            ["shard on cuda:0, offload False", "speechbrain moves the modules"],
        ),
    ):
        events.clear()
        brain_lib.SpeechLLMBrain(
            modules={"model": model},
            hparams={
                "distributed_strategy": "fsdp",
                "fsdp_cpu_offload": offload,
            },
            run_opts={"device": "cuda:0"},
        )
        assert events == want


def test_an_offloaded_shard_off_the_cpu_is_reported(one_process_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    mesh = init_device_mesh("cpu", (1,))
    fully_shard(
        model[0], mesh=mesh, offload_policy=CPUOffloadPolicy(pin_memory=False)
    )
    model[0]._blspkd_cpu_offload = True
    fully_shard(model, mesh=mesh)
    sharding.check_offloaded(model)  # in CPU memory: fine
    model[0].to("meta")  # what a Brain's .to(device) did to the shards
    with pytest.raises(sharding.ShardingError, match="0.weight"):
        sharding.check_offloaded(model)


def test_fsdp_with_offload_flag_trains_on_cpu(
    one_process_group, tmp_path, caplog
):
    torch.manual_seed(0)
    model = tiny_speech_llm()
    objective = BLSPKDObjective({"input_kl": 1.0, "response_kl": 1.0})
    stage = Stage("kd", objective, "kd.csv", EpochCounter(1), {}, lr=1e-3)
    with caplog.at_level(logging.INFO, logger="speechbrain_blspkd"):
        brain = brain_lib.SpeechLLMBrain(
            modules={"model": model},
            opt_class=lambda params: torch.optim.AdamW(params, lr=1e-3),
            hparams=dict(
                log_every_n_steps=0,
                step_log=str(tmp_path / "s.jsonl"),
                distributed_strategy="fsdp",
                fsdp_cpu_offload=True,
            ),
            run_opts={"device": "cpu"},
        )
    assert brain.sharded and sharding.is_sharded(model.llm)
    assert "fsdp_cpu_offload: the run is on CPU; ignored" in caplog.text
    brain.stage = stage
    brain.init_optimizers()
    brain.on_stage_start(None)
    batch = _batch([("the cat sat", "on the mat.")], 0)
    before = [p.detach().clone() for p in model.trainable_parameters()]
    loss = float(brain.fit_batch(batch))
    assert loss > 0
    after = model.trainable_parameters()
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
