"""The label-free checks of a part's score (bonecluster.stage2.guard): exact small cases."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from bonecluster.stage2.guard import FRAMING_LIMIT, fill_share, score_checks, spearman, study_means


def _films(fills: list[float], size: int = 10) -> np.ndarray:
    """uint8 (N, size, size) images whose film (grey 100) covers the first round(fill * size) rows."""
    out = np.zeros((len(fills), size, size), np.uint8)
    for i, f in enumerate(fills):
        out[i, :round(f * size)] = 100
    return out


def test_fill_share_counts_the_pixels_above_the_canvas_level():
    x = _films([0.0, 0.3, 1.0])
    x[0, 0, 0] = 12                      # under 0.05 of full scale (12.75): still canvas
    x[0, 0, 1] = 13                      # above it: film
    np.testing.assert_allclose(fill_share(x), [0.01, 0.3, 1.0])


def test_spearman_is_rank_correlation_and_none_when_undefined():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 1000]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1, 1], [1, 2, 3, 4]) is None
    assert spearman([1, 2], [2, 1]) is None


def test_study_means_average_each_group_in_sorted_group_order():
    np.testing.assert_allclose(study_means(np.array([1.0, 3.0, 10.0, 5.0]), np.array([7, 7, 2, 9])), [10.0, 2.0, 5.0])


def test_a_score_that_ranks_the_fill_share_is_flagged(caplog):
    fills = np.linspace(0.1, 1.0, 10)
    images = _films(list(fills))
    groups = np.arange(10)
    with caplog.at_level(logging.WARNING, logger="bonecluster"):
        checks = score_checks(fills + 0.01, fills, images, groups, part="HUMERUS")
    assert checks["framing"] == pytest.approx(1.0) and checks["seed_agreement"] == pytest.approx(1.0)
    assert len(checks["warnings"]) == 1 and "HUMERUS" in checks["warnings"][0] and "fill" in caplog.text


def test_a_refinement_that_turns_its_seed_round_is_flagged_by_study():
    rng = np.random.default_rng(0)
    images = _films(list(rng.uniform(0.3, 1.0, 12)))
    groups = np.repeat(np.arange(6), 2)                     # six studies of two films
    seed = np.repeat(np.arange(6.0), 2) + rng.normal(0, 0.01, 12)
    checks = score_checks(-seed, seed, images, groups)
    assert checks["seed_agreement"] == pytest.approx(-1.0)
    assert any("against its kNN seed" in w for w in checks["warnings"])


def test_a_score_independent_of_framing_and_faithful_to_its_seed_passes():
    rng = np.random.default_rng(1)
    images = _films(list(rng.uniform(0.3, 1.0, 200)), size=20)
    seed = rng.normal(size=200)
    checks = score_checks(seed + rng.normal(0, 0.3, 200), seed, images, np.arange(200))
    assert abs(checks["framing"]) < FRAMING_LIMIT and checks["seed_agreement"] > 0.9
    assert checks["warnings"] == []
    assert score_checks(seed, None, images, np.arange(200))["seed_agreement"] is None   # no refinement
