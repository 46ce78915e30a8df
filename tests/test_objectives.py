"""Tests of the objectives (speechbrain_blspkd.objectives): the generic
weighting of :class:`Objective` and the BLSP-KD objective on a tiny model."""

import math

import pytest
import speechbrain as sb
import torch

from speechbrain_blspkd.losses import kd_kl, response_ce
from speechbrain_blspkd.models.passes import PassRequest, SpeechLLMOutput
from speechbrain_blspkd.nnet.adapter import AdapterOutput
from speechbrain_blspkd.nnet.cif import quantity_loss
from speechbrain_blspkd.nnet.qformer import QFormer
from speechbrain_blspkd.objectives import (
    BLSPKDObjective,
    Objective,
    alignment,
    blsp_kd,
)
from speechbrain_blspkd.testing import count_llm_calls, tiny_speech_llm

TRAIN, VALID, TEST = sb.Stage.TRAIN, sb.Stage.VALID, sb.Stage.TEST
TRANSCRIPTS = ["the cat sat on the mat", "a dog", "hello world how are you"]
CONTINUATIONS = ["The cat was happy.", "ran to the park", "I am fine"]
ALL_KL = {"input_kl": 1.0, "response_kl": 1.0, "cif": 1.0}


class Toy(Objective):
    """An objective whose terms and metrics are given to it."""

    TERMS = ("input_kl", "response_kl", "response_ce", "cif")

    def __init__(self, weights, terms=None, metrics=None):
        super().__init__(weights)
        self._terms = terms or {}
        self._metrics = metrics or {}

    def terms(self, outputs, model, stage):
        return dict(self._terms)

    def metrics(self, outputs, model, stage):
        return dict(self._metrics)


def boom(name):
    def raise_():
        raise AssertionError(f"{name} was computed")

    return raise_


def batch(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8000, generator=g) * 0.1, torch.tensor(
        [1.0, 0.6, 0.8][:n]
    )


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = tiny_speech_llm(instruction="Repeat:")
    with torch.no_grad():  # non-zero PLoRA B: the student differs
        for name, p in model.llm.named_parameters():
            if "lora_" in name and not p.abs().sum():
                p.normal_(0, 0.1)
    return model.eval()


def run(model, objective, stage, transcripts=TRANSCRIPTS, **kw):
    wavs, lens = batch(len(transcripts))
    out = model(
        transcripts,
        CONTINUATIONS[: len(transcripts)],
        wavs=wavs,
        wav_lens=lens,
        request=objective.request(stage),
        **kw,
    )
    return out, objective(out, model, stage)


# ----------------------------------------------------------------------
# the generic weighting
def test_objective_weights_terms_and_stats():
    called = []
    objective = Toy(
        {"input_kl": 1.0, "response_kl": 0.5, "response_ce": 0.0, "cif": 2.0},
        terms={
            "input_kl": torch.tensor(1.5, requires_grad=True),
            "response_kl": lambda: torch.tensor(2.0),
            "response_ce": lambda: called.append(1),
            "cif": torch.tensor([0.25]),
        },
    )
    total, stats = objective(None, None, TRAIN)
    assert math.isclose(total.item(), 1.5 + 1.0 + 0.5)
    assert not called  # zero weight: never evaluated
    assert set(stats) == {"input_kl", "response_kl", "cif", "loss"}
    assert stats == {
        "input_kl": 1.5,
        "response_kl": 2.0,
        "cif": 0.25,
        "loss": 3.0,
    }
    assert all(type(v) is float for v in stats.values())
    assert total.requires_grad and total.dim() == 0
    total.backward()
    assert objective.active("cif") and not objective.active("response_ce")
    with pytest.raises(ValueError, match="unknown term"):
        objective.active("bogus")


