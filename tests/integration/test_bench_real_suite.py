"""benchmarks/bench_real_suite.py end to end on a phantom stand-in for ../shared/data."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from bonecluster.data.phantoms import generate_phantoms
from tests.conftest import load_benchmark
from tests.integration.test_engine import TINY

REGION = {"FINGER": "hand", "HAND": "hand", "WRIST": "hand", "FOREARM": "hand", "SHOULDER": "shoulder",
          "HUMERUS": "leg", "ELBOW": "hand+shoulder"}   # stand-ins; ELBOW is a two-region film


def _stand_in(root: Path) -> Path:
    """The layout of ../shared/data, filled with phantoms (paths and label columns as documented)."""
    generate_phantoms(root / "ph", n=140, size=64, seed=3, progress=False, workers=1)
    films = sorted((root / "ph" / "train").glob("XR_*/*/*/*.png"))
    data = root / "data"
    for name, part in (("mura-elbow", "ELBOW"), ("mura-humerus", "HUMERUS"), ("mura-humerus-64", "HUMERUS")):
        shutil.copytree(root / "ph" / "train" / f"XR_{part}", data / name / "train" / f"XR_{part}")
    for name, columns in (("fracture-parts", ["path", "body_part", "abnormal"]),
                          ("fracatlas", ["path", "body_part", "abnormal", "region", "view", "hardware"])):
        (data / name / "images").mkdir(parents=True)
        with open(data / name / "manifest.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(columns)
            for i, film in enumerate(films):
                part = film.parts[-4][3:]
                if name == "fracture-parts" and part in ("ELBOW", "HUMERUS", "HAND") and i % 3:
                    continue
                shutil.copy(film, data / name / "images" / f"f{i}.png")
                row = [f"images/f{i}.png", part if name == "fracture-parts" else "", int("positive" in film.parts[-2])]
                w.writerow(row + ([REGION[part], "frontal", 0] if name == "fracatlas" else []))
    (data / "mura-unlabelled").mkdir()
    for film in films[:5]:
        shutil.copy(film, data / "mura-unlabelled" / f"u-{film.parts[-3]}-{film.name}")
    return data


def test_the_suite_trains_once_and_scores_three_evaluations_with_their_ceilings(tmp_path, single_torch_thread):
    data = _stand_in(tmp_path)
    out = tmp_path / "result.json"
    sets = [a for s in TINY + ["train.epochs=1", "selfsup.epochs=1", "cluster.n_init=1", "model.weights=none"] for a in ("--set", s)]
    result = load_benchmark("bench_real_suite").main(["--data", str(data), "--work", str(tmp_path / "work"),
                                                      "--kmeans-restarts", "2", "--json", str(out), "--quiet", *sets])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    evals = result["evaluations"]
    assert set(evals) == {"a", "b", "c"}
    assert evals["b"]["classes"] == ["ELBOW", "HUMERUS"] and evals["b"]["k"] == 2
    assert evals["c"]["classes"] == ["hand", "leg", "shoulder"]   # the two-region films are not scored
    assert evals["a"]["k"] == len(evals["a"]["classes"]) == 7
    for e in evals.values():
        assert len(e["hungarian_scores"]) == 2 and 1 / e["k"] <= e["hungarian_mean"] <= 1
        assert 0 <= e["probe_embedding"] <= 1 and 0 <= e["probe_pooled"] <= 1
        assert abs(e["ratio"] - e["hungarian_mean"] / e["probe_embedding"]) < 1e-9
        assert 0 < e["held_out_scored"] <= e["held_out_films"]
        assert 1 / e["k"] <= e["majority_share"] <= 1
        assert -1 <= e["ari_mean"] <= 1 and e["ari_std"] >= 0
    assert 0 <= evals["a"]["run_clusters_hungarian"] <= 1
    # the pool is every training side plus the unlabelled films, and nothing held out
    held_out = set()
    for name in ("fracture-parts", "mura-humerus", "mura-elbow", "fracatlas"):
        with open(tmp_path / "work" / "splits" / name / "eval.csv") as f:
            held_out |= {row["path"] for row in csv.DictReader(f)}
    trained = json.loads((tmp_path / "work" / "run" / "data.json").read_text())
    trained_paths = {os.path.abspath(r["path"]) for r in trained["records"]}
    assert trained_paths and not (trained_paths & held_out)
    assert result["train_films"] == len(trained_paths)
    # the same network scored again: --space pca reproduces the run's own space, phantom-parts changes it
    suite, run = load_benchmark("bench_real_suite"), str(tmp_path / "work" / "run")
    common = ["--data", str(data), "--work", str(tmp_path / "work"), "--run", run, "--kmeans-restarts", "2", "--quiet"]
    again = suite.main([*common, "--space", "pca"])
    for key, e in evals.items():
        assert abs(again["evaluations"][key]["hungarian_mean"] - e["hungarian_mean"]) < 0.02
    assert again["embedding_dim"] == result["embedding_dim"] == 16
    assert "run_clusters_hungarian" not in again["evaluations"]["a"]   # the run's clusters are in the old space
    inside = suite.main([*common, "--space", "phantom-parts", "--subspace-films", "70"])
    assert inside["space"] == "phantom-parts" and inside["embedding_dim"] == 6
    # another space for the same network: cluster.* overrides apply to the re-fit, nothing else is taken
    whitened = suite.main([*common, "--space", "pca", "--set", "cluster.eigen_power=-0.5"])
    assert whitened["overrides"] == ["cluster.eigen_power=-0.5"] and whitened["embedding_dim"] == 16
    assert whitened["eigen_power"] == -0.5 and result["eigen_power"] == again["eigen_power"] == 0   # cpu-real's
    from bonecluster.checkpoint import TrainedClusters
    from bonecluster.config import apply_override

    pool = suite.pool_sources("all", data, suite.split_all(data, tmp_path / "work"))
    for power, unit_scale in ((0, True), (-0.5, False)):   # the re-fit space follows the power it is given
        trained = TrainedClusters.load(Path(run) / "stage1")
        trained.cfg = apply_override(trained.cfg, f"cluster.eigen_power={power}")
        suite.refit_space(trained, "pca", pool, tmp_path / "work" / "run" / "cache", 70)
        assert torch.equal(trained.pca.scale, torch.ones_like(trained.pca.scale)) == unit_scale
    # over-clusters merged through shared studies: only (b) has studies; (a) and (c) score as before
    assert not any(e["study_links"] for e in evals.values())   # cpu-real's 30: no more films than that in (b) here
    linked = suite.main([*common, "--set", "cluster.study_links=6"])["evaluations"]
    assert linked["b"]["study_links"] == 2 and linked["a"]["study_links"] == linked["c"]["study_links"] == 0
    for key in "ac":
        assert linked[key]["hungarian_scores"] == evals[key]["hungarian_scores"]
        assert linked[key]["hungarian_study_vote"] is None
    assert 0 < linked["b"]["hungarian_study_vote"] <= 1
    # the final k-means' restarts change with the run's space kept: the run's own n_init gives its scores back
    same = suite.main([*common, "--set", "cluster.n_init=1"])["evaluations"]
    assert all(same[key]["hungarian_scores"] == evals[key]["hungarian_scores"] for key in "abc")
    more = suite.main([*common, "--set", "cluster.n_init=4"])
    assert more["overrides"] == ["cluster.n_init=4"] and len(more["evaluations"]["a"]["hungarian_scores"]) == 2
    for bad in (["--space", "pca", "--set", "train.lr=0.1"], ["--set", "cluster.eigen_power=0"],
                ["--space", "pca", "--set", "cluster.subspace=phantom-parts"]):
        with pytest.raises(SystemExit, match="cluster"):
            suite.main([*common, *bad])
