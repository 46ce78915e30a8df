"""Tests for speechbrain_blspkd.nnet.plora (Partial LoRA)."""

import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

transformers = pytest.importorskip("transformers")

from speechbrain_blspkd.nnet.plora import (  # noqa: E402
    PLoRALinear,
    apply_plora,
    disable_plora,
    load_plora_state_dict,
    merge_plora,
    plora_mask,
    plora_parameters,
    plora_state_dict,
    scope_mask,
    set_plora_mask,
)
from speechbrain_blspkd.testing import tiny_llm_config  # noqa: E402

PAD, EOS = 0, 1


def _tiny(kind, seed=0):
    torch.manual_seed(seed)
    common = tiny_llm_config(
        vocab_size=256,
        max_position_embeddings=128,
        pad_token_id=PAD,
        eos_token_id=EOS,
    )
    if kind == "llama":
        model = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(**common)
        )
    else:
        model = transformers.Qwen2ForCausalLM(
            transformers.Qwen2Config(**common)
        )
    return model.eval()


def _adapted(kind, scope="audio", seed=0, **kw):
    """Base model and an adapted copy with nonzero (random) B."""
    base = _tiny(kind, seed)
    model = _tiny(kind, seed)
    apply_plora(model, scope=scope, dropout=0.0, **kw)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for p in plora_parameters(model):
            p.normal_(0, 0.3)
    return base, model


def _embeds(model, ids):
    return model.get_input_embeddings()(ids)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_no_mask_and_zero_mask_equal_base(kind):
    base, model = _adapted(kind)
    ids = torch.randint(2, 256, (2, 9))
    ref = base(input_ids=ids).logits
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref)  # mask None
        with plora_mask(model, torch.zeros(2, 9, dtype=torch.bool)):
            assert torch.equal(model(input_ids=ids).logits, ref)
        # teacher: a set mask, but the delta disabled
        with plora_mask(model, torch.ones(2, 9)), disable_plora(model):
            assert torch.equal(model(input_ids=ids).logits, ref)
        with plora_mask(model, torch.ones(2, 9)):
            assert not torch.allclose(model(input_ids=ids).logits, ref)


def test_fresh_adapter_is_identity():
    base = _tiny("llama")
    model = _tiny("llama")
    names = apply_plora(model)
    assert len(names) == 2 * 7
    ids = torch.randint(2, 256, (1, 6))
    with torch.no_grad(), plora_mask(model, torch.ones(1, 6)):
        assert torch.equal(
            model(input_ids=ids).logits, base(input_ids=ids).logits
        )


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_mask_is_causal_and_local(kind):
    base, model = _adapted(kind)
    ids = torch.randint(2, 256, (1, 10))
    k = 4
    mask = torch.zeros(1, 10, dtype=torch.bool)
    mask[:, k:] = True
    with torch.no_grad(), plora_mask(model, mask):
        out = model(input_ids=ids).logits
    ref = base(input_ids=ids).logits
    assert torch.equal(out[:, :k], ref[:, :k])
    assert (out[0, k:] - ref[0, k:]).abs().amax(-1).min() > 1e-4


def test_audio_mask_in_middle_changes_later_positions_only():
    base, model = _adapted("llama")
    ids = torch.randint(2, 256, (1, 10))
    mask = torch.zeros(1, 10, dtype=torch.bool)
    mask[:, 3:6] = True
    with torch.no_grad(), plora_mask(model, mask):
        out = model(input_ids=ids).logits
    ref = base(input_ids=ids).logits
    assert torch.equal(out[:, :3], ref[:, :3])
    # text positions after the speech span see adapted K/V -> differ
    assert not torch.allclose(out[:, 6:], ref[:, 6:])


def test_mask_state_is_shared_and_restored():
    _, model = _adapted("llama")
    states = {
        id(m.state) for m in model.modules() if isinstance(m, PLoRALinear)
    }
    assert len(states) == 1
    outer = torch.ones(1, 4)
    set_plora_mask(model, outer)
    with plora_mask(model, torch.zeros(1, 4)):
        assert model._plora_state.mask.sum() == 0
    assert torch.equal(model._plora_state.mask, outer)
    set_plora_mask(model, None)


def _speech_batch(model, lengths, speech, total):
    """Left-padded inputs_embeds batch; speech = (start, end) in each row."""
    torch.manual_seed(3)
    rows, masks = [], []
    for n in lengths:
        ids = torch.randint(2, 256, (n,))
        m = torch.zeros(n, dtype=torch.bool)
        m[speech[0] : speech[1]] = True
        rows.append(ids)
        masks.append(m)
    b = len(lengths)
    ids = torch.full((b, total), PAD)
    att = torch.zeros(b, total, dtype=torch.long)
    smask = torch.zeros(b, total, dtype=torch.bool)
    for i, (r, m) in enumerate(zip(rows, masks, strict=True)):
        ids[i, total - len(r) :] = r
        att[i, total - len(r) :] = 1
        smask[i, total - len(r) :] = m
    return _embeds(model, ids).detach(), att, smask


