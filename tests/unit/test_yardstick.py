"""The supervised HOG yardstick (bonecluster.yardstick): it must see a finding that is there,
nothing where the labels carry no signal, and score each part on its own images."""

from __future__ import annotations

import numpy as np

from bonecluster.data.cache import PreparedDataset
from bonecluster.data.decode import Preprocess
from bonecluster.data.records import Record, SkipLog
from bonecluster.yardstick import hog_reference, hog_reference_by_part


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
    rng = np.random.default_rng(0)
    train, train_truth = _films(80, rng)
    valid, valid_truth = _films(40, rng)
    assert hog_reference(train, train_truth, valid, valid_truth) > 0.9
    noise_truth = rng.permutation(train_truth)
    assert 0.2 < hog_reference(train, noise_truth, valid, valid_truth) < 0.8


class _InMemory(PreparedDataset):
    """A prepared dataset whose pixels live in memory instead of a cache store."""

    def __init__(self, images: np.ndarray, records: list[Record]):
        super().__init__("/nowhere", Preprocess(size=images.shape[-1]), records, np.arange(len(records)), SkipLog())
        self._images = images

    def images(self) -> np.ndarray:
        return self._images


def _dataset(images: np.ndarray, truth: np.ndarray, parts: list[str]) -> PreparedDataset:
    return _InMemory(images, [Record(path=f"f{i}.png", body_part=p, abnormal=bool(t))
                              for i, (t, p) in enumerate(zip(truth, parts))])


def test_by_part_fits_each_part_alone_and_skips_a_part_without_both_labels():
    rng = np.random.default_rng(1)
    train, train_truth = _films(80, rng)
    valid, valid_truth = _films(40, rng)
    # HAND's abnormal films are the ones *without* the line: one model over both parts would see
    # the line mean opposite things and score near chance; one model per part sees each clearly.
    train_parts = np.array(["ELBOW" if i % 4 < 2 else "HAND" for i in range(80)])
    valid_parts = np.array(["ELBOW" if i % 4 < 2 else "HAND" for i in range(40)])
    train_truth = np.where(train_parts == "HAND", ~train_truth, train_truth)
    valid_truth = np.where(valid_parts == "HAND", ~valid_truth, valid_truth)
    train_parts = list(train_parts) + ["WRIST"] * 4     # WRIST: only normal films, so not scored
    train = np.concatenate([train, train[:4]])
    train_truth = np.concatenate([train_truth, np.zeros(4, bool)])
    valid_parts = list(valid_parts) + ["WRIST"] * 2
    valid = np.concatenate([valid, valid[:2]])
    valid_truth = np.concatenate([valid_truth, [True, False]])
    got = hog_reference_by_part(_dataset(train, train_truth, train_parts),
                                _dataset(valid, valid_truth, valid_parts))
    assert set(got) == {"ELBOW", "HAND"}
    assert got["ELBOW"] > 0.9 and got["HAND"] > 0.9
    pooled = hog_reference(train[:80], train_truth[:80], valid[:40], valid_truth[:40])
    assert pooled < 0.8


def test_cnn_reference_fine_tunes_a_copy_and_is_reproducible_by_seed():
    import torch

    from bonecluster.models import build_model
    from bonecluster.yardstick import cnn_reference, cnn_reference_scores

    rng = np.random.default_rng(0)
    train, train_truth = _films(48, rng)
    valid, valid_truth = _films(16, rng)
    torch.manual_seed(0)
    start = build_model({"arch": "resnet18", "sobel": False, "num_clusters": 2})
    state = {k: v.clone() for k, v in start.state_dict().items()}

    def fresh():
        model = build_model({"arch": "resnet18", "sobel": False, "num_clusters": 2})
        model.load_state_dict(state)
        return model

    a = cnn_reference_scores(fresh(), train, train_truth, valid, seed=3, epochs=2, batch_size=16)
    b = cnn_reference_scores(fresh(), train, train_truth, valid, seed=3, epochs=2, batch_size=16)
    assert a.shape == (16,) and np.all((a > 0) & (a < 1))
    np.testing.assert_allclose(a, b, atol=1e-6)                 # same seed, same start: same scores
    assert 0 <= cnn_reference(fresh(), train, train_truth, valid, valid_truth, seed=3, epochs=2) <= 1
