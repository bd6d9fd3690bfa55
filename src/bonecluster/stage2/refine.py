"""Stage 2's label-free refinement of the kNN score (``stage2.refine_rounds`` > 0, the default).

The part's kNN score (:mod:`bonecluster.stage2.scoring`) only seeds it: study-level
pseudo-labels of the training images fit HOG logistic models (one per share in
``stage2.refine_share``), whose mean probability then becomes the part's score. With
``stage2.networks`` > 1 the seed is the mean rank of several networks' kNN scores. The
self-training itself is :class:`bonecluster.selftrain.ScoreRefiner`'s.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from bonecluster.anomaly import mean_rank
from bonecluster.config import Stage2Config
from bonecluster.selftrain import ScoreRefiner

log = logging.getLogger("bonecluster")


def refinement_seed(scores: torch.Tensor, extra_seeds: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """(N,) the refinement's seed: the kNN ``scores`` (N,), or their mean rank with the extra
    networks' ``extra_seeds`` (N,) each."""
    return mean_rank([scores, *extra_seeds]) if extra_seeds else scores


def refine_scores(images: np.ndarray, scores: torch.Tensor, extra_seeds: tuple[torch.Tensor, ...],
                  groups: torch.Tensor, s2: Stage2Config) -> tuple[ScoreRefiner | None, torch.Tensor]:
    """The refiner of a part and its scores of the part's training ``images`` (uint8 (N, S, S)),
    seeded by their kNN ``scores`` (N,) and ``extra_seeds`` (N,) each; ``groups`` (N,) study ids.
    (None, ``scores``) when refinement is off or the seed ranks every training study alike."""
    refiner = None
    if s2.refine_rounds > 0:
        seed = refinement_seed(scores, extra_seeds)
        refiner = ScoreRefiner.fit(images, seed.numpy(), groups.numpy(), s2.refine_rounds, s2.refine_share,
                                   s2.refine_C)
        if refiner is None:
            log.warning("stage 2: the kNN score ranks every training study of this part alike; no refinement")
        else:
            scores = refiner.score(images)
    return refiner, scores
