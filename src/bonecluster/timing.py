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


# How the engine's phases fold into the rows of a phase table (``bonecluster demo``); the rest,
# including the time a phase spends outside every nested one, count as "other".
_PHASE_GROUPS = {"features": "feature pass", "bn stats": "BN pass", "pca": "k-means",
                 "training step": "training", "augmentation": "training", "cache reads": "cache reads",
                 "checkpoint write": "checkpoints"}


def phase_group(name: str) -> str:
    """The table row an engine phase counts towards: "k-means restart 2" -> "k-means"."""
    return "k-means" if name.startswith("k-means restart") else _PHASE_GROUPS.get(name, "other")


def phase_rows(laps: Iterable[Lap]) -> list[dict]:
    """One row per top-level phase, in order: ``{"phase", "seconds", "inside"}`` where ``inside``
    maps :func:`phase_group` names to seconds (empty when nothing was timed inside the phase)."""
    rows = []
    for lap in laps:
        inside: dict[str, float] = {}
        for name, seconds in lap.phases.items():
            group = "other" if name == lap.name else phase_group(name)
            inside[group] = inside.get(group, 0.0) + seconds
        rows.append({"phase": lap.name, "seconds": round(lap.seconds, 2),
                     "inside": {g: round(s, 2) for g, s in inside.items()} if set(inside) != {"other"} else {}})
    return rows


def format_phase_table(rows: list[dict], total: float | None = None, detail: tuple[str, ...] = ("stage 1",)) -> str:
    """The rows of :func:`phase_rows` as text: seconds and share of ``total`` (default: their sum);
    the inside rows of the phases named in ``detail`` indented under them, largest first."""
    total = total if total else sum(r["seconds"] for r in rows) or 1.0
    lines = [f"{'phase':<24}{'seconds':>9}{'share':>8}"]
    for r in rows:
        lines.append(f"{r['phase']:<24}{r['seconds']:>9.1f}{r['seconds'] / total:>8.0%}")
        inside = r["inside"] if r["phase"] in detail else {}
        for group, seconds in sorted(inside.items(), key=lambda gs: -gs[1]):
            lines.append(f"{'  ' + group:<24}{seconds:>9.1f}{seconds / total:>8.0%}")
    lines.append(f"{'total':<24}{total:>9.1f}")
    return "\n".join(lines)
