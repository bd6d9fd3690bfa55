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


from bonecluster.metrics import (auroc, binary_scores, cohen_kappa, confusion_counts, macro,  # noqa: E402
                                 per_class_binary, study_level)


def test_binary_scores_by_hand():
    truth = [1, 1, 1, 0, 0, 0, 0, 0]
    pred = [1, 1, 0, 1, 0, 0, 0, 0]
    assert confusion_counts(truth, pred) == {"tp": 2, "fp": 1, "tn": 4, "fn": 1}
    s = binary_scores(truth, pred)
    assert s["sensitivity"] == pytest.approx(2 / 3)
    assert s["specificity"] == pytest.approx(4 / 5)   # TN/(TN+FP): the true specificity
    assert s["precision"] == pytest.approx(2 / 3)     # TP/(TP+FP): what the preprint calls "specificity"


def test_undefined_ratios_are_none_not_zero():
    s = binary_scores([0, 0], [0, 0])
    assert s["sensitivity"] is None and s["precision"] is None and s["specificity"] == 1.0
    assert auroc([1, 1], [0.2, 0.3]) is None


def test_auroc_and_kappa():
    assert auroc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert auroc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert auroc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert cohen_kappa([1, 0, 1, 0], [1, 0, 1, 0]) == pytest.approx(1.0)
    # observed agreement 0.5, chance agreement 0.5 -> kappa 0
    assert cohen_kappa([1, 1, 0, 0], [1, 0, 1, 0]) == pytest.approx(0.0)


def test_per_class_and_macro():
    truth = ["A", "A", "B", "B"]
    named = ["A", "B", "B", "B"]
    rows = per_class_binary(named, truth, ["A", "B"])
    assert rows["A"] == {"n": 2, "sensitivity": 0.5, "specificity": 1.0, "precision": 1.0}
    assert rows["B"]["precision"] == pytest.approx(2 / 3)
    assert macro(rows, ["sensitivity"])["sensitivity"] == pytest.approx(0.75)


def test_study_level_mean_and_max():
    keys, mean = study_level(["s1", "s1", "s2"], [0.2, 0.4, 0.9])
    assert keys == ["s1", "s2"] and mean.tolist() == pytest.approx([0.3, 0.9])
    _, mx = study_level(["s1", "s1", "s2"], [0.2, 0.4, 0.9], how="max")
    assert mx.tolist() == pytest.approx([0.4, 0.9])
    with pytest.raises(ValueError):
        study_level(["s"], [1.0], how="median")
