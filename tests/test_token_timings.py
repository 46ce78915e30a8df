"""Token timings (dataprep/token_timings.py) and what the CIF does with
them (nnet/cif.py span_weights / timing_loss, the CFormer's scheduled
forcing and weight predictors, the objective's timing term)."""

import itertools
import statistics

import pytest
import torch

from speechbrain_blspkd.dataprep.feature_cache import FeatureCache
from speechbrain_blspkd.dataprep.token_timings import (
    StaleTokenTimingsError,
    TokenTimingCache,
    timing_items,
    write_token_timings,
)
from speechbrain_blspkd.nnet.adapter import AdapterTargets
from speechbrain_blspkd.nnet.cformer import CFormer
from speechbrain_blspkd.nnet.cif import (
    boundary_error,
    cif,
    fire_positions,
    scale_alphas,
    span_weights,
    timing_loss,
)
from speechbrain_blspkd.nnet.token_alignment import (
    dtw_path,
    llm_token_times,
    row_times,
)
from speechbrain_blspkd.nnet.whisper_decoder import WhisperDecoderTeacher


def _monotone_paths(rows, cols):
    """Every path from (0, 0) to (rows-1, cols-1) with steps of one row,
    one column or both (brute force, tiny sizes only)."""

    def walk(i, j):
        if (i, j) == (rows - 1, cols - 1):
            yield [(i, j)]
            return
        for di, dj in ((1, 1), (1, 0), (0, 1)):
            a, b = i + di, j + dj
            if a < rows and b < cols:
                for rest in walk(a, b):
                    yield [(i, j)] + rest

    yield from walk(0, 0)


def test_dtw_path_is_the_cheapest_monotone_path():
    g = torch.Generator().manual_seed(3)
    for rows, cols in ((2, 3), (3, 4), (4, 5)):
        cost = torch.rand(rows, cols, generator=g)
        got_rows, got_cols = dtw_path(cost)
        path = list(zip(got_rows, got_cols))
        assert path[0] == (0, 0) and path[-1] == (rows - 1, cols - 1)
        for (a, b), (c, d) in itertools.pairwise(path):
            assert (c - a, d - b) in ((1, 1), (1, 0), (0, 1))
        best = min(
            sum(float(cost[i, j]) for i, j in p)
            for p in _monotone_paths(rows, cols)
        )
        got = sum(float(cost[i, j]) for i, j in path)
        assert got == pytest.approx(best)


def test_row_times_lie_between_a_rows_first_frame_and_its_peak():
    matrix = torch.tensor(
        [
            [4.0, 3.0, 0.0, 0.0, 0.0, 0.0],
            [0.0, 1.0, 1.0, 5.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 1.0, 1.0, 6.0],
        ]
    )
    times = row_times(matrix, *dtw_path(-matrix))
    assert times[0] == 0 and 1 <= times[1] <= 3 and 4 <= times[2] <= 5
    assert times == sorted(times)


def test_llm_token_times_follow_characters_and_skip_spaces():
    # " the cat": Whisper " the" (0.0 s) + " cat" (1.0 s), end 2.0 s;
    # LLM " th" + "e" + " c" + "at"
    text = "the cat"
    whisper = [(-1, 3), (3, 7)]
    llm = [(-1, 2), (2, 3), (3, 5), (5, 7)]
    times = llm_token_times(whisper, [0.0, 1.0], 2.0, llm, text=text)
    starts = [s for s, _ in times]
    assert starts == sorted(starts)
    assert times[-1][1] == 2.0
    # " c" starts at "c" (a quarter into " cat"), not at its space
    assert times[2][0] == pytest.approx(1.25)
    # without the text the space's own time is used
    plain = llm_token_times(whisper, [0.0, 1.0], 2.0, llm)
    assert plain[2][0] == pytest.approx(1.0)
    for (_, end), (start, _) in itertools.pairwise(times):
        assert end == start


