"""AuRA with tiny models: the log-mel front end and the teacher's layers,
the audio embedding layer, time alignment, the layer map, the objective's
terms and gradients, training through the Brain, and encoder-free export."""

import json
import math
import shutil

import pytest
import speechbrain as sb
import torch
import torch.nn.functional as F
from speechbrain.dataio.batch import PaddedBatch
from speechbrain.utils.epoch_loop import EpochCounter

from speechbrain_blspkd.nnet.audio_embedding import AudioEmbedding
from speechbrain_blspkd.nnet.whisper_encoder import (
    WhisperEncoder,
    WhisperLogMel,
    whisper_log_mel,
)
from speechbrain_blspkd.objectives import AuRAObjective, BLSPKDObjective
from speechbrain_blspkd.objectives.aura import (
    LayerMap,
    align_frames,
    evenly_spaced,
)
from speechbrain_blspkd.stages import Stage
from speechbrain_blspkd.testing import (
    tiny_aura,
    tiny_brain,
    tiny_whisper_config,
)

TRAIN = sb.Stage.TRAIN


def _wavs(seed=0):
    g = torch.Generator().manual_seed(seed)
    wavs = torch.randn(2, 9000, generator=g) * 0.1
    return wavs, torch.tensor([1.0, 0.55])


def _forward(model, objective, stage=TRAIN, seed=0):
    wavs, lens = _wavs(seed)
    return model(
        ["the cat sat", "a dog"],
        ["on the mat.", "ran away"],
        wavs=wavs,
        wav_lens=lens,
        request=objective.request(stage),
    )


# ----------------------------------------------------------------------
# front end and teacher
def test_front_end_frames_are_whisper_log_mels():
    wavs, lens = _wavs()
    mel, mel_lens = WhisperLogMel()(wavs, lens)
    counts = torch.round(mel_lens * mel.shape[1]).long()
    assert counts.tolist() == [57, 31]  # ceil(samples / 160)
    # the row alone, as whisper_log_mel computes it (silence after the clip)
    alone = whisper_log_mel(wavs[1:, :4950], 31).transpose(1, 2)
    torch.testing.assert_close(mel[1:, :31], alone)
    # the longest clip's frames + 2 silent ones, rounded to whole encoder frames
    assert mel.shape[1] == 2 * 29 + 2


def test_teacher_layer_states_are_its_layers():
    """layer_states(k) is the output of encoder layer k of the same forward
    (and the last, normed state is what forward returns)."""
    torch.manual_seed(0)
    teacher = WhisperEncoder(tiny_whisper_config(encoder_layers=3))
    wavs, lens = _wavs()
    seen = {}
    hooks = [
        layer.register_forward_hook(
            lambda m, i, o, k=k: seen.__setitem__(
                k, o[0] if isinstance(o, tuple) else o
            )
        )
        for k, layer in enumerate(teacher.encoder.layers, start=1)
    ]
    final, _ = teacher(wavs, lens)
    for hook in hooks:
        hook.remove()
    mel, mel_lens = WhisperLogMel()(wavs, lens)
    states, frames = teacher.layer_states(mel, mel_lens, layers=(1, 2, 3, -1))
    assert frames.tolist() == [29, 16]
    for k in (1, 2):
        torch.testing.assert_close(states[k], seen[k][:, :29])
    torch.testing.assert_close(states[3], final)
    torch.testing.assert_close(states[-1], final)
    with pytest.raises(ValueError, match="layer 4 is not in 0..3"):
        teacher.layer_states(mel, mel_lens, layers=(4,))


# ----------------------------------------------------------------------
# the audio embedding layer
@pytest.mark.parametrize("stride,per_second", [(2, 50), (4, 25), (8, 13)])
def test_audio_embedding_rate(stride, per_second):
    layer = AudioEmbedding(80, 16, stride=stride)
    out = layer(torch.randn(1, 100, 80))  # one second of mel frames
    assert out.token_counts.tolist() == [per_second]
    assert out.frames_per_token == stride


def test_audio_embedding_padding_invariance_and_gradients():
    torch.manual_seed(0)
    layer = AudioEmbedding(80, 16, stride=4, kernel_size=6, out_init_std=0.1)
    feats = torch.randn(2, 23, 80)
    feats[1, 13:] = 1e3  # garbage padding
    out = layer(feats, torch.tensor([1.0, 13 / 23]))
    assert out.token_counts.tolist() == [6, 4]
    alone = layer(feats[1:, :13])
    torch.testing.assert_close(out.tokens[1, :4], alone.tokens[0])
    assert bool((out.tokens[1, 4:] == 0).all())
    out.tokens.sum().backward()
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0
        for p in layer.parameters()
    )
    rebuilt = AudioEmbedding(**layer.export_hparams())
    rebuilt.load_state_dict(layer.state_dict())
    torch.testing.assert_close(
        rebuilt(feats[:1]).tokens, layer(feats[:1]).tokens
    )
    with pytest.raises(ValueError, match="skip frames"):
        AudioEmbedding(80, 16, stride=4, kernel_size=2)


