"""Tests of the Whisper encoder wrapper and the BLSP-KD speech LLM (tiny)."""

import copy

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    WhisperFeatureExtractor,
)

from speechbrain_blspkd.models.speech_llm import SpeechLLMModel
from speechbrain_blspkd.nnet.cformer import CFormer
from speechbrain_blspkd.nnet.plora import plora_parameters
from speechbrain_blspkd.nnet.whisper_encoder import (
    WhisperEncoder,
    whisper_log_mel,
)
from speechbrain_blspkd.prompt import build_test_tokenizer
from speechbrain_blspkd.utils.testing import (
    LOGIT_KEYS,
    distillation_loss,
    tiny_llm_config,
    tiny_whisper_config,
)

TRANSCRIPTS = ["the cat sat on the mat", "a dog", "hello world how are you"]
CONTINUATIONS = ["The cat was happy.", "ran to the park", "I am fine"]
INSTRUCTION = "Repeat the sentence:"


def batch_of_wavs():
    g = torch.Generator().manual_seed(1)
    wavs = torch.randn(3, 16000, generator=g) * 0.1
    lens = torch.tensor([1.0, 0.5, 0.8])
    for i, rel in enumerate(lens):
        wavs[i, int(rel * 16000) :] = 0.0
    return wavs, lens


def randomise_plora(model, std=0.1):
    for p in plora_parameters(model.llm):
        if p.dim() == 2 and not p.abs().sum():
            torch.nn.init.normal_(p, std=std)


@pytest.fixture(scope="module")
def pristine_and_model():
    """A tiny base LLM, an untouched copy, and a SpeechLLMModel around it."""
    torch.manual_seed(0)
    tok = build_test_tokenizer()
    config = LlamaConfig(**tiny_llm_config(tok, initializer_range=0.3))
    llm = LlamaForCausalLM(config).eval()
    pristine = copy.deepcopy(llm)
    model = SpeechLLMModel(
        llm,
        CFormer(64, 64, n_pre=1, n_post=1, nhead=4, d_ffn=128, dropout=0.0),
        encoder=WhisperEncoder(tiny_whisper_config()),
        tokenizer=tok,
        system_prompt="You are brief.",
        instruction=INSTRUCTION,
        plora=dict(r=4, alpha=8, dropout=0.0, scope="audio"),
    )
    randomise_plora(model)
    return pristine, model


# ----------------------------------------------------------------------
# encoder
def test_log_mel_matches_hf_feature_extractor():
    g = torch.Generator().manual_seed(0)
    clips = [torch.randn(24000, generator=g) * 0.1, torch.randn(7001) * 0.02]
    ref = WhisperFeatureExtractor(feature_size=80)(
        [c.numpy() for c in clips], sampling_rate=16000, return_tensors="pt"
    ).input_features
    batch = torch.zeros(2, 24000)
    batch[0], batch[1, :7001] = clips[0], clips[1]
    full = whisper_log_mel(batch, 3000)
    assert torch.allclose(full, ref, atol=1e-4)
    short = whisper_log_mel(batch, 152)  # the dynamic path's frames
    assert torch.allclose(short, ref[..., :152], atol=1e-4)


def test_dynamic_length_encoder():
    """Dynamic vs 30-s padded encoding in the tiny random model.

    Measured here (random weights, 2 layers): cosine similarity of the
    real frames ~0.998-0.999; the test asserts > 0.9. Batched == one by one
    within 1e-4 (float noise) thanks to the padding mask.
    """
    torch.manual_seed(0)
    config = tiny_whisper_config()
    dynamic = WhisperEncoder(config).eval()
    padded = WhisperEncoder(config, dynamic_length=False).eval()
    padded.load_state_dict(dynamic.state_dict())
    wavs, lens = batch_of_wavs()
    with torch.no_grad():
        fd, ld = dynamic(wavs, lens)
        fp, lp = padded(wavs, lens)
    assert fd.shape == fp.shape == (3, 50, 64)
    assert torch.equal(ld, lp)
    assert torch.allclose(ld, torch.tensor([1.0, 0.5, 0.8]))
    for i in range(3):
        n = int(round(float(ld[i]) * fd.shape[1]))
        cos = torch.nn.functional.cosine_similarity(fd[i, :n], fp[i, :n], -1)
        assert cos.min() > 0.9, float(cos.min())
        with torch.no_grad():
            single, _ = dynamic(wavs[i : i + 1, : int(lens[i] * 16000)])
        assert single.shape[1] == n
        assert torch.allclose(single[0], fd[i, :n], atol=1e-4)
    # frozen: no grad, stays in eval mode
    dynamic.train()
    assert not dynamic.encoder.training
    assert not any(p.requires_grad for p in dynamic.parameters())
    with pytest.raises(ValueError, match="30 s"):
        dynamic(torch.zeros(1, 16000 * 31))


