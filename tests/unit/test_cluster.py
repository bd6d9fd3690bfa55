"""Unit tests for bonecluster.cluster: PCA whitening, k-means backends, empty-cluster splitting."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score

from bonecluster import cluster
from bonecluster.cluster import (
    SPLIT_EPS,
    PCAWhitening,
    assign,
    faiss_available,
    fit_pca_whitening,
    kmeans,
    kmeans_best_of,
    l2_normalise,
    preprocess_features,
)

K_BLOBS = 8


@pytest.fixture(scope="module")
def blobs() -> tuple[torch.Tensor, np.ndarray]:
    points, truth = make_blobs(n_samples=3000, n_features=16, centers=K_BLOBS, random_state=0)
    return torch.from_numpy(points).float(), truth


@pytest.fixture(scope="module")
def sklearn_inertia(blobs) -> float:
    x, _ = blobs
    model = KMeans(K_BLOBS, n_init=1, max_iter=20, algorithm="lloyd", random_state=0).fit(x.numpy())
    return float(model.inertia_)


def correlated_gaussian(n: int, d: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=generator, dtype=torch.float64)
    return (torch.randn(n, d, generator=generator, dtype=torch.float64) @ mixing + 3.0).float()


# --------------------------------------------------------------------------- #
# PCA whitening
# --------------------------------------------------------------------------- #


def test_pca_whitening_gives_identity_covariance():
    x = correlated_gaussian(2000, 20)
    pca = fit_pca_whitening(x, dim=8)
    whitened = pca.transform(x)
    assert whitened.shape == (2000, 8)
    assert whitened.dtype == torch.float32
    torch.testing.assert_close(whitened.mean(dim=0), torch.zeros(8), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.cov(whitened.T.double()), torch.eye(8, dtype=torch.float64), atol=1e-3, rtol=0)


def test_pca_keeps_top_variance_directions_in_order():
    x = correlated_gaussian(2000, 10)
    pca = fit_pca_whitening(x, dim=10, eps=0.0)
    eigenvalues = 1.0 / pca.scale.double() ** 2
    assert torch.all(eigenvalues[:-1] >= eigenvalues[1:])
    reference = torch.linalg.eigvalsh(torch.cov(x.T.double())).flip(0)
    torch.testing.assert_close(eigenvalues, reference, rtol=1e-4, atol=0)


@pytest.mark.parametrize("power", [0.0, -0.25])
def test_pca_eigen_power_scales_each_axis_by_its_eigenvalue_to_that_power(power):
    """eigen_power=0: a plain PCA projection (axis variances = eigenvalues); -0.25: variances =
    sqrt(eigenvalues), halfway (in log scale) between that and whitening's ones."""
    x = correlated_gaussian(2000, 10)
    eigenvalues = torch.linalg.eigvalsh(torch.cov(x.T.double())).flip(0)[:6]
    pca = fit_pca_whitening(x, dim=6, eps=0.0, eigen_power=power)
    variances = torch.cov(pca.transform(x).T.double()).diagonal()
    torch.testing.assert_close(variances, eigenvalues ** (1 + 2 * power), rtol=1e-3, atol=0)
    whitened = fit_pca_whitening(x, dim=6, eps=0.0)   # same axes, only the scale differs
    torch.testing.assert_close(pca.components, whitened.components, rtol=0, atol=0)


def test_pca_eigen_power_zero_is_the_centred_projection():
    x = correlated_gaussian(500, 12)
    pca = fit_pca_whitening(x, dim=5, eigen_power=0.0)
    torch.testing.assert_close(pca.scale, torch.ones(5), rtol=0, atol=0)
    torch.testing.assert_close(pca.transform(x), (x - pca.mean) @ pca.components, rtol=1e-5, atol=1e-5)
    features, fitted = preprocess_features(x, dim=5, eigen_power=0.0)
    torch.testing.assert_close(features, l2_normalise((x - fitted.mean) @ fitted.components), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("power", [0.1, -0.6])
def test_pca_eigen_power_outside_whitening_and_projection_is_rejected(power):
    with pytest.raises(ValueError, match=r"eigen_power must be in \[-0.5, 0\]"):
        fit_pca_whitening(torch.randn(10, 4), eigen_power=power)


def test_pca_dim_is_capped_by_samples_and_features():
    assert fit_pca_whitening(torch.randn(10, 50), dim=256).output_dim == 9
    assert fit_pca_whitening(torch.randn(100, 5), dim=256).output_dim == 5
    assert fit_pca_whitening(torch.randn(100, 50), dim=7).output_dim == 7


def test_preprocess_features_matches_transform_of_fitted_data():
    x = correlated_gaussian(300, 32)
    features, pca = preprocess_features(x, dim=16)
    assert features.shape == (300, 16)
    torch.testing.assert_close(features, l2_normalise(pca.transform(x)), rtol=0, atol=0)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(300))


