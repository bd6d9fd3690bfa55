"""The supervised yardstick: how much of the abnormality a model that reads *every* label sees.

A label-free stage-2 figure means something only beside what the same images allow at all
(issue 24). The reference here is an L2 logistic regression on HOG of each image and its mirror
(:func:`bonecluster.descriptors.hog_features`), fitted on one body part's training images with
all their labels and scored on held-out images of the part. It is never part of a trained run:
``bonecluster demo`` prints it beside its label-free figures, and ``benchmarks/bench_findings.py``
and ``benchmarks/bench_stage2.py --ceiling`` report it. :func:`cnn_reference` is the second
yardstick: the part's own network fine-tuned with every label (``bench_stage2.py --ceiling``,
``bench_real_stage2.py --ceiling``).
"""

from __future__ import annotations

import numpy as np

from bonecluster.data.cache import PreparedDataset
from bonecluster.metrics import auroc
from bonecluster.stage2.parts import group_by_part

HOG_C = 0.01   # L2 strength, fixed (not tuned on held-out images)


def hog_reference_scores(train_images: np.ndarray, train_truth: np.ndarray, valid_images: np.ndarray) -> np.ndarray:
    """Abnormality probability of each held-out image, image and mirror averaged.

    ``train_images`` (N, H, W) and ``valid_images`` (M, H, W) uint8; ``train_truth`` (N,) bool,
    both classes present. Returns (M,) floats.
    """
    from sklearn.linear_model import LogisticRegression

    from bonecluster.descriptors import hog_features, mirror
    from bonecluster.selftrain import standardisation

    feats = [hog_features(a).double() for a in (train_images, mirror(train_images), valid_images,
                                                 mirror(valid_images))]
    mean, scale = standardisation(feats[0])
    z = [((f - mean) / scale).numpy() for f in feats]
    model = LogisticRegression(C=HOG_C, class_weight="balanced", max_iter=5000).fit(
        np.concatenate(z[:2]), np.concatenate([train_truth, train_truth]))
    return (model.predict_proba(z[2])[:, 1] + model.predict_proba(z[3])[:, 1]) / 2


def hog_reference(train_images: np.ndarray, train_truth: np.ndarray, valid_images: np.ndarray,
                  valid_truth: np.ndarray) -> float:
    """Held-out AUROC of :func:`hog_reference_scores`."""
    return auroc(valid_truth, hog_reference_scores(train_images, train_truth, valid_images))


def hog_reference_by_part(train: PreparedDataset, valid: PreparedDataset) -> dict[str, float]:
    """Held-out AUROC per body part (the metadata's part), for parts with both labels on both sides."""
    out = {}
    valid_groups = group_by_part(valid)
    images, valid_images = train.images(), valid.images()   # each call copies every row: once
    for part, pos in group_by_part(train).items():
        vpos = valid_groups.get(part)
        if vpos is None:
            continue
        truth, vtruth = train.abnormal(pos), valid.abnormal(vpos)
        if truth.all() or not truth.any() or vtruth.all() or not vtruth.any():
            continue
        out[part] = hog_reference(images[pos], truth, valid_images[vpos], vtruth)
    return out


def cnn_reference_scores(model, train_images: np.ndarray, train_truth: np.ndarray, valid_images: np.ndarray,
                         seed: int | None = 0, epochs: int = 20, batch_size: int = 32) -> np.ndarray:
    """Abnormality probability of each held-out image from ``model`` fine-tuned on every label.

    ``model`` is a :class:`bonecluster.models.ClusterNet`-like network with ``features`` and
    ``feature_dim`` (it is trained in place: pass a copy you can spare). A linear head on its
    pooled features, binary cross-entropy, AdamW at 1e-3 with a cosine schedule, horizontal flips
    and small affine jitter; scored on each image and its mirror. uint8 (N, H, W) and (M, H, W)
    images, (N,) bool truth; returns (M,) floats. ``seed`` seeds torch's generator first (None:
    the caller already has, e.g. before building ``model``).
    """
    import torch
    import torchvision.transforms.v2 as T

    from bonecluster.descriptors import float_batches

    if seed is not None:
        torch.manual_seed(seed)
    head = torch.nn.Linear(model.feature_dim, 1)
    x = torch.cat(list(float_batches(train_images)))
    y = torch.as_tensor(train_truth, dtype=torch.float32)
    jitter = T.Compose([T.RandomHorizontalFlip(), T.RandomAffine(10, translate=(0.08, 0.08), scale=(0.9, 1.1))])
    opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=1e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * -(-len(x) // batch_size))
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(x)).split(batch_size):
            logits = head(model.features(torch.stack([jitter(im) for im in x[batch]]))).squeeze(1)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        return torch.cat([(torch.sigmoid(head(model.features(v))) + torch.sigmoid(head(model.features(v.flip(-1)))))
                          .squeeze(1) / 2 for v in float_batches(valid_images)]).numpy()


def cnn_reference(model, train_images: np.ndarray, train_truth: np.ndarray, valid_images: np.ndarray,
                  valid_truth: np.ndarray, seed: int | None = 0, epochs: int = 20) -> float:
    """Held-out AUROC of :func:`cnn_reference_scores`."""
    return auroc(valid_truth, cnn_reference_scores(model, train_images, train_truth, valid_images, seed, epochs))
