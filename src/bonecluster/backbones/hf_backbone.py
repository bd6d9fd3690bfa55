"""A Hugging Face ``transformers`` vision encoder as a backbone: ``model.arch=hf/<repo-id>``, e.g.
``hf/microsoft/rad-dino`` or ``hf/facebook/dinov2-small``, or ``hf/<folder>`` written by
``save_pretrained`` (``pip install 'bonecluster[hf]'``).

The encoder is ``AutoModel`` of the repo's config (no task head; a ViT without its learned
pooler), in float32. Its pooled output is the CLS token after the final norm for a ViT (DINOv2's
``pooler_output``, or the first token of the last hidden state), a CNN's pooled last map. An
encoder that keeps its tokens at several resolutions (Swin) is refused for now. The position
embedding stays the checkpoint's and is interpolated to ``data.size``.

Weights (``model.weights``):

* ``none``: the config's architecture with random weights (the config itself is read from the
  hub once, or from the cache or a local folder);
* ``pretrained``: ``AutoModel.from_pretrained``, fetched by huggingface_hub into its cache
  (``HF_HOME``) on first use; with ``HF_HUB_OFFLINE=1`` only the cache is read;
* a file or folder: loaded by :func:`bonecluster.models.load_weights` (a bonecluster run's, or the
  bare encoder's state dict as ``save_pretrained`` writes it).

Grey films: the first convolution (a ViT's patch embedding) takes the film's channels; RGB
weights are summed over R, G and B (:func:`~bonecluster.backbones._base.adapt_first_conv`), as
for every family. The normalisation is the repo's image processor's mean and std averaged over
RGB (ImageNet's when the repo has no image processor). ``model.backbone_kwargs`` override config
fields, e.g. ``{num_hidden_layers: 2}`` (an unknown field is an error).
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from bonecluster.backbones._base import (Backbone, BackboneError, adapt_first_conv, check_patch_multiple, hub_failure,
                                        identity_map, tokens_to_map)

log = logging.getLogger("bonecluster")

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _transformers(repo: str):
    try:
        import transformers
    except ImportError as err:
        raise BackboneError(f"model.arch=hf/{repo} needs the transformers package: pip install 'bonecluster[hf]'") from err
    return transformers


def _hub_error(repo: str, what: str, err: Exception) -> BackboneError:
    return hub_failure(f"hf/{repo}", what, err, f"hf download {repo}",
                       "give a folder written by save_pretrained as model.arch=hf/FOLDER")


# config fields bonecluster sets itself (the film's channels; the position embedding stays the
# checkpoint's and is interpolated to data.size)
_RESERVED = {"num_channels", "image_size"}


def read_config(repo: str, kwargs: dict[str, Any] | None = None):
    """The repo's model config, with ``kwargs`` overriding its fields (each must be one of them)."""
    tf = _transformers(repo)
    kwargs = dict(kwargs or {})
    reserved = sorted(set(kwargs) & _RESERVED)
    if reserved:
        raise BackboneError(f"model.backbone_kwargs may not set {reserved} (model.arch=hf/{repo}): bonecluster "
                            "sets the channels, and the position embedding follows data.size by itself")
    try:
        config, unused = tf.AutoConfig.from_pretrained(repo, return_unused_kwargs=True, **kwargs)
    except (OSError, ValueError) as err:
        raise _hub_error(repo, "config", err) from err
    if unused:
        raise BackboneError(f"model.backbone_kwargs {sorted(unused)} are not fields of hf/{repo}'s config "
                            f"({type(config).__name__})")
    return config


