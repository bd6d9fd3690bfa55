import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from bonecluster.linear import fit_l2_logistic, row_space_basis


def _wide(n=60, d=200, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    y = x[:, 0] + 0.5 * rng.standard_normal(n) > 0.3
    return x, y


def test_the_basis_is_orthonormal_and_spans_the_rows():
    x, _ = _wide()
    basis = row_space_basis(x)
    assert basis.shape == (60, 200)
    np.testing.assert_allclose(basis @ basis.T, np.eye(60), atol=1e-10)
    np.testing.assert_allclose(x @ basis.T @ basis, x, atol=1e-9)   # each row lies in the span


def test_the_basis_drops_directions_the_rows_do_not_have():
    x, _ = _wide(n=40, d=100)
    x[20:] = x[:20] * 2.0   # rank 20
    basis = row_space_basis(x)
    assert basis.shape == (20, 100)
    np.testing.assert_allclose(x @ basis.T @ basis, x, atol=1e-9)


def test_no_basis_when_the_rows_are_more_than_half_the_features_and_one_direction_for_zero_rows():
    assert row_space_basis(np.ones((10, 4))) is None
    assert row_space_basis(_wide(n=51, d=100)[0]) is None
    assert row_space_basis(_wide(n=50, d=100)[0]).shape == (50, 100)
    assert row_space_basis(np.zeros((3, 8))).shape == (1, 8)


def test_the_basis_stays_orthonormal_when_the_rows_are_ill_conditioned():
    rng = np.random.default_rng(1)
    u, _ = np.linalg.qr(rng.standard_normal((80, 80)))
    v, _ = np.linalg.qr(rng.standard_normal((400, 80)))
    x = (u * np.logspace(0, -5, 80)) @ v.T   # singular values from 1 down to 1e-5
    basis = row_space_basis(x)
    assert basis.shape == (80, 400)
    np.testing.assert_allclose(basis @ basis.T, np.eye(80), atol=1e-12)
    np.testing.assert_allclose(x @ basis.T @ basis, x, atol=1e-12)


@pytest.mark.parametrize("weighted", [False, True])
def test_the_fit_in_the_row_span_is_scikit_learns_full_fit(weighted):
    x, y = _wide()
    weight = np.linspace(0.5, 2.0, len(y)) if weighted else None
    reference = LogisticRegression(C=0.05, class_weight="balanced", tol=1e-10, max_iter=100000)
    reference.fit(x, y, sample_weight=weight)
    coef, intercept = fit_l2_logistic(x, y, 0.05, sample_weight=weight, basis=row_space_basis(x))
    assert coef.shape == (200,)
    scale = np.abs(reference.coef_).max()
    np.testing.assert_allclose(coef, reference.coef_.ravel(), atol=1e-4 * scale)
    assert intercept == pytest.approx(float(reference.intercept_[0]), abs=1e-4)


def test_without_a_basis_it_fits_every_feature():
    x, y = _wide(n=80, d=5)
    coef, intercept = fit_l2_logistic(x, y, 1.0)
    reference = LogisticRegression(C=1.0, class_weight="balanced", max_iter=5000).fit(x, y)
    np.testing.assert_allclose(coef, reference.coef_.ravel())
    assert intercept == reference.intercept_[0]
