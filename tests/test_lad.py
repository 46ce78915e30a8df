"""Language-aware distillation: the query-bank Q-Former, its gates, the
straight-through estimator, the teacher-forcing schedule, the language ids
from the manifests, the LAD objective and the export of a bank model."""

import math

import pytest
import soundfile as sf
import speechbrain as sb
import torch
import torch.nn.functional as F
from speechbrain.dataio.batch import PaddedBatch
from speechbrain.utils.epoch_loop import EpochCounter

from speechbrain_blspkd.dataio.manifest import write_manifest
from speechbrain_blspkd.dataio.pipelines import dataio_prepare
from speechbrain_blspkd.nnet.adapter import AdapterTargets
from speechbrain_blspkd.nnet.language_aware_qformer import (
    AttentionPoolingGate,
    ConvLanguageGate,
    LanguageAwareQFormer,
    forcing_probability,
)
from speechbrain_blspkd.nnet.qformer import QFormer
from speechbrain_blspkd.objectives import LADObjective
from speechbrain_blspkd.stages import Stage
from speechbrain_blspkd.testing import (
    tiny_brain,
    tiny_language_aware_qformer,
    tiny_speech_llm,
)

LANGS = ("en", "de", "zh", "hi")


def _labels(*codes):
    return torch.tensor([LANGS.index(c) for c in codes])


# ----------------------------------------------------------------------
# the adapter
def test_is_a_qformer_with_one_set_of_queries_per_language():
    adapter = tiny_language_aware_qformer(LANGS).eval()
    assert isinstance(adapter, QFormer)
    assert adapter.queries.shape == (4, 4, 64)
    assert adapter.language_codes() == list(LANGS)
    out = adapter(torch.randn(3, 25, 64), torch.tensor([1.0, 0.4, 0.7]))
    assert out.tokens.shape == (3, 4, 64)
    assert out.token_mask.all() and out.language_logits.shape == (3, 4)
    assert out.language_logits.dtype == torch.float32
    assert not out.forced.any()


@pytest.mark.parametrize("gate", ["conv", "attention"])
def test_padding_changes_neither_the_gate_nor_the_tokens(gate):
    adapter = tiny_language_aware_qformer(LANGS, gate=gate).eval()
    lengths = [17, 5, 1]
    batch = 1e4 * torch.randn(3, 20, 64)  # garbage beyond each length
    rows = [torch.randn(n, 64) for n in lengths]
    for i, row in enumerate(rows):
        batch[i, : len(row)] = row
    with torch.no_grad():
        out = adapter(batch, torch.tensor(lengths) / 20)
        for i, row in enumerate(rows):
            alone = adapter(row[None])
            torch.testing.assert_close(
                out.language_logits[i], alone.language_logits[0]
            )
            torch.testing.assert_close(out.tokens[i], alone.tokens[0])


