"""The engine's CUDA paths, on a machine with a GPU (skipped elsewhere).

The rest of the suite also runs on CUDA there, since ``train.device=auto`` picks it; these tests
name the device so that a CUDA-only failure points here. A run on an H100 found three such bugs
(a run folder or checkpoint loaded onto the GPU broke ``.numpy()`` and the RNG restore; SCAN's
heads were initialised on the GPU with a CPU generator).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bonecluster.checkpoint import TrainedClusters
from bonecluster.engine import DeepClusterEngine

from .test_engine import SIMCLR, _cfg, _data, phantoms  # noqa: F401 - phantoms is a fixture

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_train_stop_resume_and_load_on_cuda(phantoms, tmp_path):  # noqa: F811
    cfg = _cfg(2, "train.device=cuda")
    data = _data(phantoms, tmp_path, cfg)
    part = DeepClusterEngine(cfg, tmp_path / "run", progress=False).fit(data, stop_after=1)
    assert part.interrupted
    resumed = DeepClusterEngine(cfg, tmp_path / "run", progress=False).fit(data, resume=True)
    assert resumed.epochs_run == 2 and len(resumed.assignments) == len(data)
    trained = TrainedClusters.load(tmp_path / "run", device="cuda")
    assert next(trained.model.parameters()).is_cuda
    np.testing.assert_array_equal(trained.assignments, resumed.assignments)
    final = torch.load(tmp_path / "run" / "model.pt", weights_only=True)  # no map_location: must be CPU tensors
    assert all(not v.is_cuda for v in [*final["model"].values(), *final["pca"].values()])


@pytest.mark.parametrize("method", ["sela", "simclr-scan", "dino"])
def test_methods_with_their_own_randomness_train_on_cuda(phantoms, tmp_path, method):  # noqa: F811
    cfg = _cfg(1, "train.device=cuda", f"method={method}", *SIMCLR)
    res = DeepClusterEngine(cfg, tmp_path / "run", progress=False).fit(_data(phantoms, tmp_path, cfg))
    assignments = np.asarray(res.assignments)
    assert res.epochs_run >= 1 and assignments.min() >= 0 and assignments.max() < 7
