"""Self-supervised building blocks used by the stronger clustering methods.

* :func:`nt_xent` — SimCLR's normalised-temperature cross-entropy (Chen et al. 2020, eq. 1):
  two augmented views of the same radiograph attract, every other image in the batch repels.
  Pre-training with it before clustering is what SCAN (Van Gansbeke et al. 2020, §2.1) and
  most successors do; DeepCluster's own pseudo-labels start from random features.
* :class:`ProjectionHead` — the MLP ``g(.)`` the contrastive loss acts on (SimCLR §2.1); the
  clustering uses the backbone features before it, as SimCLR recommends.
* :func:`sinkhorn_balanced` — equal-size soft assignments by Sinkhorn-Knopp (SeLa, Asano et al.
  2020, §3.1; SwAV, Caron et al. 2020, §3.1): the guard against one cluster swallowing the data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ProjectionHead(nn.Module):
    """SimCLR's 2-layer MLP: ``(N, in_dim)`` -> ``(N, out_dim)``, BN + ReLU in between."""

    def __init__(self, in_dim: int, hidden_dim: int = 512, out_dim: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim),
                                 nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.2) -> Tensor:
    """SimCLR's NT-Xent loss for a batch of positive pairs.

    Args:
        z1, z2: ``(N, d)`` projections of two views; row i of each comes from image i.
        temperature: ``tau`` in ``exp(cos(z_i, z_j) / tau)``.
    Returns:
        A scalar: the mean over all ``2N`` anchors of ``-log softmax`` of the positive among the
        ``2N - 1`` other projections.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"expected two (N, d) batches of the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))  # an image is not its own negative
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, positives)


@torch.no_grad()
def sinkhorn_balanced(scores: Tensor, epsilon: float = 0.05, n_iter: int = 50) -> Tensor:
    """Balanced assignment of N items to k clusters (SwAV Alg. 1 / SeLa's Sinkhorn-Knopp).

    Solves ``max_Q <Q, scores> + epsilon * H(Q)`` subject to every cluster receiving ``N / k``
    of the mass and every item 1, by alternately rescaling rows and columns of
    ``exp(scores / epsilon)``.

    Args:
        scores: ``(N, k)`` similarities (e.g. cosine between embeddings and centroids).
        epsilon: entropy weight; smaller is closer to a hard, exactly balanced assignment.
        n_iter: Sinkhorn iterations.
    Returns:
        ``(N, k)`` float32 soft assignments; each row sums to 1 and each column to about N / k.
        ``argmax(dim=1)`` gives hard pseudo-labels.
    """
    if scores.ndim != 2 or scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"expected a non-empty (N, k) score matrix, got {tuple(scores.shape)}")
    # Log space: exp(1 / 0.05) = e^20 per unit of cosine would overflow otherwise. A constant
    # added to the column step would cancel in the row step, so columns are scaled to sum to 1.
    logq = scores.double() / epsilon
    for _ in range(n_iter):
        logq = logq - torch.logsumexp(logq, dim=0, keepdim=True)  # equal mass per cluster
        logq = logq - torch.logsumexp(logq, dim=1, keepdim=True)  # each item's mass sums to 1
    return logq.exp().float()
