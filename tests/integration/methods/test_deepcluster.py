"""Method deepcluster (methods/deepcluster.py): the paper's rounds. The loop's own behaviour
(files, resume, collapse, DDP) is tested with it in tests/integration/test_engine.py."""

from __future__ import annotations

from bonecluster.checkpoint import CHECKPOINT, load_torch
from tests.integration.methods.conftest import method_config, train_method


def test_each_round_trains_on_its_k_means_pseudo_labels(phantoms, tmp_path):
    res, rows, trained = train_method(phantoms, tmp_path / "run", method_config("deepcluster", 2))
    assert [r["phase"] for r in rows] == ["cluster"] * 2 and res.epochs_run == 2
    assert all(sum(int(s) for s in r["cluster_sizes"].split("|")) == 56 for r in rows)
    assert "optimizer" in load_torch(tmp_path / "run" / CHECKPOINT)   # the backbone's SGD resumes too
    assert len(trained.assignments) == 56 and trained.centroids.shape[0] == 7


def test_over_clustered_rounds_train_on_train_k_and_end_with_k_clusters(phantoms, tmp_path):
    res, rows, trained = train_method(phantoms, tmp_path / "run", method_config("deepcluster", 2, "cluster.train_k=12"))
    assert all(len(r["cluster_sizes"].split("|")) == 12 for r in rows)   # the rounds: train_k
    assert load_torch(tmp_path / "run" / CHECKPOINT)["assignments"].max() >= 7
    assert trained.centroids.shape[0] == 7 and res.assignments.max() < 7  # the final clustering: k
    assert trained.model.top_layer.out_features == 12