# ----------------------------------------------------------------------
# time alignment between the two frame rates
def test_pooling_by_hand():
    """Whisper at 50 frames/s, the LLM at 25 positions/s (stride 4): each
    position is the mean of two frames; a row's padding frames are never
    read and its positions beyond its count are invalid."""
    frames = torch.tensor(
        [[0.0, 2.0, 4.0, 6.0, 8.0, 10.0], [1.0, 3.0, 5.0, 100.0, 100.0, 100.0]]
    )[..., None]
    out, valid = align_frames(
        frames, torch.tensor([6, 3]), torch.tensor([3, 2]), 2.0
    )
    assert valid.tolist() == [[True, True, True], [True, True, False]]
    torch.testing.assert_close(
        out[..., 0], torch.tensor([[1.0, 5.0, 9.0], [2.0, 5.0, 0.0]])
    )
    # 12.5 positions/s (stride 8): four frames each; the last position of
    # the second row covers one real frame only
    out, valid = align_frames(
        frames, torch.tensor([6, 5]), torch.tensor([2, 2]), 4.0
    )
    torch.testing.assert_close(
        out[..., 0], torch.tensor([[3.0, 9.0], [27.25, 100.0]])
    )
    # 100 positions/s (stride 1): each frame read twice
    out, _ = align_frames(frames[:1], torch.tensor([6]), torch.tensor([4]), 0.5)
    torch.testing.assert_close(out[0, :, 0], torch.tensor([0.0, 0.0, 2.0, 2.0]))


def test_interpolation_by_hand():
    frames = torch.tensor([[0.0, 2.0, 4.0, 6.0]])[..., None]
    # 3 frames per position: centres at frame 1.0 and 4.0 (clamped to 3)
    out, valid = align_frames(
        frames, torch.tensor([4]), torch.tensor([2]), 3.0, "interpolate"
    )
    torch.testing.assert_close(out[0, :, 0], torch.tensor([2.0, 6.0]))
    # half a frame per position: centres -0.25 (clamped), 0.25, 0.75, 1.25
    out, _ = align_frames(
        frames, torch.tensor([4]), torch.tensor([4]), 0.5, "interpolate"
    )
    torch.testing.assert_close(out[0, :, 0], torch.tensor([0.0, 0.5, 1.5, 2.5]))
    with pytest.raises(ValueError, match="mode"):
        align_frames(
            frames, torch.tensor([4]), torch.tensor([2]), 2.0, "nearest"
        )


# ----------------------------------------------------------------------
# the layer map
def test_layer_map_and_evenly_spaced():
    assert evenly_spaced(3, 6) == [2, 4, 6]
    assert LayerMap(8, 4, evenly_spaced(3, 6), [2, 4, 6]).pairs == [
        (2, 2),
        (4, 4),
        (6, 6),
    ]
    with pytest.raises(ValueError, match="as many"):
        LayerMap(8, 4, [1, 2], [1])
    with pytest.raises(ValueError, match="repeat"):
        LayerMap(8, 4, [1, 1], [1, 2])
    with pytest.raises(ValueError):
        evenly_spaced(7, 6)


def test_layer_map_takes_bf16_states_outside_autocast():
    """A bf16 LLM (dtype auto on a CPU with AMX) feeds bf16 states to the
    fp32 maps; the validation pass runs them outside autocast."""
    torch.manual_seed(0)
    layer_map = LayerMap(8, 4, [1], [1])
    states = torch.randn(2, 3, 8)
    out = layer_map(0, states.to(torch.bfloat16))
    assert out.dtype == torch.float32 and out.shape == (2, 3, 4)
    want = layer_map(0, states.to(torch.bfloat16).float())
    assert torch.equal(out, want)


