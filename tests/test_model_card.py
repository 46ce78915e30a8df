"""The model card (README.md) written into every exported folder."""

import json
import logging
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from speechbrain_blspkd.inference import (  # noqa: E402
    card_sections,
    model_card,
)
from speechbrain_blspkd.inference.export import export_model  # noqa: E402
from speechbrain_blspkd.testing import (  # noqa: E402
    tiny_saved_speech_llm,
)

SECTIONS = [
    "## Method",
    "## Base models and licences",
    "## Training",
    "## Evaluation",
    "## Intended use and limits",
    "## Use it",
    "## Files",
]

# A run folder as a recipe run leaves it: the resolved HyperPyYAML copy
# (tags, anchors and aliases), the step log, a checkpoint, the evaluation.
RUN_HPARAMS = """\
# Generated 2026-12-01 from:
# /somewhere/recipes/SynthSpeech/speech_llm/hparams/blsp_kd.yaml
# yamllint disable
seed: 1234
output_folder: {run}
save_folder: {run}/save
step_log: {run}/train_steps.jsonl
export_folder: {export}
train_manifest: {run}/data/train.csv
test_manifest: {run}/data/test.csv
align_objective: &id001 !new:speechbrain_blspkd.objectives.BLSPKDObjective
  weights: {{align: 1.0, cif: 1.0}}
  temperature: 2.0
kd_objective: &id002 !new:speechbrain_blspkd.objectives.BLSPKDObjective
  weights:
    input_kl: 1.0
    response_kl: 1.0
    response_ce: 0.0
    align: 0.3
model: !apply:speechbrain_blspkd.inference.export.build_model
  - x
stages:
- !new:speechbrain_blspkd.stages.Stage
  name: align
  objective: *id001
  train_manifest: {run}/data/train.csv # every utterance
  epochs: !new:speechbrain.utils.epoch_loop.EpochCounter
    limit: 3
  lr: 0.001
- !new:speechbrain_blspkd.stages.Stage
  name: kd
  objective: *id002
  train_manifest: {run}/data/train.csv
  epochs: !new:speechbrain.utils.epoch_loop.EpochCounter
    limit: 1
  lr: 0.0002
"""

SUMMARY = {
    "tasks": {
        "repeat": {
            "n": 64,
            "speech": {"chrf": 15.3, "wer": 141.7, "shuffled_chrf": 13.2},
            "speech_vs_ref_wer": 139.7,
        },
        "continue": {
            "n": 64,
            "speech": {"chrf": 48.0, "wer": 70.0, "shuffled_chrf": 13.0},
        },
    },
    "count": {"exact_rate": 0.296875, "mean_abs_error": 1.53},
    "adapter": {"input_kl": 0.9157, "token_acc": 0.2717},
}


def _fake_run(run, export):
    (run / "data").mkdir(parents=True)
    (run / "hyperparams.yaml").write_text(
        RUN_HPARAMS.format(run=run, export=export), encoding="utf-8"
    )
    rows = ["ID,wav,duration,transcript,language,speaker"]
    langs = ["en"] * 6 + ["de"] * 2
    for i, lang in enumerate(langs):
        rows.append(f"u{i},$data_root/u{i}.wav,4.5,hello,{lang},v{i % 3}")
    (run / "data" / "train.csv").write_text("\n".join(rows) + "\n")
    steps = [{"stage": "align", "step": s, "loss": 1.0} for s in (5, 10, 225)]
    steps += [{"stage": "kd", "step": s, "loss": 1.0} for s in (230, 280)]
    (run / "train_steps.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in steps) + '{"stage": "kd", "st'
    )
    ckpt = run / "save" / "CKPT+kd-E1"
    ckpt.mkdir(parents=True)
    (ckpt / "CKPT.yaml").write_text("end-of-epoch: true\nunixtime: 2.0\n")
    (ckpt / "brain.ckpt").write_text("optimizer_step: 285\nstep: 0\n")
    old = run / "save" / "CKPT+align-E3"
    old.mkdir()
    (old / "CKPT.yaml").write_text("unixtime: 1.0\n")
    (old / "brain.ckpt").write_text("optimizer_step: 225\n")
    (run / "eval" / "trained").mkdir(parents=True)
    (run / "eval" / "trained" / "summary.json").write_text(json.dumps(SUMMARY))
    return run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("card")
    return tiny_saved_speech_llm(tmp / "bases", seed=0, instruction="Repeat:")


