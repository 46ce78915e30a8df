"""Cached teacher answers of the parity evaluation are keyed by everything
that changes them: a changed setting answers again, never reuses."""

import json

import pytest
import torch

from speechbrain_blspkd.dataio.manifest import write_manifest
from speechbrain_blspkd.evaluation import evaluate_parity
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