def test_span_weights_fire_each_token_where_its_span_ends():
    spans = torch.tensor(
        [
            [[0.0, 0.2], [0.2, 0.5], [0.5, 0.6]],
            [[0.1, 0.3], [0.3, 0.4], [-1.0, -1.0]],
        ]
    )
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 6:] = False
    weights, token_mask = span_weights(spans, mask, frame_rate=10.0)
    assert token_mask.sum(1).tolist() == [3, 2]
    assert weights.sum(1).tolist() == pytest.approx([3.0, 2.0])
    assert float(weights[1, 6:].abs().sum()) == 0.0
    # token k fires in the frame where its span ends (end - 1 frame)
    fired = fire_positions(weights, tolerance=1e-4)
    assert fired[0].tolist() == [1, 4, 5]
    assert fired[1].tolist()[:2] == [2, 3]


def test_timing_loss_is_zero_at_the_target_and_grows_with_the_shift():
    target = torch.tensor([[0.0, 0.5, 0.5, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0]])
    assert float(timing_loss(target.clone(), target)) == 0.0

    def later(k):  # every token fires k frames later
        return torch.nn.functional.pad(target, (k, 0))[:, : target.shape[1]]

    one = timing_loss(later(1), target)
    two = timing_loss(later(2), target)
    assert float(one) == pytest.approx(1.0) and float(two) == pytest.approx(2.0)
    assert 0 < float(one) < float(two)
    # a missing token is penalised too (the running sums never meet)
    fewer = target.clone()
    fewer[0, 6] = 0.0
    assert float(timing_loss(fewer, target)) > 0
    # the gradient lowers the loss
    alphas = torch.full_like(target, 0.3, requires_grad=True)
    loss = timing_loss(alphas, target)
    loss.backward()
    with torch.no_grad():
        stepped = alphas - 0.05 * alphas.grad
    assert float(timing_loss(stepped, target)) < float(loss)


def test_boundary_error_is_zero_for_the_target_and_counts_shifts():
    target = torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.0]])
    count = torch.tensor([2])
    assert boundary_error(target, target, count, 25.0) == 0.0
    late = torch.tensor([[0.0, 0.0, 1.0, 0.0, 1.0]])
    assert boundary_error(late, target, count, 25.0) == pytest.approx(40.0)


def _spans_for(counts, frames, rate):
    """Evenly spaced spans for each row (seconds), -1 padded."""
    width = max(counts)
    out = torch.full((len(counts), width, 2), -1.0)
    for b, n in enumerate(counts):
        edges = torch.linspace(0, frames / rate, n + 1)
        out[b, :n, 0], out[b, :n, 1] = edges[:-1], edges[1:]
    return out


def test_cformer_forcing_switches_on_schedule():
    torch.manual_seed(0)
    model = CFormer(
        16,
        8,
        n_pre=1,
        n_post=0,
        nhead=2,
        d_ffn=32,
        dropout=0.0,
        forcing_until=0.5,
    )
    feats = torch.randn(2, 20, 16)
    counts = torch.tensor([4, 3])
    spans = _spans_for([4, 3], 20, 50.0)
    targets = AdapterTargets(num_tokens=counts, token_spans=spans)
    model.train()
    model.set_training_progress(0.2)
    early = model(feats, targets=targets)
    assert early.forced and early.target_alphas is not None
    model.set_training_progress(0.6)
    late = model(feats, targets=targets)
    assert not late.forced
    model.eval()
    model.set_training_progress(0.0)
    assert not model(feats, targets=targets).forced
    # forced tokens are the target-weighted sums, not the predicted ones
    assert not torch.allclose(early.tokens, late.tokens)
    model.train()
    model.set_training_progress(0.2)
    forced_again = model(feats, targets=targets)
    normed = model.norm(model.pre_layers[0](feats))[..., :-1]
    expected, _ = cif(normed, scale_alphas(early.target_alphas, counts), counts)
    y = model.out_proj(model.post_norm(model.token_proj(expected)))
    mask = forced_again.token_mask
    assert torch.allclose(forced_again.tokens[mask], y[mask], atol=1e-5)
    # no timings: never forced
    model.set_training_progress(0.0)
    assert not model(feats, targets=AdapterTargets(num_tokens=counts)).forced


