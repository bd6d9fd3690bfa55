"""Label-free abnormality scores and thresholds for stage 2.

Score: the mean cosine distance from an image's embedding (PCA-whitened, L2-normalised stage-2
features) to its ``k`` nearest neighbours among the training images of the same body part
(a kNN density score, as in Bergman et al. 2020, "Deep Nearest Neighbor Anomaly Detection").
Normal anatomy is common, so normal images sit in dense regions; a plate, a fracture or a
lesion makes an image unlike its neighbours. Training images are scored leave-one-out
(their own embedding is excluded), so their scores are comparable with those of new images.

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
               batch_size: int = 4096) -> torch.Tensor:
    """Mean cosine distance of each query to its k nearest bank rows.

    Args:
        bank: (N, d) L2-normalised training embeddings.
        queries: (M, d) L2-normalised embeddings to score.
        exclude_self: queries are the bank itself (M == N, same order); skip each row's own match.
    Returns:
        (M,) float32 scores in [0, 2]; higher = more unusual.
    """
    if bank.ndim != 2 or queries.ndim != 2 or bank.shape[1] != queries.shape[1]:
        raise ValueError(f"bank {tuple(bank.shape)} and queries {tuple(queries.shape)} must be (N, d), (M, d)")
    available = bank.shape[0] - (1 if exclude_self else 0)
    if available < 1:
        raise ValueError("the bank needs at least one image besides the query")
    k = min(k, available)
    out = []
    for start in range(0, queries.shape[0], batch_size):
        sims = queries[start:start + batch_size] @ bank.T
        if exclude_self:
            rows = torch.arange(sims.shape[0])
            sims[rows, rows + start] = -float("inf")
        top = sims.topk(k, dim=1).values
        out.append((1.0 - top).mean(dim=1))
    return torch.cat(out).float()


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
