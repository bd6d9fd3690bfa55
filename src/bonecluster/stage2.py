"""Stage 2: one deep-clustering model per body part, and a label-free abnormality score.

For each body part, a DeepCluster engine is trained on that part's images only (the grouping
comes from the data's metadata where it exists, e.g. MURA folders, else from the stage-1 cluster
names). The part model gives two views of an image (:func:`part_features`): its pooled final
features, PCA-whitened to ``stage2.pca_dim`` by a PCA fitted on the part's training images (not the
engine's ``cluster.pca_dim``, which is tuned for clustering into a few groups) and L2-normalised;
and its ``layer3`` feature map, one L2-normalised vector per position. An image's abnormality score
(``stage2.score``) is a kNN distance to the part's training images in either or both, and the
threshold is chosen without labels (see :mod:`bonecluster.anomaly`). Training images are scored
leaving out their study.

With ``stage2.refine_rounds`` > 0 (the default) that kNN score only seeds a label-free
refinement: study-level pseudo-labels of the training images fit HOG logistic models (one per
share in ``stage2.refine_share``), whose mean probability then becomes the part's score
(:class:`bonecluster.selftrain.ScoreRefiner`).

Files, per part::

    RUN/stage2/<PART>/            the engine run (config, metrics.csv, checkpoint.pt, model.pt)
    RUN/stage2/<PART>/anomaly.pt  banks (global (N, d) and patch (P, c)), PCA, training scores,
                                  score scales, threshold, settings, the optional refiner
    RUN/stage2/<PART>/probe.pt    few-label mode only: the logistic probe and the audit of the
                                  training labels it used (count, positions, paths)
Few-label mode lives in :mod:`bonecluster.fewlabel`.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from bonecluster.anomaly import combine_scores, knn_scores, label_free_threshold, mean_rank, patch_knn_scores
from bonecluster.cluster import PCAWhitening, fit_pca_whitening, l2_normalise
from bonecluster.config import Config
from bonecluster.data.cache import PreparedDataset
from bonecluster.data.records import study_index
from bonecluster.engine import CHECKPOINT, FINAL_MODEL, DeepClusterEngine, TrainedClusters, load_torch, save_torch
from bonecluster.selftrain import ScoreRefiner, share_list

log = logging.getLogger("bonecluster")

ANOMALY = "anomaly.pt"
PROBE = "probe.pt"  # few-label mode, see bonecluster.fewlabel
SEED_SCORES = "seed_scores.pt"   # an extra seed network's kNN scores (stage2.networks)


def stage2_config(cfg: Config) -> Config:
    """Stage 1's engine settings with the stage-2 replacements (k and epochs).

    Stage 1's over-clustering (``cluster.train_k``) and study-level clustering
    (``cluster.by_study``) are not carried over: a part has a few hundred images, and its rounds
    cluster images into ``stage2.k``.
    """
    return replace(cfg, cluster=replace(cfg.cluster, k=cfg.stage2.k, train_k=0, by_study=False),
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


SCORES = ("global", "patch", "global+patch")


@torch.no_grad()
def part_features(trained: TrainedClusters, images: np.ndarray,
                  batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, S, S) -> pooled final features (N, D) and layer3 patches (N, L, c), on the CPU.

    The pooled features are what ``model.features`` returns; the patches are the ResNet's
    ``layer3`` output, one L2-normalised c-vector per spatial position (L = h * w).
    """
    model = trained.model
    net = model.backbone
    device = next(model.parameters()).device
    pooled, patches = [], []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).float().div_(255)
        x = model.preprocess(x.unsqueeze(1).to(device))
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        mid = net.layer3(net.layer2(net.layer1(x)))
        pooled.append(torch.flatten(net.avgpool(net.layer4(mid)), 1).float().cpu())
        patches.append(torch.nn.functional.normalize(mid.float().flatten(2).transpose(1, 2), dim=2).cpu())
    return torch.cat(pooled), torch.cat(patches)


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
        pooled, patches = part_features(trained, images, batch_size)
        parts = []
        if self.score_kind in ("global", "global+patch"):
            pca = self.pca if self.pca is not None else trained.pca
            parts.append(knn_scores(self.bank, l2_normalise(pca.transform(pooled)), k=self.knn))
        if self.score_kind in ("patch", "global+patch"):
            parts.append(patch_knn_scores(self.patch_bank, patches, k=self.patch_knn))
        if len(parts) == 1:
            return parts[0]
        return combine_scores(list(self.train_parts), parts)[1]

    def save(self, path: Path) -> None:
        save_torch(path, {"bank": self.bank, "train_scores": self.train_scores, "threshold": self.threshold,
                          "threshold_method": self.threshold_method, "knn": self.knn,
                          "score_kind": self.score_kind,
                          "pca": None if self.pca is None else self.pca.state_dict(),
                          "patch_bank": self.patch_bank, "patch_knn": self.patch_knn,
                          "train_parts": list(self.train_parts),
                          "refiner": None if self.refiner is None else self.refiner.state_dict()})

    @classmethod
    def load(cls, path: Path) -> "PartAnomaly":
        d = load_torch(path)
        pca, refiner = d.get("pca"), d.get("refiner")
        return cls(d["bank"], d["train_scores"], float(d["threshold"]), d["threshold_method"], int(d["knn"]),
                   d.get("score_kind", "global"), None if pca is None else PCAWhitening.from_state_dict(pca),
                   d.get("patch_bank"), int(d.get("patch_knn", 1)), tuple(d.get("train_parts", ())),
                   None if refiner is None else ScoreRefiner.from_state_dict(refiner))


