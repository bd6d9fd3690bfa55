"""The files of an engine run, and how they are written and read back.

Everything a run needs lives in its folder::

    OUT/config.yaml     the resolved config        OUT/metrics.csv   one row per epoch
    OUT/checkpoint.pt   written atomically after every epoch (resume from it)
    OUT/model.pt        the final model, PCA-whitening, centroids and assignments

``checkpoint.pt`` holds format, epoch, model, hparams, assignments (the last round's), history,
config, rng and scaler, plus the method's own entries (``Method.state_dict``): ``optimizer``
for DeepCluster's rounds, ``pretrain`` (head, optimizer; DINO adds teacher and center) for the
two-view pre-training. ``model.pt`` holds format, model, hparams, pca, centroids, assignments
and config, and ``groups`` (the cluster of each centroid) when several centroids make one
cluster (``cluster.study_links``).

Checkpoints hold only tensors and plain values and are read with ``weights_only=True``. Both
``.pt`` files carry ``format`` (:data:`FORMAT`); files written before the key existed have the
same layout and read as format 1. A file of a newer format fails with a message naming it.

This module is what prediction, export and stage 2 need from a finished run; it does not import
the training loop (:mod:`bonecluster.engine`), which writes these files.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bonecluster.cluster import PCAWhitening, assign
from bonecluster.config import Config, config_from_dict
from bonecluster.io import atomic_open, atomic_write_text
from bonecluster.models import DeepClusterNet

CHECKPOINT = "checkpoint.pt"
FINAL_MODEL = "model.pt"
METRICS = "metrics.csv"
FORMAT = 1   # the layout of checkpoint.pt and model.pt; raise it when a key changes meaning
# target_entropy: DINO's teacher targets, mean entropy / ln K (near 1 = collapsed to flat outputs);
# phantom_loss: simclr-phantoms' task cross-entropy on its labelled phantoms (loss adds it times selfsup.phantom_weight)
METRIC_COLUMNS = ("epoch", "phase", "loss", "nmi_prev", "largest_share", "n_empty_splits", "cluster_sizes",
                  "images_per_s", "seconds", "kmeans_seconds", "lr", "target_entropy", "phantom_loss")


def save_torch(path: Path, obj: dict) -> None:
    """torch.save through a temp file and a rename: a kill leaves the old file intact."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    with atomic_open(path, "wb") as f:
        f.write(buf.getbuffer())


def load_torch(path: Path, map_location=None) -> dict:
    """Load our own checkpoints without unpickling arbitrary objects."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - name the file, whatever torch raised
        raise RuntimeError(f"{path}: cannot load checkpoint ({err})") from err


def load_run_file(path: Path, map_location=None) -> dict:
    """:func:`load_torch` for ``checkpoint.pt`` / ``model.pt``, refusing a format this version cannot read."""
    state = load_torch(path, map_location=map_location)
    version = state.get("format", 1) if isinstance(state, dict) else None
    if not isinstance(version, int) or version > FORMAT:
        raise RuntimeError(f"{path}: written in run-file format {version}; this bonecluster reads formats "
                           f"1 to {FORMAT} (train again, or use the bonecluster version that wrote it)")
    return state


@dataclass
class TrainedClusters:
    """A finished engine run, ready to embed and assign new images."""

    model: DeepClusterNet
    pca: PCAWhitening
    centroids: torch.Tensor   # (K, d): one per cluster, or several (groups)
    assignments: np.ndarray   # (N,) training images' final clusters
    cfg: Config
    groups: torch.Tensor | None = None   # (K,) cluster of each centroid (cluster.study_links); None: centroid i is cluster i

    @property
    def n_clusters(self) -> int:
        """k, the number of clusters (fewer than the centroids when several make one cluster)."""
        return len(self.centroids) if self.groups is None else int(self.groups.max()) + 1

    def assign(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cluster of each embedded point ``(N, d)``: its nearest centroid's (through ``groups``), and
        the squared distance to that centroid ``(N,)``."""
        labels, sq_distances = assign(points.float(), self.centroids.float())
        if self.groups is not None:
            labels = self.groups.to(labels.device)[labels]
        return labels, sq_distances

    def centroid_clusters(self) -> torch.Tensor:
        """``(K,)`` cluster of each centroid."""
        return self.groups if self.groups is not None else torch.arange(len(self.centroids))

    def cluster_distances(self, points: torch.Tensor, clusters: torch.Tensor) -> torch.Tensor:
        """``(N,)`` squared distance from each point ``(N, d)`` to the nearest centroid of its given
        cluster ``(N,)`` (how central a film is in its cluster, whether the cluster has one centroid or several)."""
        points = points.float()
        # one centroid at a time, as (x - c)^2 summed: exact, so near-equal films keep their order
        sq = torch.stack([(points - c).pow(2).sum(1) for c in self.centroids.float()], dim=1)
        own = self.centroid_clusters()[None, :] == clusters.long()[:, None]
        return sq.masked_fill(~own, float("inf")).min(dim=1).values

    @classmethod
    def load(cls, out: str | Path, device: str | torch.device = "cpu") -> "TrainedClusters":
        state = load_run_file(Path(out) / FINAL_MODEL, map_location="cpu")  # only the network moves to `device`
        # Files written before `model.channels_last` existed hold NCHW-trained networks; keeping
        # the layout a run was trained in keeps its predictions equal to its training assignments.
        model = DeepClusterNet(**{"channels_last": False, **state["hparams"]})
        model.load_state_dict(state["model"])
        return cls(model.to(device).eval(), PCAWhitening.from_state_dict(state["pca"]),
                   state["centroids"], state["assignments"].numpy(), config_from_dict(state["config"]),
                   state.get("groups"))


def write_metrics(path: Path, history: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS)
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(path, buf.getvalue())


def read_metrics(path: str | Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
