"""Speed of the two memory layouts (``model.channels_last``) on this machine, in one run.

    python benchmarks/bench_memory_format.py [--preset cpu-real] [--set key=value ...] [--reps 5] [--json OUT]

Times, for the preset's network at its ``data.size``, one SimCLR training step (two views of
``selfsup.batch_size`` images through backbone + projection head, NT-Xent, SGD step) and one
feature pass (eval mode, no gradient) in NCHW and in NHWC order. The two layouts alternate
``--reps`` times, so a machine whose speed drifts (shared CPUs vary threefold) drifts for both;
the median of the per-repetition ratios is the figure to read. No data needed: random images,
random weights. The device is ``train.device``; on CUDA with ``train.amp`` the steps run under the
engine's mixed precision, as training does.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from bonecluster.config import load_config
from bonecluster.device import mixed_precision, pick_device
from bonecluster.models import build_model
from bonecluster.selfsup import ProjectionHead, nt_xent


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu-real")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    cfg = load_config(args.preset, overrides=args.overrides)
    device = pick_device(cfg.train.device)
    use_amp, half = mixed_precision(cfg.train, device)   # as the engine decides (CUDA; a bf16 CPU with cpu_amp)
    n, side = cfg.selfsup.batch_size, cfg.data.size
    views = torch.rand(2 * n, 1, side, side, generator=torch.Generator().manual_seed(0)).to(device)

    setups = {}
    for layout in ("nchw", "nhwc"):
        torch.manual_seed(0)   # the same weights in both layouts
        model = build_model(cfg.model, weights="none", channels_last=layout == "nhwc").to(device)
        head = ProjectionHead(model.feature_dim, cfg.selfsup.hidden_dim, cfg.selfsup.proj_dim).to(device)
        opt = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=0.01, momentum=0.9)
        setups[layout] = (model, head, opt)

    def train_step(layout: str) -> None:
        model, head, opt = setups[layout]
        model.train(), head.train()
        with torch.autocast(device.type, dtype=half, enabled=use_amp):
            out = head(model.features(views)).float()
        loss = nt_xent(out[:n], out[n:], cfg.selfsup.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    @torch.no_grad()
    def feature_pass(layout: str) -> None:
        model = setups[layout][0].eval()
        with torch.autocast(device.type, dtype=half, enabled=use_amp):
            model.features(views)
        if device.type == "cuda":
            torch.cuda.synchronize()

    seconds: dict[str, dict[str, list[float]]] = {task: {"nchw": [], "nhwc": []} for task in ("train_step", "features")}
    for layout in ("nchw", "nhwc"):   # warm-up: first calls pick kernels
        train_step(layout), feature_pass(layout)
    for _ in range(args.reps):
        for layout in ("nchw", "nhwc"):
            seconds["train_step"][layout].append(_timed(lambda: train_step(layout)))
            seconds["features"][layout].append(_timed(lambda: feature_pass(layout)))

    print(f"{cfg.model.arch}, {side} px, {2 * n} images per call, {device}{' (mixed precision)' if use_amp else ''}, "
          f"{torch.get_num_threads()} threads, "
          f"{args.reps} alternating repetitions")
    print("| task | NCHW s (median) | NHWC s (median) | NHWC / NCHW (median of per-rep ratios) |")
    print("|---|---|---|---|")
    summary = {"device": str(device), "threads": torch.get_num_threads(), "size": side, "images": 2 * n}
    for task, by_layout in seconds.items():
        ratios = [b / a for a, b in zip(by_layout["nchw"], by_layout["nhwc"])]
        row = {"nchw_s": statistics.median(by_layout["nchw"]), "nhwc_s": statistics.median(by_layout["nhwc"]),
               "ratio": statistics.median(ratios), "ratios": ratios}
        summary[task] = row
        print(f"| {task} | {row['nchw_s']:.2f} | {row['nhwc_s']:.2f} | {row['ratio']:.2f} "
              f"({min(ratios):.2f}-{max(ratios):.2f}) |")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
