"""Tests of the CFormer CIF adapter (tiny random models)."""

import os

import pytest
import torch

from speechbrain_blspkd.nnet.cformer import CFormer, CFormerOutput
from speechbrain_blspkd.nnet.cif import quantity_loss

os.environ.setdefault("HF_HUB_OFFLINE", "1")

D_IN, D_OUT = 16, 12


def tiny(**kwargs):
    torch.manual_seed(0)
    options = dict(n_pre=2, n_post=2, nhead=2, d_ffn=32)
    options.update(kwargs)
    return CFormer(D_IN, D_OUT, **options)


def test_shapes_and_target_counts():
    model = tiny()
    hidden = torch.randn(3, 25, D_IN)
    lengths = torch.tensor([1.0, 0.6, 0.2])
    n = torch.tensor([7, 4, 1])
    out = model(hidden, lengths=lengths, num_tokens=n)
    assert isinstance(out, CFormerOutput)
    assert out.tokens.shape == (3, 7, D_OUT)
    assert out.token_mask.dtype == torch.bool
    assert out.token_mask.sum(1).tolist() == [7, 4, 1]
    assert out.num_tokens.tolist() == [7, 4, 1]
    assert out.num_tokens.dtype == torch.long
    assert out.frame_mask.sum(1).tolist() == [25, 15, 5]
    assert out.alphas.shape == (3, 25)
    assert torch.all(out.alphas[~out.frame_mask] == 0)
    assert torch.all(out.alphas[out.frame_mask] > 0)
    assert torch.all(out.alphas <= 1)
    torch.testing.assert_close(out.alpha_sum, out.alphas.sum(1))
    assert torch.all(out.tokens[~out.token_mask] == 0)
    assert torch.isfinite(out.tokens).all()


def test_mask_argument_equals_lengths():
    model = tiny().eval()
    hidden = torch.randn(2, 10, D_IN)
    lengths = torch.tensor([1.0, 0.7])
    mask = torch.arange(10)[None, :] < torch.tensor([[10], [7]])
    n = torch.tensor([3, 2])
    a = model(hidden, lengths=lengths, num_tokens=n)
    b = model(hidden, mask=mask, num_tokens=n)
    torch.testing.assert_close(a.frame_mask, b.frame_mask)
    torch.testing.assert_close(a.tokens, b.tokens)
    with pytest.raises(ValueError, match="not both"):
        model(hidden, lengths=lengths, mask=mask)
    with pytest.raises(ValueError, match="num_tokens"):
        model(hidden, num_tokens=torch.tensor([0, 2]))


def test_relative_lengths_to_frame_mask():
    """Relative lengths -> the first round(length * T) frames, at least one
    (SpeechBrain's length_to_mask through SpeechAdapter.frame_mask)."""
    model = tiny().eval()
    hidden = torch.randn(5, 10, D_IN)
    lengths = torch.tensor([1.0, 0.74, 0.76, 0.01, 0.25])
    mask = model._frame_mask(hidden, lengths, None)
    assert mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [10, 7, 8, 1, 2]  # 2.5 rounds to even
    expected = torch.arange(10)[None, :] < mask.sum(1)[:, None]
    assert torch.equal(mask, expected)  # a prefix of each row
    assert torch.equal(mask, model.frame_mask(hidden, lengths))
    assert model._frame_mask(hidden, None, None).all()
    assert model._frame_mask(hidden, [1.0] * 5, None).all()  # a list


