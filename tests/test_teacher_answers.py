"""Cached teacher answers of the parity evaluation are keyed by everything
that changes them: a changed setting answers again, never reuses."""

import hashlib
import json

import pytest
import torch

from speechbrain_blspkd.dataio.manifest import write_manifest
from speechbrain_blspkd.evaluation import evaluate_parity
from speechbrain_blspkd.teacher_answers import fingerprint
from speechbrain_blspkd.testing import (
    tiny_speech_llm,
    write_speech_manifest,
)

TRANSCRIPTS = ["the cat sat on the mat", "hello world", "a quick brown fox"]


@pytest.fixture
def setup(tmp_path):
    write_speech_manifest(tmp_path, TRANSCRIPTS)
    torch.manual_seed(0)
    model = tiny_speech_llm()
    model.eval()
    asked = []  # transcripts the text teacher answered
    generate_text = model.generate_text

    def counting(transcripts, *args, **kwargs):
        asked.extend(transcripts)
        return generate_text(transcripts, *args, **kwargs)

    model.generate_text = counting
    return tmp_path, model, asked


def _evaluate(folder, model, out, tasks, max_new_tokens):
    evaluate_parity(
        model,
        folder / "test.csv",
        str(folder),
        tasks,
        out,
        batch_size=3,
        max_new_tokens=max_new_tokens,
    )
    rows = [json.loads(line) for line in (out / "rows.jsonl").open()]
    return {(r["task"], r["utt"]): r["teacher"] for r in rows}


def test_changed_instruction_limit_or_llm_answers_again(setup):
    folder, model, asked = setup
    run = folder / "run" / "eval"

    def cached(tag, tasks, limit):
        asked.clear()
        answers = _evaluate(folder, model, run / tag, tasks, limit)
        return answers, len(asked)

    first, n = cached("a", {"repeat": "Repeat:"}, 6)
    assert n == len(TRANSCRIPTS)
    # the same settings: every answer comes from the cache
    again, n = cached("b", {"repeat": "Repeat:"}, 6)
    assert again == first and n == 0
    # a shorter answer limit: answered again, as in a folder of its own
    short, n = cached("c", {"repeat": "Repeat:"}, 2)
    alone = _evaluate(
        folder, model, folder / "alone" / "eval" / "c", {"repeat": "Repeat:"}, 2
    )
    assert n == len(TRANSCRIPTS)
    assert short == alone and short != first
    # another instruction under the same task name
    _, n = cached("d", {"repeat": "Say it:"}, 6)
    assert n == len(TRANSCRIPTS)
    # another LLM (its base weights; PLoRA is not the teacher's)
    with torch.no_grad():
        model.embed_tokens.weight.mul_(1.5)
    _, n = cached("e", {"repeat": "Repeat:"}, 6)
    assert n == len(TRANSCRIPTS)
    # a changed transcript is answered again, the others reused
    from speechbrain_blspkd.dataio.manifest import read_manifest

    rows = read_manifest(folder / "test.csv")
    rows[0]["transcript"] = "the dog sat on the mat"
    write_manifest(folder / "test.csv", rows)
    _, n = cached("f", {"repeat": "Repeat:"}, 6)
    assert asked == ["the dog sat on the mat"]


def _fingerprint_as_written_before(*parts):
    """``fingerprint`` as it was before it took its tensor bytes from
    ``utils.cache_label.tensor_bytes``: stored answers are keyed by it."""
    digest = hashlib.sha1()
    for part in parts:
        if not isinstance(part, torch.nn.Module):
            digest.update(
                json.dumps(part, sort_keys=True, default=str).encode()
            )
            continue
        for name, tensor in sorted(part.state_dict().items()):
            if "lora_" in name:
                continue
            digest.update(name.replace(".base.", ".").encode())
            digest.update(str(tensor.dtype).encode())
            data = tensor.detach().cpu().contiguous()
            digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _odd_module():
    """Weights of fixed values in every layout a state dict can hold."""
    module = torch.nn.Linear(3, 2)
    with torch.no_grad():
        module.weight.copy_(torch.arange(6.0).reshape(2, 3) / 7)
        module.bias.copy_(torch.tensor([0.5, -1.25]))
    module.register_buffer("empty", torch.zeros(0))
    module.register_buffer("bf16", torch.linspace(-1, 1, 3).bfloat16())
    module.register_buffer("count", torch.tensor(3))
    module.register_buffer("transposed", torch.arange(12).reshape(4, 3).t())
    return module


def test_fingerprint_of_stored_answers_is_unchanged():
    module = _odd_module()
    parts = ("instruction", {"max_new_tokens": 8}, module)
    assert fingerprint(*parts) == _fingerprint_as_written_before(*parts)
    assert fingerprint(*parts) == "72a78cc360af5e8ad6fb3ee302ce3a4b7b869a11"
    torch.manual_seed(0)
    llm = tiny_speech_llm(whisper=False).llm  # PLoRA: lora_ and .base.
    assert fingerprint(llm) == _fingerprint_as_written_before(llm)
