"""Self-training on study-level pseudo-labels (bonecluster.selftrain): exact small cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from bonecluster.selftrain import ScoreRefiner, self_train, self_train_per_share, study_mean


def _studies(n=300, d=30, sep=1.0, seed=0, per=3):
    """(x (n, d), y (n,), groups (n,)): a study's ``per`` images share its label."""
    rng = np.random.default_rng(seed)
    study = np.arange(n) // per
    y = study % 2 == 0
    x = rng.normal(size=(n, d))
    x[:, 0] += np.where(y, sep, -sep)
    return x, y, np.array([f"s{s}" for s in study])


def _noisy_seed(y, quality, seed=1):
    """A score whose AUROC against y is about ``quality`` (0.5 = chance, below = reversed)."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=len(y)) + np.where(y, 1.0, -1.0) * (quality - 0.5) * 2


def _auc(x, y, fitted):
    return roc_auc_score(y, x @ fitted[0] + fitted[1])


def test_study_mean_is_the_group_mean():
    groups = np.array(["b", "a", "b", "c"])
    assert np.allclose(study_mean(np.array([1.0, 5.0, 3.0, 7.0]), groups), [2.0, 5.0, 2.0, 7.0])


def test_a_weak_label_free_seed_is_sharpened():
    x, y, groups = _studies()
    seed = _noisy_seed(y, 0.65)
    fitted = self_train([x], groups, seed, share=0.5, C=0.01, rounds=4)
    assert roc_auc_score(y, seed) < 0.72 and _auc(x, y, fitted) > 0.9


def test_a_reversed_seed_is_amplified_the_wrong_way():
    """Self-training follows its seed: a score worse than chance gets worse, not better."""
    x, y, groups = _studies()
    fitted = self_train([x], groups, _noisy_seed(y, 0.35), share=0.5, C=0.01, rounds=4)
    assert _auc(x, y, fitted) < 0.2


def test_the_study_is_the_unit_of_agreement():
    """Every view of an image, and every image of a study, takes one pseudo-label: with one round
    and images that carry their study's mean as the only signal, the fit separates exactly the
    studies whose mean seed is in the top half."""
    groups = np.array(["a", "a", "b", "b", "c", "c", "d", "d"])
    seed = np.array([0.9, 0.1, 0.6, 0.6, 0.2, 0.2, 0.8, 0.0])   # study means: a 0.5, b 0.6, c 0.2, d 0.4
    x = np.eye(4)[[0, 0, 1, 1, 2, 2, 3, 3]]                     # one indicator per study
    coef, _ = self_train([x, x.copy()], groups, seed, share=0.5, C=10.0, rounds=1)
    assert set(np.argsort(coef)[-2:]) == {0, 1}                  # a and b called abnormal


def test_few_true_labels_outweigh_a_reversed_seed():
    """The labelled rows weigh as much as all pseudo-labelled rows together, so 30 true labels
    turn a seed that ranks the wrong way round; without them it is amplified the wrong way."""
    x, y, groups = _studies()
    seed = _noisy_seed(y[30:], 0.35)
    with_labels = self_train([x[30:]], groups[30:], seed, share=0.5, C=0.01, rounds=3,
                             labelled_x=x[:30], labelled_y=y[:30])
    without = self_train([x[30:]], groups[30:], seed, share=0.5, C=0.01, rounds=3)
    assert _auc(x, y, with_labels) > 0.85 and _auc(x, y, without) < 0.2


def test_ties_and_bad_shares():
    x, y, groups = _studies(n=30)
    assert self_train([x], groups, np.zeros(30), share=0.5, C=1.0, rounds=2) is None   # nothing ranks higher
    for share in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="share"):
            self_train([x], groups, np.arange(30.0), share=share, C=1.0, rounds=1)


def test_one_model_per_share_in_order():
    x, y, groups = _studies(n=60)
    assert self_train_per_share([x], groups, np.zeros(60), [0.3, 0.7], C=1.0, rounds=2) is None
    shares, coef, intercept = self_train_per_share([x], groups, _noisy_seed(y, 0.7), [0.7, 0.3], C=1.0, rounds=2)
    assert shares == (0.7, 0.3) and coef.shape == (2, x.shape[1]) and intercept.shape == (2,)
    alone = self_train([x], groups, _noisy_seed(y, 0.7), share=0.3, C=1.0, rounds=2)
    assert np.allclose(coef[1], alone[0]) and np.isclose(intercept[1], alone[1])


def _bars(n=120, seed=0):
    """64 px films with one vertical bar; abnormal studies (every other one) have a horizontal
    crack through it. Three views per study, jittered position."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 64, 64), np.uint8)
    study = np.arange(n) // 3
    y = study % 2 == 0
    for i in range(n):
        x0 = 24 + rng.integers(-6, 7)
        images[i, 8:56, x0:x0 + 12] = 200
        if y[i]:
            r = 20 + rng.integers(0, 24)
            images[i, r:r + 2, x0 - 2:x0 + 14] = 0
            images[i, r + 2:r + 6, x0 + 12:x0 + 16] = 200   # a displaced fragment
    images = np.clip(images + rng.normal(0, 8, images.shape), 0, 255).astype(np.uint8)
    return images, y, np.array([f"s{s}" for s in study])


