"""Label-free checks of a part's abnormality score: does it still follow its seed, or the framing?

The label-free refinement (:mod:`bonecluster.stage2.refine`) amplifies whatever its kNN seed ranks
high. On MURA humerus films at 256 px, squashed to 64, the seed ranked films partly by how much of
the frame the film fills (a scanned film in a black canvas against a full-frame one), the
refinement learnt that from HOG, and the score came out inverted: held-out AUROC 0.40, with a
Spearman correlation of the score with the film's fill share near +0.7 on the training films
(docs/RESULTS.md, issue 27). Neither check reads a label:

* ``seed_agreement``: Spearman correlation, over the training studies (study means), of the
  refined score with its seed. Below 0 the refinement has turned its seed's ranking round.
* ``framing``: Spearman correlation of the score with the film's fill share (the share of pixels
  brighter than :data:`FILL_LEVEL`), over the training images. A finding does not change how much
  of the frame a film fills, so a score that ranks by it (:data:`FRAMING_LIMIT`) ranks framing.

:func:`score_checks` returns both and logs a warning for each that fails; training records them in
the part's summary and its ``anomaly.pt``.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger("bonecluster")

FILL_LEVEL = 0.05      # grey level (of 1) above which a pixel belongs to the film, not the canvas
FRAMING_LIMIT = 0.5    # |Spearman(score, fill share)| from which a score is said to follow framing


def fill_share(images: np.ndarray) -> np.ndarray:
    """uint8 (N, S, S) -> (N,) share of each image's pixels above :data:`FILL_LEVEL`."""
    return (np.asarray(images) > FILL_LEVEL * 255).mean(axis=(1, 2))


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman rank correlation of two (N,) arrays; None when either is constant or N < 3."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(spearmanr(a, b).statistic)


def study_means(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """(N,) values -> (G,) their mean per group id (groups (N,) ints), in sorted group order: one
    entry per study of :func:`bonecluster.selftrain.study_mean`."""
    from bonecluster.selftrain import study_mean

    _, first = np.unique(groups, return_index=True)
    return study_mean(values, groups)[first]


def score_checks(scores: np.ndarray, seed: np.ndarray | None, images: np.ndarray, groups: np.ndarray,
                 part: str = "") -> dict:
    """The label-free checks of a part's training ``scores`` (N,) against their ``seed`` (N,; None
    without refinement), the uint8 (N, S, S) ``images`` and their study ids ``groups`` (N,).

    Returns ``{"seed_agreement": float | None, "framing": float | None, "warnings": [str, ...]}``.
    """
    scores = np.asarray(scores, float)
    groups = np.asarray(groups)
    agreement = None
    if seed is not None:
        agreement = spearman(study_means(scores, groups), study_means(np.asarray(seed, float), groups))
    framing = spearman(scores, fill_share(images))
    warnings = []
    name = f"stage 2 {part}: " if part else "stage 2: "
    if agreement is not None and agreement < 0:
        warnings.append(f"{name}the refined score ranks the training studies against its kNN seed "
                        f"(Spearman {agreement:+.2f}); the refinement may have inverted it")
    if framing is not None and abs(framing) >= FRAMING_LIMIT:
        warnings.append(f"{name}the score follows how much of the frame each film fills (Spearman {framing:+.2f} "
                        f"with the fill share over the training films): it may rank framing, not findings "
                        "(docs/stage2.md, 'When the score follows the framing')")
    for w in warnings:
        log.warning(w)
    return {"seed_agreement": agreement, "framing": framing, "warnings": warnings}
