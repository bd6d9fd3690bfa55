"""cluster.subspace=phantom-parts: Fisher directions of phantom parts, whitening inside them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bonecluster.cluster import PCAWhitening, fit_pca_whitening, kmeans, l2_normalise
from bonecluster.config import load_config
from bonecluster.metrics import hungarian_accuracy
from bonecluster.models import build_model
from bonecluster.phantom_subspace import (FIRST_FILM, part_directions, phantom_part_whitening, subspace_corpus,
                                          subspace_whitening)


def _blobs(n_per: int = 200, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Three classes apart along features 0 and 1 (spread 0.1), plus a feature 2 of spread 10 that
    splits every class in two, and 5 small noise features: (3 n_per, 8) and labels."""
    g = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    labels = np.repeat(np.arange(3), n_per)
    x = np.zeros((3 * n_per, 8))
    x[:, :2] = centres[labels] + g.normal(0, 0.1, (3 * n_per, 2))
    x[:, 2] = g.choice([-10.0, 10.0], 3 * n_per) + g.normal(0, 0.5, 3 * n_per)
    x[:, 3:] = g.normal(0, 0.05, (3 * n_per, 5))
    return torch.from_numpy(x).float(), labels


def test_the_directions_ignore_the_largest_variation_when_it_is_not_the_class():
    x, y = _blobs()
    w = part_directions(x, y)
    assert w.shape == (8, 2) and w.dtype == torch.float32
    share_on_nuisance = w[2].abs() / w.abs().sum(0)
    assert torch.all(share_on_nuisance < 0.02)


def test_kmeans_finds_the_classes_in_the_subspace_and_not_in_the_whitened_top_directions():
    x, y = _blobs()
    w = part_directions(*_blobs(seed=1))   # fitted on other samples, as on other phantoms
    inside = subspace_whitening(x, w)
    plain = fit_pca_whitening(x, dim=2)     # as many dimensions, chosen by variance alone
    hits = {}
    for name, pca in (("inside", inside), ("plain", plain)):
        km = kmeans(l2_normalise(pca.transform(x)), 3, seed=0)
        hits[name] = hungarian_accuracy(km.assignments.numpy(), y)
    assert hits["inside"] > 0.99 and hits["plain"] < 0.8


def test_subspace_whitening_is_one_pca_map_that_whitens_the_projected_films():
    x, _ = _blobs()
    w = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    pca = subspace_whitening(x, w)
    assert isinstance(pca, PCAWhitening) and (pca.input_dim, pca.output_dim) == (8, 3)
    z = pca.transform(x).double()
    torch.testing.assert_close(z.mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-3, rtol=0)
    torch.testing.assert_close(torch.cov(z.T), torch.eye(3, dtype=torch.float64), atol=1e-3, rtol=0)
    # the same as projecting by hand, then PCA-whitening the projection
    projected = (x - x.mean(0)) @ w
    by_hand = fit_pca_whitening(projected, dim=3)
    torch.testing.assert_close(pca.transform(x), by_hand.transform(projected), atol=1e-3, rtol=0)
    assert PCAWhitening.from_state_dict(pca.state_dict()).output_dim == 3
    assert subspace_whitening(x, w, dim=2).output_dim == 2
    # eigen_power=0 (cluster.eigen_power) keeps the projection's variances: the same axes, unscaled
    plain = subspace_whitening(x, w, eigen_power=0.0)
    torch.testing.assert_close(plain.scale, torch.ones(3), rtol=0, atol=0)
    torch.testing.assert_close(plain.transform(x), fit_pca_whitening(projected, dim=3, eigen_power=0.0).transform(projected),
                               atol=1e-3, rtol=0)


def test_bad_inputs_are_refused_with_what_is_wrong():
    x, y = _blobs(20)
    with pytest.raises(ValueError, match="at least 2 parts"):
        part_directions(x, np.zeros(len(x), dtype=int))
    with pytest.raises(ValueError, match="do not fit features"):
        subspace_whitening(x, torch.zeros(5, 2))


def test_a_network_and_its_phantoms_give_at_most_six_whitened_dimensions():
    cfg = load_config("cpu", overrides=["data.size=32", "model.arch=resnet18", "data.workers=1"])
    torch.manual_seed(0)
    model = build_model(cfg.model, num_clusters=7)
    corpus = subspace_corpus(70, cfg.data, seed=0)
    assert corpus.images.shape == (70, 32, 32) and set(corpus.labels["part"]) == set(range(7))
    again = subspace_corpus(70, cfg.data, seed=0)
    assert np.array_equal(corpus.images, again.images)   # the same seed, the same films
    real = torch.rand(40, model.feature_dim)
    pca = phantom_part_whitening(model, real, corpus, torch.device("cpu"), dim=16)
    assert pca.input_dim == model.feature_dim and pca.output_dim == 6
    assert pca.transform(real).shape == (40, 6)
    assert FIRST_FILM > 20_000 + 1_000   # past the pre-training corpus and its validation films


def test_stage2_clusters_each_part_in_the_usual_space():
    from bonecluster.stage2.train import stage2_config

    cfg = load_config("cpu", overrides=["cluster.subspace=phantom-parts", "cluster.eigen_power=0"])
    assert cfg.cluster.subspace == "phantom-parts" and stage2_config(cfg).cluster.subspace == "none"
    assert stage2_config(cfg).cluster.eigen_power == -0.5   # part models whiten, as measured
