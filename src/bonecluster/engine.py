"""The training loop that every clustering method shares (DeepCluster, Caron et al. 2018, and kin).

:class:`DeepClusterEngine` owns the network, the epochs and their checkpoints, ``--resume``, DDP,
``metrics.csv``, the progress bars, feature extraction and the k-means step. What a method does
in its epochs lives in its own module under :mod:`bonecluster.methods` (``cfg.method`` picks it):
optional pre-training epochs, clustering rounds, the final clusters, and its checkpoint state.
Pre-training epochs come first in the epoch count, the checkpoint and ``metrics.csv``.

The run folder's files and how they are read back are in :mod:`bonecluster.checkpoint`.
"""

from __future__ import annotations

import logging
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from bonecluster import distributed as dist
from bonecluster.augment import RadiographAugment
from bonecluster.checkpoint import CHECKPOINT, FINAL_MODEL, FORMAT, METRICS, load_run_file, save_torch, write_metrics
from bonecluster.cluster import (KMeansResult, PCAWhitening, check_eigen_power, l2_normalise, preprocess_features,
                                 study_means)
from bonecluster.config import ClusterConfig, Config, to_dict, to_yaml
from bonecluster.data.cache import PreparedDataset
from bonecluster.data.loader import batch_loader, to_float
from bonecluster.data.records import study_index
from bonecluster.device import bf16_fallback_message, cpu_bf16_hazard, mixed_precision, pick_device
from bonecluster.divergence import check_finite_features, check_finite_state, precision_hint
from bonecluster.io import atomic_write_text
from bonecluster.methods import get_method
from bonecluster.models import DeepClusterNet, batch_norms, batchnorm_momentum, build_model
from bonecluster.phantom_pretrain import PhantomCorpus
from bonecluster.phantom_subspace import SUBSPACES, phantom_part_whitening, subspace_corpus
from bonecluster.study_links import link_clusters, linked_share, why_not_linked, why_not_merged
from bonecluster.timing import NO_TIMER, NoTimer

log = logging.getLogger("bonecluster")


@dataclass
class FitResult:
    """What :meth:`DeepClusterEngine.fit` returns: final clusters and the per-epoch history."""

    assignments: np.ndarray   # (N,) int64 final cluster of every image
    centroids: torch.Tensor   # (k, d)
    history: list[dict]
    epochs_run: int
    collapsed: bool
    seconds: float
    interrupted: bool = False  # stopped by ``stop_after`` before the final clustering


