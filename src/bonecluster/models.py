"""Convolutional networks for DeepCluster on grey radiographs.

A :class:`DeepClusterNet` is a torchvision ResNet without its ``fc`` (the *backbone*), an
optional fixed Sobel front end, and a linear *top layer* that maps features to the current
cluster pseudo-labels. Following DeepCluster (Caron et al., ECCV 2018):

* §3.3/§4 ("Implementation details"): the network sees Sobel-filtered grey images rather than
  raw pixels, so clustering cannot latch onto trivial low-level cues such as overall brightness;
* §3.2: the top layer is thrown away and re-initialised after every clustering round, because
  cluster ids from one k-means run have no correspondence with the previous run's.

Callers always pass float images ``(N, 1, H, W)`` in ``[0, 1]``; normalisation happens inside.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

log = logging.getLogger("bonecluster")

ARCHS = ("resnet18", "resnet34", "resnet50")

# One fixed normalisation for every model, whatever its initial weights: the mean and std of the
# ImageNet RGB statistics averaged over channels (mean (0.485, 0.456, 0.406), std (0.229, 0.224,
# 0.225)). ImageNet-initialised first convs (see adapt_first_conv) then see inputs on the scale
# they were trained for, and a checkpoint reloaded from a file is always fed exactly as it was
# during training, whichever way it was first initialised.
GREY_MEAN = 0.449
GREY_STD = 0.226

_STEM_CHANNELS = 64  # output channels of conv1 in every torchvision ResNet


# --------------------------------------------------------------------------- Sobel front end


class SobelFilter(nn.Module):
    """DeepCluster's fixed Sobel front end: ``(N, 1, H, W)`` grey -> ``(N, 2, H, W)`` (d/dx, d/dy).

    DeepCluster (§4, "Implementation details") first converts RGB to grey with a fixed 1x1 conv
    and then applies two fixed Sobel kernels. Our input already is a single grey channel, so the
    grey conversion is the identity and only the Sobel part remains.

    Channel 0 responds to horizontal intensity changes (vertical edges), channel 1 to vertical
    changes (horizontal edges). The kernels are a buffer, not parameters, so no optimiser can
    move them. Unlike the original (zero padding), the border is replicate-padded: inputs are
    normalised first, so zero padding would be mid-grey and would draw a spurious edge around
    every image.
    """

    def __init__(self) -> None:
        super().__init__()
        smooth = torch.tensor([1.0, 2.0, 1.0])
        derivative = torch.tensor([1.0, 0.0, -1.0])
        kernel_x = torch.outer(smooth, derivative)  # rows smooth, columns differentiate
        kernel_y = torch.outer(derivative, smooth)
        kernels = torch.stack([kernel_x, kernel_y]).unsqueeze(1)  # (2, 1, 3, 3)
        # Not persistent: a constant of the architecture, so it need not travel in state dicts.
        self.register_buffer("kernels", kernels, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``(N, 1, H, W)`` -> ``(N, 2, H, W)``."""
        if x.shape[1] != 1:
            raise ValueError(f"SobelFilter expects one grey channel, got input of shape {tuple(x.shape)}")
        padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
        return F.conv2d(padded, self.kernels.to(dtype=x.dtype))


# --------------------------------------------------------------------------- first-conv adaptation


