"""Stage 2's kNN score: a part model's features, and :class:`PartAnomaly`, a part's scorer.

The part model gives two views of an image (:func:`part_features`): its pooled final
features, PCA-whitened to ``stage2.pca_dim`` by a PCA fitted on the part's training images (not the
engine's ``cluster.pca_dim``, which is tuned for clustering into a few groups) and L2-normalised;
and its ``layer3`` feature map, one L2-normalised vector per position (each averaged over its
``stage2.patch_pool`` neighbourhood first, :func:`patch_vectors`). An image's kNN score
(``stage2.score``) is a kNN distance to the part's training images in either or both (the
distances are :mod:`bonecluster.anomaly`'s). Training images are scored leaving out their study.

:class:`PartAnomaly` is what a trained part keeps (``RUN/stage2/<PART>/anomaly.pt``): with a
refiner (:mod:`bonecluster.stage2.refine`) its score is the refiner's, else the kNN score. It is
fitted by :func:`bonecluster.stage2.train.fit_part_anomaly`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bonecluster.anomaly import combine_scores, greedy_coreset, knn_scores, patch_knn_scores
from bonecluster.cluster import PCAWhitening, fit_pca_whitening, l2_normalise
from bonecluster.config import Stage2Config
from bonecluster.data.cache import PreparedDataset
from bonecluster.data.records import study_index
from bonecluster.checkpoint import TrainedClusters, load_torch, save_torch
from bonecluster.selftrain import ScoreRefiner


ANOMALY = "anomaly.pt"


@torch.no_grad()
def embed_images(trained: TrainedClusters, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """uint8 (N, S, S) -> (N, d) PCA-whitened, L2-normalised embeddings on the CPU."""
    device = next(trained.model.parameters()).device
    chunks = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).float().div_(255)
        feats = trained.model.features(x.unsqueeze(1).to(device)).float()
        chunks.append(l2_normalise(trained.pca.transform(feats.to(trained.pca.mean.device))).cpu())
    return torch.cat(chunks)


SCORES = ("global", "patch", "global+patch")


@torch.no_grad()
def part_features(trained: TrainedClusters, images: np.ndarray,
                  batch_size: int = 256, pool: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, S, S) -> pooled final features (N, D) and layer3 patches (N, L, c), on the CPU.

    The pooled features are what ``model.features`` returns; the patches are the next-to-last
    stage's map (a ResNet's ``layer3``, a ViT's patch tokens) as :func:`patch_vectors` makes them
    with ``pool`` (a part's bank and its queries must share it: ``PartAnomaly.patch_pool``).
    """
    model = trained.model
    device = next(model.parameters()).device
    pooled, patches = [], []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).float().div_(255)
        feats, mid, _ = model.pooled_and_maps(x.unsqueeze(1).to(device))
        pooled.append(feats.float().cpu())
        patches.append(patch_vectors(mid.float(), pool).cpu())
    return torch.cat(pooled), torch.cat(patches)


