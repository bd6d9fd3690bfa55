"""Any timm model as a backbone: ``model.arch=timm/<name>`` (``pip install 'bonecluster[timm]'``).

The model is built with ``num_classes=0``, so its forward returns timm's pooled pre-logits
features: the CLS token (or mean of the patch tokens, as the model's ``global_pool`` says) for a
ViT, the globally pooled last map for a CNN. ``in_chans`` is the film's channel count (1, or 2
after Sobel).

Weights (``model.weights``):

* ``none``: timm's random init;
* ``pretrained``: the hub's weights for that name, fetched by timm / huggingface_hub into their
  usual cache on first use (``HF_HOME``); with ``HF_HUB_OFFLINE=1`` only that cache is read.
  timm adapts the RGB first conv to ``in_chans`` itself (summed for one channel);
* a file or a saved folder: loaded by :func:`bonecluster.models.load_weights`, through the
  model's own timm converter (``checkpoint_filter_fn``: e.g. a ViT's position embedding resampled
  to ``data.size``), the first conv summed to grey, the classifier dropped.

A ViT is built for square films of ``data.size`` (``img_size``), which must be a multiple of its
patch size. Extra constructor arguments come from ``model.backbone_kwargs`` (e.g. ``{depth: 2}``
for a tiny test ViT, ``{drop_path_rate: 0.1}``).
"""

from __future__ import annotations

import difflib
import functools
import sys
from typing import Any

import numpy as np
from torch import nn

from bonecluster.backbones._base import (Backbone, BackboneError, check_patch_multiple, hub_failure, identity_map,
                                        nhwc_map, tokens_to_map)


# constructor arguments bonecluster sets itself
_RESERVED = {"num_classes", "in_chans", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "img_size"}


def _timm(name: str):
    try:
        import timm
    except ImportError as err:
        raise BackboneError(f"model.arch=timm/{name} needs the timm package: pip install 'bonecluster[timm]'") from err
    return timm


def _unknown(timm, name: str) -> BackboneError:
    base = name.split(".", 1)[0]
    close = difflib.get_close_matches(base, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; close names: {', '.join('timm/' + c for c in close)}" if close else ""
    return BackboneError(f"timm has no model {name!r} (model.arch=timm/{name}){hint}. "
                         "List them with: python -c \"import timm; print(timm.list_models('*vit*'))\"")


def default_size(name: str) -> int:
    """The input side of ``name``'s pretrained config (no model is built)."""
    timm = _timm(name)
    if not timm.is_model(name):
        raise _unknown(timm, name)
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError as err:     # e.g. an unknown pretrained tag
        raise BackboneError(f"model.arch=timm/{name}: {err}") from err
    size = getattr(cfg, "input_size", None) or (3, 224, 224)
    return int(size[-1])


def _create(timm, name: str, image_size: int | None, **kwargs: Any) -> nn.Module:
    """``timm.create_model``, sized for ``image_size`` films when the model takes an ``img_size``."""
    if image_size:
        try:
            return timm.create_model(name, img_size=image_size, **kwargs)
        except TypeError as err:      # CNNs take any size and have no img_size argument
            if "img_size" not in str(err):
                raise
    return timm.create_model(name, **kwargs)


def _patch_size(model: nn.Module) -> int | None:
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is None:
        return None
    return int(patch[0]) if isinstance(patch, (tuple, list)) else int(patch)


def _pretrained(timm, name: str, image_size: int | None, **kwargs: Any) -> nn.Module:
    """The model with the hub's weights, or one clear line saying why they are not here."""
    try:
        return _create(timm, name, image_size, pretrained=True, **kwargs)
    except (OSError, RuntimeError) as err:   # hub unreachable / offline with an empty cache / no weights
        fetch = f"python -c \"import timm; timm.create_model('{name}', pretrained=True)\""
        raise hub_failure(f"timm/{name}", "pretrained weights", err, fetch,
                          "give a file with model.weights=FILE") from err


def build(name: str, *, in_channels: int, image_size: int | None, weights: str,
          kwargs: dict[str, Any]) -> Backbone:
    """A timm model for ``in_channels``-channel films of side ``image_size``; see the module docstring."""
    timm = _timm(name)
    if not timm.is_model(name):
        raise _unknown(timm, name)
    reserved = sorted(set(kwargs) & _RESERVED)
    if reserved:
        raise BackboneError(f"model.backbone_kwargs may not set {reserved} (model.arch=timm/{name}): bonecluster "
                            "sets them (no classifier, the film's channels, weights from model.weights)")
    args = dict(num_classes=0, in_chans=in_channels, **kwargs)
    try:     # random init first: cheap, and checks the size before any download
        model = _create(timm, name, image_size, pretrained=False, **args)
    except (TypeError, ValueError, RuntimeError, AssertionError, KeyError) as err:
        given = f" with model.backbone_kwargs={kwargs}" if kwargs else ""
        raise BackboneError(f"model.arch=timm/{name} could not be built{given}: {type(err).__name__}: {err}") from err
    patch = _patch_size(model)
    check_patch_multiple(f"timm/{name}", patch, image_size)
    fetched = str(weights).lower() == "pretrained"
    if fetched:
        model = _pretrained(timm, name, image_size, **args)
    data = timm.data.resolve_data_config({}, model=model)
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    classifier = cfg.get("classifier") or ()
    converter = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    return Backbone(
        module=model,
        feature_dim=int(getattr(model, "head_hidden_size", None) or model.num_features),
        mean=float(np.mean(data["mean"])), std=float(np.mean(data["std"])),
        first_conv=cfg.get("first_conv") if isinstance(cfg.get("first_conv"), str) else "",
        classifier=(classifier,) if isinstance(classifier, str) else tuple(classifier),
        filter_state=converter,   # timm's checkpoint_filter_fn(state_dict, model)
        maps=timm_maps,
        cam_layers=timm_cam_layers,
        weights_loaded=fetched,
    )


def timm_maps(net: nn.Module, x) -> tuple:
    """Pooled pre-logits with the last two stages' maps (timm's ``forward_intermediates``: a ViT's
    patch tokens come on their grid)."""
    final, (mid, last) = net.forward_intermediates(x, indices=2)
    return net.forward_head(final, pre_logits=True), mid, last


def timm_cam_layers(net: nn.Module) -> dict:
    """The stages timm lists in ``feature_info``, the stem left out; for a ViT pooled from its CLS
    token, the last block too: its patch tokens feed nothing after it (their gradient is zero)."""
    prefix = getattr(net, "num_prefix_tokens", None)
    channels_last_maps = getattr(net, "output_fmt", "NCHW") == "NHWC"   # Swin, MambaOut... stages
    layers = {}
    for info in getattr(net, "feature_info", []):
        if info["reduction"] <= 2:    # the stem: too early to say anything about anatomy
            continue
        if prefix is not None:
            to_map = functools.partial(tokens_to_map, reduction=int(info["reduction"]))
        else:
            to_map = nhwc_map if channels_last_maps else identity_map
        layers[info["module"]] = (net.get_submodule(info["module"]), to_map)
    if prefix and getattr(net, "global_pool", "token") == "token" and layers:
        layers.popitem()
    return layers