def adapt_first_conv(weight: Tensor, in_channels: int) -> Tensor:
    """Turn an RGB first-conv kernel ``(O, 3, kh, kw)`` into one for ``in_channels`` inputs.

    The RGB kernels are summed over the input dimension: a grey image replicated into R, G and B
    then produces exactly the same response through the summed single-channel kernel. For more
    than one input channel (Sobel's 2) the summed kernel is copied to every channel and divided
    by ``in_channels``, so that a signal repeated on all channels still gives that response;
    the Sobel channels carry different signals, so this is only a sensible starting point.

    Returns a new tensor ``(O, in_channels, kh, kw)``.
    """
    if weight.ndim != 4 or weight.shape[1] != 3:
        raise ValueError(f"expected an RGB conv weight of shape (O, 3, kh, kw), got {tuple(weight.shape)}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    summed = weight.sum(dim=1, keepdim=True)
    return summed.repeat(1, in_channels, 1, 1) / in_channels


# --------------------------------------------------------------------------- the network


def _make_stem_conv(in_channels: int, small_input: bool) -> nn.Conv2d:
    """ResNet's first conv for ``in_channels`` inputs: ImageNet 7x7/2, or CIFAR-style 3x3/1."""
    if small_input:
        conv = nn.Conv2d(in_channels, _STEM_CHANNELS, kernel_size=3, stride=1, padding=1, bias=False)
    else:
        conv = nn.Conv2d(in_channels, _STEM_CHANNELS, kernel_size=7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # as torchvision does
    return conv


def _make_backbone(arch: str, in_channels: int, small_input: bool) -> tuple[nn.Module, int]:
    """A randomly initialised torchvision ResNet whose ``fc`` is the identity, and its feature size.

    With ``small_input`` the 7x7 stride-2 conv and the max-pool are replaced by one 3x3 stride-1
    conv (the CIFAR ResNet stem): on 32-96 px images the ImageNet stem downsamples by 4 before the
    first residual block, leaving e.g. a 16x16 map from a 64 px image and throwing away the fine
    bone edges clustering depends on.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")
    backbone = getattr(torchvision.models, arch)(weights=None)
    feature_dim = backbone.fc.in_features
    backbone.fc = nn.Identity()
    backbone.conv1 = _make_stem_conv(in_channels, small_input)
    if small_input:
        backbone.maxpool = nn.Identity()
    return backbone, feature_dim


def _new_top_layer(feature_dim: int, num_clusters: int, generator: torch.Generator | None) -> nn.Linear:
    """``Linear(feature_dim, num_clusters)`` with DeepCluster's init: N(0, 0.01) weights, zero bias.

    Weights are drawn on the generator's device (the CPU global RNG when ``generator`` is None),
    so the result depends only on the seed, not on where the model lives.
    """
    if num_clusters < 1:
        raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")
    # skip_init: nn.Linear's own init would also draw from the global RNG, shifting every later
    # draw even when an explicit generator is given.
    layer = torch.nn.utils.skip_init(nn.Linear, feature_dim, num_clusters)
    rng_device = generator.device if generator is not None else torch.device("cpu")
    weight = torch.empty(num_clusters, feature_dim, device=rng_device).normal_(0.0, 0.01, generator=generator)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.zero_()
    return layer


class DeepClusterNet(nn.Module):
    """ResNet backbone + optional Sobel + a linear top layer over the current clusters.

    Args:
        arch: one of :data:`ARCHS`.
        sobel: put the fixed :class:`SobelFilter` in front (first conv then has 2 inputs).
        num_clusters: ``k``, the size of the top layer.
        weights: ``"none"`` (random init), ``"imagenet"`` (torchvision's IMAGENET1K_V1, downloaded
            on first use, first conv adapted to grey with :func:`adapt_first_conv`), or the path of
            a state dict saved with ``torch.save`` (a DeepClusterNet's or a torchvision ResNet's).
        small_input: use the CIFAR-style stem for 32-96 px images (see :func:`_make_backbone`).
        channels_last: keep the convolutions' weights and activations in NHWC memory order. Same
            numbers up to float rounding; faster on CPUs with oneDNN (0.75x a SimCLR step on 2 cores),
            and the layout tensor cores prefer (``benchmarks/bench_memory_format.py`` measures it
            on your machine). Kept in :meth:`hparams`, so a run reloads in its own layout.

    Shapes: ``features``: ``(N, 1, H, W)`` in ``[0, 1]`` -> ``(N, feature_dim)``;
    ``forward``: -> logits ``(N, num_clusters)``.
    """

    def __init__(
        self,
        arch: str = "resnet18",
        sobel: bool = False,
        num_clusters: int = 7,
        weights: str | Path = "none",
        small_input: bool = False,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        self.arch = arch
        self.sobel_enabled = bool(sobel)
        self.small_input = bool(small_input)
        self.sobel = SobelFilter() if sobel else None
        self.backbone, self.feature_dim = _make_backbone(arch, self.in_channels, self.small_input)
        self.top_layer = _new_top_layer(self.feature_dim, num_clusters, generator=None)
        self.register_buffer("input_mean", torch.tensor(GREY_MEAN), persistent=False)
        self.register_buffer("input_std", torch.tensor(GREY_STD), persistent=False)
        load_weights(self, weights)
        self.channels_last = bool(channels_last)
        if self.channels_last:   # after loading: copy_ into a parameter keeps its layout from here on
            self.backbone.to(memory_format=torch.channels_last)

    @property
    def in_channels(self) -> int:
        """Input channels of the first conv: 2 after Sobel, else 1."""
        return 2 if self.sobel_enabled else 1

    @property
    def num_clusters(self) -> int:
        return self.top_layer.out_features

    def hparams(self) -> dict[str, Any]:
        """The constructor arguments needed to rebuild this architecture (for checkpoints)."""
        return {
            "arch": self.arch,
            "sobel": self.sobel_enabled,
            "num_clusters": self.num_clusters,
            "small_input": self.small_input,
            "channels_last": self.channels_last,   # a layout, not an architecture: kept so a run reloads as trained
        }

    def preprocess(self, x: Tensor) -> Tensor:
        """``(N, 1, H, W)`` in ``[0, 1]`` -> normalised (and Sobel-filtered) ``(N, in_channels, H, W)``,
        in the backbone's memory layout (every path into the backbone starts here)."""
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"expected grey images of shape (N, 1, H, W), got {tuple(x.shape)}")
        x = (x - self.input_mean.to(x.dtype)) / self.input_std.to(x.dtype)
        if self.sobel is not None:
            x = self.sobel(x)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def features(self, x: Tensor) -> Tensor:
        """Globally average-pooled backbone features: ``(N, 1, H, W)`` -> ``(N, feature_dim)``."""
        return self.backbone(self.preprocess(x))

    def forward(self, x: Tensor) -> Tensor:
        """Logits over the current pseudo-labels: ``(N, 1, H, W)`` -> ``(N, num_clusters)``."""
        return self.top_layer(self.features(x))

    def reset_top_layer(self, num_clusters: int, generator: torch.Generator | None = None) -> None:
        """Replace the top layer by a fresh ``Linear(feature_dim, num_clusters)`` (DeepCluster §3.2).

        Init is N(0, 0.01) weights and zero bias, drawn from ``generator`` or the global CPU RNG,
        so it is reproducible from the seed alone. The new layer keeps the old one's device and
        dtype. Any optimiser holding the old layer's parameters must be rebuilt by the caller.
        """
        old = self.top_layer.weight
        layer = _new_top_layer(self.feature_dim, num_clusters, generator)
        self.top_layer = layer.to(device=old.device, dtype=old.dtype)


# --------------------------------------------------------------------------- weights


def load_weights(model: DeepClusterNet, weights: str | Path | None) -> None:
    """Initialise ``model`` from ``"none"``, ``"imagenet"`` or a state-dict file (see DeepClusterNet)."""
    if weights is None or str(weights).lower() == "none":
        return
    if str(weights).lower() == "imagenet":
        state = _download_imagenet_state_dict(model.arch)
        _load_backbone_state(model, state, source=f"torchvision {model.arch} IMAGENET1K_V1")
        return
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file {str(path)!r} not found (weights must be 'none', 'imagenet' or a state-dict file)"
        )
    state = _read_state_dict(path)
    _load_backbone_state(model, state, source=f"weights file {str(path)!r}")


