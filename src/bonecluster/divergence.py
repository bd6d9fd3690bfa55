"""Stop training the moment its numbers stop being numbers.

A NaN or infinite loss back-propagates NaN gradients, and the optimiser step then writes NaN into
the weights (a forward pass that overflows has already put NaN into BatchNorm's running
statistics). Unchecked, such a run goes on for the rest of its epochs and only fails at the next
k-means (``x contains NaN or infinite values``), far from the cause and after the time is spent.

- :class:`LossGuard` checks the loss value each step already reads (no extra device sync) and
  raises :class:`TrainingDiverged` at the first one that is not finite, naming the phase and step.
- :func:`check_finite_state` checks a network's parameters and buffers before they are saved, so
  that no checkpoint or weights file holds NaN (under DDP a NaN loss on another process reaches
  these weights through the gradients' all-reduce without passing this process's loss guard).
- :func:`check_finite_features` names NaN features as the network's fault before they reach
  k-means, whose own check could only call them bad input.

Every message says what to try (:func:`precision_hint`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class TrainingDiverged(RuntimeError):
    """Training produced NaN or infinite numbers; the message says where and what to try."""


def precision_hint(precision: str, device_type: str) -> str:
    """What to try besides a lower learning rate, for a loop computing in ``precision``
    (``float32``, ``bfloat16`` or ``float16``) on a ``device_type`` (``cpu``, ``cuda``, ``mps``)."""
    if precision == "float32":
        return ""
    if device_type == "cpu":   # oneDNN's bfloat16 kernels differ between CPUs (AVX512-BF16, AMX)
        return f", or train in float32 instead of {precision} (--set train.cpu_amp=false)"
    return f", or train in float32 instead of {precision} (--set train.amp=false)"


@dataclass(frozen=True)
class LossGuard:
    """Call it with each step's loss value: it returns the value while finite and raises
    :class:`TrainingDiverged` at the first that is not.

    ``where`` names the loop in the message (``"simclr epoch 3"``); ``precision`` and
    ``device_type`` choose the advice (:func:`precision_hint`); ``kept`` says what survives.
    """

    where: str
    precision: str = "float32"
    device_type: str = "cpu"
    kept: str = "nothing of this epoch was saved; the checkpoints of finished epochs are kept"

    def __call__(self, loss: float, step: int) -> float:
        if not math.isfinite(loss):
            raise TrainingDiverged(f"{self.where}, step {step + 1}: the loss is {loss}, so training has diverged; "
                                   f"{self.kept}. Try a lower learning rate"
                                   f"{precision_hint(self.precision, self.device_type)}.")
        return loss


def check_finite_state(module: torch.nn.Module, where: str, hint: str, kept: str) -> None:
    """Raise :class:`TrainingDiverged` naming the first parameter or buffer of ``module`` that
    holds a NaN or infinite value (``hint``: :func:`precision_hint`'s advice; ``kept``: what survives)."""
    tensors = [*module.named_parameters(), *module.named_buffers()]
    bad = next((name for name, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    if bad is not None:
        raise TrainingDiverged(f"{where}: the network's {bad} holds NaN or infinite values, so training has "
                               f"diverged; {kept}. Try a lower learning rate{hint}.")


def check_finite_features(feats: torch.Tensor, hint: str) -> None:
    """Raise :class:`TrainingDiverged` when rows of the ``(N, D)`` features are not finite: the
    network (its weights, BatchNorm statistics or a low-precision forward pass) is at fault."""
    bad = int((~torch.isfinite(feats).all(dim=1)).sum())
    if bad:
        raise TrainingDiverged(f"the network's features of {bad} of {len(feats)} films are NaN or infinite, so they "
                               f"cannot be clustered: its weights or BatchNorm statistics are not finite, or its "
                               f"forward pass overflowed. Try a lower learning rate{hint}.")
