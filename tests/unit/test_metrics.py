from __future__ import annotations

import numpy as np
import pytest

from bonecluster.metrics import (cluster_scores, hungarian_accuracy, hungarian_mapping,
                                 majority_accuracy, majority_mapping)


def test_hungarian_is_invariant_to_cluster_renaming():
    classes = np.array(["A", "A", "B", "B", "C", "C"])
    assert hungarian_accuracy([2, 2, 0, 0, 1, 1], classes) == 1.0
    assert hungarian_mapping([2, 2, 0, 0, 1, 1], classes) == {2: "A", 0: "B", 1: "C"}


def test_hungarian_is_one_to_one_but_majority_is_many_to_one():
    classes = np.array(["A", "A", "A", "A", "B", "B"])
    clusters = np.array([0, 0, 1, 1, 1, 1])  # cluster 1 mixes 2 A and 2 B
    # best one-to-one: 0->A (2 right) and 1->B (2 right) = 4/6
    assert hungarian_accuracy(clusters, classes) == pytest.approx(4 / 6)
    # many-to-one: 0->A (2), 1->A or B (2) = 4/6; with over-clustering majority can beat Hungarian
    over = np.array([0, 1, 2, 3, 4, 5])
    assert majority_accuracy(over, classes) == 1.0
    assert hungarian_accuracy(over, classes) == pytest.approx(2 / 6)
    assert majority_mapping([0, 0, 1, 1, 1], ["A", "A", "B", "B", "A"]) == {0: "A", 1: "B"}


def test_cluster_scores_perfect_and_random():
    y = np.repeat(np.arange(5), 40)
    perfect = cluster_scores(y[::-1], y)
    assert perfect["nmi"] == pytest.approx(1.0) and perfect["ari"] == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    noise = cluster_scores(rng.integers(0, 5, len(y)), y)
    assert noise["nmi"] < 0.1 and abs(noise["ari"]) < 0.05 and noise["accuracy_hungarian"] < 0.4
