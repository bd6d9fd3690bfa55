"""Method simclr (methods/simclr.py): contrastive pre-training, then k-means once."""

from __future__ import annotations

import torch
import torchvision

from bonecluster.checkpoint import CHECKPOINT, load_torch
from tests.integration.methods.conftest import method_config, train_method


def test_pretraining_epochs_are_logged_and_end_in_k_clusters(phantoms, tmp_path):
    res, rows, trained = train_method(phantoms, tmp_path / "run", method_config("simclr", 2))
    assert [r["phase"] for r in rows] == ["simclr"] * 2 and res.epochs_run == 2
    saved = load_torch(tmp_path / "run" / CHECKPOINT)
    assert set(saved["pretrain"]) == {"head", "optimizer"} and "optimizer" not in saved   # no rounds, no backbone SGD
    assert len(trained.assignments) == 56 and trained.centroids.shape[0] == 7


def test_frozen_pretrained_features_are_clustered_without_training(phantoms, tmp_path):
    # The "pretrained network + k-means" baseline (docs/methods.md): `simclr` with no pre-training
    # epochs clusters the features of the weights it was given, which it must not change.
    torch.manual_seed(11)
    donor = torchvision.models.resnet18()  # stands in for ImageNet weights; its fc is dropped on load
    torch.save(donor.state_dict(), tmp_path / "weights.pt")
    cfg = method_config("simclr", 2, "selfsup.epochs=0", f"model.weights={tmp_path / 'weights.pt'}",
                        "model.sobel=false", "train.device=cpu")
    res, _, trained = train_method(phantoms, tmp_path / "run", cfg)
    assert res.epochs_run == 0 and res.history == []
    loaded = trained.model.state_dict()
    torch.testing.assert_close(loaded["backbone.layer4.1.conv2.weight"], donor.layer4[1].conv2.weight.detach())
    torch.testing.assert_close(loaded["backbone.conv1.weight"], donor.conv1.weight.detach().sum(1, keepdim=True))
    assert len(trained.assignments) == 56 and len(set(trained.assignments.tolist())) == 7