def _download_imagenet_state_dict(arch: str) -> dict[str, Tensor]:
    """torchvision's ImageNet state dict for ``arch`` (downloads once into the torch hub cache).

    Kept separate so tests can replace it; it is the only place that touches the network.
    """
    weights_enum = torchvision.models.get_model_weights(arch)
    return weights_enum.IMAGENET1K_V1.get_state_dict(progress=True)


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """Load a state dict, unwrapping ``{"model": ...}`` / ``{"state_dict": ...}`` checkpoints."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle / zip errors carry no file name
        raise ValueError(f"could not read weights file {str(path)!r}: {err}") from err
    for key in ("model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"weights file {str(path)!r} does not hold a state dict of tensors")
    return dict(obj)


def _strip_prefix(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def _split_state(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split a DeepClusterNet or torchvision ResNet state dict into (backbone, top layer) parts.

    ``fc.*`` (torchvision's ImageNet classifier) is dropped: it never fits our clusters.
    """
    for wrapper in ("module.", "_orig_mod."):  # saved from DataParallel / DDP, torch.compile
        if state and all(k.startswith(wrapper) for k in state):
            state = _strip_prefix(state, wrapper)
    backbone: dict[str, Tensor] = {}
    top: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith("top_layer."):
            top[key[len("top_layer."):]] = value
        elif key.startswith("backbone."):
            backbone[key[len("backbone."):]] = value
        elif not key.startswith("fc."):
            backbone[key] = value
    return backbone, top