@pytest.mark.parametrize("cls", [ConvLanguageGate, AttentionPoolingGate])
def test_both_gates_learn_to_tell_languages_apart(cls):
    """Frames of two 'languages' with different means: a few steps of
    cross-entropy separate them."""
    torch.manual_seed(0)
    gate = cls(8, 2, hidden_size=16)
    frames = torch.randn(8, 12, 8)
    labels = torch.tensor([0, 1] * 4)
    frames[labels == 1] += 1.0
    valid = torch.ones(8, 12, dtype=torch.bool)
    opt = torch.optim.Adam(gate.parameters(), lr=1e-2)
    for _ in range(30):
        loss = F.cross_entropy(gate(frames, valid), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (gate(frames, valid).argmax(-1) == labels).all()


def test_hard_gating_forward_uses_exactly_one_bank_entry():
    torch.manual_seed(0)
    adapter = tiny_language_aware_qformer(LANGS, gating="hard").train()
    adapter.set_training_progress(1.0)  # past the forcing schedule
    feats = torch.randn(2, 20, 64)
    out = adapter(feats, targets=AdapterTargets(language=_labels("en", "de")))
    assert not out.forced.any()
    choice = out.language_logits.argmax(-1)
    assert torch.equal(out.language_weights, F.one_hot(choice, 4).float())
    queries, _ = adapter.bank_queries(
        out.language_logits, None, torch.zeros(2, dtype=torch.bool)
    )
    assert torch.equal(queries, adapter.queries[choice])  # bit for bit
    with torch.no_grad():
        frames, valid = adapter.prepare_frames(feats)
        want = adapter.attend(adapter.queries[choice], frames, valid)
    assert torch.equal(out.tokens, want)


def test_straight_through_gives_the_gate_the_soft_mixture_gradient():
    torch.manual_seed(0)
    adapter = tiny_language_aware_qformer(LANGS, gating="hard").train()
    logits = torch.randn(3, 4, requires_grad=True)
    upstream = torch.randn(3, 4, 64)
    queries, _ = adapter.bank_queries(
        logits, None, torch.zeros(3, dtype=torch.bool)
    )
    (queries * upstream).sum().backward()
    # d/dg of sum_k softmax(g)_k <upstream, Q_k>: softmax Jacobian
    bank = adapter.queries.detach()
    scores = torch.einsum("bld,kld->bk", upstream, bank)
    p = logits.detach().softmax(-1)
    want = p * (scores - (p * scores).sum(-1, keepdim=True))
    torch.testing.assert_close(logits.grad, want)
    # the bank: only the selected entries receive the distillation gradient
    choice = logits.detach().argmax(-1)
    grad = adapter.queries.grad
    for k in range(4):
        if k in choice.tolist():
            assert grad[k].abs().sum() > 0
        else:
            assert torch.equal(grad[k], torch.zeros_like(grad[k]))


def test_gate_gets_gradients_through_the_whole_adapter_in_hard_mode():
    torch.manual_seed(0)
    adapter = tiny_language_aware_qformer(LANGS, gating="hard").train()
    adapter.set_training_progress(1.0)
    out = adapter(torch.randn(2, 20, 64))
    out.tokens.pow(2).mean().backward()
    grads = [p.grad for p in adapter.gate.parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    unused = set(range(4)) - set(out.language_logits.argmax(-1).tolist())
    assert unused
    for k in unused:
        assert adapter.queries.grad[k].abs().sum() == 0


def test_forced_rows_take_the_true_entry_and_no_straight_through():
    torch.manual_seed(0)
    adapter = tiny_language_aware_qformer(LANGS, gating="hard").train()
    adapter.set_training_progress(0.0)  # probability 1
    labels = _labels("hi", "zh")
    out = adapter(
        torch.randn(2, 20, 64), targets=AdapterTargets(language=labels)
    )
    assert out.forced.all()
    assert out.language_weights.argmax(-1).tolist() == labels.tolist()
    out.tokens.pow(2).mean().backward()
    # all rows forced: the gate learns from the LID loss only
    assert all(
        p.grad is None or p.grad.abs().sum() == 0
        for p in adapter.gate.parameters()
    )


def test_soft_gating_mixes_the_bank_with_the_gate_softmax():
    torch.manual_seed(0)
    adapter = tiny_language_aware_qformer(LANGS, gating="soft").train()
    adapter.set_training_progress(1.0)
    logits = torch.randn(2, 4)
    queries, weights = adapter.bank_queries(
        logits, None, torch.zeros(2, dtype=torch.bool)
    )
    p = logits.softmax(-1)
    torch.testing.assert_close(weights, p)
    want = (p[:, :, None, None] * adapter.queries[None]).sum(1)
    torch.testing.assert_close(queries, want)
    queries.pow(2).sum().backward()
    assert (adapter.queries.grad.abs().sum((1, 2)) > 0).all()
    # a forced row uses its language's entry alone
    forced = torch.tensor([True, False])
    queries, weights = adapter.bank_queries(logits, _labels("zh", "en"), forced)
    assert weights[0].tolist() == [0.0, 0.0, 1.0, 0.0]
    torch.testing.assert_close(queries[0], adapter.queries[2])


def test_bad_arguments_and_labels_are_refused():
    with pytest.raises(ValueError, match="unknown gate"):
        tiny_language_aware_qformer(gate="lstm")
    with pytest.raises(ValueError, match="unknown gating"):
        tiny_language_aware_qformer(gating="gumbel")
    with pytest.raises(ValueError, match="repeats"):
        tiny_language_aware_qformer(("en", "en"))
    with pytest.raises(ValueError, match="non-empty"):
        tiny_language_aware_qformer(())
    with pytest.raises(ValueError, match="forcing_fraction"):
        tiny_language_aware_qformer(forcing_fraction=1.5)
    adapter = tiny_language_aware_qformer(("en", "de"))
    with pytest.raises(ValueError, match="outside 0..1"):
        adapter(torch.randn(1, 5, 64), targets=AdapterTargets(language=[2]))


@pytest.mark.parametrize(
    "options",
    [dict(gate="conv", gating="hard"), dict(gate="attention", gating="soft")],
)
def test_rebuilt_from_export_hparams_gives_the_same_outputs(options):
    adapter = tiny_language_aware_qformer(LANGS, **options).eval()
    args = adapter.export_hparams()
    assert args["languages"] == list(LANGS) and args["init_from"] is None
    assert args["gate"] == options["gate"]
    rebuilt = LanguageAwareQFormer(**args).eval()
    rebuilt.load_state_dict(adapter.state_dict())
    feats = torch.randn(2, 9, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            rebuilt(feats).tokens, adapter(feats).tokens, rtol=0, atol=0
        )


# The checkpoint keys of both Q-Formers (one decoder layer), as the
# adapters had them when the language-aware one was first checkpointed:
# the bank and its gate sit beside the plain Q-Former's own modules.
QFORMER_KEYS = (
    ["layer_norm.bias", "layer_norm.weight"]
    + [
        f"layers.0.{name}"
        for name in (
            "encoder_attn.k_proj.weight",
            "encoder_attn.out_proj.bias",
            "encoder_attn.out_proj.weight",
            "encoder_attn.q_proj.bias",
            "encoder_attn.q_proj.weight",
            "encoder_attn.v_proj.bias",
            "encoder_attn.v_proj.weight",
            "encoder_attn_layer_norm.bias",
            "encoder_attn_layer_norm.weight",
            "fc1.bias",
            "fc1.weight",
            "fc2.bias",
            "fc2.weight",
            "final_layer_norm.bias",
            "final_layer_norm.weight",
            "self_attn.k_proj.weight",
            "self_attn.out_proj.bias",
            "self_attn.out_proj.weight",
            "self_attn.q_proj.bias",
            "self_attn.q_proj.weight",
            "self_attn.v_proj.bias",
            "self_attn.v_proj.weight",
            "self_attn_layer_norm.bias",
            "self_attn_layer_norm.weight",
        )
    ]
    + ["out_proj.bias", "out_proj.weight", "positions", "queries"]
)
GATE_KEYS = {
    "conv": [
        "gate.classifier.0.bias",
        "gate.classifier.0.weight",
        "gate.classifier.2.bias",
        "gate.classifier.2.weight",
        "gate.convs.0.bias",
        "gate.convs.0.weight",
        "gate.convs.1.bias",
        "gate.convs.1.weight",
        "gate.norm.bias",
        "gate.norm.weight",
    ],
    "attention": [
        "gate.mlp.0.bias",
        "gate.mlp.0.weight",
        "gate.mlp.2.bias",
        "gate.mlp.2.weight",
        "gate.norm.bias",
        "gate.norm.weight",
        "gate.score.0.bias",
        "gate.score.0.weight",
        "gate.score.2.bias",
        "gate.score.2.weight",
    ],
}
SIZES = dict(num_queries=4, num_layers=1, num_heads=2, ffn_size=32)


def test_checkpoint_keys_of_both_qformers_are_unchanged():
    plain = QFormer(16, 24, **SIZES)
    assert sorted(plain.state_dict()) == sorted(QFORMER_KEYS)
    for gate, keys in GATE_KEYS.items():
        bank = LanguageAwareQFormer(
            16, 24, ["en", "de"], gate=gate, gate_size=8, **SIZES
        )
        assert sorted(bank.state_dict()) == sorted(QFORMER_KEYS + keys)


@pytest.mark.parametrize("gating", ["hard", "soft"])
def test_a_one_language_bank_is_the_plain_qformer(gating):
    """With the plain Q-Former's weights and its queries as the only bank
    entry, the language-aware one gives the same tokens."""
    plain = QFormer(16, 24, **SIZES).eval()
    bank = LanguageAwareQFormer(
        16, 24, ["en"], gate_size=8, gating=gating, **SIZES
    ).eval()
    weights = dict(plain.state_dict())
    weights["queries"] = weights["queries"][None]
    weights.update(
        (k, v) for k, v in bank.state_dict().items() if k.startswith("gate.")
    )
    bank.load_state_dict(weights)
    feats, lens = torch.randn(3, 20, 16), torch.tensor([1.0, 0.6, 0.3])
    with torch.no_grad():
        torch.testing.assert_close(
            bank(feats, lens).tokens, plain(feats, lens).tokens, rtol=0, atol=0
        )


# ----------------------------------------------------------------------
# the teacher-forcing schedule
def test_forcing_probability_is_a_half_cosine_over_the_fraction():
    for fraction in (0.5, 0.2, 1.0):
        ts = [i / 100 for i in range(101)]
        ps = [forcing_probability(t, fraction) for t in ts]
        assert ps[0] == 1.0
        assert all(a >= b for a, b in zip(ps, ps[1:]))
        for t, p in zip(ts, ps):
            if t >= fraction:
                assert p == 0.0
            else:
                assert p == pytest.approx(
                    (1 + math.cos(math.pi * t / fraction)) / 2
                )
        assert forcing_probability(fraction / 2, fraction) == pytest.approx(0.5)
    assert forcing_probability(0.0, 0.0) == 0.0  # disabled


def test_forcing_draws_follow_the_probability_in_training_only():
    torch.manual_seed(0)
    adapter = tiny_language_aware_qformer(LANGS, forcing_fraction=0.5)
    labels = torch.zeros(4000, dtype=torch.long)
    adapter.train()
    for progress, want in [(0.0, 1.0), (0.125, 0.854), (0.25, 0.5), (0.6, 0)]:
        adapter.set_training_progress(progress)
        assert adapter.forcing_probability() == pytest.approx(want, abs=1e-3)
        rate = adapter.draw_forcing(labels, 4000, "cpu").float().mean()
        assert float(rate) == pytest.approx(want, abs=0.03)
    adapter.set_training_progress(0.0)
    assert not adapter.draw_forcing(None, 10, "cpu").any()  # no labels
    adapter.eval()
    assert not adapter.draw_forcing(labels, 4000, "cpu").any()


def _brain(tmp_path, adapter, epochs=1, objective=None):
    torch.manual_seed(0)
    objective = objective or LADObjective()
    stage = Stage("lad", objective, "t.csv", EpochCounter(epochs), {}, 1e-3)
    return tiny_brain(
        tiny_speech_llm(plora=None, adapter=adapter),
        stage,
        str(tmp_path / "s.jsonl"),
        log_every_n_steps=0,
    )


def test_the_brain_tells_the_adapter_the_stage_progress(tmp_path):
    """Two epochs of four optimiser steps: the forcing probability falls
    from 1 to 0 over the first half of the stage, then stays 0."""
    adapter = tiny_language_aware_qformer(LANGS, forcing_fraction=0.5)
    brain = _brain(tmp_path, adapter, epochs=2)
    brain.steps_per_epoch = 4
    progress, probability = [], []
    for epoch in (1, 2):
        brain.stage.epochs.current = epoch
        for step in range(1, 5):
            brain.step = step
            brain.on_fit_batch_start(None, True)
            progress.append(adapter.progress)
            probability.append(round(adapter.forcing_probability(), 3))
    assert progress == [i / 8 for i in range(8)]
    assert probability == [1.0, 0.854, 0.5, 0.146, 0.0, 0.0, 0.0, 0.0]


# ----------------------------------------------------------------------
# language ids: the manifest's codes in the gate's order
def _manifests(folder, languages_by_split):
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, codes in languages_by_split.items():
        rows = []
        for i, code in enumerate(codes):
            uid = f"{split}_{i}"
            sf.write(
                folder / f"{uid}.wav", 0.1 * torch.randn(4000).numpy(), 16000
            )
            rows.append(
                dict(
                    ID=uid,
                    wav=f"$data_root/{uid}.wav",
                    duration=0.25,
                    transcript="the cat sat" if i % 2 else "a dog ran",
                    language=code,
                    speaker="s",
                    continuation="on the mat.",
                )
            )
        paths[split] = str(folder / f"{split}.csv")
        write_manifest(paths[split], rows)
    return paths


def _hparams(paths, folder, model):
    return dict(
        stages=[
            Stage(
                "lad", LADObjective(), paths["train"], EpochCounter(1), {}, 1e-3
            )
        ],
        valid_csv=paths["valid"],
        test_csv=paths["test"],
        data_root=str(folder),
        sorting="random",
        sample_rate=16000,
        max_audio_seconds=30,
        model=model,
    )


def test_language_ids_follow_the_gate_order_of_the_yaml(tmp_path):
    gate_order = ("zh", "en", "hi", "de")  # not the manifest's order
    brain = _brain(tmp_path, tiny_language_aware_qformer(gate_order))
    codes = {
        "train": ["en", "de", "hi", "zh"],
        "valid": ["de", "en"],
        "test": ["zh"],
    }
    paths = _manifests(tmp_path / "data", codes)
    datasets = dataio_prepare(_hparams(paths, tmp_path / "data", brain.model))
    for name, split in (("lad", "train"), ("valid", "valid"), ("test", "test")):
        ids = [item["language_id"] for item in datasets[name]]
        assert ids == [gate_order.index(c) for c in codes[split]], name
    # a batch reaches the adapter as AdapterTargets.language, and the LID
    # loss is the cross-entropy against exactly those indices
    batch = PaddedBatch(list(datasets["lad"]))
    assert batch.language_id.tolist() == [1, 3, 2, 0]
    out = brain.compute_forward(batch, sb.Stage.VALID)
    assert out.targets.language.tolist() == [1, 3, 2, 0]
    _, stats = brain.stage.objective(out, brain.model, sb.Stage.VALID)
    want = F.cross_entropy(
        out.adapter.language_logits, torch.tensor([1, 3, 2, 0])
    )
    assert stats["l_lid"] == pytest.approx(float(want.detach()))


def test_an_unknown_manifest_language_is_named_with_its_row(tmp_path):
    brain = _brain(tmp_path, tiny_language_aware_qformer(("en", "de")))
    paths = _manifests(
        tmp_path / "data",
        {"train": ["en", "de"], "valid": ["en", "fr"], "test": ["de"]},
    )
    with pytest.raises(ValueError) as err:
        dataio_prepare(_hparams(paths, tmp_path / "data", brain.model))
    message = str(err.value)
    assert "valid.csv" in message and "'fr' (row valid_1)" in message
    assert "['en', 'de']" in message


def test_adapters_without_languages_get_no_language_ids(tmp_path):
    brain = _brain(
        tmp_path,
        QFormer(64, 64, num_queries=3, num_layers=1, num_heads=4, ffn_size=128),
        objective=LADObjective({"l_in": 1.0}),
    )
    paths = _manifests(
        tmp_path / "data", {"train": ["xx"], "valid": ["en"], "test": ["en"]}
    )
    datasets = dataio_prepare(_hparams(paths, tmp_path / "data", brain.model))
    assert "language_id" not in datasets["lad"][0]


# ----------------------------------------------------------------------
# the objective
def _lad_model(**options):
    torch.manual_seed(0)
    return tiny_speech_llm(
        plora=None,
        adapter=tiny_language_aware_qformer(LANGS, **options),
        instruction="Repeat:",
    )


def test_objective_terms_and_lid_accuracy():
    model = _lad_model()
    model.train()
    weights = {"l_lid": 0.5, "l_out": 2.0, "l_in": 0.25}
    objective = LADObjective(weights)
    labels = _labels("en", "zh", "hi")
    out = model(
        ["the cat sat", "a dog ran", "hello world"],
        ["on the mat.", "away.", "how are you?"],
        wavs=0.1 * torch.randn(3, 6000),
        languages=labels,
        request=objective.request(sb.Stage.VALID),
    )
    loss, stats = objective(out, model, sb.Stage.VALID)
    lid = F.cross_entropy(out.adapter.language_logits, labels)
    assert stats["l_lid"] == pytest.approx(float(lid.detach()))
    guess = out.adapter.language_logits.argmax(-1)
    assert stats["lid_acc"] == pytest.approx(
        float((guess == labels).float().mean())
    )
    total = sum(weights[k] * stats[k] for k in weights)
    assert float(loss.detach()) == pytest.approx(total, rel=1e-5)
    # DiVA's terms are DiVA's (inherited, not re-implemented)
    from speechbrain_blspkd.objectives import DiVAObjective

    assert stats["l_in"] == pytest.approx(
        float(DiVAObjective.input_loss(out, model).detach())
    )


def test_gate_confusion_over_a_pass_matches_the_per_utterance_guesses():
    # joint shares per batch, averaged over batches weighted by their
    # utterances (as the Brain does), give the confusion matrix of the
    # whole pass; its trace is the pass's LID accuracy
    from speechbrain_blspkd.metrics import confusion_from_stats
    from speechbrain_blspkd.nnet.adapter import AdapterTargets

    model = _lad_model()
    model.eval()
    adapter = model.adapter
    torch.manual_seed(3)
    sums, n_total, guesses, truths = {}, 0, [], []
    for batch in (3, 5, 2):
        feats = torch.randn(batch, 20, 64)
        labels = torch.randint(0, len(LANGS), (batch,))
        out = adapter(feats)
        stats = adapter.diagnostics(out, AdapterTargets(language=labels))
        assert len(stats) == len(LANGS) ** 2
        for key, value in stats.items():
            sums[key] = sums.get(key, 0.0) + value * batch
        n_total += batch
        guesses += out.language_logits.argmax(-1).tolist()
        truths += labels.tolist()
    confusion = confusion_from_stats({k: v / n_total for k, v in sums.items()})
    hits = sum(g == t for g, t in zip(guesses, truths))
    assert confusion["accuracy"] == pytest.approx(hits / n_total)
    for i, true in enumerate(LANGS):
        rows = [g for g, t in zip(guesses, truths) if t == i]
        for j, guess in enumerate(LANGS):
            expected = rows.count(j) / len(rows) if rows else 0.0
            assert confusion["matrix"][true][guess] == pytest.approx(expected)
    # no labels: nothing to report
    assert adapter.diagnostics(out, None) == {}


def test_lid_only_needs_no_llm_pass_and_learns_the_languages():
    model = _lad_model()
    model.train()
    objective = LADObjective({"l_lid": 1.0})
    request = objective.request(sb.Stage.TRAIN)
    assert not request.runs_llm
    feats = torch.randn(4, 30, 64)
    labels = _labels("en", "de", "zh", "hi")
    opt = torch.optim.Adam(model.adapter.gate.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        out = model(
            ["a", "b", "c", "d"], feats=feats, languages=labels, request=request
        )
        loss, _ = objective(out, model, sb.Stage.TRAIN)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    assert float(objective.lid_accuracy(out)) == 1.0


def test_objective_refuses_missing_labels_or_gate():
    model = _lad_model()
    objective = LADObjective({"l_lid": 1.0})
    out = model(["a"], feats=torch.randn(1, 10, 64))
    with pytest.raises(ValueError, match="no language labels"):
        objective(out, model, sb.Stage.TRAIN)
    plain = tiny_speech_llm(
        plora=None,
        adapter=QFormer(64, 64, num_queries=3, num_layers=1, num_heads=4),
    )
    out = plain(
        ["a"], feats=torch.randn(1, 10, 64), languages=torch.tensor([0])
    )
    with pytest.raises(ValueError, match="no language logits"):
        objective(out, plain, sb.Stage.TRAIN)
    with pytest.raises(ValueError, match="unknown loss weight"):
        LADObjective({"l_lang": 1.0})


# ----------------------------------------------------------------------
# export: the bank model answers through from_hparams and blspkd-infer
def test_exported_bank_model_answers_through_from_hparams_and_the_cli(
    tmp_path, capsys
):
    from speechbrain_blspkd.inference import SpeechLLM
    from speechbrain_blspkd.inference.cli import main as cli_main
    from speechbrain_blspkd.inference.export import export_model
    from speechbrain_blspkd.testing import tiny_saved_speech_llm

    adapter = tiny_language_aware_qformer(("en", "de", "zh"), gate="attention")
    model = tiny_saved_speech_llm(
        tmp_path / "bases", adapter=adapter, instruction="Repeat:"
    )
    model.eval()
    wav = 0.1 * torch.randn(1, 12000)
    want = model.generate(wav, max_new_tokens=5)
    folder = export_model(model, tmp_path / "model")
    assert "LanguageAwareQFormer" in (folder / "hyperparams.yaml").read_text()
    loaded = SpeechLLM.from_hparams(
        source=str(folder), run_opts={"device": "cpu"}
    )
    bank = loaded.model.adapter
    assert type(bank) is LanguageAwareQFormer
    assert bank.language_codes() == ["en", "de", "zh"]
    assert bank.gate_type == "attention" and bank.gating == "hard"
    assert torch.equal(bank.queries, adapter.queries)
    assert loaded.generate_batch(wav, max_new_tokens=5) == want
    path = tmp_path / "a.wav"
    sf.write(path, wav[0].numpy(), 16000)
    expected = loaded.generate_file(path, max_new_tokens=5)
    assert (
        cli_main(
            [
                "--model",
                str(folder),
                "--wav",
                str(path),
                "--max-new-tokens",
                "5",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == expected + "\n"
