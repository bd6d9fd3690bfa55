"""A loss that stops being a number stops the run at once (bonecluster.divergence), in every
training loop, and leaves the last finished epoch's checkpoint as it was."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bonecluster.augment import RadiographAugment
from bonecluster.checkpoint import CHECKPOINT, load_torch, read_metrics
from bonecluster.divergence import TrainingDiverged
from tests.integration.methods.conftest import method_config, train_method


def poison_augment_after_first_checkpoint(monkeypatch, run: Path) -> None:
    """Training views turn to NaN once ``run`` holds a checkpoint, as a diverged network's would."""
    augment = RadiographAugment.__call__

    def poisoned(self, x, *args, **kwargs):
        out = augment(self, x, *args, **kwargs)
        return out * torch.nan if (run / CHECKPOINT).exists() else out

    monkeypatch.setattr(RadiographAugment, "__call__", poisoned)


@pytest.mark.parametrize("method, where", [("deepcluster", "deepcluster round 2, step 1"),
                                           ("simclr", "simclr epoch 2, step 1")])
def test_a_nan_loss_stops_the_run_at_its_step_and_keeps_the_finished_epoch(phantoms, tmp_path, monkeypatch,
                                                                          method, where):
    run = tmp_path / "run"
    poison_augment_after_first_checkpoint(monkeypatch, run)
    epochs = ["selfsup.epochs=3"] if method == "simclr" else []
    with pytest.raises(TrainingDiverged, match=f"{where}: the loss is nan"):
        train_method(phantoms, run, method_config(method, 2, "train.device=cpu", *epochs))
    assert load_torch(run / CHECKPOINT)["epoch"] == 1 and len(read_metrics(run / "metrics.csv")) == 1
    assert all(torch.isfinite(w).all() for w in load_torch(run / CHECKPOINT)["model"].values() if w.is_floating_point())


def test_features_that_are_not_numbers_are_named_as_the_network_s_not_as_bad_k_means_input(tmp_path):
    from bonecluster.engine import DeepClusterEngine

    engine = DeepClusterEngine(method_config("deepcluster", 1, "train.device=cpu"), tmp_path / "run", progress=False)
    feats = torch.randn(20, engine.model.feature_dim)
    feats[[3, 7], 0] = torch.nan
    with pytest.raises(TrainingDiverged, match="features of 2 of 20 films are NaN or infinite.*lower learning rate"):
        engine.cluster(feats, seed_offset=0, k=3)
    assert engine.cluster(feats.nan_to_num(), seed_offset=0, k=3)[0].assignments.shape == (20,)
