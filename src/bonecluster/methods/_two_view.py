"""Pre-training on two augmented views of every image: the epoch that SimCLR and DINO share.

Each epoch visits the images in a seeded random order, makes two strongly augmented views of
each batch (``selfsup.augment``), passes both through backbone + head together (so BatchNorm
sees them as one batch) and steps one SGD optimiser over backbone and head with a warm-up +
cosine learning rate. Subclasses give the head and the loss. The head is dropped afterwards:
clustering uses the backbone's pooled features (SimCLR §2.1). With ``selfsup.study_pair_p`` the
second view may come from another film of the image's study (``bonecluster.study_mates``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import nullcontext
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F

from bonecluster.augment import RadiographAugment
from bonecluster.data.cache import PreparedDataset
from bonecluster.data.loader import CachedBatches, batch_loader, to_float
from bonecluster.data.records import study_index
from bonecluster.device import bf16_fallback_message, cpu_bf16_hazard
from bonecluster.methods._base import (Loop, Method, backbone_groups, epoch_generator, load_optimizer_state,
                                       loss_guard, set_learning_rate, warmup_cosine)
from bonecluster.models import RESNETS, DeepClusterNet
from bonecluster.study_mates import StudyMates

log = logging.getLogger("bonecluster")


class MateSource(NamedTuple):
    """Where second views come from under ``selfsup.study_pair_p``."""

    grouping: StudyMates     # who shares a study with whom
    films: CachedBatches     # the cached films, indexed by dataset position


class TwoViewNet(torch.nn.Module):
    """Backbone features -> head, one module so DDP can wrap both. ``(N, C, H, W)`` -> ``(N, out)``."""

    def __init__(self, model: DeepClusterNet, head: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.head = model, head   # names fixed: they are the teacher's checkpoint keys

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.model.features(x))


class TwoViewPretraining(Method):
    """``selfsup.epochs`` epochs of a two-view loss before anything is clustered."""

    phase: ClassVar[str] = ""   # metrics.csv's phase column and the progress bar's name
    multi_crop: ClassVar[bool] = False   # whether local_loss is defined (selfsup.local_crops)

    def __init__(self, loop: Loop) -> None:
        super().__init__(loop)
        s = self.cfg.selfsup
        self.head: torch.nn.Module | None = None
        self.local_augment: RadiographAugment | None = None
        self.local_size = 0   # the small views' side in px (selfsup.local_crops), set with local_augment
        self.local_float32 = False   # the small views' pass outside autocast (set with local_augment)
        self._mates: tuple[PreparedDataset, MateSource] | None = None   # (dataset, its study mates)
        if s.epochs:   # no head without epochs: `selfsup.epochs=0` clusters the given network as it is
            self.head = self.make_head().to(loop.device)
            self.view_augment = RadiographAugment(s.augment)   # selfsup.augment: strong, two per image
            self.local_augment = self.make_local_augment()
            groups = (backbone_groups(loop.model, self.cfg.train.backbone_lr_scale,
                                      self.cfg.train.layer_lr_decay)
                      + [{"params": list(self.head.parameters()), "lr_scale": 1.0}])
            self.pretrain_optimizer = torch.optim.SGD(groups, lr=s.lr, momentum=s.momentum,
                                                      weight_decay=s.weight_decay)

    def make_head(self) -> torch.nn.Module:
        raise NotImplementedError

    def make_local_augment(self) -> RadiographAugment | None:
        """The small views' augmentation (``selfsup.local_crops``), or None when there are none."""
        s = self.cfg.selfsup
        if not s.local_crops:
            return None
        scale = tuple(s.local_scale)
        if s.local_crops < 0 or len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1 or s.local_size < 0:
            raise ValueError(f"selfsup.local_crops must be >= 0, local_scale a (low, high) share with 0 < low <= high "
                             f"<= 1 and local_size >= 0; got {s.local_crops}, {s.local_scale}, {s.local_size}")
        if not self.multi_crop:
            raise ValueError(f"selfsup.local_crops={s.local_crops}: multi-crop views work with SimCLR's "
                             f"pre-training only (simclr, simclr-deepcluster, simclr-scan), not {self.phase}")
        if self.loop.dist.world_size > 1:
            raise ValueError("selfsup.local_crops runs in one process for now (its second forward pass per step "
                             "does not suit DistributedDataParallel): leave it at 0 under torchrun")
        size = self.local_size = s.local_size or self.cfg.data.size // 2
        if self.loop.model.arch not in RESNETS and size != self.cfg.data.size:
            raise ValueError(f"selfsup.local_crops makes {size}-px views, and model.arch={self.loop.model.arch!r} may be "
                             f"built for {self.cfg.data.size} px only (a ViT's position table): use a ResNet, or "
                             f"selfsup.local_size={self.cfg.data.size}")
        hazard = cpu_bf16_hazard(self.loop.model, size, self.loop.device, torch.bfloat16) \
            if self.loop.precision == "bfloat16" else []
        self.local_float32 = bool(hazard)
        if hazard:
            log.warning(bf16_fallback_message("selfsup.local_crops", size, hazard, "the small views train in float32"))
        if self.cfg.train.feature_bn == "running":
            log.warning("selfsup.local_crops with train.feature_bn=running: BatchNorm's running statistics then mix "
                        "the %d-px small views into what k-means' features are normalised by; "
                        "train.feature_bn=recompute (the presets') re-estimates them on the films", size)
        return RadiographAugment(dataclasses.replace(s.augment, crop_scale=(float(scale[0]), float(scale[1]))))

    def local_views(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """``selfsup.local_crops`` small views of a batch ``(N, 1, S, S)``, stacked ``(L * N, 1, s, s)``
        (rows l * N + i are image i), ``s = selfsup.local_size`` or half of ``data.size``."""
        crops = torch.cat([self.local_augment(x, generator=gen) for _ in range(self.cfg.selfsup.local_crops)])
        return F.interpolate(crops, size=(self.local_size, self.local_size), mode="bilinear", antialias=True,
                             align_corners=False)

    def local_loss(self, out: torch.Tensor, local_out: torch.Tensor) -> torch.Tensor:
        """The loss of the head's ``(L * N, D)`` outputs on the small views against its ``(2N, D)``
        outputs on the two full-size views (multi-crop methods only)."""
        raise NotImplementedError

    def view_loss(self, views: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The loss of the head's ``(2N, D)`` outputs on two stacked views ``(2N, C, H, W)``
        (rows i and N + i are the same image)."""
        raise NotImplementedError

    def start_epoch(self, epoch: int) -> None:
        """Called before the epoch's first batch."""

    def after_step(self, student: TwoViewNet) -> None:
        """Called after every optimiser step with the (unwrapped) network that took it."""

    def finish_row(self, row: dict, epoch: int) -> None:
        """Add the method's own columns to the epoch's ``metrics.csv`` row."""

    @property
    def pretrain_epochs(self) -> int:
        return self.cfg.selfsup.epochs

    def pretrain_epoch(self, data: PreparedDataset, epoch: int) -> dict:
        """One pass over the data in a seeded random order (SimCLR Alg. 1, DINO Alg. 1).

        Under DDP each rank takes every world_size-th image of the order; SimCLR's negatives are
        then the rank's own batch (no gather across ranks).
        """
        loop, s = self.loop, self.cfg.selfsup
        gen = epoch_generator(self.cfg.seed, epoch, stream=1)
        lr = warmup_cosine(s.lr, epoch, s.epochs, s.warmup_epochs)
        set_learning_rate(self.pretrain_optimizer, lr)
        order = torch.randperm(len(data), generator=gen)
        share = order[loop.dist.rank::loop.dist.world_size]
        if len(share) >= 2 * s.batch_size:  # whole batches only: a batch of one breaks BatchNorm
            share = share[: len(share) - len(share) % s.batch_size]
        mates = self.mate_source(data) if s.study_pair_p > 0 else None
        loader = batch_loader(data, s.batch_size, share.tolist(), workers=self.cfg.train.workers,
                              pin_memory=loop.device.type == "cuda", with_positions=mates is not None)
        # The top layer takes no part in the loss, so DDP must not wait for its gradients.
        net = loop.ddp(TwoViewNet(loop.model, self.head), find_unused_parameters=True)
        net.train()
        student = getattr(net, "module", net)
        self.start_epoch(epoch)
        t0, total, seen = time.perf_counter(), 0.0, 0
        guard = loss_guard(loop, f"{self.phase} epoch {epoch + 1}")
        for step, batch in enumerate(loop.bar(loader, f"{self.phase} {epoch + 1}", leave=False)):
            batch, second = self.second_films(batch, mates, gen)
            if len(batch) < 2:
                continue
            x = to_float(batch, loop.device)
            x2 = x if second is None else to_float(second, loop.device)
            views = torch.cat([self.view_augment(x, generator=gen), self.view_augment(x2, generator=gen)])
            with loop.autocast():
                out = net(views).float()
            if self.local_augment is None:
                loss = self.view_loss(views, out)
            else:   # small views: their own pass (another size, so BatchNorm sees them apart)
                small = self.local_views(x, gen)
                with nullcontext() if self.local_float32 else loop.autocast():
                    local_out = net(small).float()
                loss = self.local_loss(out, local_out)
            self.pretrain_optimizer.zero_grad(set_to_none=True)
            loop.scaler.scale(loss).backward()
            loop.scaler.step(self.pretrain_optimizer)
            loop.scaler.update()
            self.after_step(student)
            total += guard(loss.item(), step) * len(x)
            seen += len(x)
        seconds = time.perf_counter() - t0
        row = {"epoch": epoch + 1, "phase": self.phase, "loss": round(total / max(seen, 1), 5),
               "images_per_s": round(seen / max(seconds, 1e-9), 1), "seconds": round(seconds, 2), "lr": round(lr, 6)}
        self.finish_row(row, epoch)
        return row

    def mate_source(self, data: PreparedDataset) -> MateSource:
        """The study grouping of ``data`` and a reader of its cached films, built once per dataset."""
        if self._mates is None or self._mates[0] is not data:
            grouping = StudyMates(study_index(data.records))
            if self.loop.dist.is_main:
                say = log.info if grouping.films_with_mates else log.warning   # no study ids: nothing to pair
                say("selfsup.study_pair_p=%g: %d of %d films have a study mate",
                    self.cfg.selfsup.study_pair_p, grouping.films_with_mates, len(data))
            self._mates = (data, MateSource(grouping, CachedBatches(data)))
        return self._mates[1]

    def second_films(self, batch, source: MateSource | None,
                     gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(first, second)`` uint8 ``(B, 1, S, S)`` batches. ``second`` is None (both views come
        from ``first``) unless study mates are on; then it holds each image's partner
        (:meth:`StudyMates.partners`), read from the cache in this process."""
        if source is None:
            return batch, None
        images, positions = batch
        partners = source.grouping.partners(positions, self.cfg.selfsup.study_pair_p, gen)
        return images, source.films[partners.numpy()]

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.head is not None:
            state["pretrain"] = {"head": self.head.state_dict(), "optimizer": self.pretrain_optimizer.state_dict()}
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.head is not None and "pretrain" in state:
            self.head.load_state_dict(state["pretrain"]["head"])
            load_optimizer_state(self.pretrain_optimizer, state["pretrain"]["optimizer"], "pre-training")
