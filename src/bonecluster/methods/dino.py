"""DINO: self-distillation pre-training (Caron et al. 2021), then k-means on the teacher's features.

A student matches the centred, sharpened output of a teacher that is the moving average of the
student (Alg. 1); no negatives are needed, and centring plus sharpening stop the collapse to one
output. The teacher's momentum rises from ``selfsup.dino_momentum`` to 1 on a cosine over the
epochs. ``metrics.csv`` records the teacher targets' normalised entropy per epoch
(``target_entropy``; near 1 = collapsed to flat outputs). The final clusters use the teacher's
weights, which give the better features (§4.5).
"""

from __future__ import annotations

import copy
import logging
import math

import numpy as np
import torch

from bonecluster.cluster import KMeansResult, PCAWhitening
from bonecluster.data.cache import PreparedDataset
from bonecluster.methods._base import Loop, register
from bonecluster.methods._two_view import TwoViewNet, TwoViewPretraining
from bonecluster.selfsup import DinoHead, dino_loss, dino_targets, ema_, normalised_entropy

log = logging.getLogger("bonecluster")


@register("dino")
class Dino(TwoViewPretraining):
    """Self-distillation through a DinoHead; the teacher's weights make the final clusters."""

    phase = "dino"

    def __init__(self, loop: Loop) -> None:
        super().__init__(loop)
        self.momentum = self.cfg.selfsup.dino_momentum   # the teacher's, set per epoch by start_epoch
        self.entropies: list[float] = []                 # this epoch's target entropies, one per batch
        self.teacher: TwoViewNet | None = None           # teacher and centre exist only with epochs
        self.center: torch.Tensor | None = None
        if self.head is not None:
            # The teacher: a moving average of backbone + head, never trained by gradients.
            self.teacher = copy.deepcopy(TwoViewNet(loop.model, self.head)).requires_grad_(False)
            self.center = torch.zeros(self.cfg.selfsup.dino_prototypes, device=loop.device)

    def make_head(self) -> torch.nn.Module:
        s = self.cfg.selfsup
        return DinoHead(self.loop.model.feature_dim, s.hidden_dim, s.proj_dim, s.dino_prototypes)

    def start_epoch(self, epoch: int) -> None:
        s = self.cfg.selfsup
        self.momentum = 1.0 - (1.0 - s.dino_momentum) * (math.cos(math.pi * epoch / max(s.epochs, 1)) + 1) / 2
        self.entropies = []

    def view_loss(self, views: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """DINO's loss for the student's ``(2N, K)`` outputs; updates the centre from the teacher's
        outputs (averaged over every rank) and records the targets' normalised entropy."""
        loop, s = self.loop, self.cfg.selfsup
        self.teacher.train()   # its BatchNorm normalises with batch statistics, as the student's does
        with torch.no_grad(), loop.autocast():
            teacher = self.teacher(views).float()
        loss = dino_loss(out.view(2, -1, out.shape[1]), teacher.view(2, -1, teacher.shape[1]), self.center,
                         s.dino_student_temperature, s.dino_teacher_temperature)
        self.entropies.append(normalised_entropy(dino_targets(teacher, self.center, s.dino_teacher_temperature)))
        batch_center = teacher.mean(0)
        if loop.dist.enabled:
            torch.distributed.all_reduce(batch_center)
            batch_center /= loop.dist.world_size
        self.center.mul_(s.dino_center_momentum).add_(batch_center, alpha=1.0 - s.dino_center_momentum)
        return loss

    def after_step(self, student: TwoViewNet) -> None:
        ema_(self.teacher, student, self.momentum)

    def finish_row(self, row: dict, epoch: int) -> None:
        if not self.entropies:
            return
        row["target_entropy"] = round(float(np.mean(self.entropies)), 4)
        if epoch + 1 == self.cfg.selfsup.epochs and row["target_entropy"] > 0.9:
            log.warning("DINO's teacher targets are nearly flat (entropy %.2f of the most possible): the "
                        "network may have collapsed; try a lower selfsup.dino_teacher_temperature or "
                        "selfsup.lr", row["target_entropy"])

    def final_clusters(self, data: PreparedDataset, seed_offset: int) -> tuple[KMeansResult, PCAWhitening]:
        if self.head is not None:
            self.loop.model.load_state_dict(self.teacher.model.state_dict())
        return super().final_clusters(data, seed_offset)

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.head is not None:
            state["pretrain"].update(teacher=self.teacher.state_dict(), center=self.center.cpu())
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.head is not None and "pretrain" in state:
            self.teacher.load_state_dict(state["pretrain"]["teacher"])
            self.center.copy_(state["pretrain"]["center"])