class DeepClusterEngine:
    """Train ``cfg.method`` on a prepared (cached) dataset and keep everything in ``out``.

    Works on one device or under ``torchrun`` (one process per GPU, or gloo on CPU). Implements
    :class:`bonecluster.methods._base.Loop`, the part of the loop a method may use.
    """

    def __init__(self, cfg: Config, out: str | Path, progress: bool = True):
        self.cfg = cfg
        self.out = Path(out)
        self.progress = progress
        self.device = pick_device(cfg.train.device)
        self.dist = dist.setup(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        method_cls = get_method(cfg.method)   # a misspelt method fails before anything is built
        _check_choices(cfg)
        torch.manual_seed(cfg.seed)  # the backbone's initial weights depend on the seed only
        self.model: DeepClusterNet = build_model(cfg.model, num_clusters=cfg.cluster.round_k,
                                                 image_size=cfg.data.size).to(self.device)
        if cfg.model.freeze:   # before the method builds its optimisers: they then leave the backbone out
            self.model.freeze_backbone()
            if cfg.method in ("deepcluster", "sela"):
                log.warning("model.freeze with method=%s trains only the top layer, which each round replaces: "
                            "the clusters are k-means on fixed features, as with method=simclr "
                            "selfsup.epochs=0, in more time", cfg.method)
        self.use_amp, self.amp_dtype = mixed_precision(cfg.train, self.device)
        if cfg.train.amp and cfg.train.cpu_amp and self.device.type == "cpu" and not self.use_amp and self.dist.is_main:
            log.info("train.cpu_amp: this CPU has no bfloat16 in hardware (AVX512-BF16 or AMX); training in float32")
        # before compiling: the probe is one eager forward pass
        hazard = cpu_bf16_hazard(self.model, cfg.data.size, self.device, self.amp_dtype) if self.use_amp else []
        if hazard:
            self.use_amp = False
            if self.dist.is_main:
                log.warning(bf16_fallback_message("data.size", cfg.data.size, hazard, "training in float32"))
        if cfg.train.compile:
            self.model.backbone.compile()
        self.augment = RadiographAugment(cfg.train.augment)
        self._float32 = False   # set by full_precision()
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and self.amp_dtype == torch.float16)
        self.studies: torch.Tensor | None = None   # (N,) study numbers when cluster.by_study (set by fit)
        self.link_studies: np.ndarray | None = None   # (N,) study numbers when cluster.study_links (set by fit)
        self._subspace_corpus: PhantomCorpus | None = None   # labelled phantoms for cluster.subspace
        self.timer: NoTimer = NO_TIMER   # a bonecluster.timing.PhaseTimer times the phases (bench_epoch.py)
        self.method = method_cls(self)   # after the network: its heads draw from the seeded RNG next
        if not self.method.pretrain_epochs:   # study mates and small views belong to two-view epochs
            for key in ("study_pair_p", "local_crops"):
                if getattr(cfg.selfsup, key):
                    log.warning("selfsup.%s=%g does nothing here: method %s has no two-view pre-training "
                                "epochs (selfsup.epochs=%d)", key, getattr(cfg.selfsup, key), cfg.method,
                                cfg.selfsup.epochs)

    @property
    def total_epochs(self) -> int:
        return self.method.pretrain_epochs + self.method.cluster_epochs

    # ------------------------------------------------------------------------ the loop

    def fit(self, data: PreparedDataset, resume: bool = False, stop_after: int | None = None) -> FitResult:
        """Run the method's epochs (continuing a checkpoint when ``resume``), then its final clusters.

        ``stop_after`` ends the loop after that many completed epochs without the final
        clustering, as an interrupted job would (used to test resuming).
        """
        t_start = time.perf_counter()
        most = max(self.cfg.cluster.k, self.cfg.cluster.round_k)
        if len(data) < most:
            raise ValueError(f"{len(data)} images cannot make {most} clusters")
        self._write_config()
        self.studies = _study_groups(data, self.cfg.cluster, self.dist.is_main)
        self.link_studies = _link_studies(data, self.cfg.cluster, self.dist.is_main)
        start, previous, history = self._resume_state() if resume else (0, None, [])
        if resume and self.dist.is_main:  # a kill between checkpoint and metrics leaves metrics.csv behind
            write_metrics(self.out / METRICS, history)
        collapsed = False
        epochs = range(start, self.total_epochs)
        for epoch in self.bar(epochs, "epochs", total=len(epochs)):
            with self.timer.phase("epoch"):
                row, previous, collapsed = self._epoch(data, epoch, previous)
                history.append(row)
                with self.timer.phase("checkpoint write"):
                    self._save_checkpoint(epoch + 1, previous, history)
            if collapsed:
                break
            if stop_after is not None and stop_after <= epoch + 1 < self.total_epochs:
                done = previous.numpy() if previous is not None else np.empty(0, np.int64)
                return FitResult(done, torch.empty(0), history, len(history), False,
                                 time.perf_counter() - t_start, interrupted=True)
        # in float32: the saved PCA and centroids must fit the float32 features that predict,
        # evaluate and the viewer compute, not the mixed-precision ones of training
        with self.timer.phase("final clusters"), self.full_precision():
            final, pca = self.method.final_clusters(data, seed_offset=len(history))
        self._save_final(final, pca)
        dist.barrier(self.dist)
        return FitResult(final.assignments.cpu().numpy(), final.centroids.cpu(), history, len(history),
                         collapsed, time.perf_counter() - t_start)

    def _epoch(self, data: PreparedDataset, epoch: int,
               previous: torch.Tensor | None) -> tuple[dict, torch.Tensor | None, bool]:
        """Epoch ``epoch`` (0-based, pre-training first): (metrics row, labels, collapsed)."""
        pretrain = self.method.pretrain_epochs
        if epoch < pretrain:
            return self.method.pretrain_epoch(data, epoch), previous, False
        row, labels, collapsed = self.method.cluster_epoch(data, epoch - pretrain, previous)
        row["epoch"] = epoch + 1
        return row, labels, collapsed

    # ------------------------------------------------------------------------ features and clusters

    @torch.no_grad()
    def extract(self, data: PreparedDataset) -> torch.Tensor:
        """(N, feature_dim) float32 features of every image; this rank's share, then gathered.

        BatchNorm follows ``train.feature_bn`` (see :class:`bonecluster.config.TrainConfig`).
        """
        mode = "running" if self.model.frozen else self.cfg.train.feature_bn   # frozen: statistics as loaded
        if mode == "recompute":
            self._recompute_bn_stats(data)
        self.model.eval()
        bns = batch_norms(self.model)
        if mode == "batch":
            saved = [(bn.track_running_stats, bn.training) for bn in bns]
            for bn in bns:  # batch statistics, running averages left untouched
                bn.train()
                bn.track_running_stats = False
        try:
            local = self.forward_all(data, "features", keep=True)
        finally:
            if mode == "batch":
                for bn, (track, training) in zip(bns, saved):
                    bn.track_running_stats = track
                    bn.train(training)
        feats = dist.gather_shards(local, len(data), self.dist)   # the same on every rank, so all raise
        check_finite_features(feats, self.divergence_hint)
        return feats

    @torch.no_grad()
    def forward_all(self, data: PreparedDataset, desc: str, keep: bool,
                    generator: torch.Generator | None = None) -> torch.Tensor | None:
        """``model.features`` of this rank's share of the images, in order; without augmentation
        unless a ``generator`` is given (then ``train.augment`` draws from it)."""
        positions = dist.shard(len(data), self.dist)
        loader = batch_loader(data, self.cfg.train.feature_batch_size, positions.tolist(),
                              workers=self.cfg.train.workers, pin_memory=self.device.type == "cuda")
        chunks, timer = [], self.timer
        for batch in timer.iterate("cache reads", self.bar(loader, desc, leave=False)):
            with timer.phase("cache reads"):
                x = to_float(batch, self.device)
            with timer.phase(desc):   # "features", "bn stats", ...
                if generator is not None:
                    x = self.augment(x, generator=generator)
                with self.autocast():
                    out = self.model.features(x).float()
            if keep:
                chunks.append(out)
        if not keep:
            return None
        return torch.cat(chunks) if chunks else torch.empty(0, self.model.feature_dim, device=self.device)

    @torch.no_grad()
    def _recompute_bn_stats(self, data: PreparedDataset) -> None:
        """"Precise BN" (Wu & Johnson 2021, §4): replace every BatchNorm's running mean and variance
        by their averages over one pass of the unaugmented dataset, the images features are then
        extracted from. With ``momentum=None`` BatchNorm keeps a cumulative (equal-weight) average
        over the pass's batches. Under DDP each rank estimates them on its share; the averages are
        then all-reduced so every rank holds the same statistics.
        """
        bns = batch_norms(self.model)
        if not bns:
            return
        for bn in bns:
            bn.reset_running_stats()
        self.model.train()
        try:
            with batchnorm_momentum(self.model, None):
                self.forward_all(self._bn_subset(data), "bn stats", keep=False)
        finally:
            self.model.eval()
        if self.dist.enabled:
            for bn in bns:
                for stat in (bn.running_mean, bn.running_var):
                    torch.distributed.all_reduce(stat)
                    stat.div_(self.dist.world_size)

    def _bn_subset(self, data: PreparedDataset) -> PreparedDataset:
        """The images precise BN estimates its statistics on: all, or ``train.bn_images`` of them
        drawn with the run's seed (the same subset every epoch, in dataset order)."""
        most = self.cfg.train.bn_images
        if most:   # every rank needs images: a rank without any would average in reset statistics
            most = max(most, self.dist.world_size)
        if not most or len(data) <= most:
            return data
        generator = torch.Generator().manual_seed(self.cfg.seed)
        chosen = torch.randperm(len(data), generator=generator)[:most].sort().values
        return data.subset(chosen.numpy())

    def cluster(self, feats: torch.Tensor, seed_offset: int, k: int | None = None,
                final: bool = False) -> tuple[KMeansResult, PCAWhitening]:
        """PCA-whiten + L2 + the method's clustering (k-means, :meth:`Method.cluster_points`) into ``k``
        clusters (default ``cluster.k``) on rank 0; every rank receives the assignments. ``final``:
        the run's result, where ``cluster.study_links`` merges over-clusters (:meth:`linked_clusters`)."""
        c = self.cfg.cluster
        k = k or c.k
        check_finite_features(feats, self.divergence_hint)   # the network's fault
        with self.timer.phase("pca"):
            x, pca = self.whiten(feats)
        km = None
        if self.dist.is_main:
            studies = self.studies
            points = x if studies is None else study_means(x, studies)
            # Restart r uses its own seed; r = 0 is the single run of n_init = 1. Lowest inertia wins.
            seeds = [self.cfg.seed + seed_offset + r * 1_000_003 for r in range(max(c.n_init, 1))]
            linked = self.linked_clusters(points, k, seeds) if final and self.link_studies is not None else None
            km = linked or self.method.cluster_points(points, k, seeds)
            if studies is not None:   # every image takes its study's cluster
                km = KMeansResult(km.centroids, km.assignments[studies.to(km.assignments.device)], km.inertia,
                                  km.n_splits, km.backend)
        labels = km.assignments.to(self.device) if km else torch.empty(len(feats), dtype=torch.int64,
                                                                       device=self.device)
        labels = dist.broadcast(labels, self.dist)
        if km is None:
            km = KMeansResult(torch.empty(0), labels, 0.0, 0, c.backend)
        return km, pca

    def linked_clusters(self, points: torch.Tensor, k: int, seeds: list[int]) -> KMeansResult | None:
        """``cluster.study_links`` clusters of ``points`` (N, d) merged into ``k`` through shared
        studies (:mod:`bonecluster.study_links`): every centroid is kept, ``groups`` maps it to its
        cluster. None (plain clustering follows) when the cut found nothing to merge by."""
        fine = self.method.cluster_points(points, self.cfg.cluster.study_links, seeds)
        linked = link_clusters(fine, self.link_studies, k, seeds[0])
        if linked is None:
            log.warning("cluster.study_links: %s; clustering into %d as usual",
                        why_not_merged(fine, self.link_studies, k), k)
        else:
            log.info("final clusters: %d k-means clusters merged into %d through shared studies", len(fine.centroids), k)
        return linked

    def whiten(self, feats: torch.Tensor) -> tuple[torch.Tensor, PCAWhitening]:
        """``(N, D)`` features -> ``(N, d)`` PCA-whitened, L2-normalised points and the fitted map;
        with ``cluster.subspace=phantom-parts`` only inside the phantom part directions."""
        c = self.cfg.cluster
        if c.subspace == "none":
            return preprocess_features(feats, dim=c.pca_dim, eigen_power=c.eigen_power)
        if self._subspace_corpus is None:   # rendered once, reused by every round
            self._subspace_corpus = subspace_corpus(c.subspace_films, self.cfg.data, self.cfg.seed,
                                                    progress=self.progress and self.dist.is_main)
        pca = phantom_part_whitening(self.model, feats, self._subspace_corpus, self.device, dim=c.pca_dim,
                                     batch_size=self.cfg.train.feature_batch_size, eigen_power=c.eigen_power)
        return l2_normalise(pca.transform(feats)), pca

    # ------------------------------------------------------------------------ lent to the methods

    def ddp(self, module: torch.nn.Module, find_unused_parameters: bool = False) -> torch.nn.Module:
        """``module`` wrapped in DistributedDataParallel when distributed, else itself."""
        if not self.dist.enabled:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused_parameters)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp and not self._float32)

    @property
    def precision(self) -> str:
        """What the training passes compute in: ``float32``, ``bfloat16`` or ``float16``."""
        return str(self.amp_dtype).removeprefix("torch.") if self.use_amp else "float32"

    @property
    def divergence_hint(self) -> str:
        """What a divergence message advises besides a lower rate (:func:`~bonecluster.divergence.precision_hint`)."""
        return precision_hint(self.precision, self.device.type)

    @contextmanager
    def full_precision(self):
        """Inside, :meth:`autocast` does nothing: every pass runs in float32."""
        saved, self._float32 = self._float32, True
        try:
            yield
        finally:
            self._float32 = saved

    def bar(self, iterable, desc: str, leave: bool = True, total: int | None = None):
        """The epoch bar always shows (rank 0, progress on); per-batch bars only on a terminal,
        where they redraw in place, not in a log file, where each redraw would be a line."""
        from tqdm.auto import tqdm

        show = self.progress and self.dist.is_main and (leave or sys.stderr.isatty())
        return tqdm(iterable, desc=desc, leave=leave, total=total, unit="epoch" if leave else "batch",
                    disable=not show, dynamic_ncols=True)

    # ------------------------------------------------------------------------ files

    def _write_config(self) -> None:
        if self.dist.is_main:
            atomic_write_text(self.out / "config.yaml", to_yaml(self.cfg))

    def _save_checkpoint(self, epochs_done: int, assignments: torch.Tensor, history: list[dict]) -> None:
        # every rank: under DDP another process's NaN loss reaches these weights through the all-reduce
        check_finite_state(self.model, f"epoch {epochs_done}", self.divergence_hint,
                           kept="its checkpoint was not written; the last finished epoch's is kept")
        if self.dist.is_main:
            state = {
                "format": FORMAT, "epoch": epochs_done, "model": self.model.state_dict(),
                "hparams": self.model.hparams(),
                "assignments": assignments.cpu() if assignments is not None else torch.empty(0, dtype=torch.int64),
                "history": history, "config": to_dict(self.cfg), "rng": _rng_state(),
                "scaler": self.scaler.state_dict(),  # float16 AMP's loss scale ({} when off)
                "precision": self.precision,         # what trained, whatever the config asked for
                **self.method.state_dict(),          # its optimisers and heads
            }
            save_torch(self.out / CHECKPOINT, state)
            write_metrics(self.out / METRICS, history)
        dist.barrier(self.dist)

    def _resume_state(self) -> tuple[int, torch.Tensor | None, list[dict]]:
        path = self.out / CHECKPOINT
        if not path.exists():
            raise FileNotFoundError(f"{path}: no checkpoint to resume from")
        # Loaded onto the CPU: the RNG states and assignments must stay there, and load_state_dict
        # copies the weights (and the optimiser's moments) onto the model's own device.
        state = load_run_file(path, map_location="cpu")
        trained_by = state["config"].get("method", self.cfg.method)
        if trained_by != self.cfg.method:   # its heads and optimisers would not fit this method's
            raise ValueError(f"{path} was trained with method={trained_by}, and this run asks for method="
                             f"{self.cfg.method}: resume with --method {trained_by} (the cpu-real preset trains "
                             f"moco since 2026-12-07, simclr before)")
        if state["config"] != to_dict(self.cfg):
            log.warning("resuming %s with a config that differs from the checkpoint's", path)
        # checkpoints older than the field were float32 on a CPU (and unknown on a GPU)
        before = state.get("precision") or ("float32" if self.device.type == "cpu" else None)
        if self.dist.is_main and before and before != self.precision:
            log.warning("resuming %s, trained in %s so far, in %s from here (train.amp and train.cpu_amp choose "
                        "it, and data.size where bfloat16 is unsafe; a run begun before the cpu presets trained in bfloat16 keeps float32 with "
                        "--set train.cpu_amp=false)", path, before, self.precision)
        self.model.load_state_dict(state["model"])
        self.method.load_state_dict(state)
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        log.info("resuming %s after epoch %d", self.out, state["epoch"])
        previous = state["assignments"].cpu()
        return int(state["epoch"]), (previous if len(previous) else None), list(state["history"])

    def _save_final(self, km: KMeansResult, pca: PCAWhitening) -> None:
        if self.dist.is_main:
            save_torch(self.out / FINAL_MODEL, {
                "format": FORMAT, "model": _on_cpu(self.model.state_dict()), "hparams": self.model.hparams(),
                "pca": _on_cpu(pca.state_dict()), "centroids": km.centroids.cpu(),
                "assignments": km.assignments.cpu(), "config": to_dict(self.cfg),
                **({"groups": km.groups.cpu()} if km.groups is not None else {}),
            })


