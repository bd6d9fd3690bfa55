"""Scoring functions (labels are used only here, never in training).

Cluster quality: Hungarian accuracy (the best one-to-one map of clusters to classes),
majority accuracy (each cluster named after its commonest class, many-to-one), NMI and ARI.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score


def contingency(clusters: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts table (n_clusters, n_classes) plus the cluster ids and class names of its axes."""
    cluster_ids, ci = np.unique(np.asarray(clusters), return_inverse=True)
    class_ids, ki = np.unique(np.asarray(classes), return_inverse=True)
    table = np.zeros((len(cluster_ids), len(class_ids)), np.int64)
    np.add.at(table, (ci, ki), 1)
    return table, cluster_ids, class_ids


def hungarian_accuracy(clusters, classes) -> float:
    """Accuracy under the best one-to-one cluster->class map (unmatched clusters count wrong)."""
    table, _, _ = contingency(clusters, classes)
    rows, cols = linear_sum_assignment(-table)
    return float(table[rows, cols].sum() / max(table.sum(), 1))


def hungarian_mapping(clusters, classes) -> dict:
    """cluster id -> class under the Hungarian match (clusters left over are not in the map)."""
    table, cluster_ids, class_ids = contingency(clusters, classes)
    rows, cols = linear_sum_assignment(-table)
    return {cluster_ids[r].item(): class_ids[c].item() for r, c in zip(rows, cols)}


def majority_mapping(clusters, classes) -> dict:
    """cluster id -> its most frequent class (many-to-one; used to name over-clustered runs)."""
    table, cluster_ids, class_ids = contingency(clusters, classes)
    return {cluster_ids[i].item(): class_ids[table[i].argmax()].item() for i in range(len(cluster_ids))}


def majority_accuracy(clusters, classes) -> float:
    table, _, _ = contingency(clusters, classes)
    return float(table.max(axis=1).sum() / max(table.sum(), 1))


def nmi(a, b) -> float:
    return float(normalized_mutual_info_score(np.asarray(a), np.asarray(b)))


def ari(a, b) -> float:
    return float(adjusted_rand_score(np.asarray(a), np.asarray(b)))


def cluster_scores(clusters, classes) -> dict[str, float]:
    """All four cluster-quality numbers for one labelled set."""
    return {"accuracy_hungarian": hungarian_accuracy(clusters, classes),
            "accuracy_majority": majority_accuracy(clusters, classes),
            "nmi": nmi(clusters, classes), "ari": ari(clusters, classes)}