# ----------------------------------------------------------------------
# training inputs
def test_forward_shapes_and_finite(pristine_and_model):
    _, model = pristine_and_model
    wavs, lens = batch_of_wavs()
    out = model(wavs, lens, TRANSCRIPTS, CONTINUATIONS)
    n = [len(x) for x in model.transcript_ids(TRANSCRIPTS)]
    vocab = model.llm.config.vocab_size
    assert out["num_tokens"].tolist() == n
    assert out["input_mask"].sum(1).tolist() == n
    assert out["student_input_logits"].shape == (3, max(n), vocab)
    assert out["teacher_input_logits"].shape == (3, max(n), vocab)
    r = out["response_mask"].sum(1)
    assert out["student_response_logits"].shape == (3, int(r.max()), vocab)
    assert out["response_targets"].shape == out["response_mask"].shape
    assert out["alphas"].shape == out["frame_mask"].shape
    for key in LOGIT_KEYS:
        assert torch.isfinite(out[key]).all(), key
    assert not out["teacher_input_logits"].requires_grad
    assert out["student_input_logits"].requires_grad
    ids = out["transcript_ids"]
    assert ids[0, : n[0]].tolist() == model.transcript_ids(TRANSCRIPTS[:1])[0]
    # every response ends with the end-of-turn token
    eot = model.prompts.eot_ids[0]
    for i in range(3):
        assert out["response_targets"][i, int(r[i]) - 1] == eot
    # truncated continuation: no end-of-turn target
    out2 = model(wavs, lens, TRANSCRIPTS, CONTINUATIONS, add_eot=[1, 0, 1])
    assert out2["response_mask"].sum(1).tolist() == [
        int(r[0]),
        int(r[1]) - 1,
        int(r[2]),
    ]
    # cached encoder features give the same result
    with torch.no_grad():
        feats, feat_lens = model.encoder(wavs, lens)
    out3 = model(
        transcripts=TRANSCRIPTS,
        continuations=CONTINUATIONS,
        feats=feats,
        feat_lens=feat_lens,
        run_teacher=False,
    )
    assert "teacher_input_logits" not in out3
    assert torch.allclose(
        out3["student_input_logits"], out["student_input_logits"], atol=1e-5
    )


def test_teacher_is_the_base_llm_and_positions(pristine_and_model):
    pristine, model = pristine_and_model
    wavs, lens = batch_of_wavs()
    out = model(wavs, lens, TRANSCRIPTS, CONTINUATIONS)
    tok = model.tokenizer
    for i, (text, cont) in enumerate(zip(TRANSCRIPTS, CONTINUATIONS)):
        msgs = [
            {"role": "system", "content": "You are brief."},
            {"role": "user", "content": f"{INSTRUCTION} {text}"},
        ]
        gen_ids = tok.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=True
        )
        gen_ids = tok(gen_ids, add_special_tokens=False)["input_ids"]
        full = gen_ids + tok(cont, add_special_tokens=False)["input_ids"]
        full = full + model.prompts.eot_ids[:1]
        with torch.no_grad():
            logits = pristine(torch.tensor([full])).logits[0]
        # input positions: the N transcript positions of the text prompt
        n = int(out["input_mask"][i].sum())
        ids = model.transcript_ids([text])[0]
        start = len(gen_ids) - n
        while full[start : start + n] != ids:  # locate the span
            start -= 1
        assert torch.allclose(
            out["teacher_input_logits"][i, :n],
            logits[start : start + n],
            atol=1e-4,
        )
        # response: first distribution from the last prompt position
        r = int(out["response_mask"][i].sum())
        assert r == len(full) - len(gen_ids)
        assert torch.allclose(
            out["teacher_response_logits"][i, 0],
            logits[len(gen_ids) - 1],
            atol=1e-4,
        )
        assert torch.allclose(
            out["teacher_response_logits"][i, :r],
            logits[len(gen_ids) - 1 : len(full) - 1],
            atol=1e-4,
        )
        assert out["response_targets"][i, :r].tolist() == full[len(gen_ids) :]
    # the student's text positions after the speech see the PLoRA'd speech
    # keys, so student and teacher differ; with identical inputs they would
    # not (checked through the teacher == base equality above)
    assert not torch.allclose(
        out["student_response_logits"], out["teacher_response_logits"]
    )


