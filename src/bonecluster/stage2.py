"""Stage 2: one deep-clustering model per body part, and a label-free abnormality score.

For each body part, a DeepCluster engine is trained on that part's images only (the grouping
comes from the data's metadata where it exists, e.g. MURA folders, else from the stage-1 cluster
names). Its final features, PCA-whitened and L2-normalised, are the part's embedding space; an
image's abnormality score is its kNN distance to the part's training images and the threshold is
chosen without labels (see :mod:`bonecluster.anomaly`).

Files, per part::

    RUN/stage2/<PART>/            the engine run (config, metrics.csv, checkpoint.pt, model.pt)
    RUN/stage2/<PART>/anomaly.pt  embedding bank (N, d), training scores, threshold, knn
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from bonecluster.anomaly import knn_scores, label_free_threshold
from bonecluster.config import Config
from bonecluster.data.cache import PreparedDataset
from bonecluster.engine import DeepClusterEngine, TrainedClusters, load_torch, save_torch

log = logging.getLogger("bonecluster")

ANOMALY = "anomaly.pt"


def stage2_config(cfg: Config) -> Config:
    """Stage 1's engine settings with the stage-2 replacements (k and epochs)."""
    return replace(cfg, cluster=replace(cfg.cluster, k=cfg.stage2.k),
                   train=replace(cfg.train, epochs=cfg.stage2.epochs))


def group_by_part(data: PreparedDataset, stage1_names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Positions of each part's images: metadata body part first, else the stage-1 cluster name."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, rec in enumerate(data.records):
        name = rec.body_part or (stage1_names[i] if stage1_names is not None else None)
        if name is None:
            raise ValueError(f"{rec.path}: no body part in the metadata and no stage-1 run to name it; "
                             "train stage 1 first (--stages 1,2)")
        groups[name].append(i)
    return {name: np.asarray(pos, np.int64) for name, pos in sorted(groups.items())}


@torch.no_grad()
def embed_images(trained: TrainedClusters, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """uint8 (N, S, S) -> (N, d) PCA-whitened, L2-normalised embeddings on the CPU."""
    from bonecluster.cluster import l2_normalise

    device = next(trained.model.parameters()).device
    chunks = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).float().div_(255)
        feats = trained.model.features(x.unsqueeze(1).to(device)).float()
        chunks.append(l2_normalise(trained.pca.transform(feats.to(trained.pca.mean.device))).cpu())
    return torch.cat(chunks)


@dataclass
class PartAnomaly:
    """A body part's embedding bank and label-free threshold."""

    bank: torch.Tensor          # (N, d) training embeddings
    train_scores: torch.Tensor  # (N,) leave-one-out scores of the training images
    threshold: float
    threshold_method: str
    knn: int

    def score(self, embeddings: torch.Tensor) -> torch.Tensor:
        return knn_scores(self.bank, embeddings, k=self.knn)

    def save(self, path: Path) -> None:
        save_torch(path, {"bank": self.bank, "train_scores": self.train_scores, "threshold": self.threshold,
                          "threshold_method": self.threshold_method, "knn": self.knn})

    @classmethod
    def load(cls, path: Path) -> "PartAnomaly":
        d = load_torch(path)
        return cls(d["bank"], d["train_scores"], float(d["threshold"]), d["threshold_method"], int(d["knn"]))


def fit_part_anomaly(trained: TrainedClusters, data: PreparedDataset, cfg: Config) -> PartAnomaly:
    bank = embed_images(trained, data.images(), cfg.train.feature_batch_size)
    scores = knn_scores(bank, bank, k=cfg.stage2.knn, exclude_self=True)
    t = label_free_threshold(scores.numpy(), cfg.stage2.fallback_quantile, seed=cfg.seed)
    return PartAnomaly(bank, scores, t.value, t.method, cfg.stage2.knn)


def train_stage2(data: PreparedDataset, run: str | Path, cfg: Config, stage1_names: list[str] | None = None,
                 resume: bool = False, progress: bool = True) -> dict:
    """Train one model per part into RUN/stage2/<PART>; returns a summary per part."""
    s2cfg = stage2_config(cfg)
    summary = {}
    for part, positions in group_by_part(data, stage1_names).items():
        if len(positions) < max(cfg.stage2.min_images, cfg.stage2.k):
            log.warning("stage 2: skipping %s (%d images; at least %d needed)", part, len(positions),
                        max(cfg.stage2.min_images, cfg.stage2.k))
            continue
        summary[part] = _train_part(data.subset(positions), Path(run) / "stage2" / part, s2cfg, resume, progress)
    return summary


def _train_part(subset: PreparedDataset, out: Path, cfg: Config, resume: bool, progress: bool) -> dict:
    engine = DeepClusterEngine(cfg, out, progress=progress)
    resume = resume and (out / "checkpoint.pt").exists()
    fit = engine.fit(subset, resume=resume)
    anomaly = fit_part_anomaly(TrainedClusters.load(out, engine.device), subset, cfg)
    if engine.dist.is_main:
        anomaly.save(out / ANOMALY)
    flagged = float((anomaly.train_scores >= anomaly.threshold).float().mean())
    return {"n_images": len(subset), "epochs_run": fit.epochs_run, "seconds": round(fit.seconds, 1),
            "threshold": round(anomaly.threshold, 5), "threshold_method": anomaly.threshold_method,
            "flagged_share": round(flagged, 4)}
