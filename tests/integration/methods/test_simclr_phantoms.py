"""Method simclr-phantoms (methods/simclr_phantoms.py): SimCLR plus the labelled phantoms' task loss."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from bonecluster.checkpoint import CHECKPOINT, load_torch
from bonecluster.methods.simclr_phantoms import SimCLRPhantoms
from tests.integration.methods.conftest import method_config, train_method

PHANTOMS = ["phantoms.films=48", "phantoms.batch_size=8", "train.device=cpu"]


def _backbone(run) -> dict[str, torch.Tensor]:
    state = load_torch(run / CHECKPOINT)["model"]
    return {k: v for k, v in state.items() if k.startswith("backbone.") and k.endswith("weight") and v.dim() == 4}


def test_pretraining_logs_the_phantom_loss_and_ends_in_k_clusters(phantoms, tmp_path):
    res, rows, trained = train_method(phantoms, tmp_path / "run", method_config("simclr-phantoms", 2, *PHANTOMS))
    assert [r["phase"] for r in rows] == ["simclr-phantoms"] * 2 and res.epochs_run == 2
    assert all(math.isfinite(float(r["phantom_loss"])) and float(r["phantom_loss"]) > 0 for r in rows)
    assert all(float(r["loss"]) > float(r["phantom_loss"]) for r in rows)   # NT-Xent plus the phantoms' loss
    head = load_torch(tmp_path / "run" / CHECKPOINT)["pretrain"]["head"]
    assert {"tasks.heads.part.weight", "tasks.heads.view.weight", "tasks.heads.finding.weight"} <= set(head)
    assert head["tasks.heads.part.weight"].shape[0] == 7
    assert len(trained.assignments) == 56 and trained.centroids.shape[0] == 7


def test_the_phantom_loss_is_what_changes_the_backbone(phantoms, tmp_path):
    # With phantom_weight=0 the phantoms pass through the network but add no gradient, so the
    # convolutions end exactly where plain SimCLR's do; with weight 1 they end elsewhere.
    train_method(phantoms, tmp_path / "simclr", method_config("simclr", 2, "train.device=cpu"))
    train_method(phantoms, tmp_path / "w0", method_config("simclr-phantoms", 2, *PHANTOMS, "selfsup.phantom_weight=0"))
    train_method(phantoms, tmp_path / "w1", method_config("simclr-phantoms", 2, *PHANTOMS))
    plain, zero, one = _backbone(tmp_path / "simclr"), _backbone(tmp_path / "w0"), _backbone(tmp_path / "w1")
    assert plain.keys() == zero.keys() == one.keys() and plain
    for key in plain:
        torch.testing.assert_close(zero[key], plain[key])
    assert any(not torch.allclose(one[k], plain[k]) for k in plain)


def test_it_refuses_to_run_under_several_processes():
    cfg = method_config("simclr-phantoms", 1, *PHANTOMS)
    loop = SimpleNamespace(cfg=cfg, dist=SimpleNamespace(world_size=2, is_main=True))
    with pytest.raises(ValueError, match="one process"):
        SimCLRPhantoms(loop)
