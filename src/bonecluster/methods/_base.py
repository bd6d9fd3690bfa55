"""What a clustering method is, what the training loop lends it, and the registry of names.

The loop (:class:`bonecluster.engine.DeepClusterEngine`) runs, for every method::

    for epoch in range(method.pretrain_epochs):  row = method.pretrain_epoch(data, epoch)
    for epoch in range(method.cluster_epochs):   row, labels, collapsed = method.cluster_epoch(data, epoch, labels)
    clusters, pca = method.final_clusters(data, seed_offset)

and owns what every method shares: the network, the epochs and their checkpoints, ``--resume``,
DDP, ``metrics.csv``, progress bars, feature extraction and the k-means step (:class:`Loop`).
A method adds its own optimisers, heads and losses, and returns their state for the checkpoint.
"""

from __future__ import annotations

import itertools
import math
from contextlib import AbstractContextManager
from typing import Callable, ClassVar, Iterable, Protocol

import torch

from bonecluster.distributed import DistInfo
from bonecluster.augment import RadiographAugment
from bonecluster.cluster import KMeansResult, PCAWhitening, kmeans_best_of
from bonecluster.config import Config
from bonecluster.data.cache import PreparedDataset
from bonecluster.divergence import LossGuard
from bonecluster.models import DeepClusterNet
from bonecluster.timing import NoTimer


class Loop(Protocol):
    """The part of the training loop a method may use (the engine implements it)."""

    cfg: Config
    device: torch.device
    dist: DistInfo
    model: DeepClusterNet
    augment: RadiographAugment          # train.augment: DeepCluster's training views, SCAN's views
    scaler: torch.amp.GradScaler
    timer: NoTimer                      # times the phases (bonecluster.timing); NoTimer by default
    precision: str                      # float32, bfloat16 or float16: what the training passes compute in

    def autocast(self) -> AbstractContextManager: ...

    def bar(self, iterable: Iterable, desc: str, leave: bool = True, total: int | None = None) -> Iterable: ...

    def ddp(self, module: torch.nn.Module, find_unused_parameters: bool = False) -> torch.nn.Module: ...

    def extract(self, data: PreparedDataset) -> torch.Tensor: ...

    def forward_all(self, data: PreparedDataset, desc: str, keep: bool,
                    generator: torch.Generator | None = None) -> torch.Tensor | None: ...

    def cluster(self, feats: torch.Tensor, seed_offset: int,
                k: int | None = None, final: bool = False) -> tuple[KMeansResult, PCAWhitening]: ...


class Method:
    """A clustering method: optional pre-training epochs, clustering rounds, the final clusters.

    The defaults are "no pre-training, no rounds, k-means once on the network's features".
    Subclasses call ``super()`` in ``__init__``, ``state_dict`` and ``load_state_dict`` so that
    methods combine by inheritance (``simclr-deepcluster`` = SimCLR's epochs, then DeepCluster's).
    """

    name: ClassVar[str] = ""

    def __init__(self, loop: Loop) -> None:
        self.loop = loop
        self.cfg = loop.cfg

    @property
    def pretrain_epochs(self) -> int:
        """Epochs of :meth:`pretrain_epoch`, counted first in the epoch numbers and the checkpoint."""
        return 0

    @property
    def cluster_epochs(self) -> int:
        """Rounds of :meth:`cluster_epoch` after the pre-training."""
        return 0

    def pretrain_epoch(self, data: PreparedDataset, epoch: int) -> dict:
        """One pre-training epoch (0-based); returns its ``metrics.csv`` row."""
        raise NotImplementedError(f"method {self.name} has no pre-training epochs")

    def cluster_epoch(self, data: PreparedDataset, epoch: int,
                      previous: torch.Tensor | None) -> tuple[dict, torch.Tensor, bool]:
        """One clustering round (0-based) given the last round's (N,) labels; returns
        (``metrics.csv`` row, this round's (N,) CPU labels, whether the clusters collapsed)."""
        raise NotImplementedError(f"method {self.name} has no clustering rounds")

    def cluster_points(self, points: torch.Tensor, k: int, seeds: list[int]) -> KMeansResult:
        """Clusters of the whitened ``points`` (M, d), on rank 0: k-means, lowest inertia of ``seeds``."""
        c = self.cfg.cluster
        return kmeans_best_of(points, k, seeds, niter=c.niter, init=c.init, backend=c.backend,
                              device=self.loop.device, timer=self.loop.timer)

    def final_clusters(self, data: PreparedDataset, seed_offset: int) -> tuple[KMeansResult, PCAWhitening]:
        """The run's result: ``cluster.k`` clusters of the trained network's features."""
        return self.loop.cluster(self.loop.extract(data), seed_offset=seed_offset, final=True)

    def state_dict(self) -> dict:
        """Top-level checkpoint entries of the method's own state (optimisers, heads...)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore from a whole checkpoint, as written with :meth:`state_dict`'s entries."""


