"""Feature-extraction speed of backbones at their default input size (issue 22), random weights.

    python benchmarks/bench_backbones.py [--arch timm/vit_small_patch14_dinov2.lvd142m --arch resnet50 ...]
                                         [--images 64] [--batch 16] [--size N] [--json OUT]

For each ``model.arch`` the network is built as a run builds it (one grey channel, no Sobel:
the setting for pretrained weights; random weights, which cost the same as trained ones) at the
model's default input size (``data.size=0``), or at ``--size``. It is timed in eval mode without
gradient on ``--images`` random films in batches of ``--batch``, after one warm-up batch, and
``model.features`` (the pooled vector every method clusters) is what runs. Printed per model:
input size, feature size, parameters, images/s and ms per image. Torch's thread count is the
machine's default unless ``--threads`` is given.

The cost of one fine-tuning epoch on 1,000 phantoms is ``bench_epoch.py`` with the same arch:

    python benchmarks/bench_epoch.py --n 1000 --size 224 --set model.arch=timm/vit_small_patch14_dinov2.lvd142m
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bonecluster.backbones import default_size
from bonecluster.models import build_model, count_parameters

DEFAULT_ARCHS = ("timm/vit_small_patch14_dinov2.lvd142m", "timm/resnet50.a1_in1k", "resnet50")


@torch.no_grad()
def time_features(arch: str, size: int, images: int, batch: int) -> dict:
    """Images/s of ``model.features`` for ``arch`` at ``size`` px on the CPU."""
    model = build_model({"arch": arch, "sobel": False}, image_size=size).eval()
    x = torch.rand(batch, 1, size, size)
    model.features(x)                       # warm-up: allocator, oneDNN kernels
    batches = max(1, images // batch)
    start = time.perf_counter()
    for _ in range(batches):
        model.features(x)
    seconds = time.perf_counter() - start
    n = batches * batch
    return {"arch": arch, "size": size, "feature_dim": model.feature_dim,
            "parameters_m": round(count_parameters(model.backbone) / 1e6, 1), "images": n,
            "seconds": round(seconds, 2), "images_per_s": round(n / seconds, 2),
            "ms_per_image": round(1000 * seconds / n, 1)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", action="append", help=f"model.arch to time (default: {', '.join(DEFAULT_ARCHS)})")
    ap.add_argument("--images", type=int, default=64, help="films timed per model (default 64)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, help="input side (default: each model's own)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--json", help="write the rows here too")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    print(f"{'model.arch':<42} {'size':>5} {'D':>5} {'params M':>9} {'images/s':>9} {'ms/image':>9}")
    for arch in args.arch or DEFAULT_ARCHS:
        row = time_features(arch, args.size or default_size(arch), args.images, args.batch)
        rows.append(row)
        print(f"{arch:<42} {row['size']:>5} {row['feature_dim']:>5} {row['parameters_m']:>9} "
              f"{row['images_per_s']:>9} {row['ms_per_image']:>9}", flush=True)
    result = {"threads": torch.get_num_threads(), "batch": args.batch, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
