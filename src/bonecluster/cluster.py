"""Clustering building blocks for DeepCluster (Caron et al., ECCV 2018).

One DeepCluster round embeds every image with the CNN, then

1. PCA-whitens the embeddings and L2-normalises them
   (:func:`preprocess_features`, the paper's "PCA to 256 dims, whitening and
   l2-normalisation", Sec. 3.3 / 4),
2. clusters them with k-means (:func:`kmeans`, eq. 6 of the paper)::

       min_{C in R^{d x k}}  1/N sum_n  min_{y_n in {0,1}^k, y_n^T 1 = 1}  || f(x_n) - C y_n ||^2

3. and uses the assignments ``y_n`` as pseudo-labels for the next epoch.

Two backends solve eq. 6: a pure-torch Lloyd's algorithm that runs on any torch
device (cpu, cuda, mps), and faiss (optional, ``pip install bonecluster[faiss]``),
which the reference implementation uses.  Both re-seed empty clusters the way
faiss does (``faiss/Clustering.cpp``, ``split_clusters``), one of the two guards
against the trivial solutions discussed in Sec. 3.4 of the paper.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from types import ModuleType
from typing import Sequence

import torch
import torch.nn.functional as F

from bonecluster.timing import NO_TIMER, NoTimer

__all__ = [
    "PCAWhitening",
    "fit_pca_whitening",
    "l2_normalise",
    "preprocess_features",
    "check_eigen_power",
    "KMeansResult",
    "kmeans",
    "kmeans_best_of",
    "assign",
    "faiss_available",
]

#: Relative size of the symmetric perturbation applied when an empty cluster is
#: re-seeded from a populated one (faiss's ``EPS`` in ``Clustering.cpp``).
SPLIT_EPS = 1.0 / 1024.0

_INITS = ("k-means++", "random")
_BACKENDS = ("auto", "torch", "faiss")
_FAISS_HINT = "faiss is not installed; install it with `pip install bonecluster[faiss]` or use backend='torch'"


# --------------------------------------------------------------------------- #
# PCA whitening + L2 normalisation
# --------------------------------------------------------------------------- #


@dataclass
class PCAWhitening:
    """Fitted PCA-whitening projection, kept so new images can be projected at predict time.

    ``transform(x) = ((x - mean) @ components) * scale``.

    Attributes:
        mean: ``(D,)`` feature mean of the fitting data.
        components: ``(D, d)`` principal axes, one column per component, by decreasing variance.
        scale: ``(d,)`` per-axis factors ``(eigenvalue + eps) ** eigen_power``: ``1 / sqrt(...)``
            when whitening (``eigen_power=-0.5``), ones for a plain PCA projection (``0``).
    """

    mean: torch.Tensor
    components: torch.Tensor
    scale: torch.Tensor

    @property
    def input_dim(self) -> int:
        return self.components.shape[0]

    @property
    def output_dim(self) -> int:
        return self.components.shape[1]

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """Project and whiten ``x`` of shape ``(N, D)`` to ``(N, d)`` float32 (not normalised)."""
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise ValueError(f"expected features of shape (N, {self.input_dim}), got {tuple(x.shape)}")
        device = x.device
        centred = x.to(torch.float32) - self.mean.to(device)
        return (centred @ self.components.to(device)) * self.scale.to(device)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "components": self.components, "scale": self.scale}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> PCAWhitening:
        missing = {"mean", "components", "scale"} - set(state)
        if missing:
            raise KeyError(f"PCAWhitening state is missing {sorted(missing)}")
        mean, components, scale = state["mean"], state["components"], state["scale"]
        if components.ndim != 2 or mean.shape != (components.shape[0],) or scale.shape != (components.shape[1],):
            raise ValueError(
                "inconsistent PCAWhitening state: "
                f"mean {tuple(mean.shape)}, components {tuple(components.shape)}, scale {tuple(scale.shape)}"
            )
        return cls(mean=mean, components=components, scale=scale)


def fit_pca_whitening(x: torch.Tensor, dim: int = 256, eps: float = 1e-5,
                      eigen_power: float = -0.5) -> PCAWhitening:
    """Fit PCA whitening to ``x`` of shape ``(N, D)``, keeping ``min(dim, N - 1, D)`` components.

    Equivalent to faiss's ``PCAMatrix(D, dim, eigen_power)``; DeepCluster's
    ``preprocess_features`` uses ``eigen_power=-0.5``, for which the whitened training features
    have (unbiased) covariance close to the identity (``eps`` keeps tiny eigenvalues from blowing
    up). ``eigen_power=0`` keeps each axis's variance (a plain PCA projection), so the axes that
    vary most weigh most in the distances k-means sees; values in between whiten partly.  At
    most ``N - 1`` components carry variance after centring, hence the cap.

    The eigendecomposition of the covariance runs in float64 on ``x``'s device (CPU for
    MPS, which has neither float64 nor ``eigh``); the fitted state is float32 on ``x``'s device.
    """
    _check_matrix(x, "x")
    n, d_in = x.shape
    if n < 2:
        raise ValueError(f"PCA whitening needs at least 2 samples, got {n}")
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    check_eigen_power(eigen_power)
    out_dim = min(dim, n - 1, d_in)

    work = x.detach().to(device=_linalg_device(x.device), dtype=torch.float64)
    mean = work.mean(dim=0)
    covariance = _covariance(work, mean)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending order
    top = torch.arange(d_in - 1, d_in - 1 - out_dim, -1, device=work.device)
    eigenvalues = eigenvalues[top].clamp_min(0.0)
    components = _fix_signs(eigenvectors[:, top])
    scale = (eigenvalues + eps).pow(eigen_power)

    def as_state(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=x.device, dtype=torch.float32)

    return PCAWhitening(mean=as_state(mean), components=as_state(components), scale=as_state(scale))


def check_eigen_power(power: float, name: str = "eigen_power") -> None:
    """Refuse a whitening strength outside [-0.5, 0] (``name``: how the caller calls it)."""
    if not -0.5 <= power <= 0:
        raise ValueError(f"{name} must be in [-0.5, 0] (-0.5 whitens, 0 keeps PCA's variances), got {power}")


def l2_normalise(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Scale each row of ``x`` (N, d) to unit L2 norm; all-zero rows stay zero (no NaN)."""
    return F.normalize(x, p=2.0, dim=1, eps=eps)


