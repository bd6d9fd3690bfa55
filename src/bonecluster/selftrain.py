"""Self-training of a logistic model on study-level pseudo-labels.

MURA labels whole studies: every image of a study shares its label. A weak ranking of images
(a few-label probe, or the label-free kNN score) becomes much less noisy once it is averaged over
each study's images, and a strongly regularised linear model fitted to those averaged
pseudo-labels generalises the signal to images it has not seen. Repeating the two steps is
classic self-training (Yarowsky 1995; "pseudo-labelling", Lee 2013), here with the study as the
unit of agreement.

* :func:`study_mean` — each image's value replaced by its study's mean.
* :func:`self_train` — rounds of (study-mean ranking -> top share abnormal -> refit).
* :func:`self_train_per_share` — the same once per share (the share is unknown).
* :class:`ScoreRefiner` — the label-free use (``stage2.refine_rounds``): the part's kNN score
  seeds the pseudo-labels and HOG logistic models, fitted without any label on each image and
  its left-right mirror, become the score. The share of studies called abnormal is unknown
  without labels, so one model is fitted per share in ``stage2.refine_share`` (0.3 to 0.7 by
  default) and their probabilities are averaged: a bagging-style ensemble over the unknown
  prevalence, steadier than any one share (docs/RESULTS.md).

Self-training amplifies whatever its seed ranks high. Seeded by a score that is better than
chance it sharpens it; seeded by one that is worse, it makes it worse (docs/RESULTS.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from bonecluster.descriptors import float_batches, hog, hog_features, mirror
from bonecluster.linear import RowSpace


def study_mean(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Each entry replaced by the mean over the entries of its group: (N,) -> (N,)."""
    _, inverse = np.unique(np.asarray(groups), return_inverse=True)
    sums = np.bincount(inverse, weights=np.asarray(values, float))
    return (sums / np.bincount(inverse))[inverse]


def probability(views: list[np.ndarray], coef: np.ndarray, intercept: float) -> np.ndarray:
    """A logistic model's probability, averaged over the views of each row: (m,)."""
    return np.mean([1.0 / (1.0 + np.exp(-np.clip(v @ coef + intercept, -500, 500))) for v in views], axis=0)


def share_list(setting: float | Sequence[float], key: str) -> tuple[float, ...]:
    """One pseudo-label share or a list of them -> a tuple, each in (0, 1); ValueError naming the
    config ``key`` otherwise."""
    if isinstance(setting, str):
        raise ValueError(f"{key} must be a share or a list of shares, each in (0, 1), got {setting!r}")
    shares = tuple(float(v) for v in np.atleast_1d(setting))
    if not shares or not all(0.0 < v < 1.0 for v in shares):
        raise ValueError(f"{key}: every share must be in (0, 1), got {setting!r}")
    return shares


def model_rows(coef, intercept) -> tuple[torch.Tensor, torch.Tensor]:
    """Logistic models as float32 rows: coef ``(E, D)`` and intercept ``(E,)``. One model given
    as coef ``(D,)`` and a number (files written before the share ensembles) becomes E = 1."""
    intercept = torch.as_tensor(intercept, dtype=torch.float32).reshape(-1)
    return torch.as_tensor(coef).float().reshape(len(intercept), -1), intercept


def mean_probability(z: torch.Tensor, coef: torch.Tensor, intercept: torch.Tensor) -> torch.Tensor:
    """Mean over E logistic models of ``sigmoid(z @ coef[e] + intercept[e])``: z ``(N, D)`` -> ``(N,)``."""
    return torch.sigmoid(z @ coef.T + intercept).mean(dim=1)


