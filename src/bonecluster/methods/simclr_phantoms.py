"""SimCLR on the films, anchored by labelled phantoms: every step also learns the phantoms' part, view and finding.

Pre-training on phantoms first and then SimCLR on real films (``model.weights=phantoms``) lifts
the supervised ceilings, but the SimCLR epochs wash out the phantom part directions that k-means
could use (docs/RESULTS.md, issue 21). Here both losses train the backbone together, as in
multi-task domain randomisation (Tobin et al. 2017) with a self-supervised target domain: each
step adds, to SimCLR's NT-Xent on two views of the real batch, the cross-entropy of
:class:`~bonecluster.phantom_pretrain.TaskHeads` on a batch of ``phantoms.batch_size`` labelled
phantoms (``phantoms.tasks``, drawn at ``data.size`` / ``data.fit`` with ``phantoms.texture``,
``reshare_p``, ``framing``, ``children``, ``whole_arm``, ``annotations`` and ``part_finding_sizes``; augmented
with ``train.augment``), weighted by
``selfsup.phantom_weight``. No label of a real film is read. The task heads are dropped with
the projection head; k-means runs once on the backbone's features, as for ``simclr``.

One process only for now: the phantom batch takes its own pass through the backbone, outside the
DistributedDataParallel wrapper, so its gradients would not be averaged across ranks.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from bonecluster.augment import RadiographAugment, uint8_to_unit_float
from bonecluster.methods._base import Loop, epoch_generator, register
from bonecluster.methods.simclr import SimCLR
from bonecluster.models import batchnorm_momentum
from bonecluster.phantom_pretrain import PhantomCorpus, TaskHeads, check_tasks, film_options, render_corpus
from bonecluster.selfsup import ProjectionHead


class ProjectionAndTasks(torch.nn.Module):
    """SimCLR's projection head (the forward pass) with the phantom task heads beside it, so one
    module, and one optimiser group, holds both. ``(N, D)`` -> ``(N, proj_dim)``."""

    def __init__(self, projection: torch.nn.Module, tasks: TaskHeads) -> None:
        super().__init__()
        self.projection, self.tasks = projection, tasks

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.projection(features)


@register("simclr-phantoms")
class SimCLRPhantoms(SimCLR):
    """NT-Xent on the films plus the labelled phantoms' task loss in every step; k-means once afterwards."""

    phase = "simclr-phantoms"
    multi_crop = False   # its loss adds the phantoms' tasks; small views are not weighed against them yet

    def __init__(self, loop: Loop) -> None:
        if loop.dist.world_size > 1:
            raise ValueError("method simclr-phantoms runs in one process for now (its phantom batches bypass "
                             "DistributedDataParallel); use --method simclr with model.weights=phantoms under torchrun")
        self.tasks = check_tasks(loop.cfg.phantoms.tasks)
        weight = loop.cfg.selfsup.phantom_weight
        if not (isinstance(weight, (int, float)) and not isinstance(weight, bool) and math.isfinite(weight) and weight >= 0):
            raise ValueError(f"selfsup.phantom_weight must be a finite number >= 0, got {weight!r}")
        super().__init__(loop)
        self.corpus: PhantomCorpus | None = None   # drawn at the first pre-training epoch (not on a resume past them)
        self._gen: torch.Generator | None = None
        self._order: np.ndarray = np.empty(0, dtype=np.int64)
        self._next = 0
        self._phantom_loss = self._phantom_seen = 0.0

    def make_head(self) -> torch.nn.Module:
        s = self.cfg.selfsup
        return ProjectionAndTasks(ProjectionHead(self.loop.model.feature_dim, s.hidden_dim, s.proj_dim),
                                  TaskHeads(self.loop.model.feature_dim, self.tasks))

    def start_epoch(self, epoch: int) -> None:
        if self.corpus is None:
            self._draw_corpus()
        # A seeded order of the phantoms per epoch, so a resumed run draws the same batches.
        gen = epoch_generator(self.cfg.seed, epoch, stream=3)
        self._order = torch.randperm(len(self.corpus), generator=gen).numpy()
        self._gen, self._next = gen, 0
        self._phantom_loss = self._phantom_seen = 0.0

    def _draw_corpus(self) -> None:
        """``phantoms.films`` labelled phantoms, drawn once per run and shuffled every epoch
        (batches wrap round when the epochs ask for more films than there are)."""
        p = self.cfg.phantoms
        self.corpus = render_corpus(p.films, self.cfg.data, seed=self.cfg.seed, workers=self.cfg.data.workers or None,
                                    progress=self.loop.dist.is_main, **film_options(p))
        self.labels = {t: torch.from_numpy(self.corpus.labels[t]) for t in self.tasks}
        self.phantom_augment = RadiographAugment(self.cfg.train.augment)

    def _phantom_batch(self) -> np.ndarray:
        """The next ``phantoms.batch_size`` positions of this epoch's order (wrapping round)."""
        n = min(self.cfg.phantoms.batch_size, len(self._order))
        idx = np.take(self._order, np.arange(self._next, self._next + n), mode="wrap")
        self._next = (self._next + n) % len(self._order)
        return idx

    def view_loss(self, views: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        loss = super().view_loss(views, out)
        idx = self._phantom_batch()
        device = self.loop.device
        x = self.phantom_augment(uint8_to_unit_float(torch.from_numpy(self.corpus.images[idx]).to(device)),
                                 generator=self._gen)
        # momentum 0: the phantoms leave no statistics in a network that will embed real films
        with self.loop.autocast(), batchnorm_momentum(self.loop.model, 0.0):
            logits = self.head.tasks(self.loop.model.features(x))
        task_loss = sum(F.cross_entropy(logits[t].float(), self.labels[t][idx].to(device)) for t in self.tasks)
        self._phantom_loss += float(task_loss.detach()) * len(idx)
        self._phantom_seen += len(idx)
        return loss + self.cfg.selfsup.phantom_weight * task_loss

    def finish_row(self, row: dict, epoch: int) -> None:
        row["phantom_loss"] = round(self._phantom_loss / max(self._phantom_seen, 1), 5)


__all__ = ["ProjectionAndTasks", "SimCLRPhantoms"]
