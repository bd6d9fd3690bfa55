"""SCAN's clustering step (Van Gansbeke et al. 2020, "SCAN: Learning to Classify Images without
Labels", §2.2) on frozen self-supervised embeddings.

k-means puts a boundary wherever the embedding's density dips; SCAN instead asks a classifier to
give an image and its nearest neighbours the same cluster (eq. 2), while an entropy term keeps
every cluster in use. Van Gansbeke et al. fine-tune the whole network; here the backbone stays
frozen and the classifier sees several augmented views of each image, which is cheap enough for a
CPU (one feature pass per view) and keeps the augmentation consistency that SCAN relies on.

Shapes: ``clean`` (N, d) L2-normalised embeddings of the unaugmented images; ``views``
(V, N, d) embeddings of V augmented copies, in the same space.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def mine_neighbours(x: Tensor, k: int, batch_size: int = 4096) -> Tensor:
    """Indices ``(N, k)`` of each row's ``k`` most cosine-similar other rows of ``x`` (N, d)."""
    if not 1 <= k < len(x):
        raise ValueError(f"need 1 <= k < N to mine neighbours, got k={k}, N={len(x)}")
    x = F.normalize(x.float(), dim=1)
    out = []
    for start in range(0, len(x), batch_size):
        sim = x[start:start + batch_size] @ x.T
        rows = torch.arange(start, min(start + batch_size, len(x)), device=x.device)
        sim[torch.arange(len(rows), device=x.device), rows] = -float("inf")  # not its own neighbour
        out.append(sim.topk(k, dim=1).indices)
    return torch.cat(out)


def scan_loss(anchor_logits: Tensor, neighbour_logits: Tensor, entropy_weight: float = 5.0) -> tuple[Tensor, Tensor]:
    """SCAN eq. 2: ``-mean log <p(anchor), p(neighbour)> - w * H(mean p(anchor))``.

    Args:
        anchor_logits, neighbour_logits: ``(B, k)`` classifier outputs for B (anchor, neighbour) pairs.
    Returns:
        (total loss, consistency term); the entropy term is ``consistency - total`` over ``w``.
    """
    p_anchor = anchor_logits.softmax(dim=1)
    p_neighbour = neighbour_logits.softmax(dim=1)
    consistency = -torch.log((p_anchor * p_neighbour).sum(dim=1).clamp_min(1e-8)).mean()
    mean_p = p_anchor.mean(dim=0).clamp_min(1e-8)
    entropy = -(mean_p * mean_p.log()).sum()
    return consistency - entropy_weight * entropy, consistency


@dataclass
class ScanResult:
    assignments: Tensor   # (N,) int64 cluster of each clean image
    loss: float           # final SCAN loss of the chosen head (lowest of the heads trained)
    head: int             # which head won


def scan_cluster(clean: Tensor, views: Tensor, k: int, n_neighbours: int = 20, epochs: int = 100,
                 batch_size: int = 256, lr: float = 1e-3, entropy_weight: float = 5.0, heads: int = 5,
                 seed: int = 0) -> ScanResult:
    """Train ``heads`` linear classifiers with the SCAN loss and keep the one with the lowest loss
    (SCAN §3.1 selects its head the same way, without labels).

    Each step draws anchors, one random neighbour of each among its ``n_neighbours`` nearest
    (mined on ``clean``), and a random view of both.
    """
    if views.ndim != 3 or views.shape[1:] != clean.shape:
        raise ValueError(f"views must be (V, N, d) with (N, d) = {tuple(clean.shape)}, got {tuple(views.shape)}")
    gen = torch.Generator().manual_seed(seed)
    device = clean.device
    n = len(clean)
    neighbours = mine_neighbours(clean, min(n_neighbours, n - 1))
    classifiers = [torch.nn.Linear(clean.shape[1], k) for _ in range(heads)]
    for head in classifiers:  # seeded init on the CPU (``gen`` is a CPU generator), independent of the global RNG
        torch.nn.init.normal_(head.weight, 0.0, 0.01, generator=gen)
        torch.nn.init.zeros_(head.bias)
        head.to(device)
    params = [p for head in classifiers for p in head.parameters()]
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=1e-4)
    losses = torch.zeros(heads)
    steps_per_epoch = max(1, n // batch_size)
    for _ in range(epochs):
        losses.zero_()
        order = torch.randperm(n, generator=gen)
        for step in range(steps_per_epoch):
            anchors = order[step * batch_size:(step + 1) * batch_size]
            pick = torch.randint(neighbours.shape[1], (len(anchors),), generator=gen)
            partners = neighbours[anchors.to(device), pick.to(device)].cpu()
            va = torch.randint(len(views), (len(anchors),), generator=gen)
            vp = torch.randint(len(views), (len(anchors),), generator=gen)
            xa, xp = views[va, anchors], views[vp, partners]
            total = 0.0
            for h, head in enumerate(classifiers):
                loss, _ = scan_loss(head(xa), head(xp), entropy_weight)
                losses[h] += loss.item() / steps_per_epoch
                total = total + loss
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
    best = int(losses.argmin())
    with torch.no_grad():
        labels = classifiers[best](clean).argmax(dim=1)
    return ScanResult(labels, float(losses[best]), best)
