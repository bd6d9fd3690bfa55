"""Images/s of training batches read from the decode-once cache vs decoding with PIL every epoch.

    python benchmarks/bench_loader.py DATA... [--size 128] [--batch 64] [--epochs 2] [--workers 0]

Both paths produce the same thing, a float batch (B, 1, S, S) in [0, 1] in shuffled order;
the PIL path opens, converts to grey and resizes every file on every epoch, as a plain
torchvision ImageFolder loop would. Prints a table and the ratio; --json writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, RandomSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bonecluster.config import DataConfig  # noqa: E402
from bonecluster.data import prepare_sources  # noqa: E402
from bonecluster.data.loader import batch_loader, to_float  # noqa: E402


class PILDecoding(Dataset):
    """The baseline: decode one file with PIL per item, every epoch."""

    def __init__(self, paths: list[str], size: int):
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.paths[i]) as img:
            grey = img.convert("L").resize((self.size, self.size), Image.BILINEAR)
        return torch.from_numpy(np.asarray(grey, np.float32) / 255.0).unsqueeze(0)


def time_epochs(batches_per_epoch, epochs: int, to_batch) -> tuple[float, int]:
    n, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in batches_per_epoch():
            x = to_batch(batch)
            n += x.shape[0]
    return time.perf_counter() - t0, n


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", nargs="+")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers for both paths")
    ap.add_argument("--cache", help="cache folder (default: a temporary one)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    torch.manual_seed(0)

    cache = args.cache or tempfile.mkdtemp(prefix="bench-cache-")
    t0 = time.perf_counter()
    ds = prepare_sources(args.data, DataConfig(size=args.size), cache=cache, progress=False)
    prepare_s = time.perf_counter() - t0

    def cache_epoch():
        return batch_loader(ds, args.batch, RandomSampler(range(len(ds))), workers=args.workers)

    pil = PILDecoding([r.path for r in ds.records], args.size)

    def pil_epoch():
        return DataLoader(pil, batch_size=args.batch, shuffle=True, num_workers=args.workers)

    # one untimed epoch each, so neither path is charged for first-touch costs (imports,
    # thread pools, the OS reading files into its page cache)
    time_epochs(cache_epoch, 1, to_float)
    time_epochs(pil_epoch, 1, lambda b: b)
    cache_s, n_cache = time_epochs(cache_epoch, args.epochs, to_float)
    pil_s, n_pil = time_epochs(pil_epoch, args.epochs, lambda b: b)
    result = {
        "images": len(ds), "size": args.size, "batch": args.batch, "epochs": args.epochs,
        "workers": args.workers, "prepare_seconds": round(prepare_s, 2),
        "cache_images_per_s": round(n_cache / cache_s, 1), "pil_images_per_s": round(n_pil / pil_s, 1),
    }
    result["ratio"] = round(result["cache_images_per_s"] / result["pil_images_per_s"], 1)
    print(f"{'path':<22}{'images/s':>12}")
    print(f"{'cache (memmap)':<22}{result['cache_images_per_s']:>12.0f}")
    print(f"{'PIL decode per epoch':<22}{result['pil_images_per_s']:>12.0f}")
    print(f"ratio cache/PIL: {result['ratio']:.1f}x  ({len(ds)} images at {args.size} px, "
          f"{args.epochs} epochs, batch {args.batch}; one-off prepare {prepare_s:.1f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