def study_groups(data: PreparedDataset) -> torch.Tensor:
    """(N,) study ids of a dataset's images (an image without a study is its own group)."""
    return torch.from_numpy(study_index(data.records))


def _knn_groups(data: PreparedDataset) -> torch.Tensor:
    """Study ids for leave-one-study-out kNN; image ids when there is one study only."""
    groups = study_groups(data)
    return torch.arange(len(groups)) if len(torch.unique(groups)) < 2 else groups


def knn_seed_scores(trained: TrainedClusters, data: PreparedDataset, cfg: Config) -> torch.Tensor:
    """(N,) label-free kNN scores of a part's training images under one network (the refiner's seed)."""
    return _knn_fit(trained, data, cfg, data.images(), _knn_groups(data))[0]


def fit_part_anomaly(trained: TrainedClusters, data: PreparedDataset, cfg: Config,
                     extra_seeds: tuple[torch.Tensor, ...] = ()) -> PartAnomaly:
    """The part's scorer. ``extra_seeds``: (N,) kNN scores of the same images under other networks
    (``stage2.networks``); with them the refinement starts from the mean rank of all seeds."""
    s2 = cfg.stage2
    if s2.score not in SCORES:
        raise ValueError(f"stage2.score must be one of {SCORES}, got {s2.score!r}")
    images = data.images()
    groups = _knn_groups(data)
    scores, parts, pca, bank, patch_bank = _knn_fit(trained, data, cfg, images, groups)
    refiner = None
    if s2.refine_rounds > 0:
        seed = mean_rank([scores, *extra_seeds]) if extra_seeds else scores
        refiner = ScoreRefiner.fit(images, seed.numpy(), groups.numpy(), s2.refine_rounds, s2.refine_share,
                                   s2.refine_C)
        if refiner is None:
            log.warning("stage 2: the kNN score ranks every training study of this part alike; no refinement")
        else:
            scores = refiner.score(images)
    t = label_free_threshold(scores.numpy(), s2.fallback_quantile, seed=cfg.seed)
    return PartAnomaly(bank, scores, t.value, t.method, s2.knn, s2.score, pca, patch_bank, s2.patch_knn,
                       tuple(parts) if len(parts) > 1 else (), refiner)


