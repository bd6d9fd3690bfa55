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

TYPICALITY = "typicality.npz"   # in a run's stage1/ folder
DEFAULT_K = 5                   # neighbours averaged
DEFAULT_PERCENTILE = 99.0       # training films' own distances a new film may reach


@torch.no_grad()
def knn_distances(queries: Tensor, bank: Tensor, k: int, leave_one_out: bool = False,
                  batch_size: int = 4096) -> Tensor:
    """Mean cosine distance (N,) from each row of ``queries`` (N, d) to its ``k`` nearest rows of
    ``bank`` (M, d). With ``leave_one_out`` the queries are the bank itself and row i skips row i."""
    if leave_one_out and len(queries) != len(bank):
        raise ValueError("leave_one_out needs the bank itself as the queries")
    available = len(bank) - (1 if leave_one_out else 0)
    if not 1 <= k <= available:
        raise ValueError(f"need 1 <= k <= {available} neighbours, got k={k}")
    q, b = F.normalize(queries.float(), dim=1), F.normalize(bank.float(), dim=1)
    out = []
    for start in range(0, len(q), batch_size):
        sim = q[start:start + batch_size] @ b.T
        if leave_one_out:
            rows = torch.arange(len(sim))
            sim[rows, rows + start] = -float("inf")
        out.append((1.0 - sim.topk(k, dim=1).values).clamp_min(0.0).mean(1))
    return torch.cat(out)


def percentile_rank(reference: np.ndarray, distances: np.ndarray) -> np.ndarray:
    """% of ``reference`` (sorted ascending) at least as large as each of ``distances``: 100 for
    a film as close as the closest training film, 0 beyond the farthest."""
    farther = len(reference) - np.searchsorted(reference, distances, side="left")
    return 100.0 * farther / len(reference)


@dataclass
class Typicality:
    """The training films' embeddings and their own leave-one-out distances.

    Shapes: ``bank`` (N, d) float32; ``reference`` (N,) float64, sorted ascending.
    """

    bank: Tensor
    reference: np.ndarray
    k: int = DEFAULT_K
    percentile: float = DEFAULT_PERCENTILE

    @classmethod
    def fit(cls, embeddings: Tensor, k: int = DEFAULT_K, percentile: float = DEFAULT_PERCENTILE) -> "Typicality":
        """From the training films' stage-1 embeddings (N, d); ``k`` is lowered for tiny runs."""
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        if len(embeddings) < 2:
            raise ValueError("need at least two training films to place a distance among theirs")
        bank = embeddings.detach().float().cpu()
        k = min(k, len(bank) - 1)
        reference = np.sort(knn_distances(bank, bank, k, leave_one_out=True).double().numpy())
        return cls(bank, reference, k, float(percentile))

    def distance(self, embeddings: Tensor) -> np.ndarray:
        """Mean cosine distance (N,) of new films' embeddings (N, d) to their k nearest training films."""
        return knn_distances(torch.as_tensor(embeddings), self.bank, self.k).double().numpy()

    def typicality(self, embeddings: Tensor) -> np.ndarray:
        """% of training films (N,) at least as far from their own neighbours as each new film."""
        return percentile_rank(self.reference, self.distance(embeddings))

    def in_distribution(self, typicality: np.ndarray) -> np.ndarray:
        """Boolean (N,): no farther out than ``percentile`` % of the training films."""
        return np.asarray(typicality) >= 100.0 - self.percentile

    def save(self, path: str | Path) -> None:
        buf = io.BytesIO()
        np.savez(buf, bank=self.bank.numpy().astype(np.float32), reference=self.reference,
                 k=np.int64(self.k), percentile=np.float64(self.percentile))
        atomic_write_bytes(Path(path), buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> "Typicality":
        with np.load(Path(path), allow_pickle=False) as z:
            return cls(torch.from_numpy(z["bank"].astype(np.float32)), z["reference"].astype(np.float64),
                       int(z["k"]), float(z["percentile"]))
