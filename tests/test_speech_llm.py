"""Tests of the Whisper encoder wrapper and the BLSP-KD speech LLM (tiny)."""

import copy

import pytest
import speechbrain as sb
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    WhisperFeatureExtractor,
)

from speechbrain_blspkd.models.llm_forward import run_llm
from speechbrain_blspkd.models.passes import (
    LLMPass,
    PassRequest,
    SpeechLLMOutput,
)
from speechbrain_blspkd.models.speech_llm import SpeechLLMModel
from speechbrain_blspkd.nnet.adapter import AdapterOutput, AdapterTargets
from speechbrain_blspkd.nnet.cformer import CFormer
from speechbrain_blspkd.nnet.plora import plora_parameters
from speechbrain_blspkd.nnet.qformer import QFormer
from speechbrain_blspkd.nnet.whisper_encoder import (
    WhisperEncoder,
    whisper_log_mel,
)
from speechbrain_blspkd.objectives import BLSPKDObjective
from speechbrain_blspkd.objectives.alignment import (
    alignment_loss,
    nearest_token_accuracy,
)
from speechbrain_blspkd.prompt import ContextLengthError
from speechbrain_blspkd.testing import (
    build_test_tokenizer,
    count_llm_calls,
    tiny_llm_config,
    tiny_speech_llm,
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
# training passes
ALL = PassRequest(teacher=True, student=True, logits=("input", "response"))


def text_prompt_ids(tok, text, cont, eot):
    """The teacher's prompt (generation prompt, full sequence) by hand."""
    msgs = [
        {"role": "system", "content": "You are brief."},
        {"role": "user", "content": f"{INSTRUCTION} {text}"},
    ]
    gen = tok.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True
    )
    gen_ids = tok(gen, add_special_tokens=False)["input_ids"]
    full = gen_ids + tok(cont, add_special_tokens=False)["input_ids"] + [eot]
    return gen_ids, full


def locate(full, ids, before):
    """Start of ``ids`` in ``full``, searching backwards from ``before``."""
    start = before - len(ids)
    while full[start : start + len(ids)] != ids:
        start -= 1
        assert start >= 0, "transcript span not found"
    return start


def test_forward_shapes_and_finite(pristine_and_model):
    _, model = pristine_and_model
    wavs, lens = batch_of_wavs()
    out = model(
        TRANSCRIPTS, CONTINUATIONS, wavs=wavs, wav_lens=lens, request=ALL
    )
    assert isinstance(out, SpeechLLMOutput)
    n = [len(x) for x in model.transcript_ids(TRANSCRIPTS)]
    vocab = model.llm.config.vocab_size
    assert out.targets.num_tokens.tolist() == n
    assert out.transcript_mask.sum(1).tolist() == n
    assert out.adapter.token_counts.tolist() == n  # CIF fires N in training
    for side in (out.teacher, out.student):
        assert isinstance(side, LLMPass)
        assert side.masks["input"].sum(1).tolist() == n
        assert side.logits["input"].shape == (3, max(n), vocab)
        assert len(side.prompts) == 3
        assert not side.hidden  # none requested
    teacher, student = out.teacher, out.student
    r = teacher.masks["response"].sum(1)
    assert torch.equal(student.masks["response"], teacher.masks["response"])
    assert student.logits["response"].shape == (3, int(r.max()), vocab)
    assert teacher.response_targets.shape == teacher.masks["response"].shape
    assert out.adapter.alphas.shape == out.adapter.frame_mask.shape
    for side in (teacher, student):
        for span, logits in side.logits.items():
            assert logits.dtype == torch.float32
            assert torch.isfinite(logits).all(), span
            # 0 outside the span
            outside = logits[~side.masks[span]]
            assert torch.equal(outside, torch.zeros_like(outside)), span
    assert not teacher.logits["input"].requires_grad
    assert student.logits["input"].requires_grad
    assert student.logits["response"].requires_grad
    ids = out.transcript_ids
    assert ids[0, : n[0]].tolist() == model.transcript_ids(TRANSCRIPTS[:1])[0]
    assert ids[1, n[1] :].eq(0).all()
    # every response ends with the end-of-turn token
    eot = model.prompts.eot_ids[0]
    for i in range(3):
        assert teacher.response_targets[i, int(r[i]) - 1] == eot
    # truncated continuation: no end-of-turn target
    out2 = model(
        TRANSCRIPTS,
        CONTINUATIONS,
        add_eot=[1, 0, 1],
        wavs=wavs,
        wav_lens=lens,
        request=ALL,
    )
    want = [int(r[0]), int(r[1]) - 1, int(r[2])]
    assert out2.teacher.masks["response"].sum(1).tolist() == want
    assert out2.student.masks["response"].sum(1).tolist() == want
    # cached encoder features give the same result (student only)
    with torch.no_grad():
        feats, feat_lens = model.encoder(wavs, lens)
    out3 = model(
        transcripts=TRANSCRIPTS,
        continuations=CONTINUATIONS,
        feats=feats,
        feat_lens=feat_lens,
        request=PassRequest(student=True, logits=("input", "response")),
    )
    assert out3.teacher is None
    for span in ("input", "response"):
        assert torch.allclose(
            out3.student.logits[span], student.logits[span], atol=1e-5
        )