def test_frame_mask_arguments_are_checked():
    model = tiny().eval()
    hidden = torch.randn(2, 10, D_IN)
    with pytest.raises(
        ValueError, match=r"`lengths` must be \(2,\), got \(3,\)"
    ):
        model(hidden, lengths=torch.tensor([1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"`lengths` must be \(2,\)"):
        model(hidden, lengths=torch.ones(2, 1))
    for bad in ([1.0, 0.0], [1.0, -0.5], [1.5, 1.0]):
        with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
            model(hidden, lengths=torch.tensor(bad))
    with pytest.raises(ValueError, match=r"`mask` must be \(2, 10\)"):
        model(hidden, mask=torch.ones(2, 9, dtype=torch.bool))
    no_frame = torch.ones(2, 10, dtype=torch.bool)
    no_frame[1] = False
    with pytest.raises(ValueError, match="every row of `mask` needs a frame"):
        model(hidden, mask=no_frame)


def test_predicted_count_is_rounded_alpha_sum():
    model = tiny().eval()
    hidden = torch.randn(4, 40, D_IN) * 2
    lengths = torch.tensor([1.0, 0.5, 0.1, 0.025])
    with torch.no_grad():
        out = model(hidden, lengths=lengths)
    expected = out.alpha_sum.round().clamp(min=1).long()
    assert out.num_tokens.tolist() == expected.tolist()
    assert out.token_mask.sum(1).tolist() == expected.tolist()
    assert out.num_tokens[3] >= 1  # one frame: sum < 1 still gives a token


def test_padding_invariance():
    model = tiny().eval()
    torch.manual_seed(1)
    hidden = torch.randn(2, 12, D_IN)
    n = torch.tensor([4, 2])
    lengths = torch.tensor([1.0, 0.5])
    with torch.no_grad():
        base = model(hidden, lengths=lengths, num_tokens=n)
        padded_hidden = torch.cat([hidden, torch.randn(2, 8, D_IN)], dim=1)
        padded = model(padded_hidden, lengths=lengths * 12 / 20, num_tokens=n)
        alone = model(hidden[1:, :6], num_tokens=n[1:])
    torch.testing.assert_close(padded.tokens, base.tokens, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(padded.alphas[:, :12], base.alphas)
    torch.testing.assert_close(
        alone.tokens, base.tokens[1:, :2], rtol=1e-4, atol=1e-5
    )


def test_dropout_does_not_touch_weight_channel():
    model = tiny(dropout=0.5)
    hidden = torch.randn(2, 20, D_IN)
    n = torch.tensor([5, 3])
    model.train()
    train_a = model(hidden, num_tokens=n)
    train_b = model(hidden, num_tokens=n)
    model.eval()
    with torch.no_grad():
        evaluated = model(hidden, num_tokens=n)
    # Dropout is active (the tokens differ between two training passes) ...
    assert not torch.allclose(train_a.tokens, train_b.tokens)
    # ... but never reaches the alphas.
    torch.testing.assert_close(train_a.alphas, evaluated.alphas)
    torch.testing.assert_close(train_b.alphas, evaluated.alphas)


def test_pre_dropout_reaches_weight_channel():
    # The ablation switch really is one: pre-layer dropout changes alphas.
    model = tiny(pre_dropout=0.5).train()
    hidden = torch.randn(1, 20, D_IN)
    a = model(hidden, num_tokens=torch.tensor([3])).alphas
    b = model(hidden, num_tokens=torch.tensor([3])).alphas
    assert not torch.allclose(a, b)


def test_gradients_reach_every_parameter():
    model = tiny().train()
    hidden = torch.randn(2, 15, D_IN)
    lengths = torch.tensor([1.0, 0.8])
    n = torch.tensor([4, 3])
    out = model(hidden, lengths=lengths, num_tokens=n)
    loss = out.tokens.pow(2).mean() + quantity_loss(
        out.alphas, out.frame_mask, n
    )
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_quantity_loss_decreases_training_weight_channel_only():
    model = tiny().train()
    for param in model.parameters():
        param.requires_grad_(False)
    model.norm.weight.requires_grad_(True)
    model.norm.bias.requires_grad_(True)
    optimizer = torch.optim.Adam([model.norm.weight, model.norm.bias], lr=0.3)
    hidden = torch.randn(3, 30, D_IN)
    n = torch.tensor([4, 6, 2])
    losses = []
    for _ in range(8):
        out = model(hidden, num_tokens=n)
        loss = quantity_loss(out.alphas, out.frame_mask, n)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses


def test_out_init_std_sets_output_scale():
    model = tiny(out_init_std=0.136, n_post=0).eval()
    with torch.no_grad():
        out = model(torch.randn(4, 50, D_IN), num_tokens=torch.full((4,), 12))
    std = float(out.tokens.std())
    assert 0.136 * 0.6 < std < 0.136 * 1.4, std
    assert torch.all(model.out_proj.bias == 0)


def test_bfloat16_model():
    model = tiny().to(torch.bfloat16).eval()
    hidden = torch.randn(2, 20, D_IN, dtype=torch.bfloat16)
    with torch.no_grad():
        out = model(hidden, lengths=torch.tensor([1.0, 0.5]))
    assert out.tokens.dtype == torch.bfloat16
    assert torch.isfinite(out.tokens).all()
    assert out.token_mask.sum(1).tolist() == out.num_tokens.tolist()


def test_weight_bias_init_sets_the_starting_rate():
    torch.manual_seed(0)
    hidden = torch.randn(2, 300, 32)
    rates = {}
    for bias in (0.0, -2.0):
        model = CFormer(
            32, 16, n_pre=1, n_post=1, nhead=4, d_ffn=32, weight_bias_init=bias
        ).eval()
        rates[bias] = float(model(hidden).alphas.mean())
    assert abs(rates[-2.0] - torch.sigmoid(torch.tensor(-2.0)).item()) < 0.05
    assert abs(rates[0.0] - 0.5) < 0.1


def test_frame_stride_pools_before_the_pre_layers():
    from speechbrain_blspkd.nnet.cformer import pool_frames

    torch.manual_seed(0)
    strided = CFormer(
        16,
        24,
        n_pre=1,
        n_post=1,
        nhead=2,
        d_ffn=32,
        dropout=0.0,
        frame_stride=2,
    ).eval()
    plain = CFormer(
        16, 24, n_pre=1, n_post=1, nhead=2, d_ffn=32, dropout=0.0
    ).eval()
    plain.load_state_dict(strided.state_dict())
    hidden = torch.randn(2, 11, 16)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, 7:] = False
    n = torch.tensor([4, 3])
    out = strided(hidden, mask=mask, num_tokens=n)
    pooled, pmask = pool_frames(hidden, mask, 2)
    ref = plain(pooled, mask=pmask, num_tokens=n)
    assert out.alphas.shape == (2, 6)
    assert out.frame_mask.sum(1).tolist() == [6, 4]
    assert torch.allclose(out.tokens, ref.tokens, atol=1e-6)
    # the padded row equals the same utterance alone (padding excluded)
    alone = strided(hidden[1:, :7], num_tokens=n[1:])
    assert torch.allclose(alone.tokens[0], out.tokens[1, :3], atol=1e-5)


def test_frame_stride_must_be_a_positive_int():
    with pytest.raises(ValueError, match="frame_stride"):
        CFormer(16, 24, n_pre=1, n_post=1, nhead=2, d_ffn=32, frame_stride=0)


@pytest.mark.parametrize("window", [0, 2])
def test_cross_window_padding_invariance_and_gradients(window):
    model = tiny(n_pre=0, weight_predictor="conv", cross_window=window).eval()
    hidden = torch.randn(2, 30, D_IN)
    both = model(
        hidden,
        lengths=torch.tensor([1.0, 0.6]),
        num_tokens=torch.tensor([6, 3]),
    )
    alone = model(hidden[1:, :18], num_tokens=torch.tensor([3]))
    torch.testing.assert_close(
        both.tokens[1:, :3], alone.tokens, atol=1e-5, rtol=1e-4
    )
    assert torch.isfinite(both.tokens).all()
    model.train()
    out = model(
        hidden,
        lengths=torch.tensor([1.0, 0.6]),
        num_tokens=torch.tensor([6, 3]),
    )
    out.tokens.pow(2).sum().backward()
    cross = [p for n, p in model.named_parameters() if "multihead_attn" in n]
    assert cross and all(
        p.grad is not None and p.grad.abs().sum() > 0 for p in cross
    )


def test_cross_window_sets_what_a_token_reads():
    """Window 0 (each token its own stretch) reads differently from a
    window wider than the clip (every real frame); None builds no
    cross-attention at all."""
    hidden = torch.randn(2, 30, D_IN)
    lengths, n = torch.tensor([1.0, 0.6]), torch.tensor([6, 3])
    outs = {}
    for window in (100, 0):
        model = tiny(
            n_pre=0, weight_predictor="conv", cross_window=window
        ).eval()
        outs[window] = model(hidden, lengths=lengths, num_tokens=n).tokens
    assert (outs[0] - outs[100]).abs().max() > 1e-3
    assert isinstance(model.post_layers[0], torch.nn.TransformerDecoderLayer)
    plain = tiny(n_pre=0, weight_predictor="conv")
    assert not any(
        isinstance(m, torch.nn.TransformerDecoderLayer) for m in plain.modules()
    )


def test_cross_window_is_checked():
    with pytest.raises(ValueError, match="cross_window"):
        tiny(cross_window=-1)


def test_cross_layers_reads_frames_in_the_first_layers_only():
    model = tiny(
        n_pre=0,
        n_post=3,
        weight_predictor="conv",
        cross_window=2,
        cross_layers=1,
    ).eval()
    kinds = [
        isinstance(layer, torch.nn.TransformerDecoderLayer)
        for layer in model.post_layers
    ]
    assert kinds == [True, False, False]
    hidden = torch.randn(2, 30, D_IN)
    n = torch.tensor([6, 3])
    both = model(hidden, lengths=torch.tensor([1.0, 0.6]), num_tokens=n)
    alone = model(hidden[1:, :18], num_tokens=n[1:])
    torch.testing.assert_close(
        both.tokens[1:, :3], alone.tokens, atol=1e-5, rtol=1e-4
    )
    # the reading layer learns; the structure rebuilds from the export
    model.train()
    model(hidden, lengths=torch.tensor([1.0, 0.6]), num_tokens=n).tokens.pow(
        2
    ).sum().backward()
    cross = [p for name, p in model.named_parameters() if "multihead" in name]
    assert cross and all(p.grad.abs().sum() > 0 for p in cross)
    rebuilt = CFormer(**model.export_hparams())
    assert rebuilt.export_hparams()["cross_layers"] == 1
    rebuilt.load_state_dict(model.state_dict())
    # None: every token layer reads the frames
    every = tiny(
        n_pre=0, n_post=3, weight_predictor="conv", cross_window=2
    ).eval()
    assert all(
        isinstance(layer, torch.nn.TransformerDecoderLayer)
        for layer in every.post_layers
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(cross_layers=1),
        dict(cross_window=2, cross_layers=0),
        dict(cross_window=2, cross_layers=3),
    ],
)
def test_cross_layers_is_checked(kwargs):
    with pytest.raises(ValueError, match="cross_layers"):
        tiny(n_post=2, **kwargs)
