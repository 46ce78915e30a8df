"""``blspkd-infer`` as a batch tool: lists, manifests, JSON lines, resume."""

import json
import os

import numpy as np
import pytest
import soundfile as sf

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from speechbrain_blspkd.dataio.manifest import write_manifest  # noqa: E402
from speechbrain_blspkd.inference import cli  # noqa: E402
from speechbrain_blspkd.inference.export import export_model  # noqa: E402
from speechbrain_blspkd.testing import (  # noqa: E402
    tiny_saved_speech_llm,
)

GEN = ["--max-new-tokens", "5", "--device", "cpu"]
# lengths in seconds: deliberately unsorted, several batches of mixed sizes
LENGTHS = [0.45, 0.9, 0.2, 0.7, 0.33, 0.6, 0.25]


def _wav(path, seconds, seed, sr=16000):
    rng = np.random.default_rng(seed)
    data = (0.1 * rng.standard_normal(int(seconds * sr))).astype("float32")
    sf.write(path, data, sr)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("batch")
    model = tiny_saved_speech_llm(tmp / "bases", seed=0, instruction="Repeat:")
    # fp32: batches and single clips must give the same tokens, which bf16
    # (dtype auto on a CPU with AMX) does not promise for a random tiny model
    folder = export_model(
        model,
        tmp / "model",
        {"max_new_tokens": 5, "llm_dtype": None, "encoder_dtype": None},
    )
    wavs = [
        _wav(tmp / f"clip{i}.wav", s, seed=i) for i, s in enumerate(LENGTHS)
    ]
    from speechbrain_blspkd.inference import SpeechLLM

    llm = SpeechLLM.from_hparams(source=folder, run_opts={"device": "cpu"})
    return {"folder": folder, "wavs": wavs, "tmp": tmp, "llm": llm}


def _records(path):
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == ""
    return [json.loads(line) for line in lines[:-1]]


def _one_by_one(llm, paths, instructions):
    return {
        str(p): llm.generate_file(p, instruction=ins, max_new_tokens=5)
        for p, ins in zip(paths, instructions)
    }


def test_manifest_batches_equal_one_by_one(setup, tmp_path, capsys):
    """Length-sorted batches of 3 with per-row instructions give exactly the
    one-by-one answers; the JSON lines carry id, file, instruction, answer,
    seconds."""
    wavs, llm = setup["wavs"], setup["llm"]
    instructions = ["Repeat:", "Say it again.", "", "Continue:"] * 2
    rows = []
    for i, path in enumerate(wavs):
        rows.append(
            dict(
                ID=f"utt{i}",
                wav=f"$data_root/{path.name}",
                duration=LENGTHS[i],
                transcript="x",
                language="en",
                speaker="s",
                instruction=instructions[i],
            )
        )
    manifest = setup["tmp"] / "test.csv"
    write_manifest(manifest, rows)
    out = tmp_path / "answers.jsonl"
    code = cli.main(
        ["--model", str(setup["folder"]), "--manifest", str(manifest)]
        + ["--out", str(out), "--batch-size", "3"]
        + GEN
    )
    assert code == 0
    records = _records(out)
    assert sorted(r["id"] for r in records) == [f"utt{i}" for i in range(7)]
    # decoded longest first
    assert [r["seconds"] for r in records] == sorted(LENGTHS, reverse=True)
    want_ins = [ins or llm.default_instruction() for ins in instructions]
    want = _one_by_one(llm, wavs, want_ins)
    for rec in records:
        i = int(rec["id"][3:])
        assert rec["file"] == str(wavs[i])
        assert rec["instruction"] == want_ins[i]
        assert rec["answer"] == want[str(wavs[i])], rec["id"]
        assert rec["seconds"] == pytest.approx(LENGTHS[i], abs=1e-3)
    err = capsys.readouterr().err
    assert "7 answered" in err and "0 failed" in err
    # --instruction overrides the rows' own
    code = cli.main(
        ["--model", str(setup["folder"]), "--manifest", str(manifest)]
        + ["--instruction", "Say:", "--format", "jsonl", "--no-progress"]
        + GEN
    )
    assert code == 0
    lines = capsys.readouterr().out.strip().split("\n")
    assert {json.loads(x)["instruction"] for x in lines} == {"Say:"}