@pytest.mark.parametrize("predictor", ["conv", "rnn"])
def test_weight_predictors_ignore_the_batch_padding(predictor):
    torch.manual_seed(1)
    model = CFormer(
        16,
        8,
        n_pre=0,
        n_post=1,
        nhead=2,
        d_ffn=32,
        dropout=0.0,
        weight_predictor=predictor,
        predictor_hidden=12,
        weight_bias_init=-1.0,
    ).eval()
    feats = torch.randn(2, 24, 16)
    lengths = torch.tensor([1.0, 0.5])
    both = model(feats, lengths=lengths, num_tokens=torch.tensor([3, 2]))
    alone = model(feats[1:, :12], num_tokens=torch.tensor([2]))
    assert torch.allclose(both.alphas[1, :12], alone.alphas[0], atol=1e-5)
    assert float(both.alphas[1, 12:].abs().sum()) == 0.0
    assert torch.allclose(both.tokens[1, :2], alone.tokens[0, :2], atol=1e-4)
    # every channel is integrated (none reserved for the weights)
    assert model.token_proj.in_features == 16


def test_objective_timing_term_needs_timings_in_training():
    import speechbrain as sb

    from speechbrain_blspkd.objectives import BLSPKDObjective
    from speechbrain_blspkd.testing import tiny_speech_llm

    torch.manual_seed(0)
    model = tiny_speech_llm()
    objective = BLSPKDObjective({"align": 1.0, "cif": 1.0, "timing": 1.0})
    wavs = torch.randn(2, 16000)
    transcripts = ["the cat sat", "a dog"]
    counts = [len(i) for i in model.transcript_ids(transcripts)]
    frames = model.speech_features(wavs, None, None, None)[0].shape[1]
    spans = _spans_for(counts, frames, 50.0)
    out = model(transcripts, wavs=wavs, token_spans=spans)
    loss, stats = objective(out, model, sb.Stage.TRAIN)
    assert stats["timing"] > 0 and torch.isfinite(loss)
    with pytest.raises(ValueError, match="token_timings_folder"):
        objective(model(transcripts, wavs=wavs), model, sb.Stage.TRAIN)
    # validation without timings leaves the term out
    _, stats = objective(model(transcripts, wavs=wavs), model, sb.Stage.VALID)
    assert "timing" not in stats
    # a span count that is not the transcript's is refused
    with pytest.raises(ValueError, match="spans for transcripts"):
        model(transcripts, wavs=wavs, token_spans=spans[:, :1])


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from speechbrain_blspkd.testing import tiny_saved_speech_llm

    folder = tmp_path_factory.mktemp("tiny_timings")
    model = tiny_saved_speech_llm(folder)
    return folder, model


def test_cache_writes_resumes_and_refuses_other_settings(tiny_folder, tmp_path):
    folder, model = tiny_folder
    features = FeatureCache(tmp_path / "feats", "enc")
    rows = []
    for i, text in enumerate(["the cat sat", "a dog ran far away", "hi"]):
        features.put(f"u{i}", torch.randn(15 + 5 * i, 64))
        rows.append(dict(ID=f"u{i}", transcript=text, language="en"))
    teacher = WhisperDecoderTeacher(folder / "whisper")
    info = write_token_timings(
        rows[:2], features, tmp_path / "t", teacher, model.prompts
    )
    assert info["written"] == 2
    info = write_token_timings(
        rows, features, tmp_path / "t", teacher, model.prompts
    )
    assert (info["written"], info["skipped"]) == (1, 2)
    cache = TokenTimingCache(tmp_path / "t", {"features": "enc"})
    for row in rows:
        spans = cache.get(row["ID"])
        n = len(model.transcript_ids([row["transcript"]])[0])
        assert spans.shape == (n, 2)
        assert bool((spans[:, 1] >= spans[:, 0]).all())
        frames = features.get(row["ID"]).shape[0]
        assert float(spans.max()) <= frames / 50.0 + 1e-3
    with pytest.raises(StaleTokenTimingsError, match="features"):
        TokenTimingCache(tmp_path / "t", {"features": "other"})
    with pytest.raises(KeyError, match="not in the feature cache"):
        write_token_timings(
            [dict(ID="zz", transcript="x y", language="en")],
            features,
            tmp_path / "t",
            teacher,
            model.prompts,
        )