def study_means(x: torch.Tensor, studies: torch.Tensor) -> torch.Tensor:
    """L2-normalised mean of each study's rows: ``(N, d)`` and study numbers ``(N,)`` in
    ``0..S-1`` -> ``(S, d)``. What ``cluster.by_study`` clusters (every view of a study pooled)."""
    studies = studies.to(x.device)
    n = int(studies.max()) + 1 if len(studies) else 0
    sums = torch.zeros(n, x.shape[1], device=x.device, dtype=x.dtype).index_add_(0, studies, x)
    return l2_normalise(sums / torch.bincount(studies, minlength=n).clamp_min(1)[:, None].to(x.dtype))


def preprocess_features(x: torch.Tensor, dim: int = 256, eps: float = 1e-5,
                        eigen_power: float = -0.5) -> tuple[torch.Tensor, PCAWhitening]:
    """DeepCluster's ``preprocess_features``: PCA-whiten to ``dim`` then L2-normalise
    (``eigen_power``: how much to whiten, see :func:`fit_pca_whitening`).

    Args:
        x: ``(N, D)`` CNN embeddings.
    Returns:
        ``(N, d)`` float32 features with ``d = min(dim, N - 1, D)``, and the fitted
        :class:`PCAWhitening` (apply ``l2_normalise(pca.transform(new))`` to new images).
    """
    pca = fit_pca_whitening(x, dim=dim, eps=eps, eigen_power=eigen_power)
    return l2_normalise(pca.transform(x)), pca


def _covariance(x: torch.Tensor, mean: torch.Tensor, chunk_rows: int = 16384) -> torch.Tensor:
    """Unbiased ``(D, D)`` covariance of ``x`` (N, D), accumulated over row chunks to bound memory."""
    covariance = torch.zeros(x.shape[1], x.shape[1], dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[0], chunk_rows):
        centred = x[start : start + chunk_rows] - mean
        covariance.addmm_(centred.T, centred)
    return covariance / (x.shape[0] - 1)


def _fix_signs(components: torch.Tensor) -> torch.Tensor:
    """Flip each column so its largest-magnitude entry is positive.

    Eigenvectors are only defined up to sign; fixing it makes the projection
    reproducible across devices and library versions (as sklearn's ``svd_flip``).
    """
    rows = components.abs().argmax(dim=0)
    signs = torch.sign(components[rows, torch.arange(components.shape[1], device=components.device)])
    signs[signs == 0] = 1.0
    return components * signs


