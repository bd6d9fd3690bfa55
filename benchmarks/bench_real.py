"""Real radiographs: train without labels on one set, evaluate on images training never saw.

    python benchmarks/bench_real.py --train DATA... --eval DATA... [--preset cpu] [--set k=v ...]
    python benchmarks/bench_real.py --split ../shared/data/fracture-parts/manifest.csv --holdout 0.3 --stages 1

``--split MANIFEST_OR_FOLDER`` splits one labelled source by study (patient when there is no
study id; the file path otherwise) into train and eval manifests under ``--work`` with a fixed
seed, so no study is on both sides. Training never sees labels; evaluation uses them to score.
Prints the metrics JSON (the pipeline's ``metrics.json``) with the wall times, and writes
``--json``.

``--kmeans-restarts R`` (default 5) also re-runs the final k-means step R times with other
seeds on the same trained network and reports the spread of the held-out Hungarian accuracy:
on real films one k-means seed can move that figure by several points, so a single number
overstates what the method reliably gives.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path


def split_source(source: str, holdout: float, work: Path, seed: int = 0) -> tuple[Path, Path]:
    """Write train.csv and eval.csv manifests (path,body_part,abnormal,patient,study,split).

    Each study (else patient, else file) goes to one side by a seeded hash of its key. A file's key
    is its path relative to the source's folder, behind that folder's name, so the split is the same
    however the source is spelled (``../shared/...`` or an absolute path) and wherever it is run.
    """
    from bonecluster.data import read_records

    records = read_records(source)
    root = Path(source).resolve()
    root = root.parent if root.is_file() else root
    rows = {"train": [], "eval": []}
    for r in records:
        inside = Path(os.path.relpath(Path(r.path).resolve(), root)).as_posix()   # the file's path in the source
        group = r.study or r.patient or f"{root.name}/{inside}"
        h = int(hashlib.sha256(f"{seed}:{group}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        side = "eval" if h < holdout else "train"
        rows[side].append([os.path.abspath(r.path), r.body_part or "",
                           "" if r.abnormal is None else int(r.abnormal), r.patient or "", r.study or "", side])
    work.mkdir(parents=True, exist_ok=True)
    paths = []
    for side in ("train", "eval"):
        p = work / f"{side}.csv"
        with open(p, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "body_part", "abnormal", "patient", "study", "split"])
            w.writerows(rows[side])
        paths.append(p)
    return paths[0], paths[1]


def restart_seeds(restart: int, n_init: int) -> list[int]:
    """The k-means seeds of restart number ``restart``: ``n_init`` of them, the best of which wins."""
    return [7919 * (restart + 1) + 104_729 * i for i in range(max(n_init, 1))]


K_MEANS_METHODS = ("deepcluster", "simclr", "simclr-deepcluster", "dino")  # final clusters = plain k-means


def final_kmeans(x, k: int, seeds: list[int], c, studies=None):
    """(KMeansResult, linked) for points ``x`` (N, d), as the engine's final clustering makes them:
    with ``c.study_links`` (a ClusterConfig) K over-clusters merged into ``k`` through ``studies``
    (N,) where they apply (``linked`` True), else plain k-means, best of ``seeds``."""
    from bonecluster.cluster import kmeans_best_of
    from bonecluster.study_links import link_clusters, why_not_linked

    options = dict(niter=c.niter, init=c.init, backend=c.backend)
    if c.study_links and studies is not None and why_not_linked(studies, c.study_links, k) is None:
        linked = link_clusters(kmeans_best_of(x, c.study_links, seeds, **options), studies, k, seeds[0])
        if linked is not None:
            return linked, True
    return kmeans_best_of(x, k, seeds, **options), False


def kmeans_restart_spread(run: Path, eval_src: list[str], restarts: int) -> dict | None:
    """Held-out Hungarian accuracy of the stage-1 k-means step re-run with ``restarts`` new seeds
    on the trained network's (fixed) PCA-whitened embeddings; best of ``cluster.n_init`` per seed,
    and merged through shared studies with ``cluster.study_links``, as the engine does. None for
    methods whose final clusters are not plain k-means."""
    import numpy as np

    from bonecluster.data import prepare_sources
    from bonecluster.data.records import study_index
    from bonecluster.study_links import assign_clusters
    from bonecluster.data.cache import PreparedDataset
    from bonecluster.checkpoint import TrainedClusters
    from bonecluster.metrics import hungarian_accuracy
    from bonecluster.stage2.scoring import embed_images

    trained = TrainedClusters.load(run / "stage1")
    cfg = trained.cfg
    if restarts < 1 or cfg.method not in K_MEANS_METHODS:
        return None
    held_out = prepare_sources(eval_src, cfg.data, cache=cfg.data.cache or run / "cache", progress=False)
    parts = np.array([r.body_part or "" for r in held_out.records])
    labelled = parts != ""
    training = PreparedDataset.load(run / "data.json")
    x_train = embed_images(trained, training.images())
    studies = study_index(training.records)
    x_eval = embed_images(trained, held_out.images())
    scores = []
    for r in range(restarts):
        best, _ = final_kmeans(x_train, cfg.cluster.k, restart_seeds(r, cfg.cluster.n_init), cfg.cluster, studies)
        clusters = assign_clusters(x_eval, best).numpy()
        scores.append(hungarian_accuracy(clusters[labelled], parts[labelled]))
    return {"restarts": restarts, "mean": float(np.mean(scores)), "std": float(np.std(scores)),
            "min": float(np.min(scores)), "max": float(np.max(scores)), "scores": [round(v, 4) for v in scores]}


def main(argv=None) -> dict:
    from bonecluster.config import load_config
    from bonecluster.evaluate import evaluate
    from bonecluster.report import comparison_table
    from bonecluster.pipeline import train

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", nargs="*", default=[], help="training data (labels unused)")
    ap.add_argument("--eval", nargs="*", default=[], help="labelled evaluation data")
    ap.add_argument("--split", help="one labelled source to split into train and eval by study")
    ap.add_argument("--holdout", type=float, default=0.3, help="eval share with --split")
    ap.add_argument("--stages", default="1,2")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "bench_real"))
    ap.add_argument("--json")
    ap.add_argument("--kmeans-restarts", type=int, default=5,
                    help="re-run stage 1's final k-means with this many other seeds (0: off)")
    args = ap.parse_args(argv)
    work = Path(args.work)
    train_src, eval_src = list(args.train), list(args.eval)
    if args.split:
        tr, ev = split_source(args.split, args.holdout, work)
        train_src, eval_src = train_src + [str(tr)], eval_src + [str(ev)]
    if not train_src or not eval_src:
        ap.error("give --train and --eval, or --split")
    cfg = load_config(args.preset, overrides=args.overrides)
    stages = [int(s) for s in args.stages.split(",")]
    t0 = time.perf_counter()
    summary = train(train_src, work / "run", cfg, stages=stages, progress=False)
    t1 = time.perf_counter()
    metrics = evaluate(work / "run", eval_src, work / "metrics.json", report_dir=work, progress=False)
    t2 = time.perf_counter()
    result = {"train": train_src, "eval": eval_src, "preset": args.preset, "overrides": args.overrides,
              "stages": stages, "train_seconds": round(t1 - t0, 1), "eval_seconds": round(t2 - t1, 1),
              "train_images": summary.get("stage1", {}).get("n_images"), "metrics": metrics}
    if 1 in stages and "stage1" in metrics:
        result["stage1_kmeans_restarts"] = kmeans_restart_spread(work / "run", eval_src, args.kmeans_restarts)
    print(json.dumps(result, indent=2))
    print(comparison_table(metrics))
    spread = result.get("stage1_kmeans_restarts")
    if spread:
        print(f"stage 1 held-out Hungarian over {spread['restarts']} k-means restarts: "
              f"{spread['mean']:.3f} ± {spread['std']:.3f} (min {spread['min']:.3f}, max {spread['max']:.3f})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
