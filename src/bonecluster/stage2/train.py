"""Stage 2's training: per body part, a DeepCluster engine on that part's images, then its scorer.

For each body part (:func:`group_by_part`: the data's metadata where it exists, e.g. MURA
folders, else the stage-1 cluster names), :func:`train_stage2` trains an engine with stage 1's
settings and the stage-2 replacements (:func:`stage2_config`) into ``RUN/stage2/<PART>``, then
fits the part's scorer (:func:`fit_part_anomaly`: the kNN score of
:mod:`bonecluster.stage2.scoring`, its label-free refinement, :mod:`bonecluster.stage2.refine`,
and a threshold chosen without labels, :func:`bonecluster.anomaly.label_free_threshold`) and, in
few-label mode, the probe (:mod:`bonecluster.stage2.fewlabel`). With ``stage2.networks`` > 1,
extra networks of the part (seeds seed+1, ...) seed the refinement; each keeps only its kNN
scores (``RUN/stage2/<PART>/seed-net-I/seed_scores.pt``).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch

from bonecluster.anomaly import label_free_threshold
from bonecluster.config import Config, Stage2Config, stage2_data_config
from bonecluster.data.cache import PreparedDataset, prepare_like
from bonecluster.checkpoint import CHECKPOINT, FINAL_MODEL, TrainedClusters, load_torch, save_torch
from bonecluster.engine import DeepClusterEngine
from bonecluster.selftrain import share_list
from bonecluster.stage2.parts import group_by_part
from bonecluster.stage2.fewlabel import PROBE, labels_to_choose, parse_probe_features, pseudo_shares, train_part_probe
from bonecluster.stage2.guard import score_checks
from bonecluster.stage2.refine import refine_scores, refinement_seed
from bonecluster.stage2.scoring import ANOMALY, SCORES, PartAnomaly, knn_fit, knn_groups, knn_seed_scores
from bonecluster.timing import NO_TIMER, NoTimer

log = logging.getLogger("bonecluster")

SEED_SCORES = "seed_scores.pt"   # an extra seed network's kNN scores (stage2.networks)
SAME = "same"                    # stage2.weights: start where stage 1's network started
MIN_STAGE2_SIZE = 16             # stage2.size: layer3, the patch score's map, keeps one position at 16 px


def stage2_config(cfg: Config) -> Config:
    """Stage 1's engine settings with the stage-2 replacements (k, epochs, and the network's start
    where ``stage2.weights`` is not ``same``).

    The part networks see films at ``stage2.size`` (:func:`stage2_data_config`). Stage 1's
    over-clustering (``cluster.train_k``), study-level clustering (``cluster.by_study``), final
    clusters merged through studies (``cluster.study_links``), phantom part subspace
    (``cluster.subspace``: within one part it would keep the directions that tell the other parts
    apart) and whitening strength (``cluster.eigen_power``, chosen on body parts) are not carried
    over: a part has a few hundred images, and its rounds cluster images into ``stage2.k`` in the
    usual PCA-whitened space.
    """
    weights = stage2_weights(cfg)
    model = cfg.model if weights == SAME else replace(cfg.model, weights=weights)
    return replace(cfg, model=model, data=stage2_data_config(cfg),
                   cluster=replace(cfg.cluster, k=cfg.stage2.k, train_k=0, by_study=False, study_links=0,
                                   subspace="none", eigen_power=-0.5),
                   train=replace(cfg.train, epochs=cfg.stage2.epochs))


def stage2_dataset(data: PreparedDataset, cfg: Config, progress: bool = True) -> PreparedDataset:
    """``data`` (decoded for stage 1) at stage 2's size, record for record, from the same cache
    folder; ``data`` itself when the sizes are one."""
    s2data = stage2_data_config(cfg)
    return prepare_like(data, s2data.preprocess(), s2data.limits(), workers=s2data.workers or None, progress=progress)


def stage2_weights(cfg: Config) -> str:
    """``stage2.weights`` checked: ``same`` or a ``model.weights`` value."""
    weights = str(cfg.stage2.weights).strip()
    if not weights:
        raise ValueError("stage2.weights is empty: use 'same' (stage 1's model.weights) or a model.weights value")
    return SAME if weights.lower() == SAME else weights


def fit_part_anomaly(trained: TrainedClusters, data: PreparedDataset, s2: Stage2Config,
                     extra_seeds: tuple[torch.Tensor, ...] = (), *, seed: int, batch_size: int,
                     part: str = "") -> PartAnomaly:
    """The part's scorer, with its label-free checks (:mod:`bonecluster.stage2.guard`; ``part``
    names it in their warnings). ``extra_seeds``: (N,) kNN scores of the same images under other networks
    (``stage2.networks``); with them the refinement starts from the mean rank of all seeds.
    ``seed``: the run's (patch bank subset, threshold mixture); ``batch_size``: ``train.feature_batch_size``."""
    if s2.score not in SCORES:
        raise ValueError(f"stage2.score must be one of {SCORES}, got {s2.score!r}")
    images = data.images()
    groups = knn_groups(data)
    knn, parts, pca, bank, patch_bank = knn_fit(trained, images, groups, s2, seed=seed, batch_size=batch_size)
    refiner, scores = refine_scores(images, knn, extra_seeds, groups, s2)
    seed_scores = refinement_seed(knn, extra_seeds).numpy() if refiner is not None else None
    checks = score_checks(scores.numpy(), seed_scores, images, groups.numpy(), part)
    t = label_free_threshold(scores.numpy(), s2.fallback_quantile, seed=seed)
    return PartAnomaly(bank, scores, t.value, t.method, s2.knn, s2.score, pca, patch_bank, s2.patch_knn,
                       tuple(parts) if len(parts) > 1 else (), refiner, checks, s2.patch_pool)