def test_default_request_runs_the_adapter_only(pristine_and_model):
    _, model = pristine_and_model
    wavs, lens = batch_of_wavs()
    with count_llm_calls(model) as calls:
        out = model(TRANSCRIPTS, wavs=wavs, wav_lens=lens)
        assert calls == []
        # the hook does count: a teacher pass is one LLM call
        model.teacher_pass(TRANSCRIPTS[:1], CONTINUATIONS[:1])
        assert calls == [1]
    assert out.teacher is None and out.student is None
    n = [len(x) for x in model.transcript_ids(TRANSCRIPTS)]
    assert out.adapter.token_counts.tolist() == n
    # the outputs carry the frames the adapter read (the encoder's, or the
    # cached features given), for objectives that distil from them
    feats, feat_lens = model.encoder(wavs, lens)
    torch.testing.assert_close(out.feats, feats)
    torch.testing.assert_close(out.feat_lens, feat_lens)
    cached = model(TRANSCRIPTS, feats=feats * 2, feat_lens=feat_lens)
    assert torch.equal(cached.feats, feats * 2)
    with pytest.raises(ValueError, match=r"hidden layer\(s\) \[3\]"):
        model(
            TRANSCRIPTS,
            wavs=wavs,
            wav_lens=lens,
            request=PassRequest(
                student=True, response=False, hidden=((3, "input"),)
            ),
        )


def test_pass_request_checks():
    assert not PassRequest().runs_llm
    assert PassRequest(teacher=True).runs_llm
    with pytest.raises(ValueError, match="unknown span"):
        PassRequest(student=True, logits=("transcript",))
    with pytest.raises(ValueError, match="unknown span"):
        PassRequest(student=True, hidden=((1, "prompt"),))
    with pytest.raises(ValueError, match="response=True"):
        PassRequest(student=True, response=False, logits=("response",))
    with pytest.raises(ValueError, match="response=True"):
        PassRequest(student=True, response=False, hidden=((-1, "response"),))


def test_input_only_pass_needs_no_continuation(pristine_and_model):
    _, model = pristine_and_model
    wavs, lens = batch_of_wavs()
    request = PassRequest(
        teacher=True, student=True, response=False, logits=("input",)
    )
    out = model(TRANSCRIPTS, wavs=wavs, wav_lens=lens, request=request)
    for side in (out.teacher, out.student):
        assert set(side.logits) == {"input"}
        assert "response" not in side.masks
        assert side.response_targets is None
    # the input logits do not depend on the continuation (causal)
    full = model(
        TRANSCRIPTS, CONTINUATIONS, wavs=wavs, wav_lens=lens, request=ALL
    )
    for name in ("teacher", "student"):
        a = getattr(out, name).logits["input"]
        b = getattr(full, name).logits["input"]
        assert torch.allclose(a, b, atol=1e-5), name
    with pytest.raises(ValueError, match="continuations"):
        model(TRANSCRIPTS, wavs=wavs, wav_lens=lens, request=ALL)
    with pytest.raises(ValueError, match="2 continuations"):
        model.teacher_pass(TRANSCRIPTS, CONTINUATIONS[:2])


