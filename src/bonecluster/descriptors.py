"""Hand-made image descriptors: a fixed, label-free view of the film that needs no training.

* :func:`hog_features` — histograms of oriented gradients (Dalal & Triggs 2005). On real MURA
  humerus films a linear model on HOG separates abnormal studies far better than the stage-2
  network's own features (docs/RESULTS.md), so the few-label probe and the label-free score
  refinement (:mod:`bonecluster.selftrain`) both read it.
* :func:`appearance` — grey-level and gradient-magnitude histograms, for the out-of-distribution
  flag's second reference (:mod:`bonecluster.typicality`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def central_gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Horizontal and vertical central differences of float (N, 1, S, S), edges replicated: two
    (N, 1, S, S) tensors."""
    gx = F.pad(x, (1, 1, 0, 0), mode="replicate")
    gy = F.pad(x, (0, 0, 1, 1), mode="replicate")
    return gx[..., :, 2:] - gx[..., :, :-2], gy[..., 2:, :] - gy[..., :-2, :]


def hog(x: torch.Tensor, cell: int = 8, bins: int = 9) -> torch.Tensor:
    """Histograms of oriented gradients (Dalal & Triggs 2005): float (N, 1, S, S) in [0, 1] -> (N, D).

    Unsigned orientations in ``bins`` bins (linear vote between the two nearest), magnitude
    weighted, summed over ``cell`` x ``cell`` pixel cells; 2 x 2-cell blocks, L2-Hys normalised
    (clip 0.2). A fixed, label-free descriptor of the film itself (64 px: 7 x 7 blocks x 36 = 1764).
    Plain tensor operations only (the votes are one-hot masks, not a scatter), so the ONNX
    export carries it (:mod:`bonecluster.export`).
    """
    gx, gy = central_gradients(x)
    mag = torch.sqrt(gx ** 2 + gy ** 2)
    # where there is no gradient the angle is 0, as torch's atan2(0, 0) gives; said outright because
    # the TorchScript ONNX exporter writes atan2 with a division, which reads NaN there
    angle = torch.where(mag > 0, torch.atan2(gy, gx), torch.zeros_like(mag))
    pos = torch.remainder(angle, math.pi) / math.pi * bins - 0.5   # bin centres at 0..bins-1
    low = torch.floor(pos)
    frac = pos - low
    centres = torch.arange(bins, dtype=x.dtype, device=x.device).view(1, bins, 1, 1)
    hist = ((torch.remainder(low, bins) == centres) * (mag * (1 - frac))
            + (torch.remainder(low + 1, bins) == centres) * (mag * frac))      # (n, bins, S, S)
    cells = F.avg_pool2d(hist, cell) * cell * cell                              # (n, bins, h, w)
    h, w = cells.shape[2], cells.shape[3]
    blocks = torch.cat([cells[:, :, i:h - 1 + i, j:w - 1 + j] for i in (0, 1) for j in (0, 1)], dim=1)
    blocks = blocks.permute(0, 2, 3, 1)                                         # (n, h-1, w-1, 4 bins)
    blocks = blocks / torch.sqrt(blocks.pow(2).sum(-1, keepdim=True) + 1e-6)
    blocks = blocks.clamp_max(0.2)
    blocks = blocks / torch.sqrt(blocks.pow(2).sum(-1, keepdim=True) + 1e-6)
    return blocks.flatten(1)


# appearance(): gradient magnitudes (grey levels in [0, 1], central differences) are binned over
# [0, APPEARANCE_MAX_GRADIENT]; steeper edges fall in the last bin.
APPEARANCE_MAX_GRADIENT = 0.5


@torch.no_grad()
def appearance(images: np.ndarray, bins: int = 32, batch_size: int = 512) -> torch.Tensor:
    """How a film looks, whatever it shows: uint8 (N, S, S) -> (N, 2 * bins) float32, the share of
    its pixels in each of ``bins`` grey levels, then in each of ``bins`` gradient magnitudes.

    A network-free description for the out-of-distribution flag (:mod:`bonecluster.typicality`):
    a phantom and a real film differ in exposure, noise and edges before they differ in anatomy.
    """
    out = []
    for x in float_batches(images, batch_size):
        n = len(x)
        grey = torch.clamp((x * bins).long(), max=bins - 1).view(n, -1)
        gx, gy = central_gradients(x)
        mag = torch.sqrt(gx ** 2 + gy ** 2)
        edge = torch.clamp((mag / APPEARANCE_MAX_GRADIENT * bins).long(), max=bins - 1).view(n, -1)
        rows = torch.arange(n).unsqueeze(1) * bins     # one bincount for the whole batch
        shares = [torch.bincount((v + rows).view(-1), minlength=n * bins).view(n, bins).float() / v.shape[1]
                  for v in (grey, edge)]
        out.append(torch.cat(shares, dim=1))
    return torch.cat(out) if out else torch.zeros(0, 2 * bins)


def mirror(images: np.ndarray) -> np.ndarray:
    """Left-right mirrored uint8 (N, S, S) images (a left limb seen as a right one)."""
    return np.ascontiguousarray(images[:, :, ::-1])


def float_batches(images: np.ndarray, batch_size: int = 512):
    """uint8 (N, S, S) images as float (n, 1, S, S) batches in [0, 1], the graphs' input form."""
    for start in range(0, len(images), batch_size):
        yield torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).float().div_(255).unsqueeze(1)


@torch.no_grad()
def hog_features(images: np.ndarray, cell: int = 8, bins: int = 9, batch_size: int = 512) -> torch.Tensor:
    """:func:`hog` of uint8 (N, S, S) images, in batches: (N, D) float32 on the CPU."""
    out = [hog(x, cell, bins) for x in float_batches(images, batch_size)]
    return torch.cat(out) if out else torch.zeros(0, 0)
