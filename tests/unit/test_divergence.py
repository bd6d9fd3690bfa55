"""bonecluster.divergence: training stops the step its numbers stop being numbers."""

from __future__ import annotations

import math

import pytest
import torch

from bonecluster.divergence import (LossGuard, TrainingDiverged, check_finite_features, check_finite_state,
                                    precision_hint)


def test_finite_losses_pass_through_and_the_first_bad_one_raises_naming_the_loop_and_step():
    guard = LossGuard("simclr epoch 3")
    assert [guard(v, s) for s, v in enumerate([2.5, 0.0, -1.0])] == [2.5, 0.0, -1.0]
    with pytest.raises(TrainingDiverged, match=r"^simclr epoch 3, step 4: the loss is nan, so training has diverged; "
                                               r"nothing of this epoch was saved; the checkpoints of finished epochs "
                                               r"are kept\. Try a lower learning rate\.$"):
        guard(math.nan, 3)
    with pytest.raises(TrainingDiverged, match="step 1: the loss is -inf.*; no weights file was written"):
        LossGuard("x", kept="no weights file was written")(-math.inf, 0)
    assert issubclass(TrainingDiverged, RuntimeError)   # the CLI prints it as one "error:" line


def test_the_advice_names_the_switch_for_the_precision_and_device_in_use():
    assert precision_hint("float32", "cpu") == "" and precision_hint("float32", "cuda") == ""
    assert precision_hint("bfloat16", "cpu") == ", or train in float32 instead of bfloat16 (--set train.cpu_amp=false)"
    assert precision_hint("float16", "cuda") == ", or train in float32 instead of float16 (--set train.amp=false)"
    with pytest.raises(TrainingDiverged, match=r"lower learning rate, or train in float32 instead of bfloat16 "
                                               r"\(--set train.cpu_amp=false\)\.$"):
        LossGuard("phantom pre-training 1/3", "bfloat16", "cpu")(math.nan, 0)


def test_a_state_check_names_the_first_parameter_or_buffer_that_is_not_finite():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    check_finite_state(net, "epoch 2", "", kept="k")   # finite: nothing raised
    net[1].running_var[2] = math.inf
    with pytest.raises(TrainingDiverged, match=r"^epoch 2: the network's 1.running_var holds NaN or infinite values, "
                                               r"so training has diverged; k\. Try a lower learning rate\.$"):
        check_finite_state(net, "epoch 2", "", kept="k")
    with torch.no_grad():
        net[0].weight[0, 0] = math.nan
    with pytest.raises(TrainingDiverged, match="network's 0.weight holds"):   # parameters before buffers
        check_finite_state(net, "epoch 2", "", kept="k")


def test_a_features_check_counts_the_films_whose_features_are_not_finite():
    feats = torch.zeros(5, 3)
    check_finite_features(feats, "")
    feats[1, 2], feats[4, 0] = math.nan, -math.inf
    with pytest.raises(TrainingDiverged, match="features of 2 of 5 films are NaN or infinite.*rate, or x\\.$"):
        check_finite_features(feats, ", or x")
