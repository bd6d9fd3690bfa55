"""Do the clusters hold the parts? Over-clusters named with every label, against label-free merges.

    python benchmarks/bench_overclusters.py --data ../shared/data --run RUN [--work W] [--json OUT]
    python benchmarks/bench_overclusters.py --data ../shared/data --run RUN --variants k 15-average

A diagnostic for issue 21 on one trained stage-1 run (e.g. ``bench_real_suite.py``'s pool run), on
the suite's three evaluations and their split (``bench_real_suite.split_all``). For each
evaluation, on the training side's embedding (the run's PCA, L2-normalised; ``sklearn`` k-means,
``n_init=10``, one row per ``--restarts`` seed):

* ``k``: k-means with k = the number of classes (the suite's label-free figure, without study links);
* ``K-named`` (K = 15, 30, 60): K clusters, each named by the majority class of *every* labelled
  training film in it. This reads labels: it shows how pure the clusters are, what naming them
  (``bonecluster name``) could reach, not a label-free figure;
* ``K-ward``, ``K-average``, ``K-complete``, ``K-spectral``: K clusters merged into k without labels,
  by Ward linkage on the centroids, average or complete linkage on their cosine distance, or
  spectral clustering of the centroids' cosine affinity (every centroid weighs the same, whatever
  its cluster's size).

Held-out films take their cluster's name or merged group; each cell is the Hungarian accuracy
(the share named right for ``K-named``), mean ± std over the seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_real_suite import (EVALUATIONS, SOURCES, _embed, _labels, region_labels, require_data,  # noqa: E402
                              split_all)

OVER = (15, 30, 60)
MERGES = ("named", "ward", "average", "complete", "spectral")
VARIANTS = ("k",) + tuple(f"{n}-{m}" for n in OVER for m in MERGES)


def merge_centroids(centroids: np.ndarray, k: int, how: str, seed: int) -> np.ndarray:
    """``(K, d)`` centroids -> ``(K,)`` group of each, in ``range(k)``, without labels."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from sklearn.cluster import SpectralClustering

    if how == "ward":
        return fcluster(linkage(centroids, "ward"), k, "maxclust") - 1
    if how in ("average", "complete"):
        return fcluster(linkage(centroids, how, metric="cosine"), k, "maxclust") - 1
    if how == "spectral":
        unit = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
        affinity = np.exp((unit @ unit.T - 1) / 0.1)
        return SpectralClustering(k, affinity="precomputed", random_state=seed,
                                  assign_labels="discretize").fit_predict(affinity)
    raise ValueError(f"unknown merge {how!r}: choose one of {', '.join(MERGES[1:])}")


def majority_names(clusters: np.ndarray, labels: np.ndarray, n_clusters: int) -> np.ndarray:
    """Each cluster's commonest non-empty label ('' when it holds no labelled film)."""
    from bonecluster.metrics import majority_mapping

    known = labels != ""
    mapping = majority_mapping(clusters[known], labels[known]) if known.any() else {}
    return np.array([mapping.get(c, "") for c in range(n_clusters)], dtype=object)


def score_variant(variant: str, e_tr, y_tr, e_ev, y_ev, k: int, seed: int) -> float:
    from sklearn.cluster import KMeans

    from bonecluster.metrics import hungarian_accuracy

    scored = y_ev != ""
    if variant == "k":
        pred = KMeans(k, n_init=10, random_state=seed).fit(e_tr).predict(e_ev)
        return hungarian_accuracy(pred[scored], y_ev[scored])
    n, how = variant.split("-")
    km = KMeans(int(n), n_init=10, random_state=seed).fit(e_tr)
    held = km.predict(e_ev)
    if how == "named":
        names = majority_names(km.labels_, y_tr, int(n))
        return float((names[held][scored] == y_ev[scored]).mean())
    group = merge_centroids(km.cluster_centers_, k, how, seed)
    return hungarian_accuracy(group[held][scored], y_ev[scored])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--run", required=True, help="a stage-1 run trained on training-side films only")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "bench_real_suite"),
                    help="where the suite's split lives (the same split either way)")
    ap.add_argument("--evaluations", nargs="+", default=[e.key for e in EVALUATIONS], choices=[e.key for e in EVALUATIONS])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--restarts", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    from bonecluster.checkpoint import TrainedClusters
    from bonecluster.data import prepare_sources

    data, run = require_data(args.data), Path(args.run)
    splits = split_all(data, Path(args.work))
    trained = TrainedClusters.load(run / "stage1")
    cache = trained.cfg.data.cache or run / "cache"
    regions = region_labels(data) if (data / SOURCES["fracatlas"]).exists() else {}
    result = {"run": str(run), "restarts": args.restarts, "evaluations": {}}
    for ev in EVALUATIONS:
        if ev.key not in args.evaluations or not all(s in splits for s in ev.sources):
            continue
        sides = []
        for j in (0, 1):   # training side, held-out side
            ds = prepare_sources([str(splits[s][j]) for s in ev.sources], trained.cfg.data, cache=cache, progress=False)
            sides.append((_embed(trained, ds.images())[0], _labels(ds.records, ev.label, regions)))
        (e_tr, y_tr), (e_ev, y_ev) = sides
        k = len(set(y_ev[y_ev != ""]) | set(y_tr[y_tr != ""]))
        rows = {}
        for variant in args.variants:
            if variant != "k" and int(variant.split("-")[0]) > len(e_tr):
                print(f"({ev.key}) {variant}: skipped, more clusters than the {len(e_tr)} training films")
                continue
            scores = [score_variant(variant, e_tr, y_tr, e_ev, y_ev, k, seed) for seed in range(args.restarts)]
            rows[variant] = {"mean": float(np.mean(scores)), "std": float(np.std(scores)),
                             "scores": [round(s, 4) for s in scores]}
            print(f"({ev.key}) {ev.title}, k = {k}: {variant:<12} {rows[variant]['mean']:.3f} ± "
                  f"{rows[variant]['std']:.3f}", flush=True)
        result["evaluations"][ev.key] = {"title": ev.title, "k": k, "variants": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
