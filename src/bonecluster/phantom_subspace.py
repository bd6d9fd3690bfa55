"""Cluster real films inside the directions that tell phantom body parts apart.

k-means on the PCA-whitened embedding splits real films along whatever varies most among them:
exposure, framing, view, a child's growth plates. On held-out real films the label-free
Hungarian accuracy sits well below a linear probe on the same features (docs/RESULTS.md): the
part is *in* the features, but not in their largest directions. The phantom generator knows every
film's part by construction, so it can say which directions carry the part, without a real label:

1. render ``cluster.subspace_films`` labelled phantoms, prepared like the real films
   (``data.size`` / ``data.fit``), and embed them with the network as it is;
2. fit linear discriminant analysis (Fisher 1936; Ledoit-Wolf shrinkage, as the features
   outnumber neither films nor parts by much) on their 7 part labels: at most 6 directions
   ``W`` (D, r) along which phantom parts differ most relative to their within-part spread;
3. project the real films' features onto ``W`` and PCA-whiten them there (the usual DeepCluster
   step, inside the subspace), then L2-normalise and run k-means as usual.

Steps 2-3 are one linear map, so the result is an ordinary :class:`~bonecluster.cluster.PCAWhitening`
(``mean`` of the real features, ``components = W @ C``, ``scale``): predict, export and the viewer
use it unchanged. This is a phantom-supervised projection in the spirit of formula-driven
pre-training (Kataoka et al. 2020), applied to the clustering space instead of the weights.

    corpus = subspace_corpus(3500, cfg.data, seed=0)                 # images (M, S, S), labels["part"] (M,)
    pca = phantom_part_whitening(model, real_features, corpus, device)
    x = l2_normalise(pca.transform(real_features))        # (N, r), r <= 6
"""

from __future__ import annotations

import numpy as np
import torch

from bonecluster.augment import uint8_to_unit_float
from bonecluster.cluster import PCAWhitening, fit_pca_whitening
from bonecluster.config import DataConfig
from bonecluster.models import DeepClusterNet
from bonecluster.phantom_pretrain import PhantomCorpus, render_corpus

#: ``cluster.subspace`` values: ``none`` = PCA-whiten the whole feature space (DeepCluster).
SUBSPACES = ("none", "phantom-parts")

#: The subspace's phantoms come from this point of the labelled stream on, far past the films
#: ``bonecluster pretrain-phantoms`` trains and validates on (20,000 + 1,000 by default).
FIRST_FILM = 10_000_000


def part_directions(features: torch.Tensor, parts: np.ndarray) -> torch.Tensor:
    """Fisher discriminant directions of ``parts`` in ``features``: ``(M, D)``, ``(M,)`` -> ``(D, r)``.

    ``r = min(classes - 1, D)``, by decreasing between- over within-class variance (sklearn's
    ``LinearDiscriminantAnalysis``, eigen solver, Ledoit-Wolf shrinkage of the within-class
    covariance, which keeps it invertible when features are many and films few). Float32, on
    ``features``' device.
    """
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    classes = np.unique(parts)
    if len(classes) < 2:
        raise ValueError(f"the phantom subspace needs films of at least 2 parts, got {len(classes)}")
    x = features.detach().to("cpu", torch.float64).numpy()
    lda = LinearDiscriminantAnalysis(solver="eigen", shrinkage="auto").fit(x, parts)
    r = min(len(classes) - 1, x.shape[1])
    return torch.from_numpy(lda.scalings_[:, :r].copy()).to(device=features.device, dtype=torch.float32)


def subspace_whitening(features: torch.Tensor, directions: torch.Tensor, dim: int = 256,
                       eps: float = 1e-5, eigen_power: float = -0.5) -> PCAWhitening:
    """PCA whitening of ``features`` (N, D) inside the span of ``directions`` (D, r), as one map.

    ``transform(x) = ((x - mean) @ directions @ C) * scale``, where ``C`` and ``scale`` whiten the
    projected training features (so their covariance is close to the identity; ``eigen_power``
    as in :func:`~bonecluster.cluster.fit_pca_whitening`) and keep at most ``dim`` components.
    Returned as a :class:`PCAWhitening` with ``components = directions @ C``.
    """
    if directions.ndim != 2 or directions.shape[0] != features.shape[1]:
        raise ValueError(f"directions of shape {tuple(directions.shape)} do not fit features of "
                         f"shape {tuple(features.shape)}")
    mean = features.to(torch.float32).mean(dim=0)
    projected = (features.to(torch.float32) - mean) @ directions.to(features.device)
    # inner.mean is ~0: the data are centred
    inner = fit_pca_whitening(projected, dim=dim, eps=eps, eigen_power=eigen_power)
    return PCAWhitening(mean=mean + inner.mean @ torch.linalg.pinv(directions.to(features.device)),
                        components=directions.to(features.device) @ inner.components, scale=inner.scale)


@torch.no_grad()
def embed_images(model: DeepClusterNet, images: np.ndarray, device: torch.device,
                 batch_size: int = 256) -> torch.Tensor:
    """``model.features`` of uint8 images ``(M, S, S)`` in eval mode, without augmentation -> ``(M, D)``."""
    was_training = model.training
    model.eval()
    chunks = []
    try:
        for s in range(0, len(images), batch_size):
            x = uint8_to_unit_float(torch.from_numpy(np.ascontiguousarray(images[s:s + batch_size])).to(device))
            chunks.append(model.features(x).float())
    finally:
        model.train(was_training)
    return torch.cat(chunks)


def subspace_corpus(films: int, data: DataConfig, seed: int, progress: bool = False) -> PhantomCorpus:
    """The ``films`` labelled phantoms the subspace is fitted on, prepared like the real films."""
    return render_corpus(films, data, seed=seed, first=FIRST_FILM, workers=data.workers or None, progress=progress)


def phantom_part_whitening(model: DeepClusterNet, features: torch.Tensor, corpus: PhantomCorpus,
                           device: torch.device, dim: int = 256, batch_size: int = 256,
                           eigen_power: float = -0.5) -> PCAWhitening:
    """The projection ``cluster.subspace=phantom-parts`` clusters in (see the module docstring).

    Args:
        model: the network whose ``features`` made ``features``; used as it is (eval mode).
        features: ``(N, D)`` features of the real training films.
        corpus: labelled phantoms from :func:`subspace_corpus`, at the films' size and fit.
    """
    phantom_features = embed_images(model, corpus.images, device, batch_size)
    directions = part_directions(phantom_features, corpus.labels["part"])
    return subspace_whitening(features, directions.to(features.device), dim=dim, eigen_power=eigen_power)