def _generate(model, embeds, att, mask, use_cache=True, n=6):
    with torch.no_grad(), plora_mask(model, mask):
        return model.generate(
            inputs_embeds=embeds,
            attention_mask=att,
            max_new_tokens=n,
            do_sample=False,
            use_cache=use_cache,
            pad_token_id=PAD,
            eos_token_id=None,
        )


def _generate_base(base, embeds, att, n=6):
    with torch.no_grad():
        return base.generate(
            inputs_embeds=embeds,
            attention_mask=att,
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=PAD,
            eos_token_id=None,
        )


def _greedy_full(model, embeds, mask, n=6):
    """Reference: recompute the full sequence each step, no cache.

    The speech mask covers the prompt; generated tokens get no delta.
    """
    seq = embeds
    tokens = []
    for _ in range(n):
        full = torch.cat(
            [
                mask,
                torch.zeros(1, seq.shape[1] - mask.shape[1], dtype=torch.bool),
            ],
            dim=1,
        )
        with torch.no_grad(), plora_mask(model, full):
            logits = model(inputs_embeds=seq, use_cache=False).logits
        tok = logits[:, -1].argmax(-1)
        tokens.append(tok)
        seq = torch.cat([seq, _embeds(model, tok[:, None])], dim=1)
    return torch.stack(tokens, dim=1)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_generate_cache_equals_full_recompute(kind):
    base, model = _adapted(kind)
    embeds, att, smask = _speech_batch(model, [9], (2, 6), 9)
    got = _generate(model, embeds, att, smask)
    ref = _greedy_full(model, embeds, smask)
    assert torch.equal(got, ref)
    # no-cache generate follows the same rule (prompt part of the mask)
    assert torch.equal(
        _generate(model, embeds, att, smask, use_cache=False), ref
    )
    # and the adapter matters here: the base model answers differently
    with disable_plora(model):
        teacher = _generate(model, embeds, att, smask)
    assert torch.equal(teacher, _generate_base(base, embeds, att))
    assert not torch.equal(teacher, got)


def test_generate_teacher_equals_base_model():
    base, model = _adapted("llama")
    embeds, att, smask = _speech_batch(model, [8], (2, 5), 8)
    with torch.no_grad(), disable_plora(model):
        a = model.generate(
            inputs_embeds=embeds,
            attention_mask=att,
            max_new_tokens=5,
            do_sample=False,
            pad_token_id=PAD,
            eos_token_id=None,
        )
    with torch.no_grad():
        b = base.generate(
            inputs_embeds=embeds,
            attention_mask=att,
            max_new_tokens=5,
            do_sample=False,
            pad_token_id=PAD,
            eos_token_id=None,
        )
    assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_batched_left_padded_generate_equals_one_by_one(kind):
    _, model = _adapted(kind)
    lengths = [10, 7, 8]
    embeds, att, smask = _speech_batch(model, lengths, (2, 5), 10)
    batched = _generate(model, embeds, att, smask)
    for i, n in enumerate(lengths):
        sl = slice(10 - n, 10)
        single = _generate(
            model,
            embeds[i : i + 1, sl],
            att[i : i + 1, sl],
            smask[i : i + 1, sl],
        )
        assert torch.equal(batched[i : i + 1], single), i


def test_text_scope_mask_and_generated_tokens():
    _, model = _adapted("llama", scope="text")
    speech = torch.zeros(1, 8, dtype=torch.bool)
    speech[:, 2:5] = True
    mask = scope_mask(speech, "text")
    assert mask.tolist() == [
        [True, True, False, False, False, True, True, True]
    ]
    embeds = _embeds(model, torch.randint(2, 256, (1, 8))).detach()
    att = torch.ones(1, 8, dtype=torch.long)
    # generated tokens are text: the delta applies to them, so cache and
    # no-cache agree with a full recomputation whose mask is 1 after the prompt
    a = _generate(model, embeds, att, mask)
    b = _generate(model, embeds, att, mask, use_cache=False)
    assert torch.equal(a, b)


def test_training_mode_length_mismatch_raises():
    _, model = _adapted("llama")
    model.train()
    ids = torch.randint(2, 256, (1, 6))
    with (
        plora_mask(model, torch.ones(1, 5)),
        pytest.raises(ValueError, match="length"),
    ):
        model(input_ids=ids)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_state_dict_round_trip(kind, tmp_path):
    _, model = _adapted(kind)
    sd = plora_state_dict(model)
    assert all(".lora_A" in k or ".lora_B" in k for k in sd)
    assert len(sd) == 2 * 2 * 7
    path = tmp_path / "plora.pt"
    torch.save(sd, path)
    fresh = _tiny(kind)
    apply_plora(fresh, dropout=0.0)
    assert sorted(plora_state_dict(fresh)) == sorted(sd)
    load_plora_state_dict(fresh, torch.load(path))
    ids = torch.randint(2, 256, (1, 7))
    mask = torch.ones(1, 7)
    with torch.no_grad(), plora_mask(model, mask), plora_mask(fresh, mask):
        assert torch.equal(
            model(input_ids=ids).logits, fresh(input_ids=ids).logits
        )

    bad = dict(sd)
    key = next(iter(bad))
    bad.pop(key)
    bad["nope.lora_A"] = torch.zeros(1)
    with pytest.raises(KeyError, match="missing keys") as err:
        load_plora_state_dict(fresh, bad)
    assert key in str(err.value) and "nope.lora_A" in str(err.value)
    other = _tiny(kind)
    apply_plora(other, r=4)
    with pytest.raises(ValueError, match="shape"):
        load_plora_state_dict(other, sd)