def check_stage2(cfg: Config) -> None:
    """Fail in a second on a stage-2 setting out of range, before any pre-training or decoding."""
    stage2_weights(cfg)
    size = cfg.stage2.size
    if not isinstance(size, int) or isinstance(size, bool) or size < 0 or 0 < size < MIN_STAGE2_SIZE:
        raise ValueError(f"stage2.size must be 0 (stage 1's data.size) or a whole number of pixels "
                         f">= {MIN_STAGE2_SIZE}, got {size!r}")
    if not isinstance(cfg.stage2.epochs, int) or cfg.stage2.epochs < 0:
        raise ValueError(f"stage2.epochs must be a whole number >= 0 (0: the part networks as they start), "
                         f"got {cfg.stage2.epochs!r}")
    labels_to_choose(cfg.stage2.labels_fraction, 0)   # a fraction outside [0, 1]
    parse_probe_features(cfg.stage2.probe_features)
    if cfg.stage2.probe_pseudo_share != "prevalence":
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
    pool = cfg.stage2.patch_pool
    if not isinstance(pool, int) or isinstance(pool, bool) or pool < 1 or pool % 2 == 0:
        raise ValueError(f"stage2.patch_pool must be an odd whole number >= 1 (1 = each position alone, "
                         f"3 = PatchCore's 3 x 3 neighbourhood), got {pool!r}")
    if not 0.0 <= cfg.stage2.patch_coreset < 1.0:
        raise ValueError(f"stage2.patch_coreset must be in [0, 1) (the share of training patches kept; "
                         f"0 = every one), got {cfg.stage2.patch_coreset}")


def train_stage2(data: PreparedDataset, run: str | Path, cfg: Config, stage1_names: list[str] | None = None,
                 resume: bool = False, progress: bool = True, timer: NoTimer = NO_TIMER) -> dict:
    """Train one model per part into RUN/stage2/<PART>; returns a summary per part. ``data`` is
    decoded for stage 1; with ``stage2.size`` set the parts train on the same records at that size
    (decoded once into the same cache: :func:`stage2_dataset`). ``timer`` records each part as the
    phase "stage 2 <PART>" (:mod:`bonecluster.timing`)."""
    s2cfg = stage2_config(cfg)
    check_stage2(cfg)
    data = stage2_dataset(data, cfg, progress)
    if cfg.stage2.networks > 1 and cfg.stage2.refine_rounds == 0:
        log.warning("stage 2: stage2.networks=%d is ignored without refinement (stage2.refine_rounds=0): "
                    "the extra networks only seed it; one network per part", cfg.stage2.networks)
    elif cfg.stage2.networks > 1 and cfg.stage2.epochs == 0:
        log.warning("stage 2: stage2.networks=%d is ignored with stage2.epochs=0: untrained networks from the same "
                    "weights are one network; one network per part", cfg.stage2.networks)
    if cfg.stage2.score == "global" and (cfg.stage2.patch_pool != 1 or cfg.stage2.patch_coreset > 0):
        log.warning("stage 2: stage2.patch_pool and stage2.patch_coreset shape the patch score, which "
                    "stage2.score=global does not use; they are ignored")
    summary = {}
    for part, positions in group_by_part(data, stage1_names).items():
        if len(positions) < max(cfg.stage2.min_images, cfg.stage2.k):
            log.warning("stage 2: skipping %s (%d images; at least %d needed)", part, len(positions),
                        max(cfg.stage2.min_images, cfg.stage2.k))
            continue
        with timer.phase(f"stage 2 {part}"):
            summary[part] = _train_part(data.subset(positions), Path(run) / "stage2" / part, s2cfg, resume,
                                        progress, timer)
    return summary


