"""bonecluster.divergence: a training loop stops the step its loss stops being a number."""

from __future__ import annotations

import math

import pytest

from bonecluster.divergence import LossGuard, TrainingDiverged, precision_hint


def test_finite_losses_pass_through_and_the_first_bad_one_raises_naming_the_loop_and_step():
    guard = LossGuard("simclr epoch 3")
    assert [guard(v, s) for s, v in enumerate([2.5, 0.0, -1.0])] == [2.5, 0.0, -1.0]
    with pytest.raises(TrainingDiverged, match=r"simclr epoch 3, step 4: the loss is nan \(1 step\(s\) in a row\)"):
        guard(math.nan, 3)
    with pytest.raises(TrainingDiverged, match="the loss is inf"):
        LossGuard("x")(math.inf, 0)
    assert issubclass(TrainingDiverged, RuntimeError)   # the CLI prints it as one "error:" line


def test_a_loss_scaler_s_skipped_steps_are_tolerated_only_so_many_in_a_row():
    guard = LossGuard("deepcluster round 1", "float16", "cuda", tolerate=2)
    assert math.isnan(guard(math.nan, 0)) and math.isnan(guard(math.nan, 1))
    assert guard(1.0, 2) == 1.0 and guard.in_a_row == 0   # a finite step starts the count again
    guard(math.nan, 3), guard(-math.inf, 4)
    with pytest.raises(TrainingDiverged, match=r"step 6: the loss is nan \(3 step\(s\) in a row\).*train.amp=false"):
        guard(math.nan, 5)


def test_the_advice_names_the_switch_for_the_precision_and_device_in_use():
    assert precision_hint("float32", "cpu") == "" and precision_hint("float32", "cuda") == ""
    assert "--set train.cpu_amp=false" in precision_hint("bfloat16", "cpu")
    assert "--set train.amp=false" in precision_hint("float16", "cuda")
    with pytest.raises(TrainingDiverged, match="lower learning rate, or train in float32 instead of bfloat16 "
                                               r"\(--set train.cpu_amp=false\)\.$"):
        LossGuard("phantom pre-training 1/3", "bfloat16", "cpu")(math.nan, 0)
