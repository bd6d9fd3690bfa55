"""Stop a training loop the step its loss stops being a number.

A NaN or infinite loss back-propagates NaN gradients, and one optimiser step then turns every
weight into NaN. Unchecked, the run goes on for the rest of its epochs and only fails at the next
k-means (``x contains NaN or infinite values``), far from the cause and after the time is spent.
:class:`LossGuard` checks the loss value the loop already reads each step (no extra device sync)
and raises :class:`TrainingDiverged`, naming the phase, the step and what to try. Raised inside an
epoch, it keeps that epoch's checkpoint from being written: the last finished epoch's stays.

Under float16 autocast a loss scaler (``torch.amp.GradScaler``) skips a step whose gradients are
not finite instead of applying it, so the weights survive; there a few such steps in a row are
allowed before the guard raises.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite; the message says where and what to try."""


def precision_hint(precision: str, device_type: str) -> str:
    """What to try besides a lower learning rate, for a loop computing in ``precision``
    (``float32``, ``bfloat16`` or ``float16``) on a ``device_type`` (``cpu``, ``cuda``, ``mps``)."""
    if precision == "float32":
        return ""
    if device_type == "cpu":   # oneDNN's bfloat16 kernels differ between CPUs (AVX512-BF16, AMX)
        return f", or train in float32 instead of {precision} (--set train.cpu_amp=false)"
    return f", or train in float32 instead of {precision} (--set train.amp=false)"


@dataclass
class LossGuard:
    """Call it with each step's loss value; it returns the value while finite and raises
    :class:`TrainingDiverged` once ``tolerate + 1`` steps in a row were not.

    ``where`` names the loop in the message (``"simclr epoch 3"``); ``precision`` and
    ``device_type`` choose the advice (:func:`precision_hint`); ``tolerate`` is 0 unless a loss
    scaler skips the bad steps (float16 on CUDA).
    """

    where: str
    precision: str = "float32"
    device_type: str = "cpu"
    tolerate: int = 0
    in_a_row: int = 0

    def __call__(self, loss: float, step: int) -> float:
        if math.isfinite(loss):
            self.in_a_row = 0
            return loss
        self.in_a_row += 1
        if self.in_a_row > self.tolerate:
            raise TrainingDiverged(
                f"{self.where}, step {step + 1}: the loss is {loss} ({self.in_a_row} step(s) in a row), so the "
                f"network's weights are no longer usable. Nothing of this epoch was saved; the checkpoints of "
                f"finished epochs are kept. Try a lower learning rate"
                f"{precision_hint(self.precision, self.device_type)}.")
        return loss