def _accumulation_dtype(device: torch.device) -> torch.dtype:
    # float64 sums avoid cancellation over many points, but MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


def _total(values: torch.Tensor) -> float:
    """Sum of a 1-D tensor as a Python float, accumulated in float64 where the device allows."""
    return float(values.sum(dtype=_accumulation_dtype(values.device)))


def _linalg_device(device: torch.device) -> torch.device:
    # MPS supports neither float64 nor torch.linalg.eigh.
    return torch.device("cpu") if device.type == "mps" else device


# --------------------------------------------------------------------------- #
# k-means
# --------------------------------------------------------------------------- #


@dataclass
class KMeansResult:
    """Output of :func:`kmeans`.

    Attributes:
        centroids: ``(k, d)`` float32 cluster centres.
        assignments: ``(N,)`` int64 index of the nearest centroid of each point
            (recomputed from the final ``centroids``, so they always agree).
        inertia: sum over points of the squared distance to the assigned centroid
            (``N`` times the objective of DeepCluster eq. 6).
        n_splits: number of empty clusters re-seeded over all iterations.
        backend: ``"torch"`` or ``"faiss"``.
        groups: ``(K,)`` int64 cluster of each centroid when several centroids make one cluster
            (``cluster.study_links``, :mod:`bonecluster.study_links`); then ``assignments`` are
            cluster numbers, ``groups[nearest centroid]``. None: one centroid per cluster.
    """

    centroids: torch.Tensor
    assignments: torch.Tensor
    inertia: float
    n_splits: int
    backend: str
    groups: torch.Tensor | None = None


def faiss_available() -> bool:
    """Whether the optional faiss dependency can be imported."""
    return _import_faiss() is not None


def kmeans(
    x: torch.Tensor,
    k: int,
    niter: int = 20,
    seed: int = 0,
    init: str = "k-means++",
    backend: str = "auto",
    device: str | torch.device | None = None,
    batch_size: int = 65536,
    verbose: bool = False,
) -> KMeansResult:
    """Cluster ``x`` of shape ``(N, d)`` into ``k`` groups (DeepCluster eq. 6) with Lloyd's algorithm.

    Args:
        x: ``(N, d)`` features, usually the output of :func:`preprocess_features`.
        k: number of clusters, ``1 <= k <= N``.
        niter: Lloyd iterations (0 returns the initial centroids).
        seed: seeds initialisation and empty-cluster re-seeding; the torch backend is
            bit-for-bit deterministic on CPU given the seed.
        init: ``"k-means++"`` (greedy variant, Arthur & Vassilvitskii 2007) or ``"random"``
            (k distinct data points, DeepCluster's faiss default).
            With faiss, ``"random"`` uses faiss's own sampling and ``"k-means++"`` seeds come
            from the torch implementation, passed via ``init_centroids``.
        backend: ``"auto"`` (faiss if importable, else torch), ``"torch"`` or ``"faiss"``.
        device: where to compute (default: ``x.device``).  The faiss backend runs on CPU
            unless this is a CUDA device and faiss was built with GPU support.
        batch_size: rows per chunk of the ``(batch_size, k)`` distance matrix; peak extra
            memory is about ``4 * batch_size * k`` bytes.
        verbose: print the objective at each iteration.

    Returns:
        :class:`KMeansResult` with tensors on ``x.device``.
    """
    k = _check_kmeans_args(x, k, niter, init, backend, batch_size)
    backend = _resolve_backend(backend)
    compute_device = torch.device(device) if device is not None else x.device
    data = x.detach().to(device=compute_device, dtype=torch.float32).contiguous()
    # All randomness comes from one CPU generator so results do not depend on the device's RNG.
    generator = torch.Generator(device="cpu").manual_seed(seed)

    if backend == "torch":
        initial = _initial_centroids(data, k, init, generator)
        centroids, n_splits = _lloyd(data, initial, niter, generator, batch_size, verbose)
    else:
        centroids, n_splits = _faiss_kmeans(data, k, niter, seed, init, generator, verbose)

    assignments, sq_distances = assign(data, centroids, batch_size=batch_size)
    return KMeansResult(
        centroids=centroids.to(x.device),
        assignments=assignments.to(x.device),
        inertia=_total(sq_distances),
        n_splits=n_splits,
        backend=backend,
    )


