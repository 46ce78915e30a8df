"""Tests of DiVA's Q-Former adapter (Whisper decoder layers over queries)."""

import pytest
import torch

from speechbrain_blspkd.nnet.adapter import AdapterOutput, SpeechAdapter
from speechbrain_blspkd.nnet.qformer import QFormer

D = 16


def tiny(**kwargs):
    args = dict(
        input_size=D,
        output_size=24,
        num_queries=5,
        num_layers=2,
        num_heads=2,
        ffn_size=32,
    )
    args.update(kwargs)
    return QFormer(**args).eval()


@pytest.fixture(scope="module")
def whisper_folder(tmp_path_factory):
    """A tiny random transformers Whisper folder (3 decoder layers)."""
    from transformers import WhisperConfig, WhisperModel

    config = WhisperConfig(
        d_model=D,
        encoder_layers=1,
        encoder_attention_heads=4,
        encoder_ffn_dim=24,
        decoder_layers=3,
        decoder_attention_heads=4,
        decoder_ffn_dim=40,
        max_target_positions=12,
        max_source_positions=30,
        vocab_size=60,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=3,
        num_mel_bins=8,
    )
    torch.manual_seed(1)
    model = WhisperModel(config)
    with torch.no_grad():  # make the positional table non-trivial
        model.decoder.embed_positions.weight.normal_()
        model.decoder.layer_norm.weight.uniform_(0.5, 1.5)
        model.decoder.layer_norm.bias.normal_()
    folder = tmp_path_factory.mktemp("tiny_whisper")
    model.save_pretrained(folder)
    return folder


def test_is_a_speech_adapter():
    adapter = tiny()
    assert isinstance(adapter, SpeechAdapter)
    assert adapter.output_size() == 24
    assert isinstance(adapter(torch.randn(1, 3, D)), AdapterOutput)


@pytest.mark.parametrize("frames", [1, 7, 50])
def test_always_num_queries_tokens(frames):
    adapter = tiny()
    out = adapter(torch.randn(3, frames, D))
    assert out.tokens.shape == (3, 5, 24)
    assert out.token_mask.dtype == torch.bool
    assert out.token_mask.all() and out.token_mask.shape == (3, 5)
    assert out.token_counts.tolist() == [5, 5, 5]


def test_num_queries_is_configurable():
    adapter = tiny(num_queries=9)
    assert adapter.queries.shape == (9, D)
    assert adapter(torch.randn(2, 4, D)).tokens.shape == (2, 9, 24)


def test_queries_start_small():
    adapter = QFormer(32, 8, num_queries=256, num_layers=1, num_heads=4)
    std = float(adapter.queries.detach().std())
    assert 0.017 < std < 0.023
    assert abs(float(adapter.queries.detach().mean())) < 0.005


def test_self_attention_is_not_causal():
    # the first query must see the last one (a causal decoder would not)
    adapter = tiny()
    feats = torch.randn(2, 6, D)
    with torch.no_grad():
        before = adapter(feats).tokens
        adapter.queries[-1] += torch.randn(D)
        after = adapter(feats).tokens
    assert (before[:, 0] - after[:, 0]).abs().max() > 1e-4


def test_tokens_depend_on_the_speech():
    adapter = tiny()
    with torch.no_grad():
        a = adapter(torch.randn(1, 6, D)).tokens
        b = adapter(torch.randn(1, 6, D)).tokens
    assert (a - b).abs().max() > 1e-4


def test_padded_frames_are_ignored():
    adapter = tiny()
    lengths = [11, 3, 1]
    rows = [torch.randn(n, D) for n in lengths]
    total = 14
    batch = torch.randn(3, total, D)
    for i, row in enumerate(rows):
        batch[i, : len(row)] = row
    garbage = batch.clone()
    for i, n in enumerate(lengths):
        garbage[i, n:] = 1e4 * torch.randn(total - n, D)
    relative = torch.tensor(lengths) / total
    with torch.no_grad():
        out = adapter(batch, relative).tokens
        out_garbage = adapter(garbage, relative).tokens
        torch.testing.assert_close(out, out_garbage, atol=1e-5, rtol=0)
        for i, row in enumerate(rows):
            alone = adapter(row[None]).tokens[0]
            torch.testing.assert_close(out[i], alone, atol=1e-5, rtol=0)
        # without the lengths the padding is attended to
        unmasked = adapter(garbage).tokens
    assert (unmasked[1] - out[1]).abs().max() > 1e-3


def test_gradient_reaches_every_parameter():
    adapter = tiny(dropout=0.1).train()
    out = adapter(torch.randn(2, 9, D), torch.tensor([1.0, 0.5]))
    (out.tokens**2).sum().backward()
    for name, param in adapter.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().max() > 0, name


