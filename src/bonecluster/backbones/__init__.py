"""Backbones by name: the network that turns a normalised grey film into one pooled feature vector.

``model.arch`` names one, as timm names its models:

* ``resnet18`` / ``resnet34`` / ``resnet50``: torchvision ResNets (:mod:`.resnet`), the default;
* ``timm/<name>``: any timm model, e.g. ``timm/convnext_tiny``, ``timm/resnet50.a1_in1k`` or
  ``timm/vit_small_patch14_dinov2.lvd142m`` (:mod:`.timm_backbone`; ``pip install
  'bonecluster[timm]'``);
* ``hf/<repo id or folder>``: a Hugging Face transformers vision encoder, e.g.
  ``hf/microsoft/rad-dino`` (:mod:`.hf_backbone`; ``pip install 'bonecluster[hf]'``).

A builder returns a :class:`Backbone`: the module, ``(N, C, H, W) -> (N, D)`` with C = 1 (grey)
or 2 (after the Sobel front end), plus what the rest of the package needs to know about it: the
grey normalisation, and how a weights file maps onto it (its first conv, its classifier).

**Grey films into RGB models.** Every backbone is built for the film's own channels, and RGB
weights are adapted by summing the first conv (or a ViT's patch embedding) over R, G and B
(:func:`bonecluster.models.adapt_first_conv`): a grey film then gives exactly the response the
RGB network gives to that film repeated on three channels, at a third of the first layer's cost.
The normalisation is the model's own mean and std (timm's ``resolve_data_config``) averaged over
the three channels, which is what repeating the grey channel would have fed the summed kernel.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from bonecluster.backbones._base import RESNETS, Backbone, BackboneError

__all__ = ["RESNETS", "Backbone", "BackboneError", "build_backbone", "check_arch", "default_size", "describe_archs"]


# prefix -> "module:function" of its builder, imported only when used (timm stays optional)
_FAMILIES: dict[str, str] = {
    "timm/": "bonecluster.backbones.timm_backbone:build",
    "hf/": "bonecluster.backbones.hf_backbone:build",
}


def describe_archs() -> str:
    return (f"{', '.join(RESNETS)}, timm/<model name> (any timm model, e.g. timm/convnext_tiny) or "
            "hf/<repo id or folder> (a transformers vision encoder, e.g. hf/microsoft/rad-dino)")


def check_arch(arch: str) -> None:
    """Raise :class:`BackboneError` when ``arch`` names no family (cheap: builds nothing)."""
    if arch in RESNETS:
        return
    for prefix in _FAMILIES:
        if arch.startswith(prefix) and len(arch) > len(prefix):
            return
    raise BackboneError(f"unknown model.arch {arch!r}; choose {describe_archs()}")


def default_size(arch: str) -> int:
    """The square input side ``arch`` was made for (``data.size: 0`` takes it): 224 for the
    torchvision ResNets, the pretrained config's for a timm model (e.g. 518 for DINOv2 ViT-S/14)."""
    check_arch(arch)
    if arch in RESNETS:
        return 224
    if arch.startswith("hf/"):
        from bonecluster.backbones.hf_backbone import default_size as hf_default_size

        return hf_default_size(arch[len("hf/"):])
    from bonecluster.backbones.timm_backbone import default_size as timm_default_size

    return timm_default_size(arch[len("timm/"):])


def build_backbone(arch: str, *, in_channels: int, small_input: bool = False, image_size: int | None = None,
                   weights: str = "none", kwargs: Mapping[str, Any] | None = None,
                   saved: Mapping[str, Any] | None = None) -> Backbone:
    """Build the backbone ``arch`` for ``in_channels`` inputs.

    ``weights`` matters here only to families that fetch hub weights while building (timm's
    ``pretrained``); files, ``imagenet`` and ``none`` are loaded afterwards by
    :func:`bonecluster.models.load_weights`, the same way for every family.
    ``image_size`` is the side of the square films (a ViT's position embedding is sized to it).
    ``kwargs`` go to the family's constructor (``model.backbone_kwargs``, e.g. ``{depth: 2}``).
    ``saved`` is a built backbone's ``Backbone.saved`` (from a run's files): rebuild it from that.
    """
    check_arch(arch)
    kwargs = dict(kwargs or {})
    if arch in RESNETS:
        from bonecluster.backbones.resnet import build as build_resnet

        return build_resnet(arch, in_channels=in_channels, small_input=small_input, kwargs=kwargs)
    if small_input:   # the CIFAR stem is a ResNet's; every other family has its own stem
        raise BackboneError(f"model.small_input applies to the torchvision ResNets, not {arch}; "
                            "set model.small_input=false")
    for prefix, target in _FAMILIES.items():
        if arch.startswith(prefix):
            module_name, func = target.split(":")
            builder = getattr(importlib.import_module(module_name), func)
            extra = {"saved": dict(saved)} if saved else {}
            return builder(arch[len(prefix):], in_channels=in_channels,
                           image_size=image_size, weights=weights, kwargs=kwargs, **extra)
    raise AssertionError("check_arch let an unknown arch through")  # pragma: no cover