def kmeans_best_of(x: torch.Tensor, k: int, seeds: Sequence[int], timer: NoTimer = NO_TIMER,
                   **kwargs) -> KMeansResult:
    """k-means (:func:`kmeans`, same ``kwargs``) once per seed; the run of lowest inertia wins
    (the first of equals). DeepCluster's engine uses it for ``cluster.n_init`` restarts; a
    ``timer`` (:mod:`bonecluster.timing`) times restart i as the phase ``"k-means restart i"``."""
    best = None
    for i, seed in enumerate(seeds):
        with timer.phase(f"k-means restart {i + 1}"):
            run = kmeans(x, k, seed=seed, **kwargs)
        if best is None or run.inertia < best.inertia:
            best = run
    if best is None:
        raise ValueError("kmeans_best_of needs at least one seed")
    return best


def summarise_clusters(x: torch.Tensor, labels: torch.Tensor, k: int, fallback: torch.Tensor | None = None,
                       n_splits: int = 0, backend: str = "none") -> KMeansResult:
    """Clusters given by ``labels`` (N,) over ``x`` (N, d) as a :class:`KMeansResult` whose centroids
    are the clusters' means (an empty cluster keeps its ``fallback`` row, or the origin), so that
    nearest-centroid prediction applies to clusters that k-means did not make (SeLa, SCAN)."""
    sums = torch.zeros(k, x.shape[1], device=x.device).index_add_(0, labels, x)
    counts = torch.bincount(labels, minlength=k)
    empty = fallback if fallback is not None else torch.zeros(k, x.shape[1], device=x.device)
    means = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], empty)
    inertia = float(((x - means[labels]) ** 2).sum())
    return KMeansResult(means, labels, inertia, n_splits, backend)


def assign(x: torch.Tensor, centroids: torch.Tensor, batch_size: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of each row of ``x``.

    Squared distances are ``||x||^2 - 2 x c^T + ||c||^2`` (one matmul per chunk of
    ``batch_size`` rows, so the ``(N, k)`` distance matrix is never materialised whole).

    Args:
        x: ``(N, d)`` points.
        centroids: ``(k, d)`` centres, on ``x``'s device.
    Returns:
        ``labels`` ``(N,)`` int64 and ``sq_distances`` ``(N,)`` float32 (clamped at 0).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if x.ndim != 2 or centroids.ndim != 2 or x.shape[1] != centroids.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and centroids {tuple(centroids.shape)} must be (N, d) and (k, d)")
    centroids = centroids.to(device=x.device, dtype=torch.float32)
    centroid_sq_norms = centroids.square().sum(dim=1)
    labels = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    sq_distances = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[0], batch_size):
        chunk = x[start : start + batch_size].to(torch.float32)
        # ||x||^2 is constant per row, so it does not change the argmin: add it afterwards.
        partial = torch.addmm(centroid_sq_norms, chunk, centroids.T, alpha=-2.0)
        best, best_labels = partial.min(dim=1)
        sq_distances[start : start + batch_size] = (best + chunk.square().sum(dim=1)).clamp_min(0.0)
        labels[start : start + batch_size] = best_labels
    return labels, sq_distances


# --- torch backend ----------------------------------------------------------- #


def _initial_centroids(x: torch.Tensor, k: int, init: str, generator: torch.Generator) -> torch.Tensor:
    """``(k, d)`` starting centroids drawn from the rows of ``x`` (N, d)."""
    if init == "k-means++":
        return _kmeans_plus_plus(x, k, generator)
    chosen = torch.randperm(x.shape[0], generator=generator)[:k]
    return x[chosen.to(x.device)].clone()


