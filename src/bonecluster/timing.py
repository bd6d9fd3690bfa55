"""Where training time goes: optional phase timing of the engine's epochs.

The engine and the methods wrap their phases (cache reads, the feature and BN passes, PCA, each
k-means restart, augmentation, the training step, the checkpoint write) in ``timer.phase(name)``
and read their batches through ``timer.iterate("cache reads", loader)``. The engine's default
timer, :class:`NoTimer`, does nothing, so training is unchanged; ``benchmarks/bench_epoch.py``
gives it a :class:`PhaseTimer` to print where an epoch's time goes.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, TypeVar

import torch

T = TypeVar("T")
_END = object()


class NoTimer:
    """The default: phases cost nothing and are not recorded."""

    def phase(self, name: str) -> AbstractContextManager:
        return nullcontext()

    def iterate(self, name: str, iterable: Iterable[T]) -> Iterable[T]:
        return iterable


NO_TIMER = NoTimer()


@dataclass
class Lap:
    """One top-level phase: its wall seconds and the exclusive seconds of every phase inside it
    (itself included, for the time no nested phase accounts for). ``phases`` sums to ``seconds``."""

    name: str
    seconds: float
    phases: dict[str, float]


class PhaseTimer(NoTimer):
    """Wall seconds per named phase, each *exclusive* of the phases nested in it, so no second is
    counted twice. Closing a top-level phase (the engine's ``"epoch"``) appends a :class:`Lap`.

    On CUDA the device is synchronised at each phase's start and end, so a phase is charged for
    the kernels it launched (this removes the overlap an untimed run would have between phases).
    """

    def __init__(self, device: torch.device | str | None = None, clock: Callable[[], float] = time.perf_counter):
        self._cuda = device is not None and torch.device(device).type == "cuda"
        self._device = device
        self._clock = clock
        self._nested: list[float] = []      # per open phase: seconds of the phases closed inside it
        self._phases: dict[str, float] = {}  # exclusive seconds since the last lap
        self.laps: list[Lap] = []

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._sync()
        start = self._clock()
        self._nested.append(0.0)
        try:
            yield
        finally:
            self._sync()
            total = self._clock() - start
            self._phases[name] = self._phases.get(name, 0.0) + total - self._nested.pop()
            if self._nested:
                self._nested[-1] += total
            else:
                self.laps.append(Lap(name, total, self._phases))
                self._phases = {}

    def iterate(self, name: str, iterable: Iterable[T]) -> Iterator[T]:
        """The items of ``iterable``; starting it and waiting for each item count as phase ``name``."""
        with self.phase(name):
            items = iter(iterable)
        while True:
            with self.phase(name):
                item = next(items, _END)
            if item is _END:
                return
            yield item

    def _sync(self) -> None:
        if self._cuda:
            torch.cuda.synchronize(self._device)
