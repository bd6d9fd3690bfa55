"""Method sela (methods/sela.py): balanced Sinkhorn pseudo-labels and the centroid head."""

from __future__ import annotations

import numpy as np

from tests.integration.methods.conftest import method_config, train_method


def test_balanced_clusters_leave_no_cluster_empty_or_dominant(phantoms, tmp_path):
    res, rows, trained = train_method(phantoms, tmp_path / "run", method_config("sela", 2))
    assert [r["phase"] for r in rows] == ["cluster"] * 2 and res.epochs_run == 2
    sizes = np.bincount(res.assignments, minlength=7)
    assert sizes.min() > 0 and sizes.max() < len(res.assignments) / 2
    assert len(trained.assignments) == 56 and trained.centroids.shape[0] == 7
