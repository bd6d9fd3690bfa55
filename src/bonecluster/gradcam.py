"""Grad-CAM heatmaps for a :class:`~bonecluster.models.DeepClusterNet` (Selvaraju et al., ICCV 2017).

Grad-CAM weighs each channel of a convolutional feature map ``A`` (C, h, w) by the spatial mean
of the gradient of a scalar *target* with respect to it, sums the weighted channels and keeps
the positive part: ``cam = relu(sum_c mean_hw(d target / d A_c) * A_c)``. The map is upsampled
to the input size and divided by its maximum, so it lies in [0, 1] (all zeros when no position
raises the target, e.g. a 1x1 map or a target that does not depend on the image).

**Which feature map.** The output of the backbone's last residual block (``layer4``). On small
inputs that map is tiny (2x2 for a 64 px image with the ImageNet stem, 1x1 at 32 px), which
cannot localise anything, so ``layer="auto"`` takes the last block whose map is at least
``min_size`` positions on each side (``layer4`` from 128 px up with the default stem, else
``layer3``, ...). Name a block to force it. For a ``timm/`` backbone the candidates are the
stages timm lists in its ``feature_info``, for an ``hf/`` one its blocks or stages
(:meth:`~bonecluster.models.DeepClusterNet.cam_layers`); for a ViT, a block's patch tokens on the
patch grid (the usual reshape for transformers).

**Which target.** A deep-clustering model has no class of interest, so the target is supplied by
the caller as a function of the pooled backbone features ``(N, D) -> (N,)``. Two are provided:

* :func:`knn_distance_target` (what the web viewer shows for stage 2): the image's *global
  abnormality score*, the mean cosine distance of its PCA-whitened, L2-normalised embedding to
  its ``k`` nearest training embeddings of the body part (:func:`bonecluster.anomaly.knn_scores`).
  The heatmap then marks the regions that make the image look *unlike* the part's training
  images, i.e. what drives the abnormality score up. The neighbours are chosen once (without
  gradient); the gradient flows through the distances to those fixed neighbours. (A stage-2 run
  with ``stage2.score=patch`` or ``global+patch`` also has a layer-3 patch score; the heatmap
  explains the global part of the score only.)
* :func:`cluster_logit_target`: the cosine similarity to the image's nearest k-means centroid
  (the assigned cluster's nearest-centroid logit), i.e. what makes the image belong to its
  cluster.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from bonecluster.cluster import PCAWhitening, l2_normalise
from bonecluster.models import DeepClusterNet

Target = Callable[[torch.Tensor], torch.Tensor]  # pooled features (N, D) -> (N,) scalars


def grad_cam(model: DeepClusterNet, images: torch.Tensor, target: Target, layer: str = "auto",
             min_size: int = 4) -> tuple[np.ndarray, str]:
    """Grad-CAM maps of ``images`` for ``target``.

    Args:
        model: a DeepClusterNet (in eval mode for BatchNorm; it is not switched here).
        images: float (N, 1, H, W) in [0, 1], or uint8 (N, H, W) / (H, W) grey images.
        target: pooled backbone features (N, D) -> (N,) scalars to explain.
        layer: "auto" or one of ``model.cam_layers()`` (``layer1``..``layer4`` for a ResNet; see
            the module docstring).
        min_size: with "auto", the smallest acceptable side of the feature map.
    Returns:
        float32 (N, H, W) maps in [0, 1] without NaN, and the name of the block used.
    """
    layers = model.cam_layers()
    if not layers:
        raise ValueError(f"model.arch={model.arch} has no feature maps to explain (no stages or blocks found)")
    if layer != "auto" and layer not in layers:
        raise ValueError(f"layer must be 'auto' or one of {tuple(layers)}, got {layer!r}")
    x = _as_batch(images, next(model.parameters()).device)
    size = (x.shape[2], x.shape[3])
    outputs: dict[str, torch.Tensor] = {}
    hooks = [module.register_forward_hook(_keep(outputs, name)) for name, (module, _) in layers.items()]
    try:
        with torch.enable_grad():
            pooled = model.features(x).float()
            maps = {name: layers[name][1](out, size) for name, out in outputs.items()}
            chosen = layer if layer != "auto" else _pick_block(maps, min_size)
            values = target(pooled)
            if values.shape != (len(x),):
                raise ValueError(f"target must return ({len(x)},) values, got {tuple(values.shape)}")
            raw = outputs[chosen]   # the gradient is taken where the output joins the graph, then mapped
            grads = torch.autograd.grad(values.sum(), raw, allow_unused=True)[0]
            act = maps[chosen]
    finally:
        for h in hooks:
            h.remove()
    if grads is None:  # the target does not depend on this block at all
        return np.zeros((len(x), x.shape[2], x.shape[3]), np.float32), chosen
    grads = layers[chosen][1](grads, size)
    with torch.no_grad():
        weights = grads.float().mean(dim=(2, 3), keepdim=True)          # (N, C, 1, 1)
        cam = F.relu((weights * act.float()).sum(dim=1, keepdim=True))  # (N, 1, h, w)
        cam = F.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False)[:, 0]
        cam = torch.nan_to_num(cam, nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0)
        peak = cam.flatten(1).max(dim=1).values.view(-1, 1, 1)
        cam = torch.where(peak > 1e-12, cam / peak.clamp_min(1e-12), torch.zeros_like(cam))
    return cam.clamp(0, 1).cpu().numpy().astype(np.float32), chosen


def knn_distance_target(bank: torch.Tensor, pca: PCAWhitening, k: int = 5) -> Target:
    """The global stage-2 abnormality score: mean cosine distance to the ``k`` nearest bank rows.

    ``bank``: (M, d) L2-normalised training embeddings of the part; ``pca``: the whitening that
    produced them (``PartAnomaly.pca``, or the part model's own for older files).
    """
    bank = bank.float()
    k = max(1, min(int(k), len(bank)))

    def target(pooled: torch.Tensor) -> torch.Tensor:
        z = l2_normalise(pca.transform(pooled))
        sims = z @ bank.to(z.device).T
        nearest = sims.detach().topk(k, dim=1).indices  # fixed neighbours, differentiable distances
        return (1.0 - sims.gather(1, nearest)).mean(dim=1)

    return target


def cluster_logit_target(centroids: torch.Tensor, pca: PCAWhitening) -> Target:
    """Cosine similarity of the PCA-whitened, L2-normalised embedding to its nearest centroid."""
    centroids = l2_normalise(centroids.float())

    def target(pooled: torch.Tensor) -> torch.Tensor:
        z = l2_normalise(pca.transform(pooled))
        return (z @ centroids.to(z.device).T).max(dim=1).values

    return target


def colourise(cam: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """(H, W) map in [0, 1] -> uint8 (H, W, 4) RGBA overlay: a warm colour ramp whose opacity
    grows with the value, so cold regions leave the radiograph visible underneath."""
    v = np.clip(np.nan_to_num(np.asarray(cam, np.float32)), 0.0, 1.0)
    # black-body style ramp (dark red -> red -> yellow -> white), no matplotlib needed
    r = np.clip(1.5 * v + 0.2, 0, 1)
    g = np.clip(2.0 * v - 0.6, 0, 1)
    b = np.clip(4.0 * v - 3.0, 0, 1)
    a = np.clip(alpha * np.sqrt(v), 0, 1)
    return np.rint(np.stack([r, g, b, a], axis=-1) * 255).astype(np.uint8)


def _as_batch(images, device) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images)
    if x.dtype == torch.uint8:
        x = x.float().div(255)
    x = x.float()
    if x.ndim == 2:
        x = x[None, None]
    elif x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] != 1 or x.shape[0] == 0:
        raise ValueError(f"expected grey images (N, 1, H, W), (N, H, W) or (H, W), got {tuple(x.shape)}")
    return x.to(device)


def _keep(store: dict, name: str):
    def hook(_module, _inputs, output):
        store[name] = output
    return hook


def _pick_block(maps: dict[str, torch.Tensor], min_size: int) -> str:
    """The deepest layer whose map is at least ``min_size`` on each side; when none is, the
    deepest of those with the largest map (a ViT's blocks all share one grid)."""
    names = list(maps)
    for name in reversed(names):
        if min(maps[name].shape[2:]) >= min_size:
            return name
    largest = max(min(maps[name].shape[2:]) for name in names)
    return [name for name in names if min(maps[name].shape[2:]) == largest][-1]