def test_teacher_is_the_base_llm_and_positions(pristine_and_model):
    pristine, model = pristine_and_model
    wavs, lens = batch_of_wavs()
    out = model(
        TRANSCRIPTS, CONTINUATIONS, wavs=wavs, wav_lens=lens, request=ALL
    )
    teacher = out.teacher
    eot = model.prompts.eot_ids[0]
    for i, (text, cont) in enumerate(zip(TRANSCRIPTS, CONTINUATIONS)):
        gen_ids, full = text_prompt_ids(model.tokenizer, text, cont, eot)
        assert teacher.prompts[i].input_ids == full
        with torch.no_grad():
            logits = pristine(torch.tensor([full])).logits[0]
        # input positions: the N transcript positions of the text prompt
        n = int(teacher.masks["input"][i].sum())
        ids = model.transcript_ids([text])[0]
        assert n == len(ids)
        start = locate(full, ids, len(gen_ids))
        assert torch.allclose(
            teacher.logits["input"][i, :n],
            logits[start : start + n],
            atol=1e-4,
        )
        # response: first distribution from the last prompt position
        r = int(teacher.masks["response"][i].sum())
        assert r == len(full) - len(gen_ids)
        assert torch.allclose(
            teacher.logits["response"][i, 0],
            logits[len(gen_ids) - 1],
            atol=1e-4,
        )
        assert torch.allclose(
            teacher.logits["response"][i, :r],
            logits[len(gen_ids) - 1 : len(full) - 1],
            atol=1e-4,
        )
        assert teacher.response_targets[i, :r].tolist() == full[len(gen_ids) :]
    # the student predicts the same response tokens
    assert torch.equal(out.student.response_targets, teacher.response_targets)
    # the student's text positions after the speech see the PLoRA'd speech
    # keys, so student and teacher differ
    assert not torch.allclose(
        out.student.logits["response"], teacher.logits["response"]
    )
    # the teacher pass restored the training flag and left PLoRA on
    model.train()
    again = model.teacher_pass(TRANSCRIPTS, CONTINUATIONS)
    assert model.llm.training
    assert torch.allclose(
        again.logits["response"], teacher.logits["response"], atol=1e-5
    )


def test_teacher_hidden_states_are_the_base_llm_layers(pristine_and_model):
    """Hidden states at layer k are HF's ``hidden_states[k]`` at the span
    positions; (-1, span) is the final (normed) state the head reads."""
    pristine, model = pristine_and_model
    layers = model.llm.config.num_hidden_layers
    hidden = tuple(
        (k, span) for k in (0, 1, layers, -1) for span in ("input", "response")
    )
    request = PassRequest(
        teacher=True, logits=("input", "response"), hidden=hidden
    )
    out = model.teacher_pass(TRANSCRIPTS, CONTINUATIONS, request=request)
    assert set(out.hidden) == set(hidden)
    eot = model.prompts.eot_ids[0]
    for i, (text, cont) in enumerate(zip(TRANSCRIPTS, CONTINUATIONS)):
        gen_ids, full = text_prompt_ids(model.tokenizer, text, cont, eot)
        with torch.no_grad():
            ref = pristine.base_model(
                torch.tensor([full]), output_hidden_states=True
            )
        ids = model.transcript_ids([text])[0]
        start = locate(full, ids, len(gen_ids))
        positions = {
            "input": list(range(start, start + len(ids))),
            "response": list(range(len(gen_ids) - 1, len(full) - 1)),
        }
        for (k, span), states in out.hidden.items():
            p = positions[span]
            want = ref.hidden_states[k][0, p]
            assert states.shape[-1] == model.llm.config.hidden_size
            assert torch.allclose(states[i, : len(p)], want, atol=1e-4), (
                k,
                span,
            )
            rest = states[i, len(p) :]
            assert torch.equal(rest, torch.zeros_like(rest))
        final = ref.last_hidden_state[0, positions["response"]]
        got = out.hidden[(-1, "response")][i, : len(positions["response"])]
        assert torch.allclose(got, final, atol=1e-4)
    # layers differ from each other (the comparison above can fail)
    assert not torch.allclose(
        out.hidden[(0, "input")], out.hidden[(1, "input")], atol=1e-3
    )
    # the logits are the LM head of the final state
    mask = out.masks["response"]
    head = model.lm_head(out.hidden[(-1, "response")][mask])
    assert torch.allclose(head, out.logits["response"][mask], atol=1e-4)


