"""Label-free abnormality scores and thresholds for stage 2.

Scores computed against the training images of the same body part, and their mix:

* **global** (:func:`knn_scores`): the mean cosine distance from an image's embedding (pooled
  final features, PCA-whitened with the part's own ``stage2.pca_dim`` and L2-normalised) to its
  ``k`` nearest training embeddings, a kNN density score (Bergman et al. 2020, "Deep Nearest
  Neighbor Anomaly Detection"). Normal anatomy is common, so normal images sit in dense regions.
* **patch** (:func:`patch_knn_scores`): findings are local and global pooling dilutes them, so
  each spatial position of a mid-level feature map (ResNet ``layer3``) is compared with all
  training patches, and the image's score is the largest per-position nearest-neighbour cosine
  distance (PatchCore, Roth et al. 2022, "Towards Total Recall in Industrial Anomaly
  Detection"); its coreset (:func:`greedy_coreset`) and neighbourhood-averaged positions are
  options (``stage2.patch_coreset``, ``stage2.patch_pool``).
* **Gaussian** pieces, measured in ``benchmarks/bench_real_stage2.py`` and not a ``stage2.score``
  choice (yet): :func:`gaussian_scores` (one Gaussian over the pooled features) and
  :func:`patch_gaussian_scores` (PaDiM, one per ``layer3`` position).
* **global+patch** (:func:`combine_scores`): each score is divided by the median of its
  training scores (so both are unit-free and positive) and the ratios are averaged.

Training images are scored leaving out their whole *study* (all views of the same patient
visit, which share anatomy and finding), so their scores are comparable with those of new
images, which the threshold relies on.

Threshold: chosen without labels, by fitting a two-component Gaussian mixture to the training
scores (in log space, since distances are skewed) and taking the score where the posterior of the
high-score component reaches 0.5. If the mixture is degenerate (one component, or the boundary
outside the data) it falls back to the ``fallback_quantile`` of the training scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bonecluster.cluster import l2_normalise


def knn_scores(bank: torch.Tensor, queries: torch.Tensor, k: int = 5, exclude_self: bool = False,
               batch_size: int = 4096, groups: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cosine distance of each query to its k nearest bank rows.

    Args:
        bank: (N, d) L2-normalised training embeddings.
        queries: (M, d) L2-normalised embeddings to score.
        exclude_self: queries are the bank itself (M == N, same order); skip each row's own match.
        groups: with ``exclude_self``, (N,) integer group ids (e.g. studies): skip every bank row
            of the query's group, not only the row itself.
    Returns:
        (M,) float32 scores in [0, 2]; higher = more unusual.
    """
    if bank.ndim != 2 or queries.ndim != 2 or bank.shape[1] != queries.shape[1]:
        raise ValueError(f"bank {tuple(bank.shape)} and queries {tuple(queries.shape)} must be (N, d), (M, d)")
    if exclude_self and queries.shape[0] != bank.shape[0]:
        raise ValueError("exclude_self needs the queries to be the bank itself")
    groups = _groups(groups, bank.shape[0]) if exclude_self else None
    available = _available(groups, bank.shape[0]) if exclude_self else bank.shape[0]
    if available < 1:
        raise ValueError("the bank needs at least one image besides the query (and its group)")
    k = min(k, available)
    out = []
    for start in range(0, queries.shape[0], batch_size):
        sims = queries[start:start + batch_size] @ bank.T
        if exclude_self:
            sims[groups[start:start + batch_size, None] == groups[None, :]] = -float("inf")
        top = sims.topk(k, dim=1).values
        out.append((1.0 - top).mean(dim=1))
    return torch.cat(out).float()


