"""PooledLengthSampler: fixed-size, low-padding random batches."""

import random

import pytest
import torch
from speechbrain.dataio.dataset import DynamicItemDataset

from speechbrain_blspkd.dataio.sampler import PooledLengthSampler, loader_kwargs


def _lengths(n=203, seed=0):
    rng = random.Random(seed)
    return [rng.uniform(0.8, 13.0) for _ in range(n)]


def test_every_utterance_once_and_loader_chunks_are_the_batches():
    lengths = _lengths()
    sampler = PooledLengthSampler(lengths, 8, pool_batches=4, seed=3)
    order = list(sampler)
    assert len(order) == len(sampler) == len(lengths)
    assert sorted(order) == list(range(len(lengths)))
    batches = sampler.batches()
    # 203 = 6 pools of 32 + 11: one short batch (3), and it comes last, so
    # a DataLoader of batch_size 8 cuts the order into exactly these batches
    assert [len(b) for b in batches[:-1]] == [8] * (len(batches) - 1)
    assert len(batches[-1]) == 3
    loader = torch.utils.data.DataLoader(
        list(range(len(lengths))), batch_size=8, sampler=sampler
    )
    assert [b.tolist() for b in loader] == batches


def test_batches_hold_similar_lengths_and_less_padding_than_random():
    lengths = _lengths(2000)
    pooled = PooledLengthSampler(lengths, 32, pool_batches=8)
    plain = PooledLengthSampler(lengths, 32, pool_batches=1)
    assert pooled.padded_fraction() < 0.5 * plain.padded_fraction()
    # within a batch of the pooled order the spread is a pool's slice
    spread = [
        max(lengths[i] for i in b) - min(lengths[i] for i in b)
        for b in pooled.batches()
    ]
    assert sum(spread) / len(spread) < 3.0
    # and the pool order is random: batch order is not sorted by length
    firsts = [lengths[b[0]] for b in pooled.batches()]
    assert firsts != sorted(firsts) and firsts != sorted(firsts, reverse=True)


def test_order_is_a_function_of_seed_and_epoch():
    lengths = _lengths()
    a = PooledLengthSampler(lengths, 8, seed=5)
    b = PooledLengthSampler(lengths, 8, seed=5)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)
    a.set_epoch(1)
    assert list(a) == list(b)
    assert list(PooledLengthSampler(lengths, 8, seed=6)) != list(
        PooledLengthSampler(lengths, 8, seed=5)
    )


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="no utterances"):
        PooledLengthSampler([], 4)
    with pytest.raises(ValueError, match="pool_batches"):
        PooledLengthSampler([1.0], 4, pool_batches=0)


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
    sampler = kwargs["sampler"]
    assert set(kwargs) == {"sampler", "batch_size"}
    assert kwargs["batch_size"] == 4
    assert isinstance(sampler, PooledLengthSampler)
    # indices address the subset's rows and carry their durations
    assert sorted(sampler) == list(range(30))
    assert sampler.lengths == pytest.approx(lengths[:30], abs=1e-3)
    # a plain number is the batches per pool
    numbered = loader_kwargs(dict(opts, length_pooling=3), subset)
    assert numbered["sampler"].pool_batches == 3
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
