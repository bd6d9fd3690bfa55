"""Reading training batches from the decode-once cache.

A batch is one fancy-indexed read of the memory-mapped store: no decoding, no PIL, no
per-image Python work. Augmentation happens afterwards on the batch tensor (on the GPU when
there is one), see :mod:`bonecluster.augment`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler, SequentialSampler

from bonecluster.data.cache import PreparedDataset, _open_rows


class CachedBatches(Dataset):
    """``ds[list_of_positions]`` -> uint8 tensor (B, 1, S, S) of those dataset positions
    (and the positions as an int64 tensor (B,) when ``with_positions``).

    Positions index ``prepared.records``. The memmap opens lazily in each process, so the
    dataset pickles cheaply into DataLoader workers.
    """

    def __init__(self, prepared: PreparedDataset, with_positions: bool = False):
        self.with_positions = with_positions
        self.store_dir = Path(prepared.store_dir)
        self.pre = prepared.pre
        self.rows = np.asarray(prepared.rows, np.int64)
        self._pixels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def _store(self) -> np.ndarray:
        if self._pixels is None:
            self._pixels = _open_rows(self.store_dir, self.pre, int(self.rows.max(initial=-1)) + 1)
        return self._pixels

    def __getitem__(self, positions: Sequence[int]):
        positions = np.asarray(positions, np.int64)
        rows = self.rows[positions]
        order = np.argsort(rows, kind="stable")  # sequential reads are kinder to the page cache
        batch = np.empty((len(rows), self.pre.size, self.pre.size), np.uint8)
        batch[order] = self._store()[rows[order]]
        images = torch.from_numpy(batch).unsqueeze(1)
        return (images, torch.from_numpy(positions)) if self.with_positions else images

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_pixels"] = None
        return state


def batch_loader(prepared: PreparedDataset, batch_size: int, sampler: Sampler[int] | Iterable[int] | None = None,
                 drop_last: bool = False, workers: int = 0, pin_memory: bool = False,
                 with_positions: bool = False) -> DataLoader:
    """A DataLoader yielding uint8 (B, 1, S, S) batches in the order the sampler gives.

    ``sampler`` defaults to sequential order (feature extraction); training passes the
    uniform pseudo-label sampler.
    """
    dataset = CachedBatches(prepared, with_positions)
    sampler = sampler if sampler is not None else SequentialSampler(range(len(dataset)))
    return DataLoader(dataset, sampler=BatchSampler(sampler, batch_size, drop_last), batch_size=None,
                      num_workers=workers, pin_memory=pin_memory, persistent_workers=False)


def to_float(batch: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 (B, 1, S, S) -> float32 in [0, 1] on ``device`` (the copy is the uint8, 4x smaller)."""
    if device is not None:
        batch = batch.to(device, non_blocking=True)
    return batch.float().div_(255.0)