def test_pca_state_dict_round_trip():
    x = correlated_gaussian(200, 12)
    pca = fit_pca_whitening(x, dim=6)
    state = {name: tensor.clone() for name, tensor in pca.state_dict().items()}
    restored = PCAWhitening.from_state_dict(state)
    new_points = correlated_gaussian(5, 12, seed=1)
    torch.testing.assert_close(restored.transform(new_points), pca.transform(new_points), rtol=0, atol=0)


def test_pca_state_dict_rejects_inconsistent_shapes():
    with pytest.raises(KeyError):
        PCAWhitening.from_state_dict({"mean": torch.zeros(3)})
    with pytest.raises(ValueError):
        PCAWhitening.from_state_dict({"mean": torch.zeros(3), "components": torch.zeros(4, 2), "scale": torch.ones(2)})


def test_pca_input_validation():
    with pytest.raises(ValueError, match="at least 2 samples"):
        fit_pca_whitening(torch.randn(1, 4))
    with pytest.raises(ValueError, match="NaN"):
        fit_pca_whitening(torch.tensor([[0.0, float("nan")], [1.0, 2.0]]))
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        fit_pca_whitening(torch.randn(10, 4), dim=2).transform(torch.randn(3, 5))


def test_l2_normalise_unit_rows_and_zero_row_stays_zero():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0], [-1.0, 0.0]])
    out = l2_normalise(x)
    torch.testing.assert_close(out, torch.tensor([[0.6, 0.8], [0.0, 0.0], [-1.0, 0.0]]))
    assert not torch.isnan(out).any()


# --------------------------------------------------------------------------- #
# k-means quality against scikit-learn
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "backend",
    ["torch", pytest.param("faiss", marks=pytest.mark.skipif(not faiss_available(), reason="faiss not installed"))],
)
def test_kmeans_plus_plus_matches_sklearn_on_blobs(blobs, sklearn_inertia, backend):
    x, truth = blobs
    result = kmeans(x, K_BLOBS, niter=20, seed=0, init="k-means++", backend=backend)
    assert result.backend == backend
    assert result.centroids.shape == (K_BLOBS, 16) and result.centroids.dtype == torch.float32
    assert result.assignments.shape == (3000,) and result.assignments.dtype == torch.int64
    assert result.inertia == pytest.approx(sklearn_inertia, rel=0.01)
    assert adjusted_rand_score(truth, result.assignments.numpy()) > 0.99


@pytest.mark.parametrize(
    ("backend", "init"),
    [
        ("torch", "k-means++"),
        ("torch", "random"),
        # faiss draws its own random init, so only its k-means++ start is known.
        pytest.param("faiss", "k-means++", marks=pytest.mark.skipif(not faiss_available(), reason="no faiss")),
    ],
)
def test_lloyd_matches_sklearn_from_the_same_start(blobs, backend, init):
    """From identical initial centroids, both backends follow sklearn's Lloyd iterations."""
    x, _ = blobs
    seed = 3
    start = cluster._initial_centroids(x, K_BLOBS, init, torch.Generator().manual_seed(seed))
    reference = KMeans(K_BLOBS, init=start.numpy(), n_init=1, max_iter=20, tol=0.0, algorithm="lloyd").fit(x.numpy())
    result = kmeans(x, K_BLOBS, niter=20, seed=seed, init=init, backend=backend)
    assert result.inertia == pytest.approx(reference.inertia_, rel=1e-4)
    assert adjusted_rand_score(reference.labels_, result.assignments.numpy()) == pytest.approx(1.0)


def test_random_init_draws_distinct_data_points(blobs):
    # Random init is DeepCluster's faiss default; on well-separated blobs it often starts two
    # centroids in one blob and Lloyd cannot recover, which is why k-means++ is our default.
    x, _ = blobs
    start = cluster._initial_centroids(x, K_BLOBS, "random", torch.Generator().manual_seed(0))
    rows = {tuple(row) for row in start.tolist()}
    assert len(rows) == K_BLOBS
    assert rows <= {tuple(row) for row in x.tolist()}


