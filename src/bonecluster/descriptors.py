"""Hand-made image descriptors: a fixed, label-free view of the film that needs no training.

* :func:`hog_features` — histograms of oriented gradients (Dalal & Triggs 2005). On real MURA
  humerus films a linear model on HOG separates abnormal studies far better than the stage-2
  network's own features (docs/RESULTS.md), so the few-label probe and the label-free score
  refinement (:mod:`bonecluster.selftrain`) both read it.
"""

from __future__ import annotations

import numpy as np
import torch


@torch.no_grad()
def hog_features(images: np.ndarray, cell: int = 8, bins: int = 9, batch_size: int = 512) -> torch.Tensor:
    """Histograms of oriented gradients (Dalal & Triggs 2005) of uint8 (N, S, S) images: (N, D).

    Unsigned orientations in ``bins`` bins (linear vote between the two nearest), magnitude
    weighted, summed over ``cell`` x ``cell`` pixel cells; 2 x 2-cell blocks, L2-Hys normalised
    (clip 0.2). A fixed, label-free descriptor of the film itself (64 px: 7 x 7 blocks x 36 = 1764).
    """
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).float().div_(255)
        x = x.unsqueeze(1)
        gx = torch.nn.functional.pad(x, (1, 1, 0, 0), mode="replicate")
        gy = torch.nn.functional.pad(x, (0, 0, 1, 1), mode="replicate")
        gx = gx[..., :, 2:] - gx[..., :, :-2]
        gy = gy[..., 2:, :] - gy[..., :-2, :]
        mag = torch.sqrt(gx ** 2 + gy ** 2)
        pos = torch.remainder(torch.atan2(gy, gx), np.pi) / np.pi * bins - 0.5   # bin centres at 0..bins-1
        low = torch.floor(pos)
        frac = pos - low
        hist = torch.zeros(x.shape[0], bins, *x.shape[2:])
        hist.scatter_add_(1, torch.remainder(low, bins).long(), mag * (1 - frac))
        hist.scatter_add_(1, torch.remainder(low + 1, bins).long(), mag * frac)
        cells = torch.nn.functional.avg_pool2d(hist, cell) * cell * cell            # (n, bins, h, w)
        blocks = torch.cat([cells[:, :, i:cells.shape[2] - 1 + i, j:cells.shape[3] - 1 + j]
                            for i in (0, 1) for j in (0, 1)], dim=1)               # (n, 4 bins, h-1, w-1)
        blocks = blocks.permute(0, 2, 3, 1)
        blocks = blocks / torch.sqrt(blocks.pow(2).sum(-1, keepdim=True) + 1e-6)
        blocks = blocks.clamp_max(0.2)
        blocks = blocks / torch.sqrt(blocks.pow(2).sum(-1, keepdim=True) + 1e-6)
        out.append(blocks.flatten(1))
    return torch.cat(out)