def _processor_stats(tf, repo: str) -> tuple[float, float, int | None]:
    """Grey mean, std and the processor's input side, from the repo's image processor."""
    try:
        proc = tf.AutoImageProcessor.from_pretrained(repo)
    except (OSError, ValueError) as err:
        # a folder without preprocessor_config.json is common (save_pretrained of the model alone);
        # anything else (an offline cache without the file, a network error) deserves a warning
        quiet = os.path.isdir(repo) and not os.path.exists(os.path.join(repo, "preprocessor_config.json"))
        (log.info if quiet else log.warning)(
            "hf/%s: no image processor could be read (%s); normalising with ImageNet's mean and std",
            repo, str(err).splitlines()[0] if str(err) else type(err).__name__)
        return float(np.mean(IMAGENET_MEAN)), float(np.mean(IMAGENET_STD)), None
    side = None
    for field in ("crop_size", "size"):   # dicts in transformers 4, SizeDict objects in 5
        value = getattr(proc, field, None)
        if isinstance(value, int):
            side = value
        elif value is not None:
            get = value.get if hasattr(value, "get") else (lambda key, v=value: getattr(v, key, None))
            side = get("height") or get("shortest_edge")
        if side:
            break
    mean = getattr(proc, "image_mean", None) or IMAGENET_MEAN
    std = getattr(proc, "image_std", None) or IMAGENET_STD
    return float(np.mean(mean)), float(np.mean(std)), int(side) if side else None


def default_size(repo: str) -> int:
    """The repo's input side: its image processor's crop, else its config's ``image_size``, else 224."""
    tf = _transformers(repo)
    _, _, side = _processor_stats(tf, repo)
    if side:
        return side
    size = getattr(read_config(repo), "image_size", None)
    return int(size[0] if isinstance(size, (tuple, list)) else size) if size else 224


def _first_conv(model: nn.Module, channels: int) -> tuple[str, nn.Conv2d]:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == channels:
            return name, module
    raise BackboneError(f"{type(model).__name__} has no convolution over {channels} input channels to adapt")


def _set_input_channels(model: nn.Module, old: int, new: int) -> str:
    """Give the first conv ``new`` input channels, its RGB weights summed; returns its name."""
    name, conv = _first_conv(model, old)
    if old != new:
        adapted = nn.Conv2d(new, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                            conv.groups, conv.bias is not None, conv.padding_mode)
        with torch.no_grad():
            adapted.weight.copy_(adapt_first_conv(conv.weight, new) if old == 3 else adapted.weight)
            if conv.bias is not None:
                adapted.bias.copy_(conv.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, adapted)
        for module in model.modules():   # the embeddings check the channel count they were built for
            if getattr(module, "num_channels", None) == old:
                module.num_channels = new
        model.config.num_channels = new
    return name


class HFEncoder(nn.Module):
    """``(N, C, H, W)`` normalised -> ``(N, D)`` pooled, around a transformers ``AutoModel``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        # a plain ViT needs asking to resample its position embedding at another size; DINOv2 always does
        self._interpolate = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters

    def run(self, x: Tensor, hidden: bool = False):
        extra = {"interpolate_pos_encoding": True} if self._interpolate else {}
        return self.model(pixel_values=x, output_hidden_states=hidden, **extra)

    def forward(self, x: Tensor) -> Tensor:
        return pooled(self.run(x))


def pooled(out) -> Tensor:
    """The model's pooler output (DINOv2: the CLS token after the final norm; a CNN: its pooled
    last map), else the first token of the normed last hidden state (a ViT built without its
    learned pooler: the CLS token) or the mean of the last map."""
    pool = getattr(out, "pooler_output", None)
    if pool is not None:
        return pool.flatten(1)
    last = out.last_hidden_state
    return last[:, 0] if last.ndim == 3 else last.mean(dim=(2, 3))


def _patch(config) -> int | None:
    patch = getattr(config, "patch_size", None)
    return int(patch[0] if isinstance(patch, (tuple, list)) else patch) if patch else None


def hf_maps(net: HFEncoder, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Pooled features with the last two hidden states as maps (a ViT's tokens on their grid)."""
    out = net.run(x, hidden=True)
    states = out.hidden_states
    size = (x.shape[2], x.shape[3])
    patch = _patch(net.model.config)

    def as_map(state: Tensor) -> Tensor:
        return tokens_to_map(state, size, patch) if state.ndim == 3 else state

    return pooled(out), as_map(states[-2]), as_map(states[-1])


