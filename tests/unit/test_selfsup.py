"""SimCLR's NT-Xent loss, the projection head and the balanced Sinkhorn assignment."""

from __future__ import annotations

import math

import pytest
import torch

from bonecluster.selfsup import ProjectionHead, nt_xent, sinkhorn_balanced


def test_nt_xent_matches_the_formula_on_two_pairs():
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    tau = 0.5
    # Anchor z1[0]: positive z2[0] (cos 1); negatives z1[1] and z2[1] (cos 0). Same for all 4 anchors.
    expected = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 2 * math.exp(0.0)))
    assert nt_xent(z1, z2, tau).item() == pytest.approx(expected, rel=1e-6)


def test_nt_xent_is_lower_for_matching_views_than_for_shuffled_ones():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(16, 8, generator=g)
    noisy = z + 0.05 * torch.randn(16, 8, generator=g)
    assert nt_xent(z, noisy).item() < nt_xent(z, noisy.roll(1, dims=0)).item()


def test_nt_xent_rejects_mismatched_batches():
    with pytest.raises(ValueError, match="same shape"):
        nt_xent(torch.zeros(4, 3), torch.zeros(5, 3))


def test_projection_head_shapes():
    assert ProjectionHead(32, 16, 8)(torch.randn(5, 32)).shape == (5, 8)


def test_sinkhorn_balances_a_lopsided_problem():
    # Every item prefers cluster 0 a little; a plain argmax puts all 90 there.
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(90, 3, generator=g) * 0.1
    scores[:, 0] += 0.2
    q = sinkhorn_balanced(scores, epsilon=0.05, n_iter=200)
    assert torch.allclose(q.sum(1), torch.ones(90), atol=1e-5)
    assert torch.allclose(q.sum(0), torch.full((3,), 30.0), atol=0.5)
    assert torch.bincount(q.argmax(1), minlength=3).min() >= 25


def test_sinkhorn_keeps_a_clear_balanced_structure():
    labels = torch.arange(60) % 3
    scores = torch.nn.functional.one_hot(labels, 3).float()
    assert torch.equal(sinkhorn_balanced(scores).argmax(1), labels)


def test_sinkhorn_rejects_empty_input():
    with pytest.raises(ValueError, match="non-empty"):
        sinkhorn_balanced(torch.zeros(0, 3))
