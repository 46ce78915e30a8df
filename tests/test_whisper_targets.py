"""Whisper-decoder targets and the Whisper-initialised pre-CIF layers.

* the span rule on hand-built tokens and offsets (a Whisper token over two
  LLM tokens, an LLM token over two Whisper tokens, leading spaces, a span
  no Whisper token covers);
* the decoder pass equals Hugging Face's decoder and does not depend on
  the batch padding;
* the writer stores one target per LLM transcript token, resumes, and
  refuses a folder written for another Whisper or LLM tokenizer (also from
  the command line);
* the ``whisper`` term of BLSPKDObjective through the real data pipeline:
  finite, gradients into the CFormer post layers (not into the output
  projection), zero when the adapter reproduces the targets, clear errors
  naming a missing or stale utterance, absent in validation;
* ``init_pre_from_encoder`` copies the encoder's top layers, also from the
  recipe YAML.
"""

import pathlib
import types

import pytest
import speechbrain as sb
import torch
from speechbrain.dataio.batch import PaddedBatch
from speechbrain.utils.epoch_loop import EpochCounter

from speechbrain_blspkd.brain import dataio_prepare, prepare_features
from speechbrain_blspkd.dataio.manifest import write_manifest
from speechbrain_blspkd.dataprep import whisper_targets as targets_lib
from speechbrain_blspkd.dataprep.feature_cache import StaleCacheError
from speechbrain_blspkd.dataprep.whisper_targets import (
    StaleWhisperTargetsError,
    WhisperDecoderTeacher,
    WhisperTargetCache,
    llm_token_spans,
    prepare_whisper_targets,
    reader_settings,
    span_groups,
    span_pool,
    write_whisper_targets,
)
from speechbrain_blspkd.nnet.cformer import CFormer, init_pre_from_encoder
from speechbrain_blspkd.nnet.whisper_encoder import WhisperEncoder
from speechbrain_blspkd.objectives import BLSPKDObjective
from speechbrain_blspkd.objectives.whisper_target import (
    StoredWhisperTarget,
    WhisperTargetHead,
)
from speechbrain_blspkd.prompt import PromptBuilder
from speechbrain_blspkd.stages import Stage
from speechbrain_blspkd.utils.testing import (
    build_test_tokenizer,
    tiny_brain,
    tiny_saved_speech_llm,
    tiny_speech_llm,
    tiny_whisper_config,
    write_speechlike_wav,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN = sb.Stage.TRAIN
ROWS = [
    ("u0", "the cat sat", "en"),
    ("u1", "a dog ran far", "en"),
    ("u2", "hello world", "de"),
]


# ----------------------------------------------------------------------
# the span rule
def test_span_groups_hand_built():
    # transcript "hello worldwide, ok"; -1 is the separator space
    whisper = [(-1, 5), (5, 11), (11, 15), (15, 16), (16, 17), (17, 19)]
    #          " hello"  " world"  "wide"    ","       " "       "ok"
    llm = [(-1, 3), (3, 5), (5, 15), (15, 16), (16, 19)]
    #      " hel"   "lo"    " worldwide" ","    " ok"
    groups = span_groups(whisper, llm)
    # " hello" serves two LLM tokens; " worldwide" pools two Whisper tokens;
    # " ok" pools Whisper's separate space and "ok"
    assert groups == [[0], [0], [1, 2], [3], [4, 5]]
    states = torch.arange(12.0).reshape(6, 2)
    pooled = span_pool(states, whisper, llm)
    expected = torch.stack(
        [
            states[0],
            states[0],
            (states[1] + states[2]) / 2,
            states[3],
            (states[4] + states[5]) / 2,
        ]
    )
    assert torch.equal(pooled, expected)


def test_span_groups_leading_spaces_and_uncovered_spans():
    # Whisper splits the leading space off, the LLM keeps it on the word
    assert span_groups([(-1, 0), (0, 5)], [(-1, 5)]) == [[0, 1]]
    # and the other way round: both LLM tokens read " hello"
    assert span_groups([(-1, 5)], [(-1, 0), (0, 5)]) == [[0], [0]]
    # an empty span (a token whose offsets were trimmed) takes the Whisper
    # token at its position; beyond the end: the last one
    assert span_groups([(-1, 3), (3, 7)], [(3, 3), (9, 9)]) == [[1], [1]]
    with pytest.raises(ValueError, match="no Whisper token"):
        span_groups([], [(0, 1)])
    with pytest.raises(ValueError, match="one row per Whisper token"):
        span_pool(torch.zeros(3, 2), [(0, 1)], [(0, 1)])


def test_llm_spans_cover_the_transcript():
    prompts = PromptBuilder(build_test_tokenizer(), transcript_separator=" ")
    transcript = "  the quick brown fox, how are you?"
    ids, spans = llm_token_spans(prompts, transcript)
    assert ids == prompts.transcript_ids(transcript)
    text = transcript.strip()
    # contiguous, from the separator (-1) to the end of the text
    assert spans[0][0] == -1 and spans[-1][1] == len(text)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert "".join(text[max(a, 0) : b] for a, b in spans) == text


class _CharTeacher:
    """A fake decoder: one Whisper token per character, and the state at
    decoder position p is the vector (p, 1)."""

    decoder = types.SimpleNamespace(
        embed_positions=types.SimpleNamespace(weight=torch.zeros(64, 2))
    )

    def prefix_ids(self, language):
        return [1, 2, 3, 4]

    def text_spans(self, transcript):
        text = " " + transcript.strip()
        return [7] * len(text), [(c - 1, c) for c in range(len(text))]

    def states(self, feats, frame_counts, ids, id_counts=None):
        position = torch.arange(ids.shape[1], dtype=torch.float32)
        row = torch.stack([position, torch.ones_like(position)], -1)
        return row.expand(ids.shape[0], -1, -1)

    def proj_out(self, states):
        return torch.zeros(states.shape[0], 10)


def test_targets_read_the_state_that_predicts_each_token():
    """Whisper token t (after a 4-token prompt) is predicted at decoder
    position 4 + t - 1; each LLM token averages its characters' states."""
    prompts = PromptBuilder(build_test_tokenizer())
    transcript = "the cat sat"
    targets, _, total = targets_lib.utterance_targets(
        _CharTeacher(),
        prompts,
        [torch.zeros(3, 2)],
        [dict(ID="u", transcript=transcript, language="en")],
        score=True,
    )
    _, llm_spans = llm_token_spans(prompts, transcript)
    assert total == len(transcript) + 1
    # character c (-1: the separator) is Whisper token c + 1, predicted at
    # position 4 - 1 + c + 1 = 4 + c
    expected = [
        [sum(4.0 + c for c in range(a, b)) / (b - a), 1.0] for a, b in llm_spans
    ]
    torch.testing.assert_close(targets[0], torch.tensor(expected))


# ----------------------------------------------------------------------
# the decoder pass
@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bases")
    tiny_saved_speech_llm(folder)
    return folder


def test_decoder_states_match_hf_and_ignore_padding(bases):
    from transformers import WhisperForConditionalGeneration

    teacher = WhisperDecoderTeacher(bases / "whisper")
    hf = WhisperForConditionalGeneration.from_pretrained(
        str(bases / "whisper")
    ).eval()
    torch.manual_seed(0)
    feats = [torch.randn(9, 64), torch.randn(5, 64)]
    ids = [teacher.prefix_ids("en") + [40, 41, 42], teacher.prefix_ids("de")]
    with torch.no_grad():
        ref = hf.model.decoder(
            input_ids=torch.tensor([ids[0]]),
            encoder_hidden_states=feats[0][None],
        ).last_hidden_state
    one = teacher.states(
        feats[0][None], torch.tensor([9]), torch.tensor([ids[0]])
    )
    torch.testing.assert_close(one, ref, rtol=1e-4, atol=1e-5)
    # a batch with padded frames and ids: each row as on its own
    padded = torch.zeros(2, 9, 64)
    padded[0], padded[1, :5] = feats[0], feats[1]
    padded[1, 5:] = 7.0  # garbage padding must not matter
    batch_ids = torch.tensor([ids[0], ids[1] + [0, 0, 0]])
    both = teacher.states(padded, torch.tensor([9, 5]), batch_ids)
    alone = teacher.states(
        feats[1][None], torch.tensor([5]), torch.tensor([ids[1]])
    )
    torch.testing.assert_close(both[0], one[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(both[1, :4], alone[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="no Whisper token"):
        teacher.prefix_ids("xx")


# ----------------------------------------------------------------------
# the writer
def _features(folder, model):
    """A feature cache of the model's encoder for ROWS (random frames)."""
    from speechbrain_blspkd.dataprep.feature_cache import FeatureCache

    cache = FeatureCache(folder, targets_lib.feature_checksum(model.encoder))
    torch.manual_seed(1)
    for k, (uid, _, _) in enumerate(ROWS):
        cache.put(uid, torch.randn(6 + 3 * k, 64))
    return cache


def _rows(rows=ROWS):
    return [
        dict(ID=uid, transcript=text, language=lang, duration=0.5 + 0.1 * k)
        for k, (uid, text, lang) in enumerate(rows)
    ]


def test_writer_pools_resumes_and_is_batch_independent(tmp_path):
    bases = tmp_path / "bases"
    model = tiny_saved_speech_llm(bases)
    features = _features(tmp_path / "feats", model)
    teacher = WhisperDecoderTeacher(bases / "whisper")
    info = write_whisper_targets(
        _rows()[:2],
        features,
        tmp_path / "t",
        teacher,
        model.prompts,
        score=True,
    )
    assert info["written"] == 2 and info["skipped"] == 0
    assert 0.0 <= info["whisper_token_acc"] <= 1.0
    info = write_whisper_targets(
        _rows(), features, tmp_path / "t", teacher, model.prompts, batch_size=3
    )
    assert (info["written"], info["skipped"]) == (1, 2)
    one_by_one = tmp_path / "t1"
    write_whisper_targets(
        _rows(), features, one_by_one, teacher, model.prompts, batch_size=1
    )
    cache = WhisperTargetCache(tmp_path / "t", reader_settings(model))
    single = WhisperTargetCache(one_by_one, reader_settings(model))
    for uid, text, _ in ROWS:
        stored = cache.get(uid)
        assert stored.dtype == torch.float16
        assert stored.shape == (len(model.transcript_ids([text])[0]), 64)
        torch.testing.assert_close(stored, single.get(uid), atol=2e-3, rtol=0)
    # by hand: states predicting each Whisper token, pooled over LLM spans
    text_ids, whisper_spans = teacher.text_spans("a dog ran far")
    prefix = teacher.prefix_ids("en")
    states = teacher.states(
        features.get("u1")[None],
        torch.tensor([features.get("u1").shape[0]]),
        torch.tensor([prefix + text_ids]),
    )[0, len(prefix) - 1 : len(prefix) - 1 + len(text_ids)]
    _, llm_spans = llm_token_spans(model.prompts, "a dog ran far")
    expected = span_pool(states, whisper_spans, llm_spans)
    torch.testing.assert_close(
        cache.get("u1").float(), expected, atol=2e-3, rtol=1e-3
    )


def test_stale_folders_are_refused_or_rebuilt(tmp_path):
    bases = tmp_path / "bases"
    model = tiny_saved_speech_llm(bases)
    features = _features(tmp_path / "feats", model)
    teacher = WhisperDecoderTeacher(bases / "whisper")
    folder = tmp_path / "t"
    write_whisper_targets(_rows(), features, folder, teacher, model.prompts)
    # another LLM tokenizer
    other = PromptBuilder(build_test_tokenizer(vocab_size=280))
    with pytest.raises(StaleWhisperTargetsError, match="llm_tokenizer"):
        write_whisper_targets(_rows(), features, folder, teacher, other)
    # another Whisper (other decoder weights)
    with torch.no_grad():
        teacher.decoder.layer_norm.bias.add_(0.5)
    with pytest.raises(StaleWhisperTargetsError, match="whisper"):
        write_whisper_targets(_rows(), features, folder, teacher, model.prompts)
    info = write_whisper_targets(
        _rows(), features, folder, teacher, model.prompts, overwrite=True
    )
    assert info["written"] == len(ROWS)
    # features of another encoder: refused by the writer and the reader
    stranger = WhisperEncoder(tiny_whisper_config())
    with pytest.raises(StaleCacheError, match="another encoder"):
        write_whisper_targets(
            _rows(), features, folder, teacher, model.prompts, encoder=stranger
        )
    other_model = tiny_speech_llm()  # another (random) Whisper encoder
    with pytest.raises(StaleWhisperTargetsError, match="features"):
        WhisperTargetCache(folder, reader_settings(other_model))
    with pytest.raises(FileNotFoundError, match="whisper_targets"):
        WhisperTargetCache(tmp_path / "nothing", reader_settings(model))
    # a folder with data but no targets.json (e.g. the feature cache)
    with pytest.raises(StaleWhisperTargetsError, match="no targets.json"):
        WhisperTargetCache(tmp_path / "feats", reader_settings(model))


def test_command_line(tmp_path, capsys):
    bases = tmp_path / "bases"
    model = tiny_saved_speech_llm(bases)
    features = _features(tmp_path / "feats", model)
    manifest = tmp_path / "m.csv"
    write_manifest(
        manifest,
        [dict(r, wav="x.wav", speaker="s") for r in _rows()],
    )
    args = [
        str(manifest),
        "--features",
        str(features.folder),
        "--out",
        str(tmp_path / "t"),
        "--whisper",
        str(bases / "whisper"),
        "--llm",
        str(bases / "llm"),
        "--encoder-dtype",
        "float32",
        "--limit",
        "2",
    ]
    assert targets_lib.main(args) == 0
    assert "2 utterances written" in capsys.readouterr().out
    assert targets_lib.main(args[:-2]) == 0
    out = capsys.readouterr().out
    assert "1 utterances written" in out and "2 already there" in out
    assert len(WhisperTargetCache(tmp_path / "t", reader_settings(model))) == 3
    # another LLM: a one-line error, no traceback
    other = tmp_path / "other_llm"
    build_test_tokenizer(vocab_size=280).save_pretrained(other)
    assert targets_lib.main(args[:-6] + ["--llm", str(other)] + args[-4:]) == 1
    assert "llm_tokenizer" in capsys.readouterr().err


# ----------------------------------------------------------------------
# the training term through the data pipeline
def _corpus(folder):
    rows = []
    for k, (uid, text, lang) in enumerate(ROWS):
        seconds = 0.5 + 0.2 * k
        write_speechlike_wav(folder / f"{uid}.wav", seconds, seed=k)
        rows.append(
            dict(
                ID=uid,
                wav=f"$data_root/{uid}.wav",
                duration=seconds,
                transcript=text,
                language=lang,
                speaker="s",
                continuation="",
                truncated="",
            )
        )
    write_manifest(folder / "train.csv", rows)
    return folder / "train.csv"


def _hparams(folder, manifest, objective, model, whisper_folder):
    stage = Stage(
        "align", objective, str(manifest), EpochCounter(1), {}, lr=1e-3
    )
    return dict(
        stages=[stage],
        train_manifest=str(manifest),
        valid_csv=str(manifest),
        test_csv=str(manifest),
        data_root=str(folder),
        sample_rate=16000,
        max_audio_seconds=30,
        sorting="random",
        model=model,
        use_feature_cache=True,
        feature_cache_folder=str(folder / "features"),
        feature_batch_size=2,
        encoder_source=str(whisper_folder),
    )


def _objective(folder, weights=None, target_size=64):
    return BLSPKDObjective(
        weights or {"whisper": 1.0},
        whisper=dict(
            folder=str(folder), input_size=64, target_size=target_size
        ),
    )


def _batch(dataset):
    return PaddedBatch([dataset[i] for i in range(len(dataset))])


def test_whisper_term_through_the_pipeline(tmp_path):
    bases = tmp_path / "bases"
    manifest = _corpus(tmp_path)
    torch.manual_seed(0)
    model = tiny_saved_speech_llm(bases)
    folder = tmp_path / "whisper_targets"
    objective = _objective(folder)
    assert objective.data_keys() == ("whisper_target",)
    assert objective.trainable_parameters() == []  # identity: same widths
    hparams = _hparams(tmp_path, manifest, objective, model, bases / "whisper")
    features = prepare_features(hparams, model.encoder, "cpu")
    assert prepare_whisper_targets(hparams, features) == [folder]
    datasets = dataio_prepare(hparams, feature_cache=features)
    assert "whisper_target" not in datasets["valid"][0]
    brain = tiny_brain(model, hparams["stages"][0], str(tmp_path / "s"))
    batch = _batch(datasets["align"])
    model.zero_grad(set_to_none=True)
    out = brain.compute_forward(batch, TRAIN)
    loss = brain.compute_objectives(out, batch, TRAIN)
    assert torch.isfinite(loss) and 0.0 < float(loss.detach()) < 2.0
    loss.backward()
    adapter = model.adapter
    grad = adapter.post_layers[0].linear1.weight.grad
    assert (
        grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    )
    # the term reads the states before the projection into the LLM space
    assert adapter.out_proj.weight.grad is None
    # validation rows carry no targets: the term is left out, not zero
    model.eval()
    with torch.no_grad():
        valid = _batch(datasets["valid"])
        out = brain.compute_forward(valid, sb.Stage.VALID)
        with pytest.raises(ValueError, match="no weighted term"):
            objective(out, model, sb.Stage.VALID)
        both = _objective(folder, {"whisper": 1.0, "cif": 1.0})
        _, stats = both(out, model, sb.Stage.VALID)
        assert "whisper" not in stats and "cif" in stats
    # a training batch without the item: a clear error
    out.data = {}
    with pytest.raises(ValueError, match="whisper_target"):
        objective(out, model, TRAIN)

    # targets the adapter reproduces exactly (identity map): zero loss
    with torch.no_grad():
        out = brain.compute_forward(batch, TRAIN)
        cache = WhisperTargetCache(folder, reader_settings(model))
        hidden, mask = out.adapter.token_hidden, out.adapter.token_mask
        for b, uid in enumerate(batch.id):
            cache.put(uid, hidden[b][mask[b]])
        batch = _batch(dataio_prepare(hparams, feature_cache=features)["align"])
        out = brain.compute_forward(batch, TRAIN)
        loss, stats = objective(out, model, TRAIN)
    assert abs(stats["whisper"]) < 1e-5  # 1 - cos: round-off either side
    assert (
        float(torch.dist(out.adapter.token_hidden[mask], hidden[mask])) < 1e-5
    )


def test_missing_or_stale_targets_name_the_utterance(tmp_path):
    bases = tmp_path / "bases"
    manifest = _corpus(tmp_path)
    model = tiny_saved_speech_llm(bases)
    folder = tmp_path / "whisper_targets"
    hparams = _hparams(
        tmp_path, manifest, _objective(folder), model, bases / "whisper"
    )
    features = prepare_features(hparams, model.encoder, "cpu")
    with pytest.raises(FileNotFoundError, match="no Whisper targets"):
        dataio_prepare(hparams, feature_cache=features)
    prepare_whisper_targets(hparams, features)
    cache = WhisperTargetCache(folder, reader_settings(model))
    cache.path("u1").unlink()
    with pytest.raises(KeyError, match="u1"):
        dataio_prepare(hparams, feature_cache=features)
    prepare_whisper_targets(hparams, features)  # resumes: writes u1 only
    # a transcript edited since the targets were written
    rows = (
        (tmp_path / "train.csv")
        .read_text()
        .replace("a dog ran far", "a dog ran far away from the cat")
    )
    (tmp_path / "train.csv").write_text(rows)
    datasets = dataio_prepare(hparams, feature_cache=features)
    index = datasets["align"].data_ids.index("u1")
    with pytest.raises(ValueError, match="'u1'.*transcript changed"):
        datasets["align"][index]
    # stored targets that do not match the emitted count
    head = WhisperTargetHead(64, 64)
    with pytest.raises(ValueError, match="'u9'"):
        head.loss(
            torch.zeros(1, 3, 64),
            torch.ones(1, 3, dtype=torch.bool),
            [StoredWhisperTarget("u9", torch.zeros(2, 64))],
        )


def test_linear_map_and_mse():
    torch.manual_seed(0)
    head = WhisperTargetHead(32, 64, mse_weight=1.0)
    assert head.trainable()
    hidden = torch.randn(2, 4, 32, requires_grad=True)
    mask = torch.tensor([[True] * 4, [True, True, False, False]])
    rows = [
        StoredWhisperTarget("a", torch.randn(4, 64).half()),
        StoredWhisperTarget("b", torch.randn(2, 64).half()),
    ]
    loss = head.loss(hidden, mask, rows)
    cos_only = WhisperTargetHead(32, 64)
    cos_only.load_state_dict(head.state_dict())
    cos = cos_only.loss(hidden, mask, rows)
    assert float(loss.detach()) > float(cos.detach()) > 0
    loss.backward()
    assert head.proj.weight.grad.abs().sum() > 0
    assert hidden.grad[1, 2:].abs().sum() == 0  # padding gets nothing
    # the objective trains and checkpoints the map
    objective = BLSPKDObjective(
        {"whisper": 1.0},
        whisper=dict(folder="x", input_size=32, target_size=64),
    )
    assert len(objective.trainable_parameters()) == 2
    with pytest.raises(ValueError, match="whisper` settings"):
        BLSPKDObjective({"whisper": 1.0})
    assert (
        BLSPKDObjective({"align": 1.0}, whisper={"folder": "x"}).data_keys()
        == ()
    )


# ----------------------------------------------------------------------
# Whisper-initialised pre-CIF layers
def test_init_pre_from_encoder_copies_the_top_layers():
    torch.manual_seed(3)
    encoder = WhisperEncoder(
        tiny_whisper_config(
            encoder_layers=3, dropout=0.0, attention_dropout=0.0
        )
    )
    with torch.no_grad():  # non-trivial layer norms
        for layer in encoder.encoder.layers:
            for norm in (layer.self_attn_layer_norm, layer.final_layer_norm):
                norm.weight.normal_(1.0, 0.2)
                norm.bias.normal_(0.0, 0.2)
    adapter = CFormer(64, 16, n_pre=2, n_post=1, nhead=4, d_ffn=128).eval()
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        before = adapter.pre_layers[0](x)
    assert init_pre_from_encoder(adapter, encoder, enabled=True)
    top = encoder.encoder.layers[1:]  # the top two of three, in order
    with torch.no_grad():
        for copied, source in zip(adapter.pre_layers, top):
            expected = source(x, None)
            expected = expected[0] if isinstance(expected, tuple) else expected
            torch.testing.assert_close(
                copied(x), expected, rtol=1e-4, atol=1e-5
            )
        assert not torch.allclose(adapter.pre_layers[0](x), before)
    assert not init_pre_from_encoder(adapter, encoder, enabled=False)
    with pytest.raises(ValueError, match="pre layers"):
        init_pre_from_encoder(
            CFormer(64, 16, n_pre=4, n_post=0, nhead=4, d_ffn=128), encoder
        )
    with pytest.raises(TypeError, match="WhisperEncoder"):
        init_pre_from_encoder(adapter, torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="attention heads"):
        init_pre_from_encoder(
            CFormer(64, 16, n_pre=1, n_post=0, nhead=8, d_ffn=128), encoder
        )


@pytest.mark.parametrize("enabled", [True, False])
def test_recipe_yaml_wires_both_options(tmp_path, enabled):
    from hyperpyyaml import load_hyperpyyaml
    from transformers import WhisperModel

    bases = tmp_path / "bases"
    tiny_saved_speech_llm(bases)
    whisper = bases / "whisper2048"  # the recipe's CFormer: d_ffn 2048
    torch.manual_seed(4)
    config = tiny_whisper_config(
        encoder_ffn_dim=2048,
        encoder_attention_heads=8,
        decoder_layers=1,
        decoder_attention_heads=4,
        decoder_ffn_dim=64,
    )
    WhisperModel(config).save_pretrained(whisper)
    overrides = dict(
        output_folder=str(tmp_path / "out"),
        data_folder=str(tmp_path / "data"),
        llm_asset=str(bases / "llm"),
        encoder_asset=str(whisper),
        encoder_dim=64,
        llm_dim=64,
        cformer_layers_pre=2,
        init_pre_from_encoder=enabled,
        whisper_target_weight=1.0,
    )
    path = ROOT / "recipes" / "SynthSpeech" / "speech_llm" / "hparams"
    text = (path / "blsp_kd.yaml").read_text()
    hparams = load_hyperpyyaml(text, overrides)
    adapter, encoder = hparams["adapter"], hparams["encoder"]
    layers = encoder.encoder.layers
    same = [
        torch.equal(copied.linear1.weight, source.fc1.weight.float())
        for copied, source in zip(adapter.pre_layers, layers[-2:])
    ]
    assert same == [enabled, enabled]
    objective = hparams["align_objective"]
    assert objective.active("whisper")
    assert objective.whisper_target_folder == hparams["whisper_target_folder"]
    assert targets_lib.wants_whisper_targets(objective)
    assert not targets_lib.wants_whisper_targets(hparams["kd_objective"])