def _train_part(subset: PreparedDataset, out: Path, cfg: Config, resume: bool, progress: bool,
                timer: NoTimer = NO_TIMER) -> dict:
    engine = DeepClusterEngine(cfg, out, progress=progress)
    engine.timer = timer
    if cfg.train.epochs == 0:   # nothing to resume; an earlier training's checkpoint must not stand in for it
        (out / CHECKPOINT).unlink(missing_ok=True)
    resume = resume and (out / CHECKPOINT).exists()
    fit = engine.fit(subset, resume=resume)
    trained = TrainedClusters.load(out, engine.device)
    extra_seeds, extra_seconds = _extra_seed_scores(subset, out, cfg, resume, progress)
    anomaly = fit_part_anomaly(trained, subset, cfg.stage2, extra_seeds, seed=cfg.seed,
                               batch_size=cfg.train.feature_batch_size, part=out.name)
    probe = None
    if cfg.stage2.labels_fraction > 0:
        probe = train_part_probe(trained, subset, anomaly, cfg.stage2, out.name,
                                 batch_size=cfg.train.feature_batch_size)
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
               "flagged_share": round(flagged, 4), "checks": anomaly.checks}
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
    for i in range(1, _seed_networks(cfg.stage2)):
        folder = _seed_net_folder(out, i)
        saved = _saved_seed_scores(folder, len(subset)) if resume else None
        if saved is not None:
            _drop_seed_network(folder)   # a run killed between writing the scores and deleting it left it
            scores.append(saved)
            continue
        net_cfg = replace(cfg, seed=cfg.seed + i)
        engine = DeepClusterEngine(net_cfg, folder, progress=progress)
        fit = engine.fit(subset, resume=resume and (folder / CHECKPOINT).exists())
        seconds += fit.seconds
        score = knn_seed_scores(TrainedClusters.load(folder, engine.device), subset, net_cfg.stage2, seed=net_cfg.seed,
                                batch_size=net_cfg.train.feature_batch_size)
        if engine.dist.is_main:
            save_torch(folder / SEED_SCORES, {"scores": score, "n_images": len(subset), "seed": net_cfg.seed})
            _drop_seed_network(folder)
        scores.append(score)
    return tuple(scores), seconds


def _drop_seed_network(folder: Path) -> None:
    """Delete an extra seed network's checkpoint and model once its scores are kept."""
    for name in (CHECKPOINT, FINAL_MODEL):
        (folder / name).unlink(missing_ok=True)


def _saved_seed_scores(folder: Path, n_images: int) -> torch.Tensor | None:
    if not (folder / SEED_SCORES).exists():
        return None
    saved = load_torch(folder / SEED_SCORES)
    return saved["scores"] if saved["n_images"] == n_images else None


def saved_extra_seeds(part_folder: str | Path, n_images: int, s2: Stage2Config) -> tuple[torch.Tensor, ...]:
    """The extra seed networks' kNN scores stored in a trained part folder (for re-fitting its
    scorer with other settings, as ``benchmarks/bench_stage2.py`` does); raises when one is missing."""
    extra = []
    for i in range(1, _seed_networks(s2)):
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


def _seed_networks(s2: Stage2Config) -> int:
    """Networks per part that seed the refinement; one when it is off or nothing is trained."""
    return s2.networks if s2.refine_rounds > 0 and s2.epochs > 0 else 1
