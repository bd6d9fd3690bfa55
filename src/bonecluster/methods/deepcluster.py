"""DeepCluster, the paper's method: k-means pseudo-labels, a re-initialised head, cross-entropy.

One round (Caron et al. 2018, §3.2-3.4, and the reference ``main.py``):

1. extract features of every image in eval mode, without augmentation;
2. PCA-whiten them, L2-normalise, and run k-means (eq. 6), re-seeding empty clusters;
3. re-initialise the top layer for the new pseudo-labels (``cluster.top_layer_init=centroids``:
   DeepCluster-v2's nearest-centroid classifier instead, Caron et al. 2020, App. A);
4. train the network to predict the pseudo-labels with cross-entropy (eq. 5), drawing batches
   uniformly over the pseudo-labels so one big cluster cannot dominate.

After the last round the features are clustered once more: those are the final assignments.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F

from bonecluster import distributed as dist
from bonecluster.cluster import KMeansResult, PCAWhitening
from bonecluster.data.cache import PreparedDataset
from bonecluster.data.loader import batch_loader, to_float
from bonecluster.methods._base import (Loop, Method, backbone_groups, epoch_generator, load_optimizer_state, loss_guard,
                                       register, set_learning_rate, warmup_cosine)
from bonecluster.metrics import nmi
from bonecluster.sampler import UniformLabelSampler

log = logging.getLogger("bonecluster")


@register("deepcluster")
class DeepCluster(Method):
    """Rounds of k-means pseudo-labels and cross-entropy; owns the backbone's SGD (``optimizer``)."""

    centroid_top_layer = False   # True: every round starts from the centroid classifier (SeLa)

    def __init__(self, loop: Loop) -> None:
        super().__init__(loop)
        t = self.cfg.train
        # SGD with momentum over everything but the top layer (which has its own, per round);
        # None when the backbone is frozen (model.freeze: only the top layer trains).
        groups = backbone_groups(loop.model, t.backbone_lr_scale, t.layer_lr_decay)
        self.optimizer = (torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
                          if groups else None)

    @property
    def cluster_epochs(self) -> int:
        return self.cfg.train.epochs

    def cluster_epoch(self, data: PreparedDataset, epoch: int, previous: torch.Tensor | None):
        """One round: ``previous`` and the returned labels are (N,) int64 on the CPU."""
        loop, c = self.loop, self.cfg.cluster
        t0 = time.perf_counter()
        feats = loop.extract(data)
        t1 = time.perf_counter()
        km, pca = loop.cluster(feats, seed_offset=epoch, k=c.round_k)
        kmeans_s = time.perf_counter() - t1
        labels = km.assignments.cpu()
        sizes = torch.bincount(labels, minlength=c.round_k)
        largest = sizes.max().item() / len(labels)
        centroid_top = c.top_layer_init == "centroids" or self.centroid_top_layer
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
        collapsed = largest > c.collapse_share
        if collapsed and loop.dist.is_main:
            log.warning("clusters collapsed at epoch %d: one cluster holds %.0f%% of the images "
                        "(limit %.0f%%); stopping early", epoch + 1, 100 * largest, 100 * c.collapse_share)
        return row, labels, collapsed

    @torch.no_grad()
    def _centroid_top_layer(self, feats: torch.Tensor, km: KMeansResult,
                            pca: PCAWhitening) -> tuple[torch.Tensor, torch.Tensor]:
        """DeepCluster-v2's top layer: the nearest-centroid classifier of this round's clustering.

        k-means ran on ``z = l2(((f - mean) @ P) * s)``; the logit ``c . z / T`` is linear in the
        backbone feature ``f`` up to the per-image norm of the whitened vector, which is replaced by
        its dataset mean: ``W = (C * s) @ P^T / (T * mean|.|)``, ``b = -W @ mean``. Returns (W, b)
        with shapes (k, feature_dim) and (k,), identical on every rank (broadcast from rank 0).
        """
        loop, c = self.loop, self.cfg.cluster
        device = loop.device
        if loop.dist.is_main:
            centroids = km.centroids.to(device, torch.float32)
            norm = pca.transform(feats).norm(dim=1).mean().clamp_min(1e-12)
            weight = (centroids * pca.scale.to(device)) @ pca.components.to(device).T
            weight = weight / (c.centroid_temperature * norm)
            bias = -weight @ pca.mean.to(device)
        else:
            weight = torch.empty(c.round_k, loop.model.feature_dim, device=device)
            bias = torch.empty(c.round_k, device=device)
        return dist.broadcast(weight, loop.dist), dist.broadcast(bias, loop.dist)

    def _lr(self, epoch: int) -> float:
        """Backbone learning rate of round ``epoch`` (0-based): linear warm-up, then constant or cosine."""
        t = self.cfg.train
        if t.lr_schedule == "cosine":
            return warmup_cosine(t.lr, epoch, t.epochs, t.warmup_epochs, t.lr_min_ratio)
        if epoch < t.warmup_epochs:
            return t.lr * (epoch + 1) / (t.warmup_epochs + 1)
        return t.lr

    def _train_pseudo_labels(self, data: PreparedDataset, labels: torch.Tensor, epoch: int,
                             top: tuple[torch.Tensor, torch.Tensor] | None = None):
        """One pass of uniformly-sampled images; returns (mean loss, images seen, seconds)."""
        loop, t = self.loop, self.cfg.train
        model, device = loop.model, loop.device
        gen = epoch_generator(self.cfg.seed, epoch)
        model.reset_top_layer(self.cfg.cluster.round_k, generator=gen)  # always drawn: keeps `gen` aligned
        if top is not None:
            with torch.no_grad():
                model.top_layer.weight.copy_(top[0])
                model.top_layer.bias.copy_(top[1])
        lr = self._lr(epoch)
        set_learning_rate(self.optimizer, lr)
        top_optimizer = torch.optim.SGD(model.top_layer.parameters(), lr=lr * t.top_lr_scale,
                                        weight_decay=t.weight_decay)
        net = loop.ddp(model)   # rebuilt per round because the top layer is new
        net.train()
        sampler = UniformLabelSampler(labels, num_samples=t.images_per_epoch or None, seed=self.cfg.seed,
                                      num_replicas=loop.dist.world_size, rank=loop.dist.rank)
        sampler.set_epoch(epoch)
        targets = labels.to(device)
        loader = batch_loader(data, t.batch_size, sampler, with_positions=True, workers=t.workers,
                              pin_memory=device.type == "cuda")
        t0, total, seen, timer = time.perf_counter(), 0.0, 0, loop.timer
        run_epoch = f" (epoch {self.pretrain_epochs + epoch + 1} of the run)" if self.pretrain_epochs else ""
        guard = loss_guard(loop, f"deepcluster round {epoch + 1}{run_epoch}")
        steps = timer.iterate("cache reads", loop.bar(loader, f"train {epoch + 1}", leave=False))
        for step, (batch, idx) in enumerate(steps):
            with timer.phase("cache reads"):
                x = to_float(batch, device)
            with timer.phase("augmentation"):
                x = loop.augment(x, generator=gen)
            with timer.phase("training step"):
                loss = self._pseudo_label_step(net, top_optimizer, x, targets[idx.to(device)])
                total += guard(loss, step) * len(batch)
            seen += len(batch)
        return total / max(seen, 1), seen, time.perf_counter() - t0

    def _pseudo_label_step(self, net: torch.nn.Module, top_optimizer: torch.optim.Optimizer,
                           x: torch.Tensor, y: torch.Tensor) -> float:
        """One forward, backward and optimiser step on the batch ``x`` with pseudo-labels ``y``; the loss."""
        loop = self.loop
        with loop.autocast():
            loss = F.cross_entropy(net(x).float(), y)
        optimizers = [opt for opt in (self.optimizer, top_optimizer) if opt is not None]
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loop.scaler.scale(loss).backward()
        for opt in optimizers:
            loop.scaler.step(opt)
        loop.scaler.update()
        return loss.item()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "optimizer": self.optimizer.state_dict() if self.optimizer else None}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        saved = state.get("optimizer")
        if (saved is None) != (self.optimizer is None):
            raise ValueError(f"the checkpoint was trained with model.freeze={saved is None}: resume with that setting")
        if saved is not None:
            load_optimizer_state(self.optimizer, saved, "backbone")
