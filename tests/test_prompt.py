"""Tests of the one prompt builder (speechbrain_blspkd.prompt)."""

import pytest
import torch

from speechbrain_blspkd.prompt import (
    IGNORE_INDEX,
    PromptBuilder,
    collate_prompts,
)
from speechbrain_blspkd.testing import build_test_tokenizer

GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim"
    " + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    return build_test_tokenizer()


def plain_ids(tok, messages, **kwargs):
    """Whole-string tokenisation of the rendered chat template."""
    text = tok.apply_chat_template(messages, tokenize=False, **kwargs)
    return tok(text, add_special_tokens=False)["input_ids"]


def messages(system, user, assistant=None):
    out = [] if system is None else [{"role": "system", "content": system}]
    out.append({"role": "user", "content": user})
    if assistant is not None:
        out.append({"role": "assistant", "content": assistant})
    return out


def strip_trailing_whitespace(tok, ids):
    while ids and tok.decode(ids[-1:]).strip() == "":
        ids = ids[:-1]
    return ids


@pytest.mark.parametrize("system", [None, "You answer briefly."])
def test_teacher_equals_plain_chat_template(tok, system):
    builder = PromptBuilder(tok, system_prompt=system)
    instr, text, cont = "Repeat the sentence:", "the cat sat", "The cat sat."
    p = builder.build(instr, transcript=text, continuation=cont)
    ref = plain_ids(tok, messages(system, f"{instr} {text}", cont))
    assert p.input_ids == strip_trailing_whitespace(tok, ref)
    assert len(ref) > len(p.input_ids)  # the "\n" after <|im_end|> dropped
    # transcript span = the transcript's own tokens, N of them
    start, n = p.transcript_span
    assert p.input_ids[start : start + n] == builder.transcript_ids(text)
    assert tok.decode(p.input_ids[start : start + n]) == " " + text
    # the default system prompt of the template is kept when none is given
    rendered = tok.decode(p.input_ids)
    assert ("helpful assistant" in rendered) == (system is None)
    # response = continuation + end of turn
    r0, rn = p.response_span
    assert tok.decode(p.input_ids[r0 : r0 + rn]) == cont + "<|im_end|>"
    assert p.labels[:r0] == [IGNORE_INDEX] * r0
    assert p.labels[r0:] == p.input_ids[r0:]


def test_generation_prompt_equals_template_and_training_prefix(tok):
    builder = PromptBuilder(tok)
    p = builder.build("Say:", transcript="hello world", continuation="hi")
    g = builder.build("Say:", transcript="hello world")
    ref = plain_ids(
        tok, messages(None, "Say: hello world"), add_generation_prompt=True
    )
    assert g.input_ids == ref
    assert g.input_ids == p.input_ids[: p.prompt_length]
    assert g.response_span == (len(g.input_ids), 0)
    assert tok.decode(g.input_ids).endswith("<|im_start|>assistant\n")


def test_student_aligns_with_teacher_outside_the_span(tok):
    builder = PromptBuilder(tok, system_prompt="sys")
    text = "a quick brown fox"
    n = len(builder.transcript_ids(text))
    t = builder.build("Repeat:", transcript=text, continuation="ok then")
    s = builder.build("Repeat:", n_speech=n, continuation="ok then")
    assert s.speech_span == t.transcript_span and s.transcript_span is None
    assert len(s.input_ids) == len(t.input_ids)
    start = s.speech_span[0]
    assert s.input_ids[:start] == t.input_ids[:start]
    assert s.input_ids[start + n :] == t.input_ids[start + n :]
    assert s.input_ids[start : start + n] == [builder.placeholder_id] * n
    assert s.response_span == t.response_span
    # an audio-specific instruction shifts the span but keeps the rest
    a = builder.build("Listen and repeat:", n_speech=n, continuation="ok then")
    shift = a.speech_span[0] - start
    assert shift > 0 and a.response_span[0] == t.response_span[0] + shift
    assert a.input_ids[a.speech_span[0] + n :] == t.input_ids[start + n :]


def test_no_eot_for_truncated_continuation(tok):
    builder = PromptBuilder(tok)
    p = builder.build("Go:", transcript="x", continuation="the dog")
    q = builder.build("Go:", transcript="x", continuation="the dog", add_eot=0)
    assert q.input_ids == p.input_ids[:-1]
    assert p.input_ids[-1] == builder.eot_ids[0]
    assert tok.convert_ids_to_tokens(builder.eot_ids[0]) == "<|im_end|>"
    assert tok.eos_token_id in builder.eot_ids


def test_transcript_placeholder_inside_instruction(tok):
    builder = PromptBuilder(tok)
    instr = "Translate: {transcript}\nAnswer in Spanish."
    p = builder.build(instr, transcript="the cat", continuation="el gato")
    ref = plain_ids(
        tok,
        messages(None, "Translate: the cat\nAnswer in Spanish.", "el gato"),
    )
    assert p.input_ids == strip_trailing_whitespace(tok, ref)
    start, n = p.transcript_span
    assert tok.decode(p.input_ids[start : start + n]) == " the cat"


