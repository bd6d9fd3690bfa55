"""Over-clusters merged through shared studies (bonecluster.study_links): exact weights, the cut,
and a case where plain k-means splits on a nuisance that the studies undo."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bonecluster.cluster import KMeansResult, kmeans, kmeans_best_of
from bonecluster.metrics import hungarian_accuracy
from bonecluster.study_links import (assign_clusters, link_clusters, linked_share, merge_linked_clusters,
                                     study_link_weights, why_not_linked, why_not_merged)


def test_link_weights_count_split_pairs_of_a_study_over_its_size_less_one():
    # study 0: films in clusters 0, 1, 1 (n = 3): pairs split between 0 and 1: 1 x 2, over n - 1 = 2
    # study 1: one film, no mate, no link; study 2: clusters 2 and 2, a pair inside one cluster
    clusters = np.array([0, 1, 1, 2, 2, 2])
    studies = np.array([0, 0, 0, 1, 2, 2])
    w = study_link_weights(clusters, studies, 4)
    expected = np.zeros((4, 4))
    expected[0, 1] = expected[1, 0] = 1.0
    np.testing.assert_array_equal(w, expected)


def test_link_weights_match_the_pairwise_definition_on_random_films():
    rng = np.random.default_rng(0)
    clusters, studies = rng.integers(0, 6, 200), rng.integers(0, 70, 200)
    brute = np.zeros((6, 6))
    for s in np.unique(studies):
        members = clusters[studies == s]
        if len(members) < 2:
            continue
        for i in range(len(members)):
            for j in range(len(members)):
                if i != j and members[i] != members[j]:
                    brute[members[i], members[j]] += 1.0 / (len(members) - 1)
    np.testing.assert_allclose(study_link_weights(clusters, studies, 6), brute, atol=1e-12)


def test_link_weights_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="must be"):
        study_link_weights(np.zeros(3, int), np.zeros(4, int), 2)


def test_linked_share_counts_films_with_a_study_mate():
    assert linked_share(np.array([0, 0, 1, 2, 2, 2])) == pytest.approx(5 / 6)
    assert linked_share(np.arange(5)) == 0.0 and linked_share(np.array([], int)) == 0.0
    assert why_not_linked(np.array([0, 0, 1, 1, 2]), 3, 2) is None
    assert "40% of the 5 images share a study" in why_not_linked(np.array([0, 0, 1, 2, 3]), 3, 2)
    assert "5 images cannot make more than 5 clusters" in why_not_linked(np.array([0, 0, 1, 1, 2]), 5, 2)
    assert "3 clusters are not more than the 3 to make" in why_not_linked(np.array([0, 0, 1, 1, 2]), 3, 3)


def test_the_cut_follows_the_links_not_the_centroids():
    # clusters 0-2 linked to each other, 3-5 to each other; the centroids say 0 ~ 3, 1 ~ 4, 2 ~ 5
    links = np.zeros((6, 6))
    for block in ((0, 1, 2), (3, 4, 5)):
        for i in block:
            for j in block:
                links[i, j] = 0.0 if i == j else 5.0
    links[2, 3] = links[3, 2] = 0.5   # one weak bridge
    base = torch.eye(3)
    centroids = torch.cat([base, base])
    groups = merge_linked_clusters(centroids, links, 2, seed=0)
    assert groups.tolist() == [0, 0, 0, 1, 1, 1]


def test_no_links_or_an_impossible_k_give_none_or_an_error():
    centroids = torch.randn(5, 3)
    assert merge_linked_clusters(centroids, np.zeros((5, 5)), 2, seed=0) is None
    with pytest.raises(ValueError, match="cannot merge 5 clusters into 5"):
        merge_linked_clusters(centroids, np.ones((5, 5)), 5, seed=0)
    with pytest.raises(ValueError, match="into 1"):
        merge_linked_clusters(centroids, np.ones((5, 5)), 1, seed=0)


def _nuisance_films(n_studies=60, seed=0):
    """Two parts 1 apart along y; a nuisance 8 apart along x (how much of the frame a film fills,
    say). Every study is one part, with one film at each nuisance level."""
    rng = np.random.default_rng(seed)
    points, parts, studies = [], [], []
    for s in range(n_studies):
        part = s % 2
        for level in (0.0, 8.0):
            points.append([level + rng.normal(0, 0.5), part + rng.normal(0, 0.15)])
            parts.append(part)
            studies.append(s)
    return torch.tensor(points, dtype=torch.float32), np.array(parts), np.array(studies)


def test_studies_undo_a_nuisance_that_plain_k_means_splits_on():
    x, parts, studies = _nuisance_films()
    plain = kmeans(x, 2, seed=0, backend="torch")
    assert hungarian_accuracy(plain.assignments.numpy(), parts) < 0.6   # k-means cuts the nuisance
    fine = kmeans_best_of(x, 8, [0, 1, 2], backend="torch")
    linked = link_clusters(fine, studies, 2, seed=0)
    assert linked is not None and linked.groups.shape == (8,)
    assert hungarian_accuracy(linked.assignments.numpy(), parts) == 1.0
    torch.testing.assert_close(linked.centroids, fine.centroids)   # every centroid is kept
    # new films of each part, at either nuisance level, go to their part's cluster
    new, new_parts, _ = _nuisance_films(20, seed=1)
    assert hungarian_accuracy(assign_clusters(new, linked).numpy(), new_parts) == 1.0


def test_assign_clusters_maps_the_nearest_centroid_through_groups():
    result = KMeansResult(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]), torch.zeros(0, dtype=torch.long),
                          0.0, 0, "torch", groups=torch.tensor([1, 0, 1]))
    x = torch.tensor([[0.5, 0.0], [9.0, 1.0], [0.0, 8.0]])
    assert assign_clusters(x, result).tolist() == [1, 0, 1]
    plain = KMeansResult(result.centroids, result.assignments, 0.0, 0, "torch")
    assert assign_clusters(x, plain).tolist() == [0, 1, 2]


def test_a_study_takes_the_cluster_most_of_its_films_are_in_ties_to_the_larger_summed_probability():
    from bonecluster.study_links import study_vote

    labels = np.array([0, 0, 1, 1, 0, 2, 2])
    studies = np.array([0, 0, 0, 1, 1, 2, 2])
    prob = np.array([[.6, .3, .1], [.6, .3, .1], [.2, .7, .1],   # study 0: two of three in 0
                     [.1, .5, .4], [.9, .05, .05],               # study 1: a tie, 0 holds 1.0 against 0.55
                     [.0, .1, .9], [.1, .1, .8]])                # study 2: both in 2
    assert study_vote(labels, prob, studies).tolist() == [0, 0, 0, 0, 0, 2, 2]
    lone = np.arange(7)
    assert study_vote(labels, prob, lone).tolist() == labels.tolist()   # no studies: every film keeps its own
    assert study_vote(np.zeros(0, int), np.zeros((0, 3)), np.zeros(0, int)).tolist() == []


def test_cluster_probabilities_sum_each_clusters_centroids():
    from bonecluster.study_links import cluster_probabilities

    centroids = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    x = torch.tensor([[0.2, 0.1], [0.9, 0.8]])
    each = cluster_probabilities(x, centroids, None, 0.5)
    grouped = cluster_probabilities(x, centroids, torch.tensor([0, 1, 0]), 0.5)
    torch.testing.assert_close(grouped, torch.stack([each[:, 0] + each[:, 2], each[:, 1]], dim=1))
    torch.testing.assert_close(each.sum(1), torch.ones(2))
    sq = torch.cdist(x, centroids).pow(2)
    torch.testing.assert_close(each, torch.softmax(-sq / 0.5, dim=1), atol=1e-6, rtol=1e-5)


def test_why_not_merged_names_the_reason_the_cut_failed(monkeypatch):
    import sklearn.cluster

    fine = KMeansResult(torch.eye(4), torch.tensor([0, 1, 2, 2]), 0.0, 0, "torch")   # films 2 and 3 share cluster 2
    # one study per film: no film pair of one study to link by
    alone = np.array([0, 1, 2, 3])
    assert link_clusters(fine, alone, 2, seed=0) is None
    assert why_not_merged(fine, alone, 2) == "no study has films in two of the 4 clusters"
    # study 0 across clusters 0 and 1, study 1 inside cluster 2 (a mate, but no link); a cut that makes
    # one group where 3 are asked for
    mates = np.array([0, 0, 1, 1])
    monkeypatch.setattr(sklearn.cluster.SpectralClustering, "fit_predict", lambda self, x: np.zeros(len(x), int))
    assert link_clusters(fine, mates, 3, seed=0) is None
    assert why_not_merged(fine, mates, 3) == (
        "the cut of the study links made fewer than 3 groups (2 of the 4 clusters are linked to another)")
