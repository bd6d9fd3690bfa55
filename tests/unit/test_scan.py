"""SCAN's neighbour mining, loss and clustering step on toy embeddings."""

from __future__ import annotations

import math

import pytest
import torch

from bonecluster.metrics import hungarian_accuracy
from bonecluster.scan import mine_neighbours, scan_cluster, scan_loss


def test_mine_neighbours_finds_the_closest_other_rows():
    x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    nn = mine_neighbours(x, 1)
    assert nn.squeeze(1).tolist() == [1, 0, 3, 2]


def test_mine_neighbours_never_returns_the_row_itself_across_batches():
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    nn = mine_neighbours(x, 3, batch_size=7)
    assert not (nn == torch.arange(50)[:, None]).any()


def test_mine_neighbours_rejects_k_too_large():
    with pytest.raises(ValueError, match="k < N"):
        mine_neighbours(torch.zeros(3, 2), 3)


def test_scan_loss_matches_the_formula():
    a = torch.tensor([[0.0, 0.0], [0.0, 0.0]])  # uniform predictions: <p, q> = 1/2, H(mean) = log 2
    total, consistency = scan_loss(a, a, entropy_weight=2.0)
    assert consistency.item() == pytest.approx(math.log(2))
    assert total.item() == pytest.approx(math.log(2) - 2 * math.log(2))


def test_scan_cluster_recovers_blobs_from_noisy_views():
    g = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(3, 8, generator=g), dim=1) * 3
    truth = torch.arange(90) % 3
    clean = torch.nn.functional.normalize(centres[truth] + 0.3 * torch.randn(90, 8, generator=g), dim=1)
    views = torch.nn.functional.normalize(clean + 0.1 * torch.randn(2, 90, 8, generator=g), dim=2)
    result = scan_cluster(clean, views, k=3, n_neighbours=5, epochs=30, batch_size=30, lr=0.05, heads=2)
    assert hungarian_accuracy(truth.numpy(), result.assignments.numpy()) > 0.95
    assert result.head in (0, 1)


def test_scan_cluster_checks_view_shapes():
    with pytest.raises(ValueError, match="views must be"):
        scan_cluster(torch.zeros(10, 4), torch.zeros(2, 9, 4), k=2)
