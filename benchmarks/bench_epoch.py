"""Where one engine epoch's time goes, and how far it is from the hardware's floor (issue 25).

    python benchmarks/bench_epoch.py [DATA...] [--preset cpu] [--n 1000] [--size 64] [--set key=value ...]
                                     [--json OUT] [--quiet]

Without DATA it uses ``--n`` phantoms of ``--size`` px (generated once under ``--work``; ``--size``
also sets ``data.size``, default the preset's). The engine runs two epochs of the preset's method
(``train.epochs`` is set to 3 so the run stops before its final clustering) with a
:class:`bonecluster.timing.PhaseTimer`, and the second epoch is reported phase by phase, each
phase exclusive of the others (on CUDA the device is synchronised at every phase boundary):

* ``cache reads``: waiting for the loader's next uint8 batch and making it a float tensor on the
  device, in every pass;
* ``bn stats``: the precise-BN forward pass (``train.feature_bn=recompute``);
* ``features``: the forward pass of the feature extraction;
* ``pca``: PCA-whitening (and L2) of the features; ``k-means restart i``: each k-means run;
* ``augmentation``: ``train.augment`` on the training batches;
* ``training step``: forward, loss, backward and optimiser step of the pseudo-label training;
* ``checkpoint write``: ``checkpoint.pt`` and ``metrics.csv``;
* ``other``: the rest of the epoch (top-layer reset, samplers, NMI, gathering features...).

Only DeepCluster-style rounds (``deepcluster``, ``sela``) are itemised this way; the two-view
pre-training epochs of other methods are timed as ``other``.

The floor, measured in the same run once before the engine and once after it: the same network
(fresh random weights) on random tensors already on the device, at the same batch sizes, precision
and image counts: forward + cross-entropy + backward + SGD step for the training pass, forward only
(eval mode, no gradient) for one feature pass over the data. Each pass's floor is the faster of
its two runs (a CPU's speed drifts over minutes; the faster run is the nearer to what the hardware
can do, so the ratio errs against the engine), and ``floor_drift`` is the second run's seconds over
the first's. ``floor_ratio`` is the engine's images/s over the
floor's, both counting the feature-pass images plus the training images: the floor's seconds over
the whole epoch's, so every phase that is not one of those two passes counts against the engine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

PHASES = ("cache reads", "bn stats", "features", "pca", "k-means restart", "augmentation", "training step",
          "checkpoint write", "other")   # table order; "k-means restart" stands for each restart


def phantom_source(work: Path, n: int, size: int, seed: int, workers: int | None) -> Path:
    """Generate (once) ``n`` phantoms of ``size`` px and return their folder."""
    folder = work / f"phantoms-n{n}-s{size}-seed{seed}"
    if not (folder / "train_image_paths.csv").exists():
        from bonecluster.data.phantoms import generate_phantoms

        generate_phantoms(folder, n=n, size=size, seed=seed, progress=False, workers=workers)
    return folder


def timed_epoch(cfg, data, out: Path, progress: bool):
    """(second epoch's Lap, its metrics row, the device) of a two-epoch engine run with a PhaseTimer."""
    from bonecluster.engine import DeepClusterEngine
    from bonecluster.timing import PhaseTimer

    engine = DeepClusterEngine(cfg, out, progress=progress)
    engine.timer = PhaseTimer(engine.device)
    fit = engine.fit(data, stop_after=2)
    epochs = [lap for lap in engine.timer.laps if lap.name == "epoch"]
    return epochs[1], fit.history[1], engine.device


def batch_sizes(images: int, batch: int) -> list[int]:
    """The batch sizes of a pass over ``images`` in batches of ``batch`` (the last one partial)."""
    return [batch] * (images // batch) + ([images % batch] if images % batch else [])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_floor(cfg, device: torch.device, feature_images: int, train_images: int) -> dict:
    """Seconds of the training pass and of one feature pass on random tensors already on ``device``."""
    from bonecluster.device import mixed_precision
    from bonecluster.models import build_model

    t, k, side = cfg.train, cfg.cluster.round_k, cfg.data.size
    use_amp, dtype = mixed_precision(t, device)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, num_clusters=k, weights="none").to(device)
    if t.compile:   # as the engine does, so the floor is the same compiled network
        model.backbone.compile()
    opt = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and dtype == torch.float16)
    gen = torch.Generator().manual_seed(cfg.seed)
    most = max(t.batch_size, t.feature_batch_size)
    x = torch.rand(most, 1, side, side, generator=gen).to(device)
    y = torch.randint(k, (most,), generator=gen).to(device)

    def train_step(n: int) -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=use_amp):
            loss = F.cross_entropy(model(x[:n]).float(), y[:n])
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    @torch.no_grad()
    def feature_step(n: int) -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=use_amp):
            model.features(x[:n]).float()

    def timed(step, mode: str, sizes: list[int]) -> float:
        model.train(mode == "train")
        for n in dict.fromkeys(sizes):   # warm-up on each batch shape: thread pools, kernel choice,
            step(n)                      # the allocator, and a compiled model's graphs (train.compile)
        _sync(device)
        start = time.perf_counter()
        for n in sizes:
            step(n)
        _sync(device)
        return time.perf_counter() - start

    train_s = timed(train_step, "train", batch_sizes(train_images, t.batch_size))
    feature_s = timed(feature_step, "eval", batch_sizes(feature_images, t.feature_batch_size))
    return floor_result(train_s, feature_s, feature_images, train_images)


def floor_result(train_s: float, feature_s: float, feature_images: int, train_images: int) -> dict:
    """The floor's seconds and images/s for its training and feature passes."""
    return {"train_seconds": train_s, "feature_seconds": feature_s, "seconds": train_s + feature_s,
            "train_images_per_s": train_images / train_s, "feature_images_per_s": feature_images / feature_s}