@pytest.mark.parametrize("init", ["k-means++", "random"])
def test_torch_kmeans_is_deterministic_given_seed(blobs, init):
    x, _ = blobs
    first = kmeans(x, K_BLOBS, seed=7, init=init, backend="torch")
    second = kmeans(x, K_BLOBS, seed=7, init=init, backend="torch")
    assert torch.equal(first.assignments, second.assignments)
    assert torch.equal(first.centroids, second.centroids)
    assert first.inertia == second.inertia


def test_assignments_and_inertia_agree_with_assign(blobs):
    x, _ = blobs
    result = kmeans(x, K_BLOBS, niter=3, seed=1, backend="torch", batch_size=257)
    labels, sq_distances = assign(x, result.centroids, batch_size=100)
    assert torch.equal(result.assignments, labels)
    assert result.inertia == pytest.approx(float(sq_distances.double().sum()), rel=1e-6)
    brute_force = torch.cdist(x.double(), result.centroids.double()).square()
    torch.testing.assert_close(sq_distances.double(), brute_force.min(dim=1).values, rtol=1e-4, atol=1e-3)


def test_assign_is_independent_of_batch_size():
    generator = torch.Generator().manual_seed(0)
    x, centroids = torch.randn(1000, 8, generator=generator), torch.randn(13, 8, generator=generator)
    labels_small, dist_small = assign(x, centroids, batch_size=7)
    labels_large, dist_large = assign(x, centroids, batch_size=65536)
    assert torch.equal(labels_small, labels_large)
    torch.testing.assert_close(dist_small, dist_large)
    torch.testing.assert_close(labels_small, torch.cdist(x, centroids).argmin(dim=1), rtol=0, atol=0)


def test_k_equals_n_puts_every_point_in_its_own_cluster():
    x = torch.randn(12, 3, generator=torch.Generator().manual_seed(0))
    result = kmeans(x, 12, backend="torch")
    assert sorted(result.assignments.tolist()) == list(range(12))
    assert result.inertia == pytest.approx(0.0, abs=1e-5)


def test_niter_zero_returns_initial_centroids(blobs):
    x, _ = blobs
    result = kmeans(x, K_BLOBS, niter=0, seed=2, init="random", backend="torch")
    start = cluster._initial_centroids(x, K_BLOBS, "random", torch.Generator().manual_seed(2))
    assert torch.equal(result.centroids, start)


# --------------------------------------------------------------------------- #
# Empty-cluster splitting (faiss's split_clusters)
# --------------------------------------------------------------------------- #


def test_split_is_symmetric_and_shares_the_count():
    centroids = torch.tensor([[1.0, 2.0, -4.0, 8.0], [0.0, 0.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0]])
    donor_before = centroids[0].clone()
    counts = torch.tensor([6.0, 0.0, 1.0])  # cluster 2 has size 1, so weight 0: the donor must be 0
    n_splits = cluster._split_empty_clusters(centroids, counts, torch.Generator().manual_seed(0))
    assert n_splits == 1
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0])
    torch.testing.assert_close(centroids[1], donor_before * (1 + SPLIT_EPS * signs), rtol=0, atol=0)
    torch.testing.assert_close(centroids[0], donor_before * (1 - SPLIT_EPS * signs), rtol=0, atol=0)
    torch.testing.assert_close((centroids[0] + centroids[1]) / 2, donor_before)
    assert counts.tolist() == [3.0, 3.0, 1.0]
    assert centroids[2].tolist() == [5.0, 5.0, 5.0, 5.0]


def test_split_without_empty_clusters_is_a_no_op():
    centroids, counts = torch.randn(3, 2), torch.tensor([1.0, 2.0, 3.0])
    before = centroids.clone()
    assert cluster._split_empty_clusters(centroids, counts, torch.Generator()) == 0
    assert torch.equal(centroids, before)


def test_lloyd_reseeds_a_far_away_centroid():
    generator = torch.Generator().manual_seed(0)
    left = torch.randn(200, 2, generator=generator) + torch.tensor([-10.0, 0.0])
    right = torch.randn(200, 2, generator=generator) + torch.tensor([10.0, 0.0])
    x = torch.cat([left, right])
    start = torch.tensor([[-10.0, 0.0], [10.0, 0.0], [1e4, 1e4]])  # nothing is near the third centroid

    centroids, n_splits = cluster._lloyd(x, start, niter=10, generator=torch.Generator().manual_seed(0))
    assert n_splits >= 1
    labels, _ = assign(x, centroids)
    assert torch.bincount(labels, minlength=3).min() > 0
    assert centroids.abs().max() < 100  # the far centroid now lives inside a blob