_REGISTRY: dict[str, type[Method]] = {}


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: make ``cls`` the method ``name`` (``--method name``)."""

    def add(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method {name!r} is registered twice ({_REGISTRY[name].__name__}, {cls.__name__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return add


def registered(name: str) -> type[Method] | None:
    return _REGISTRY.get(name)


# ----------------------------------------------------------------------------- shared by methods


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """A CPU generator that depends only on (seed, epoch, stream): top-layer init and augmentation
    are then identical whether a run is resumed or not, and on every rank. Streams: 0 DeepCluster's
    rounds, 1 the two-view pre-training, 2 SCAN's views, 3 simclr-phantoms' phantom order and augmentation,
    4 MoCo's key shuffle."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch + stream * 7_919_000_009)


def warmup_cosine(base: float, epoch: int, epochs: int, warmup: int, min_ratio: float = 0.0) -> float:
    """Linear warm-up over ``warmup`` epochs, then cosine decay to ``min_ratio * base`` at the last."""
    if epoch < warmup:
        return base * (epoch + 1) / (warmup + 1)
    span = max(epochs - warmup - 1, 1)
    progress = min((epoch - warmup) / span, 1.0)
    low = base * min_ratio
    return low + 0.5 * (base - low) * (1.0 + math.cos(math.pi * progress))


def backbone_parameters(model: DeepClusterNet) -> list[torch.nn.Parameter]:
    """Every parameter but the top layer's (which each clustering round replaces)."""
    return [p for n, p in model.named_parameters() if not n.startswith("top_layer.")]


def resnet_stage(name: str) -> int | None:
    """A ResNet backbone parameter's stage: 0 for the stem (``conv1``, ``bn1``), N for ``layerN``,
    None for a name that is neither (torchvision's and timm's ResNets share these names)."""
    parts = name.split(".")
    if len(parts) < 2 or parts[0] != "backbone":
        return None
    if parts[1] in ("conv1", "bn1"):
        return 0
    if parts[1].startswith("layer") and parts[1][5:].isdigit():
        return int(parts[1][5:])
    return None


def backbone_groups(model: DeepClusterNet, lr_scale: float, layer_decay: float = 1.0) -> list[dict]:
    """The backbone's optimiser parameter groups, their learning rate ``lr_scale`` times the base
    (``train.backbone_lr_scale``); none when the backbone is frozen (``model.freeze``).

    One group, unless ``layer_decay`` < 1 (``train.layer_lr_decay``, ELECTRA's layer-wise decay):
    then one group per ResNet stage, the last stage at ``lr_scale`` and each earlier one
    ``layer_decay`` times the next. The groups keep the parameters' order, so a checkpoint's
    optimiser state saved with other groups splits back in place (``load_optimizer_state``).
    """
    if model.frozen:
        return []
    if layer_decay == 1.0:
        return [{"params": backbone_parameters(model), "lr_scale": float(lr_scale)}]
    staged = [(resnet_stage(n), n, p) for n, p in model.named_parameters() if not n.startswith("top_layer.")]
    odd = next((n for stage, n, _ in staged if stage is None), None)
    if odd is not None:
        raise ValueError(f"train.layer_lr_decay={layer_decay} needs a ResNet backbone (a stem and layer1..layerN); "
                         f"model.arch={model.arch!r} has parameter {odd!r}: leave train.layer_lr_decay at 1")
    last = max(stage for stage, _, _ in staged)
    return [{"params": [p for _, _, p in run], "lr_scale": float(lr_scale) * layer_decay ** (last - stage)}
            for stage, run in itertools.groupby(staged, key=lambda item: item[0])]   # consecutive runs: order kept


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, what: str) -> None:
    """Load a checkpoint's optimiser ``state`` into ``optimizer``, keeping this run's ``lr_scale``
    per group (``train.backbone_lr_scale`` may differ from the run that wrote it).

    A state saved in one group (before the backbone and the heads had a group each) is split in
    this optimiser's group sizes: the backbone's parameters came first, in the same order. A
    different parameter count (``model.freeze`` or the architecture changed) is one clear error.
    """
    groups, saved = optimizer.param_groups, state["param_groups"]
    sizes = [len(g["params"]) for g in groups]
    flat = [i for g in saved for i in g["params"]]
    if len(flat) != sum(sizes):
        raise ValueError(f"the checkpoint's {what} optimiser holds {len(flat)} parameters and this run's "
                         f"{sum(sizes)}: resume with the model.freeze and model.arch it was trained with")
    if len(saved) != len(groups):
        split, start = [], 0
        for size in sizes:
            split.append({**saved[0], "params": flat[start:start + size]})
            start += size
        state = {**state, "param_groups": split}
    scales = [g.get("lr_scale", 1.0) for g in groups]
    optimizer.load_state_dict(state)
    for group, scale in zip(optimizer.param_groups, scales):
        group["lr_scale"] = scale


def loss_guard(loop: Loop, where: str) -> LossGuard:
    """A :class:`~bonecluster.divergence.LossGuard` for one epoch of ``loop``'s training, named ``where``."""
    return LossGuard(where, loop.precision, loop.device.type)


def set_learning_rate(optimizer: torch.optim.Optimizer | None, lr: float) -> None:
    """Set every group's learning rate to ``lr`` times its own ``lr_scale`` (1 when it has none)."""
    if optimizer is None:
        return
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