def patch_knn_scores(bank: torch.Tensor, queries: torch.Tensor, k: int = 1, bank_images: torch.Tensor | None = None,
                     exclude_self: bool = False, groups: torch.Tensor | None = None,
                     batch_size: int | None = None) -> torch.Tensor:
    """PatchCore-style image score: max over positions of the kNN cosine distance to bank patches.

    Args:
        bank: (P, c) L2-normalised training patch features (all positions of all training images).
        queries: (M, L, c) L2-normalised patch features of M images with L positions each.
        k: neighbours averaged per patch (1 = PatchCore's nearest-neighbour distance).
        bank_images: with ``exclude_self``, (P,) index of the training image each bank patch comes from.
        exclude_self: queries are the training images (M of them, in bank_images' order); skip the
            patches of the query image, or of its whole group when ``groups`` (M,) is given.
    Returns:
        (M,) float32 scores in [0, 2]; higher = more unusual.
    """
    if bank.ndim != 2 or queries.ndim != 3 or bank.shape[1] != queries.shape[2]:
        raise ValueError(f"bank {tuple(bank.shape)} and queries {tuple(queries.shape)} must be (P, c), (M, L, c)")
    m, positions, _ = queries.shape
    if exclude_self:
        if bank_images is None or bank_images.shape != (bank.shape[0],):
            raise ValueError("exclude_self needs bank_images, one image index per bank patch")
        image_group = _groups(groups, m)
        patch_group = image_group[bank_images.long()]
        if _available(image_group, m) < 1:
            raise ValueError("the bank needs at least one image besides the query (and its group)")
        k = min(k, int(bank.shape[0] - torch.bincount(patch_group - patch_group.min()).max()))
    k = max(1, min(k, bank.shape[0]))
    if batch_size is None:  # about 2**25 similarities (128 MiB) per chunk
        batch_size = max(1, 2 ** 25 // max(1, positions * bank.shape[0]))
    out = []
    for start in range(0, m, batch_size):
        q = queries[start:start + batch_size]
        sims = q.reshape(-1, q.shape[2]) @ bank.T
        if exclude_self:
            own = image_group[start:start + q.shape[0]].repeat_interleave(positions)
            sims[own[:, None] == patch_group[None, :]] = -float("inf")
        dist = (1.0 - sims.topk(k, dim=1).values).mean(dim=1)
        out.append(dist.view(q.shape[0], positions).amax(dim=1))
    return torch.cat(out).float()


def greedy_coreset(points: torch.Tensor, n: int, seed: int = 0, proj_dim: int = 128,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Indices of up to ``n`` rows of ``points`` (P, c) that cover them: greedy k-centre selection.

    PatchCore's coreset (Roth et al. 2022, section 3.2; Sener and Savarese 2018): start from one
    seeded random row, then add, one at a time, the row whose (Euclidean) distance to its nearest
    chosen row is largest. Distances are taken after a seeded Gaussian random projection to
    ``proj_dim`` dimensions (Johnson-Lindenstrauss), as PatchCore does, when c is larger; the
    selection runs on ``device``. Returns (n,) int64 indices on the CPU in the order chosen; fewer
    when every row is already at distance 0 from a chosen one (n is capped at P).
    """
    if points.ndim != 2 or len(points) == 0:
        raise ValueError(f"points must be a non-empty (P, c) tensor, got {tuple(points.shape)}")
    n = min(int(n), len(points))
    if n < 1:
        raise ValueError(f"a coreset needs at least one row, got n={n}")
    generator = torch.Generator().manual_seed(seed)
    x = points.float()
    if x.shape[1] > proj_dim:
        x = x @ (torch.randn(x.shape[1], proj_dim, generator=generator) / proj_dim ** 0.5)
    start = int(torch.randint(len(x), (1,), generator=generator))
    x = x.to(device)
    norms = x.square().sum(dim=1)

    tiny = 1e-5 * float(norms.max().clamp_min(1e-12))   # float rounding of the expansion below

    def squared_distances(i: int) -> torch.Tensor:   # (P,) to row i, without a (P, c) temporary
        d = (norms - 2.0 * (x @ x[i]) + norms[i]).clamp_min_(0.0)
        d[i] = 0.0
        return d

    chosen = [start]
    nearest = squared_distances(start)   # each row's squared distance to its closest chosen row
    while len(chosen) < n:
        far = int(nearest.argmax())
        if nearest[far] <= 0:            # every row coincides with a chosen one: nothing left to cover
            break
        if nearest[far] <= tiny and float((x[chosen] - x[far]).square().sum(dim=1).min()) == 0.0:
            nearest[far] = 0.0           # a copy of a chosen row (rounding kept it above 0): covered
            continue
        chosen.append(far)
        nearest = torch.minimum(nearest, squared_distances(far))
    return torch.tensor(chosen, dtype=torch.int64)


@dataclass
class Gaussian:
    """One Gaussian fitted to training features: ``mean`` (d,) and ``precision`` (d, d), float64.

    The covariance is Ledoit-Wolf-shrunk (sklearn.covariance.LedoitWolf), since a part has a few
    hundred training images for hundreds of feature dimensions. CPU tensors.
    """

    mean: torch.Tensor
    precision: torch.Tensor

    @classmethod
    def fit(cls, features: torch.Tensor) -> "Gaussian":
        """(N, d) training features, N >= 2."""
        from sklearn.covariance import LedoitWolf

        if features.ndim != 2 or features.shape[0] < 2:
            raise ValueError(f"need (N, d) features with N >= 2, got {tuple(features.shape)}")
        lw = LedoitWolf().fit(features.double().numpy())
        return cls(torch.from_numpy(lw.location_), torch.from_numpy(lw.precision_))

    def distance(self, queries: torch.Tensor) -> torch.Tensor:
        """(M, d) -> (M,) float32 Mahalanobis distances to the mean."""
        d = queries.double() - self.mean
        return ((d @ self.precision) * d).sum(dim=1).clamp_min(0.0).sqrt().float()


def gaussian_scores(train: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Feature-space Gaussian score (Rippel et al. 2020, "Modeling the Distribution of Normal Data
    in Pre-Trained Deep Features"): the Mahalanobis distance of each query (M, d) to one Gaussian
    fitted on the training features (N, d). (M,) float32; higher = more unusual."""
    return Gaussian.fit(train).distance(queries)


def patch_gaussian_scores(train: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """PaDiM-like (Defard et al. 2021): one Gaussian per spatial position over the training images'
    patch features (N, L, c); a query image's (M, L, c) score is the largest Mahalanobis distance
    over its L positions. (M,) float32. It assumes the positions line up from film to film.

    Unlike PaDiM it takes one layer's features as given (stage 2 passes L2-normalised ``layer3``
    vectors, not several layers' randomly reduced), shrinks by Ledoit-Wolf instead of adding
    0.01 I, and takes the raw maximum, not that of a smoothed, upsampled map."""
    if train.ndim != 3 or queries.ndim != 3 or train.shape[1:] != queries.shape[1:]:
        raise ValueError(f"train {tuple(train.shape)} and queries {tuple(queries.shape)} must be (N, L, c), (M, L, c)")
    per_position = [gaussian_scores(train[:, i], queries[:, i]) for i in range(train.shape[1])]
    return torch.stack(per_position, dim=1).amax(dim=1)


def combine_scores(train: list[torch.Tensor], queries: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Average several positive scores after dividing each by the median of its training scores.

    Returns the combined training scores and query scores (the same scaling applies to both).
    """
    if len(train) != len(queries) or not train:
        raise ValueError("give one training-score tensor per query-score tensor")
    scales = [t.float().median().clamp_min(1e-12) for t in train]
    combined_train = sum(t.float() / s for t, s in zip(train, scales)) / len(train)
    combined_queries = sum(q.float() / s for q, s in zip(queries, scales)) / len(train)
    return combined_train, combined_queries


def mean_rank(scores: list[torch.Tensor]) -> torch.Tensor:
    """Average several scorings of the same N images by their ranks (ties share the mean rank).

    (N,) each -> (N,) in (0, 1]. Scores from different networks live on different scales;
    ranks make them comparable without any label.
    """
    if not scores or any(s.shape != scores[0].shape or s.ndim != 1 for s in scores):
        raise ValueError("give one or more (N,) score tensors of the same length")
    from scipy.stats import rankdata

    n = len(scores[0])
    return torch.from_numpy(np.mean([rankdata(s.double().numpy()) / n for s in scores], axis=0)).float()


def percentile_of(reference: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Share of ``reference`` scores (R,) at or below each of ``x`` (M,): (M,) in [0, 1].

    Puts new images' scores on the scale of a part's training images, so that scores of
    different kinds can be averaged without labels (the reference need not be sorted).
    """
    if reference.ndim != 1 or len(reference) == 0:
        raise ValueError("the reference must be a non-empty (R,) tensor")
    ref = torch.sort(reference.double().flatten()).values
    return (torch.searchsorted(ref, x.double().flatten(), right=True).double() / len(ref)).float()


def _groups(groups: torch.Tensor | None, n: int) -> torch.Tensor:
    if groups is None:
        return torch.arange(n)
    groups = torch.as_tensor(groups).long()
    if groups.shape != (n,):
        raise ValueError(f"groups must have shape ({n},), got {tuple(groups.shape)}")
    return groups


def _available(groups: torch.Tensor, n: int) -> int:
    """Bank rows left for the query with the largest group."""
    # unique, not bincount: group ids may be large (hashes), and bincount allocates max - min + 1
    return n - int(torch.unique(groups, return_counts=True)[1].max()) if n else 0


@dataclass
class Threshold:
    value: float
    method: str   # "gmm" or "quantile"


def label_free_threshold(scores: np.ndarray, fallback_quantile: float = 0.9, seed: int = 0) -> Threshold:
    """Split training scores into a low (normal) and high (abnormal) mode without labels."""
    from sklearn.mixture import GaussianMixture

    s = np.asarray(scores, float)
    if len(s) < 4 or np.ptp(s) <= 0:
        return Threshold(float(np.quantile(s, fallback_quantile)), "quantile")
    logs = np.log(np.clip(s, 1e-9, None)).reshape(-1, 1)
    gmm = GaussianMixture(2, random_state=seed, n_init=3).fit(logs)
    high = int(np.argmax(gmm.means_.ravel()))
    grid = np.linspace(logs.min(), logs.max(), 2048).reshape(-1, 1)
    posterior = gmm.predict_proba(grid)[:, high]
    crossing = np.nonzero(posterior >= 0.5)[0]
    if len(crossing) == 0 or crossing[0] == 0 or abs(gmm.means_[0, 0] - gmm.means_[1, 0]) < 1e-6:
        return Threshold(float(np.quantile(s, fallback_quantile)), "quantile")
    return Threshold(float(np.exp(grid[crossing[0], 0])), "gmm")


def normalise(x: torch.Tensor) -> torch.Tensor:
    return l2_normalise(x.float())