def test_export_hparams_round_trip_random():
    adapter = tiny(num_layers=1)
    args = adapter.export_hparams()
    assert args["init_from"] is None
    assert (args["num_queries"], args["num_heads"], args["ffn_size"]) == (
        5,
        2,
        32,
    )
    rebuilt = QFormer(**args)
    rebuilt.load_state_dict(adapter.state_dict())
    rebuilt.eval()
    feats = torch.randn(2, 7, D)
    lengths = torch.tensor([1.0, 0.6])
    with torch.no_grad():
        assert torch.equal(
            adapter(feats, lengths).tokens, rebuilt(feats, lengths).tokens
        )


def test_init_from_copies_the_decoder(whisper_folder):
    from transformers import WhisperModel

    source = WhisperModel.from_pretrained(str(whisper_folder)).decoder
    # num_heads / ffn_size given here are overridden by the folder's config
    adapter = QFormer(
        D, 24, num_queries=4, num_layers=2, init_from=whisper_folder
    )
    assert (adapter.num_heads, adapter.ffn_size) == (4, 40)
    assert len(adapter.layers) == 2
    for i in range(2):
        ours = adapter.layers[i].state_dict()
        theirs = source.layers[i].state_dict()
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), (i, key)
    assert torch.equal(
        adapter.positions, source.embed_positions.weight[:4].detach()
    )
    assert torch.equal(adapter.layer_norm.weight, source.layer_norm.weight)
    assert torch.equal(adapter.layer_norm.bias, source.layer_norm.bias)


def test_single_query_matches_the_whisper_decoder(whisper_folder):
    # with one query, causal and bidirectional self-attention coincide: the
    # adapter (before its projection) is then Whisper's decoder run on the
    # query as the input embedding
    from transformers import WhisperModel

    source = WhisperModel.from_pretrained(str(whisper_folder)).decoder
    source.layers = source.layers[:2]
    source.eval()
    adapter = QFormer(
        D, D, num_queries=1, num_layers=2, init_from=whisper_folder
    ).eval()
    with torch.no_grad():
        adapter.out_proj.weight.copy_(torch.eye(D))
        adapter.out_proj.bias.zero_()
        feats = torch.randn(2, 9, D)
        ours = adapter(feats).tokens
        theirs = source(
            inputs_embeds=adapter.queries[None].expand(2, -1, -1),
            encoder_hidden_states=feats,
            use_cache=False,
        ).last_hidden_state
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_init_from_export_round_trip(whisper_folder):
    adapter = QFormer(
        D, 24, num_queries=3, num_layers=3, init_from=whisper_folder
    ).eval()
    args = adapter.export_hparams()
    assert args["init_from"] is None
    assert (args["num_heads"], args["ffn_size"]) == (4, 40)
    rebuilt = QFormer(**args)
    rebuilt.load_state_dict(adapter.state_dict())
    rebuilt.eval()
    feats = torch.randn(2, 6, D)
    lengths = torch.tensor([0.5, 1.0])
    with torch.no_grad():
        assert torch.equal(
            adapter(feats, lengths).tokens, rebuilt(feats, lengths).tokens
        )


def test_init_from_checks(whisper_folder, tmp_path):
    with pytest.raises(ValueError, match="d_model"):
        QFormer(8, 4, num_queries=2, num_layers=1, init_from=whisper_folder)
    with pytest.raises(ValueError, match="decoder layers"):
        QFormer(D, 4, num_queries=2, num_layers=4, init_from=whisper_folder)
    with pytest.raises(ValueError, match="positional"):
        QFormer(D, 4, num_queries=13, num_layers=1, init_from=whisper_folder)
    with pytest.raises(FileNotFoundError):
        QFormer(D, 4, init_from=tmp_path)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_heads"):
        QFormer(10, 4, num_heads=3)
    with pytest.raises(ValueError, match="feats"):
        tiny()(torch.randn(1, 4, D + 1))


@pytest.mark.slow
def test_init_from_whisper_base(real_asset):
    from transformers import WhisperForConditionalGeneration

    folder = real_asset("whisper-base")
    adapter = QFormer(512, 576, num_queries=64, num_layers=2, init_from=folder)
    source = WhisperForConditionalGeneration.from_pretrained(str(folder))
    decoder = source.model.decoder
    assert torch.equal(
        adapter.layers[1].encoder_attn.k_proj.weight,
        decoder.layers[1].encoder_attn.k_proj.weight,
    )
    assert torch.equal(adapter.layers[0].fc2.bias, decoder.layers[0].fc2.bias)
    assert torch.equal(adapter.positions, decoder.embed_positions.weight[:64])
    assert torch.equal(adapter.layer_norm.weight, decoder.layer_norm.weight)
    args = adapter.export_hparams()
    assert args["init_from"] is None
    assert (args["num_heads"], args["ffn_size"]) == (8, 2048)
    rebuilt = QFormer(**args)
    rebuilt.load_state_dict(adapter.state_dict())
    adapter.eval()
    rebuilt.eval()
    feats = torch.randn(2, 40, 512)
    lengths = torch.tensor([1.0, 0.3])
    with torch.no_grad():
        out = adapter(feats, lengths)
        assert torch.equal(out.tokens, rebuilt(feats, lengths).tokens)
    assert out.tokens.shape == (2, 64, 576)
    assert torch.isfinite(out.tokens).all()