def test_wav_list_to_stdout_and_resume(setup, tmp_path, capsys, monkeypatch):
    wavs = setup["wavs"]
    listing = tmp_path / "list.txt"
    listing.write_text(
        "# clips\n" + "\n".join(str(p) for p in wavs) + "\n\n",
        encoding="utf-8",
    )
    argv = ["--model", str(setup["folder"]), "--wav-list", str(listing)] + GEN
    assert cli.main(argv + ["--batch-size", "4"]) == 0
    captured = capsys.readouterr()
    full = [json.loads(x) for x in captured.out.strip().split("\n")]
    assert sorted(r["file"] for r in full) == sorted(str(p) for p in wavs)
    assert "%" in captured.err  # the progress bar
    want = _one_by_one(setup["llm"], wavs, ["Repeat:"] * len(wavs))
    assert {r["file"]: r["answer"] for r in full} == want

    # an interrupted --out: two complete lines and a cut one
    out = tmp_path / "answers.jsonl"
    first = [json.dumps(r, ensure_ascii=False) + "\n" for r in full[:3]]
    out.write_text(first[0] + first[1] + first[2][:17], encoding="utf-8")
    decoded = []
    real = cli._Run._decode

    def counting(self, items, instructions):
        decoded.extend(i.id for i in items)
        return real(self, items, instructions)

    monkeypatch.setattr(cli._Run, "_decode", counting)
    assert cli.main(argv + ["--out", str(out), "--batch-size", "2"]) == 0
    err = capsys.readouterr().err
    assert "resuming" in err and "2 of 7" in err
    assert sorted(decoded) == sorted(r["id"] for r in full[2:])
    records = _records(out)
    assert sorted(r["id"] for r in records) == sorted(r["id"] for r in full)
    assert {r["id"]: r["answer"] for r in records} == {
        r["id"]: r["answer"] for r in full
    }
    # a finished file: nothing left to decode, the model is not even loaded
    decoded.clear()
    assert cli.main(argv + ["--out", str(out)]) == 0
    assert decoded == [] and len(_records(out)) == 7
    # --overwrite starts afresh
    assert cli.main(argv + ["--out", str(out), "--overwrite"]) == 0
    assert len(decoded) == 7 and len(_records(out)) == 7


def test_bad_files_are_reported_and_counted(setup, tmp_path, capsys):
    good = setup["wavs"][:3]
    missing = tmp_path / "missing.wav"
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF not really a wav")
    long = _wav(tmp_path / "long.wav", 31, seed=9, sr=8000)
    inputs = [good[0], missing, good[1], corrupt, long, good[2]]
    out = tmp_path / "answers.jsonl"
    argv = ["--model", str(setup["folder"]), "--out", str(out), "--no-progress"]
    for path in inputs:
        argv += ["--wav", str(path)]
    assert cli.main(argv + GEN) == 1
    err = capsys.readouterr().err
    for bad in (missing, corrupt, long):
        assert f"error: {bad}" in err
    assert "3 answered" in err and "3 failed" in err
    records = _records(out)
    assert sorted(r["file"] for r in records) == sorted(str(p) for p in good)
    # resuming retries only the failed ones (still failing)
    assert cli.main(argv + GEN) == 1
    err = capsys.readouterr().err
    assert "3 of 6" in err and "3 failed" in err
    assert len(_records(out)) == 3


def test_failing_batch_is_retried_file_by_file(setup, tmp_path, capsys):
    """A batch whose decoding fails (e.g. one prompt too long for the LLM
    context) is decoded again one by one: only the file at fault fails."""
    from speechbrain_blspkd.inference.speech_llm import SpeechLLM
    from speechbrain_blspkd.prompt import ContextLengthError

    wavs = setup["wavs"][:4]
    real = SpeechLLM.generate_waveforms

    def picky(self, waves, instructions=None, names=None, **gen):
        if any(n.endswith("clip1.wav") for n in names or []):
            raise ContextLengthError("file clip1.wav: prompt too long")
        return real(self, waves, instructions, names, **gen)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SpeechLLM, "generate_waveforms", picky)
        argv = ["--model", str(setup["folder"]), "--format", "jsonl"]
        for path in wavs:
            argv += ["--wav", str(path)]
        assert cli.main(argv + ["--no-progress"] + GEN) == 1
    captured = capsys.readouterr()
    answered = [json.loads(x)["file"] for x in captured.out.strip().split("\n")]
    assert sorted(answered) == sorted(str(p) for p in wavs if p != wavs[1])
    assert "prompt too long" in captured.err and "1 failed" in captured.err


def test_plain_wav_and_text_keep_the_short_output(setup, capsys):
    a, b = setup["wavs"][:2]
    llm = setup["llm"]
    argv = ["--model", str(setup["folder"])] + GEN
    assert cli.main(argv + ["--wav", str(a)]) == 0
    captured = capsys.readouterr()
    assert captured.out == llm.generate_file(a, max_new_tokens=5) + "\n"
    assert cli.main(argv + ["--wav", str(a), "--text", "a dog ran"]) == 0
    lines = capsys.readouterr().out.split("\n")[:-1]
    assert lines == [
        f"{a}: {llm.generate_file(a, max_new_tokens=5)}",
        f"a dog ran: {llm.generate_text('a dog ran', max_new_tokens=5)}",
    ]
    # jsonl on request; a text input has no file and carries its text
    code = cli.main(argv + ["--text", "a dog ran", "--format", "jsonl"])
    assert code == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["file"] is None and rec["seconds"] is None
    assert rec["text"] == "a dog ran" and rec["id"] == "a dog ran"


def test_bad_invocations(setup, tmp_path, capsys):
    folder = str(setup["folder"])
    code = cli.main(["--model", folder, "--wav-list", str(tmp_path / "no")])
    assert code == 2
    assert "wav list not found" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("ID,wav\nx,y.wav\n", encoding="utf-8")
    assert cli.main(["--model", folder, "--manifest", str(bad)]) == 2
    assert "missing required column" in capsys.readouterr().err
    for argv in (
        ["--model", folder],
        ["--model", folder, "--wav", "a.wav", "--batch-size", "0"],
        ["--model", folder, "--wav", "a.wav", "--overwrite"],
    ):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2
    capsys.readouterr()
