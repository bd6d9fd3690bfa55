"""Method simclr-scan (methods/simclr_scan.py): SimCLR, then SCAN's clusters on frozen features."""

from __future__ import annotations

from tests.integration.methods.conftest import method_config, train_method


def test_scan_clusters_are_kept_with_their_means_as_centroids(phantoms, tmp_path):
    res, rows, trained = train_method(phantoms, tmp_path / "run", method_config("simclr-scan", 2))
    assert [r["phase"] for r in rows] == ["simclr"] * 2 and res.epochs_run == 2
    assert len(trained.assignments) == 56 and len(set(res.assignments.tolist())) > 1
    assert trained.centroids.shape[0] == 7   # one per cluster, the mean of its images (0 if empty)