def _adapt_rgb_stem(model: DeepClusterNet, backbone_state: dict[str, Tensor], source: str) -> set[str]:
    """Make an RGB ``conv1.weight`` fit the model's grey / Sobel stem, in place.

    The 7x7 kernel is summed to grey (:func:`adapt_first_conv`). A CIFAR-style 3x3 stem has no
    counterpart in ImageNet weights, so it keeps its random init while the rest loads; the
    returned set names the keys dropped for that reason.
    """
    weight = backbone_state.get("conv1.weight")
    if weight is None or weight.ndim != 4 or weight.shape[1] != 3 or model.in_channels == 3:
        return set()
    expected = model.backbone.conv1.weight.shape
    if weight.shape[2:] != expected[2:]:
        log.warning(
            "%s: RGB conv1 %s does not fit the small-input stem %s; conv1 keeps its random init",
            source, tuple(weight.shape), tuple(expected),
        )
        del backbone_state["conv1.weight"]
        return {"conv1.weight"}
    backbone_state["conv1.weight"] = adapt_first_conv(weight, model.in_channels)
    return set()


def _mismatch_report(expected: Mapping[str, Tensor], given: Mapping[str, Tensor], skip: set[str]) -> str:
    """Describe missing / unexpected / wrongly shaped keys; '' when the state fits."""
    missing = sorted(set(expected) - set(given) - skip)
    unexpected = sorted(set(given) - set(expected))
    wrong_shape = sorted(
        f"{k}: file {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(given)
        if given[k].shape != expected[k].shape
    )
    parts = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong_shape)):
        if items:
            shown = ", ".join(items[:5]) + (f", ... ({len(items)} in all)" if len(items) > 5 else "")
            parts.append(f"{label}: {shown}")
    return "; ".join(parts)


def _load_backbone_state(model: DeepClusterNet, state: Mapping[str, Tensor], source: str) -> None:
    """Load a backbone strictly (clear error naming ``source``); load the top layer only if it fits."""
    backbone_state, top_state = _split_state(state)
    skip = _adapt_rgb_stem(model, backbone_state, source)
    expected = model.backbone.state_dict()
    report = _mismatch_report(expected, backbone_state, skip)
    if report:
        raise ValueError(
            f"{source} does not match DeepClusterNet(arch={model.arch!r}, sobel={model.sobel_enabled}, "
            f"small_input={model.small_input}): {report}"
        )
    model.backbone.load_state_dict(backbone_state, strict=not skip)
    _maybe_load_top_layer(model, top_state)


def _maybe_load_top_layer(model: DeepClusterNet, top_state: Mapping[str, Tensor]) -> None:
    """Restore the top layer when its shape matches; otherwise keep the fresh one (k differs)."""
    current = model.top_layer.state_dict()
    fits = set(top_state) == set(current) and all(top_state[k].shape == current[k].shape for k in current)
    if fits:
        model.top_layer.load_state_dict(top_state)


# --------------------------------------------------------------------------- helpers


def build_model(cfg: Any = None, **overrides: Any) -> DeepClusterNet:
    """Build a :class:`DeepClusterNet` from a mapping or an object with matching attributes.

    Recognised fields: ``arch``, ``sobel``, ``num_clusters``, ``weights``, ``small_input``,
    ``channels_last``;
    others are ignored, missing ones take the constructor defaults, and ``overrides`` win.
    """
    fields = ("arch", "sobel", "num_clusters", "weights", "small_input", "channels_last")
    kwargs: dict[str, Any] = {}
    for name in fields:
        if isinstance(cfg, Mapping) and name in cfg:
            kwargs[name] = cfg[name]
        elif cfg is not None and not isinstance(cfg, Mapping) and hasattr(cfg, name):
            kwargs[name] = getattr(cfg, name)
    unknown = set(overrides) - set(fields)
    if unknown:
        raise TypeError(f"build_model got unknown arguments {sorted(unknown)}; expected some of {fields}")
    kwargs.update(overrides)
    return DeepClusterNet(**kwargs)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (only those with ``requires_grad`` when ``trainable_only``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
