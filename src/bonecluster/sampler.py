"""Pseudo-label-balanced sampling for DeepCluster training.

k-means on CNN features readily produces a few huge clusters and many tiny ones; a
network trained on such pseudo-labels can predict the large clusters everywhere.
DeepCluster (Caron et al. 2018, Sec. 3.4 "Avoiding trivial solutions", *trivial
parametrization*) counters this by sampling images uniformly over the pseudo-labels
(``UnifLabelSampler`` in the reference code), which is what
:class:`UniformLabelSampler` does.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

__all__ = ["UniformLabelSampler"]


class UniformLabelSampler(Sampler[int]):
    """DeepCluster's ``UnifLabelSampler``: draw ``num_samples`` indices so every non-empty
    pseudo-label gets ``num_samples / k_nonempty`` of them (within 1), shuffled.

    Within a cluster the indices are consecutive random permutations of its members,
    truncated to the quota: a cluster larger than its quota is sampled without
    replacement, a smaller one is repeated (every member appears ``floor`` or ``ceil`` of
    ``quota / size`` times, a lower-variance form of sampling with replacement).  Which
    clusters get the ``num_samples % k_nonempty`` extra samples is random per epoch.
    Labels that never occur (empty clusters) get no share.

    Distributed training: the full index list depends only on ``(labels, seed, epoch)``,
    so it is identical on every rank; it is padded (by repeating its start) to a multiple
    of ``num_replicas`` and rank ``r`` takes ``[r::num_replicas]``, as
    :class:`torch.utils.data.DistributedSampler` does with ``drop_last=False``.

    Args:
        labels: ``(N,)`` integer pseudo-label of every dataset index.
        num_samples: indices per epoch over all ranks (default ``N``).
        seed: base seed; epoch ``e`` uses ``seed + e`` (DistributedSampler's convention).
        num_replicas: number of distributed processes.
        rank: this process's rank in ``[0, num_replicas)``.
    """

    def __init__(
        self,
        labels: Sequence[int] | torch.Tensor,
        num_samples: int | None = None,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        labels = torch.as_tensor(labels).cpu()
        if labels.ndim != 1 or labels.numel() == 0:
            raise ValueError(f"labels must be a non-empty 1-D sequence, got shape {tuple(labels.shape)}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"labels must be integers, got {labels.dtype}")
        num_samples = labels.numel() if num_samples is None else int(num_samples)
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {num_replicas=} {rank=}")

        self.members = _indices_per_label(labels.to(torch.int64))
        self.num_samples = num_samples
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.total_size = math.ceil(num_samples / num_replicas) * num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose (deterministic) shuffle the next ``__iter__`` yields."""
        self.epoch = epoch

    def __len__(self) -> int:
        """Number of indices this rank yields per epoch."""
        return self.total_size // self.num_replicas

    def __iter__(self) -> Iterator[int]:
        indices = self.epoch_indices()
        return iter(indices[self.rank : self.total_size : self.num_replicas].tolist())

    def epoch_indices(self) -> torch.Tensor:
        """``(total_size,)`` int64 index list of the current epoch for all ranks, padded."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        balanced = _balanced_draw(self.members, self.num_samples, generator)
        return _pad_by_repeating(balanced, self.total_size)


def _indices_per_label(labels: torch.Tensor) -> list[torch.Tensor]:
    """Dataset indices of each distinct label, in ascending label order (only labels that occur)."""
    order = torch.argsort(labels, stable=True)
    _, counts = torch.unique_consecutive(labels[order], return_counts=True)
    return list(torch.split(order, counts.tolist()))


def _balanced_draw(members: list[torch.Tensor], num_samples: int, generator: torch.Generator) -> torch.Tensor:
    """``(num_samples,)`` shuffled indices with each group's count ``num_samples // len(members)`` or one more."""
    n_groups = len(members)
    quotas = torch.full((n_groups,), num_samples // n_groups, dtype=torch.int64)
    quotas[torch.randperm(n_groups, generator=generator)[: num_samples % n_groups]] += 1
    draws = [_tile_permutations(group, int(quota), generator) for group, quota in zip(members, quotas)]
    drawn = torch.cat(draws)
    return drawn[torch.randperm(drawn.numel(), generator=generator)]


def _tile_permutations(group: torch.Tensor, quota: int, generator: torch.Generator) -> torch.Tensor:
    """First ``quota`` entries of back-to-back random permutations of ``group`` (size,)."""
    repeats = math.ceil(quota / group.numel())
    # argsort of uniform noise gives `repeats` independent permutations in one call.
    noise = torch.rand(repeats, group.numel(), generator=generator, dtype=torch.float64)
    permutations = noise.argsort(dim=1, stable=True)
    return group[permutations.flatten()[:quota]]


def _pad_by_repeating(indices: torch.Tensor, size: int) -> torch.Tensor:
    """Extend ``indices`` to ``size`` entries by cycling from its start."""
    if indices.numel() >= size:
        return indices[:size]
    if indices.numel() == 0:
        raise ValueError("cannot pad an empty index list")
    repeats = math.ceil(size / indices.numel())
    return indices.repeat(repeats)[:size]
