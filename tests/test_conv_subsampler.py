"""Tests of BLSP's convolutional subsampler adapter."""

import pytest
import torch

from speechbrain_blspkd.nnet.adapter import AdapterOutput, SpeechAdapter
from speechbrain_blspkd.nnet.conv_subsampler import ConvSubsampler


def tiny(**kwargs):
    args = dict(input_size=12, output_size=20, hidden_size=10, bottleneck=6)
    args.update(kwargs)
    return ConvSubsampler(**args).eval()


def test_is_a_speech_adapter():
    adapter = tiny()
    assert isinstance(adapter, SpeechAdapter)
    assert adapter.output_size() == 20
    out = adapter(torch.randn(1, 9, 12))
    assert isinstance(out, AdapterOutput)


def test_structure_follows_blsp():
    adapter = ConvSubsampler(12, 20, bottleneck=6)
    assert len(adapter.convs) == 3
    for i, conv in enumerate(adapter.convs):
        # the conv doubles the width for the GLU, which halves it again
        assert conv.out_channels == 2 * 12
        assert conv.in_channels == 12
        assert conv.kernel_size == (5,) and conv.stride == (2,)
        assert conv.padding == (2,), i
    assert adapter.down.weight.shape == (6, 12)
    assert adapter.up.weight.shape == (12, 6)
    assert adapter.out_proj.weight.shape == (20, 12)


@pytest.mark.parametrize(
    "frames, expected",
    [(1, 1), (2, 1), (8, 1), (9, 2), (16, 2), (17, 3), (33, 5), (40, 5)],
)
def test_exact_output_length_alone(frames, expected):
    out = tiny()(torch.randn(1, frames, 12))
    assert out.tokens.shape == (1, expected, 20)
    assert out.token_mask.tolist() == [[True] * expected]


def test_exact_output_lengths_in_a_batch():
    frames = torch.tensor([40, 1, 2, 8, 9, 16, 17, 33])
    feats = torch.randn(len(frames), 40, 12)
    out = tiny()(feats, lengths=frames / 40)
    assert out.tokens.shape == (8, 5, 20)
    assert out.token_counts.tolist() == [5, 1, 1, 1, 2, 2, 3, 5]
    # valid frames come first in each row
    assert out.token_mask.tolist()[4] == [True, True, False, False, False]
    # tokens beyond a row's length are zero
    assert out.tokens[1, 1:].abs().max() == 0
    assert out.tokens[0].abs().min(dim=-1).values.min() > 0


def test_other_kernel_and_stride():
    # (n + 2 * 1 - 3) // 3 + 1 per layer: 10 -> 4 -> 2 ; 3 -> 1 -> 1
    adapter = tiny(kernel_size=3, stride=3, num_layers=2)
    out = adapter(torch.randn(2, 10, 12), lengths=torch.tensor([1.0, 0.3]))
    assert out.tokens.shape == (2, 2, 20)
    assert out.token_counts.tolist() == [2, 1]
    assert adapter.output_lengths(torch.tensor([10, 3, 100])).tolist() == [
        2,
        1,
        12,
    ]


def test_padding_garbage_does_not_leak():
    adapter = tiny()
    lengths = [37, 9, 21, 1]
    rows = [torch.randn(n, 12) for n in lengths]
    total = 53
    batch = 1e3 * torch.randn(len(rows), total, 12)  # garbage padding
    for i, row in enumerate(rows):
        batch[i, : len(row)] = row
    with torch.no_grad():
        out = adapter(batch, lengths=torch.tensor(lengths) / total)
        for i, row in enumerate(rows):
            alone = adapter(row[None])
            count = alone.tokens.shape[1]
            assert int(out.token_counts[i]) == count
            torch.testing.assert_close(
                out.tokens[i, :count], alone.tokens[0], atol=1e-5, rtol=0
            )


def test_valid_outputs_depend_on_the_last_valid_frame():
    # the padding mask must not hide real frames either
    adapter = tiny()
    feats = torch.randn(1, 16, 12)
    changed = feats.clone()
    changed[0, 15] += 1.0
    with torch.no_grad():
        a = adapter(feats).tokens
        b = adapter(changed).tokens
    assert (a - b).abs().max() > 1e-4


def test_gradient_reaches_every_parameter():
    adapter = tiny(dropout=0.1).train()
    feats = torch.randn(3, 30, 12)
    out = adapter(feats, lengths=torch.tensor([1.0, 0.5, 0.2]))
    loss = (out.tokens**2)[out.token_mask].sum()
    loss.backward()
    for name, param in adapter.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().max() > 0, name


def test_residual_bottleneck():
    # with the up-projection zeroed the MLP is the identity: the output
    # no longer depends on the down-projection
    adapter = tiny()
    feats = torch.randn(2, 20, 12)
    with torch.no_grad():
        adapter.up.weight.zero_()
        adapter.up.bias.zero_()
        before = adapter(feats).tokens
        adapter.down.weight.normal_()
        after = adapter(feats).tokens
    torch.testing.assert_close(before, after)
    assert before.abs().max() > 0


def test_export_hparams_round_trip():
    adapter = tiny(num_layers=2, kernel_size=3)
    args = adapter.export_hparams()
    assert args == dict(
        input_size=12,
        output_size=20,
        hidden_size=10,
        num_layers=2,
        kernel_size=3,
        stride=2,
        bottleneck=6,
        dropout=0.0,
    )
    rebuilt = ConvSubsampler(**args)
    rebuilt.load_state_dict(adapter.state_dict())
    rebuilt.eval()
    feats = torch.randn(2, 25, 12)
    lengths = torch.tensor([1.0, 0.4])
    with torch.no_grad():
        expected = adapter(feats, lengths)
        got = rebuilt(feats, lengths)
    assert torch.equal(expected.tokens, got.tokens)
    assert torch.equal(expected.token_mask, got.token_mask)


def test_bad_arguments():
    with pytest.raises(ValueError, match="stride"):
        ConvSubsampler(8, 8, stride=0)
    with pytest.raises(ValueError, match="feats"):
        tiny()(torch.randn(1, 10, 11))
