"""Typed dataclass configs, YAML presets (``cpu``, ``paper``) and ``--set key=value`` overrides.

The resolved config is written into every run folder (``config.yaml``), as timm does with
``args.yaml``, so a run can be resumed, evaluated or served with exactly its settings.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bonecluster.augment import AugmentConfig
from bonecluster.data.decode import Limits, Preprocess

PRESET_DIR = Path(__file__).parent / "presets"


@dataclass
class DataConfig:
    """Decoding and caching. ``size`` is the square side the network sees."""

    size: int = 64
    fit: str = "squash"            # "squash" or "letterbox" (keeps aspect, pads)
    pct_low: float = 0.5           # robust intensity scaling percentiles
    pct_high: float = 99.5
    pixel_cap: int = 64_000_000    # decompression-bomb guard (width * height)
    max_frames: int = 16           # DICOM frame count limit
    max_csv_row_chars: int = 65_536
    cache: str = ""                # decode-once cache folder; "" = <run or output folder>/cache
    workers: int = 0               # decoding processes; 0 = one per core (at most 8)

    def preprocess(self) -> Preprocess:
        return Preprocess(size=self.size, fit=self.fit, pct_low=self.pct_low, pct_high=self.pct_high)

    def limits(self) -> Limits:
        return Limits(pixel_cap=self.pixel_cap, max_frames=self.max_frames)


@dataclass
class ModelConfig:
    """The CNN (see :class:`bonecluster.models.DeepClusterNet`)."""

    arch: str = "resnet18"         # resnet18, resnet34 or resnet50
    sobel: bool = True             # DeepCluster's fixed Sobel front end
    weights: str = "none"          # none, imagenet (downloaded on your machine) or a .pt file
    small_input: bool = False      # True: 3x3 stem without max-pool (4-16x slower on CPU)


@dataclass
class ClusterConfig:
    """Features -> PCA-whitening -> L2 -> k-means (DeepCluster eq. 6)."""

    k: int = 7
    pca_dim: int = 256             # capped by the number of images and the feature size
    niter: int = 20
    init: str = "k-means++"        # or "random"
    backend: str = "auto"          # auto (faiss when installed), faiss or torch
    collapse_share: float = 0.95   # stop early when one cluster holds more than this share
    n_init: int = 1                # k-means restarts per round; the lowest inertia wins (unsupervised)
    # Top layer at the start of each round: "random" = DeepCluster's N(0, 0.01) re-init (§3.2);
    # "centroids" = DeepCluster-v2 (Caron et al. 2020, SwAV paper App. A): the nearest-centroid
    # classifier of the new clustering, mapped back through the PCA-whitening.
    top_layer_init: str = "random"
    centroid_temperature: float = 0.1  # logits = cosine(feature, centroid) / T for "centroids"


@dataclass
class TrainConfig:
    """Pseudo-label training (DeepCluster eq. 5): SGD with momentum, uniform label sampling."""

    epochs: int = 20
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-5
    device: str = "auto"           # auto, cuda, cuda:N, mps or cpu
    amp: bool = True               # mixed precision, CUDA only
    workers: int = 0               # DataLoader workers reading the cache (0 = main process)
    feature_batch_size: int = 256
    images_per_epoch: int = 0      # images drawn per training pass; 0 = the dataset size
    lr_schedule: str = "constant"  # "constant" or "cosine" (decays to lr_min_ratio * lr at the last epoch)
    lr_min_ratio: float = 0.0
    warmup_epochs: int = 0         # linear learning-rate warm-up over the first epochs
    top_lr_scale: float = 1.0      # the top layer's learning rate is lr * top_lr_scale
    # BatchNorm statistics used when extracting features for k-means:
    # "running" = eval mode with the running averages (reference code);
    # "recompute" = re-estimate the averages over the whole (unaugmented) dataset first
    #   ("precise BN", Wu & Johnson 2021), so features never use stale or untrained statistics;
    # "batch" = per-batch statistics of the extraction batches (train-mode BN, running stats untouched).
    feature_bn: str = "running"
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class Stage2Config:
    """One deep-clustering model per body part, scored for abnormality without labels.

    The engine settings are stage 1's (model, cluster, train) with these replacements.
    """

    k: int = 10                    # clusters per part: normal anatomy varies with the view
    epochs: int = 10
    knn: int = 5                   # abnormality = mean cosine distance to the k nearest training images
    fallback_quantile: float = 0.9 # threshold when the two-mode mixture finds no split
    min_images: int = 20           # parts with fewer images are skipped (with a warning)
    study_score: str = "mean"      # study score from its images: "mean" (MURA's convention) or "max"
    # The abnormality score (see bonecluster.anomaly): "global" (kNN on pooled final features),
    # "patch" (PatchCore-style max over layer3 positions of the nearest-patch distance) or
    # "global+patch" (both, each divided by its training median, averaged).
    score: str = "global+patch"
    pca_dim: int = 64              # PCA-whitening of the global bank, fitted per part (not cluster.pca_dim)
    patch_knn: int = 1             # neighbours per patch (1 = PatchCore)
    patch_bank_size: int = 100000  # at most this many training patches are kept (seeded random subset)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    seed: int = 0


# ----------------------------------------------------------------------------- loading


def load_config(preset: str | None = "cpu", config_file: str | Path | None = None,
                overrides: list[str] | None = None) -> Config:
    """Defaults, then a preset, then a YAML file, then ``key=value`` overrides (last wins)."""
    cfg = Config()
    if preset:
        cfg = merge(cfg, read_yaml(preset_path(preset)))
    if config_file:
        cfg = merge(cfg, read_yaml(Path(config_file)))
    for item in overrides or []:
        cfg = apply_override(cfg, item)
    return cfg


def preset_path(name: str) -> Path:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.exists():
        names = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
        raise ValueError(f"unknown preset {name!r} (available: {names})")
    return path


def read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: cannot read config ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config must be a mapping of sections")
    return data


def merge(cfg: Any, values: dict, where: str = "") -> Any:
    """A copy of dataclass ``cfg`` with ``values`` (nested dicts) applied, types checked."""
    names = {f.name: f for f in dataclasses.fields(cfg)}
    changes = {}
    for key, value in values.items():
        if key not in names:
            raise ValueError(f"unknown config key {where + key!r} (known: {', '.join(names)})")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"config key {where + key!r} is a section; give a mapping")
            changes[key] = merge(current, value, f"{where}{key}.")
        else:
            changes[key] = coerce(value, _field_type(cfg, key), where + key)
    return dataclasses.replace(cfg, **changes)


def apply_override(cfg: Config, item: str) -> Config:
    """``'train.lr=0.1'`` -> a copy of cfg with that field set (value parsed as YAML)."""
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like key=value (e.g. train.lr=0.05)")
    dotted, raw = item.split("=", 1)
    value: Any = yaml.safe_load(raw) if raw.strip() else ""
    for part in reversed(dotted.strip().split(".")):
        value = {part: value}
    return merge(cfg, value)


def _field_type(cfg: Any, name: str) -> Any:
    return typing.get_type_hints(type(cfg))[name]


def coerce(value: Any, kind: Any, key: str) -> Any:
    """Check/convert a YAML value to the field's annotated type (int, float, str, bool, X | None, tuple)."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option, key)
            except ValueError:
                pass
        raise ValueError(f"config {key}={value!r}: expected {kind}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config {key}={value!r}: expected a list")
        inner = typing.get_args(kind)[0] if typing.get_args(kind) else Any
        items = [coerce(v, inner, key) if inner is not Any else v for v in value]
        return tuple(items) if origin is tuple else items
    if kind is Any:
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"config {key}={value!r}: expected true or false")
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"config {key}={value!r}: expected {getattr(kind, '__name__', kind)}")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(_plain(to_dict(cfg)), sort_keys=False)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def config_from_dict(values: dict) -> Config:
    return merge(Config(), values)