def test_objective_refuses_bad_weights():
    with pytest.raises(ValueError, match="unknown loss weight"):
        Toy({"input_kll": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        Toy({"cif": -1.0})
    for bad in (float("nan"), float("inf"), "1"):
        with pytest.raises(ValueError, match=">= 0"):
            Toy({"cif": bad})
    for zero in ({"cif": 0.0, "input_kl": 0}, {}, None):
        with pytest.raises(ValueError, match="every loss weight is 0"):
            Toy(zero)
    Toy({"cif": 1})  # ints are fine


def test_default_weights_of_each_objective():
    from speechbrain_blspkd.objectives import (
        BLSPObjective,
        DiVAObjective,
        LADObjective,
    )

    defaults = {
        BLSPObjective: {"response_ce": 1.0},
        DiVAObjective: {"l_out": 1.0, "l_in": 1.0},
        LADObjective: {"l_lid": 1.0, "l_out": 1.0, "l_in": 1.0},
        BLSPKDObjective: ALL_KL,
    }
    for cls, weights in defaults.items():
        assert cls().weights == weights
        assert list(cls(None).weights) == list(weights)
        term = cls.TERMS[0]
        assert cls({term: 0.5}).weights == {term: 0.5}
    # the class default is copied, never shared with an instance
    objective = BLSPObjective()
    objective.weights["response_ce"] = 2.0
    assert BLSPObjective().weights == {"response_ce": 1.0}


def test_objective_refuses_missing_and_non_scalar_terms():
    objective = Toy(
        {"input_kl": 1.0, "cif": 1.0},
        terms={"input_kl": torch.tensor(1.0)},
    )
    with pytest.raises(ValueError, match=r"\['cif'\].*not computed"):
        objective(None, None, TRAIN)
    vector = Toy({"cif": 1.0}, terms={"cif": torch.ones(2)})
    with pytest.raises(ValueError, match="scalar tensor"):
        vector(None, None, TRAIN)
    not_tensor = Toy({"cif": 1.0}, terms={"cif": lambda: 1.0})
    with pytest.raises(ValueError, match="scalar tensor"):
        not_tensor(None, None, TRAIN)


def test_objective_metrics_only_outside_training():
    objective = Toy(
        {"cif": 1.0},
        terms={"cif": torch.tensor(0.5), "input_kl": boom("input_kl")},
        metrics={
            "acc": lambda: torch.tensor(0.75),
            "cif": boom("the weighted cif again"),  # not redone
            "count": 3,
        },
    )
    _, stats = objective(None, None, TRAIN)
    assert stats == {"cif": 0.5, "loss": 0.5}
    _, stats = objective(None, None, None)
    assert stats == {"cif": 0.5, "loss": 0.5}
    for stage in (VALID, TEST):
        _, stats = objective(None, None, stage)
        assert stats == {"cif": 0.5, "loss": 0.5, "acc": 0.75, "count": 3.0}


# ----------------------------------------------------------------------
# BLSP-KD: what it asks the model for
def test_blspkd_request_per_stage():
    align = BLSPKDObjective({"align": 1.0, "cif": 1.0})
    assert align.request(TRAIN) == PassRequest()
    assert not align.request(TRAIN).runs_llm
    for stage in (VALID, TEST):
        req = align.request(stage)
        assert req.teacher and req.student and req.response
        assert set(req.logits) == {"input", "response"}
    quiet = BLSPKDObjective({"align": 1.0, "cif": 1.0}, eval_kl=False)
    assert not quiet.request(VALID).runs_llm
    kd = BLSPKDObjective(ALL_KL)
    for stage in (TRAIN, VALID):
        req = kd.request(stage)
        assert req.teacher and req.student
        assert set(req.logits) == {"input", "response"}
    ce = BLSPKDObjective({"response_ce": 1.0}, eval_kl=False)
    req = ce.request(TRAIN)
    assert req.student and not req.teacher and req.logits == ("response",)
    assert BLSPKDObjective({"response_kl": 1.0}).request(TRAIN).teacher
    with pytest.raises(ValueError, match="unknown loss weight"):
        BLSPKDObjective({"kl": 1.0})
    with pytest.raises(ValueError, match="temperatures"):
        BLSPKDObjective(temperature=0.0)
    with pytest.raises(ValueError, match="temperatures"):
        BLSPKDObjective(align_temperature=-1.0)


def test_align_only_runs_no_llm_pass_in_train_but_kl_in_valid(model):
    objective = BLSPKDObjective({"align": 1.0, "cif": 1.0}, eval_kl=True)
    with count_llm_calls(model) as calls:
        out, (loss, stats) = run(model, objective, TRAIN)
    assert calls == []
    assert out.teacher is None and out.student is None
    assert set(stats) == {"align", "cif", "loss"}
    assert loss.requires_grad
    with count_llm_calls(model) as calls:
        out, (_, stats) = run(model, objective, VALID)
    assert len(calls) == 2  # teacher and student
    assert out.teacher is not None and out.student is not None
    assert {"input_kl", "response_kl", "token_acc"} <= set(stats)
    assert stats["input_kl"] > 0 and stats["response_kl"] > 0
    quiet = BLSPKDObjective({"align": 1.0, "cif": 1.0}, eval_kl=False)
    with count_llm_calls(model) as calls:
        _, (_, stats) = run(model, quiet, VALID)
    assert calls == []
    assert set(stats) == {"align", "cif", "loss", "token_acc", "token_acc_pred"}
    assert 0.0 <= stats["token_acc_pred"] <= 1.0


# ----------------------------------------------------------------------
# BLSP-KD: the terms
def test_blspkd_terms_are_the_loss_functions(model):
    weights = {**ALL_KL, "response_ce": 1.0, "align": 1.0}
    objective = BLSPKDObjective(weights, temperature=3.0)
    out, (loss, stats) = run(model, objective, TRAIN)
    s, t = out.student, out.teacher
    want = {
        "input_kl": kd_kl(
            s.logits["input"], t.logits["input"], t.masks["input"], 3.0
        ),
        "response_kl": kd_kl(
            s.logits["response"], t.logits["response"], t.masks["response"], 3.0
        ),
        "response_ce": response_ce(
            s.logits["response"], s.response_targets, s.masks["response"]
        ),
        "cif": quantity_loss(
            out.adapter.alphas, out.adapter.frame_mask, out.targets.num_tokens
        ),
        "align": alignment.alignment_loss(
            model, out.adapter, out.transcript_ids, 0.05
        )[0],
    }
    want = {term: float(value.detach()) for term, value in want.items()}
    for term, value in want.items():
        assert stats[term] == pytest.approx(value, rel=1e-5), term
        assert value > 0, term
    assert float(loss.detach()) == pytest.approx(sum(want.values()), 1e-5)
    # scale_by_t2 multiplies the KL terms only
    scaled = BLSPKDObjective(weights, temperature=3.0, scale_by_t2=True)
    _, stats2 = scaled(out, model, TRAIN)
    for term in ("input_kl", "response_kl"):
        assert stats2[term] == pytest.approx(9 * stats[term], rel=1e-5)
    for term in ("response_ce", "cif", "align"):
        assert stats2[term] == pytest.approx(stats[term], rel=1e-5)
    # the temperature reaches the KL
    _, stats1 = BLSPKDObjective(weights, temperature=1.0)(out, model, TRAIN)
    assert stats1["input_kl"] != pytest.approx(stats["input_kl"], rel=1e-3)


def test_zero_weight_terms_are_never_computed(model, monkeypatch):
    def no_alignment(*args, **kwargs):
        raise AssertionError("alignment_loss was computed")

    monkeypatch.setattr(blsp_kd, "alignment_loss", no_alignment)
    objective = BLSPKDObjective({"response_kl": 1.0, "cif": 1.0, "align": 0})
    spans = []
    kl = objective._kl
    objective._kl = lambda outputs, span: (
        spans.append(span) or kl(outputs, span)
    )
    _, (_, stats) = run(model, objective, TRAIN)
    assert spans == ["response"]  # input_kl has weight 0
    assert set(stats) == {"response_kl", "cif", "loss"}
    # the patch is effective: a weighted align term does call it
    weighted = BLSPKDObjective({"cif": 1.0, "align": 1.0})
    with pytest.raises(AssertionError, match="alignment_loss"):
        run(model, weighted, TRAIN)
    # in validation a weighted KL term is not computed again as a metric
    spans.clear()
    _, (_, stats) = run(model, objective, VALID)
    assert sorted(spans) == ["input", "response"]  # input_kl: the metric
    assert {"response_kl", "input_kl", "token_acc"} <= set(stats)


def test_valid_stats_include_token_acc(model):
    objective = BLSPKDObjective(ALL_KL)
    out, (_, stats) = run(model, objective, VALID)
    want = alignment.nearest_token_accuracy(
        model, out.adapter, out.transcript_ids
    )
    assert stats["token_acc"] == pytest.approx(want)
    assert 0.0 <= stats["token_acc"] <= 1.0
    assert set(stats) == {
        "input_kl",
        "response_kl",
        "cif",
        "loss",
        "token_acc",
        "token_acc_pred",
    }
    # at the predicted count: the adapter's own count, positions not
    # re-aligned (metrics.positional_token_accuracy)
    model.eval()
    free = model.adapter(out.feats, lengths=out.feat_lens)
    table, _ = model.embedding_table(free.tokens.device)
    near = (
        torch.nn.functional.normalize(free.tokens.float(), dim=-1) @ table.T
    ).argmax(-1)
    correct = positions = 0
    for b in range(len(near)):
        guess = near[b][free.token_mask[b]].tolist()
        truth = out.transcript_ids[b][out.transcript_mask[b]].tolist()
        correct += sum(g == t for g, t in zip(guess, truth))
        positions += max(len(guess), len(truth))
    assert stats["token_acc_pred"] == pytest.approx(correct / positions)
    _, (_, train_stats) = run(model, objective, TRAIN)
    assert "token_acc" not in train_stats


def test_kl_is_zero_when_the_student_sees_the_transcript():
    """End to end: with no PLoRA and the transcript's own embeddings as the
    adapter output, student and teacher agree at every selected position;
    with the (random) adapter's output they do not."""
    torch.manual_seed(0)
    model = tiny_speech_llm(whisper=False, plora=None, instruction="Say:")
    objective = BLSPKDObjective({"input_kl": 1.0, "response_kl": 1.0})
    request = objective.request(TRAIN)
    feats = torch.randn(3, 40, 64)
    out = model(TRANSCRIPTS, CONTINUATIONS, feats=feats, request=request)
    _, stats = objective(out, model, TRAIN)
    assert stats["input_kl"] > 1e-3 and stats["response_kl"] > 1e-3
    mask = out.transcript_mask
    true = AdapterOutput(model.embed_tokens(out.transcript_ids), mask)
    student = model.student_pass(true, CONTINUATIONS, request=request)
    same = SpeechLLMOutput(
        adapter=true,
        targets=out.targets,
        transcript_ids=out.transcript_ids,
        transcript_mask=mask,
        teacher=out.teacher,
        student=student,
    )
    loss, stats = objective(same, model, TRAIN)
    assert stats["input_kl"] < 1e-6 and stats["response_kl"] < 1e-6
    # and a perfect adapter has a nearest-token accuracy of 1
    assert alignment.nearest_token_accuracy(
        model, true, out.transcript_ids
    ) == pytest.approx(1.0)


# ----------------------------------------------------------------------
# BLSP-KD with an adapter that is not aligned to the transcript
def qformer_model():
    torch.manual_seed(0)
    adapter = QFormer(
        64, 64, num_queries=3, num_layers=1, num_heads=4, ffn_size=128
    )
    return tiny_speech_llm(adapter=adapter, instruction="Repeat:")


def test_input_kl_needs_one_embedding_per_transcript_token():
    model = qformer_model()
    n = [len(x) for x in model.transcript_ids(TRANSCRIPTS)]
    assert max(n) != 3
    objective = BLSPKDObjective({"input_kl": 1.0, "response_kl": 1.0})
    with pytest.raises(ValueError, match="as many speech embeddings"):
        run(model, objective, TRAIN)
    # response_kl needs no alignment: it works with any adapter
    response = BLSPKDObjective({"response_kl": 1.0}, eval_kl=False)
    out, (loss, stats) = run(model, response, TRAIN)
    assert out.student.masks["input"].sum(1).tolist() == [3, 3, 3]
    assert math.isfinite(stats["response_kl"]) and stats["response_kl"] > 0
    loss.backward()
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0
        for p in model.adapter.parameters()
    )


def test_input_kl_refuses_per_row_count_mismatch_of_equal_width():
    model = qformer_model()
    transcripts = ["the cat", "a dog"]  # N = 3 and 2; the QFormer emits 3
    n = [len(x) for x in model.transcript_ids(transcripts)]
    assert n == [3, 2]
    objective = BLSPKDObjective({"input_kl": 1.0})
    try:
        run(model, objective, TRAIN, transcripts=transcripts)
    except ValueError as error:
        assert "speech embeddings" in str(error)
    else:
        raise AssertionError(
            "input_kl accepted 3 speech embeddings for 2 tokens"
        )


# ----------------------------------------------------------------------
# training with the objective
def test_alignment_stage_training_reduces_the_loss():
    torch.manual_seed(0)
    model = tiny_speech_llm(whisper=False)
    model.train()
    objective = BLSPKDObjective({"align": 1.0, "cif": 1.0})
    request = objective.request(TRAIN)
    feats = torch.randn(3, 40, 64)
    feat_lens = torch.tensor([1.0, 0.6, 0.8])
    opt = torch.optim.Adam(model.trainable_parameters(), lr=3e-3)
    losses = []
    with count_llm_calls(model) as calls:
        for _ in range(10):
            out = model(
                TRANSCRIPTS,
                feats=feats,
                feat_lens=feat_lens,
                request=request,
            )
            loss, _ = objective(out, model, TRAIN)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    assert calls == []
    assert losses[-1] < losses[0], losses
    plora = [p for n, p in model.llm.named_parameters() if "lora_" in n]
    assert plora and all(p.grad is None for p in plora)  # no LLM pass


def test_non_cif_adapter_reports_only_what_applies():
    """A Q-Former (L embeddings, not one per token) in validation: the
    response KL is reported, the input KL and token accuracy are not (they
    would compare unrelated positions), and nothing raises."""
    from speechbrain_blspkd.nnet.qformer import QFormer

    torch.manual_seed(0)
    model = tiny_speech_llm(
        adapter=QFormer(
            64, 64, num_queries=3, num_layers=1, num_heads=4, ffn_size=128
        )
    )
    objective = BLSPKDObjective({"response_kl": 1.0})
    out = model(
        ["the cat sat on the mat", "a dog"],
        ["yes.", "no."],
        wavs=torch.randn(2, 8000) * 0.1,
        request=objective.request(sb.Stage.VALID),
    )
    _, stats = objective(out, model, sb.Stage.VALID)
    assert "response_kl" in stats
    assert "input_kl" not in stats and "token_acc" not in stats


def test_diva_input_target_is_what_a_scaled_embedding_feeds_the_llm():
    # Gemma-style LLMs scale their embeddings inside the embedding module
    # (embed_scale applied in its forward): L_IN's target is that output,
    # never scaled a second time, so speech tokens equal to the stretched
    # input embeddings cost nothing
    import speechbrain as sb

    from speechbrain_blspkd.nnet.qformer import QFormer
    from speechbrain_blspkd.objectives import DiVAObjective
    from speechbrain_blspkd.objectives.diva import stretch
    from speechbrain_blspkd.testing import tiny_speech_llm

    class ScaledEmbedding(torch.nn.Embedding):
        def __init__(self, weight, scale):
            super().__init__(*weight.shape)
            self.weight = weight
            self.embed_scale = torch.tensor(scale)

        def forward(self, ids):
            return super().forward(ids) * self.embed_scale

    torch.manual_seed(0)
    model = tiny_speech_llm(
        plora=None,
        adapter=QFormer(64, 64, num_queries=5, num_layers=1, num_heads=4),
    )
    old = model.llm.get_input_embeddings()
    model.llm.set_input_embeddings(ScaledEmbedding(old.weight, 4.0))
    objective = DiVAObjective({"l_in": 1.0})
    out = model(
        ["the cat sat"],
        feats=torch.randn(1, 12, 64),
        request=objective.request(sb.Stage.VALID),
    )
    with torch.no_grad():
        fed = model.embed_tokens(out.transcript_ids).float()
        out.adapter.tokens = stretch(fed, out.transcript_mask, 5)
    assert float(DiVAObjective.input_loss(out, model)) < 1e-10
    # the unscaled table is not the target
    with torch.no_grad():
        out.adapter.tokens = out.adapter.tokens / 4.0
    assert float(DiVAObjective.input_loss(out, model)) > 0.1


def test_predicted_count_batches_distil_the_response_only(model):
    """predicted_count_fraction 1: every training batch fires the adapter's
    own count (as inference does); the input KL and the alignment term
    are left out, the response KL and the quantity loss stay; validation
    is untouched."""
    objective = BLSPKDObjective(
        {"input_kl": 1.0, "response_kl": 1.0, "cif": 1.0, "align": 0.3},
        predicted_count_fraction=1.0,
    )
    request = objective.request(TRAIN)
    assert request.predicted_count and request.logits == ("response",)
    model.train()
    out, (loss, stats) = run(model, objective, TRAIN)
    free = model.adapter(out.feats, lengths=out.feat_lens)
    assert out.adapter.token_counts.tolist() == free.token_counts.tolist()
    assert set(stats) == {"response_kl", "cif", "loss"}
    assert loss.requires_grad
    assert not objective.request(VALID).predicted_count
    _, (_, valid) = run(model, objective, VALID)
    assert {"input_kl", "align"} <= set(valid)
    never = BLSPKDObjective(ALL_KL, predicted_count_fraction=0.0)
    assert not any(never.request(TRAIN).predicted_count for _ in range(20))
    with pytest.raises(ValueError, match="response term"):
        BLSPKDObjective(
            {"align": 1.0, "cif": 1.0}, predicted_count_fraction=0.5
        )


def test_alignment_loss_sampled_equals_full_when_every_token_is_drawn():
    from speechbrain_blspkd.nnet.adapter import AdapterTargets

    torch.manual_seed(0)
    model = tiny_speech_llm(whisper=False)
    out = model.adapter(
        torch.randn(2, 20, 64), targets=AdapterTargets(torch.tensor([3, 2]))
    )
    ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    mask = torch.tensor([[True] * 3, [True, True, False]])
    vocab = model.embed_tokens.weight.shape[0]
    full, _ = alignment.alignment_loss(model, out, ids, transcript_mask=mask)
    same, _ = alignment.alignment_loss(
        model, out, ids, transcript_mask=mask, negatives=vocab
    )
    fewer, _ = alignment.alignment_loss(
        model, out, ids, transcript_mask=mask, negatives=3
    )
    assert torch.allclose(full, same, atol=1e-5)
    assert float(fewer.detach()) < float(full.detach())  # fewer competitors