def test_student_equals_teacher_with_the_true_embeddings(pristine_and_model):
    """Spans align: with the transcript's own embeddings as speech and PLoRA
    off, the student pass is the teacher pass at both spans (and at any
    layer); with PLoRA on it is not."""
    _, model = pristine_and_model
    request = PassRequest(
        teacher=True,
        student=True,
        logits=("input", "response"),
        hidden=((1, "input"), (1, "response"), (-1, "response")),
    )
    teacher = model.teacher_pass(TRANSCRIPTS, CONTINUATIONS, request=request)
    ids, mask = _pad_ids(model.transcript_ids(TRANSCRIPTS))
    with torch.no_grad():
        true = AdapterOutput(model.embed_tokens(ids), mask)
        with model.plora_off():
            off = model.student_pass(true, CONTINUATIONS, request=request)
        on = model.student_pass(true, CONTINUATIONS, request=request)
    assert torch.equal(off.response_targets, teacher.response_targets)
    for span in ("input", "response"):
        assert torch.equal(off.masks[span], teacher.masks[span])
        assert torch.allclose(
            off.logits[span], teacher.logits[span], atol=1e-4
        ), span
        assert not torch.allclose(
            on.logits[span], teacher.logits[span], atol=1e-3
        ), span
    for key in request.hidden:
        assert torch.allclose(off.hidden[key], teacher.hidden[key], atol=1e-4)
    # the student prompt holds placeholders where the transcript was
    for p_s, p_t in zip(off.prompts, teacher.prompts):
        assert p_s.speech_span == p_t.transcript_span
        assert p_s.response_span == p_t.response_span


def _pad_ids(rows):
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = True
    return ids, mask


def test_plora_only_at_speech_positions(pristine_and_model):
    """With the adapter output replaced by the true embeddings, the student
    equals the teacher up to the first speech position (causal) and the
    PLoRA delta changes it from there on; without PLoRA it is the teacher.
    """
    _, model = pristine_and_model
    prompts = model.prompts.build_batch(
        INSTRUCTION, n_speech=[3], continuations=["ok"]
    )
    batch = model.prompts.collate(prompts)
    emb = model.embed_tokens(batch["input_ids"])
    mask = model._student_mask(batch["speech_mask"], batch["attention_mask"])
    with torch.no_grad():
        on, _ = run_llm(model, emb, batch, mask)
        with model.plora_off():
            off, _ = run_llm(model, emb, batch, mask)
    s0 = int(batch["span_start"][0])
    assert torch.allclose(on[0, :s0], off[0, :s0], atol=1e-6)
    assert not torch.allclose(on[0, s0:], off[0, s0:], atol=1e-3)


def test_batched_passes_equal_one_by_one(pristine_and_model):
    _, model = pristine_and_model
    torch.manual_seed(3)
    feats = torch.randn(3, 30, 64)
    feat_lens = torch.tensor([1.0, 0.5, 0.8])
    request = PassRequest(
        teacher=True,
        student=True,
        logits=("input", "response"),
        hidden=((1, "response"),),
    )
    with torch.no_grad():
        batched = model(
            TRANSCRIPTS,
            CONTINUATIONS,
            feats=feats,
            feat_lens=feat_lens,
            request=request,
        )
        for i in range(3):
            frames = int(round(float(feat_lens[i]) * 30))
            single = model(
                TRANSCRIPTS[i : i + 1],
                CONTINUATIONS[i : i + 1],
                feats=feats[i : i + 1, :frames],
                request=request,
            )
            for name in ("teacher", "student"):
                a, b = getattr(single, name), getattr(batched, name)
                for span in ("input", "response"):
                    k = int(a.masks[span].sum())
                    assert int(b.masks[span][i].sum()) == k
                    assert torch.allclose(
                        a.logits[span][0, :k],
                        b.logits[span][i, :k],
                        atol=1e-4,
                    ), (name, span, i)
                k = int(a.masks["response"].sum())
                assert torch.allclose(
                    a.hidden[(1, "response")][0, :k],
                    b.hidden[(1, "response")][i, :k],
                    atol=1e-4,
                ), (name, i)


