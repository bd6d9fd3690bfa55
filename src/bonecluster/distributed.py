"""Multi-process training through torchrun + DistributedDataParallel (nothing home-made).

``torchrun --nproc_per_node=N -m bonecluster train ...`` sets RANK/WORLD_SIZE/LOCAL_RANK;
:func:`setup` then joins the process group (NCCL on CUDA, gloo on CPU). Each rank extracts
features for its share of the images; the shares are gathered, k-means runs on rank 0, and the
assignments are broadcast. Only rank 0 logs and writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


PROCESS_GROUP_TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_type: str) -> DistInfo:
    """Join the process group when launched by torchrun; a no-op for a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)  # before the first collective, so NCCL need not guess the GPU
    if not dist.is_initialized():
        # The other ranks wait at a barrier while rank 0 decodes the whole dataset into the cache,
        # which on MURA-sized data can outlast NCCL's default 10-minute watchdog.
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo", timeout=PROCESS_GROUP_TIMEOUT)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def shard(n: int, info: DistInfo) -> torch.Tensor:
    """This rank's dataset positions for feature extraction: a strided share of range(n)."""
    return torch.arange(info.rank, n, info.world_size)


def gather_shards(local: torch.Tensor, n: int, info: DistInfo) -> torch.Tensor:
    """Reassemble (n, D) rows from every rank's strided share (rank r holds rows r::world)."""
    if not info.enabled:
        return local
    size = (n + info.world_size - 1) // info.world_size
    padded = local.new_zeros((size, *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(info.world_size)]
    dist.all_gather(parts, padded)
    out = local.new_empty((n, *local.shape[1:]))
    for r, part in enumerate(parts):
        count = len(range(r, n, info.world_size))
        out[r::info.world_size] = part[:count]
    return out


def broadcast(t: torch.Tensor, info: DistInfo, src: int = 0) -> torch.Tensor:
    """Rank ``src``'s tensor on every rank (shape and dtype must already agree)."""
    if info.enabled:
        dist.broadcast(t, src)
    return t


def broadcast_object(obj, info: DistInfo, src: int = 0):
    """Rank ``src``'s picklable ``obj`` on every rank (the others pass anything, e.g. None)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
