"""What every backbone family returns (:class:`Backbone`) and raises (:class:`BackboneError`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

# a layer's output for (H, W) films -> its (N, C, h, w) map
MapFn = Callable[[Tensor, tuple[int, int]], Tensor]

RESNETS = ("resnet18", "resnet34", "resnet50")


class BackboneError(ValueError):
    """A backbone that cannot be built as asked: unknown name, missing package, absent weights.

    A ValueError, so the command line prints it as one line (no traceback)."""


@dataclass
class Backbone:
    """A built backbone and what loading weights into it needs.

    Attributes:
        module: ``(N, in_channels, H, W)`` normalised -> ``(N, feature_dim)`` pooled features
            (None in the copy a :class:`~bonecluster.models.DeepClusterNet` keeps beside it).
        feature_dim: D.
        mean, std: grey normalisation ``(x - mean) / std`` of ``[0, 1]`` films for this model.
        first_conv: state-dict prefix of the layer that sees the input channels (RGB -> grey).
        classifier: state-dict prefixes of the classifier a weights file may carry (dropped).
        filter_state: ``(state_dict, module) -> state_dict``, the model family's own converter for a
            foreign state dict (e.g. timm's position-embedding resampling for a ViT at another
            size), or None.
        weights_loaded: True when the builder already loaded the requested weights (hub weights).
        maps: ``(module, normalised x) -> (pooled (N, D), mid (N, c, h', w'), last (N, C, h, w))``:
            the pooled features with the next-to-last and last stages' maps, in one pass.
        cam_layers: ``module -> {name: (layer, to_map)}``, the layers Grad-CAM may explain,
            shallow to deep, with what turns each one's output into an ``(N, C, h, w)`` map.
        saved: what rebuilding it needs beyond its name, kept in the run's files (a transformers
            model's config and normalisation, so a run never needs the hub again), or None.
    """

    module: nn.Module | None
    feature_dim: int
    mean: float
    std: float
    first_conv: str = "conv1"
    classifier: tuple[str, ...] = ("fc",)
    filter_state: Callable[[dict[str, Tensor], nn.Module], dict[str, Tensor]] | None = None
    weights_loaded: bool = False
    maps: Callable[[nn.Module, Tensor], tuple[Tensor, Tensor, Tensor]] | None = None
    cam_layers: Callable[[nn.Module], dict[str, tuple[nn.Module, MapFn]]] | None = None
    saved: dict | None = None


def identity_map(output: Tensor, size: tuple[int, int]) -> Tensor:
    """A CNN stage's output already is ``(N, C, h, w)``."""
    return output


def nhwc_map(output: Tensor, size: tuple[int, int]) -> Tensor:
    """A channels-last stage output ``(N, h, w, C)`` (Swin, MambaOut...) -> ``(N, C, h, w)``."""
    return output.permute(0, 3, 1, 2)


def tokens_to_map(tokens: Tensor, size: tuple[int, int], reduction: int) -> Tensor:
    """ViT block output ``(N, prefix + h*w, D)`` -> ``(N, D, h, w)`` for ``size = (H, W)`` films;
    the prefix tokens (CLS, registers) are the leading ones beyond the patch grid."""
    if isinstance(tokens, tuple):   # Hugging Face layers return (hidden_states, ...)
        tokens = tokens[0]
    h, w = size[0] // reduction, size[1] // reduction
    prefix = tokens.shape[1] - h * w
    if prefix < 0:
        raise ValueError(f"{tokens.shape[1]} tokens cannot tile a {h}x{w} patch grid (input {size})")
    # shape[0], not len(): len() makes a Python int, which pins the batch size in an ONNX export
    return tokens[:, prefix:].reshape(tokens.shape[0], h, w, -1).permute(0, 3, 1, 2)


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


def hub_failure(arch: str, what: str, err: Exception, fetch: str, instead: str) -> BackboneError:
    """One line for hub files that could not be had: ``arch``'s ``what``, why (offline with an empty
    cache, or the error's first line), how to ``fetch`` them once, and what to give ``instead``."""
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    cause = " (HF_HUB_OFFLINE is set and the cache has no copy)" if offline else ""
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return BackboneError(f"model.arch={arch}: its {what} could not be loaded{cause}: {reason}. Fetch "
                         f"{'them' if what.endswith('s') else 'it'} once on a machine with network ({fetch}) "
                         f"into the cache HF_HOME points to, or {instead}")


def check_patch_multiple(arch: str, patch: int | None, image_size: int | None) -> None:
    """A ViT cuts films into ``patch`` px patches: ``data.size`` must be a multiple of it."""
    if patch and image_size and image_size % patch:
        lower, upper = (image_size // patch) * patch, (image_size // patch + 1) * patch
        options = f"{lower} or {upper}" if lower else f"{upper}"
        raise BackboneError(f"model.arch={arch} cuts films into {patch} px patches, so data.size must be a "
                            f"multiple of {patch}; got {image_size} (try data.size={options})")