# ----------------------------------------------------------------------------- helpers


def _check_choices(cfg: Config) -> None:
    """Fail before training on a misspelt choice (the method's name is checked by get_method)."""
    choices = {"train.feature_bn": (cfg.train.feature_bn, ("running", "recompute", "batch")),
               "train.lr_schedule": (cfg.train.lr_schedule, ("constant", "cosine")),
               "cluster.top_layer_init": (cfg.cluster.top_layer_init, ("random", "centroids")),
               "cluster.subspace": (cfg.cluster.subspace, SUBSPACES)}
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ValueError(f"config {key}={value!r}: choose one of {', '.join(allowed)}")
    if cfg.cluster.n_init < 1 or cfg.train.warmup_epochs < 0 or cfg.train.images_per_epoch < 0:
        raise ValueError("cluster.n_init must be >= 1, train.warmup_epochs and train.images_per_epoch >= 0")
    if not isinstance(cfg.train.bn_images, int) or cfg.train.bn_images < 0:
        raise ValueError(f"train.bn_images must be a whole number >= 0 (0 = every image), got {cfg.train.bn_images!r}")
    if cfg.train.backbone_lr_scale < 0:
        raise ValueError(f"train.backbone_lr_scale must be >= 0, got {cfg.train.backbone_lr_scale}")
    if not 0 < cfg.train.layer_lr_decay <= 1:
        raise ValueError(f"train.layer_lr_decay must be in (0, 1] (1 = no decay), got {cfg.train.layer_lr_decay}")
    if cfg.cluster.train_k < 0:
        raise ValueError(f"cluster.train_k must be >= 0 (0 = cluster.k), got {cfg.cluster.train_k}")
    check_eigen_power(cfg.cluster.eigen_power, "cluster.eigen_power")
    if cfg.cluster.subspace != "none" and cfg.cluster.subspace_films < 2:
        raise ValueError(f"cluster.subspace_films must be >= 2, got {cfg.cluster.subspace_films}")
    if cfg.cluster.centroid_temperature <= 0:
        raise ValueError("cluster.centroid_temperature must be > 0")
    if not 0.0 <= cfg.selfsup.study_pair_p <= 1.0:
        raise ValueError(f"selfsup.study_pair_p must be in [0, 1], got {cfg.selfsup.study_pair_p}")
    _check_study_links(cfg)


