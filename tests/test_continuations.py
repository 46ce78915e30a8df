"""Tests of teacher continuation generation (tiny random Llama)."""

import os
import subprocess
import sys

import pytest

from speechbrain_blspkd.dataio.manifest import read_manifest, write_manifest
from speechbrain_blspkd.dataprep import continuations as cont
from speechbrain_blspkd.dataprep.shard_progress import progress_path
from speechbrain_blspkd.prompt import PromptBuilder
from speechbrain_blspkd.testing import save_toy_llm, toy_word_tokenizer

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
INSTRUCTION = "continue :"
OPTS = dict(max_new_tokens=6, instruction=INSTRUCTION, dtype="float32")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("cont")
    tok = toy_word_tokenizer(WORDS + ["continue", ":", "and"])
    model_dir = save_toy_llm(d / "lm", tok)
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
    prompt = PromptBuilder(tok).build(INSTRUCTION, transcript=SENTENCES[0])
    ids = torch.tensor([prompt.input_ids])
    with torch.no_grad():
        first = int(model(ids).logits[0, -1].argmax())
    model.generation_config.eos_token_id = [tok.eos_token_id, first]
    model.save_pretrained(d / "lm_eos")
    tok.save_pretrained(d / "lm_eos")
    return d / "lm_eos", first


@pytest.fixture
def fed_prompts(monkeypatch):
    """Records the unpadded prompt ids every ``generate`` call gets."""
    from transformers import LlamaForCausalLM

    fed = []
    generate = LlamaForCausalLM.generate

    def recording(self, *args, input_ids=None, attention_mask=None, **kw):
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            start = mask.index(1)
            assert mask[start:] == [1] * (len(mask) - start)  # left padding
            fed.append(ids[start:])
        return generate(
            self,
            *args,
            input_ids=input_ids,
            attention_mask=attention_mask,
            **kw,
        )

    monkeypatch.setattr(LlamaForCausalLM, "generate", recording)
    return fed


@pytest.mark.parametrize(
    "settings, text",
    [
        (
            dict(instruction=INSTRUCTION),
            "<|im_start|> user continue : a bird <|im_end|> "
            "<|im_start|> assistant",
        ),
        (
            dict(
                instruction="continue",
                system_prompt="the sun",
                transcript_separator=" : ",
            ),
            "<|im_start|> system the sun <|im_end|> "
            "<|im_start|> user continue : a bird <|im_end|> "
            "<|im_start|> assistant",
        ),
        (
            dict(instruction="continue {transcript} and"),
            "<|im_start|> user continue a bird and <|im_end|> "
            "<|im_start|> assistant",
        ),
    ],
)
def test_prompt_is_the_text_teacher_prompt(
    setup, tmp_path, fed_prompts, settings, text
):
    """The LLM is fed, token for token, the text-teacher prompt of training
    (PromptBuilder's generation prompt, the model's teacher pass)."""
    from speechbrain_blspkd.models.speech_llm import SpeechLLMModel

    d, model_dir = setup
    out = tmp_path / "out.csv"
    cont.generate_continuations(
        d / "in.csv",
        out,
        model_dir,
        batch_size=4,
        max_new_tokens=3,
        dtype="float32",
        **settings,
    )
    assert len(fed_prompts) == len(SENTENCES)
    model = SpeechLLMModel(
        str(model_dir),
        None,
        system_prompt=settings.get("system_prompt"),
        transcript_separator=settings.get("transcript_separator", " "),
    )
    builder = PromptBuilder(
        model.tokenizer,
        system_prompt=settings.get("system_prompt"),
        transcript_separator=settings.get("transcript_separator", " "),
    )
    expected = [
        builder.build_batch(settings["instruction"], transcripts=[t])[
            0
        ].input_ids
        for t in SENTENCES
    ]
    assert sorted(fed_prompts) == sorted(expected)
    # longest prompts first
    assert [len(p) for p in fed_prompts] == sorted(
        (len(p) for p in expected), reverse=True
    )
    # the chat template, system prompt, instruction and separator
    assert model.tokenizer.decode(expected[4]) == text
    # the teacher's training sequence starts with this very prompt
    rows = read_manifest(out)
    teacher = model.teacher_pass(
        SENTENCES,
        [r["continuation"] for r in rows],
        settings["instruction"],
        add_eot=[r["truncated"] != "1" for r in rows],
    )
    for p, ids in zip(teacher.prompts, expected):
        assert p.input_ids[: p.prompt_length] == ids


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
    """Also: the CLI passes --instruction, --system-prompt and
    --transcript-separator on (else the resume refuses its progress file)."""
    d, model_dir = setup
    opts = OPTS | dict(
        instruction="continue",
        system_prompt="the sun",
        transcript_separator=" : ",
    )
    ref = tmp_path / "ref.csv"
    cont.generate_continuations(
        d / "in.csv", ref, model_dir, batch_size=3, **opts
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
        "--instruction",
        "continue",
        "--system-prompt",
        "the sun",
        "--transcript-separator",
        " : ",
        "--dtype",
        "float32",
        "--stop-after-batches",
        "1",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]  # SIGKILLed
    assert not out.exists()
    progress = progress_path(out, (0, 1))
    lines = progress.read_text().splitlines()
    assert len(lines) == 1 + 3  # settings header + first batch
    with open(progress, "a") as f:  # a torn write of the next record
        f.write('{"ID": "utt0')
    info = cont.generate_continuations(
        d / "in.csv", out, model_dir, batch_size=3, **opts
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
        cont.generate_continuations(d / "in.csv", out, model_dir, **opts)[
            "generated"
        ]
        == 0
    )


