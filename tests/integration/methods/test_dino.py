"""Method dino (methods/dino.py): self-distillation, then k-means on the teacher's features."""

from __future__ import annotations

import numpy as np
import torch

from bonecluster.checkpoint import CHECKPOINT, load_torch
from tests.integration.methods.conftest import method_config, train_method

DINO = ("selfsup.epochs=3", "selfsup.dino_prototypes=32", "train.device=cpu")


def test_resumes_to_identical_assignments_and_clusters_the_teachers_features(phantoms, tmp_path):
    cfg = method_config("dino", 1, *DINO)
    full, rows, trained = train_method(phantoms, tmp_path / "full", cfg)
    part, _, _ = train_method(phantoms, tmp_path / "part", cfg, stop_after=2)
    saved = load_torch(tmp_path / "part" / CHECKPOINT)["pretrain"]
    assert part.interrupted and {"teacher", "center"} <= set(saved) and saved["center"].abs().sum() > 0
    resumed, _, _ = train_method(phantoms, tmp_path / "part", cfg, resume=True)
    np.testing.assert_array_equal(resumed.assignments, full.assignments)
    assert [r["phase"] for r in rows] == ["dino"] * 3 and all(0 <= float(r["target_entropy"]) <= 1 for r in rows)
    # The final model is the teacher, which differs from the student that trained last.
    final = trained.model.state_dict()
    checkpoint = load_torch(tmp_path / "full" / CHECKPOINT)
    teacher, student = checkpoint["pretrain"]["teacher"], checkpoint["model"]
    weight = "backbone.conv1.weight"
    torch.testing.assert_close(final[weight], teacher["model." + weight].cpu())
    assert not torch.equal(student[weight].cpu(), teacher["model." + weight].cpu())


def test_without_pretraining_epochs_it_clusters_the_untrained_network(phantoms, tmp_path):
    res, rows, trained = train_method(phantoms, tmp_path / "run", method_config("dino", 1, "selfsup.epochs=0"))
    assert res.epochs_run == 0 and rows == [] and trained.centroids.shape[0] == 7