def faster_floor(first: dict, second: dict, feature_images: int, train_images: int) -> dict:
    """Each pass's faster run of two :func:`measure_floor` results, in the same form."""
    return floor_result(min(first["train_seconds"], second["train_seconds"]),
                        min(first["feature_seconds"], second["feature_seconds"]), feature_images, train_images)


def phase_rows(lap) -> list[dict]:
    """The lap's phases in table order ("epoch", the time no nested phase accounts for, as "other")."""
    seconds = {("other" if name == "epoch" else name): s for name, s in lap.phases.items()}

    def rank(name: str) -> tuple:
        base = "k-means restart" if name.startswith("k-means restart") else name
        order = PHASES.index(base) if base in PHASES else len(PHASES)
        return order, int(name.rsplit(" ", 1)[1]) if base == "k-means restart" else 0, name

    return [{"phase": name, "seconds": seconds[name], "share": seconds[name] / lap.seconds}
            for name in sorted(seconds, key=rank)]


def _ratio(floor_seconds: float, engine_seconds: float | None) -> float | None:
    """Floor seconds over the engine's for the same work; None where the engine has no such phase."""
    return floor_seconds / engine_seconds if engine_seconds else None


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def report(r: dict) -> None:
    print(f"one engine epoch (the second of the run): {r['images']} images at {r['size']} px, {r['arch']}, "
          f"preset {r['preset']} ({r['method']}), {r['device']}{' (mixed precision)' if r['amp'] else ''}, "
          f"{r['threads']} threads, load {r['load_average']:.1f}")
    print("| phase | seconds | share of the epoch |")
    print("|---|---|---|")
    for row in r["phases"]:
        print(f"| {row['phase']} | {row['seconds']:.3f} | {100 * row['share']:.1f}% |")
    print(f"| **epoch** | **{r['epoch_seconds']:.3f}** | 100% |")
    f, n = r["floor"], r["feature_images"] + r["train_images"]
    print(f"engine: {n} images ({r['feature_images']} feature pass + {r['train_images']} training) "
          f"in {r['epoch_seconds']:.2f} s: {r['engine_images_per_s']:.1f} images/s")
    print(f"floor:  the same images in {f['seconds']:.2f} s: {r['floor_images_per_s']:.1f} images/s "
          f"(forward+backward+step {f['train_images_per_s']:.1f} images/s, forward only "
          f"{f['feature_images_per_s']:.1f} images/s)")
    print(f"floor_ratio (engine images/s over the floor's): {r['floor_ratio']:.3f}; the floor's two runs "
          f"(before and after the engine): {r['floor_runs'][0]['seconds']:.2f} and {r['floor_runs'][1]['seconds']:.2f} s "
          f"(drift {r['floor_drift']:.2f})")
    print(f"floor seconds over the engine's phase: training step {_fmt(r['train_step_ratio'])}, "
          f"features {_fmt(r['feature_ratio'])}; peak RSS {r['peak_rss_mb']:.0f} MiB")


def _fmt(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}"


def main(argv=None) -> dict:
    from bonecluster.config import load_config
    from bonecluster.data import prepare_sources
    from bonecluster.device import mixed_precision, pick_device

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", nargs="*", help="image sources (default: phantoms)")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--n", type=int, default=1000, help="phantoms (without DATA)")
    ap.add_argument("--size", type=int, help="phantom side and data.size (default: the preset's data.size)")
    ap.add_argument("--seed", type=int, default=0, help="phantom seed")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "bench_epoch"))
    ap.add_argument("--json", help="write the result here too")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    size_set = [f"data.size={args.size}"] if args.size else []
    cfg = load_config(args.preset, overrides=size_set + args.overrides + ["train.epochs=3"])
    work = Path(args.work)
    sources = args.data or [phantom_source(work, args.n, args.size or cfg.data.size, args.seed,
                                           cfg.data.workers or None)]
    data = prepare_sources(sources, cfg.data, cache=work / "cache", progress=not args.quiet)

    feature_images, train_images = len(data), cfg.train.images_per_epoch or len(data)
    device = pick_device(cfg.train.device)
    before = measure_floor(cfg, device, feature_images, train_images)
    lap, row, device = timed_epoch(cfg, data, work / "run", progress=not args.quiet)
    after = measure_floor(cfg, device, feature_images, train_images)
    floor = faster_floor(before, after, feature_images, train_images)
    phases = phase_rows(lap)
    seconds = {p["phase"]: p["seconds"] for p in phases}
    images = feature_images + train_images
    result = {
        "preset": args.preset, "method": cfg.method, "arch": cfg.model.arch, "size": cfg.data.size,
        "images": len(data), "device": str(device), "amp": mixed_precision(cfg.train, device)[0],
        "threads": torch.get_num_threads(), "batch_size": cfg.train.batch_size,
        "feature_batch_size": cfg.train.feature_batch_size, "feature_bn": cfg.train.feature_bn,
        "epoch_seconds": lap.seconds, "phases": phases,
        "feature_images": feature_images, "train_images": train_images,
        "engine_images_per_s": images / lap.seconds, "floor": floor,
        "floor_runs": [before, after], "floor_drift": after["seconds"] / before["seconds"],
        "floor_images_per_s": images / floor["seconds"], "floor_ratio": floor["seconds"] / lap.seconds,
        "train_step_ratio": _ratio(floor["train_seconds"], seconds.get("training step")),
        "feature_ratio": _ratio(floor["feature_seconds"], seconds.get("features")),
        "engine_row": {key: row.get(key) for key in ("loss", "seconds", "images_per_s", "kmeans_seconds")},
        "peak_rss_mb": peak_rss_mb(), "load_average": os.getloadavg()[0],
    }
    report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
