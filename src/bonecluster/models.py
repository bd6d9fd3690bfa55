"""Convolutional networks for DeepCluster on grey radiographs.

A :class:`DeepClusterNet` is a backbone that pools a film to one feature vector (a torchvision
ResNet without its ``fc`` by default, or any timm model: :mod:`bonecluster.backbones`), an
optional fixed Sobel front end, and a linear *top layer* that maps features to the current
cluster pseudo-labels. Following DeepCluster (Caron et al., ECCV 2018):

* §3.3/§4 ("Implementation details"): the network sees Sobel-filtered grey images rather than
  raw pixels, so clustering cannot latch onto trivial low-level cues such as overall brightness;
* §3.2: the top layer is thrown away and re-initialised after every clustering round, because
  cluster ids from one k-means run have no correspondence with the previous run's.

Callers always pass float images ``(N, 1, H, W)`` in ``[0, 1]``; normalisation happens inside.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from bonecluster.backbones import RESNETS, Backbone, BackboneError, build_backbone
from bonecluster.backbones._base import MapFn, adapt_first_conv  # noqa: F401  (adapt_first_conv re-exported)
from bonecluster.backbones.resnet import GREY_MEAN, GREY_STD  # noqa: F401  (re-exported)

log = logging.getLogger("bonecluster")

ARCHS = RESNETS  # the torchvision names; model.arch also takes timm/<name> and hf/<repo> (bonecluster.backbones)

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


# --------------------------------------------------------------------------- the network


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
    """Backbone + optional Sobel + a linear top layer over the current clusters.

    Args:
        arch: one of :data:`ARCHS`, or ``timm/<name>`` (:mod:`bonecluster.backbones`).
        sobel: put the fixed :class:`SobelFilter` in front (first conv then has 2 inputs).
        num_clusters: ``k``, the size of the top layer.
        weights: ``"none"`` (random init); ``"imagenet"`` (ResNets: torchvision's IMAGENET1K_V1,
            downloaded on first use, first conv adapted to grey with :func:`adapt_first_conv`);
            ``"pretrained"`` (the hub's weights for a ``timm/`` name; ``imagenet`` for a ResNet);
            or a weights file (``.pt`` / ``.pth`` / ``.safetensors``) or a folder holding one: a
            DeepClusterNet's state dict, or the bare backbone's (a torchvision or timm model's).
        small_input: use the CIFAR-style stem for 32-96 px images (ResNets only; see
            :func:`bonecluster.backbones.resnet.make_resnet`).
        image_size: the side of the square films, for backbones sized to it (a ViT's position
            embedding); ignored by CNNs.
        backbone_kwargs: extra constructor arguments for a ``timm/`` backbone (config fields for ``hf/``).
        backbone_saved: a built backbone's record from a run's files (:attr:`Backbone.saved`),
            to rebuild it without reading the hub.
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
        image_size: int | None = None,
        backbone_kwargs: Mapping[str, Any] | None = None,
        backbone_saved: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.arch = arch
        self.sobel_enabled = bool(sobel)
        self.small_input = bool(small_input)
        self.image_size = int(image_size) if image_size else None
        self.backbone_kwargs = dict(backbone_kwargs or {})
        self.sobel = SobelFilter() if sobel else None
        spec = build_backbone(arch, in_channels=self.in_channels, small_input=self.small_input,
                              image_size=self.image_size, weights=str(weights), kwargs=self.backbone_kwargs,
                              saved=backbone_saved)
        self.backbone, self.feature_dim = spec.module, spec.feature_dim
        # what loading a weights file needs (first conv, classifier, converter), without a second
        # reference to the module (plain attribute, not a submodule)
        self.backbone_spec = dataclasses.replace(spec, module=None)
        self.top_layer = _new_top_layer(self.feature_dim, num_clusters, generator=None)
        self.register_buffer("input_mean", torch.tensor(spec.mean), persistent=False)
        self.register_buffer("input_std", torch.tensor(spec.std), persistent=False)
        load_weights(self, weights)
        self.channels_last = bool(channels_last)
        if self.channels_last:   # after loading: copy_ into a parameter keeps its layout from here on
            self.backbone.to(memory_format=torch.channels_last)

    frozen = False   # set by freeze_backbone

    def freeze_backbone(self) -> None:
        """Train the heads only: no gradient reaches the backbone, and its BatchNorm layers keep
        their loaded statistics (the backbone stays in eval mode whatever ``train()`` says)."""
        self.frozen = True
        self.backbone.requires_grad_(False)
        self.backbone.eval()

    def train(self, mode: bool = True) -> "DeepClusterNet":
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

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
            # only where they matter, so that a ResNet run stays readable by earlier versions
            **({"image_size": self.image_size} if self.arch not in RESNETS and self.image_size else {}),
            **({"backbone_kwargs": dict(self.backbone_kwargs)} if self.backbone_kwargs else {}),
            # a transformers model's config and normalisation: rebuilt without the hub
            **({"backbone_saved": self.backbone_spec.saved} if self.backbone_spec.saved else {}),
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

    def pooled_and_maps(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The pooled features with the last two feature maps they came from, in one pass.

        ``(N, 1, H, W)`` in ``[0, 1]`` -> ``pooled (N, D)`` (what :meth:`features` returns),
        ``mid (N, c, h', w')`` (the next-to-last stage: a ResNet's ``layer3``) and
        ``last (N, C, h, w)`` (the last stage: ``layer4``). For a ViT both maps are patch tokens
        of the last two blocks on their patch grid (timm's ``forward_intermediates``).
        Stage 2's patch score reads ``mid``; Grad-CAM reads either.
        """
        return self.backbone_spec.maps(self.backbone, self.preprocess(x))

    def cam_layers(self) -> dict[str, tuple[nn.Module, MapFn]]:
        """The layers Grad-CAM may explain, shallow to deep: ``name -> (module, to_map)``.

        ``to_map(output, (H, W))`` turns the module's output for ``(H, W)`` films into an
        ``(N, C, h, w)`` map: the identity for a CNN stage; for a ViT block, its patch tokens
        (prefix tokens such as CLS dropped) on the patch grid. ResNets: ``layer1`` .. ``layer4``;
        timm models: the stages timm lists in ``feature_info`` (the stem left out; for a ViT
        pooled from its CLS token, the last block too, as its patch tokens feed nothing); hf/
        models: a ViT's blocks (the same way) or a CNN's encoder stages.
        """
        return self.backbone_spec.cam_layers(self.backbone)

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
    """Initialise ``model`` from ``"none"``, ``"imagenet"``, ``"pretrained"`` or a weights file or
    folder (see :class:`DeepClusterNet`). Errors are one line naming the model and what to do."""
    name = "none" if weights is None else str(weights)
    if name.lower() == "none":
        return
    spec: Backbone = model.backbone_spec
    if name.lower() in ("imagenet", "pretrained"):
        if spec.weights_loaded:           # the builder already fetched the hub's weights
            return
        if model.arch not in RESNETS:
            raise BackboneError(f"model.weights={name} is torchvision's ImageNet, for {', '.join(RESNETS)}; for "
                                f"model.arch={model.arch} use model.weights=pretrained (the hub's weights for it)")
        state = _download_imagenet_state_dict(model.arch)
        _load_backbone_state(model, state, source=f"torchvision {model.arch} IMAGENET1K_V1")
        return
    path = weights_file(Path(name).expanduser(), model.arch)
    state = _read_state_dict(path)
    _load_backbone_state(model, state, source=f"weights file {str(path)!r}")


# in a saved folder, the first of these that is there (Hugging Face's and timm's own names)
_FOLDER_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt", "model.pth")
_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def weights_file(path: Path, arch: str) -> Path:
    """The file behind ``model.weights=PATH``: the file itself, or the weights inside a saved folder."""
    if path.is_file():
        return path
    if path.is_dir():
        for name in _FOLDER_FILES:
            if (path / name).is_file():
                return path / name
        found = sorted(p for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file())
        if len(found) == 1:
            return found[0]
        what = "no weights file" if not found else f"{len(found)} weights files ({', '.join(p.name for p in found[:4])})"
        raise FileNotFoundError(f"weights folder {str(path)!r} holds {what}; give the file itself as model.weights")
    raise FileNotFoundError(
        f"weights file {str(path)!r} not found (model.arch={arch}; model.weights must be 'none', 'pretrained', "
        "'imagenet', or a .pt / .safetensors file or a folder holding one)"
    )


def _download_imagenet_state_dict(arch: str) -> dict[str, Tensor]:
    """torchvision's ImageNet state dict for ``arch`` (downloads once into the torch hub cache).

    Kept separate so tests can replace it; it is the only place that touches the network.
    """
    weights_enum = torchvision.models.get_model_weights(arch)
    return weights_enum.IMAGENET1K_V1.get_state_dict(progress=True)


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """Load a state dict (``torch.save`` or ``.safetensors``), unwrapping ``{"model": ...}`` /
    ``{"state_dict": ...}`` checkpoints."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file   # comes with timm / huggingface_hub

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except ImportError as err:
        raise ValueError(f"weights file {str(path)!r} is a .safetensors file: pip install safetensors") from err
    except Exception as err:  # pickle / zip / header errors carry no file name
        raise ValueError(f"could not read weights file {str(path)!r}: {err}") from err
    for key in ("model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"weights file {str(path)!r} does not hold a state dict of tensors")
    return dict(obj)


def _strip_prefix(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def _prefixes(names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(f"{n}." for n in names if n)


def _split_state(state: Mapping[str, Tensor], classifier: tuple[str, ...] = ("fc",)
                 ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split a DeepClusterNet's or a bare backbone's state dict into (backbone, top layer) parts.

    Keys under ``classifier`` (e.g. torchvision's ``fc``, a timm ViT's ``head``: an ImageNet
    classifier) are dropped: it never fits our clusters.
    """
    dropped = _prefixes(classifier)
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
        elif not (dropped and key.startswith(dropped)):
            backbone[key] = value
    return backbone, top


def _adapt_rgb_stem(model: DeepClusterNet, backbone_state: dict[str, Tensor], source: str) -> set[str]:
    """Make an RGB first conv (or ViT patch embedding) fit the model's grey / Sobel input, in place.

    The kernel is summed to grey (:func:`adapt_first_conv`). A ResNet's CIFAR-style 3x3 stem has
    no counterpart in ImageNet weights, so it keeps its random init while the rest loads; the
    returned set names the keys dropped for that reason.
    """
    first = model.backbone_spec.first_conv
    key = f"{first}.weight"
    weight = backbone_state.get(key)
    if not first or weight is None or weight.ndim != 4 or weight.shape[1] != 3 or model.in_channels == 3:
        return set()
    target = model.backbone.state_dict().get(key)
    if target is None:   # the named layer holds no such weight: the mismatch report will say what is off
        return set()
    expected = target.shape
    if weight.shape[2:] != expected[2:] and model.arch in RESNETS:
        log.warning(
            "%s: RGB %s %s does not fit the small-input stem %s; it keeps its random init",
            source, first, tuple(weight.shape), tuple(expected),
        )
        del backbone_state[key]
        return {key}
    backbone_state[key] = adapt_first_conv(weight, model.in_channels)
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
    spec: Backbone = model.backbone_spec
    backbone_state, top_state = _split_state(state, spec.classifier)
    if spec.filter_state is not None:   # the family's own converter (timm: resample a ViT's position embedding)
        try:
            converted = spec.filter_state(backbone_state, model.backbone)
            dropped = _prefixes(spec.classifier)   # a converter may have renamed the classifier (head -> head.fc)
            backbone_state = {k: v for k, v in converted.items() if not (dropped and k.startswith(dropped))}
        except Exception as err:   # a foreign layout the converter cannot read: the check below names the keys
            log.debug("%s: %s's converter failed (%s); loading the state as it is", source, model.arch, err)
    skip = _adapt_rgb_stem(model, backbone_state, source)
    expected = model.backbone.state_dict()
    report = _mismatch_report(expected, backbone_state, skip)
    if report:
        raise ValueError(
            f"{source} does not match DeepClusterNet(arch={model.arch!r}, sobel={model.sobel_enabled}, "
            f"small_input={model.small_input}): {report}. Was it saved from another model.arch?"
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
    ``channels_last``, ``image_size``, ``backbone_kwargs``;
    others are ignored, missing ones take the constructor defaults, and ``overrides`` win.
    """
    fields = ("arch", "sobel", "num_clusters", "weights", "small_input", "channels_last", "image_size",
              "backbone_kwargs", "backbone_saved")
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


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm layer of ``model``."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextmanager
def batchnorm_momentum(model: nn.Module, momentum: float | None) -> Iterator[None]:
    """Every BatchNorm of ``model`` updates its running statistics with ``momentum`` inside the
    block (None: a cumulative average, as precise BN wants; 0: not at all, the layers still
    normalising with each batch's own statistics in train mode), and its own momentum after it."""
    layers = batch_norms(model)
    saved = [bn.momentum for bn in layers]
    try:
        for bn in layers:
            bn.momentum = momentum
        yield
    finally:
        for bn, value in zip(layers, saved):
            bn.momentum = value