def test_first_lloyd_step_splits_exactly_the_empty_cluster():
    x = torch.tensor([[1.0, 1.0], [1.0, 2.0], [2.0, 1.0], [2.0, 2.0]])
    start = torch.tensor([[1.5, 1.5], [100.0, 100.0]])
    centroids, n_splits, objective = cluster._lloyd_step(x, start, torch.Generator().manual_seed(0))
    assert n_splits == 1
    assert objective == pytest.approx(4 * 0.5)
    mean = torch.tensor([1.5, 1.5])
    torch.testing.assert_close(centroids[1], mean * torch.tensor([1 + SPLIT_EPS, 1 - SPLIT_EPS]))
    torch.testing.assert_close(centroids[0], mean * torch.tensor([1 - SPLIT_EPS, 1 + SPLIT_EPS]))


def test_kmeans_reports_splits_on_duplicated_points():
    # 3 distinct points, 6 clusters: random init must pick duplicates, leaving clusters empty.
    x = torch.tensor([[0.0, 0.0], [5.0, 5.0], [9.0, 0.0]]).repeat(10, 1)
    result = kmeans(x, 6, niter=5, init="random", seed=0, backend="torch")
    assert result.n_splits > 0
    # Every distinct point still gets a centroid; what is left is the 1/1024 split perturbation.
    assert result.inertia < 0.01


# --------------------------------------------------------------------------- #
# Backends and validation
# --------------------------------------------------------------------------- #


def test_faiss_backend_without_faiss_names_the_extra(monkeypatch, blobs):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    assert not faiss_available()
    with pytest.raises(ImportError, match=r"pip install bonecluster\[faiss\]"):
        kmeans(blobs[0], 3, backend="faiss")
    assert kmeans(blobs[0], 3, niter=2, backend="auto").backend == "torch"


def test_auto_backend_prefers_faiss_when_installed(blobs):
    pytest.importorskip("faiss")
    assert kmeans(blobs[0], 3, niter=2, backend="auto").backend == "faiss"


def test_faiss_uses_all_points_and_stays_quiet(capfd):
    pytest.importorskip("faiss")
    # 20 points for 4 clusters is far below faiss's 39-points-per-centroid warning threshold.
    x = torch.randn(20, 4, generator=torch.Generator().manual_seed(0))
    result = kmeans(x, 4, niter=5, backend="faiss")
    assert result.assignments.shape == (20,)
    assert "WARNING" not in capfd.readouterr().err


def test_results_follow_the_input_device(blobs):
    x, _ = blobs
    result = kmeans(x, 4, niter=2, backend="torch", device="cpu")
    assert result.centroids.device == x.device and result.assignments.device == x.device


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"k": 0}, ValueError, "k must be >= 1"),
        ({"k": 31}, ValueError, "k=31.*N=30"),
        ({"k": 2, "init": "kmeans||"}, ValueError, "init"),
        ({"k": 2, "backend": "cuml"}, ValueError, "backend"),
        ({"k": 2, "niter": -1}, ValueError, "niter"),
        ({"k": 2, "batch_size": 0}, ValueError, "batch_size"),
    ],
)
def test_kmeans_rejects_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        kmeans(torch.randn(30, 2), **kwargs)


def test_kmeans_rejects_bad_data():
    with pytest.raises(ValueError, match="2-D"):
        kmeans(torch.randn(30), 2)
    with pytest.raises(ValueError, match="NaN or infinite"):
        kmeans(torch.tensor([[0.0, 1.0], [float("inf"), 0.0], [1.0, 1.0]]), 2)
    with pytest.raises(TypeError, match="floating point"):
        kmeans(torch.ones(5, 2, dtype=torch.int64), 2)


def test_kmeans_best_of_keeps_the_lowest_inertia_run():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 4, generator=g)
    runs = [kmeans(x, 5, niter=3, seed=s, backend="torch") for s in (1, 2, 3)]
    best = kmeans_best_of(x, 5, [1, 2, 3], niter=3, backend="torch")
    assert best.inertia == min(r.inertia for r in runs)
    assert torch.equal(best.assignments, min(runs, key=lambda r: r.inertia).assignments)
    with pytest.raises(ValueError):
        kmeans_best_of(x, 5, [])
