"""Over-clusters merged through shared studies (``cluster.study_links``).

A study shows one body part in several views, and its views differ in exactly what k-means on
real films tends to split on: how much of the frame the limb fills, exposure, projection
(docs/RESULTS.md, "What k-means splits on"). Small k-means clusters are nearly pure, but k of
them are not. So the final clustering makes ``K > k`` clusters, links two clusters by how many
pairs of films of one study they hold between them, and cuts that graph into ``k`` groups with
spectral clustering (the normalised cut, Shi & Malik 2000; sklearn's ``SpectralClustering``).
Views of one study end up in one group even when k-means put them far apart. Study ids are used
only for equality, never as features, and no label is read (the idea is the must-link
constraint of constrained clustering, Wagstaff et al. 2001, applied to clusters).

Films without a study mate add no link. A weak cosine affinity between the K centroids
(``SIMILARITY_SHARE`` of the mean link) keeps the graph connected, so a cluster without links
still joins the group it lies nearest. Where too few films share a study
(:data:`MIN_LINKED_SHARE`) or there are no more films than K (:func:`why_not_linked`), the engine
clusters as if the option were off, and says so in the log.
"""

from __future__ import annotations

import numpy as np
import torch

from bonecluster.cluster import KMeansResult, assign

#: The cosine affinity between centroids, scaled to this share of the mean non-zero link weight.
SIMILARITY_SHARE = 0.01
#: Study links are used only when at least this share of the films has a study mate.
MIN_LINKED_SHARE = 0.5


def linked_share(studies: np.ndarray) -> float:
    """Share of the films ``studies`` (N,) int study numbers whose study holds another film."""
    if len(studies) == 0:
        return 0.0
    counts = np.bincount(studies)
    return float((counts[studies] >= 2).mean())


def study_link_weights(clusters: np.ndarray, studies: np.ndarray, n_clusters: int) -> np.ndarray:
    """``(K, K)`` symmetric link weights, zero diagonal.

    Each study of ``n`` films adds ``a_i * a_j / (n - 1)`` between every two clusters ``i != j``,
    where ``a_i`` is how many of its films are in cluster ``i``: the number of its film pairs
    split between the two, scaled so that a study adds at most ``n / 2`` over the unordered pairs
    of clusters (a large study does not outweigh many small ones by the square of its size).

    Args:
        clusters: ``(N,)`` cluster of each film, in ``0..K-1``.
        studies: ``(N,)`` study number of each film (``bonecluster.data.records.study_index``).
        n_clusters: ``K``.
    """
    clusters, studies = np.asarray(clusters, np.int64), np.asarray(studies, np.int64)
    if clusters.shape != studies.shape or clusters.ndim != 1:
        raise ValueError(f"clusters {clusters.shape} and studies {studies.shape} must be (N,) each")
    if len(studies) == 0:
        return np.zeros((n_clusters, n_clusters))
    counts = np.zeros((int(studies.max()) + 1, n_clusters))
    np.add.at(counts, (studies, clusters), 1.0)
    sizes = counts.sum(1)
    mates = sizes >= 2
    weights = (counts[mates] / (sizes[mates] - 1.0)[:, None]).T @ counts[mates]
    np.fill_diagonal(weights, 0.0)
    return weights


def merge_linked_clusters(centroids: torch.Tensor, links: np.ndarray, k: int, seed: int) -> np.ndarray | None:
    """``(K,)`` group in ``0..k-1`` of each of the K clusters (numbered in order of first
    appearance), or None when no two clusters are linked or the cut leaves a group empty.

    Args:
        centroids: ``(K, d)`` cluster centres (their cosine affinity joins unlinked clusters).
        links: ``(K, K)`` :func:`study_link_weights`.
        k: number of groups, ``2 <= k < K``.
        seed: ``random_state`` of the spectral embedding's solver.
    """
    from sklearn.cluster import SpectralClustering

    n = len(centroids)
    if not 2 <= k < n:
        raise ValueError(f"cannot merge {n} clusters into {k} groups (needs 2 <= k < {n})")
    positive = links[links > 0]
    if len(positive) == 0:
        return None
    unit = torch.nn.functional.normalize(centroids.detach().float().cpu(), dim=1).numpy().astype(np.float64)
    affinity = links + SIMILARITY_SHARE * positive.mean() * np.clip(unit @ unit.T, 0.0, None)
    spectral = SpectralClustering(n_clusters=k, affinity="precomputed", assign_labels="discretize",
                                  random_state=seed)
    groups = spectral.fit_predict(affinity).tolist()
    order = {g: i for i, g in enumerate(dict.fromkeys(groups))}
    if len(order) != k:
        return None
    return np.array([order[g] for g in groups], np.int64)