def test_card_without_a_run(tiny, tmp_path):
    folder = export_model(tiny, tmp_path / "exported")
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert card.startswith("# exported: a speech LLM (CFormer adapter, llm)")
    positions = [card.index(s) for s in SECTIONS]
    assert positions == sorted(positions)
    assert "`CFormer` (`speechbrain_blspkd.nnet.cformer.CFormer`)" in card
    assert "CIF adapter" in card  # the class's own first doc line
    assert "Partial LoRA (r=4" in card
    assert "learned weights (`model.ckpt`)" in card
    # local base folders: no registered licence, said so
    assert card.count("unknown (not a registered asset") == 2
    assert "No training run was found" in card
    assert "No evaluation summary" in card
    assert "not recorded" in card
    assert f"SpeechLLM.from_hparams(source={json.dumps(str(folder))})" in card
    assert f"blspkd-infer --model {folder} --wav speech.wav" in card
    assert f"blspkd-demo-ui --model {folder}" in card
    assert "longer than 30 s are refused" in card


def test_card_of_a_recipe_run(tiny, tmp_path):
    """Export into ``<run>/model`` (the recipes' layout): the card holds
    the stages with their steps, the data, the evaluation and the limits
    of a synthetic corpus; the assets' licences."""
    run = _fake_run(tmp_path / "run", tmp_path / "run" / "model")
    config = {"llm_source": "smollm2-135m-instruct"}
    # asset names are taken as written; nothing is fetched to write a card
    folder = export_model(tiny, run / "model", config)
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert card.startswith("# blsp_kd on SynthSpeech: a speech LLM")
    assert "| LLM | `smollm2-135m-instruct` |" in card
    assert "| Apache-2.0 |" in card
    assert "recipe: `/somewhere/recipes/SynthSpeech/speech_llm/" in card
    assert "seed: 1234" in card
    assert "espeak-ng" in card and "synthetic speech only" in card
    assert "`train.csv`: 8 utterances, 0.01 h, 3 speakers/voices" in card
    assert "languages: en 6, de 2" in card
    assert "Languages seen in training: de, en" in card
    # the step log's last align step, the checkpoint's total for kd
    assert (
        "| align | BLSPKDObjective | align 1, cif 1 | 3 | 225 | 0.001 |" in card
    )
    assert (
        "| kd | BLSPKDObjective | input_kl 1, response_kl 1, align 0.3 "
        "| 1 | 60 | 0.0002 | `train.csv` |"
    ) in card
    assert "285 optimiser steps in all." in card
    assert "BLSP-KD: input/response KL" in card  # the objective's doc line
    assert "| trained | repeat | 64 | 15.3 | 13.2 | 141.7 | - | 139.7 |" in card
    assert "exact for 29.7 %" in card and "input_kl 0.916" in card
    # repeat is near the shuffled level, continue is not
    assert "(repeat chrF 15.3 vs shuffled 13.2)" in card
    assert "No training run" not in card


