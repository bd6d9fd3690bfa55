"""L2-regularised logistic regression on wide data, fitted in the span of its rows.

HOG of a 64-px film has D = 1,764 features and a part has a few hundred films, so D > n. With an
L2 penalty the optimal weights lie in the span of the training rows (the representer theorem:
at the optimum ``w = -C * x.T @ (weighted loss derivatives)``, a combination of the rows).
Writing ``w = basis.T @ b`` with an orthonormal basis of that span (r <= n rows) gives the same
objective in r unknowns, since ``x @ w = (x @ basis.T) @ b`` and ``|w| = |b|``; so the optimum is
the same. In r <= n unknowns a Newton solver (scikit-learn's ``newton-cholesky``, an r x r
Hessian) reaches it in a few steps: about 8 times faster than L-BFGS over all D features on a
part's HOG, and closer to the exact optimum (docs/BENCHMARKS.md, "Where the demo's time goes").
"""

from __future__ import annotations

import numpy as np

# Directions of the row span whose squared singular value is below this share of the largest
# are dropped: the rows barely extend along them (singular value < 1e-6 of the largest), so the
# optimal weights have no measurable component there.
_RANK_TOL = 1e-12


def row_space_basis(x: np.ndarray) -> np.ndarray | None:
    """An orthonormal basis ``(r, D)`` of the span of the rows of ``x`` ``(n, D)``, or None when
    ``n > D / 2``: there the span is hardly smaller than the feature space, and Newton steps in
    r unknowns (about n r^2 each) would cost more than L-BFGS over all D.

    From the eigenvectors of the Gram matrix ``x @ x.T`` (n x n): if ``x = U S V.T`` then
    ``V.T = S^-1 U.T x`` (20 ms against 170 ms for an SVD of ``x`` at 400 x 1,764 here); a QR
    step then restores the orthonormality that round-off costs the weakest directions.
    """
    x = np.asarray(x, float)
    n, d = x.shape
    if 2 * n > d:
        return None
    eigenvalues, vectors = np.linalg.eigh(x @ x.T)   # ascending
    top = max(eigenvalues[-1], 0.0)
    keep = eigenvalues > top * _RANK_TOL if top > 0 else np.zeros(n, bool)
    if not keep.any():   # every row is zero: any one direction will do, the optimum is w = 0
        return np.eye(1, d)
    spanning = (vectors[:, keep].T @ x) / np.sqrt(eigenvalues[keep])[:, None]
    q, _ = np.linalg.qr(spanning.T)   # (D, r), the same span, orthonormal to round-off
    return q.T


def fit_l2_logistic(x: np.ndarray, y: np.ndarray, C: float, sample_weight: np.ndarray | None = None,
                    basis: np.ndarray | None = None, class_weight: str | None = "balanced",
                    max_iter: int = 5000) -> tuple[np.ndarray, float]:
    """scikit-learn's L2 ``LogisticRegression`` (unpenalised intercept) of ``y`` (n,) on ``x``
    (n, D): returns (coef (D,), intercept).

    ``basis``: :func:`row_space_basis` of ``x`` (or of rows that span the same space), to fit in
    r unknowns with Newton steps; None fits all D features with L-BFGS (as when n > D / 2).
    """
    x = np.asarray(x, float)
    return _fit_projected(x if basis is None else x @ basis.T, basis, y, C, sample_weight, class_weight, max_iter)


class RowSpace:
    """Rows ``x`` (n, D) that several L2 logistic fits read with different labels (self-training's
    rounds and shares): their :func:`row_space_basis` and coordinates in it, computed once."""

    def __init__(self, x: np.ndarray):
        x = np.asarray(x, float)
        self.basis = row_space_basis(x)                              # (r, D) or None
        self.coords = x if self.basis is None else x @ self.basis.T  # (n, r) or x itself

    def fit(self, y: np.ndarray, C: float, sample_weight: np.ndarray | None = None,
            class_weight: str | None = "balanced", max_iter: int = 5000) -> tuple[np.ndarray, float]:
        """:func:`fit_l2_logistic` of ``y`` (n,) on these rows: (coef (D,), intercept)."""
        return _fit_projected(self.coords, self.basis, y, C, sample_weight, class_weight, max_iter)


def _fit_projected(z: np.ndarray, basis: np.ndarray | None, y: np.ndarray, C: float,
                   sample_weight: np.ndarray | None, class_weight: str | None,
                   max_iter: int) -> tuple[np.ndarray, float]:
    """The fit on coordinates ``z`` in ``basis`` (None: the features themselves), its weights
    mapped back to the D features."""
    from sklearn.linear_model import LogisticRegression

    solver = "lbfgs" if basis is None else "newton-cholesky"
    model = LogisticRegression(C=C, class_weight=class_weight, max_iter=max_iter, solver=solver)
    model.fit(z, y, sample_weight=sample_weight)
    coef = model.coef_.ravel()
    return (coef if basis is None else coef @ basis), float(model.intercept_[0])
