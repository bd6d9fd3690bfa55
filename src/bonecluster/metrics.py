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


# ----------------------------------------------------------------------------- binary (abnormality)


def confusion_counts(y_true, y_pred) -> dict[str, int]:
    """tp, fp, tn, fn for boolean truth and prediction (True = abnormal / positive)."""
    t, p = np.asarray(y_true, bool), np.asarray(y_pred, bool)
    return {"tp": int((t & p).sum()), "fp": int((~t & p).sum()), "tn": int((~t & ~p).sum()),
            "fn": int((t & ~p).sum())}


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def binary_scores(y_true, y_pred) -> dict[str, float | None]:
    """Sensitivity TP/(TP+FN), specificity TN/(TN+FP) and precision TP/(TP+FP).

    The preprint this project follows calls TP/(TP+FP) "specificity"; that is precision, and we
    report the two apart. A ratio with an empty denominator is None (undefined), not 0.
    """
    c = confusion_counts(y_true, y_pred)
    return {"sensitivity": _ratio(c["tp"], c["tp"] + c["fn"]),
            "specificity": _ratio(c["tn"], c["tn"] + c["fp"]),
            "precision": _ratio(c["tp"], c["tp"] + c["fp"])}


def auroc(y_true, scores) -> float | None:
    """Area under the ROC curve; None when only one class is present."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y_true, bool)
    if y.all() or not y.any():
        return None
    return float(roc_auc_score(y, np.asarray(scores, float)))


def cohen_kappa(y_true, y_pred) -> float | None:
    """Cohen's kappa between truth and prediction (MURA's study-level agreement statistic)."""
    from sklearn.metrics import cohen_kappa_score

    t, p = np.asarray(y_true, bool), np.asarray(y_pred, bool)
    if len(t) == 0:
        return None
    if (t == t[0]).all() and (p == p[0]).all():
        return 1.0 if (t == p).all() else 0.0  # sklearn returns NaN when both raters are constant
    return float(cohen_kappa_score(t, p))


def per_class_binary(clusters_named, classes, names) -> dict[str, dict]:
    """One-vs-rest sensitivity/specificity/precision per class name (stage-1 per body part)."""
    pred, true = np.asarray(clusters_named), np.asarray(classes)
    return {name: {"n": int((true == name).sum()), **binary_scores(true == name, pred == name)}
            for name in names}


def macro(rows: dict[str, dict], keys) -> dict[str, float | None]:
    """Unweighted mean of each key over rows, ignoring undefined (None) values."""
    out = {}
    for key in keys:
        vals = [r[key] for r in rows.values() if r.get(key) is not None]
        out[key] = float(np.mean(vals)) if vals else None
    return out


def study_level(study_ids, image_scores, how: str = "mean") -> tuple[list, np.ndarray]:
    """Aggregate image scores per study (MURA's convention: the mean; or the max)."""
    if how not in ("mean", "max"):
        raise ValueError(f"study aggregation must be 'mean' or 'max', got {how!r}")
    ids = np.asarray(study_ids, dtype=object)
    scores = np.asarray(image_scores, float)
    keys = list(dict.fromkeys(ids.tolist()))
    agg = np.mean if how == "mean" else np.max
    return keys, np.array([agg(scores[ids == k]) for k in keys])
