"""MoCo: contrastive pre-training against a queue of a momentum encoder's keys (He et al. 2020), then k-means once.

SimCLR's negatives are the rest of its batch: 254 at the presets' batch of 128 on a CPU, where its
paper gains from thousands (Chen et al. 2020, Fig. 9). MoCo v2 (Chen et al. 2020b) keeps the keys
of earlier batches in a queue instead, made by a key encoder that is the moving average of the
trained one, so the negatives grow without a larger batch. Here each view's projection (query) must
pick its other view's key among the batch's keys (MoCo v3's symmetric loss) and the
``selfsup.moco_queue`` queued ones (:func:`~bonecluster.selfsup.queue_info_nce`). The keys are made
with BatchNorm over shuffled groups of the batch (after MoCo's "shuffle BN", §3.3, in one process), so
a key's statistics are not its query's. That is weaker than MoCo's: the queries are normalised over
the whole batch, of which every key group is a part, so the batch's keys may still share a trace of
its statistics that the queued keys lack; the batch's own keys being negatives too keeps that trace
from singling out the positive. The projection head is dropped afterwards and k-means clusters the
trained (query) backbone's features, as for SimCLR. The queue holds at most half as many keys as
there are films. One process only for now (the queue would need every rank's keys).
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F

from bonecluster.data.cache import PreparedDataset
from bonecluster.methods._base import Loop, epoch_generator, register
from bonecluster.methods._two_view import TwoViewNet, TwoViewPretraining
from bonecluster.selfsup import ProjectionHead, ema_, queue_info_nce

log = logging.getLogger("bonecluster")


@register("moco")
class MoCo(TwoViewPretraining):
    """Queries against the key encoder's keys of the batch and of a queue; k-means once afterwards."""

    phase = "moco"

    def __init__(self, loop: Loop) -> None:
        super().__init__(loop)
        s = self.cfg.selfsup
        self.key_net: TwoViewNet | None = None   # key encoder and queue exist only with epochs
        self.queue: torch.Tensor | None = None   # (moco_queue, proj_dim) unit keys, oldest overwritten first
        self.queue_next = 0                      # the queue row the next key goes to
        self.new_keys: torch.Tensor | None = None   # this step's keys, queued after the optimiser step
        self.shuffle: torch.Generator | None = None   # the key groups' shuffle, set by start_epoch
        if self.head is None:
            return
        if s.moco_queue < 0 or not 0 <= s.moco_momentum < 1 or s.moco_bn_groups < 1:
            raise ValueError(f"selfsup.moco_queue must be >= 0, moco_momentum in [0, 1) and moco_bn_groups >= 1; got "
                             f"{s.moco_queue}, {s.moco_momentum} and {s.moco_bn_groups}")
        if loop.dist.world_size > 1:
            raise ValueError("method moco runs in one process for now (its queue holds this process's keys only): "
                             "run it without torchrun, or use simclr")
        self.key_net = copy.deepcopy(TwoViewNet(loop.model, self.head)).requires_grad_(False)
        # MoCo starts from a queue of random unit vectors; it is all real keys after a few steps.
        init = torch.randn(s.moco_queue, s.proj_dim, generator=epoch_generator(self.cfg.seed, 0, stream=4))
        self.queue = F.normalize(init, dim=1).to(loop.device)

    def make_head(self) -> torch.nn.Module:
        s = self.cfg.selfsup
        return ProjectionHead(self.loop.model.feature_dim, s.hidden_dim, s.proj_dim)

    def pretrain_epoch(self, data: PreparedDataset, epoch: int) -> dict:
        self.fit_queue(len(data))
        return super().pretrain_epoch(data, epoch)

    def fit_queue(self, films: int) -> None:
        """Cut the queue to half the number of films (a quarter of an epoch's keys, two per film), so
        that a film's own key from its last visit has almost always left it when the film comes back
        (it would be a negative as close as the positive); a part's few hundred films in stage 2
        would otherwise meet their own keys at every step."""
        most = films // 2
        if len(self.queue) <= most:
            return
        log.info("selfsup.moco_queue=%d is more than half of the %d films: the queue holds %d keys",
                 len(self.queue), films, most)
        newest_last = self.queue.roll(-self.queue_next, dims=0)   # the oldest row first
        self.queue = newest_last[len(newest_last) - most:].clone()
        self.queue_next = 0

    def start_epoch(self, epoch: int) -> None:
        self.shuffle = epoch_generator(self.cfg.seed, epoch, stream=4)   # the same shuffles when resumed

    def view_loss(self, views: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE of the ``(2N, D)`` queries against the other view's keys and the queue;
        keeps this step's keys for the queue."""
        n, tau = len(out) // 2, self.cfg.selfsup.temperature
        keys = F.normalize(self.key_projections(views), dim=1)
        loss = (queue_info_nce(out[:n], keys[n:], self.queue, tau) + queue_info_nce(out[n:], keys[:n], self.queue, tau)) / 2
        self.new_keys = keys
        return loss

    @torch.no_grad()
    def key_projections(self, views: torch.Tensor) -> torch.Tensor:
        """The key encoder's ``(2N, D)`` outputs for ``(2N, C, H, W)`` views, row for row, each computed
        with the BatchNorm statistics of a random group of the views (shuffle BN)."""
        self.key_net.train()   # BatchNorm on batch statistics, as MoCo's key encoder
        # Groups differ in size by at most one, so each holds >= 2 views (BatchNorm needs 2).
        groups = max(1, min(self.cfg.selfsup.moco_bn_groups, len(views) // 2))
        order = torch.randperm(len(views), generator=self.shuffle).to(views.device)
        with self.loop.autocast():
            shuffled = torch.cat([self.key_net(group).float() for group in views[order].tensor_split(groups)])
        return shuffled[torch.argsort(order)]

    def after_step(self, student: TwoViewNet) -> None:
        ema_(self.key_net, student, self.cfg.selfsup.moco_momentum)
        self.enqueue(self.new_keys)

    def enqueue(self, keys: torch.Tensor) -> None:
        """Overwrite the oldest rows of the queue with ``keys`` ``(M, D)`` (the last K when M > K)."""
        size = len(self.queue)
        if size == 0:
            return
        keys = keys[-size:]
        rows = (self.queue_next + torch.arange(len(keys), device=self.queue.device)) % size
        self.queue[rows] = keys.to(self.queue.dtype)
        self.queue_next = (self.queue_next + len(keys)) % size

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.head is not None:
            state["pretrain"].update(key_net=self.key_net.state_dict(), queue=self.queue.cpu(),
                                     queue_next=self.queue_next)
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.head is not None and "pretrain" in state:
            self.key_net.load_state_dict(state["pretrain"]["key_net"])
            self.queue = state["pretrain"]["queue"].to(self.queue.device)   # its length fitted to the films
            self.queue_next = int(state["pretrain"]["queue_next"])
