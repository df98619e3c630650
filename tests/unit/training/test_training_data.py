"""The shard reader: contract format, deterministic order per seed and rank, exact resume position."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.common.errors import ValidationFailed
from services.training import data


@pytest.fixture(scope="module")
def dataset(tiny_dataset):
    root, _ = tiny_dataset
    return data.LocalDataset.open(root)


def test_the_stream_is_the_concatenation_of_the_shards(dataset, tiny_dataset):
    root, manifest = tiny_dataset
    stream = dataset.stream("train")
    assert len(stream.shards) == 2 and stream.tokens == manifest["splits"]["train"]["tokens"]
    expected = np.concatenate([np.fromfile(root / f"train/shard-0000{i}.bin", dtype="<u2") for i in (0, 1)])
    boundary = len(stream.shards[0])
    assert np.array_equal(stream.read(boundary - 5, 10), expected[boundary - 5:boundary + 5])
    assert stream.read(0, 4).dtype == np.int64


def test_uint32_shards_are_read(tmp_path, write_dataset):
    manifest = write_dataset(tmp_path, chars=5_000, dtype="uint32")
    stream = data.LocalDataset.open(tmp_path).stream("validation")
    assert stream.tokens == manifest["splits"]["validation"]["tokens"]
    assert stream.read(stream.tokens - 1, 1)[0] == manifest["eos_token_id"]  # documents end with EOS


def test_same_seed_same_batches_other_seed_other_batches(dataset):
    stream = dataset.stream("train")
    a, b = (data.TrainBatches(stream, 32, 4, seed=1) for _ in range(2))
    c = data.TrainBatches(stream, 32, 4, seed=2)
    first = [a.next() for _ in range(5)]
    assert all(torch.equal(x, b.next()) for x in first)
    assert not torch.equal(first[0], c.next())
    assert first[0].shape == (4, 32) and first[0].dtype == torch.int64


def test_ranks_read_disjoint_samples_that_together_are_the_single_process_order(dataset):
    stream = dataset.stream("train")
    single = data.TrainBatches(stream, 16, 4, seed=3)
    ranks = [data.TrainBatches(stream, 16, 2, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        expected = single.next()  # samples p, p+1, p+2, p+3
        first, second = (batches.next() for batches in ranks)  # rank 0: p, p+2; rank 1: p+1, p+3
        assert torch.equal(torch.stack([first[0], second[0], first[1], second[1]]), expected)
    assert ranks[0].position == ranks[1].position == single.position == 12


def test_an_epoch_visits_every_window_once(dataset):
    stream = dataset.stream("validation")
    batches = data.TrainBatches(stream, 64, 1, seed=4)
    starts = set()
    for index in range(batches.windows):
        batches._layout(0)
        starts.add(batches._offset + int(batches._order[index]) * 64)
        batches.sample(index)
    assert len(starts) == batches.windows
    assert batches.sample(0).tolist() != batches.sample(batches.windows).tolist()  # the next epoch reorders


def test_restoring_the_position_resumes_exactly(dataset):
    stream = dataset.stream("train")
    straight = data.TrainBatches(stream, 32, 4, seed=5, rank=1, world_size=2)
    for _ in range(7):
        straight.next()
    saved = straight.position
    expected = [straight.next() for _ in range(400)]  # crosses several epochs
    resumed = data.TrainBatches(stream, 32, 4, seed=5, rank=1, world_size=2, position=saved)
    assert all(torch.equal(x, resumed.next()) for x in expected)


def test_a_batch_is_its_samples_read_in_place_across_shards_and_epochs(dataset):
    stream = dataset.stream("train")
    batches = data.TrainBatches(stream, 64, 8, seed=6, rank=1, world_size=3)
    steps = batches.windows // (8 * 3) + 2  # into the second epoch; windows straddle the shard boundary
    for _ in range(steps):
        indices = batches.indices()
        expected = np.stack([batches.sample(index) for index in indices])
        got = batches.next()
        assert got.dtype == torch.int64 and not got.is_pinned() and np.array_equal(got.numpy(), expected)
    assert batches.position == steps * 8 * 3


def test_a_block_longer_than_the_split_is_named(dataset):
    with pytest.raises(ValidationFailed, match="model.block_size"):
        data.TrainBatches(dataset.stream("validation"), 10**6, 1, seed=0)


def test_eval_batches_are_fixed_and_dealt_round_robin(dataset):
    stream = dataset.stream("validation")
    whole = data.eval_batches(stream, 32, 4, 5)
    assert len(whole) == 5 and all(b.shape == (4, 32) for b in whole)
    assert all(torch.equal(x, y) for x, y in zip(whole, data.eval_batches(stream, 32, 4, 5), strict=True))
    rank1 = data.eval_batches(stream, 32, 4, 5, rank=1, world_size=2)
    assert len(rank1) == 2 and torch.equal(rank1[0], whole[1]) and torch.equal(rank1[1], whole[3])


def test_hashes_identify_the_dataset_and_tokenizer(dataset, tiny_dataset, tmp_path, write_dataset):
    again = data.LocalDataset.open(tiny_dataset[0])
    assert (again.dataset_sha256, again.tokenizer_sha256) == (dataset.dataset_sha256, dataset.tokenizer_sha256)
    write_dataset(tmp_path, chars=20_000)
    other = data.LocalDataset.open(tmp_path)
    assert other.dataset_sha256 != dataset.dataset_sha256
