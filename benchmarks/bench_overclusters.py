"""Do the clusters hold the parts? Over-clusters named with every label, against label-free merges.

    python benchmarks/bench_overclusters.py --data ../shared/data --run RUN [--work W] [--json OUT]
    python benchmarks/bench_overclusters.py --data ../shared/data --run RUN --variants k 15-average
    python benchmarks/bench_overclusters.py --data ../shared/data --run RUN --variants k --truth

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
* ``graph-spectral``, ``graph-ward``: no over-clusters; the training films themselves grouped into k
  along their 10-nearest-neighbour graph (cosine), by spectral clustering of the graph (Shi and
  Malik 2000, with Yu and Shi 2003's discretised labels) or by Ward linkage allowed to join only
  graph neighbours (sklearn's connectivity).
  A region that is a chain of look-alikes (foot, ankle, shank, knee) can then stay one group where
  k-means cuts it. Held-out films take the commonest group of their 10 nearest training films.
* ``gmm-diag``, ``gmm-full``: no over-clusters; a Gaussian mixture of k components with its own
  diagonal or full covariance each (sklearn, k-means-initialised), where k-means gives every cluster
  the same round spread: a wide class (60% of FracAtlas is leg: feet to knees) can then be one broad
  component beside tight ones. Held-out films take their most probable component.

Held-out films take their cluster's name or merged group; each cell is the Hungarian accuracy
(the share named right for ``K-named``), mean ± std over the seeds. The graph and mixture variants
run only when ``--variants`` names them.

``--truth`` adds, per evaluation, whether the classes are what k-means looks for at all (reads every
training-side label; on the labelled training films only, one k-means with ``n_init=10``):

* ``inertia_ratio``: the within-class sum of squares of the labelled partition over k-means' own.
  Above 1, k-means' objective prefers another partition to the classes, so its best restart is
  not them;
* ``nearest_mean``: held-out films given the class whose training mean is nearest (a labelled
  cut of the same embedding by k centres; not a ceiling: other cuts can do better);
* ``from_truth``, ``from_truth_inertia_ratio`` and ``from_truth_iterations``: k-means started at
  those class means and run until no film changes cluster (``tol=0``); whether the classes are at
  least a local optimum it stays in;
* ``kmeans``: the same films' k-means from random starts, for comparison, held out.
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
GRAPHS = ("spectral", "ward")
GRAPH_NEIGHBOURS = 10
MIXTURES = ("diag", "full")
DEFAULT_VARIANTS = ("k",) + tuple(f"{n}-{m}" for n in OVER for m in MERGES)
VARIANTS = DEFAULT_VARIANTS + tuple(f"graph-{g}" for g in GRAPHS) + tuple(f"gmm-{c}" for c in MIXTURES)


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


def group_films_on_graph(embedding: np.ndarray, k: int, how: str, seed: int,
                         neighbours: int = GRAPH_NEIGHBOURS) -> np.ndarray:
    """``(N, d)`` L2-normalised films -> ``(N,)`` group of each, in ``range(k)``, along their kNN graph."""
    from sklearn.cluster import AgglomerativeClustering, SpectralClustering
    from sklearn.neighbors import kneighbors_graph

    graph = kneighbors_graph(embedding, min(neighbours, len(embedding) - 1), metric="cosine", include_self=False)
    graph = 0.5 * (graph + graph.T)   # symmetric: i and j are linked when either is among the other's nearest
    if how == "spectral":
        return SpectralClustering(k, affinity="precomputed", random_state=seed,
                                  assign_labels="discretize").fit_predict(graph)
    if how == "ward":
        return AgglomerativeClustering(k, linkage="ward", connectivity=graph).fit_predict(embedding)
    raise ValueError(f"unknown graph grouping {how!r}: choose one of {', '.join(GRAPHS)}")


def assign_by_neighbours(e_tr: np.ndarray, groups: np.ndarray, e_ev: np.ndarray,
                         neighbours: int = GRAPH_NEIGHBOURS) -> np.ndarray:
    """Each held-out film ``(M, d)`` -> the commonest group among its nearest training films (cosine)."""
    from sklearn.neighbors import KNeighborsClassifier

    knn = KNeighborsClassifier(min(neighbours, len(e_tr)), metric="cosine").fit(e_tr, groups)
    return knn.predict(e_ev)


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
    if n == "gmm":
        from sklearn.mixture import GaussianMixture

        mixture = GaussianMixture(k, covariance_type=how, n_init=3, reg_covar=1e-4, random_state=seed).fit(e_tr)
        return hungarian_accuracy(mixture.predict(e_ev)[scored], y_ev[scored])
    if n == "graph":
        groups = group_films_on_graph(e_tr, k, how, seed)
        return hungarian_accuracy(assign_by_neighbours(e_tr, groups, e_ev)[scored], y_ev[scored])
    km = KMeans(int(n), n_init=10, random_state=seed).fit(e_tr)
    held = km.predict(e_ev)
    if how == "named":
        names = majority_names(km.labels_, y_tr, int(n))
        return float((names[held][scored] == y_ev[scored]).mean())
    group = merge_centroids(km.cluster_centers_, k, how, seed)
    return hungarian_accuracy(group[held][scored], y_ev[scored])


def partition_inertia(embedding: np.ndarray, groups: np.ndarray) -> float:
    """Within-group sum of squared distances to each group's mean, ``(N, d)`` and ``(N,)``."""
    return float(sum(((embedding[groups == g] - embedding[groups == g].mean(0)) ** 2).sum() for g in np.unique(groups)))


