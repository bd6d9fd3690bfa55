"""Numbers that stop being numbers stop the run at once (bonecluster.divergence), in every
training loop, and leave the last finished epoch's checkpoint as it was."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from bonecluster.augment import RadiographAugment
from bonecluster.checkpoint import CHECKPOINT, load_torch, read_metrics
from bonecluster.divergence import LossGuard, TrainingDiverged
from tests.integration.methods.conftest import method_config, train_method


def poison_augment_after_first_checkpoint(monkeypatch, run: Path) -> None:
    """Training views turn to NaN once ``run`` holds a checkpoint, as a diverged network's would."""
    augment = RadiographAugment.__call__

    def poisoned(self, x, *args, **kwargs):
        out = augment(self, x, *args, **kwargs)
        return out * torch.nan if (run / CHECKPOINT).exists() else out

    monkeypatch.setattr(RadiographAugment, "__call__", poisoned)


def assert_first_epoch_kept(run: Path) -> None:
    state = load_torch(run / CHECKPOINT)
    assert state["epoch"] == 1 and len(read_metrics(run / "metrics.csv")) == 1
    assert all(torch.isfinite(w).all() for w in state["model"].values() if w.is_floating_point())


@pytest.mark.parametrize("method, where", [("deepcluster", "deepcluster round 2, step 1"),
                                           ("simclr", "simclr epoch 2, step 1"),
                                           ("simclr-deepcluster", "deepcluster round 1 \\(epoch 2 of the run\\), step 1")])
def test_a_nan_loss_stops_the_run_at_its_step_and_keeps_the_finished_epoch(phantoms, tmp_path, monkeypatch,
                                                                          method, where):
    run = tmp_path / "run"
    poison_augment_after_first_checkpoint(monkeypatch, run)
    epochs = {"simclr": ["selfsup.epochs=3"], "simclr-deepcluster": ["selfsup.epochs=1"]}.get(method, [])
    with pytest.raises(TrainingDiverged, match=f"^{where}: the loss is nan, so training has diverged"):
        train_method(phantoms, run, method_config(method, 2, "train.device=cpu", *epochs))
    assert_first_epoch_kept(run)


def test_nan_weights_that_no_loss_of_this_process_showed_are_not_saved(phantoms, tmp_path, monkeypatch):
    # as under DDP, where another process's NaN loss reaches these weights through the all-reduce
    import bonecluster.methods.deepcluster as deepcluster

    monkeypatch.setattr(deepcluster, "loss_guard", lambda loop, where: lambda loss, step: 0.0)
    run = tmp_path / "run"
    poison_augment_after_first_checkpoint(monkeypatch, run)
    with pytest.raises(TrainingDiverged, match=r"^epoch 2: the network's \S+ holds NaN or infinite values.*its "
                                               r"checkpoint was not written; the last finished epoch's is kept"):
        train_method(phantoms, run, method_config("deepcluster", 2, "train.device=cpu"))
    assert_first_epoch_kept(run)


def test_features_that_are_not_numbers_are_named_as_the_network_s_not_as_bad_k_means_input(tmp_path):
    from bonecluster.engine import DeepClusterEngine

    engine = DeepClusterEngine(method_config("deepcluster", 1, "train.device=cpu"), tmp_path / "run", progress=False)
    feats = torch.randn(20, engine.model.feature_dim)
    feats[[3, 7], 0] = torch.nan
    with pytest.raises(TrainingDiverged, match="features of 2 of 20 films are NaN or infinite.*lower learning rate"):
        engine.cluster(feats, seed_offset=0, k=3)
    assert engine.cluster(feats.nan_to_num(), seed_offset=0, k=3)[0].assignments.shape == (20,)


