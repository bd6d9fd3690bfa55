"""The DeepCluster engine: alternate k-means on CNN features and training on the cluster ids.

One epoch (Caron et al. 2018, §3.2–3.4, and the reference ``main.py``):

1. extract features of every image in eval mode, without augmentation;
2. PCA-whiten them, L2-normalise, and run k-means (eq. 6), re-seeding empty clusters;
3. re-initialise the top layer for the new pseudo-labels;
4. train the network to predict the pseudo-labels with cross-entropy (eq. 5), drawing batches
   uniformly over the pseudo-labels so one big cluster cannot dominate.

After the last epoch the features are clustered once more: those are the final assignments.

``cfg.method`` picks the variant (see :data:`bonecluster.config.METHODS`): ``deepcluster`` is the
paper's loop above; ``sela`` draws balanced pseudo-labels by Sinkhorn-Knopp over the k-means
centroids and starts each round's top layer from them (SeLa/SwAV, DeepCluster-v2); ``simclr``
replaces the loop by SimCLR pre-training (``cfg.selfsup``) followed by the final clustering;
``simclr-deepcluster`` runs SimCLR first and the DeepCluster loop after it; ``simclr-scan`` runs
SimCLR, then SCAN's neighbour-consistency classifier (:mod:`bonecluster.scan`) makes the final
clusters, summarised by their centroids for prediction; ``dino`` replaces SimCLR's loss by DINO's
self-distillation (a student matches a moving-average teacher) and clusters the teacher's
features. Pre-training epochs come first in the epoch count, the checkpoint and ``metrics.csv``
(``phase`` = simclr or dino).

Everything a run needs lives in its folder::

    OUT/config.yaml     the resolved config        OUT/metrics.csv   one row per epoch
    OUT/checkpoint.pt   written atomically after every epoch (resume from it)
    OUT/model.pt        the final model, PCA-whitening, centroids and assignments

Checkpoints hold only tensors and plain values and are read with ``weights_only=True``.
"""

from __future__ import annotations

import copy
import csv
import io
import logging
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from bonecluster import distributed as dist
from bonecluster.augment import RadiographAugment
from bonecluster.cluster import (KMeansResult, PCAWhitening, kmeans_best_of, l2_normalise, preprocess_features,
                                 study_means)
from bonecluster.config import METHODS, PRETRAINED_METHODS, Config, config_from_dict, to_dict, to_yaml
from bonecluster.data.cache import PreparedDataset
from bonecluster.data.records import study_index
from bonecluster.data.loader import batch_loader, to_float
from bonecluster.device import amp_enabled, pick_device
from bonecluster.io import atomic_open, atomic_write_text
from bonecluster.metrics import nmi
from bonecluster.models import DeepClusterNet, build_model
from bonecluster.sampler import UniformLabelSampler
from bonecluster.scan import scan_cluster
from bonecluster.selfsup import (DinoHead, ProjectionHead, dino_loss, dino_targets, ema_, normalised_entropy, nt_xent,
                                 sinkhorn_balanced)

log = logging.getLogger("bonecluster")

