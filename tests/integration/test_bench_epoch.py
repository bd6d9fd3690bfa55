"""benchmarks/bench_epoch.py on tiny phantoms, and the engine's phase timing changing nothing."""

from __future__ import annotations

import json

import numpy as np
import torch

from bonecluster.checkpoint import FINAL_MODEL, load_torch
from bonecluster.config import load_config
from bonecluster.data import prepare_sources
from bonecluster.data.phantoms import generate_phantoms
from bonecluster.engine import DeepClusterEngine
from bonecluster.timing import PhaseTimer
from tests.conftest import load_benchmark
from tests.integration.test_engine import TINY

# the cpu preset as it is (precise BN, three k-means restarts, study-level clusters), tiny sizes
SETS = TINY + ["data.workers=1", "train.device=cpu"]
PHASES = ["cache reads", "bn stats", "features", "pca", "k-means restart 1", "k-means restart 2",
          "k-means restart 3", "augmentation", "training step", "checkpoint write", "other"]


def test_the_phase_table_accounts_for_the_epoch_and_the_floor_is_measured(tmp_path, single_torch_thread):
    out = tmp_path / "epoch.json"
    sets = [a for s in SETS for a in ("--set", s)]
    result = load_benchmark("bench_epoch").main(["--n", "64", "--size", "32", "--work", str(tmp_path / "work"),
                                                 "--json", str(out), "--quiet", *sets])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["images"] == result["feature_images"] == result["train_images"] == 64
    assert result["size"] == 32 and result["device"] == "cpu" and result["feature_bn"] == "recompute"
    phases = result["phases"]
    assert [p["phase"] for p in phases] == PHASES
    assert all(p["seconds"] > 0 for p in phases)
    epoch = result["epoch_seconds"]
    assert sum(p["seconds"] for p in phases) <= epoch * (1 + 1e-9)
    assert abs(sum(p["share"] for p in phases) - 1) < 1e-6   # nothing in the epoch is left out either
    # The method's own clock (rounded to 0.01 s) spans every phase but the checkpoint write and part
    # of "other": phases counted twice would exceed it.
    seconds = {p["phase"]: p["seconds"] for p in phases}
    inside = sum(s for name, s in seconds.items() if name not in ("checkpoint write", "other"))
    assert inside <= result["engine_row"]["seconds"] + 0.006
    assert result["engine_row"]["seconds"] + seconds["checkpoint write"] <= epoch + 0.006
    floor = result["floor"]
    assert floor["train_seconds"] > 0 and floor["feature_seconds"] > 0
    assert abs(floor["seconds"] - floor["train_seconds"] - floor["feature_seconds"]) < 1e-9
    first, second = result["floor_runs"]   # the floor is each pass's faster run of the two
    for key in ("train_seconds", "feature_seconds"):
        assert floor[key] == min(first[key], second[key])
    assert abs(result["floor_drift"] - second["seconds"] / first["seconds"]) < 1e-9
    assert result["floor_ratio"] > 0 and result["train_step_ratio"] > 0 and result["feature_ratio"] > 0
    assert abs(result["floor_ratio"] - result["engine_images_per_s"] / result["floor_images_per_s"]) < 1e-9
    assert abs(result["engine_images_per_s"] - 128 / epoch) < 1e-6
    assert result["peak_rss_mb"] > 0


def test_phase_timing_leaves_the_engine_s_results_unchanged(tmp_path, single_torch_thread):
    generate_phantoms(tmp_path / "ph", n=56, size=64, seed=3, progress=False, workers=1)
    cfg = load_config("cpu", overrides=SETS + ["train.epochs=2"])
    data = prepare_sources([tmp_path / "ph"], cfg.data, cache=tmp_path / "cache", progress=False)
    plain = DeepClusterEngine(cfg, tmp_path / "plain", progress=False).fit(data)
    engine = DeepClusterEngine(cfg, tmp_path / "timed", progress=False)
    engine.timer = PhaseTimer(engine.device)
    timed = engine.fit(data)
    np.testing.assert_array_equal(timed.assignments, plain.assignments)
    for key in ("loss", "nmi_prev", "cluster_sizes", "largest_share"):
        assert [row[key] for row in timed.history] == [row[key] for row in plain.history]
    weights = [load_torch(tmp_path / run / FINAL_MODEL)["model"] for run in ("plain", "timed")]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    # both epochs were timed, then the final clustering as one lap of its own
    laps = engine.timer.laps
    assert [lap.name for lap in laps] == ["epoch", "epoch", "final clusters"]
    assert {"bn stats", "features", "pca", "k-means restart 3"} <= set(laps[2].phases)