def test_plora_only_at_speech_positions(pristine_and_model):
    """With the adapter output replaced by the true embeddings, the student
    equals the teacher up to the first speech position (causal) and the
    PLoRA delta changes it from there on; without PLoRA it is the teacher.
    """
    _, model = pristine_and_model
    from speechbrain_blspkd.nnet.plora import disable_plora

    prompts = model.prompts.build_batch(
        INSTRUCTION, n_speech=[3], continuations=["ok"]
    )
    batch = model.prompts.collate(prompts)
    emb = model.embed_tokens(batch["input_ids"])
    mask = model._student_mask(batch["speech_mask"], batch["attention_mask"])
    with torch.no_grad():
        on = model._hidden(emb, batch, mask)
        with disable_plora(model.llm):
            off = model._hidden(emb, batch, mask)
    s0 = int(batch["span_start"][0])
    assert torch.allclose(on[0, :s0], off[0, :s0], atol=1e-6)
    assert not torch.allclose(on[0, s0:], off[0, s0:], atol=1e-3)


def test_generate_batched_equals_one_by_one(pristine_and_model):
    _, model = pristine_and_model
    wavs, lens = batch_of_wavs()
    for beams in (1, 2):
        batched, counts = model.generate(
            wavs,
            lens,
            max_new_tokens=6,
            num_beams=beams,
            return_ids=True,
            return_num_tokens=True,
        )
        assert len(batched) == 3
        assert any(len(x) > 0 for x in batched)
        for i in range(3):
            single, c = model.generate(
                wavs[i : i + 1, : int(lens[i] * 16000)],
                max_new_tokens=6,
                num_beams=beams,
                return_ids=True,
                return_num_tokens=True,
            )
            assert int(c[0]) == int(counts[i])
            assert single[0] == batched[i], (beams, i)
    texts = model.generate(wavs, lens, max_new_tokens=6)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    batched = model.generate_text(TRANSCRIPTS, max_new_tokens=6, return_ids=1)
    for i, text in enumerate(TRANSCRIPTS):
        single = model.generate_text([text], max_new_tokens=6, return_ids=1)
        assert single[0] == batched[i]


def test_generate_text_is_the_base_llm(pristine_and_model):
    pristine, model = pristine_and_model
    tok = model.tokenizer
    got = model.generate_text(TRANSCRIPTS[:1], max_new_tokens=5, return_ids=1)
    msgs = [
        {"role": "system", "content": "You are brief."},
        {"role": "user", "content": f"{INSTRUCTION} {TRANSCRIPTS[0]}"},
    ]
    text = tok.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True
    )
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    ref = pristine.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=5,
        do_sample=False,
        eos_token_id=model.prompts.eot_ids,
        pad_token_id=tok.pad_token_id,
    )[0, ids.shape[1] :].tolist()
    stop = set(model.prompts.eot_ids) | {tok.pad_token_id}
    cut = []
    for t in ref:
        if t in stop:
            break
        cut.append(t)
    assert got[0] == cut


