"""Method simclr-deepcluster (methods/simclr_deepcluster.py): SimCLR's epochs, then DeepCluster's rounds."""

from __future__ import annotations

import numpy as np

from bonecluster.checkpoint import CHECKPOINT, load_torch
from tests.integration.methods.conftest import method_config, train_method


def test_both_phases_count_in_the_epochs(phantoms, tmp_path):
    res, rows, trained = train_method(phantoms, tmp_path / "run", method_config("simclr-deepcluster", 2))
    assert [r["phase"] for r in rows] == ["simclr"] * 2 + ["cluster"] * 2 and res.epochs_run == 4
    assert {"optimizer", "pretrain"} <= set(load_torch(tmp_path / "run" / CHECKPOINT))
    assert trained.centroids.shape[0] == 7


def test_an_interrupted_pretraining_resumes_to_identical_assignments(phantoms, tmp_path):
    cfg = method_config("simclr-deepcluster", 1, "train.device=cpu")  # CPU: bit-for-bit
    full, full_rows, _ = train_method(phantoms, tmp_path / "full", cfg)
    part, _, _ = train_method(phantoms, tmp_path / "part", cfg, stop_after=1)
    assert part.interrupted and "pretrain" in load_torch(tmp_path / "part" / CHECKPOINT)
    resumed, resumed_rows, _ = train_method(phantoms, tmp_path / "part", cfg, resume=True)
    np.testing.assert_array_equal(resumed.assignments, full.assignments)
    assert [r["loss"] for r in resumed_rows] == [r["loss"] for r in full_rows]
