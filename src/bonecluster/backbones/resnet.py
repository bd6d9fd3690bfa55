"""torchvision ResNets (``resnet18`` / ``resnet34`` / ``resnet50``), the default backbones.

Built with random weights and ``fc`` replaced by the identity, so the module returns the globally
average-pooled ``layer4`` output: ``(N, C, H, W) -> (N, 512)`` (18, 34) or ``(N, 2048)`` (50).
ImageNet or file weights are loaded afterwards by :func:`bonecluster.models.load_weights`.
"""

from __future__ import annotations

from typing import Any

import torch
import torchvision
from torch import Tensor, nn

from bonecluster.backbones._base import RESNETS, Backbone, BackboneError, identity_map

# One fixed normalisation for every ResNet, whatever its initial weights: the mean and std of the
# ImageNet RGB statistics averaged over channels (mean (0.485, 0.456, 0.406), std (0.229, 0.224,
# 0.225)). ImageNet-initialised first convs (see adapt_first_conv) then see inputs on the scale
# they were trained for, and a checkpoint reloaded from a file is always fed exactly as it was
# during training, whichever way it was first initialised.
GREY_MEAN = 0.449
GREY_STD = 0.226

_STEM_CHANNELS = 64  # output channels of conv1 in every torchvision ResNet


def make_stem_conv(in_channels: int, small_input: bool) -> nn.Conv2d:
    """ResNet's first conv for ``in_channels`` inputs: ImageNet 7x7/2, or CIFAR-style 3x3/1."""
    if small_input:
        conv = nn.Conv2d(in_channels, _STEM_CHANNELS, kernel_size=3, stride=1, padding=1, bias=False)
    else:
        conv = nn.Conv2d(in_channels, _STEM_CHANNELS, kernel_size=7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # as torchvision does
    return conv


def make_resnet(arch: str, in_channels: int, small_input: bool) -> tuple[nn.Module, int]:
    """A randomly initialised torchvision ResNet whose ``fc`` is the identity, and its feature size.

    With ``small_input`` the 7x7 stride-2 conv and the max-pool are replaced by one 3x3 stride-1
    conv (the CIFAR ResNet stem): on 32-96 px images the ImageNet stem downsamples by 4 before the
    first residual block, leaving e.g. a 16x16 map from a 64 px image and throwing away the fine
    bone edges clustering depends on.
    """
    if arch not in RESNETS:
        raise BackboneError(f"unknown arch {arch!r}; choose one of {RESNETS}")
    backbone = getattr(torchvision.models, arch)(weights=None)
    feature_dim = backbone.fc.in_features
    backbone.fc = nn.Identity()
    backbone.conv1 = make_stem_conv(in_channels, small_input)
    if small_input:
        backbone.maxpool = nn.Identity()
    return backbone, feature_dim


def build(arch: str, *, in_channels: int, small_input: bool, kwargs: dict[str, Any]) -> Backbone:
    if kwargs:
        raise BackboneError(f"model.backbone_kwargs {sorted(kwargs)} apply to timm/ and hf/ backbones; "
                            f"{arch} takes none (leave model.backbone_kwargs empty)")
    module, dim = make_resnet(arch, in_channels, small_input)
    return Backbone(module=module, feature_dim=dim, mean=GREY_MEAN, std=GREY_STD,
                    first_conv="conv1", classifier=("fc",), maps=resnet_maps, cam_layers=resnet_cam_layers)


def resnet_maps(net: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Pooled features, ``layer3``'s map and ``layer4``'s map in one pass."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    mid = net.layer3(net.layer2(net.layer1(x)))
    last = net.layer4(mid)
    return torch.flatten(net.avgpool(last), 1), mid, last


def resnet_cam_layers(net: nn.Module) -> dict:
    return {name: (getattr(net, name), identity_map) for name in ("layer1", "layer2", "layer3", "layer4")}
