"""Method simclr-phantoms (methods/simclr_phantoms.py): SimCLR plus the labelled phantoms' task loss."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bonecluster.checkpoint import CHECKPOINT, load_torch
from bonecluster.methods.simclr_phantoms import SimCLRPhantoms
from tests.integration.methods.conftest import method_config, train_method

PHANTOMS = ["phantoms.films=48", "phantoms.batch_size=8", "train.device=cpu"]


def _backbone(run) -> dict[str, torch.Tensor]:
    """The backbone's weights and BatchNorm running statistics (not its batch counters)."""
    state = load_torch(run / CHECKPOINT)["model"]
    return {k: v for k, v in state.items() if k.startswith("backbone.") and not k.endswith("num_batches_tracked")}


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
    # With phantom_weight=0 the phantoms pass through the network but add no gradient and leave no
    # BatchNorm statistics, so the backbone ends exactly where plain SimCLR's does, running means
    # and variances included; with weight 1 it ends elsewhere.
    train_method(phantoms, tmp_path / "simclr", method_config("simclr", 2, "train.device=cpu"))
    train_method(phantoms, tmp_path / "w0", method_config("simclr-phantoms", 2, *PHANTOMS, "selfsup.phantom_weight=0"))
    train_method(phantoms, tmp_path / "w1", method_config("simclr-phantoms", 2, *PHANTOMS))
    plain, zero, one = _backbone(tmp_path / "simclr"), _backbone(tmp_path / "w0"), _backbone(tmp_path / "w1")
    assert plain.keys() == zero.keys() == one.keys() and plain
    for key in plain:
        torch.testing.assert_close(zero[key], plain[key])
    assert any(not torch.allclose(one[k], plain[k]) for k in plain)
    assert any(k.endswith("running_mean") for k in plain)


def test_resumes_to_identical_assignments(phantoms, tmp_path):
    cfg = method_config("simclr-phantoms", 1, *PHANTOMS, "selfsup.epochs=3")
    full, rows, _ = train_method(phantoms, tmp_path / "full", cfg)
    part, _, _ = train_method(phantoms, tmp_path / "part", cfg, stop_after=2)
    assert part.interrupted
    resumed, resumed_rows, _ = train_method(phantoms, tmp_path / "part", cfg, resume=True)
    np.testing.assert_array_equal(resumed.assignments, full.assignments)
    assert [r["phantom_loss"] for r in resumed_rows] == [r["phantom_loss"] for r in rows]


def test_without_pretraining_epochs_it_draws_no_phantoms(phantoms, tmp_path, monkeypatch):
    import bonecluster.methods.simclr_phantoms as module

    def no_drawing(*args, **kwargs):
        raise AssertionError("no phantom should be drawn without pre-training epochs")

    monkeypatch.setattr(module, "render_corpus", no_drawing)
    res, rows, trained = train_method(phantoms, tmp_path / "run",
                                      method_config("simclr-phantoms", 1, *PHANTOMS, "selfsup.epochs=0"))
    assert res.epochs_run == 0 and rows == [] and trained.centroids.shape[0] == 7


@pytest.mark.parametrize("weight", [-1.0, float("nan"), True])
def test_a_bad_phantom_weight_is_refused(weight):
    cfg = method_config("simclr-phantoms", 1, *PHANTOMS)
    cfg.selfsup.phantom_weight = weight
    loop = SimpleNamespace(cfg=cfg, dist=SimpleNamespace(world_size=1, is_main=True))
    with pytest.raises(ValueError, match="phantom_weight"):
        SimCLRPhantoms(loop)


def test_it_refuses_to_run_under_several_processes():
    cfg = method_config("simclr-phantoms", 1, *PHANTOMS)
    loop = SimpleNamespace(cfg=cfg, dist=SimpleNamespace(world_size=2, is_main=True))
    with pytest.raises(ValueError, match="one process"):
        SimCLRPhantoms(loop)
