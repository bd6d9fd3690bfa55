"""Unit tests for bonecluster.sampler.UniformLabelSampler."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from bonecluster.sampler import UniformLabelSampler

# Very unbalanced pseudo-labels over 10 "images"; label 1 and 3 are empty clusters.
LABELS = [0, 0, 0, 0, 0, 0, 2, 2, 4, 5]


def label_counts(indices: list[int], labels: list[int]) -> Counter:
    return Counter(labels[i] for i in indices)


@pytest.mark.parametrize("num_samples", [10, 11, 12, 100, 7, 2])
def test_every_non_empty_label_gets_an_equal_share(num_samples):
    sampler = UniformLabelSampler(LABELS, num_samples=num_samples, seed=0)
    indices = list(sampler)
    assert len(indices) == len(sampler) == num_samples
    counts = label_counts(indices, LABELS)
    share = num_samples / 4  # four non-empty labels: 0, 2, 4, 5
    assert set(counts) <= {0, 2, 4, 5}
    assert all(abs(counts[label] - share) < 1 for label in (0, 2, 4, 5))
    assert sum(counts.values()) == num_samples


def test_large_cluster_is_sampled_without_replacement_and_small_ones_are_tiled():
    labels = [0] * 90 + [1] * 5 + [2] * 5
    indices = list(UniformLabelSampler(labels, seed=3))
    per_index = Counter(indices)
    large = [per_index[i] for i in range(90) if i in per_index]
    assert len(large) in (33, 34) and set(large) == {1}  # 100 // 3 (+1), all distinct members
    small = [per_index[i] for i in range(90, 100)]
    assert set(small) <= {6, 7}  # ceil/floor of 33 or 34 draws over 5 members


def test_default_length_is_dataset_size():
    sampler = UniformLabelSampler(torch.tensor(LABELS))
    assert len(sampler) == 10
    assert all(0 <= i < 10 for i in sampler)


def test_deterministic_per_seed_and_epoch():
    first, second = UniformLabelSampler(LABELS, seed=5), UniformLabelSampler(LABELS, seed=5)
    first.set_epoch(3)
    second.set_epoch(3)
    assert list(first) == list(second)
    assert list(first) == list(first)  # iterating does not advance the shuffle


def test_shuffle_changes_across_epochs_and_seeds():
    labels = list(range(50)) * 4
    sampler = UniformLabelSampler(labels, seed=0)
    epoch_zero = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != epoch_zero
    assert list(UniformLabelSampler(labels, seed=1)) != epoch_zero


def test_labels_need_not_be_contiguous_or_start_at_zero():
    labels = [-1, 7, 7, 7, 1000]
    counts = label_counts(list(UniformLabelSampler(labels, num_samples=30)), labels)
    assert counts == {-1: 10, 7: 10, 1000: 10}


@pytest.mark.parametrize(("num_samples", "num_replicas"), [(10, 3), (12, 4), (5, 8), (100, 2)])
def test_distributed_ranks_partition_the_padded_list(num_samples, num_replicas):
    samplers = [
        UniformLabelSampler(LABELS, num_samples=num_samples, seed=2, num_replicas=num_replicas, rank=rank)
        for rank in range(num_replicas)
    ]
    for sampler in samplers:
        sampler.set_epoch(4)
    full = samplers[0].epoch_indices().tolist()
    per_rank = [list(sampler) for sampler in samplers]

    padded_size = -(-num_samples // num_replicas) * num_replicas
    assert len(full) == padded_size
    assert full[num_samples:] == full[: padded_size - num_samples]  # padding repeats the start
    assert {len(indices) for indices in per_rank} == {padded_size // num_replicas}
    assert all(len(sampler) == padded_size // num_replicas for sampler in samplers)
    # Rank r holds positions r, r + R, r + 2R, ...: disjoint, and together all positions.
    for rank, indices in enumerate(per_rank):
        assert indices == full[rank::num_replicas]
    interleaved = [per_rank[pos % num_replicas][pos // num_replicas] for pos in range(padded_size)]
    assert interleaved == full


def test_distributed_list_matches_single_process_list():
    single = UniformLabelSampler(LABELS, num_samples=12, seed=9)
    ranked = UniformLabelSampler(LABELS, num_samples=12, seed=9, num_replicas=3, rank=1)
    assert ranked.epoch_indices().tolist() == list(single)


def test_works_as_dataloader_sampler():
    dataset = TensorDataset(torch.arange(10))
    loader = DataLoader(dataset, batch_size=4, sampler=UniformLabelSampler(LABELS, seed=0))
    seen = torch.cat([batch for (batch,) in loader]).tolist()
    assert seen == list(UniformLabelSampler(LABELS, seed=0))


def test_zero_samples_yields_nothing():
    assert list(UniformLabelSampler(LABELS, num_samples=0)) == []


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"labels": []}, ValueError),
        ({"labels": [[0, 1], [1, 0]]}, ValueError),
        ({"labels": [0.5, 1.0]}, TypeError),
        ({"labels": [0, 1], "num_samples": -1}, ValueError),
        ({"labels": [0, 1], "num_replicas": 2, "rank": 2}, ValueError),
        ({"labels": [0, 1], "num_replicas": 0}, ValueError),
    ],
)
def test_rejects_bad_arguments(kwargs, error):
    with pytest.raises(error):
        UniformLabelSampler(**kwargs)