def _kmeans_plus_plus(
    x: torch.Tensor, k: int, generator: torch.Generator, n_local_trials: int | None = None
) -> torch.Tensor:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007; the variant scikit-learn uses).

    Each new centre is chosen among ``n_local_trials`` data points drawn with probability
    proportional to their squared distance to the closest centre so far (D^2 sampling),
    keeping the candidate that lowers the total potential most.  The greedy step avoids
    the occasional bad seeding of plain k-means++ (two seeds in one blob) for a few
    extra ``(N, n_local_trials)`` matmuls per centre.

    Args:
        x: ``(N, d)`` float32 points.
        n_local_trials: candidates per centre; default ``2 + floor(ln k)`` (``1`` is plain k-means++).
    Returns:
        ``(k, d)`` centroids on ``x``'s device.
    """
    n = x.shape[0]
    trials = n_local_trials if n_local_trials is not None else 2 + int(math.log(k))
    # Inverse-CDF sampling with uniforms drawn up front on the CPU generator: the draw
    # is seed-determined on every device and needs no host/device sync per centre.
    cdf_dtype = _accumulation_dtype(x.device)
    uniforms = torch.rand(k, trials, generator=generator, dtype=torch.float64).to(cdf_dtype).to(x.device)
    first = torch.randint(n, (1,), generator=generator).to(x.device)

    point_sq_norms = x.square().sum(dim=1)
    centroids = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    centroids[0] = x.index_select(0, first)[0]
    closest = _sq_distances_to(x, point_sq_norms, centroids[:1])[:, 0]
    for i in range(1, k):
        cdf = closest.to(cdf_dtype).cumsum(dim=0)
        # right=True skips points at distance 0 (already chosen) unless all are at distance 0.
        picks = torch.searchsorted(cdf, uniforms[i] * cdf[-1], right=True).clamp_max(n - 1)
        candidates = x.index_select(0, picks)
        closest_if_added = torch.minimum(closest.unsqueeze(1), _sq_distances_to(x, point_sq_norms, candidates))
        best = closest_if_added.sum(dim=0, dtype=cdf_dtype).argmin()
        centroids[i] = candidates.index_select(0, best.reshape(1))[0]
        closest = closest_if_added.index_select(1, best.reshape(1))[:, 0]
    return centroids


def _sq_distances_to(x: torch.Tensor, point_sq_norms: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """``(N, m)`` squared distances from the rows of ``x`` (N, d) to ``centres`` (m, d), m small."""
    cross = torch.addmm(centres.square().sum(dim=1), x, centres.T, alpha=-2.0)
    return (cross + point_sq_norms.unsqueeze(1)).clamp_min(0.0)


def _lloyd(
    x: torch.Tensor,
    centroids: torch.Tensor,
    niter: int,
    generator: torch.Generator,
    batch_size: int = 65536,
    verbose: bool = False,
) -> tuple[torch.Tensor, int]:
    """Run ``niter`` Lloyd iterations from ``centroids`` (k, d) on ``x`` (N, d).

    Returns the ``(k, d)`` centroids after the last update and the total number of
    empty clusters re-seeded.
    """
    centroids = centroids.clone()
    total_splits = 0
    for iteration in range(niter):
        centroids, n_splits, objective = _lloyd_step(x, centroids, generator, batch_size)
        total_splits += n_splits
        if verbose:
            print(f"k-means iter {iteration:3d}: objective {objective:.6g}  splits {n_splits}", flush=True)
    return centroids, total_splits


def _lloyd_step(
    x: torch.Tensor, centroids: torch.Tensor, generator: torch.Generator, batch_size: int = 65536
) -> tuple[torch.Tensor, int, float]:
    """One Lloyd iteration in faiss's order: assign, recompute means, re-seed empty clusters.

    Returns the new ``(k, d)`` centroids, the number of splits, and the inertia of the
    assignment step (w.r.t. the *input* centroids, as faiss reports it).
    """
    labels, sq_distances = assign(x, centroids, batch_size=batch_size)
    new_centroids, counts = _cluster_means(x, labels, centroids.shape[0])
    n_splits = _split_empty_clusters(new_centroids, counts, generator)
    return new_centroids, n_splits, _total(sq_distances)


def _cluster_means(x: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(k, d)`` mean of each cluster (zero rows for empty clusters) and ``(k,)`` float member counts."""
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, labels, x)
    # Float counts (faiss's `hassign`) so that splitting can halve them.
    ones = torch.ones_like(labels, dtype=x.dtype)
    counts = torch.zeros(k, dtype=x.dtype, device=x.device).index_add_(0, labels, ones)
    return sums / counts.clamp_min(1.0).unsqueeze(1), counts