def test_layer_map_picks_the_named_layers():
    """LLM layers (2, 1) <- teacher layers (0, 2): the request names the LLM
    layers, and pair k compares LLM hidden state l_k (normalised, through
    map k) with teacher hidden state w_k, pooled to the LLM positions."""
    model, objective = tiny_aura(llm_layers=(2, 1), teacher_layers=(0, 2))
    request = objective.request(TRAIN)
    assert set(request.hidden) == {(2, "input"), (1, "input")}
    with torch.no_grad():
        for lin in objective.layer_map.maps:  # identity maps
            lin.weight.copy_(torch.eye(64))
            lin.bias.zero_()
        out = _forward(model, objective)
        pairs = objective.layer_pairs(out, model)
    states, frames = objective.teacher.layer_states(
        out.feats, out.feat_lens, (0, 2)
    )
    mask = out.student.masks["input"]
    assert mask.sum(1).tolist() == out.adapter.token_counts.tolist() == [15, 8]
    for (llm_layer, teacher_layer), (pred, target) in zip(
        objective.layer_map.pairs, pairs
    ):
        want = out.student.hidden[(llm_layer, "input")][mask]
        torch.testing.assert_close(pred, F.layer_norm(want, (64,)))
        pooled, valid = align_frames(
            states[teacher_layer], frames, mask.sum(1), 2.0
        )
        torch.testing.assert_close(target, pooled[valid & mask])
    # the LLM hidden states are the LLM's own layers at the speech positions
    assert not torch.equal(pairs[0][0], pairs[1][0])
    _, bad = tiny_aura(llm_layers=(5,), teacher_layers=(1,))
    with pytest.raises(ValueError, match=r"hidden layer\(s\) \[5\]"):
        _forward(model, bad)
    with pytest.raises(ValueError, match=r"LLM layer\(s\) \[5\]"):
        bad.layer_pairs(out, model)


def test_objective_checks():
    teacher = WhisperEncoder(tiny_whisper_config(), freeze=False)
    with pytest.raises(ValueError, match="frozen"):
        AuRAObjective(teacher, LayerMap(64, 64, [1], [1]))
    teacher = WhisperEncoder(tiny_whisper_config())
    with pytest.raises(ValueError, match="width"):
        AuRAObjective(teacher, LayerMap(64, 32, [1], [1]))
    with pytest.raises(ValueError, match=r"teacher layer\(s\) \[3\]"):
        AuRAObjective(teacher, LayerMap(64, 64, [1], [3]))
    with pytest.raises(ValueError, match="time_alignment"):
        AuRAObjective(teacher, LayerMap(64, 64, [1], [1]), time_alignment="x")


# ----------------------------------------------------------------------
# the objective
def test_requests_per_stage():
    _, layers_only = tiny_aura(weights={"layer_l2": 1.0, "layer_cos": 1.0})
    train = layers_only.request(TRAIN)
    assert not train.teacher and not train.response and not train.logits
    valid = layers_only.request(sb.Stage.VALID)  # eval_kl
    assert valid.teacher and valid.response and valid.logits == ("response",)
    _, response_only = tiny_aura(weights={"response_ce": 1.0}, eval_kl=False)
    request = response_only.request(TRAIN)
    assert request.hidden == () and not request.teacher


def test_terms_against_hand_computation():
    model, objective = tiny_aura(
        weights={"layer_l2": 0.5, "layer_cos": 2.0, "response_kl": 1.0}
    )
    out = _forward(model, objective)
    loss, stats = objective(out, model, TRAIN)
    with torch.no_grad():
        pairs = objective.layer_pairs(out, model)
    l2 = sum(
        float(((p - t) ** 2).mean() / t.var(unbiased=False)) for p, t in pairs
    ) / len(pairs)
    cos = sum(
        float((1 - torch.cosine_similarity(p, t, dim=-1)).mean())
        for p, t in pairs
    ) / len(pairs)
    blsp_kd = BLSPKDObjective({"response_kl": 1.0})
    kl = float(blsp_kd(out, model, TRAIN)[0].detach())
    assert stats["layer_l2"] == pytest.approx(l2, rel=1e-5)
    assert stats["layer_cos"] == pytest.approx(cos, rel=1e-5)
    assert stats["response_kl"] == pytest.approx(kl, rel=1e-6)
    assert loss.item() == pytest.approx(0.5 * l2 + 2 * cos + kl, rel=1e-5)
    assert "response_ce" not in stats  # weight 0: never computed
    # validation adds the per-pair cosine similarities
    out = _forward(model, objective, sb.Stage.VALID)
    _, stats = objective(out, model, sb.Stage.VALID)
    assert {"cos_1_1", "cos_2_2"} <= set(stats)


@pytest.mark.parametrize("scope", ["audio", "global"])
def test_distillation_gradients_reach_only_the_embedding_and_lora(scope):
    model, objective = tiny_aura(
        scope=scope, weights={"layer_l2": 1.0, "layer_cos": 1.0}
    )
    with torch.no_grad():  # non-zero LoRA B, so that A gets a gradient too
        for name, p in model.llm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    loss, _ = objective(_forward(model, objective), model, TRAIN)
    loss.backward()
    for name, p in model.named_parameters():
        trained = name.startswith("adapter.") or "lora_" in name
        assert p.requires_grad == trained, name
        if trained:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    for name, p in objective.teacher.named_parameters():
        assert not p.requires_grad and p.grad is None, name
    # the only other trained weights: the objective's own linear maps
    owned = {id(p) for p in objective.trainable_parameters()}
    assert owned == {id(p) for p in objective.layer_map.parameters()}
    assert all(p.grad is not None for p in objective.layer_map.parameters())


