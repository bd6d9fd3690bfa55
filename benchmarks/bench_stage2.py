"""Stage-2 abnormality scores: per-part image AUROC on held-out phantoms, labels used only to score.

Trains (or reuses) a demo run -- ``bonecluster.demo.run_demo``: 1,400 training phantoms and
n/4 held-out ``valid`` phantoms of the given seed -- then, for each body part, refits the
label-free anomaly model (``stage2.*`` settings, ``--set`` overrides applied) from the part model
and the part's training images, and scores the held-out images of that part. Refitting only the
anomaly model is cheap (seconds), so scoring settings can be compared on the same trained models;
settings that change training (``stage2.k``, ``stage2.epochs``) need a fresh ``--work`` folder.

Examples::

    python benchmarks/bench_stage2.py --work /tmp/s2dev --seed 0
    python benchmarks/bench_stage2.py --work runs/demo --set stage2.score=global --set stage2.pca_dim=16
    python benchmarks/bench_stage2.py --work /tmp/s2seed1 --seed 1 --json stage2-seed1.json

Prints one row per part (images, abnormal share, AUROC, share of training and held-out images
flagged at the label-free threshold, sensitivity, specificity) and the macro mean over parts.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from bonecluster.config import apply_override, config_from_dict, load_config, read_yaml
from bonecluster.data import prepare_sources
from bonecluster.engine import TrainedClusters
from bonecluster.metrics import auroc
from bonecluster.stage2 import fit_part_anomaly, group_by_part


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-stage2"), help="demo run folder (reused if trained)")
    ap.add_argument("--seed", type=int, default=0, help="phantom and training seed of a new run")
    ap.add_argument("--n", type=int, default=1400)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    work = args.work
    if not (work / "stage2").is_dir():
        from bonecluster.demo import run_demo

        cfg = load_config(args.preset, overrides=[f"seed={args.seed}", *args.set])
        t0 = time.perf_counter()
        run_demo(work, cfg, n=args.n, seed=args.seed, progress=False)
        print(f"trained the demo run in {time.perf_counter() - t0:.0f} s")
    cfg = config_from_dict(read_yaml(work / "config.yaml"))
    for item in args.set:
        cfg = apply_override(cfg, item)
    train = prepare_sources([work / "phantoms"], cfg.data, cache=work / "cache", progress=False)
    valid = prepare_sources([work / "phantoms-valid"], cfg.data, cache=work / "cache", progress=False)
    valid_groups = group_by_part(valid)

    rows, t0 = {}, time.perf_counter()
    for part, pos in group_by_part(train).items():
        folder = work / "stage2" / part
        if part not in valid_groups or not (folder / "model.pt").exists():
            continue
        trained = TrainedClusters.load(folder)
        anomaly = fit_part_anomaly(trained, train.subset(pos), cfg)
        vpos = valid_groups[part]
        truth = np.array([valid.records[i].abnormal for i in vpos], bool)
        scores = anomaly.score(trained, valid.images()[vpos]).numpy()
        flags = scores >= anomaly.threshold
        rows[part] = {"n": len(vpos), "abnormal": float(truth.mean()), "auroc": auroc(truth, scores),
                      "flag_train": float((anomaly.train_scores >= anomaly.threshold).float().mean()),
                      "flag_valid": float(flags.mean()),
                      "sensitivity": float(flags[truth].mean()) if truth.any() else None,
                      "specificity": float((~flags[~truth]).mean()) if (~truth).any() else None}
    seconds = time.perf_counter() - t0

    keys = ("auroc", "flag_train", "flag_valid", "sensitivity", "specificity")
    print(f"{'part':<10}{'n':>5}{'abn':>7}" + "".join(f"{k:>13}" for k in keys))
    for part, r in rows.items():
        print(f"{part:<10}{r['n']:>5}{r['abnormal']:>7.2f}"
              + "".join(f"{r[k]:>13.3f}" if r[k] is not None else f"{'-':>13}" for k in keys))
    macro = {k: float(np.mean([r[k] for r in rows.values() if r[k] is not None])) for k in keys}
    print(f"{'macro':<22}" + "".join(f"{macro[k]:>13.3f}" for k in keys))
    print(f"settings: {cfg.stage2}; anomaly fit + scoring {seconds:.1f} s")
    if args.json:
        args.json.write_text(json.dumps({"work": str(work), "stage2": vars(cfg.stage2), "per_part": rows,
                                         "macro": macro, "seconds": round(seconds, 1)}, indent=2))


if __name__ == "__main__":
    main()