def test_system_folded_for_templates_without_system_role():
    tok = build_test_tokenizer(
        chat_template=GEMMA_TEMPLATE,
        extra_special_tokens=["<bos>", "<start_of_turn>", "<end_of_turn>"],
    )
    tok.bos_token = "<bos>"
    builder = PromptBuilder(tok, system_prompt="Be brief.")
    p = builder.build("Repeat:", transcript="hello", continuation="hello")
    ref = plain_ids(tok, messages(None, "Be brief.\n\nRepeat: hello", "hello"))
    assert p.input_ids == strip_trailing_whitespace(tok, ref)
    assert p.input_ids[0] == tok.convert_tokens_to_ids("<bos>")
    assert tok.decode(builder.eot_ids[:1]) == "<end_of_turn>"


def test_build_errors(tok):
    builder = PromptBuilder(tok)
    with pytest.raises(ValueError, match="exactly one"):
        builder.build("x", transcript="a", n_speech=2)
    with pytest.raises(ValueError, match="exactly one"):
        builder.build("x")
    no_template = build_test_tokenizer(chat_template=None)
    with pytest.raises(ValueError, match="chat_template"):
        PromptBuilder(no_template)


@pytest.mark.parametrize("side", ["left", "right"])
def test_collate(tok, side):
    builder = PromptBuilder(tok)
    prompts = builder.build_batch(
        ["Say:", "Repeat the sentence:"],
        n_speech=[2, 5],
        continuations=["ok", "the cat sat on the mat"],
        add_eot=[True, False],
    )
    b = collate_prompts(prompts, pad_id=tok.pad_token_id, padding_side=side)
    lengths = [len(p.input_ids) for p in prompts]
    width = max(lengths)
    assert b["input_ids"].shape == (2, width)
    assert b["attention_mask"].sum(1).tolist() == lengths
    assert b["speech_mask"].sum(1).tolist() == [2, 5]
    assert torch.equal(b["speech_mask"], b["span_mask"])
    for i, p in enumerate(prompts):
        off = width - lengths[i] if side == "left" else 0
        row = b["input_ids"][i]
        assert row[off : off + lengths[i]].tolist() == p.input_ids
        s0 = int(b["span_start"][i])
        assert s0 == off + p.speech_span[0]
        assert b["speech_mask"][i, s0 : s0 + p.speech_span[1]].all()
        r0, rn = int(b["response_start"][i]), int(b["response_length"][i])
        assert (r0, rn) == (off + p.response_span[0], p.response_span[1])
        assert row[r0 : r0 + rn].tolist() == p.input_ids[p.prompt_length :]
        labels = b["labels"][i]
        assert (
            labels[b["response_mask"][i]].tolist() == row[r0 : r0 + rn].tolist()
        )
        assert (labels[~b["response_mask"][i]] == IGNORE_INDEX).all()
    text_batch = builder.collate(
        builder.build_batch("Say:", transcripts=["a", "b c"])
    )
    assert not text_batch["speech_mask"].any()
    assert text_batch["span_mask"].any()


@pytest.mark.slow
def test_smollm2_tokenizer_matches_chat_template(real_asset):
    from transformers import AutoTokenizer

    SMOLLM2 = real_asset("smollm2-135m-instruct")

    tok = AutoTokenizer.from_pretrained(str(SMOLLM2))
    cases = [
        (
            "Repeat the following sentence:",
            "he was not an ill disposed man",
            "He was not an ill-disposed man.",
        ),
        (
            "Continue the following text in a coherent style:",
            "It's 3:15, and 42 cats sat.",
            "They purred loudly",
        ),
    ]
    for system in (None, "You are a careful assistant."):
        builder = PromptBuilder(tok, system_prompt=system)
        for instr, text, cont in cases:
            p = builder.build(instr, transcript=text, continuation=cont)
            ref = plain_ids(tok, messages(system, f"{instr} {text}", cont))
            assert p.input_ids == strip_trailing_whitespace(tok, ref)
            g = builder.build(instr, transcript=text)
            ref_g = plain_ids(
                tok,
                messages(system, f"{instr} {text}"),
                add_generation_prompt=True,
            )
            assert g.input_ids == ref_g
            start, n = p.transcript_span
            assert tok.decode(p.input_ids[start : start + n]) == " " + text
        if system is None:
            assert "SmolLM" in tok.decode(p.input_ids)  # injected default


def test_a_turn_closed_by_a_blank_line_keeps_it_as_the_end_marker():
    # a base LLM's plain-text turns (assets.gguf.COMPLETION_TEMPLATE): the
    # blank line that ends a turn is the end-of-turn token, and a
    # continuation is closed with it
    from speechbrain_blspkd.assets.gguf import COMPLETION_TEMPLATE
    from speechbrain_blspkd.prompt import PromptBuilder
    from speechbrain_blspkd.testing import build_test_tokenizer

    tok = build_test_tokenizer()
    tok.chat_template = COMPLETION_TEMPLATE
    builder = PromptBuilder(tok)
    blank = tok("\n\n", add_special_tokens=False).input_ids
    assert blank and builder.eot_ids[0] == blank[0]
    full = builder.build("Repeat:", transcript="a b", continuation="b a")
    assert full.input_ids[-len(blank) :] == blank
    text = tok.decode(full.input_ids)
    assert not text.startswith("None")  # a tokenizer without a bos token
    assert "### Instruction:\nRepeat: a b" in text
    assert "### Response:\nb a" in text
