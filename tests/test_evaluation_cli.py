"""Tasks whose instruction is each row's own (spoken questions over a
passage), and ``python -m speechbrain_blspkd.evaluation`` on an exported
model."""

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from speechbrain_blspkd.evaluation import evaluate_parity, main  # noqa: E402
from speechbrain_blspkd.inference.export import export_model  # noqa: E402
from speechbrain_blspkd.testing import (  # noqa: E402
    tiny_saved_speech_llm,
    tiny_speech_llm,
    write_speech_manifest,
)

QUESTIONS = [
    ("who sat on the mat", "Passage: the cat sat on the mat.", "the cat"),
    ("what did the dog do", "Passage: a dog ran to the park.", "ran"),
    ("where is the fox", "Passage: the fox is in the den.", "in the den"),
]


def _manifest(folder, instructions=None):
    instructions = instructions or {}
    return write_speech_manifest(
        folder,
        [question for question, _, _ in QUESTIONS],
        name="qa.csv",
        instruction=[
            instructions.get(k, passage)
            for k, (_, passage, _) in enumerate(QUESTIONS)
        ],
        answer=[answer for _, _, answer in QUESTIONS],
    )


@pytest.fixture
def model():
    torch.manual_seed(0)
    model = tiny_speech_llm()
    model.eval()
    asked = []
    generate_text = model.generate_text

    def each(instructions, n):  # one string or one per item
        if isinstance(instructions, str):
            return [instructions] * n
        return list(instructions)

    def counting(transcripts, *args, **kwargs):
        asked.extend(
            zip(transcripts, each(kwargs["instructions"], len(transcripts)))
        )
        return generate_text(transcripts, *args, **kwargs)

    model.generate_text = counting
    model.asked = asked
    spoken = []  # instructions of the speech answers
    generate = model.generate

    def recording(*args, **kwargs):
        spoken.extend(each(kwargs["instructions"], len(kwargs["names"])))
        return generate(*args, **kwargs)

    model.generate = recording
    model.spoken = spoken
    return model


def _rows(out):
    return {
        json.loads(line)["utt"]: json.loads(line)
        for line in (out / "rows.jsonl").open()
    }


def test_row_instructions_reach_both_answers_and_key_the_cache(tmp_path, model):
    manifest = _manifest(tmp_path)
    run = tmp_path / "run" / "eval"
    kw = dict(batch_size=3, max_new_tokens=5)
    evaluate_parity(
        model, manifest, str(tmp_path), {"qa": None}, run / "a", **kw
    )
    rows = _rows(run / "a")
    # the teacher was asked each question with its own passage
    assert sorted(model.asked) == sorted((q, p) for q, p, _ in QUESTIONS)
    assert sorted(model.spoken) == sorted(p for _, p, _ in QUESTIONS)
    for k, (question, passage, answer) in enumerate(QUESTIONS):
        row = rows[f"u{k}"]
        assert row["instruction"] == passage
        assert row["answers"] == [answer]
        alone = model.generate_text(
            [question], instructions=passage, max_new_tokens=5
        )[0]
        assert row["teacher"] == alone
    # one row's passage changed: the cache key includes it
    model.asked.clear()
    manifest = _manifest(tmp_path, {1: "Passage: a dog slept all day."})
    evaluate_parity(
        model, manifest, str(tmp_path), {"qa": None}, run / "b", **kw
    )
    # only the changed row is answered again by the teacher
    assert model.asked == [
        ("what did the dog do", "Passage: a dog slept all day.")
    ]
    again = _rows(run / "b")
    assert again["u0"]["teacher"] == rows["u0"]["teacher"]
    assert again["u1"]["instruction"] == "Passage: a dog slept all day."


def test_fixed_instruction_tasks_ignore_the_row_instruction(tmp_path, model):
    manifest = _manifest(tmp_path)
    out = tmp_path / "eval" / "x"
    evaluate_parity(
        model,
        manifest,
        str(tmp_path),
        {"repeat": "Repeat:"},
        out,
        batch_size=3,
        max_new_tokens=4,
    )
    assert {p for _, p in model.asked} == {"Repeat:"}
    assert all("instruction" not in r for r in _rows(out).values())


def test_row_without_instruction_is_named(tmp_path, model):
    manifest = _manifest(tmp_path, {2: ""})
    with pytest.raises(ValueError, match=r"qa\.csv: row u2 has no instruction"):
        evaluate_parity(
            model,
            manifest,
            str(tmp_path),
            {"qa": None},
            tmp_path / "eval" / "x",
            max_new_tokens=4,
        )


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evalcli")
    model = tiny_saved_speech_llm(tmp / "bases", seed=0)
    return export_model(model, tmp / "model", {"max_new_tokens": 4})


def test_command_line_scores_an_exported_model(tmp_path, exported, capsys):
    manifest = _manifest(tmp_path)
    out = tmp_path / "out"
    status = main(
        [
            str(exported),
            str(manifest),
            str(out),
            "--task",
            "qa",
            "--task",
            "repeat=Repeat the text:",
            "--max-new-tokens",
            "4",
            "--device",
            "cpu",
        ]
    )
    assert status == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["tasks"]) == {"qa", "repeat"}
    assert summary["tasks"]["qa"]["n"] == len(QUESTIONS)
    assert "qa_accuracy" in summary["by_language"]["qa"]
    rows = [json.loads(line) for line in (out / "rows.jsonl").open()]
    assert {r["instruction"] for r in rows if r["task"] == "qa"} == {
        p for _, p, _ in QUESTIONS
    }
    table = capsys.readouterr().out
    assert "| qa | all | 3 |" in table and "| repeat | all | 3 |" in table


def test_command_line_names_bad_input(tmp_path, exported, capsys):
    status = main([str(exported), str(tmp_path / "none.csv"), str(tmp_path)])
    assert status == 2
    assert "none.csv" in capsys.readouterr().err
    manifest = _manifest(tmp_path, {0: ""})
    status = main(
        [str(exported), str(manifest), str(tmp_path / "o"), "--task", "qa"]
    )
    assert status == 2
    assert "row u0 has no instruction" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(exported)])