def _split_empty_clusters(centroids: torch.Tensor, counts: torch.Tensor, generator: torch.Generator) -> int:
    """Re-seed every empty cluster by splitting a populated one, in place (faiss ``split_clusters``).

    For each empty cluster ``i`` a donor ``j`` is drawn with probability proportional to
    ``counts[j] - 1`` (faiss accepts ``j`` with probability ``(counts[j] - 1) / (N - k)``
    in a round-robin scan, which is the same preference for large clusters).  Then

        c_i = c_j * (1 + s * SPLIT_EPS),   c_j = c_j * (1 - s * SPLIT_EPS),

    with ``s = (+1, -1, +1, ...)`` alternating over coordinates, so the pair stays centred
    on the old ``c_j`` and the next assignment step splits ``j``'s members between them.
    The donor's count is shared between the two, so later draws see the split.

    Args:
        centroids: ``(k, d)`` centroids, modified in place.
        counts: ``(k,)`` float member counts, modified in place.
    Returns:
        The number of clusters re-seeded.
    """
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if not empty:
        return 0
    sizes = counts.to(device="cpu", dtype=torch.float64)
    signs = torch.ones(centroids.shape[1], dtype=centroids.dtype, device=centroids.device)
    signs[1::2] = -1.0
    for i in empty:
        # Positive total weight is guaranteed: N >= k points sit in fewer than k clusters.
        j = int(torch.multinomial((sizes - 1.0).clamp_min(0.0), 1, generator=generator))
        donor = centroids[j].clone()
        centroids[i] = donor * (1.0 + SPLIT_EPS * signs)
        centroids[j] = donor * (1.0 - SPLIT_EPS * signs)
        sizes[i] = sizes[j] / 2.0
        sizes[j] -= sizes[i]
    counts.copy_(sizes)
    return len(empty)


# --- faiss backend ----------------------------------------------------------- #


def _import_faiss() -> ModuleType | None:
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def _require_faiss() -> ModuleType:
    faiss = _import_faiss()
    if faiss is None:
        raise ImportError(_FAISS_HINT)
    return faiss


def _resolve_backend(backend: str) -> str:
    if backend == "auto":
        return "faiss" if faiss_available() else "torch"
    if backend == "faiss":
        _require_faiss()
    return backend


def _faiss_kmeans(
    x: torch.Tensor, k: int, niter: int, seed: int, init: str, generator: torch.Generator, verbose: bool
) -> tuple[torch.Tensor, int]:
    """k-means with ``faiss.Kmeans`` on ``x`` (N, d).

    Returns the ``(k, d)`` centroids on ``x``'s device and the number of empty-cluster splits.
    """
    faiss = _require_faiss()
    n, d = x.shape
    options = dict(
        niter=niter,
        seed=seed,
        spherical=False,
        verbose=verbose,
        # faiss subsamples to k * max_points_per_centroid points (default 256 per centroid);
        # DeepCluster data is small enough to use it all.
        max_points_per_centroid=math.ceil(n / k),
        # ... and warns below k * 39 points; k <= N is validated already, so silence it.
        min_points_per_centroid=1,
    )
    if x.device.type == "cuda" and getattr(faiss, "get_num_gpus", lambda: 0)() > 0:
        options["gpu"] = True
    # faiss initialises randomly; k-means++ seeds come from the torch implementation.
    init_centroids = _kmeans_plus_plus(x, k, generator).cpu().numpy() if init == "k-means++" else None

    model = faiss.Kmeans(d, k, **options)
    model.train(x.cpu().numpy(), init_centroids=init_centroids)
    n_splits = sum(int(stats["nsplit"]) for stats in (model.iteration_stats or []))
    return torch.from_numpy(model.centroids.copy()).to(x.device), n_splits


# --- validation -------------------------------------------------------------- #


def _check_matrix(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, d), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")


def _check_kmeans_args(x: torch.Tensor, k: int, niter: int, init: str, backend: str, batch_size: int) -> int:
    _check_matrix(x, "x")
    k = operator.index(k)
    n = x.shape[0]
    if k < 1:
        raise ValueError(f"k must be >= 1, got k={k}")
    if k > n:
        raise ValueError(f"k={k} clusters need at least as many points, got N={n}")
    if niter < 0:
        raise ValueError(f"niter must be >= 0, got {niter}")
    if init not in _INITS:
        raise ValueError(f"init must be one of {_INITS}, got {init!r}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return k
