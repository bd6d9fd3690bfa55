from __future__ import annotations

import numpy as np
import pytest
import torch

from bonecluster.anomaly import knn_scores, label_free_threshold, normalise


def test_knn_scores_exact_small_case():
    bank = normalise(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    q = normalise(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    s = knn_scores(bank, q, k=2)
    # first query: two identical neighbours (distance 0); second: one at 0, next at 1 -> 0.5
    assert s.tolist() == pytest.approx([0.0, 0.5])


def test_leave_one_out_excludes_self():
    bank = normalise(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]))
    s = knn_scores(bank, bank, k=1, exclude_self=True)
    assert s.tolist() == pytest.approx([1.0, 0.0, 0.0])
    with pytest.raises(ValueError):
        knn_scores(bank[:1], bank[:1], exclude_self=True)


def test_outliers_score_higher_than_a_dense_cluster():
    g = torch.Generator().manual_seed(0)
    normal = normalise(torch.randn(200, 8, generator=g) * 0.1 + torch.tensor([1.0] + [0.0] * 7))
    odd = normalise(torch.randn(10, 8, generator=g))
    bank = torch.cat([normal, odd])
    s = knn_scores(bank, bank, k=5, exclude_self=True)
    assert s[200:].min() > s[:200].median()


def test_gmm_threshold_separates_two_modes():
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.lognormal(np.log(0.1), 0.2, 300), rng.lognormal(np.log(0.5), 0.2, 100)])
    t = label_free_threshold(scores)
    assert t.method == "gmm" and 0.15 < t.value < 0.4


def test_threshold_falls_back_on_constant_scores():
    t = label_free_threshold(np.full(10, 0.3))
    assert t.method == "quantile" and t.value == pytest.approx(0.3)
