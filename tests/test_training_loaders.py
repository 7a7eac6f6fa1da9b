"""Tests for norton.training.loaders: batches, the epoch order, samplers and argument errors."""
from __future__ import annotations

import pytest

from norton.errors import UserError
from norton.training.datasets import build_datasets
from norton.training.loaders import ShardSampler, build_loaders


def test_loaders_batches_and_epoch_order():
    splits = build_datasets("synthetic", limit=40, val_size=10)
    loaders = build_loaders(splits, batch_size=16)
    images, labels = next(iter(loaders.train))
    assert images.shape == (16, 3, 32, 32) and labels.shape == (16,)
    assert sum(len(y) for _, y in loaders.val) == 10
    orders = []
    for epoch in (1, 2, 1):
        loaders.train_sampler.set_epoch(epoch)
        orders.append(list(loaders.train_sampler))
    assert orders[0] == orders[2] and orders[0] != orders[1] and sorted(orders[0]) == list(range(40))


def test_last_batch_of_one_image_is_dropped():
    splits = build_datasets("synthetic", limit=33, val_size=10)
    assert [len(y) for _, y in build_loaders(splits, batch_size=16).train] == [16, 16]
    assert [len(y) for _, y in build_loaders(splits, batch_size=11).train] == [11, 11, 11]


def test_eval_batch_size_and_no_validation_split():
    splits = build_datasets("synthetic", limit=10, val_size=0)
    loaders = build_loaders(splits, batch_size=4, eval_batch_size=10)
    assert loaders.val is None and [len(y) for _, y in loaders.test] == [10]


def test_shard_sampler_covers_every_index_once():
    shards = [list(ShardSampler(11, rank=r, world_size=3)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(11))
    assert [len(ShardSampler(11, rank=r, world_size=3)) for r in range(3)] == [len(s) for s in shards]


@pytest.mark.parametrize("bad, message", [({"batch_size": 0}, "batch_size"), ({"workers": -1}, "workers"),
                                          ({"batch_size": 2.5}, "batch_size")])
def test_loader_argument_errors(bad, message):
    with pytest.raises(UserError, match=message):
        build_loaders(build_datasets("synthetic", limit=4), **{"batch_size": 2, **bad})