def test_student_pass_with_a_qformer_has_l_speech_positions():
    torch.manual_seed(0)
    adapter = QFormer(
        64, 64, num_queries=3, num_layers=1, num_heads=4, ffn_size=128
    )
    model = tiny_speech_llm(adapter=adapter, instruction=INSTRUCTION)
    randomise_plora(model)
    wavs, lens = batch_of_wavs()
    n = [len(x) for x in model.transcript_ids(TRANSCRIPTS)]
    assert any(x != 3 for x in n)
    request = PassRequest(
        teacher=True,
        student=True,
        logits=("input", "response"),
        hidden=((-1, "input"),),
    )
    out = model(
        TRANSCRIPTS, CONTINUATIONS, wavs=wavs, wav_lens=lens, request=request
    )
    assert out.adapter.token_counts.tolist() == [3, 3, 3]
    assert out.targets.num_tokens.tolist() == n
    student, teacher = out.student, out.teacher
    assert student.masks["input"].sum(1).tolist() == [3, 3, 3]
    assert student.logits["input"].shape[:2] == (3, 3)
    assert student.hidden[(-1, "input")].shape == (3, 3, 64)
    assert teacher.masks["input"].sum(1).tolist() == n
    for p in student.prompts:
        start, length = p.speech_span
        assert length == 3
        assert (
            p.input_ids[start : start + 3] == [model.prompts.placeholder_id] * 3
        )
    # the response is the same whatever the speech length
    assert torch.equal(student.response_targets, teacher.response_targets)
    assert torch.equal(student.masks["response"], teacher.masks["response"])
    assert torch.isfinite(student.logits["response"]).all()
    texts = model.generate(wavs, lens, max_new_tokens=3, return_ids=True)
    assert len(texts) == 3


# ----------------------------------------------------------------------
# generation
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


def test_generate_checks_the_context_length(pristine_and_model, monkeypatch):
    _, model = pristine_and_model
    wavs, lens = batch_of_wavs()
    _, counts = model.generate(
        wavs, lens, max_new_tokens=1, return_num_tokens=True
    )
    prompts = model.prompts.build_batch(INSTRUCTION, n_speech=counts.tolist())
    longest = max(len(p.input_ids) for p in prompts)
    limit = model.llm.config.max_position_embeddings
    fits = limit - longest
    model.check_fits(INSTRUCTION, fits, n_speech=counts.tolist())  # no error

    def never(*args, **kwargs):
        raise AssertionError("generated although the context is too short")

    monkeypatch.setattr(model.llm, "generate", never)
    with pytest.raises(ContextLengthError, match=r"x\.csv: file .*b"):
        model.generate(
            wavs,
            lens,
            max_new_tokens=fits + 1,
            names=["a", "b", "c"],
            source="x.csv",
            item="file",
        )
    with pytest.raises(ContextLengthError, match=str(limit)):
        model.generate(wavs, lens, max_new_tokens=fits + 1)


# ----------------------------------------------------------------------
# training
def test_optimiser_steps_reduce_total_loss():
    torch.manual_seed(0)
    model = tiny_speech_llm(instruction=INSTRUCTION)
    model.train()
    base = [p for n, p in model.llm.named_parameters() if "lora_" not in n]
    assert not any(p.requires_grad for p in base)
    params = model.trainable_parameters()
    assert params and all(p.requires_grad for p in params)
    objective = BLSPKDObjective(
        {"input_kl": 1.0, "response_kl": 1.0, "response_ce": 0.5, "cif": 1.0}
    )
    request = objective.request(sb.Stage.TRAIN)
    assert request.teacher and request.student
    opt = torch.optim.Adam(params, lr=3e-3)
    wavs, lens = batch_of_wavs()
    losses = []
    for _ in range(6):
        out = model(
            TRANSCRIPTS,
            CONTINUATIONS,
            wavs=wavs,
            wav_lens=lens,
            request=request,
        )
        loss, stats = objective(out, model, sb.Stage.TRAIN)
        assert set(stats) == {
            "input_kl",
            "response_kl",
            "response_ce",
            "cif",
            "loss",
        }
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses
    assert any(p.grad is not None for p in plora_parameters(model.llm))
    assert any(p.grad is not None for p in model.adapter.parameters())
    assert all(p.grad is None for p in base)