def _check_study_links(cfg: Config) -> None:
    c = cfg.cluster
    if not c.study_links:
        return
    if not isinstance(c.study_links, int) or isinstance(c.study_links, bool) or c.study_links < 0:
        raise ValueError(f"cluster.study_links={c.study_links!r}: give a number of clusters above cluster.k "
                         "(e.g. 30), or 0 for off")
    if c.by_study:
        raise ValueError("cluster.study_links and cluster.by_study exclude each other: by_study puts every "
                         "study in one cluster, so no two clusters share a study; set one of them off")
    if cfg.method in ("simclr-scan", "sela"):
        raise ValueError(f"cluster.study_links merges k-means clusters; method {cfg.method} makes its final "
                         "clusters otherwise (SCAN's classifier, balanced Sinkhorn assignments): set "
                         "cluster.study_links=0")


def _study_groups(data: PreparedDataset, c: ClusterConfig, announce: bool) -> torch.Tensor | None:
    """(N,) study number of each image for ``cluster.by_study``, or None: off, no study has two
    images (the same as clustering images), or fewer studies than clusters (with a warning)."""
    if not c.by_study:
        return None
    studies = torch.from_numpy(study_index(data.records))
    n_studies = int(studies.max()) + 1 if len(studies) else 0
    if n_studies == len(studies):
        return None
    if n_studies < max(c.k, c.round_k):
        if announce:
            log.warning("cluster.by_study: %d studies cannot make %d clusters; clustering the %d images instead",
                        n_studies, max(c.k, c.round_k), len(studies))
        return None
    if announce:
        log.info("clustering %d studies (%d images) instead of images", n_studies, len(studies))
    return studies


def _link_studies(data: PreparedDataset, c: ClusterConfig, announce: bool) -> np.ndarray | None:
    """(N,) study number of each image for ``cluster.study_links``, or None: off, or the links cannot
    apply (:func:`bonecluster.study_links.why_not_linked`, with a warning)."""
    if not c.study_links:
        return None
    studies = study_index(data.records)
    reason = why_not_linked(studies, c.study_links, c.k)
    if reason:
        if announce:
            log.warning("cluster.study_links: %s; final clusters by plain k-means", reason)
        return None
    share = linked_share(studies)
    if announce:
        log.info("cluster.study_links: %.0f%% of the %d images share a study with another", 100 * share, len(studies))
    return studies


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(_flatten(random.getstate())),
             "numpy": [torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                       int(np_state[3]), float(np_state[4])]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _flatten(py_state) -> list:
    version, internal, gauss = py_state
    return [version, list(internal), gauss]


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        # A checkpoint written with more GPUs visible than now restores the ones that are here.
        for index, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.cpu(), index)


def _on_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies, so that ``model.pt`` from a GPU run loads with a plain ``torch.load`` anywhere."""
    return {k: v.detach().cpu() for k, v in state.items()}