CHECKPOINT = "checkpoint.pt"
FINAL_MODEL = "model.pt"
METRICS = "metrics.csv"
# target_entropy: DINO's teacher targets, mean entropy / ln K (near 1 = collapsed to flat outputs)
METRIC_COLUMNS = ("epoch", "phase", "loss", "nmi_prev", "largest_share", "n_empty_splits", "cluster_sizes",
                  "images_per_s", "seconds", "kmeans_seconds", "lr", "target_entropy")


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
    """Train DeepCluster on a prepared (cached) dataset and keep everything in ``out``.

    Works on one device or under ``torchrun`` (one process per GPU, or gloo on CPU).
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
        _check_choices(cfg)
        torch.manual_seed(cfg.seed)  # the backbone's initial weights depend on the seed only
        self.model: DeepClusterNet = build_model(cfg.model, num_clusters=cfg.cluster.round_k).to(self.device)
        self.optimizer = self._backbone_optimizer()
        self.augment = RadiographAugment(cfg.train.augment)
        self.use_amp = cfg.train.amp and amp_enabled(self.device)
        self.amp_dtype = torch.bfloat16 if self.use_amp and _native_bf16(self.device) else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and self.amp_dtype == torch.float16)
        self.pretrain_epochs = cfg.selfsup.epochs if cfg.method in PRETRAINED_METHODS else 0
        self.cluster_epochs = 0 if cfg.method in ("simclr", "simclr-scan", "dino") else cfg.train.epochs
        self._studies: torch.Tensor | None = None   # (N,) study numbers when cluster.by_study (set by fit)
        if self.pretrain_epochs:
            s = cfg.selfsup
            if cfg.method == "dino":
                head = DinoHead(self.model.feature_dim, s.hidden_dim, s.proj_dim, s.dino_prototypes)
                self.head = head.to(self.device)
                # The teacher: a moving average of backbone + head, never trained by gradients.
                self.teacher = copy.deepcopy(_Contrastive(self.model, self.head)).requires_grad_(False)
                self.center = torch.zeros(s.dino_prototypes, device=self.device)
            else:
                self.head = ProjectionHead(self.model.feature_dim, s.hidden_dim, s.proj_dim).to(self.device)
            self.contrastive_augment = RadiographAugment(s.augment)
            params = [p for n, p in self.model.named_parameters() if not n.startswith("top_layer.")]
            self.pretrain_optimizer = torch.optim.SGD(params + list(self.head.parameters()), lr=s.lr,
                                                      momentum=s.momentum, weight_decay=s.weight_decay)

    @property
    def total_epochs(self) -> int:
        return self.pretrain_epochs + self.cluster_epochs

    # ------------------------------------------------------------------------ the loop

    def fit(self, data: PreparedDataset, resume: bool = False, stop_after: int | None = None) -> FitResult:
        """Run ``cfg.train.epochs`` epochs (continuing a checkpoint when ``resume``).

        ``stop_after`` ends the loop after that many completed epochs without the final
        clustering, as an interrupted job would (used to test resuming).
        """
        t_start = time.perf_counter()
        most = max(self.cfg.cluster.k, self.cfg.cluster.round_k)
        if len(data) < most:
            raise ValueError(f"{len(data)} images cannot make {most} clusters")
        self._write_config()
        self._studies = _study_groups(data, self.cfg, self.dist.is_main)
        start, previous, history = self._resume_state() if resume else (0, None, [])
        if resume and self.dist.is_main:  # a kill between checkpoint and metrics leaves metrics.csv behind
            _write_metrics(self.out / METRICS, history)
        collapsed = False
        epochs = range(start, self.total_epochs)
        for epoch in self._bar(epochs, "epochs", total=len(epochs)):
            if epoch < self.pretrain_epochs:
                row = self._pretrain_epoch(data, epoch)
            else:
                row, previous, collapsed = self._epoch(data, epoch - self.pretrain_epochs, previous)
                row["epoch"] = epoch + 1
            history.append(row)
            self._save_checkpoint(epoch + 1, previous, history)
            if collapsed:
                break
            if stop_after is not None and stop_after <= epoch + 1 < self.total_epochs:
                done = previous.numpy() if previous is not None else np.empty(0, np.int64)
                return FitResult(done, torch.empty(0), history, len(history), False,
                                 time.perf_counter() - t_start, interrupted=True)
        if self.cfg.method == "dino":   # DINO's teacher gives the better features (Caron et al. 2021, §4.5)
            self.model.load_state_dict(self.teacher.model.state_dict())
        if self.cfg.method == "simclr-scan":
            final, pca = self._scan(data)
        else:
            final, pca = self._cluster(self._extract(data), seed_offset=len(history))
        self._save_final(final, pca)
        dist.barrier(self.dist)
        return FitResult(final.assignments.cpu().numpy(), final.centroids.cpu(), history, len(history),
                         collapsed, time.perf_counter() - t_start)

    def _epoch(self, data: PreparedDataset, epoch: int, previous: torch.Tensor | None):
        t0 = time.perf_counter()
        feats = self._extract(data)
        t1 = time.perf_counter()
        km, pca = self._cluster(feats, seed_offset=epoch, k=self.cfg.cluster.round_k)
        kmeans_s = time.perf_counter() - t1
        labels = km.assignments.cpu()
        sizes = torch.bincount(labels, minlength=self.cfg.cluster.round_k)
        largest = sizes.max().item() / len(labels)
        centroid_top = self.cfg.cluster.top_layer_init == "centroids" or self.cfg.method == "sela"
        top = self._centroid_top_layer(feats, km, pca) if centroid_top else None
        loss, n_seen, train_s = self._train_pseudo_labels(data, labels, epoch, top)
        row = {
            "epoch": epoch + 1, "phase": "cluster", "loss": round(loss, 5),
            "nmi_prev": round(nmi(labels.numpy(), previous.numpy()), 5) if previous is not None else "",
            "largest_share": round(largest, 4), "n_empty_splits": km.n_splits,
            "cluster_sizes": "|".join(str(int(s)) for s in sizes),
            "images_per_s": round(n_seen / max(train_s, 1e-9), 1),
            "seconds": round(time.perf_counter() - t0, 2), "kmeans_seconds": round(kmeans_s, 2),
            "lr": round(self._lr(epoch), 6),
        }
        collapsed = largest > self.cfg.cluster.collapse_share
        if collapsed and self.dist.is_main:
            log.warning("clusters collapsed at epoch %d: one cluster holds %.0f%% of the images "
                        "(limit %.0f%%); stopping early", epoch + 1, 100 * largest,
                        100 * self.cfg.cluster.collapse_share)
        return row, labels, collapsed

    # ------------------------------------------------------------------------ step 1-2: features, clusters

    @torch.no_grad()
    def _extract(self, data: PreparedDataset) -> torch.Tensor:
        """(N, feature_dim) float32 features of every image; this rank's share, then gathered.

        BatchNorm follows ``train.feature_bn`` (see :class:`bonecluster.config.TrainConfig`).
        """
        mode = self.cfg.train.feature_bn
        if mode == "recompute":
            self._recompute_bn_stats(data)
        self.model.eval()
        bns = _batch_norms(self.model)
        if mode == "batch":
            saved = [(bn.track_running_stats, bn.training) for bn in bns]
            for bn in bns:  # batch statistics, running averages left untouched
                bn.train()
                bn.track_running_stats = False
        try:
            local = self._forward_all(data, "features", keep=True)
        finally:
            if mode == "batch":
                for bn, (track, training) in zip(bns, saved):
                    bn.track_running_stats = track
                    bn.train(training)
        return dist.gather_shards(local, len(data), self.dist)

    @torch.no_grad()
    def _forward_all(self, data: PreparedDataset, desc: str, keep: bool,
                     generator: torch.Generator | None = None) -> torch.Tensor | None:
        """``model.features`` of this rank's share of the images, in order; without augmentation
        unless a ``generator`` is given (then ``train.augment`` draws from it)."""
        positions = dist.shard(len(data), self.dist)
        loader = batch_loader(data, self.cfg.train.feature_batch_size, positions.tolist(),
                              workers=self.cfg.train.workers, pin_memory=self.device.type == "cuda")
        chunks = []
        for batch in self._bar(loader, desc, leave=False):
            x = to_float(batch, self.device)
            if generator is not None:
                x = self.augment(x, generator=generator)
            with self._autocast():
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
        bns = _batch_norms(self.model)
        if not bns:
            return
        saved = [bn.momentum for bn in bns]
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
        self.model.train()
        try:
            self._forward_all(data, "bn stats", keep=False)
        finally:
            for bn, momentum in zip(bns, saved):
                bn.momentum = momentum
            self.model.eval()
        if self.dist.enabled:
            for bn in bns:
                for stat in (bn.running_mean, bn.running_var):
                    torch.distributed.all_reduce(stat)
                    stat.div_(self.dist.world_size)

    def _cluster(self, feats: torch.Tensor, seed_offset: int, k: int | None = None) -> tuple[KMeansResult, PCAWhitening]:
        """PCA-whiten + L2 + k-means into ``k`` clusters (default ``cluster.k``) on rank 0; every
        rank receives the assignments."""
        c = self.cfg.cluster
        k = k or c.k
        x, pca = preprocess_features(feats, dim=c.pca_dim)
        km = None
        if self.dist.is_main:
            studies = self._studies
            points = x if studies is None else study_means(x, studies)
            # Restart r uses its own seed; r = 0 is the single run of n_init = 1. Lowest inertia wins.
            seeds = [self.cfg.seed + seed_offset + r * 1_000_003 for r in range(max(c.n_init, 1))]
            km = kmeans_best_of(points, k, seeds, niter=c.niter, init=c.init, backend=c.backend, device=self.device)
            if self.cfg.method == "sela":
                km = _balanced(points, km, k, c.sinkhorn_epsilon)
            if studies is not None:   # every image takes its study's cluster
                km = KMeansResult(km.centroids, km.assignments[studies.to(km.assignments.device)], km.inertia,
                                  km.n_splits, km.backend)
        labels = km.assignments.to(self.device) if km else torch.empty(len(feats), dtype=torch.int64,
                                                                       device=self.device)
        labels = dist.broadcast(labels, self.dist)
        if km is None:
            km = KMeansResult(torch.empty(0), labels, 0.0, 0, c.backend)
        return km, pca

    def _scan(self, data: PreparedDataset) -> tuple[KMeansResult, PCAWhitening]:
        """SCAN on the frozen features: PCA-whiten the clean features, embed ``scan.views``
        augmented copies in the same space, train the classifier on rank 0, broadcast its labels.
        The centroids are the clusters' means, so prediction stays nearest-centroid."""
        c, sc = self.cfg.cluster, self.cfg.scan
        x, pca = preprocess_features(self._extract(data), dim=c.pca_dim)
        views = []
        for v in range(sc.views):
            gen = _epoch_generator(self.cfg.seed, v, stream=2)
            local = self._forward_all(data, f"scan view {v + 1}", keep=True, generator=gen)
            views.append(l2_normalise(pca.transform(dist.gather_shards(local, len(data), self.dist))))
        if self.dist.is_main:
            result = scan_cluster(x, torch.stack(views), c.k, n_neighbours=sc.neighbours, epochs=sc.epochs,
                                  batch_size=sc.batch_size, lr=sc.lr, entropy_weight=sc.entropy_weight,
                                  heads=sc.heads, seed=self.cfg.seed)
            log.info("SCAN: head %d kept, loss %.4f", result.head, result.loss)
            labels = result.assignments.to(self.device)
        else:
            labels = torch.empty(len(x), dtype=torch.int64, device=self.device)
        labels = dist.broadcast(labels, self.dist)
        return _summarise(x, labels, c.k), pca

    # ------------------------------------------------------------------------ SimCLR pre-training

    def _pretrain_epoch(self, data: PreparedDataset, epoch: int) -> dict:
        """One SimCLR (Chen et al. 2020, Alg. 1) or DINO (Caron et al. 2021, Alg. 1) pass over the
        data in a seeded random order.

        Both views of a batch go through the network together, so BatchNorm sees them as one
        batch. Under DDP SimCLR's negatives are the rank's own batch (no gather across ranks);
        DINO's centre averages the teacher's outputs over every rank.
        """
        s = self.cfg.selfsup
        gen = _epoch_generator(self.cfg.seed, epoch, stream=1)
        lr = _warmup_cosine(s.lr, epoch, s.epochs, s.warmup_epochs)
        for group in self.pretrain_optimizer.param_groups:
            group["lr"] = lr
        order = torch.randperm(len(data), generator=gen)
        share = order[self.dist.rank::self.dist.world_size]
        if len(share) >= 2 * s.batch_size:  # whole batches only: a batch of one breaks BatchNorm
            share = share[: len(share) - len(share) % s.batch_size]
        loader = batch_loader(data, s.batch_size, share.tolist(), workers=self.cfg.train.workers,
                              pin_memory=self.device.type == "cuda")
        net = self._wrapped_contrastive()
        net.train()
        student = getattr(net, "module", net)   # DDP wraps the student; the teacher averages its parameters
        phase = "dino" if self.cfg.method == "dino" else "simclr"
        dino = phase == "dino"
        # DINO's teacher momentum rises from dino_momentum to 1 on a cosine over the epochs.
        momentum = 1.0 - (1.0 - s.dino_momentum) * (math.cos(math.pi * epoch / max(s.epochs, 1)) + 1) / 2
        t0, total, seen, entropies = time.perf_counter(), 0.0, 0, []
        for batch in self._bar(loader, f"{phase} {epoch + 1}", leave=False):
            if len(batch) < 2:
                continue
            x = to_float(batch, self.device)
            views = torch.cat([self.contrastive_augment(x, generator=gen), self.contrastive_augment(x, generator=gen)])
            with self._autocast():
                z = net(views).float()
            loss = self._dino_loss(views, z, entropies) if dino else nt_xent(z[: len(x)], z[len(x):], s.temperature)
            self.pretrain_optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.pretrain_optimizer)
            self.scaler.update()
            if dino:
                ema_(self.teacher, student, momentum)
            total += loss.item() * len(x)
            seen += len(x)
        seconds = time.perf_counter() - t0
        row = {"epoch": epoch + 1, "phase": phase, "loss": round(total / max(seen, 1), 5),
               "images_per_s": round(seen / max(seconds, 1e-9), 1), "seconds": round(seconds, 2), "lr": round(lr, 6)}
        if entropies:
            row["target_entropy"] = round(float(np.mean(entropies)), 4)
            if epoch + 1 == s.epochs and row["target_entropy"] > 0.9:
                log.warning("DINO's teacher targets are nearly flat (entropy %.2f of the most possible): the "
                            "network may have collapsed; try a lower selfsup.dino_teacher_temperature or "
                            "selfsup.lr", row["target_entropy"])
        return row

    def _dino_loss(self, views: torch.Tensor, student: torch.Tensor, entropies: list[float]) -> torch.Tensor:
        """DINO's loss for the student's ``(2N, K)`` outputs on two stacked views ``(2N, C, H, W)``;
        updates the centre from the teacher's outputs (an average over every rank) and appends the
        targets' normalised entropy to ``entropies``."""
        s = self.cfg.selfsup
        self.teacher.train()   # its BatchNorm normalises with batch statistics, as the student's does
        with torch.no_grad(), self._autocast():
            teacher = self.teacher(views).float()
        loss = dino_loss(student.view(2, -1, student.shape[1]), teacher.view(2, -1, teacher.shape[1]), self.center,
                         s.dino_student_temperature, s.dino_teacher_temperature)
        entropies.append(normalised_entropy(dino_targets(teacher, self.center, s.dino_teacher_temperature)))
        batch_center = teacher.mean(0)
        if self.dist.enabled:
            torch.distributed.all_reduce(batch_center)
            batch_center /= self.dist.world_size
        self.center.mul_(s.dino_center_momentum).add_(batch_center, alpha=1.0 - s.dino_center_momentum)
        return loss

    def _wrapped_contrastive(self) -> torch.nn.Module:
        net = _Contrastive(self.model, self.head)
        if not self.dist.enabled:
            return net
        ids = [self.device.index] if self.device.type == "cuda" else None
        # The top layer takes no part in the contrastive loss.
        return DistributedDataParallel(net, device_ids=ids, find_unused_parameters=True)

    # ------------------------------------------------------------------------ step 3-4: training

    @torch.no_grad()
    def _centroid_top_layer(self, feats: torch.Tensor, km: KMeansResult,
                            pca: PCAWhitening) -> tuple[torch.Tensor, torch.Tensor]:
        """DeepCluster-v2's top layer: the nearest-centroid classifier of this round's clustering.

        k-means ran on ``z = l2(((f - mean) @ P) * s)``; the logit ``c . z / T`` is linear in the
        backbone feature ``f`` up to the per-image norm of the whitened vector, which is replaced by
        its dataset mean: ``W = (C * s) @ P^T / (T * mean|.|)``, ``b = -W @ mean``. Returns (W, b)
        with shapes (k, feature_dim) and (k,), identical on every rank (broadcast from rank 0).
        """
        c = self.cfg.cluster
        if self.dist.is_main:
            centroids = km.centroids.to(self.device, torch.float32)
            norm = pca.transform(feats).norm(dim=1).mean().clamp_min(1e-12)
            weight = (centroids * pca.scale.to(self.device)) @ pca.components.to(self.device).T
            weight = weight / (c.centroid_temperature * norm)
            bias = -weight @ pca.mean.to(self.device)
        else:
            weight = torch.empty(c.round_k, self.model.feature_dim, device=self.device)
            bias = torch.empty(c.round_k, device=self.device)
        return dist.broadcast(weight, self.dist), dist.broadcast(bias, self.dist)

    def _lr(self, epoch: int) -> float:
        """Backbone learning rate of cluster ``epoch`` (0-based): linear warm-up, then constant or cosine."""
        t = self.cfg.train
        if t.lr_schedule == "cosine":
            return _warmup_cosine(t.lr, epoch, t.epochs, t.warmup_epochs, t.lr_min_ratio)
        if epoch < t.warmup_epochs:
            return t.lr * (epoch + 1) / (t.warmup_epochs + 1)
        return t.lr

    def _train_pseudo_labels(self, data: PreparedDataset, labels: torch.Tensor, epoch: int,
                             top: tuple[torch.Tensor, torch.Tensor] | None = None):
        """One pass of uniformly-sampled images; returns (mean loss, images seen, seconds)."""
        t = self.cfg.train
        gen = _epoch_generator(self.cfg.seed, epoch)
        self.model.reset_top_layer(self.cfg.cluster.round_k, generator=gen)  # always drawn: keeps `gen` aligned
        if top is not None:
            with torch.no_grad():
                self.model.top_layer.weight.copy_(top[0])
                self.model.top_layer.bias.copy_(top[1])
        lr = self._lr(epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        top_optimizer = torch.optim.SGD(self.model.top_layer.parameters(), lr=lr * t.top_lr_scale,
                                        weight_decay=t.weight_decay)
        net = self._wrapped()
        net.train()
        sampler = UniformLabelSampler(labels, num_samples=t.images_per_epoch or None, seed=self.cfg.seed,
                                      num_replicas=self.dist.world_size, rank=self.dist.rank)
        sampler.set_epoch(epoch)
        targets = labels.to(self.device)
        loader = batch_loader(data, self.cfg.train.batch_size, sampler, with_positions=True,
                              workers=self.cfg.train.workers, pin_memory=self.device.type == "cuda")
        t0, total, seen = time.perf_counter(), 0.0, 0
        for batch, idx in self._bar(loader, f"train {epoch + 1}", leave=False):
            x = self.augment(to_float(batch, self.device), generator=gen)
            with self._autocast():
                loss = F.cross_entropy(net(x).float(), targets[idx.to(self.device)])
            self.optimizer.zero_grad(set_to_none=True)
            top_optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            for opt in (self.optimizer, top_optimizer):
                self.scaler.step(opt)
            self.scaler.update()
            total += loss.item() * len(batch)
            seen += len(batch)
        return total / max(seen, 1), seen, time.perf_counter() - t0

    def _wrapped(self) -> torch.nn.Module:
        """DDP around the model when distributed; rebuilt per epoch because the top layer is new."""
        if not self.dist.enabled:
            return self.model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(self.model, device_ids=ids)

    def _backbone_optimizer(self) -> torch.optim.Optimizer:
        """SGD with momentum over everything but the top layer (which has its own, per epoch)."""
        params = [p for n, p in self.model.named_parameters() if not n.startswith("top_layer.")]
        t = self.cfg.train
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp)

    # ------------------------------------------------------------------------ files

    def _write_config(self) -> None:
        if self.dist.is_main:
            atomic_write_text(self.out / "config.yaml", to_yaml(self.cfg))

    def _save_checkpoint(self, epochs_done: int, assignments: torch.Tensor, history: list[dict]) -> None:
        if self.dist.is_main:
            state = {
                "epoch": epochs_done, "model": self.model.state_dict(), "hparams": self.model.hparams(),
                "optimizer": self.optimizer.state_dict(),
                "assignments": assignments.cpu() if assignments is not None else torch.empty(0, dtype=torch.int64),
                "history": history, "config": to_dict(self.cfg), "rng": _rng_state(),
                "scaler": self.scaler.state_dict(),  # float16 AMP's loss scale ({} when off)
            }
            if self.pretrain_epochs:
                state["pretrain"] = {"head": self.head.state_dict(),
                                     "optimizer": self.pretrain_optimizer.state_dict()}
                if self.cfg.method == "dino":
                    state["pretrain"].update(teacher=self.teacher.state_dict(), center=self.center.cpu())
            save_torch(self.out / CHECKPOINT, state)
            _write_metrics(self.out / METRICS, history)
        dist.barrier(self.dist)

    def _resume_state(self) -> tuple[int, torch.Tensor | None, list[dict]]:
        path = self.out / CHECKPOINT
        if not path.exists():
            raise FileNotFoundError(f"{path}: no checkpoint to resume from")
        # Loaded onto the CPU: the RNG states and assignments must stay there, and load_state_dict
        # copies the weights (and the optimiser's moments) onto the model's own device.
        state = load_torch(path, map_location="cpu")
        if state["config"] != to_dict(self.cfg):
            log.warning("resuming %s with a config that differs from the checkpoint's", path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.pretrain_epochs and "pretrain" in state:
            self.head.load_state_dict(state["pretrain"]["head"])
            self.pretrain_optimizer.load_state_dict(state["pretrain"]["optimizer"])
            if self.cfg.method == "dino":
                self.teacher.load_state_dict(state["pretrain"]["teacher"])
                self.center.copy_(state["pretrain"]["center"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        log.info("resuming %s after epoch %d", self.out, state["epoch"])
        previous = state["assignments"].cpu()
        return int(state["epoch"]), (previous if len(previous) else None), list(state["history"])

    def _save_final(self, km: KMeansResult, pca: PCAWhitening) -> None:
        if self.dist.is_main:
            save_torch(self.out / FINAL_MODEL, {
                "model": _on_cpu(self.model.state_dict()), "hparams": self.model.hparams(),
                "pca": _on_cpu(pca.state_dict()), "centroids": km.centroids.cpu(),
                "assignments": km.assignments.cpu(), "config": to_dict(self.cfg),
            })

    def _bar(self, iterable, desc: str, leave: bool = True, total: int | None = None):
        """The epoch bar always shows (rank 0, progress on); per-batch bars only on a terminal,
        where they redraw in place, not in a log file, where each redraw would be a line."""
        from tqdm.auto import tqdm

        show = self.progress and self.dist.is_main and (leave or sys.stderr.isatty())
        return tqdm(iterable, desc=desc, leave=leave, total=total, unit="epoch" if leave else "batch",
                    disable=not show, dynamic_ncols=True)


# ----------------------------------------------------------------------------- loading a trained engine


@dataclass
class TrainedClusters:
    """A finished engine run, ready to embed and assign new images."""

    model: DeepClusterNet
    pca: PCAWhitening
    centroids: torch.Tensor   # (k, d)
    assignments: np.ndarray   # (N,) training images' final clusters
    cfg: Config

    @classmethod
    def load(cls, out: str | Path, device: str | torch.device = "cpu") -> "TrainedClusters":
        state = load_torch(Path(out) / FINAL_MODEL, map_location="cpu")  # only the network moves to `device`
        model = DeepClusterNet(**state["hparams"])
        model.load_state_dict(state["model"])
        return cls(model.to(device).eval(), PCAWhitening.from_state_dict(state["pca"]),
                   state["centroids"], state["assignments"].numpy(), config_from_dict(state["config"]))


# ----------------------------------------------------------------------------- helpers


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


def _batch_norms(model: torch.nn.Module) -> list[torch.nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def _check_choices(cfg: Config) -> None:
    """Fail before training on a misspelt choice."""
    choices = {"method": (cfg.method, METHODS),
               "train.feature_bn": (cfg.train.feature_bn, ("running", "recompute", "batch")),
               "train.lr_schedule": (cfg.train.lr_schedule, ("constant", "cosine")),
               "cluster.top_layer_init": (cfg.cluster.top_layer_init, ("random", "centroids"))}
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ValueError(f"config {key}={value!r}: choose one of {', '.join(allowed)}")
    if cfg.cluster.n_init < 1 or cfg.train.warmup_epochs < 0 or cfg.train.images_per_epoch < 0:
        raise ValueError("cluster.n_init must be >= 1, train.warmup_epochs and train.images_per_epoch >= 0")
    if cfg.cluster.train_k < 0:
        raise ValueError(f"cluster.train_k must be >= 0 (0 = cluster.k), got {cfg.cluster.train_k}")
    if cfg.cluster.centroid_temperature <= 0:
        raise ValueError("cluster.centroid_temperature must be > 0")


def _epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """A CPU generator that depends only on (seed, epoch, stream): top-layer init and augmentation
    are then identical whether a run is resumed or not, and on every rank. Stream 1 is SimCLR's."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch + stream * 7_919_000_009)


def _warmup_cosine(base: float, epoch: int, epochs: int, warmup: int, min_ratio: float = 0.0) -> float:
    """Linear warm-up over ``warmup`` epochs, then cosine decay to ``min_ratio * base`` at the last."""
    if epoch < warmup:
        return base * (epoch + 1) / (warmup + 1)
    span = max(epochs - warmup - 1, 1)
    progress = min((epoch - warmup) / span, 1.0)
    low = base * min_ratio
    return low + 0.5 * (base - low) * (1.0 + math.cos(math.pi * progress))


class _Contrastive(torch.nn.Module):
    """Backbone features -> projection head, one module so DDP can wrap both."""

    def __init__(self, model: DeepClusterNet, head: ProjectionHead) -> None:
        super().__init__()
        self.model, self.head = model, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.model.features(x))


def _study_groups(data: PreparedDataset, cfg: Config, announce: bool) -> torch.Tensor | None:
    """(N,) study number of each image for ``cluster.by_study``, or None: off, no study has two
    images (the same as clustering images), or fewer studies than clusters (with a warning)."""
    if not cfg.cluster.by_study:
        return None
    studies = torch.from_numpy(study_index(data.records))
    n_studies = int(studies.max()) + 1 if len(studies) else 0
    if n_studies == len(studies):
        return None
    if n_studies < max(cfg.cluster.k, cfg.cluster.round_k):
        if announce:
            log.warning("cluster.by_study: %d studies cannot make %d clusters; clustering the %d images instead",
                        n_studies, max(cfg.cluster.k, cfg.cluster.round_k), len(studies))
        return None
    if announce:
        log.info("clustering %d studies (%d images) instead of images", n_studies, len(studies))
    return studies


def _balanced(x: torch.Tensor, km: KMeansResult, k: int, epsilon: float) -> KMeansResult:
    """Replace k-means' assignments by balanced ones (Sinkhorn over cosine to the centroids) and
    its centroids by the means of the balanced clusters, so nearest-centroid prediction follows."""
    centroids = F.normalize(km.centroids.to(x.device, torch.float32), dim=1)
    labels = sinkhorn_balanced(x @ centroids.T, epsilon=epsilon).argmax(dim=1)
    return _summarise(x, labels, k, fallback=centroids, n_splits=km.n_splits, backend=km.backend)


def _summarise(x: torch.Tensor, labels: torch.Tensor, k: int, fallback: torch.Tensor | None = None,
               n_splits: int = 0, backend: str = "none") -> KMeansResult:
    """Clusters given by ``labels`` (N,) over ``x`` (N, d) as a KMeansResult: centroids are the
    means (an empty cluster keeps its ``fallback`` row, or the origin)."""
    sums = torch.zeros(k, x.shape[1], device=x.device).index_add_(0, labels, x)
    counts = torch.bincount(labels, minlength=k)
    empty = fallback if fallback is not None else torch.zeros(k, x.shape[1], device=x.device)
    means = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], empty)
    inertia = float(((x - means[labels]) ** 2).sum())
    return KMeansResult(means, labels, inertia, n_splits, backend)


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


def _native_bf16(device: torch.device) -> bool:
    """bfloat16 autocast only where the GPU does it in hardware (Ampere on); emulated bf16 on a
    V100 or T4 is slow, so those train in float16 with a loss scaler."""
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def _on_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies, so that ``model.pt`` from a GPU run loads with a plain ``torch.load`` anywhere."""
    return {k: v.detach().cpu() for k, v in state.items()}


def _write_metrics(path: Path, history: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS)
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(path, buf.getvalue())


def read_metrics(path: str | Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
