"""Tests of teacher continuation generation (tiny random Llama)."""

import os
import subprocess
import sys

import pytest

from speechbrain_blspkd.dataio.manifest import read_manifest, write_manifest
from speechbrain_blspkd.dataprep import continuations as cont

WORDS = (
    "the cat sat on a mat dog ran far away in house big small red blue sun "
    "moon rain snow tree bird fish sea sky green old new"
).split()
SENTENCES = [
    "the cat sat on a mat",
    "dog ran far away",
    "big red sun",
    "the old tree in the rain",
    "a bird",
    "blue sea and green sky",
    "small fish in a big sea",
    "new moon",
    "snow on the old house",
    "the dog and the cat ran away in the rain",
]
TEMPLATE = "continue : {transcript}"
OPTS = dict(max_new_tokens=6, prompt_template=TEMPLATE, dtype="float32")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("cont")
    model_dir = cont._toy_model(d / "lm", WORDS + ["continue", ":", "and"])
    rows = [
        dict(
            ID=f"utt{k:02d}",
            wav=f"$data_root/{k}.wav",
            duration=1.0 + k,
            transcript=s,
            language="en",
            speaker="v1",
        )
        for k, s in enumerate(SENTENCES)
    ]
    write_manifest(d / "in.csv", rows)
    return d, model_dir


def _pick_eos_word(setup):
    """Make the toy model stop early on some rows: declare as an extra
    end-of-turn token the word it generates first for the first sentence."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, model_dir = setup
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = torch.tensor([cont.continuation_prompt(tok, SENTENCES[0], TEMPLATE)])
    with torch.no_grad():
        first = int(model(ids).logits[0, -1].argmax())
    model.generation_config.eos_token_id = [tok.eos_token_id, first]
    model.save_pretrained(d / "lm_eos")
    tok.save_pretrained(d / "lm_eos")
    return d / "lm_eos", first


def test_prompt_uses_chat_template(setup):
    from transformers import AutoTokenizer

    _, model_dir = setup
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = cont.continuation_prompt(tok, "a bird", TEMPLATE)
    text = tok.decode(ids)
    assert text.startswith("<|im_start|> user continue : a bird <|im_end|>")
    assert text.endswith("<|im_start|> assistant")
    with pytest.raises(ValueError, match="transcript"):
        cont.continuation_prompt(tok, "a bird", "no field")


def test_batched_equals_one_by_one_and_truncation(setup, tmp_path):
    d, _ = setup
    model_dir, eos_word = _pick_eos_word(setup)
    cont.generate_continuations(
        d / "in.csv", tmp_path / "b.csv", model_dir, batch_size=4, **OPTS
    )
    cont.generate_continuations(
        d / "in.csv", tmp_path / "s.csv", model_dir, batch_size=1, **OPTS
    )
    batched = read_manifest(tmp_path / "b.csv")
    single = read_manifest(tmp_path / "s.csv")
    assert [r["ID"] for r in batched] == [f"utt{k:02d}" for k in range(10)]
    assert [(r["continuation"], r["truncated"]) for r in batched] == [
        (r["continuation"], r["truncated"]) for r in single
    ]
    # the first row stops at once on the declared end-of-turn word
    assert batched[0]["truncated"] == "0" and batched[0]["continuation"] == ""
    flags = {r["truncated"] for r in batched}
    assert flags <= {"0", "1"}
    for r in batched:
        n_words = len(r["continuation"].split())
        if r["truncated"] == "1":
            assert n_words == OPTS["max_new_tokens"]
        else:
            assert n_words < OPTS["max_new_tokens"]
    # input columns are carried over
    assert batched[3]["transcript"] == SENTENCES[3]
    assert batched[3]["wav"] == "$data_root/3.wav"


def test_shards_merge_equal_single_run(setup, tmp_path):
    d, model_dir = setup
    cont.generate_continuations(
        d / "in.csv", tmp_path / "one.csv", model_dir, batch_size=3, **OPTS
    )
    out = tmp_path / "merged.csv"
    with pytest.raises(RuntimeError, match="shard 0/2"):
        cont.merge_continuations(d / "in.csv", out, 2)
    for i in range(2):
        info = cont.generate_continuations(
            d / "in.csv", out, model_dir, batch_size=3, shard=(i, 2), **OPTS
        )
        assert info["path"].name == f"merged.shard{i}of2.csv"
        assert len(read_manifest(info["path"])) == 5
    cont.merge_continuations(d / "in.csv", out, 2)
    assert read_manifest(out) == read_manifest(tmp_path / "one.csv")


def test_kill_and_resume(setup, tmp_path):
    d, model_dir = setup
    ref = tmp_path / "ref.csv"
    cont.generate_continuations(
        d / "in.csv", ref, model_dir, batch_size=3, **OPTS
    )
    out = tmp_path / "out.csv"
    cmd = [
        sys.executable,
        "-m",
        "speechbrain_blspkd.dataprep.continuations",
        str(d / "in.csv"),
        str(out),
        "--model-dir",
        str(model_dir),
        "--batch-size",
        "3",
        "--max-new-tokens",
        "6",
        "--template",
        TEMPLATE,
        "--dtype",
        "float32",
        "--stop-after-batches",
        "1",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]  # SIGKILLed
    assert not out.exists()
    progress = cont._progress_path(out, (0, 1))
    lines = progress.read_text().splitlines()
    assert len(lines) == 1 + 3  # settings header + first batch
    with open(progress, "a") as f:  # a torn write of the next record
        f.write('{"ID": "utt0')
    info = cont.generate_continuations(
        d / "in.csv", out, model_dir, batch_size=3, **OPTS
    )
    assert info["generated"] == 7
    assert read_manifest(out) == read_manifest(ref)
    ids = [
        line.split('"ID": "')[1][:5]
        for line in progress.read_text().splitlines()[1:]
    ]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 10
    # a finished run is a no-op
    assert (
        cont.generate_continuations(d / "in.csv", out, model_dir, **OPTS)[
            "generated"
        ]
        == 0
    )


def test_changed_settings_are_refused(setup, tmp_path):
    d, model_dir = setup
    out = tmp_path / "out.csv"
    cont.generate_continuations(d / "in.csv", out, model_dir, **OPTS)
    with pytest.raises(ValueError, match="other settings"):
        cont.generate_continuations(
            d / "in.csv", out, model_dir, **(OPTS | {"max_new_tokens": 7})
        )