def test_merge_global_equals_unmerged_and_audio_refuses():
    _, model = _adapted("llama", scope="global")
    ids = torch.randint(2, 256, (2, 7))
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        merged_names = merge_plora(model)
        merged = model(input_ids=ids).logits
    assert len(merged_names) == 14
    assert not any(isinstance(m, PLoRALinear) for m in model.modules())
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)

    _, audio = _adapted("llama", scope="audio")
    with pytest.raises(ValueError, match="cannot be merged"):
        merge_plora(audio)


def test_only_adapter_params_require_grad():
    _, model = _adapted("qwen2")
    model.train()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(
        n.endswith(("lora_A", "lora_B")) for n in trainable
    )
    assert len(trainable) == len(plora_parameters(model))
    ids = torch.randint(2, 256, (2, 6))
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[:, 2:4] = True
    with plora_mask(model, mask):
        model(input_ids=ids).logits.square().mean().backward()
    assert all(p.grad is not None for p in plora_parameters(model))
    assert all(
        p.grad is None
        for n, p in model.named_parameters()
        if not n.endswith(("lora_A", "lora_B"))
    )


def test_bf16_base_with_fp32_adapter():
    _, model = _adapted("llama")
    model.to(torch.bfloat16)
    for m in model.modules():
        if isinstance(m, PLoRALinear):
            m.lora_A.data = m.lora_A.data.float()
            m.lora_B.data = m.lora_B.data.float()
    ids = torch.randint(2, 256, (1, 5))
    with torch.no_grad(), plora_mask(model, torch.ones(1, 5)):
        out = model(input_ids=ids).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_target_patterns_and_errors():
    net = nn.Sequential()
    net.add_module("q_proj", nn.Linear(4, 4))
    net.add_module("k_proj", nn.Linear(4, 4))
    assert apply_plora(net, target_modules=r"k_.*", r=2) == ["k_proj"]
    with pytest.raises(ValueError, match="already"):
        apply_plora(net)
    with pytest.raises(ValueError, match="matches"):
        apply_plora(nn.Sequential(nn.Linear(2, 2)), target_modules=("q_proj",))
    with pytest.raises(ValueError, match="scope"):
        apply_plora(nn.Sequential(nn.Linear(2, 2)), ("0",), scope="speech")


@pytest.mark.parametrize("soft", [False, True])
def test_masked_delta_equals_the_dense_formula(soft):
    """The row-sparse delta equals base + mask * delta, values and grads."""
    from speechbrain_blspkd.nnet.plora import PLoRALinear, PLoRAState

    torch.manual_seed(0)
    state = PLoRAState("audio")
    layer = PLoRALinear(nn.Linear(6, 5), state, r=3, alpha=6, dropout=0.0)
    nn.init.normal_(layer.lora_B)
    mask = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.float32)
    if soft:
        mask = mask * torch.tensor([[1.0, 0.5, 2.0, 1.0]])
    state.set_mask(mask)
    x = torch.randn(2, 4, 6, requires_grad=True)
    y = layer(x)
    delta = (x @ layer.lora_A.T) @ layer.lora_B.T * layer.scaling
    ref = layer.base(x) + delta * mask[..., None]
    assert torch.allclose(y, ref, atol=1e-6)
    grads = torch.autograd.grad(y.square().sum(), [x, layer.lora_A])
    refs = torch.autograd.grad(ref.square().sum(), [x, layer.lora_A])
    for g, r in zip(grads, refs):
        assert torch.allclose(g, r, atol=1e-5)
    # unmasked rows are exactly the base layer
    assert torch.equal(y[1, 1:], layer.base(x)[1, 1:])


def test_masked_delta_with_dropout_touches_only_masked_rows():
    from speechbrain_blspkd.nnet.plora import PLoRALinear, PLoRAState

    torch.manual_seed(0)
    state = PLoRAState("audio")
    layer = PLoRALinear(nn.Linear(6, 5), state, r=3, alpha=6, dropout=0.5)
    nn.init.normal_(layer.lora_B)
    state.set_mask(torch.tensor([[0, 1, 1, 0]], dtype=torch.bool))
    x = torch.randn(1, 4, 6)
    y = layer.train()(x)
    base = layer.base(x)
    assert torch.equal(y[0, [0, 3]], base[0, [0, 3]])
    assert not torch.allclose(y[0, 1:3], base[0, 1:3])
    clean = layer.eval()(x)
    assert not torch.allclose(y[0, 1:3], clean[0, 1:3])  # dropout applied
