"""benchmarks/bench_stage2.py's supervised HOG reference: it must see a finding that is there and
nothing where the labels carry no signal."""

from __future__ import annotations

import numpy as np

from tests.conftest import load_benchmark


def _films(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(n, 32, 32) uint8 noise; the abnormal half carries a bright diagonal line, one shape per film."""
    images = rng.integers(60, 120, size=(n, 32, 32)).astype(np.uint8)
    truth = np.arange(n) % 2 == 1
    for i in np.flatnonzero(truth):
        start = rng.integers(4, 12)
        for t in range(14):
            images[i, start + t, start + t] = 250
    return images, truth


def test_hog_reference_sees_a_real_finding_and_not_shuffled_labels():
    bench, rng = load_benchmark("bench_stage2"), np.random.default_rng(0)
    train, train_truth = _films(80, rng)
    valid, valid_truth = _films(40, rng)
    assert bench.hog_reference(train, train_truth, valid, valid_truth) > 0.9
    noise_truth = rng.permutation(train_truth)
    assert 0.2 < bench.hog_reference(train, noise_truth, valid, valid_truth) < 0.8
