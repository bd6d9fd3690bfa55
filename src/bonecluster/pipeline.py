"""The run folder and its stages: records -> cache -> stage 1 (body parts) -> stage 2 (per part).

Layout of a run folder (everything needed to predict, evaluate, serve or resume)::

    RUN/config.yaml      the resolved config
    RUN/data.json        the prepared dataset view (records, cache rows, skipped files)
    RUN/skipped.csv      path,reason of every file that could not be used
    RUN/cache/           the decode-once cache (unless data.cache points elsewhere)
    RUN/stage1/          the stage-1 engine run (files: :mod:`bonecluster.checkpoint`)
    RUN/stage1/summary.json   cluster sizes, and label-based scores when labels exist
    RUN/stage1/names.json     cluster id -> name (majority body part, or cluster-N; editable)
    RUN/stage2/<PART>/        one engine run per body part, plus anomaly.pt (see :mod:`bonecluster.stage2`)
    RUN/stage2/summary.json   per part: images, threshold, share flagged

Labels, where the data carries them, are used only to score (and, in stage 2, to group
images by body part); training never sees them, except in few-label mode
(``stage2.labels_fraction`` > 0), whose probe uses exactly the audited fraction (see :mod:`bonecluster.stage2.fewlabel`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from bonecluster import distributed as dist
from bonecluster.config import Config, merge, stage2_data_config, to_yaml
from bonecluster.data import PreparedDataset, prepare_sources, write_skipped_csv
from bonecluster.device import pick_device
from bonecluster.checkpoint import FINAL_MODEL, TrainedClusters
from bonecluster.engine import DeepClusterEngine, FitResult
from bonecluster.io import atomic_write_text
from bonecluster.metrics import cluster_scores, majority_mapping
from bonecluster.backbones import BackboneError
from bonecluster.models import build_model, weights_file
from bonecluster.names import NAMES, load_cluster_names, save_cluster_names
from bonecluster.naming import training_metadata_audit
from bonecluster.phantom_pretrain import PHANTOMS, cached_phantom_weights
from bonecluster.stage2.scoring import embed_images
from bonecluster.stage2.train import SAME, check_stage2, stage2_dataset, stage2_weights, train_stage2
from bonecluster.timing import NO_TIMER, NoTimer
from bonecluster.typicality import TYPICALITY, Typicality

STAGES = (1, 2)
NAMED_WEIGHTS = ("none", "imagenet", "pretrained", PHANTOMS)   # model.weights values that are not a file


@dataclass
class StageOneResult:
    fit: FitResult
    summary: dict = field(default_factory=dict)


def prepare_run_data(sources: Sequence[str | Path], run: str | Path, cfg: Config,
                     progress: bool = True, info: dist.DistInfo = dist.DistInfo()) -> PreparedDataset:
    """Decode the sources into the cache and record the view and the skips in the run folder.

    Under torchrun, rank 0 decodes and writes; the other ranks wait and read its view.
    """
    run = Path(run)
    if info.is_main:
        cache = cfg.data.cache or run / "cache"
        data = prepare_sources(sources, cfg.data, cache=cache, progress=progress)
        data.save(run / "data.json")
        write_skipped_csv(run / "skipped.csv", data.skipped)
    dist.barrier(info)
    return data if info.is_main else PreparedDataset.load(run / "data.json")


def train(sources: Sequence[str | Path], run: str | Path, cfg: Config, stages: Sequence[int] = STAGES,
          resume: bool = False, progress: bool = True, timer: NoTimer = NO_TIMER) -> dict:
    """Train the requested stages into ``run``; returns a summary per stage.

    ``timer`` (a :class:`bonecluster.timing.PhaseTimer`) records the phases "decoding" (at stage 1's
    size and, with ``stage2.size``, at stage 2's), "stage 1" and "stage 2 <PART>", each with the
    engine's phases inside (``bonecluster demo`` prints them). The films are decoded before any
    phantom pre-training (``model.weights=phantoms``): a bad source fails first, and
    ``phantoms.adapt`` adapts to them.
    """
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; stages are 1 and 2")
    run = Path(run)
    check_model(cfg, stages)
    info = dist.setup(pick_device(cfg.train.device).type)
    try:
        if info.is_main:   # the run folder's first write: a folder that cannot take it fails here
            atomic_write_text(run / "config.yaml", to_yaml(cfg))
        # decoded before any phantom pre-training: a bad source fails first, and phantoms.adapt
        # adapts to these very films
        with timer.phase("decoding"):
            data = prepare_run_data(sources, run, cfg, progress, info)
            films = stage2_run_data(data, cfg, progress, info) if 2 in stages else None   # data unless stage2.size
        resolved = resolve_phantom_weights(cfg, run, progress, info, stages, films=data, stage2_films=films)
        if resolved != cfg and info.is_main:   # the run records the weights file it started from
            atomic_write_text(run / "config.yaml", to_yaml(resolved))
        cfg = resolved
        summary = {"skipped_files": len(data.skipped), "is_main": info.is_main}
        if 1 in stages:
            with timer.phase("stage 1"):
                summary["stage1"] = train_stage1(data, run, cfg, resume=resume, progress=progress, timer=timer).summary
        if 2 in stages:
            names = stage1_image_names(run, len(data)) if any(r.body_part is None for r in data.records) else None
            summary["stage2"] = train_stage2(films, run, cfg, names, resume=resume, progress=progress, timer=timer)
            if info.is_main:
                atomic_write_text(run / "stage2" / "summary.json", json.dumps(summary["stage2"], indent=2))
    finally:
        dist.teardown(info)
    return summary


def stage2_run_data(data: PreparedDataset, cfg: Config, progress: bool = True,
                    info: dist.DistInfo = dist.DistInfo()) -> PreparedDataset:
    """The run's films at stage 2's size (``stage2.size``), record for record; ``data`` itself
    when it is stage 1's. Under torchrun rank 0 decodes; the other ranks then find every film in
    the cache."""
    if info.is_main:
        films = stage2_dataset(data, cfg, progress)
    dist.barrier(info)
    return films if info.is_main else stage2_dataset(data, cfg, progress=False)


def check_model(cfg: Config, stages: Sequence[int] = STAGES) -> None:
    """Fail in a second, before any film is decoded or phantom pre-trained: an unknown
    ``model.arch``, a missing package (timm), a ViT whose patches do not tile ``data.size``, a
    missing weights file, a stage-2 setting out of range."""
    _check_builds(cfg, cfg.data.size)
    if str(cfg.model.weights).lower() not in NAMED_WEIGHTS:
        weights_file(Path(cfg.model.weights).expanduser(), cfg.model.arch)
    if 2 not in stages:
        return
    check_stage2(cfg)
    if stage2_data_config(cfg).size != cfg.data.size:   # a ViT's patches must tile stage 2's films too
        try:
            _check_builds(cfg, stage2_data_config(cfg).size)
        except BackboneError as err:
            raise BackboneError(str(err).replace("data.size", "stage2.size")) from err
    weights = stage2_weights(cfg)
    if weights.lower() not in (*NAMED_WEIGHTS, SAME):
        try:
            weights_file(Path(weights).expanduser(), cfg.model.arch)
        except FileNotFoundError as err:   # the message names model.weights; this is stage 2's own
            raise FileNotFoundError(f"stage2.weights: {str(err).replace('model.weights', 'stage2.weights')} "
                                    "('same' starts where stage 1 started)") from err


def _check_builds(cfg: Config, size: int) -> None:
    """Build ``model`` for ``size`` px films, shapes only where it can (no memory, no weights read,
    nothing downloaded); raises what building raises."""
    try:
        with torch.device("meta"):
            build_model(cfg.model, weights="none", image_size=size)
    except BackboneError:
        raise
    except Exception:   # a model that cannot be built on the meta device: build it for real
        build_model(cfg.model, weights="none", image_size=size)


def resolve_phantom_weights(cfg: Config, run: Path, progress: bool = True,
                            info: dist.DistInfo = dist.DistInfo(), stages: Sequence[int] = STAGES,
                            cache: str | Path | None = None, films: PreparedDataset | None = None,
                            stage2_films: PreparedDataset | None = None) -> Config:
    """``model.weights=phantoms`` (and ``stage2.weights=phantoms`` when stage 2 is trained):
    pre-train on phantoms (or reuse the file cached under ``cache``, by default the data cache, for
    the same settings) and return the config naming that file, as the run records it.

    With ``phantoms.adapt > 0`` stage 1's pre-training adapts to ``films`` and stage 2's to
    ``stage2_films`` (the run's training films at each stage's size; no label is read)."""
    cache = Path(cache or cfg.data.cache or run / "cache")
    stage1_network_used = 1 in stages or stage2_weights(cfg) == SAME
    if stage1_network_used and str(cfg.model.weights).lower() == PHANTOMS:
        cfg = merge(cfg, {"model": {"weights": _phantom_weights(cfg, cache, progress, info, films)}})
    if 2 in stages and stage2_weights(cfg).lower() == PHANTOMS:
        # stage 2's network at stage 2's size (stage2.size), pre-trained from scratch: with stage 1 on
        # phantoms at the same size the settings are the same, and so is the cached file
        part = merge(cfg, {"model": {"weights": PHANTOMS}, "data": {"size": stage2_data_config(cfg).size}})
        cfg = merge(cfg, {"stage2": {"weights": _phantom_weights(part, cache, progress, info, stage2_films)}})
    return cfg


def _phantom_weights(cfg: Config, cache: Path, progress: bool, info: dist.DistInfo,
                     films: PreparedDataset | None) -> str:
    """The cached file's path on every rank; rank 0 pre-trains (and alone reads ``films``, whose
    digest is part of the path when ``phantoms.adapt`` is set)."""
    path = None
    if info.is_main:
        real = np.asarray(films.images()) if cfg.phantoms.adapt > 0 and films is not None else None
        path = str(cached_phantom_weights(cfg, cache, progress=progress, real_films=real))
    dist.barrier(info)
    return dist.broadcast_object(path, info)


def train_stage1(data: PreparedDataset, run: str | Path, cfg: Config, resume: bool = False,
                 progress: bool = True, timer: NoTimer = NO_TIMER) -> StageOneResult:
    out = Path(run) / "stage1"
    engine = DeepClusterEngine(cfg, out, progress=progress)
    engine.timer = timer
    if engine.dist.is_main and not resume:   # an earlier run's reference must not outlive its model
        (out / TYPICALITY).unlink(missing_ok=True)
    fit = engine.fit(data, resume=resume)
    summary = stage1_summary(data, fit, cfg.cluster.k)
    if engine.dist.is_main:
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
        if not (out / NAMES).exists() or not resume:
            names = default_cluster_names(data, fit.assignments, cfg.cluster.k)
            save_cluster_names(out, names)
            training_metadata_audit(data.records, fit.assignments, names).save(out)
        if not fit.interrupted:
            with timer.phase("typicality reference"):
                write_typicality(out, data, engine.device)
    return StageOneResult(fit, summary)


def write_typicality(stage1: Path, data: PreparedDataset, device: str | torch.device = "cpu") -> Typicality:
    """Embed the training films with the final stage-1 model and keep them, with their own
    leave-one-out neighbour distances, as ``stage1/typicality.npz``: the reference the
    out-of-distribution flag of every prediction is placed against (:mod:`bonecluster.typicality`)."""
    trained = TrainedClusters.load(stage1, device)
    typicality = Typicality.fit(embed_images(trained, data.images()))
    typicality.save(stage1 / TYPICALITY)
    return typicality


def default_cluster_names(data: PreparedDataset, assignments: np.ndarray, k: int) -> dict[int, str]:
    """Majority body part of each cluster where the metadata has parts, else ``cluster-N``.

    The names are for display, scoring and grouping stage 2; they never feed training.
    """
    labelled = [(int(c), r.body_part) for c, r in zip(assignments, data.records) if r.body_part]
    names = {c: f"cluster-{c}" for c in range(k)}
    if labelled:
        clusters, parts = zip(*labelled)
        names.update({int(c): str(p) for c, p in majority_mapping(clusters, parts).items()})
    return names


def stage1_image_names(run: Path, n_images: int) -> list[str]:
    """The stage-1 cluster name of every image of the run's data (for grouping stage 2)."""
    stage1 = Path(run) / "stage1"
    if not (stage1 / FINAL_MODEL).exists():
        raise ValueError(f"{run}: some images have no body part and there is no stage-1 model to group "
                         "them; train stage 1 first (--stages 1,2)")
    assignments = TrainedClusters.load(stage1).assignments
    if len(assignments) != n_images:
        raise ValueError(f"{stage1}: trained on {len(assignments)} images but the data now has {n_images}; "
                         "train stage 1 again on this data")
    names = load_cluster_names(stage1)
    return [names.get(int(c), f"cluster-{int(c)}") for c in assignments]


def stage1_summary(data: PreparedDataset, fit: FitResult, k: int) -> dict:
    sizes = np.bincount(fit.assignments, minlength=k)
    summary = {"n_images": len(data), "k": k, "epochs_run": fit.epochs_run, "collapsed": fit.collapsed,
               "seconds": round(fit.seconds, 1), "cluster_sizes": sizes.tolist()}
    labelled = [(c, r.body_part) for c, r in zip(fit.assignments, data.records) if r.body_part]
    if labelled:
        clusters, parts = zip(*labelled)
        summary["scored_on_labels"] = {"n_labelled": len(labelled),
                                       **{k_: round(v, 4) for k_, v in cluster_scores(clusters, parts).items()}}
    return summary
