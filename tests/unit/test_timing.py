"""bonecluster.timing: exclusive phase seconds, laps, timed iteration, and the no-op default.

A fake clock that only moves when the test moves it makes every figure exact."""

from __future__ import annotations

import pytest
import torch

from bonecluster.cluster import kmeans, kmeans_best_of
from bonecluster.timing import Lap, NoTimer, PhaseTimer, format_phase_table, phase_group, phase_rows


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_nested_phases_count_once_and_a_top_level_phase_closes_a_lap():
    clock = Clock()
    timer = PhaseTimer(clock=clock)
    with timer.phase("epoch"):
        clock.now += 1
        with timer.phase("a"):
            clock.now += 2
            with timer.phase("b"):
                clock.now += 4
        with timer.phase("a"):
            clock.now += 8
    assert timer.laps == [Lap("epoch", 15.0, {"b": 4.0, "a": 10.0, "epoch": 1.0})]
    with timer.phase("x"):
        clock.now += 16
    assert timer.laps[1] == Lap("x", 16.0, {"x": 16.0})   # a new lap starts from nothing


def test_iterate_charges_the_wait_for_each_item_to_its_phase():
    clock = Clock()
    timer = PhaseTimer(clock=clock)

    def slow_items():
        clock.now += 100   # starting the iteration (a DataLoader starting its workers)
        for i in range(3):
            clock.now += 1
            yield i

    with timer.phase("epoch"):
        seen = []
        for item in timer.iterate("reads", slow_items()):
            with timer.phase("work"):
                clock.now += 10
            seen.append(item)
    assert seen == [0, 1, 2]
    assert timer.laps == [Lap("epoch", 133.0, {"reads": 103.0, "work": 30.0, "epoch": 0.0})]


def test_a_phase_that_raises_is_counted_and_the_error_passes_through():
    clock = Clock()
    timer = PhaseTimer(clock=clock)
    with pytest.raises(RuntimeError):
        with timer.phase("epoch"):
            with timer.phase("a"):
                clock.now += 3
                raise RuntimeError("boom")
    assert timer.laps == [Lap("epoch", 3.0, {"a": 3.0, "epoch": 0.0})]


def test_the_default_timer_does_nothing():
    items = [1, 2]
    timer = NoTimer()
    assert timer.iterate("reads", items) is items
    with timer.phase("a"):
        pass
    assert not hasattr(timer, "laps")


def test_kmeans_best_of_times_each_restart_and_keeps_its_result():
    x = torch.randn(200, 4, generator=torch.Generator().manual_seed(0))
    timer = PhaseTimer()
    with timer.phase("round"):
        timed = kmeans_best_of(x, 5, [1, 2, 3], niter=3, backend="torch", timer=timer)
    plain = kmeans_best_of(x, 5, [1, 2, 3], niter=3, backend="torch")
    assert torch.equal(timed.assignments, plain.assignments) and timed.inertia == plain.inertia
    assert timed.inertia == min(kmeans(x, 5, niter=3, seed=s, backend="torch").inertia for s in (1, 2, 3))
    assert set(timer.laps[0].phases) == {"round", "k-means restart 1", "k-means restart 2", "k-means restart 3"}


def test_phase_rows_fold_engine_phases_into_the_table_groups():
    clock = Clock()
    timer = PhaseTimer(clock=clock)
    with timer.phase("phantoms"):
        clock.now += 3
    with timer.phase("stage 1"):
        clock.now += 1                      # the stage's own time, outside every nested phase
        with timer.phase("epoch"):
            with timer.phase("features"):
                clock.now += 2
            with timer.phase("k-means restart 1"):
                clock.now += 4
            with timer.phase("k-means restart 2"):
                clock.now += 4
            with timer.phase("pca"):
                clock.now += 1
            with timer.phase("augmentation"):
                clock.now += 5
            with timer.phase("training step"):
                clock.now += 10
    rows = phase_rows(timer.laps)
    assert rows[0] == {"phase": "phantoms", "seconds": 3.0, "inside": {}}
    assert rows[1]["seconds"] == 27.0
    assert rows[1]["inside"] == {"other": 1.0, "feature pass": 2.0, "k-means": 9.0, "training": 15.0}
    assert sum(rows[1]["inside"].values()) == rows[1]["seconds"]   # nothing counted twice or lost
    assert phase_group("bn stats") == "BN pass" and phase_group("something new") == "other"


def test_phase_table_details_only_the_named_phases_and_shares_the_total():
    rows = [{"phase": "stage 1", "seconds": 30.0, "inside": {"training": 20.0, "k-means": 10.0}},
            {"phase": "stage 2 HAND", "seconds": 10.0, "inside": {"training": 10.0}}]
    lines = format_phase_table(rows, total=40.0).splitlines()
    assert lines[1].split() == ["stage", "1", "30.0", "75%"]
    assert lines[2].split() == ["training", "20.0", "50%"]     # largest first, indented
    assert lines[3].split() == ["k-means", "10.0", "25%"]
    assert lines[4].split() == ["stage", "2", "HAND", "10.0", "25%"]   # not detailed
    assert lines[5].split() == ["total", "40.0"]
