"""How typical a film is of a run's training films: the out-of-distribution flag.

A run only knows the films it was trained on. A film unlike all of them (a real radiograph
given to a phantom-trained run, a leg film given to an upper-limb run) still lands in some
cluster, often with a high confidence, since the confidence compares the centroids with each
other, not with the training films. The flag asks another question: is the film as close to its
nearest training films as the training films are to theirs?

* ``distance``: the mean cosine distance (1 - cos) from the film's stage-1 embedding to its
  ``k`` nearest training embeddings;
* each training film gets the same figure leave-one-out (its own row left out), the reference;
* ``typicality``: the share of training films, in %, whose own distance is at least the film's.
  A film as close as the closest training film scores 100; one farther out than every training
  film scores 0;
* ``in_distribution``: typicality >= 100 - ``percentile`` (default 99): the film is no farther
  out than the 99th percentile of the training films' own distances. About 1 % of films like the
  training films are flagged by construction (a little more for new films than for the training
  films themselves, which the reference leaves out one at a time).

This is the k-NN distance score of Sun et al. 2022 ("Out-of-distribution detection with deep
nearest neighbors"), on the L2-normalised embedding that stage 1 clusters, with its threshold
set as a percentile of the training distances.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from bonecluster.io import atomic_write_bytes
from bonecluster.selftrain import standardisation

TYPICALITY = "typicality.npz"   # in a run's stage1/ folder
DEFAULT_K = 5                   # neighbours averaged
DEFAULT_PERCENTILE = 99.0       # training films' own distances a new film may reach


METRICS = ("cosine", "euclidean")


@torch.no_grad()
def knn_distances(queries: Tensor, bank: Tensor, k: int, leave_one_out: bool = False,
                  batch_size: int = 4096, metric: str = "cosine") -> Tensor:
    """Mean distance (N,) from each row of ``queries`` (N, d) to its ``k`` nearest rows of ``bank``
    (M, d): cosine distance (1 - cos; the length of a row does not count) or Euclidean. With
    ``leave_one_out`` the queries are the bank itself and row i skips row i."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if leave_one_out and len(queries) != len(bank):
        raise ValueError("leave_one_out needs the bank itself as the queries")
    available = len(bank) - (1 if leave_one_out else 0)
    if not 1 <= k <= available:
        raise ValueError(f"need 1 <= k <= {available} neighbours, got k={k}")
    q, b = queries.float(), bank.float()
    if metric == "cosine":
        q, b = F.normalize(q, dim=1), F.normalize(b, dim=1)
    out = []
    for start in range(0, len(q), batch_size):
        chunk = q[start:start + batch_size]
        # the negated distance, so that the nearest rows are the largest (cdist exactly, not by matmul)
        near = (chunk @ b.T - 1.0 if metric == "cosine"
                else -torch.cdist(chunk, b, compute_mode="donot_use_mm_for_euclid_dist"))
        if leave_one_out:
            rows = torch.arange(len(near))
            near[rows, rows + start] = -float("inf")
        out.append((-near.topk(k, dim=1).values).clamp_min(0.0).mean(1))
    return torch.cat(out)


def percentile_rank(reference: np.ndarray, distances: np.ndarray) -> np.ndarray:
    """% of ``reference`` (sorted ascending) at least as large as each of ``distances``: 100 for
    a film as close as the closest training film, 0 beyond the farthest."""
    farther = len(reference) - np.searchsorted(reference, distances, side="left")
    return 100.0 * farther / len(reference)


@dataclass
class Typicality:
    """The training films' embeddings and their own leave-one-out distances.

    Shapes: ``bank`` (N, d) float32; ``reference`` (N,) float64, sorted ascending. With
    ``standardise`` (for descriptors whose columns differ in scale, such as
    :func:`bonecluster.descriptors.appearance`), ``center`` and ``scale`` (d,) are the training
    films' column means and spreads, applied to every film before its distances; the bank holds
    the standardised rows. ``metric``: see :func:`knn_distances`; after standardising, Euclidean,
    since how far a film lies from the training films' mean matters, not only in which direction.
    """

    bank: Tensor
    reference: np.ndarray
    k: int = DEFAULT_K
    percentile: float = DEFAULT_PERCENTILE
    center: Tensor | None = None
    scale: Tensor | None = None
    metric: str = "cosine"

    @classmethod
    def fit(cls, embeddings: Tensor, k: int = DEFAULT_K, percentile: float = DEFAULT_PERCENTILE,
            standardise: bool = False, metric: str = "cosine") -> "Typicality":
        """From the training films' stage-1 embeddings (N, d); ``k`` is lowered for tiny runs."""
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        if len(embeddings) < 2:
            raise ValueError("need at least two training films to place a distance among theirs")
        bank = embeddings.detach().float().cpu()
        center = scale = None
        if standardise:   # a column constant over the training films gets scale 1: it then only adds distance
            center, scale = standardisation(bank)
            bank = (bank - center) / scale
        k = min(k, len(bank) - 1)
        reference = np.sort(knn_distances(bank, bank, k, leave_one_out=True, metric=metric).double().numpy())
        return cls(bank, reference, k, float(percentile), center, scale, metric)

    def distance(self, embeddings: Tensor) -> np.ndarray:
        """Mean distance (N,) of new films' embeddings (N, d) to their k nearest training films."""
        x = torch.as_tensor(embeddings).float()
        if self.center is not None:
            x = (x - self.center) / self.scale
        return knn_distances(x, self.bank, self.k, metric=self.metric).double().numpy()

    def typicality(self, embeddings: Tensor) -> np.ndarray:
        """% of training films (N,) at least as far from their own neighbours as each new film."""
        return percentile_rank(self.reference, self.distance(embeddings))

    def in_distribution(self, typicality: np.ndarray) -> np.ndarray:
        """Boolean (N,): no farther out than ``percentile`` % of the training films."""
        return np.asarray(typicality) >= 100.0 - self.percentile

    def save(self, path: str | Path) -> None:
        buf = io.BytesIO()
        extra = {} if self.center is None else {"center": self.center.numpy(), "scale": self.scale.numpy()}
        np.savez(buf, bank=self.bank.numpy().astype(np.float32), reference=self.reference,
                 k=np.int64(self.k), percentile=np.float64(self.percentile), metric=np.str_(self.metric), **extra)
        atomic_write_bytes(Path(path), buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> "Typicality":
        with np.load(Path(path), allow_pickle=False) as z:
            center = torch.from_numpy(z["center"].astype(np.float32)) if "center" in z else None
            scale = torch.from_numpy(z["scale"].astype(np.float32)) if "scale" in z else None
            metric = str(z["metric"]) if "metric" in z else "cosine"   # files written before the field
            return cls(torch.from_numpy(z["bank"].astype(np.float32)), z["reference"].astype(np.float64),
                       int(z["k"]), float(z["percentile"]), center, scale, metric)