def standardisation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Column mean and standard deviation of ``x`` (N, D); a constant column gets scale 1."""
    scale = x.std(0).nan_to_num(1.0)
    return x.mean(0), torch.where(scale > 1e-8, scale, torch.ones_like(scale))


def _fit_rows(views: list[np.ndarray], labelled_x: np.ndarray | None) -> np.ndarray:
    """The rows a self-training fit reads: the labelled rows first, then every view."""
    return np.concatenate(([] if labelled_x is None else [labelled_x]) + list(views))


def self_train(views: list[np.ndarray], groups: np.ndarray, initial: np.ndarray, share: float, C: float,
               rounds: int, labelled_x: np.ndarray | None = None, labelled_y: np.ndarray | None = None,
               space: RowSpace | None = None) -> tuple[np.ndarray, float] | None:
    """Fit an L2 logistic model to study-level pseudo-labels, ``rounds`` times.

    Args:
        views: ``(m, D)`` feature rows of the unlabelled images, one array per view of them (the
            images, and optionally their mirrors); every view takes the image's pseudo-label.
        groups: ``(m,)`` study ids.
        initial: ``(m,)`` the seed ranking (any score, higher = more abnormal).
        share: the share of images pseudo-labelled abnormal (the top of the study-mean ranking).
        C: inverse L2 strength of the logistic model (class-balanced).
        labelled_x, labelled_y: optional ``(n, D)`` rows with true labels (few-label mode). They
            keep weight 1 each and the pseudo-labelled rows weigh as much in total, so a few
            true labels are not drowned; without them every row weighs 1.
        space: the fitted rows as a :class:`bonecluster.linear.RowSpace` when the caller has it
            already (the same rows for several shares); built here by default.
    Returns:
        (coef ``(D,)``, intercept) of the last fit, or None when the ranking has no top to split
        off (every study tied), so there is nothing to learn.
    """
    if not 0.0 < share < 1.0:
        raise ValueError(f"share must be in (0, 1), got {share}")
    m = len(groups)
    y_true = np.zeros(0, bool) if labelled_y is None else np.asarray(labelled_y, bool)
    pseudo_weight = len(y_true) / (len(views) * m) if len(y_true) else 1.0
    weight = np.concatenate([np.ones(len(y_true)), np.full(len(views) * m, pseudo_weight)])
    ranking, fitted = np.asarray(initial, float), None
    space = space or RowSpace(_fit_rows(views, labelled_x))   # the rows stay the same every round; only the labels change
    for _ in range(rounds):
        ranking = study_mean(ranking, groups)
        pseudo = ranking >= np.quantile(ranking, 1 - share)
        if pseudo.all() or not pseudo.any():
            break
        y_fit = np.concatenate([y_true, *([pseudo] * len(views))])
        fitted = space.fit(y_fit, C, sample_weight=weight)
        ranking = probability(views, *fitted)
    return fitted


def self_train_per_share(views: list[np.ndarray], groups: np.ndarray, initial: np.ndarray,
                         shares: Sequence[float], C: float, rounds: int, labelled_x: np.ndarray | None = None,
                         labelled_y: np.ndarray | None = None) -> tuple[tuple[float, ...], np.ndarray, np.ndarray] | None:
    """:func:`self_train` once per pseudo-label share, all from the same ``initial`` ranking.

    The share of abnormal studies is unknown without labels; averaging the models' probabilities
    over a range of shares (bagging over the prevalence) is steadier than betting on one.
    Returns (the shares that gave a model, coef ``(E, D)``, intercepts ``(E,)``), or None when no
    share did (every study tied).
    """
    space = RowSpace(_fit_rows(views, labelled_x))   # the same rows for every share
    fits = [(float(share), self_train(views, groups, initial, share, C, rounds, labelled_x, labelled_y, space))
            for share in shares]
    fits = [(share, fitted) for share, fitted in fits if fitted is not None]
    if not fits:
        return None
    return (tuple(share for share, _ in fits), np.stack([f[0] for _, f in fits]),
            np.array([f[1] for _, f in fits], float))


def refined_score(x: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor, coef: torch.Tensor,
                  intercept: torch.Tensor) -> torch.Tensor:
    """Mean over E logistic models and over the image and its left-right mirror of
    ``sigmoid(((hog(view) - mean) / scale) @ coef[e] + intercept[e])``.

    ``x``: float (N, 1, S, S) in [0, 1]; ``coef`` (E, D); ``intercept`` (E,) -> (N,). Shared by
    :class:`ScoreRefiner` and the ONNX graph.
    """
    return torch.stack([mean_probability((hog(v) - mean) / scale, coef, intercept) for v in (x, x.flip(-1))]).mean(0)


@dataclass
class ScoreRefiner:
    """HOG logistic models fitted without labels to study-level pseudo-labels of a seed score.

    One model per pseudo-label share (the share of training studies called abnormal, which is
    unknown without labels). ``score(images)`` is the mean, over the models and over the image
    and its left-right mirror, of ``sigmoid(((hog(view) - mean) / scale) @ coef[e] +
    intercept[e])``: a probability-like abnormality score in (0, 1). Left and right limbs both
    occur, so the mirror is another view with the same label; fitting and scoring both views is
    what the few-label probe's ``flip`` does too. Tensors and plain values only, so it loads with
    ``weights_only=True``.
    """

    mean: torch.Tensor      # (D,) HOG mean of the part's training images
    scale: torch.Tensor     # (D,) their standard deviation (1 where constant)
    coef: torch.Tensor      # (E, D), one row per model
    intercept: torch.Tensor  # (E,)
    rounds: int
    shares: tuple           # (E,) the pseudo-label share of each model
    C: float

    @classmethod
    def fit(cls, images: np.ndarray, seed_scores: np.ndarray, groups: np.ndarray, rounds: int,
            shares: float | Sequence[float], C: float) -> "ScoreRefiner | None":
        """Refine ``seed_scores`` (N,) of the uint8 (N, S, S) training ``images``, one model per
        share; None when the seed ranks every study alike (nothing to learn)."""
        shares = share_list(shares, "stage2.refine_share")
        feats = hog_features(images).double()
        mean, scale = standardisation(feats)
        views = [((v - mean) / scale).numpy() for v in (feats, hog_features(mirror(images)).double())]
        fitted = self_train_per_share(views, groups, seed_scores, shares, C, rounds)
        if fitted is None:
            return None
        shares, coef, intercept = fitted
        return cls(mean.float(), scale.float(), *model_rows(coef, intercept), int(rounds), shares, float(C))

    def score(self, images: np.ndarray) -> torch.Tensor:
        """(M,) refined scores of uint8 (M, S, S) images."""
        if len(images) == 0:
            return torch.zeros(0)
        return torch.cat([self.score_tensor(x) for x in float_batches(images)])

    @torch.no_grad()
    def score_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """(N,) refined scores of float (N, 1, S, S) images in [0, 1]: the ONNX graph's form."""
        return refined_score(x, self.mean, self.scale, self.coef, self.intercept)

    def state_dict(self) -> dict:
        return {"mean": self.mean, "scale": self.scale, "coef": self.coef, "intercept": self.intercept,
                "rounds": self.rounds, "shares": list(self.shares), "C": self.C}

    @classmethod
    def from_state_dict(cls, d: dict) -> "ScoreRefiner":
        # Files written before the share ensemble hold one model and "share".
        shares = d["shares"] if "shares" in d else [d["share"]]
        return cls(d["mean"], d["scale"], *model_rows(d["coef"], d["intercept"]), int(d["rounds"]),
                   tuple(float(s) for s in shares), float(d["C"]))