def test_alignment_loss_and_token_accuracy():
    torch.manual_seed(0)
    model = tiny_speech_llm(whisper=False)
    feats = torch.randn(3, 40, 64)
    lens = torch.tensor([1.0, 0.6, 0.8])
    ids = model.transcript_ids(TRANSCRIPTS)
    n = torch.tensor([len(x) for x in ids])
    target = torch.zeros(3, int(n.max()), dtype=torch.long)
    for i, x in enumerate(ids):
        target[i, : len(x)] = torch.tensor(x)
    targets = AdapterTargets(num_tokens=n)
    opt = torch.optim.Adam(model.adapter.parameters(), lr=3e-3)
    first = None
    for _ in range(15):
        out = model.encode_speech(feats=feats, feat_lens=lens, targets=targets)
        assert out.token_counts.tolist() == n.tolist()
        loss, acc = alignment_loss(model, out, target, 0.05)
        assert torch.isfinite(loss) and loss.dim() == 0
        assert not acc.requires_grad and 0 <= float(acc) <= 1
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = float(loss.detach()) if first is None else first
    assert float(loss.detach()) < first
    acc = nearest_token_accuracy(model, out, target)
    assert isinstance(acc, float) and 0 <= acc <= 1
    assert acc == pytest.approx(float(alignment_loss(model, out, target)[1]))
    # a perfect adapter (outputs = the true embeddings) scores 100 %, and
    # its loss is the cosine cross-entropy alone (1 - cos and MSE vanish)
    true = model.embed_tokens(target).detach() * out.token_mask[..., None]
    perfect = AdapterOutput(true, out.token_mask)
    assert nearest_token_accuracy(model, perfect, target) == 1.0
    loss, acc = alignment_loss(model, perfect, target, 0.05)
    assert float(acc) == 1.0
    table = torch.nn.functional.normalize(model.embed_tokens.weight, dim=-1)
    pred = true[out.token_mask]
    cos = torch.nn.functional.normalize(pred, dim=-1) @ table.T
    ce = torch.nn.functional.cross_entropy(cos / 0.05, target[out.token_mask])
    assert float(loss) == pytest.approx(float(ce), abs=1e-4)
    # shifted targets: not 100 % any more
    wrong = torch.roll(target, 1, dims=1)
    assert nearest_token_accuracy(model, perfect, wrong) < 1.0


def test_qwen2_tiny():
    torch.manual_seed(0)
    model = tiny_speech_llm(llm_type="qwen2")
    randomise_plora(model)
    wavs, lens = batch_of_wavs()
    out = model(
        TRANSCRIPTS,
        CONTINUATIONS,
        instructions="Say:",
        wavs=wavs,
        wav_lens=lens,
        request=ALL,
    )
    assert torch.isfinite(out.student.logits["response"]).all()
    assert torch.isfinite(out.teacher.logits["input"]).all()
    assert type(model.llm).__name__ == "Qwen2ForCausalLM"
    batched = model.generate(wavs, lens, max_new_tokens=4, return_ids=True)
    single = model.generate(wavs[1:2, :8000], max_new_tokens=4, return_ids=1)
    assert single[0] == batched[1]