def test_timing_item_names_a_row_whose_transcript_changed(
    tiny_folder, tmp_path
):
    from speechbrain_blspkd.dataprep.feature_cache import feature_checksum
    from speechbrain_blspkd.dataprep.token_timings import _settings

    folder, model = tiny_folder
    settings = _settings(
        feature_checksum(model.encoder),
        model.tokenizer,
        model.prompts.transcript_separator,
    )
    cache = TokenTimingCache(tmp_path / "t", settings, create=True)
    cache.put("u1", torch.tensor([[0.0, 0.1], [0.1, 0.2]]))
    item = timing_items(model, tmp_path / "t")
    text = "the cat sat on the mat"
    with pytest.raises(StaleTokenTimingsError, match="'u1'"):
        item.func("u1", text) if hasattr(item, "func") else item("u1", text)
    with pytest.raises(KeyError, match="'u2'"):
        item.func("u2", text) if hasattr(item, "func") else item("u2", text)


# ----------------------------------------------------------------------
# the real Whisper-base on words with known silences between them
SENTENCES = [
    "a quiet river flows under the stone bridge",
    "my brother painted the fence bright yellow",
    "four small boats sailed across the lake",
]


@pytest.mark.slow
def test_word_boundaries_on_words_with_known_silences(real_asset, tmp_path):
    """Separately synthesised words joined by 80 ms of silence: each word's
    first LLM token starts inside the silence before it or within 40 ms of
    it (median over the words after the first), and within 80 ms of its
    onset (median)."""
    import numpy as np
    import soundfile as sf
    from transformers import AutoTokenizer

    from speechbrain_blspkd.dataprep.tts import synthesise
    from speechbrain_blspkd.nnet.token_alignment import (
        llm_token_spans,
        utterance_timings,
    )
    from speechbrain_blspkd.nnet.whisper_encoder import WhisperEncoder
    from speechbrain_blspkd.prompt import PromptBuilder

    whisper = real_asset("whisper-base")
    prompts = PromptBuilder(
        AutoTokenizer.from_pretrained(str(real_asset("smollm2-135m-instruct")))
    )
    encoder = WhisperEncoder(whisper, dtype="float32").eval()
    teacher = WhisperDecoderTeacher(whisper)
    gap, rate = 0.08, 16000
    to_silence, to_onset = [], []
    for s, sentence in enumerate(SENTENCES):
        pieces, onsets, ends, t = [np.zeros(int(0.2 * rate))], [], [], 0.2
        for w, word in enumerate(sentence.split()):
            audio, _ = sf.read(synthesise(word, tmp_path / f"{s}_{w}.wav"))
            loud = np.nonzero(np.abs(audio) > 0.01)[0]
            audio = audio[loud[0] : loud[-1] + 1]
            onsets.append(t)
            t += len(audio) / rate
            ends.append(t)
            pieces += [audio, np.zeros(int(gap * rate))]
            t += gap
        wav = torch.tensor(np.concatenate(pieces), dtype=torch.float32)
        with torch.no_grad():
            feats, lens = encoder(wav[None], torch.tensor([1.0]))
        feats = feats[0, : int(round(float(lens[0]) * feats.shape[1]))]
        row = dict(ID=str(s), transcript=sentence, language="en")
        times = utterance_timings(teacher, prompts, [feats], [row])[0]
        _, spans = llm_token_spans(prompts, sentence)
        starts = [0]
        for _ in sentence.split()[1:]:
            starts.append(sentence.index(" ", starts[-1]) + 1)
        for w in range(1, len(starts)):
            token = next(
                i for i, (a, b) in enumerate(spans) if a <= starts[w] < b
            )
            est = float(times[token, 0])
            to_onset.append(abs(est - onsets[w]))
            to_silence.append(max(0.0, ends[w - 1] - est, est - onsets[w]))
        assert abs(float(times[-1, 1]) - ends[-1]) < 0.15
    assert statistics.median(to_silence) <= 0.040, to_silence
    assert statistics.median(to_onset) <= 0.080, to_onset