# ----------------------------------------------------------------------
# training through the Brain: the maps train with the model, checkpointed
def test_brain_trains_the_model_and_the_maps(tmp_path):
    model, objective = tiny_aura()
    stage = Stage("aura", objective, "train.csv", EpochCounter(1), {}, lr=1e-2)
    brain = tiny_brain(model, stage, str(tmp_path / "steps.jsonl"))
    optimised = {
        id(p) for g in brain.optimizer.param_groups for p in g["params"]
    }
    assert {id(p) for p in objective.layer_map.parameters()} <= optimised
    assert not {id(p) for p in objective.teacher.parameters()} & optimised
    wavs, _ = _wavs()
    batch = PaddedBatch(
        [
            dict(
                id=f"u{i}",
                sig=wavs[i, : 9000 - 4000 * i],
                transcript=t,
                continuation=c,
                truncated_flag=False,
            )
            for i, (t, c) in enumerate(
                [("the cat sat", "on it."), ("a dog", "ran")]
            )
        ]
    )
    maps = [p.detach().clone() for p in objective.layer_map.parameters()]
    losses = [float(brain.fit_batch(batch)) for _ in range(4)]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    after = list(objective.layer_map.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(maps, after))
    # the checkpoint hooks keep the maps only (never the frozen teacher)
    objective.save_trainable(tmp_path / "objective.ckpt")
    saved = torch.load(tmp_path / "objective.ckpt")
    assert set(saved) == {
        f"layer_map.{n}" for n, _ in objective.layer_map.named_parameters()
    }
    _, fresh = tiny_aura(seed=1)
    fresh.load_trainable(tmp_path / "objective.ckpt")
    for a, b in zip(fresh.layer_map.parameters(), after):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------
# encoder-free inference
def test_export_holds_no_encoder_and_answers_without_whisper(
    tmp_path, monkeypatch
):
    """The exported folder holds the audio embedding layer and LoRA only;
    with an asset root that holds the LLM alone (no whisper-base), loading
    it and answering builds no Whisper encoder and fetches nothing."""
    from speechbrain_blspkd.assets import fetch as fetch_lib
    from speechbrain_blspkd.inference import SpeechLLM
    from speechbrain_blspkd.inference.export import export_model
    from speechbrain_blspkd.nnet import whisper_encoder
    from speechbrain_blspkd.testing import tiny_saved_speech_llm

    model = tiny_saved_speech_llm(
        tmp_path / "bases",
        adapter=AudioEmbedding(80, 64, stride=4, out_init_std=0.3),
        encoder=WhisperLogMel(),
        instruction="Repeat:",
    )
    model.eval()
    wavs, lens = _wavs()
    want = model.generate(wavs, lens, max_new_tokens=5)
    # an asset root with the LLM only, under its asset name
    assets = tmp_path / "assets"
    name = "smollm2-135m-instruct"
    shutil.copytree(tmp_path / "bases" / "llm", assets / name)
    marker = assets / name / fetch_lib.MARKER
    marker.write_text(
        json.dumps({"recipe_hash": fetch_lib._get_asset(name).recipe_hash()})
    )
    folder = export_model(model, tmp_path / "model", {"llm_source": name})
    hparams = (folder / "hyperparams.yaml").read_text()
    assert "\nencoder_source: null\n" in hparams
    assert (
        "encoder_class: speechbrain_blspkd.nnet.whisper_encoder.WhisperLogMel"
        in hparams
    )
    weights = torch.load(folder / "model.ckpt")
    assert {k.split(".")[0] for k in weights} == {"adapter", "plora"}

    monkeypatch.setenv("BLSPKD_ASSETS", str(assets))

    def refuse(*args, **kwargs):
        raise AssertionError("the Whisper encoder was built or fetched")

    monkeypatch.setattr(whisper_encoder.WhisperEncoder, "__init__", refuse)
    monkeypatch.setattr(fetch_lib, "fetch_assets", refuse)
    loaded = SpeechLLM.from_hparams(
        source=str(folder), run_opts={"device": "cpu"}
    )
    assert isinstance(loaded.model.encoder, WhisperLogMel)
    whisper = [
        type(m).__name__
        for m in loaded.model.modules()
        if "Whisper" in type(m).__name__ and m is not loaded.model.encoder
    ]
    assert not whisper
    assert loaded.generate_batch(wavs, lens, max_new_tokens=5) == want