@pytest.mark.parametrize("llm_type", ["llama", "qwen2"])
def test_prefix_reuse_equals_the_full_forward(llm_type):
    """Reusing the shared prefix's keys/values gives the same logits, hidden
    states and gradients as running the whole sequence, for teacher and
    student."""
    torch.manual_seed(0)
    model = tiny_speech_llm(llm_type=llm_type, whisper=False)
    randomise_plora(model)
    model.train()
    for layer in model.llm.modules():
        if hasattr(layer, "dropout") and isinstance(
            layer.dropout, torch.nn.Dropout
        ):
            layer.dropout.p = 0.0
    model.adapter.eval()
    feats = torch.randn(2, 24, 64)
    hidden = ((1, "input"), (1, "response"), (-1, "response"))
    request = PassRequest(
        teacher=True,
        student=True,
        logits=("input", "response"),
        hidden=hidden,
    )
    kw = dict(
        feats=feats,
        feat_lens=torch.tensor([1.0, 0.75]),
        transcripts=["the cat sat", "a dog"],
        continuations=["on the mat.", "ran far away"],
        instructions="Continue:",
        request=request,
    )
    results = []
    for reuse in (False, True):
        model.prefix_reuse = reuse
        model.zero_grad()
        out = model(**kw)
        loss = (
            out.student.logits["input"].logsumexp(-1).sum()
            + out.student.logits["response"].logsumexp(-1).sum()
            + out.student.hidden[(1, "input")].square().sum()
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
    for name in ("teacher", "student"):
        a, b = getattr(full, name), getattr(reused, name)
        for span in ("input", "response"):
            assert torch.allclose(a.logits[span], b.logits[span], atol=1e-4), (
                name,
                span,
            )
        for key in hidden:
            assert torch.allclose(a.hidden[key], b.hidden[key], atol=1e-4), (
                name,
                key,
            )
    assert len(g_full) == len(g_reused) > 0
    assert any(g.abs().sum() > 0 for g in g_full)
    for a, b in zip(g_full, g_reused):
        # relative to the tensor's scale: float noise measured <= 2e-6
        scale = float(a.abs().max())
        assert float((a - b).abs().max()) <= 1e-4 * scale + 1e-6


@pytest.mark.parametrize("checkpointing", [False, True])
def test_student_pass_stops_after_the_deepest_requested_layer(checkpointing):
    """A pass without logits or final state runs only the layers it reads:
    its states and their gradients equal those of the full pass, and the
    layers above the deepest requested one are never called."""
    torch.manual_seed(0)
    tok = build_test_tokenizer()
    config = LlamaConfig(
        **tiny_llm_config(tok, initializer_range=0.3, num_hidden_layers=4)
    )
    model = SpeechLLMModel(
        LlamaForCausalLM(config),
        CFormer(64, 64, n_pre=1, n_post=1, nhead=4, d_ffn=128, dropout=0.0),
        encoder=WhisperEncoder(tiny_whisper_config()),
        tokenizer=tok,
        instruction=INSTRUCTION,
        plora=dict(r=4, alpha=8, dropout=0.0, scope="audio"),
        gradient_checkpointing=checkpointing,
    ).train()
    wavs, lens = batch_of_wavs()
    calls = []
    blocks = model.llm.base_model.layers
    for i, block in enumerate(blocks):
        block.register_forward_hook(lambda *a, i=i: calls.append(i))
    hidden = ((0, "input"), (1, "input"), (2, "input"))
    results = {}
    for final in (False, True):
        request = PassRequest(
            student=True,
            response=False,
            hidden=hidden + (((-1, "input"),) if final else ()),
        )
        calls.clear()
        model.zero_grad()
        torch.manual_seed(1)
        out = model(TRANSCRIPTS, wavs=wavs, wav_lens=lens, request=request)
        loss = sum(out.student.hidden[k].pow(2).sum() for k in hidden)
        ran = sorted(set(calls))
        loss.backward()
        grads = {
            n: p.grad.clone()
            for n, p in model.named_parameters()
            if p.grad is not None
        }
        results[final] = (out.student.hidden, ran, grads)
    (short, ran_short, g_short), (full, ran_full, g_full) = (
        results[False],
        results[True],
    )
    assert ran_full == [0, 1, 2, 3]
    assert ran_short == [0, 1]  # state 2 is the output of layer 1
    for key in hidden:
        assert torch.allclose(short[key], full[key], atol=1e-5), key
    assert set(g_short) == set(g_full) and g_short
    for name, grad in g_short.items():
        assert torch.allclose(grad, g_full[name], atol=1e-5), name
    # the hooks are gone: the next full pass runs every layer once more
    calls.clear()
    model(TRANSCRIPTS, CONTINUATIONS, wavs=wavs, wav_lens=lens, request=ALL)
    assert sorted(set(calls)) == [0, 1, 2, 3]