def patch_vectors(mid: torch.Tensor, pool: int = 1) -> torch.Tensor:
    """A feature map (N, c, h, w) -> one L2-normalised c-vector per position, (N, h * w, c).

    With ``pool`` > 1 each position is first averaged over its pool x pool neighbourhood (stride 1,
    the map's size kept, positions off the map not counted): PatchCore's locally aware patch
    features (Roth et al. 2022, section 3.1), which give each position some context.
    """
    if pool < 1 or pool % 2 == 0:   # an even window would add a row and a column of positions
        raise ValueError(f"the patch pool must be an odd whole number >= 1, got {pool}")
    if pool > 1:
        mid = torch.nn.functional.avg_pool2d(mid, pool, stride=1, padding=pool // 2, count_include_pad=False)
    return torch.nn.functional.normalize(mid.flatten(2).transpose(1, 2), dim=2)


@dataclass
class PartAnomaly:
    """A body part's banks, score scales and label-free threshold.

    ``pca`` None (files written before ``stage2.score`` existed) means the part model's own
    PCA-whitening and the plain global score. With a ``refiner`` the score is the refiner's
    (the kNN score only seeded it), and ``train_scores`` and ``threshold`` are on its scale.
    """

    bank: torch.Tensor                 # (N, d) global training embeddings
    train_scores: torch.Tensor         # (N,) leave-one-study-out scores of the training images
    threshold: float
    threshold_method: str
    knn: int
    score_kind: str = "global"
    pca: PCAWhitening | None = None
    patch_bank: torch.Tensor | None = None  # (P, c) training patches
    patch_knn: int = 1
    train_parts: tuple = ()            # per-score training scores (for combine_scores' scales)
    refiner: ScoreRefiner | None = None
    checks: dict = field(default_factory=dict)   # label-free checks of the training scores (stage2.guard)
    patch_pool: int = 1                # stage2.patch_pool the patch bank was made with (queries need the same)

    def score(self, trained: TrainedClusters, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
        """Abnormality scores of new images (uint8 (M, S, S)) with the part model ``trained``."""
        if len(images) == 0:
            return torch.zeros(0)
        if self.refiner is not None:
            return self.refiner.score(images)
        return self.knn_score(trained, images, batch_size)

    def knn_score(self, trained: TrainedClusters, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
        """The kNN score (``stage2.score``) of new images: the score itself, or the refiner's seed."""
        if len(images) == 0:
            return torch.zeros(0)
        return self.combine(self.knn_parts(trained, *part_features(trained, images, batch_size, self.patch_pool)))

    def knn_parts(self, trained: TrainedClusters, pooled: torch.Tensor, patches: torch.Tensor
                  ) -> dict[str, torch.Tensor]:
        """The kNN distances ``stage2.score`` is made of, from :func:`part_features`' pooled (M, D)
        and patch (M, L, c) features: ``{"global": (M,), "patch": (M,)}``, those the score uses."""
        parts = {}
        if self.score_kind in ("global", "global+patch"):
            pca = self.pca if self.pca is not None else trained.pca
            parts["global"] = knn_scores(self.bank, l2_normalise(pca.transform(pooled)), k=self.knn)
        if self.score_kind in ("patch", "global+patch"):
            parts["patch"] = patch_knn_scores(self.patch_bank, patches, k=self.patch_knn)
        return parts

    def combine(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """:meth:`knn_parts` -> the kNN score (M,): the one part, or both on the training scales."""
        scores = list(parts.values())
        return scores[0] if len(scores) == 1 else combine_scores(list(self.train_parts), scores)[1]

    def save(self, path: Path) -> None:
        save_torch(path, {"bank": self.bank, "train_scores": self.train_scores, "threshold": self.threshold,
                          "threshold_method": self.threshold_method, "knn": self.knn,
                          "score_kind": self.score_kind,
                          "pca": None if self.pca is None else self.pca.state_dict(),
                          "patch_bank": self.patch_bank, "patch_knn": self.patch_knn,
                          "train_parts": list(self.train_parts),
                          "refiner": None if self.refiner is None else self.refiner.state_dict(),
                          "checks": self.checks, "patch_pool": self.patch_pool})

    @classmethod
    def load(cls, path: Path) -> "PartAnomaly":
        d = load_torch(path)
        pca, refiner = d.get("pca"), d.get("refiner")
        return cls(d["bank"], d["train_scores"], float(d["threshold"]), d["threshold_method"], int(d["knn"]),
                   d.get("score_kind", "global"), None if pca is None else PCAWhitening.from_state_dict(pca),
                   d.get("patch_bank"), int(d.get("patch_knn", 1)), tuple(d.get("train_parts", ())),
                   None if refiner is None else ScoreRefiner.from_state_dict(refiner), d.get("checks") or {},
                   int(d.get("patch_pool", 1)))


def study_groups(data: PreparedDataset) -> torch.Tensor:
    """(N,) study ids of a dataset's images (an image without a study is its own group)."""
    return torch.from_numpy(study_index(data.records))


def knn_groups(data: PreparedDataset) -> torch.Tensor:
    """Study ids for leave-one-study-out kNN; image ids when there is one study only."""
    groups = study_groups(data)
    return torch.arange(len(groups)) if len(torch.unique(groups)) < 2 else groups


def knn_seed_scores(trained: TrainedClusters, data: PreparedDataset, s2: Stage2Config, *, seed: int,
                    batch_size: int) -> torch.Tensor:
    """(N,) label-free kNN scores of a part's training images under one network (the refiner's seed).
    ``seed``: the run's (it picks the patch bank's subset); ``batch_size``: ``train.feature_batch_size``."""
    return knn_fit(trained, data.images(), knn_groups(data), s2, seed=seed, batch_size=batch_size)[0]


def kept_patches(patch_bank: torch.Tensor, s2: Stage2Config, *, seed: int,
                 device: torch.device | str = "cpu") -> torch.Tensor | None:
    """Sorted indices of the training patches (P, c) a part's bank keeps, or None for all of them:
    PatchCore's coreset (``stage2.patch_coreset``, at most ``stage2.patch_bank_size``) or, with
    more patches than that size, a seeded random subset that keeps memory bounded."""
    if s2.patch_coreset > 0:
        size = min(s2.patch_bank_size, max(1, round(s2.patch_coreset * len(patch_bank))))
        return greedy_coreset(patch_bank, size, seed=seed, device=device).sort().values
    if len(patch_bank) > s2.patch_bank_size:
        keep = torch.randperm(len(patch_bank), generator=torch.Generator().manual_seed(seed))
        return keep[:s2.patch_bank_size].sort().values
    return None


def knn_fit(trained: TrainedClusters, images: np.ndarray, groups: torch.Tensor, s2: Stage2Config, *, seed: int,
            batch_size: int) -> tuple:
    """The kNN score of the training images: (scores (N,), its parts, PCA, global bank, patch bank)."""
    pooled, patches = part_features(trained, images, batch_size, s2.patch_pool)
    pca = fit_pca_whitening(pooled, dim=s2.pca_dim)
    bank = l2_normalise(pca.transform(pooled))
    parts, patch_bank = [], None
    if s2.score in ("global", "global+patch"):
        parts.append(knn_scores(bank, bank, k=s2.knn, exclude_self=True, groups=groups))
    if s2.score in ("patch", "global+patch"):
        n, positions, c = patches.shape
        patch_bank = patches.reshape(-1, c)
        owner = torch.arange(n).repeat_interleave(positions)
        keep = kept_patches(patch_bank, s2, seed=seed, device=next(trained.model.parameters()).device)
        if keep is not None:
            patch_bank, owner = patch_bank[keep], owner[keep]
        if s2.patch_coreset > 0 and len(torch.unique(groups[owner])) < 2:   # each film would leave the whole bank out
            raise ValueError(f"stage2.patch_coreset={s2.patch_coreset} keeps {len(patch_bank)} patches, all of one "
                             f"study; raise it (or set it to 0)")
        parts.append(patch_knn_scores(patch_bank, patches, k=s2.patch_knn, bank_images=owner,
                                      exclude_self=True, groups=groups))
    scores = parts[0] if len(parts) == 1 else combine_scores(parts, parts)[0]
    return scores, parts, pca, bank, patch_bank