@pytest.mark.parametrize(
    "change",
    [
        {"max_new_tokens": 7},
        {"instruction": "continue : :"},
        {"system_prompt": "the sun"},
        {"transcript_separator": "  "},
    ],
)
def test_changed_settings_are_refused(setup, tmp_path, change):
    d, model_dir = setup
    out = tmp_path / "out.csv"
    cont.generate_continuations(d / "in.csv", out, model_dir, **OPTS)
    with pytest.raises(ValueError, match="other settings"):
        cont.generate_continuations(
            d / "in.csv", out, model_dir, **(OPTS | change)
        )


def test_recipe_prepares_with_the_model_prompt(setup, tmp_path, fed_prompts):
    """recipe.prepare_continuations prompts with the recipe's instruction and
    the model's system prompt and transcript separator."""
    import types

    from transformers import AutoTokenizer

    from speechbrain_blspkd.recipe import prepare_continuations

    d, model_dir = setup
    prompts = PromptBuilder(
        AutoTokenizer.from_pretrained(model_dir),
        system_prompt="the sun",
        transcript_separator=" : ",
    )
    hparams = dict(
        model=types.SimpleNamespace(prompts=prompts),
        instruction="continue",
        kd_train_subset=2,
        train_manifest=d / "in.csv",
        valid_manifest=d / "in.csv",
        test_manifest=d / "in.csv",
        train_csv=str(tmp_path / "train.csv"),
        valid_csv=str(tmp_path / "valid.csv"),
        test_csv=str(tmp_path / "test.csv"),
        llm_source=str(model_dir),
        continuation_batch_size=4,
        continuation_max_new_tokens=2,
        continuation_device=None,
        continuation_dtype="float32",
    )
    prepare_continuations(hparams)
    assert len(read_manifest(tmp_path / "train.csv")) == 2
    expected = [
        p.input_ids
        for p in prompts.build_batch(
            "continue", transcripts=SENTENCES[:2] + SENTENCES * 2
        )
    ]
    assert sorted(fed_prompts) == sorted(expected)


class _Loaded(Exception):
    pass


def test_the_model_runs_on_the_inferred_device(setup, monkeypatch, tmp_path):
    """Without ``--device`` (the CLI, the function, the recipe's
    ``continuation_device: null``) the LLM goes to speechbrain's
    ``infer_device()`` (the rank's GPU), not to the CPU."""
    from types import SimpleNamespace

    import speechbrain as sb

    from speechbrain_blspkd.recipe import prepare_continuations

    d, model_dir = setup
    devices = []

    def load(model_dir, device, dtype):
        devices.append(str(device))
        raise _Loaded

    monkeypatch.setattr(sb.utils.distributed, "infer_device", lambda: "cuda:3")
    monkeypatch.setattr(cont, "load_causal_lm", load)
    out = tmp_path / "out.csv"
    with pytest.raises(_Loaded):
        cont.main([str(d / "in.csv"), str(out), "--model-dir", str(model_dir)])
    with pytest.raises(_Loaded):
        cont.generate_continuations(d / "in.csv", out, model_dir, **OPTS)
    hparams = dict(
        model=SimpleNamespace(
            prompts=SimpleNamespace(
                system_prompt=None, transcript_separator=" "
            )
        ),
        kd_train_subset=None,
        train_manifest=str(d / "in.csv"),
        valid_manifest=str(d / "in.csv"),
        test_manifest=str(d / "in.csv"),
        train_csv=str(tmp_path / "train.csv"),
        valid_csv=str(tmp_path / "valid.csv"),
        test_csv=str(tmp_path / "test.csv"),
        llm_source=str(model_dir),
        continuation_batch_size=2,
        continuation_max_new_tokens=2,
        instruction=INSTRUCTION,
        continuation_device=None,
        continuation_dtype="float32",
    )
    with pytest.raises(_Loaded):
        prepare_continuations(hparams)
    assert devices == ["cuda:3"] * 3
