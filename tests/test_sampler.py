"""PooledLengthBatchSampler: fixed-size, low-padding random batches."""

import random

import pytest
from speechbrain.dataio.dataset import DynamicItemDataset

from speechbrain_blspkd.brain import loader_kwargs
from speechbrain_blspkd.dataio.sampler import PooledLengthBatchSampler


def _lengths(n=203, seed=0):
    rng = random.Random(seed)
    return [rng.uniform(0.8, 13.0) for _ in range(n)]


@pytest.mark.parametrize("drop_last", [False, True])
def test_every_utterance_once_and_len_matches(drop_last):
    lengths = _lengths()
    sampler = PooledLengthBatchSampler(
        lengths, 8, pool_batches=4, seed=3, drop_last=drop_last
    )
    batches = list(sampler)
    assert len(batches) == len(sampler)
    seen = [i for b in batches for i in b]
    assert len(seen) == len(set(seen))
    if drop_last:
        assert all(len(b) == 8 for b in batches)
        assert len(seen) < len(lengths)
    else:
        assert sorted(seen) == list(range(len(lengths)))
        # only the last batch of a pool may be short: 203 = 6 pools of 32
        # + 11 -> one 8 and one 3
        assert sorted(len(b) for b in batches)[:2] == [3, 8]


def test_batches_hold_similar_lengths_and_less_padding_than_random():
    lengths = _lengths(2000)
    pooled = PooledLengthBatchSampler(lengths, 32, pool_batches=8)
    plain = PooledLengthBatchSampler(lengths, 32, pool_batches=1)
    assert pooled.padded_fraction() < 0.5 * plain.padded_fraction()
    # within a batch of the pooled order the spread is a pool's slice
    spread = [
        max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in pooled
    ]
    assert sum(spread) / len(spread) < 3.0
    # and the pool order is random: batch order is not sorted by length
    firsts = [lengths[b[0]] for b in pooled]
    assert firsts != sorted(firsts) and firsts != sorted(firsts, reverse=True)


def test_order_is_a_function_of_seed_and_epoch():
    lengths = _lengths()
    a = PooledLengthBatchSampler(lengths, 8, seed=5)
    b = PooledLengthBatchSampler(lengths, 8, seed=5)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)
    a.set_epoch(1)
    assert list(a) == list(b)
    assert list(PooledLengthBatchSampler(lengths, 8, seed=6)) != list(
        PooledLengthBatchSampler(lengths, 8, seed=5)
    )


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="no utterances"):
        PooledLengthBatchSampler([], 4)
    with pytest.raises(ValueError, match="pool_batches"):
        PooledLengthBatchSampler([1.0], 4, pool_batches=0)


def _dataset(n=40):
    lengths = _lengths(n, seed=1)
    data = {
        f"u{i:03d}": {"duration": f"{d:.3f}", "wav": "x.wav"}
        for i, d in enumerate(lengths)
    }
    return DynamicItemDataset(data), lengths


def test_loader_kwargs_builds_the_pooled_sampler_from_the_stage_rows():
    dataset, lengths = _dataset()
    # a stage that kept only some rows (Stage.select_rows)
    subset = dataset.filtered_sorted(
        key_test={"wav": lambda w: True}, select_n=30
    )
    opts = {
        "batch_size": 4,
        "shuffle": True,
        "dynamic_batching": None,
        "length_pooling": {"pool_batches": 2, "seed": 7},
    }
    kwargs = loader_kwargs(opts, subset)
    sampler = kwargs["batch_sampler"]
    assert set(kwargs) == {"batch_sampler"}
    assert isinstance(sampler, PooledLengthBatchSampler)
    # indices address the subset's rows and carry their durations
    assert sorted(i for b in sampler for i in b) == list(range(30))
    assert sampler.lengths == pytest.approx(lengths[:30], abs=1e-3)
    # a plain number is the batches per pool
    numbered = loader_kwargs(dict(opts, length_pooling=3), subset)
    assert numbered["batch_sampler"].pool_batches == 3
    # no length_pooling: the plain options pass through
    plain = dict(opts, length_pooling=None)
    assert loader_kwargs(plain, subset) == {"batch_size": 4, "shuffle": True}


def test_loader_kwargs_refuses_both_samplers_and_pooling_without_batch_size():
    dataset, _ = _dataset()
    with pytest.raises(ValueError, match="not both"):
        loader_kwargs(
            {
                "batch_size": 4,
                "dynamic_batching": {"max_batch_length": 10},
                "length_pooling": {"pool_batches": 2},
            },
            dataset,
        )
    with pytest.raises(ValueError, match="needs batch_size"):
        loader_kwargs({"length_pooling": {"pool_batches": 2}}, dataset)