def truth_check(e_tr, y_tr, e_ev, y_ev, seed: int = 0) -> dict:
    """Are the labelled classes a k-means optimum? Reads every training label (see ``--truth``)."""
    from sklearn.cluster import KMeans

    from bonecluster.metrics import hungarian_accuracy

    labelled, scored = y_tr != "", y_ev != ""
    e, y = e_tr[labelled], y_tr[labelled]
    classes = np.array(sorted(set(y)))
    means = np.stack([e[y == c].mean(0) for c in classes])
    km = KMeans(len(classes), n_init=10, random_state=seed).fit(e)
    from_truth = KMeans(len(classes), init=means, n_init=1, tol=0, max_iter=1000).fit(e)
    nearest = classes[np.argmin(((e_ev[scored][:, None] - means[None]) ** 2).sum(-1), axis=1)]
    return {"inertia_ratio": partition_inertia(e, y) / float(km.inertia_),
            "from_truth_inertia_ratio": float(from_truth.inertia_) / float(km.inertia_),
            "from_truth_iterations": int(from_truth.n_iter_),
            "nearest_mean": float((nearest == y_ev[scored]).mean()),
            "from_truth": hungarian_accuracy(from_truth.predict(e_ev[scored]), y_ev[scored]),
            "kmeans": hungarian_accuracy(km.predict(e_ev[scored]), y_ev[scored])}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--run", required=True, help="a stage-1 run trained on training-side films only")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "bench_real_suite"),
                    help="where the suite's split lives (the same split either way)")
    ap.add_argument("--evaluations", nargs="+", default=[e.key for e in EVALUATIONS], choices=[e.key for e in EVALUATIONS])
    ap.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=VARIANTS)
    ap.add_argument("--restarts", type=int, default=5)
    ap.add_argument("--truth", action="store_true", help="add whether the classes are a k-means optimum (reads labels)")
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
            head = variant.split("-")[0]   # the number of over-clusters, for the K-* variants
            if head.isdigit() and int(head) > len(e_tr):
                print(f"({ev.key}) {variant}: skipped, more clusters than the {len(e_tr)} training films")
                continue
            scores = [score_variant(variant, e_tr, y_tr, e_ev, y_ev, k, seed) for seed in range(args.restarts)]
            rows[variant] = {"mean": float(np.mean(scores)), "std": float(np.std(scores)),
                             "scores": [round(s, 4) for s in scores]}
            print(f"({ev.key}) {ev.title}, k = {k}: {variant:<12} {rows[variant]['mean']:.3f} ± "
                  f"{rows[variant]['std']:.3f}", flush=True)
        result["evaluations"][ev.key] = {"title": ev.title, "k": k, "variants": rows}
        if args.truth:
            truth = result["evaluations"][ev.key]["truth"] = truth_check(e_tr, y_tr, e_ev, y_ev)
            print(f"({ev.key}) the classes against k-means: " + ", ".join(f"{n} {v:.3f}" if isinstance(v, float) else f"{n} {v}" for n, v in truth.items()), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
