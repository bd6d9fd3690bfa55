"""Stage-1 quality and speed: train DeepCluster over several seeds and score the clusters.

By default the data are phantoms (``generate_phantoms(n=1400, size=128, seed=0)``), drawn in a
fresh temporary folder removed at the end (``--work`` keeps them, and the run folders, for the next
run with the same ``--work``: phantoms drawn by older code are then reused); give DATA paths (a
folder, a MURA tree, a manifest CSV...) to use real images instead. Labels are used only to score: Hungarian accuracy, NMI and ARI over the images that
carry a body part (unlabelled images are trained on but not scored).

Examples::

    python benchmarks/bench_stage1.py --seeds 0 1 2 --json stage1.json
    python benchmarks/bench_stage1.py --set train.epochs=5 --set cluster.pca_dim=64
    python benchmarks/bench_stage1.py ../shared/data/fracture-parts/manifest.csv --seeds 0

Prints one row per seed (Hungarian accuracy, NMI, ARI, largest cluster share, seconds,
training images/s) and the mean and standard deviation over seeds; ``uptime``'s load average
is recorded too, because timings on a shared machine depend on it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bonecluster.config import apply_override, load_config, to_dict
from bonecluster.data import prepare_sources
from bonecluster.engine import DeepClusterEngine
from bonecluster.metrics import cluster_scores


def phantom_source(work: Path, n: int, size: int, seed: int) -> Path:
    """Generate (once) the phantom set and return its folder."""
    folder = work / f"phantoms-n{n}-s{size}-seed{seed}"
    if not (folder / "train_image_paths.csv").exists():
        from bonecluster.data.phantoms import generate_phantoms

        generate_phantoms(folder, n=n, size=size, seed=seed, progress=False)
    return folder


def load_avg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def run_seed(cfg, data, out: Path, progress: bool) -> dict:
    t0 = time.perf_counter()
    fit = DeepClusterEngine(cfg, out, progress=progress).fit(data)
    seconds = time.perf_counter() - t0
    labelled = [(c, r.body_part) for c, r in zip(fit.assignments, data.records) if r.body_part]
    row = {"seed": cfg.seed, "epochs_run": fit.epochs_run, "collapsed": fit.collapsed,
           "seconds": round(seconds, 1), "load_after": load_avg()}
    if labelled:
        clusters, parts = zip(*labelled)
        scores = cluster_scores(np.asarray(clusters), np.asarray(parts))
        row.update(n_scored=len(labelled), acc=scores["accuracy_hungarian"], nmi=scores["nmi"],
                   ari=scores["ari"])
    sizes = np.bincount(fit.assignments, minlength=cfg.cluster.k)
    row["largest_share"] = float(sizes.max() / len(fit.assignments))
    speeds = [float(h["images_per_s"]) for h in fit.history if h.get("images_per_s") not in ("", None)]
    row["train_img_per_s"] = round(statistics.mean(speeds), 1) if speeds else None
    nmis = [float(h["nmi_prev"]) for h in fit.history if h.get("nmi_prev") not in ("", None)]
    row["nmi_prev_last"] = nmis[-1] if nmis else None
    return row


def fmt(x, spec=".3f") -> str:
    return "-" if x is None else format(x, spec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", nargs="*", help="data sources (default: generated phantoms)")
    p.add_argument("--preset", default="cpu")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--phantom-n", type=int, default=1400)
    p.add_argument("--phantom-size", type=int, default=128)
    p.add_argument("--phantom-seed", type=int, default=0)
    p.add_argument("--work", help="keep the phantoms, caches and run folders here and reuse the phantoms on the "
                   "next run with the same --work (default: a fresh temporary folder for phantoms, removed at the "
                   "end, so a phantom change is always drawn anew; TMPDIR/bench_stage1 for DATA)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", help="write the rows and the summary here")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args()

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_stage1-") as scratch:
        # real films keep their decode cache between runs (it follows each file's mtime); phantoms
        # are drawn anew, since a folder of them does not know which code drew it
        real_cache = Path(tempfile.gettempdir()) / "bench_stage1"
        run(args, Path(args.work) if args.work else real_cache if args.data else Path(scratch))


def run(args, work: Path) -> None:
    cfg = load_config(args.preset, overrides=args.overrides)
    sources = args.data or [phantom_source(work, args.phantom_n, args.phantom_size, args.phantom_seed)]
    cache = work / "cache"
    data = prepare_sources(sources, cfg.data, cache=cache, progress=False)
    n_labelled = sum(1 for r in data.records if r.body_part)
    print(f"data: {len(data)} images ({n_labelled} labelled, {len(data.skipped)} skipped) from "
          f"{', '.join(map(str, sources))}; preset {args.preset} {' '.join(args.overrides)}; "
          f"threads {torch.get_num_threads()}; load {load_avg()}", flush=True)

    rows = []
    header = f"{'seed':>4} {'acc':>6} {'nmi':>6} {'ari':>6} {'largest':>7} {'seconds':>8} {'img/s':>7} {'nmi_prev':>8}"
    print(header, flush=True)
    for seed in args.seeds:
        cfg_seed = apply_override(cfg, f"seed={seed}")
        tag = f"seed{seed}-{int(time.time() * 1000)}"
        row = run_seed(cfg_seed, data, work / "runs" / tag, args.progress)
        rows.append(row)
        print(f"{seed:>4} {fmt(row.get('acc')):>6} {fmt(row.get('nmi')):>6} {fmt(row.get('ari')):>6} "
              f"{row['largest_share']:>7.3f} {row['seconds']:>8.1f} {fmt(row['train_img_per_s'], '.0f'):>7} "
              f"{fmt(row['nmi_prev_last']):>8}", flush=True)

    summary = {}
    for key in ("acc", "nmi", "ari", "largest_share", "seconds", "train_img_per_s"):
        values = [r[key] for r in rows if r.get(key) is not None]
        if values:
            summary[key] = {"mean": statistics.mean(values),
                            "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    print("mean ± std over seeds " + " ".join(map(str, args.seeds)) + ": " +
          "  ".join(f"{k} {v['mean']:.3f}±{v['std']:.3f}" for k, v in summary.items()), flush=True)
    print(f"load after: {load_avg()}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "sources": [str(s) for s in sources], "preset": args.preset, "overrides": args.overrides,
            "config": to_dict(cfg), "rows": rows, "summary": summary, "host": platform.node(),
            "threads": torch.get_num_threads(), "n_images": len(data), "n_labelled": n_labelled,
        }, indent=2, default=str))


if __name__ == "__main__":
    main()