def test_optimiser_steps_reduce_total_loss():
    torch.manual_seed(0)
    model = SpeechLLMModel.tiny_for_tests(instruction=INSTRUCTION)
    model.train()
    base = [p for n, p in model.llm.named_parameters() if "lora_" not in n]
    assert not any(p.requires_grad for p in base)
    params = model.trainable_parameters()
    assert params and all(p.requires_grad for p in params)
    opt = torch.optim.Adam(params, lr=3e-3)
    wavs, lens = batch_of_wavs()
    losses = []
    for _ in range(6):
        out = model(wavs, lens, TRANSCRIPTS, CONTINUATIONS)
        loss = distillation_loss(out, ce_weight=0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses
    assert any(p.grad is not None for p in plora_parameters(model.llm))
    assert all(p.grad is None for p in base)


def test_alignment_loss_and_token_accuracy():
    torch.manual_seed(0)
    model = SpeechLLMModel.tiny_for_tests(whisper=False)
    feats = torch.randn(3, 40, 64)
    lens = torch.tensor([1.0, 0.6, 0.8])
    ids = model.transcript_ids(TRANSCRIPTS)
    n = torch.tensor([len(x) for x in ids])
    target = torch.zeros(3, int(n.max()), dtype=torch.long)
    for i, x in enumerate(ids):
        target[i, : len(x)] = torch.tensor(x)
    opt = torch.optim.Adam(model.adapter.parameters(), lr=3e-3)
    first = None
    for _ in range(15):
        out = model.encode_speech(feats=feats, feat_lens=lens, num_tokens=n)
        terms = model.alignment_loss(out, target)
        for key in ("loss", "ce", "cos", "mse"):
            assert torch.isfinite(terms[key]) and terms[key].dim() == 0
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        first = float(terms["loss"].detach()) if first is None else first
    assert float(terms["loss"].detach()) < first
    acc = model.token_accuracy(out, target)
    assert acc["total"] == int(n.sum())
    assert 0 <= acc["correct"] <= acc["total"]
    assert 0 < acc["top_token_share"] <= 1
    # a perfect adapter (outputs = the true embeddings) scores 100 %
    out.tokens = model.embed_tokens(target).detach() * out.token_mask[..., None]
    assert model.token_accuracy(out, target)["accuracy"] == 1.0
    assert float(model.alignment_loss(out, target)["cos"]) < 1e-5


def test_qwen2_tiny():
    torch.manual_seed(0)
    model = SpeechLLMModel.tiny_for_tests(llm_type="qwen2")
    randomise_plora(model)
    wavs, lens = batch_of_wavs()
    out = model(wavs, lens, TRANSCRIPTS, CONTINUATIONS, instructions="Say:")
    assert torch.isfinite(out["student_response_logits"]).all()
    assert type(model.llm).__name__ == "Qwen2ForCausalLM"
    batched = model.generate(wavs, lens, max_new_tokens=4, return_ids=True)
    single = model.generate(wavs[1:2, :8000], max_new_tokens=4, return_ids=1)
    assert single[0] == batched[1]


@pytest.mark.parametrize("llm_type", ["llama", "qwen2"])
def test_prefix_reuse_equals_the_full_forward(llm_type):
    """Reusing the shared prefix's keys/values gives the same logits and
    gradients as running the whole sequence, for teacher and student."""
    torch.manual_seed(0)
    model = SpeechLLMModel.tiny_for_tests(llm_type=llm_type, whisper=False)
    model.train()
    for layer in model.llm.modules():
        if hasattr(layer, "dropout") and isinstance(
            layer.dropout, torch.nn.Dropout
        ):
            layer.dropout.p = 0.0
    model.adapter.eval()
    feats = torch.randn(2, 24, 64)
    kw = dict(
        feats=feats,
        feat_lens=torch.tensor([1.0, 0.75]),
        transcripts=["the cat sat", "a dog"],
        continuations=["on the mat.", "ran far away"],
        instructions="Continue:",
    )
    results = []
    for reuse in (False, True):
        model.prefix_reuse = reuse
        model.zero_grad()
        out = model.compute_kd_inputs(**kw)
        loss = (
            out["student_input_logits"].logsumexp(-1).sum()
            + out["student_response_logits"].logsumexp(-1).sum()
        )
        loss.backward()
        grads = [
            p.grad.clone()
            for p in model.trainable_parameters()
            if p.grad is not None
        ]
        results.append((out, grads))
    assert model._prefix_cache, "the prefix was not reused"
    (full, g_full), (reused, g_reused) = results
    for key in (
        "teacher_input_logits",
        "teacher_response_logits",
        "student_input_logits",
        "student_response_logits",
    ):
        assert torch.allclose(full[key], reused[key], atol=1e-4), key
    assert len(g_full) == len(g_reused) > 0
    for a, b in zip(g_full, g_reused):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-3)