def test_score_refiner_fits_scores_and_roundtrips(tmp_path):
    images, y, groups = _bars()
    seed = _noisy_seed(y, 0.65, seed=3)
    refiner = ScoreRefiner.fit(images, seed, groups, rounds=3, shares=0.5, C=0.01)
    scores = refiner.score(images)
    assert scores.shape == (120,) and bool(((scores > 0) & (scores < 1)).all())
    assert roc_auc_score(y, scores.numpy()) > roc_auc_score(y, seed) + 0.15
    torch.save(refiner.state_dict(), tmp_path / "r.pt")
    back = ScoreRefiner.from_state_dict(torch.load(tmp_path / "r.pt", weights_only=True))
    assert torch.equal(back.score(images[:5]), refiner.score(images[:5])) and back.rounds == 3
    assert refiner.score(images[:0]).shape == (0,)
    assert ScoreRefiner.fit(images, np.ones(120), groups, 2, 0.5, 0.01) is None


def test_several_shares_average_one_model_per_share():
    images, y, groups = _bars()
    seed = _noisy_seed(y, 0.65, seed=3)
    ensemble = ScoreRefiner.fit(images, seed, groups, rounds=2, shares=[0.3, 0.5, 0.7], C=0.01)
    singles = [ScoreRefiner.fit(images, seed, groups, rounds=2, shares=s, C=0.01) for s in (0.3, 0.5, 0.7)]
    assert ensemble.shares == (0.3, 0.5, 0.7) and ensemble.coef.shape == (3, singles[0].coef.shape[1])
    expected = torch.stack([r.score(images) for r in singles]).mean(0)
    assert torch.allclose(ensemble.score(images), expected, atol=1e-6)
    assert not torch.allclose(singles[0].score(images), singles[2].score(images))   # the shares differ


def test_a_one_model_refiner_file_from_before_the_ensemble_still_loads():
    images, y, groups = _bars()
    refiner = ScoreRefiner.fit(images, _noisy_seed(y, 0.65, seed=3), groups, rounds=2, shares=0.5, C=0.01)
    old = {"mean": refiner.mean, "scale": refiner.scale, "coef": refiner.coef[0], "rounds": 2, "share": 0.5,
           "intercept": float(refiner.intercept[0]), "C": 0.01}
    back = ScoreRefiner.from_state_dict(old)
    assert back.shares == (0.5,) and back.coef.shape == refiner.coef.shape
    assert torch.allclose(back.score(images), refiner.score(images), atol=1e-6)
