"""Self-supervised building blocks used by the stronger clustering methods.

* :func:`nt_xent` — SimCLR's normalised-temperature cross-entropy (Chen et al. 2020, eq. 1):
  two augmented views of the same radiograph attract, every other image in the batch repels.
  Pre-training with it before clustering is what SCAN (Van Gansbeke et al. 2020, §2.1) and
  most successors do; DeepCluster's own pseudo-labels start from random features.
* :class:`ProjectionHead` — the MLP ``g(.)`` the contrastive loss acts on (SimCLR §2.1); the
  clustering uses the backbone features before it, as SimCLR recommends.
* :class:`DinoHead` and :func:`dino_loss` — DINO's self-distillation without labels (Caron et al.
  2021, Alg. 1): a student network matches the sharpened, centred output of a teacher that is
  the moving average of the student. No negatives are needed; centring and sharpening stop the
  collapse to one output.
* :func:`sinkhorn_balanced` — equal-size soft assignments by Sinkhorn-Knopp (SeLa, Asano et al.
  2020, §3.1; SwAV, Caron et al. 2020, §3.1): the guard against one cluster swallowing the data.
"""

from __future__ import annotations

import math

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


def queue_info_nce(q: Tensor, k: Tensor, queue: Tensor, temperature: float = 0.2) -> Tensor:
    """MoCo's InfoNCE (He et al. 2020, eq. 1) with the batch's other keys as negatives too (MoCo v3,
    Chen et al. 2021).

    Args:
        q: ``(N, d)`` queries; row i's positive is row i of ``k``.
        k: ``(N, d)`` keys from the momentum encoder (no gradient flows into them).
        queue: ``(K, d)`` earlier keys, unit length, all negatives (``K = 0``: the batch only).
        temperature: ``tau`` in ``exp(cos(q, k) / tau)``.
    Returns:
        A scalar: the mean over the N queries of ``-log softmax`` of the positive among the N keys of
        the batch and the K of the queue.
    """
    if q.shape != k.shape or q.ndim != 2 or queue.ndim != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(f"expected (N, d) queries and keys and a (K, d) queue, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)} and {tuple(queue.shape)}")
    q, k = F.normalize(q.float(), dim=1), F.normalize(k.detach().float(), dim=1)
    logits = torch.cat([q @ k.T, q @ queue.float().T], dim=1) / temperature
    return F.cross_entropy(logits, torch.arange(len(q), device=q.device))


class DinoHead(nn.Module):
    """DINO's head: ``(N, in_dim)`` -> ``(N, prototypes)`` cosine scores in [-1, 1].

    The MLP (:class:`ProjectionHead`) ends in an L2-normalised bottleneck; the last layer's
    weights are normalised too, which is DINO's weight-normalised layer with its norm fixed to 1
    (``norm_last_layer=True``, Caron et al. 2021, §3.1 and Appendix).
    """

    def __init__(self, in_dim: int, hidden_dim: int = 512, bottleneck_dim: int = 128, prototypes: int = 256) -> None:
        super().__init__()
        self.mlp = ProjectionHead(in_dim, hidden_dim, bottleneck_dim)
        self.prototypes = nn.Parameter(torch.randn(prototypes, bottleneck_dim) / bottleneck_dim ** 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.mlp(x), dim=1) @ F.normalize(self.prototypes, dim=1).T


def dino_targets(teacher: Tensor, center: Tensor, teacher_temperature: float = 0.04) -> Tensor:
    """The teacher's centred, sharpened distributions ``softmax((teacher - center) / t_t)`` over the
    last dimension (the prototypes), without gradient."""
    return F.softmax((teacher.detach().float() - center) / teacher_temperature, dim=-1)


def normalised_entropy(probs: Tensor) -> float:
    """Mean entropy of the rows of ``(..., K)`` distributions divided by ``ln K``: 1.0 when every row
    is uniform (DINO's collapse to flat outputs), 0.0 when every row is one-hot."""
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
    return float(entropy / math.log(probs.shape[-1]))


def dino_loss(student: Tensor, teacher: Tensor, center: Tensor, student_temperature: float = 0.1,
              teacher_temperature: float = 0.04) -> Tensor:
    """DINO's cross-view distillation loss (Caron et al. 2021, Alg. 1, eq. 1).

    Args:
        student, teacher: ``(V, N, K)`` head outputs for V augmented views of N images; the
            teacher's carry no gradient.
        center: ``(K,)`` running mean of the teacher's outputs, subtracted before sharpening.
        student_temperature, teacher_temperature: the softmax temperatures; the teacher's lower
            one sharpens its targets.
    Returns:
        A scalar: the mean over images and over every ordered pair of different views (a, b) of
        ``-softmax((teacher[a] - center) / t_t) . log_softmax(student[b] / t_s)``.
    """
    if student.shape != teacher.shape or student.ndim != 3 or student.shape[0] < 2:
        raise ValueError(f"expected two (V >= 2, N, K) outputs of the same shape, got {tuple(student.shape)} "
                         f"and {tuple(teacher.shape)}")
    targets = dino_targets(teacher, center, teacher_temperature)
    log_probs = F.log_softmax(student.float() / student_temperature, dim=-1)
    views = student.shape[0]
    pairs = [-(targets[a] * log_probs[b]).sum(-1).mean() for a in range(views) for b in range(views) if a != b]
    return torch.stack(pairs).mean()


@torch.no_grad()
def ema_(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """``target <- momentum * target + (1 - momentum) * source``, parameter by parameter, in place
    (DINO's teacher update; buffers such as BatchNorm statistics are the teacher's own)."""
    for t, s in zip(target.parameters(), source.parameters(), strict=True):
        t.lerp_(s.detach(), 1.0 - momentum)


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