def hf_cam_layers(net: HFEncoder) -> dict:
    """A ViT's blocks (the last left out: the CLS token it is pooled from gets nothing from that
    block's patch tokens) or a CNN's encoder stages. The blocks are the model's ModuleList of
    ``num_hidden_layers`` modules, wherever the version of transformers keeps it."""
    config, layers = net.model.config, {}
    blocks = getattr(config, "num_hidden_layers", None)
    patch = _patch(config)
    for name, module in net.model.named_modules():
        if patch and blocks and isinstance(module, nn.ModuleList) and len(module) == blocks:
            for i, block in enumerate(module):
                layers[f"model.{name}.{i}"] = (block, functools.partial(tokens_to_map, reduction=patch))
            layers.popitem()
            return layers
    stages = getattr(getattr(net.model, "encoder", None), "stages", None)
    for i, stage in enumerate(stages or []):
        layers[f"model.encoder.stages.{i}"] = (stage, identity_map)
    return layers


def _add_prefix(state: dict, module: nn.Module) -> dict:
    """A bare encoder's state dict (``save_pretrained``'s keys) -> this wrapper's (``model.``)."""
    if any(k.startswith("model.") for k in state):
        return state
    return {f"model.{k}": v for k, v in state.items()}


def _load(tf, repo: str, config, fetched: bool) -> nn.Module:
    """``AutoModel`` of ``config``, with the hub's weights when ``fetched``; in float32 (a
    checkpoint stored in half precision would otherwise load as such) and without a ViT's
    learned pooler (``add_pooling_layer``): DINO-style checkpoints have none, and a random one
    would become the features."""
    def make(**extra):
        if fetched:
            return tf.AutoModel.from_pretrained(repo, config=config, dtype=torch.float32, **extra)
        return tf.AutoModel.from_config(config, **extra)

    try:
        return make(add_pooling_layer=False)
    except TypeError as err:          # the model has no optional pooler (DINOv2, ConvNeXt...)
        if "add_pooling_layer" not in str(err):
            raise
    return make()


def _check_layout(repo: str, model: nn.Module) -> None:
    """Refuse, in one line, an encoder whose hidden states are neither one patch grid nor maps."""
    config = model.config
    if hasattr(config, "depths") and hasattr(config, "embed_dim") and _patch(config):
        raise BackboneError(f"model.arch=hf/{repo} ({type(model).__name__}) keeps its tokens at several "
                            "resolutions (a Swin-type model), which stage 2's patch score and Grad-CAM do not "
                            "read yet; use a ViT or CNN encoder, or its timm/ version")


def build(repo: str, *, in_channels: int, image_size: int | None, weights: str,
          kwargs: dict[str, Any], saved: dict[str, Any] | None = None) -> Backbone:
    """A transformers encoder for ``in_channels``-channel films; see the module docstring.

    ``saved`` (a run's own record: the config and normalisation it was built with) rebuilds it
    without reading the hub or the repo folder again."""
    tf = _transformers(repo)
    if saved:
        values = dict(saved["config"])
        config = tf.AutoConfig.for_model(values.pop("model_type"), **values)
    else:
        config = read_config(repo, kwargs)
    fetched = str(weights).lower() == "pretrained"
    if not fetched:   # random weights: built for the film's channels from the start, with the model's own init
        config.num_channels = in_channels
    rgb = int(getattr(config, "num_channels", 3))
    try:
        model = _load(tf, repo, config, fetched)
    except (OSError, ValueError, RuntimeError) as err:
        raise _hub_error(repo, "weights" if fetched else "model", err) from err
    check_patch_multiple(f"hf/{repo}", _patch(config), image_size)
    _check_layout(repo, model)
    first = _set_input_channels(model, rgb, in_channels)
    mean, std = (saved["mean"], saved["std"]) if saved else _processor_stats(tf, repo)[:2]
    dim = getattr(config, "hidden_size", None) or getattr(config, "hidden_sizes", [None])[-1]
    # JSON-plain, so a run file loads with torch.load(weights_only=True)
    record = {"config": json.loads(model.config.to_json_string(use_diff=False)), "mean": mean, "std": std}
    return Backbone(module=HFEncoder(model), feature_dim=int(dim), mean=mean, std=std,
                    first_conv=f"model.{first}", classifier=("classifier",), filter_state=_add_prefix,
                    weights_loaded=fetched, maps=hf_maps, cam_layers=hf_cam_layers, saved=record)
