"""Reloading a finished run (bonecluster.checkpoint.TrainedClusters) keeps the network's layout."""

from __future__ import annotations

import pytest
import torch

from bonecluster.checkpoint import FINAL_MODEL, FORMAT, TrainedClusters
from bonecluster.cluster import fit_pca_whitening
from bonecluster.config import Config, to_dict
from bonecluster.models import DeepClusterNet

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _write_run(folder, model: DeepClusterNet, hparams: dict) -> None:
    feats = torch.randn(20, model.feature_dim, generator=torch.Generator().manual_seed(0))
    torch.save({"format": FORMAT, "model": model.state_dict(), "hparams": hparams,
                "pca": fit_pca_whitening(feats, dim=4).state_dict(), "centroids": torch.zeros(3, 4),
                "assignments": torch.zeros(20, dtype=torch.int64), "config": to_dict(Config())}, folder / FINAL_MODEL)


@pytest.mark.parametrize("layout", [False, True])
def test_a_run_reloads_in_the_layout_it_was_trained_in(tmp_path, layout):
    model = DeepClusterNet(small_input=True, channels_last=layout)
    _write_run(tmp_path, model, model.hparams())
    loaded = TrainedClusters.load(tmp_path).model
    assert loaded.channels_last is layout
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded.features(x), model.eval().features(x))   # same layout, same bits


def test_a_run_written_before_the_layout_option_reloads_as_nchw(tmp_path):
    model = DeepClusterNet(small_input=True, channels_last=False)
    old = {k: v for k, v in model.hparams().items() if k != "channels_last"}
    _write_run(tmp_path, model, old)
    assert TrainedClusters.load(tmp_path).model.channels_last is False