def test_small_views_that_would_give_a_convolution_one_pixel_train_in_float32_under_bfloat16(phantoms, tmp_path,
                                                                                             monkeypatch, caplog):
    # This CPU's bfloat16 weight gradient of a stride-2 3x3 convolution over a 1x1 map was wrong (NaN or
    # garbage: benchmarks/bench_bf16_conv_grad.py); a ResNet's layer4 sees 1x1 maps at 16 px. bfloat16 is
    # forced (emulated where the CPU lacks it), as in test_engine.py's cpu_amp test.
    import bonecluster.device as device
    from bonecluster.engine import DeepClusterEngine
    from bonecluster.methods._two_view import TwoViewNet

    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    bf16 = ["train.device=cpu", "train.cpu_amp=true", "selfsup.local_crops=3", "selfsup.epochs=1"]

    def fallback_warnings():
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith("selfsup.local_crops: at")]

    with caplog.at_level("WARNING", logger="bonecluster"):
        wide = DeepClusterEngine(method_config("simclr", 0, *bf16, "selfsup.local_size=24"), tmp_path / "w",
                                 progress=False)
        assert wide.precision == "bfloat16" and not wide.method.local_float32 and not fallback_warnings()
        narrow = DeepClusterEngine(method_config("simclr", 0, *bf16), tmp_path / "n", progress=False)
    assert narrow.precision == "bfloat16" and narrow.method.local_float32   # only the small views leave autocast
    assert fallback_warnings() == [
        "selfsup.local_crops: at 16 px the network's backbone.layer4.0.conv1 sees 1x1 maps, where this CPU's "
        "bfloat16 weight gradient may be wrong (NaN or garbage; docs/RELIABILITY.md): the small views train in float32"]
    # training: the 16-px pass runs outside autocast, the 32-px pass inside (here, before the fallback, this
    # training diverged in 2 of 6 runs alone and once in a full suite on 2026-12-07)
    seen = []
    forward = TwoViewNet.forward
    monkeypatch.setattr(TwoViewNet, "forward", lambda self, x: seen.append((x.shape[-1], torch.is_autocast_enabled("cpu")))
                        or forward(self, x))
    try:
        train_method(phantoms, tmp_path / "run", method_config("simclr", 0, *bf16))
    except TrainingDiverged as err:   # another CPU, another fault: the log's tail names the machine
        warnings.warn(f"multi-crop in bfloat16 diverged on this CPU: {err}", stacklevel=1)
    assert seen and set(seen) == {(32, True), (16, False)}


def test_films_so_small_that_a_convolution_sees_one_pixel_train_in_float32(tmp_path, monkeypatch, caplog):
    import bonecluster.device as device
    from bonecluster.engine import DeepClusterEngine

    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    with caplog.at_level("INFO", logger="bonecluster"):
        small = DeepClusterEngine(method_config("deepcluster", 1, "train.device=cpu", "train.cpu_amp=true",
                                                "data.size=16"), tmp_path / "s", progress=False)
    assert small.precision == "float32"
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("data.size: at 16 px the network's backbone.layer4.0.conv1 sees 1x1 maps") for m in messages)
    assert not any("has no bfloat16 in hardware" in m for m in messages)   # it has: the size is the reason
    assert DeepClusterEngine(method_config("deepcluster", 1, "train.device=cpu", "train.cpu_amp=true"),
                             tmp_path / "b", progress=False).precision == "bfloat16"   # 32 px: 2x2 at layer4
    frozen = DeepClusterEngine(method_config("simclr", 0, "train.device=cpu", "train.cpu_amp=true", "data.size=16",
                                             "model.freeze=true", "selfsup.epochs=0"), tmp_path / "f", progress=False)
    assert frozen.precision == "bfloat16"   # a frozen backbone computes no convolution gradient


def test_every_guard_built_for_a_loop_names_the_loop_s_precision(tmp_path):
    from bonecluster.engine import DeepClusterEngine
    from bonecluster.methods._base import loss_guard

    engine = DeepClusterEngine(method_config("simclr", 1, "train.device=cpu", "train.cpu_amp=false"), tmp_path / "r",
                               progress=False)
    assert loss_guard(engine, "simclr epoch 1") == LossGuard("simclr epoch 1", "float32", "cpu")