def test_run_found_through_the_log_file(tiny, tmp_path):
    """``export_folder`` outside the run (as ``make demo`` does): the run is
    the one the process logs to, when it names this export."""
    export = tmp_path / "elsewhere" / "model"
    run = _fake_run(tmp_path / "run", export)
    folder = export_model(tiny, export)
    assert "No training run" in (folder / "README.md").read_text()
    handler = logging.FileHandler(run / "log.txt")
    logging.getLogger().addHandler(handler)
    try:
        folder = export_model(tiny, export, overwrite=True)
        card = (folder / "README.md").read_text()
        assert "| align | BLSPKDObjective" in card
        # a run that exports elsewhere is not taken
        other = export_model(tiny, tmp_path / "other")
        assert "No training run" in (other / "README.md").read_text()
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def test_card_never_breaks_an_export(tiny, tmp_path, monkeypatch, caplog):
    def boom(*args, **kwargs):
        raise RuntimeError("card exploded")

    monkeypatch.setattr(model_card, "build_model_card", boom)
    with caplog.at_level(logging.WARNING):
        folder = export_model(tiny, tmp_path / "m")
    assert (folder / "model.ckpt").is_file()
    assert not (folder / "README.md").exists()
    assert "card exploded" in caplog.text


def test_rewrite_the_card_of_a_folder(tiny, tmp_path, capsys):
    folder = export_model(tiny, tmp_path / "m")
    (folder / "README.md").unlink()
    run = _fake_run(tmp_path / "run", tmp_path / "unrelated")
    assert model_card.main([str(folder), "--run", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(folder / "README.md")
    card = (folder / "README.md").read_text()
    assert "| kd | BLSPKDObjective" in card
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]
    assert model_card.main([str(tmp_path)]) == 2


def test_every_adapter_and_the_cascade_get_a_card(tmp_path):
    from speechbrain_blspkd.models.cascade import CascadeModel
    from speechbrain_blspkd.nnet.conv_subsampler import ConvSubsampler
    from speechbrain_blspkd.nnet.qformer import QFormer
    from speechbrain_blspkd.nnet.whisper_asr import WhisperTranscriber

    adapters = {
        "ConvSubsampler": ConvSubsampler(64, 64, bottleneck=16),
        "QFormer": QFormer(
            64, 64, num_queries=3, num_layers=1, num_heads=4, ffn_size=128
        ),
    }
    for name, adapter in adapters.items():
        model = tiny_saved_speech_llm(tmp_path / name, adapter=adapter)
        folder = export_model(model, tmp_path / name / "model")
        card = (folder / "README.md").read_text()
        assert f"speech adapter: `{name}`" in card, name
    bases = tmp_path / "ConvSubsampler"
    cascade = CascadeModel(
        str(bases / "llm"),
        WhisperTranscriber(str(bases / "whisper"), max_new_tokens=4),
    )
    folder = export_model(cascade, tmp_path / "cascade")
    card = (folder / "README.md").read_text()
    assert "`CascadeModel`" in card and "speech recogniser" in card
    assert "| speech recogniser |" in card
    assert "LLM adaptation: none" in card


def test_multilingual_summary_gets_language_rows_and_the_gate_confusion():
    summary = {
        "tasks": SUMMARY["tasks"],
        "by_language": {
            # metrics.EvalSummary's per-language keys
            "repeat/en": {"n": 2, "parity_chrf": 30.0, "parity_wer": 90.0},
            "repeat/zh": {
                "n": 2,
                "parity_chrf": 12.5,
                "parity_shuffled_chrf": 10.0,
                "parity_wer": 99.0,
            },
        },
        "adapter": {
            "l_lid": 0.3,
            "lid_confusion/en/en": 0.5,
            "lid_confusion/en/zh": 0.0,
            "lid_confusion/zh/en": 0.125,
            "lid_confusion/zh/zh": 0.375,
        },
    }
    lines = card_sections.evaluation_lines({"evaluation": {"trained": summary}})
    card = "\n".join(lines)
    assert "| repeat | zh | 2 | 12.5 (10.0) | 99.0 (-) | - |" in card
    assert "LID accuracy 87.5 %" in card
    assert "| en | 100 | 0 |" in card and "| zh | 25 | 75 |" in card
    # the joint shares are not listed as objective terms
    assert "objective on the test split: l_lid 0.300" in card
    assert "lid_confusion/en/en" not in card
    # one language: no per-language table, no gate: no confusion
    plain = "\n".join(
        card_sections.evaluation_lines({"evaluation": {"trained": SUMMARY}})
    )
    assert "Per language" not in plain and "Language gate" not in plain