def _knn_fit(trained: TrainedClusters, data: PreparedDataset, cfg: Config, images: np.ndarray,
             groups: torch.Tensor) -> tuple:
    """The kNN score of the training images: (scores (N,), its parts, PCA, global bank, patch bank)."""
    s2 = cfg.stage2
    pooled, patches = part_features(trained, images, cfg.train.feature_batch_size)
    pca = fit_pca_whitening(pooled, dim=s2.pca_dim)
    bank = l2_normalise(pca.transform(pooled))
    parts, patch_bank = [], None
    if s2.score in ("global", "global+patch"):
        parts.append(knn_scores(bank, bank, k=s2.knn, exclude_self=True, groups=groups))
    if s2.score in ("patch", "global+patch"):
        n, positions, c = patches.shape
        patch_bank = patches.reshape(-1, c)
        owner = torch.arange(n).repeat_interleave(positions)
        if len(patch_bank) > s2.patch_bank_size:   # a seeded random subset keeps memory bounded
            keep = torch.randperm(len(patch_bank), generator=torch.Generator().manual_seed(cfg.seed))
            keep = keep[:s2.patch_bank_size].sort().values
            patch_bank, owner = patch_bank[keep], owner[keep]
        parts.append(patch_knn_scores(patch_bank, patches, k=s2.patch_knn, bank_images=owner,
                                      exclude_self=True, groups=groups))
    scores = parts[0] if len(parts) == 1 else combine_scores(parts, parts)[0]
    return scores, parts, pca, bank, patch_bank


def train_stage2(data: PreparedDataset, run: str | Path, cfg: Config, stage1_names: list[str] | None = None,
                 resume: bool = False, progress: bool = True) -> dict:
    """Train one model per part into RUN/stage2/<PART>; returns a summary per part."""
    from bonecluster.fewlabel import labels_to_choose, parse_probe_features, pseudo_shares

    s2cfg = stage2_config(cfg)
    labels_to_choose(cfg.stage2.labels_fraction, 0)   # fail early on a fraction outside [0, 1]
    parse_probe_features(cfg.stage2.probe_features)
    if cfg.stage2.probe_pseudo_share != "prevalence":   # fail early on bad shares
        pseudo_shares(cfg.stage2.probe_pseudo_share)
    if cfg.stage2.probe_self_train < 0 or cfg.stage2.refine_rounds < 0:
        raise ValueError("stage2.probe_self_train and stage2.refine_rounds are rounds (0 = off) and must be >= 0, "
                         f"got {cfg.stage2.probe_self_train} and {cfg.stage2.refine_rounds}")
    if not 0.0 <= cfg.stage2.probe_mix <= 1.0:
        raise ValueError(f"stage2.probe_mix must be in [0, 1], got {cfg.stage2.probe_mix}")
    share_list(cfg.stage2.refine_share, "stage2.refine_share")
    if cfg.stage2.refine_C <= 0:
        raise ValueError(f"stage2.refine_C must be > 0, got {cfg.stage2.refine_C}")
    if not isinstance(cfg.stage2.networks, int) or cfg.stage2.networks < 1:
        raise ValueError(f"stage2.networks must be a whole number >= 1, got {cfg.stage2.networks!r}")
    if cfg.stage2.networks > 1 and cfg.stage2.refine_rounds == 0:
        log.warning("stage 2: stage2.networks=%d is ignored without refinement (stage2.refine_rounds=0): "
                    "the extra networks only seed it; one network per part", cfg.stage2.networks)
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
    resume = resume and (out / CHECKPOINT).exists()
    fit = engine.fit(subset, resume=resume)
    trained = TrainedClusters.load(out, engine.device)
    extra_seeds, extra_seconds = _extra_seed_scores(subset, out, cfg, resume, progress)
    anomaly = fit_part_anomaly(trained, subset, cfg, extra_seeds)
    probe = None
    if cfg.stage2.labels_fraction > 0:
        from bonecluster.fewlabel import train_part_probe  # imports this module: load it lazily

        probe = train_part_probe(trained, subset, anomaly, cfg, out.name)
    if engine.dist.is_main:
        anomaly.save(out / ANOMALY)
        if probe is not None:
            probe.save(out / PROBE)
        elif (out / PROBE).exists():   # an earlier run's probe must not outlive a run without one
            (out / PROBE).unlink()
    flagged = float((anomaly.train_scores >= anomaly.threshold).float().mean())
    summary = {"n_images": len(subset), "epochs_run": fit.epochs_run, "networks": 1 + len(extra_seeds),
               "seconds": round(fit.seconds + extra_seconds, 1),
               "threshold": round(anomaly.threshold, 5), "threshold_method": anomaly.threshold_method,
               "flagged_share": round(flagged, 4)}
    if probe is not None:
        summary["few_labels"] = probe.audit()
    return summary