def why_not_linked(studies: np.ndarray, n_clusters: int, k: int) -> str | None:
    """Why ``n_clusters`` over-clusters of films in ``studies`` (N,) cannot be linked into ``k``
    (no more over-clusters than k, no more films than over-clusters, or fewer than
    :data:`MIN_LINKED_SHARE` of the films with a study mate), or None when they can."""
    if n_clusters <= k:
        return f"{n_clusters} clusters are not more than the {k} to make"
    if len(studies) <= n_clusters:
        return f"{len(studies)} images cannot make more than {n_clusters} clusters"
    share = linked_share(studies)
    if share < MIN_LINKED_SHARE:
        return (f"{100 * share:.0f}% of the {len(studies)} images share a study with another "
                f"(needs {100 * MIN_LINKED_SHARE:.0f}%)")
    return None


def why_not_merged(fine: KMeansResult, studies: np.ndarray, k: int) -> str:
    """Why :func:`link_clusters` gave None for ``fine`` and ``studies`` (N,), in words for the log.

    :func:`merge_linked_clusters` gives None in two cases: no film pair of one study lies in two
    clusters, or the cut made fewer than ``k`` groups (where the clusters with links are few and
    the rest hang on the weak centroid affinity alone). Call it only after such a None."""
    links = study_link_weights(fine.assignments.cpu().numpy(), studies, len(fine.centroids))
    if not (links > 0).any():
        return f"no study has films in two of the {len(fine.centroids)} clusters"
    return (f"the cut of the study links made fewer than {k} groups ({int((links > 0).any(1).sum())} of the "
            f"{len(fine.centroids)} clusters are linked to another)")


def link_clusters(fine: KMeansResult, studies: np.ndarray, k: int, seed: int) -> KMeansResult | None:
    """``fine`` (K clusters of N films) merged into ``k`` clusters through ``studies`` (N,): every
    centroid kept, ``groups`` (K,) its cluster, ``assignments`` the films' clusters. None when
    :func:`merge_linked_clusters` finds nothing to merge by."""
    links = study_link_weights(fine.assignments.cpu().numpy(), studies, len(fine.centroids))
    groups = merge_linked_clusters(fine.centroids, links, k, seed % 2**32)
    if groups is None:
        return None
    groups = torch.from_numpy(groups).to(fine.assignments.device)
    return KMeansResult(fine.centroids, groups[fine.assignments], fine.inertia, fine.n_splits, fine.backend,
                        groups=groups)


def assign_clusters(x: torch.Tensor, result: KMeansResult) -> torch.Tensor:
    """``(N,)`` cluster of each point ``(N, d)``: its nearest centroid's, through ``result.groups``."""
    labels = assign(x, result.centroids)[0]
    return labels if result.groups is None else result.groups.to(labels.device)[labels]


def cluster_probabilities(points: torch.Tensor, centroids: torch.Tensor, groups: torch.Tensor | None,
                          temperature: float) -> torch.Tensor:
    """``(N, k)`` softmax over the negative squared distances of ``points`` (N, d) to the ``centroids``
    (K, d) at ``temperature``, summed over each cluster's centroids (``groups`` (K,); None: one each)."""
    points, centroids = points.float(), centroids.float()
    sq = (points.pow(2).sum(1, keepdim=True) - 2 * points @ centroids.T + centroids.pow(2).sum(1)).clamp_min(0)
    return group_sums(torch.softmax(-sq / temperature, dim=1), groups)


def group_sums(per_centroid: torch.Tensor, groups: torch.Tensor | None) -> torch.Tensor:
    """``(N, K)`` values per centroid summed over each cluster's centroids -> ``(N, k)`` (``groups``
    (K,) the cluster of each centroid; None: one centroid a cluster, returned as it is)."""
    if groups is None:
        return per_centroid
    return per_centroid @ torch.nn.functional.one_hot(groups.long().cpu(), int(groups.max()) + 1).float()


def study_vote(labels: np.ndarray, probabilities: np.ndarray, studies: np.ndarray) -> np.ndarray:
    """``(N,)`` the cluster of each film's study: the one holding most of the study's films, a tie
    going to the tied cluster of the largest summed probability (``probabilities`` (N, k)).

    A study is one body part, so its views belong in one cluster (MURA scores studies, too)."""
    labels, studies = np.asarray(labels, np.int64), np.asarray(studies, np.int64)
    probabilities = np.asarray(probabilities, np.float64)
    if len(labels) == 0:
        return labels
    n_studies, k = int(studies.max()) + 1, probabilities.shape[1]
    counts = np.zeros((n_studies, k))
    np.add.at(counts, (studies, labels), 1.0)
    sums = np.zeros((n_studies, k))
    np.add.at(sums, studies, probabilities)
    # the summed probabilities are below the study's size, so divided by size + 1 they only break ties
    key = counts + sums / (counts.sum(1, keepdims=True) + 1.0)
    return key.argmax(1)[studies]
