"""Apply a trained run folder to images: stage-1 cluster and body part, stage-2 abnormality.

:class:`Predictor` loads what a run folder holds (stage-1 model, centroids and cluster names;
one model, embedding bank and threshold per body part) and predicts for a prepared dataset.
``evaluate`` and ``predict`` build on it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from bonecluster.cluster import assign
from bonecluster.engine import FINAL_MODEL, TrainedClusters
from bonecluster.data.cache import PreparedDataset
from bonecluster.stage2 import ANOMALY, PartAnomaly, embed_images

# Softmax temperature over negative squared distances to the stage-1 centroids. Embeddings are
# L2-normalised, so squared distances lie in [0, 4]; 0.1 turns a 0.2 gap into e^-2. The result
# ranks how clearly an image belongs to its cluster; it is not a calibrated probability.
CONFIDENCE_TEMPERATURE = 0.1


@dataclass
class ImagePrediction:
    path: str
    cluster: int | None        # stage-1 cluster id (None when the run has no stage 1)
    cluster_name: str | None   # its name (majority body part, cluster-N, or a user's name)
    confidence: float | None   # softmax over centroid distances, see CONFIDENCE_TEMPERATURE
    part: str | None           # the body part whose stage-2 model scored it
    score: float | None        # stage-2 abnormality score (see stage2.score), None without a part model
    threshold: float | None
    abnormal: bool | None

    def to_dict(self) -> dict:
        return asdict(self)


class Predictor:
    """A run folder's models, ready to predict (on the CPU by default).

    A run trained with ``--stages 2`` alone has no stage-1 model: its predictions then carry no
    cluster, and stage 2 needs the body part from the data's metadata.
    """

    def __init__(self, run: str | Path, device: str | torch.device = "cpu"):
        from bonecluster.pipeline import load_cluster_names

        self.run = Path(run)
        stage1 = self.run / "stage1"
        has_stage1 = (stage1 / FINAL_MODEL).exists()
        self.stage1 = TrainedClusters.load(stage1, device) if has_stage1 else None
        self.names = load_cluster_names(stage1) if has_stage1 else {}
        self.parts = self._load_parts(device)
        if self.stage1 is None and not self.parts:
            raise FileNotFoundError(f"{self.run}: no trained model (neither stage1/ nor stage2/<PART>/)")

    def _load_parts(self, device) -> dict[str, tuple[TrainedClusters, PartAnomaly]]:
        parts = {}
        for folder in sorted((self.run / "stage2").glob("*/")):
            if (folder / FINAL_MODEL).exists() and (folder / ANOMALY).exists():
                parts[folder.name] = (TrainedClusters.load(folder, device), PartAnomaly.load(folder / ANOMALY))
        return parts

    def predict(self, data: PreparedDataset, use_metadata_parts: bool = True) -> list[ImagePrediction]:
        """One prediction per record. Stage 2 uses the metadata body part when there is one
        (and ``use_metadata_parts``), else the stage-1 cluster name."""
        return self.predict_with_embeddings(data, use_metadata_parts)[0]

    def predict_with_embeddings(self, data: PreparedDataset, use_metadata_parts: bool = True
                                ) -> tuple[list[ImagePrediction], np.ndarray | None]:
        """Predictions plus the stage-1 embeddings (N, d) they came from (None without stage 1)."""
        images = data.images()
        n = len(data.records)
        clusters, confidence, embeddings = self._stage1(images) if self.stage1 else ([None] * n, [None] * n, None)
        names = [None if c is None else self.names.get(int(c), f"cluster-{int(c)}") for c in clusters]
        parts = [(r.body_part if use_metadata_parts and r.body_part else nm) for r, nm in zip(data.records, names)]
        scores = self._stage2(images, parts)
        out = []
        for i, rec in enumerate(data.records):
            model = self.parts.get(parts[i])
            threshold = model[1].threshold if model else None
            score = scores.get(i)
            out.append(ImagePrediction(rec.path, _opt(int, clusters[i]), names[i], _opt(float, confidence[i]),
                                       parts[i] if model else None, score, threshold,
                                       None if score is None else bool(score >= threshold)))
        return out, embeddings

    def _stage1(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = embed_images(self.stage1, images)
        centroids = self.stage1.centroids.float()
        labels, _ = assign(x, centroids)
        sq = (x.pow(2).sum(1, keepdim=True) - 2 * x @ centroids.T + centroids.pow(2).sum(1)).clamp_min(0)
        prob = torch.softmax(-sq / CONFIDENCE_TEMPERATURE, dim=1)
        return labels.numpy(), prob.gather(1, labels.view(-1, 1)).squeeze(1).numpy(), x.numpy()

    def _stage2(self, images: np.ndarray, parts: list[str]) -> dict[int, float]:
        scores: dict[int, float] = {}
        for part, (trained, anomaly) in self.parts.items():
            idx = np.array([i for i, p in enumerate(parts) if p == part], np.int64)
            if len(idx):
                s = anomaly.score(trained, images[idx])
                scores.update(zip(idx.tolist(), s.tolist()))
        return scores


def _opt(kind, value):
    return None if value is None else kind(value)