def _extra_seed_scores(subset: PreparedDataset, out: Path, cfg: Config, resume: bool,
                       progress: bool) -> tuple[tuple[torch.Tensor, ...], float]:
    """Train networks 1..``stage2.networks``-1 of a part (seeds seed+1, ...) and return their kNN
    scores of the part's training images, with the seconds spent. Each keeps only its scores
    (``seed-net-I/seed_scores.pt``, written atomically); its checkpoint and model are deleted, so a
    run folder does not grow by whole networks. ``--resume`` reuses finished scores."""
    scores, seconds = [], 0.0
    for i in range(1, _seed_networks(cfg)):
        folder = _seed_net_folder(out, i)
        saved = _saved_seed_scores(folder, len(subset)) if resume else None
        if saved is not None:
            scores.append(saved)
            continue
        net_cfg = replace(cfg, seed=cfg.seed + i)
        engine = DeepClusterEngine(net_cfg, folder, progress=progress)
        fit = engine.fit(subset, resume=resume and (folder / CHECKPOINT).exists())
        seconds += fit.seconds
        score = knn_seed_scores(TrainedClusters.load(folder, engine.device), subset, net_cfg)
        if engine.dist.is_main:
            save_torch(folder / SEED_SCORES, {"scores": score, "n_images": len(subset), "seed": net_cfg.seed})
            for name in (CHECKPOINT, FINAL_MODEL):
                (folder / name).unlink(missing_ok=True)
        scores.append(score)
    return tuple(scores), seconds


def _saved_seed_scores(folder: Path, n_images: int) -> torch.Tensor | None:
    if not (folder / SEED_SCORES).exists():
        return None
    saved = load_torch(folder / SEED_SCORES)
    return saved["scores"] if saved["n_images"] == n_images else None


def saved_extra_seeds(part_folder: str | Path, n_images: int, cfg: Config) -> tuple[torch.Tensor, ...]:
    """The extra seed networks' kNN scores stored in a trained part folder (for re-fitting its
    scorer with other settings, as ``benchmarks/bench_stage2.py`` does); raises when one is missing."""
    extra = []
    for i in range(1, _seed_networks(cfg)):
        folder = _seed_net_folder(Path(part_folder), i)
        score = _saved_seed_scores(folder, n_images)
        if score is None:
            raise FileNotFoundError(f"{folder / SEED_SCORES}: missing or for other images; retrain stage 2 "
                                    "or set stage2.networks=1")
        extra.append(score)
    return tuple(extra)


def _seed_net_folder(part_folder: Path, i: int) -> Path:
    """Where extra seed network ``i`` (1, 2, ...) of a part trains and keeps its scores."""
    return part_folder / f"seed-net-{i}"


def _seed_networks(cfg: Config) -> int:
    """Networks per part that seed the refinement; one when it is off."""
    return cfg.stage2.networks if cfg.stage2.refine_rounds > 0 else 1

