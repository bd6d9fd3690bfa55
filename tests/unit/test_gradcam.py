"""Grad-CAM: shape, range, no NaN, block choice, and degenerate targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bonecluster.cluster import fit_pca_whitening, l2_normalise
from bonecluster.gradcam import cluster_logit_target, colourise, grad_cam, knn_distance_target
from bonecluster.models import DeepClusterNet


@pytest.fixture(scope="module")
def model(single_torch_thread):
    torch.manual_seed(0)
    return DeepClusterNet(arch="resnet18", sobel=True, num_clusters=3).eval()


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 60, (3, 64, 64)).astype(np.uint8)
    x[:, 20:44, 28:36] = 230  # a bright "bone"
    return x


@pytest.fixture(scope="module")
def pca_bank(model, images):
    with torch.no_grad():
        feats = model.features(torch.from_numpy(images).float().div(255)[:, None])
    noisy = torch.cat([feats + 0.01 * torch.randn(feats.shape, generator=torch.Generator().manual_seed(i))
                       for i in range(4)])
    pca = fit_pca_whitening(noisy, dim=4)
    return pca, l2_normalise(pca.transform(noisy))


def _check(cam, shape):
    assert cam.shape == shape and cam.dtype == np.float32
    assert np.isfinite(cam).all()
    assert cam.min() >= 0.0 and cam.max() <= 1.0


def test_knn_target_gives_normalised_maps_of_the_input_size(model, images, pca_bank):
    pca, bank = pca_bank
    cam, layer = grad_cam(model, images, knn_distance_target(bank, pca, k=2))
    _check(cam, (3, 64, 64))
    assert layer == "layer3"  # layer4 is 2x2 at 64 px: too coarse for "auto"
    assert cam.max() == pytest.approx(1.0)  # at least one image has a positive map, scaled to 1


def test_explicit_last_block_and_logit_target(model, images, pca_bank):
    pca, _ = pca_bank
    centroids = torch.randn(3, pca.output_dim, generator=torch.Generator().manual_seed(1))
    cam, layer = grad_cam(model, torch.from_numpy(images).float().div(255)[:, None],
                          cluster_logit_target(centroids, pca), layer="layer4")
    _check(cam, (3, 64, 64))
    assert layer == "layer4"


def test_single_uint8_image_and_constant_target(model, images):
    cam, _ = grad_cam(model, images[0], lambda pooled: pooled.sum(1) * 0.0)
    _check(cam, (1, 64, 64))
    assert (cam == 0).all()  # nothing raises the target: an all-zero map, not NaN


def test_bad_arguments(model, images):
    with pytest.raises(ValueError, match="layer"):
        grad_cam(model, images, lambda p: p.sum(1), layer="fc")
    with pytest.raises(ValueError, match="target"):
        grad_cam(model, images, lambda p: p.sum())
    with pytest.raises(ValueError, match="grey images"):
        grad_cam(model, np.zeros((2, 3, 8, 8), np.float32), lambda p: p.sum(1))


def test_colourise_is_rgba_uint8():
    rgba = colourise(np.array([[0.0, 0.5], [1.0, np.nan]], np.float32))
    assert rgba.shape == (2, 2, 4) and rgba.dtype == np.uint8
    assert rgba[0, 0, 3] == 0 and rgba[1, 0, 3] > rgba[0, 1, 3] > 0 and rgba[1, 1, 3] == 0
