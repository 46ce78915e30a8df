"""The per-language comparison of recipe runs (SynthSpeech compare.py)."""

import json

from speechbrain_blspkd.metrics import summarize_parity
from speechbrain_blspkd.testing import load_script


def _module():
    return load_script("SynthSpeech/speech_llm/compare.py")


SENTENCES = {
    "en": ["the cat sat on the mat", "a dog ran in the park"],
    "de": ["die katze schläft", "der hund läuft im park"],
}


def _run(folder, hyp_for, adapter=None):
    rows = []
    for language, sentences in SENTENCES.items():
        for i, sentence in enumerate(sentences):
            utt = f"{language}{i}"
            for task in ("repeat", "continue"):
                teacher = sentence if task == "repeat" else sentence + " then"
                row = dict(
                    id=f"{utt}/{task}",
                    utt=utt,
                    task=task,
                    language=language,
                    hyp=hyp_for(language, teacher),
                    teacher=teacher,
                    transcript=sentence,
                    num_pred=1,
                    num_target=1,
                )
                if task == "repeat":
                    row["ref"] = sentence
                rows.append(row)
    summary = summarize_parity(rows)
    if adapter:
        summary["adapter"] = adapter
    out = folder / "eval" / "trained"
    out.mkdir(parents=True)
    (out / "summary.json").write_text(json.dumps(summary))
    (out / "rows.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    )
    return folder


def test_report_has_a_line_per_system_and_the_gate_confusion(tmp_path, capsys):
    compare = _module()
    # "perfect" hears everything; "english" only hears English
    perfect = _run(
        tmp_path / "a",
        lambda lang, t: t,
        adapter={
            "lid_confusion/en/en": 0.5,
            "lid_confusion/en/de": 0.0,
            "lid_confusion/de/en": 0.25,
            "lid_confusion/de/de": 0.25,
        },
    )
    english = _run(tmp_path / "b", lambda lang, t: t if lang == "en" else "x")
    out = tmp_path / "table.md"
    assert (
        compare.main(
            [f"perfect={perfect}", f"english={english}", "--out", str(out)]
        )
        == 0
    )
    report = out.read_text()
    assert report == capsys.readouterr().out
    lines = report.splitlines()
    repeat = lines[lines.index("| system | en | de | all | LID acc. |") :]
    perfect_line = next(x for x in repeat if x.startswith("| perfect |"))
    english_line = next(x for x in repeat if x.startswith("| english |"))
    assert perfect_line.split(" | ")[1].startswith("100.0 (")
    assert perfect_line.endswith("| 75.0 % |")
    assert english_line.split(" | ")[1].startswith("100.0 (")
    assert not english_line.split(" | ")[2].startswith("100.0")
    assert english_line.endswith("| - |")
    # the teacher repeats every transcript exactly; its continuations
    # never equal the transcript
    assert (
        "| text teacher (chrF vs transcript) | 100.0 | 100.0 | 100.0 | - |"
        in report
    )
    assert (
        "| text teacher (answers = transcript) | 0 % | 0 % | 0 % | - |"
        in report
    )
    assert "| de | 50 | 50 |" in report  # the gate's confusion, % of row


def test_an_unfinished_run_is_named(tmp_path, capsys):
    compare = _module()
    (tmp_path / "run").mkdir()
    assert compare.main([f"x={tmp_path / 'run'}"]) == 1
    assert "summary.json: missing" in capsys.readouterr().err
