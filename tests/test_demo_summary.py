"""How the demo's results table is assembled from a recipe's summaries."""

import json

from speechbrain_blspkd.demo import build_summary, format_table


def _summary(speech_chrf, speech_shuffled, teacher_shuffled, adapter):
    tasks = {}
    for task in ("repeat", "continue"):
        tasks[task] = {
            "n": 4,
            "speech": {
                "chrf": speech_chrf,
                "wer": 80.0,
                "shuffled_chrf": speech_shuffled,
                "shuffled_wer": 99.0,
            },
            "teacher": {
                "chrf": 100.0,
                "wer": 0.0,
                "shuffled_chrf": teacher_shuffled,
                "shuffled_wer": 98.0,
            },
        }
    return {
        "tasks": tasks,
        "count": {"exact_rate": 0.25, "mean_abs_error": 1.5},
        "adapter": adapter,
    }


def test_each_row_shows_its_own_numbers(tmp_path):
    for tag, summary in (
        ("untrained", _summary(16.0, 14.8, 12.9, {"token_acc": 0.0})),
        (
            "trained",
            _summary(21.0, 11.8, 12.9, {"token_acc": 0.33, "input_kl": 0.8}),
        ),
    ):
        folder = tmp_path / "eval" / tag
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps(summary))
    rows = build_summary(tmp_path)["rows"]
    # the teacher's shuffled baseline is the teacher's, not a model's
    assert rows["teacher"]["repeat_shuffled_chrf"] == 12.9
    assert rows["trained"]["repeat_shuffled_chrf"] == 11.8
    assert rows["untrained"]["repeat_shuffled_chrf"] == 14.8
    assert rows["trained"]["repeat_chrf"] == 21.0
    assert rows["teacher"]["repeat_chrf"] == 100.0
    assert rows["trained"]["token_accuracy"] == 0.33
    assert rows["trained"]["input_kl"] == 0.8
    table = format_table(build_summary(tmp_path))
    teacher_line = next(
        x for x in table.splitlines() if x.startswith("teacher")
    )
    assert "12.90" in teacher_line and "11.80" not in teacher_line
