"""benchmarks/bench_phantom_findings.py on the phantom stand-in for ../shared/data."""

from __future__ import annotations

import csv
import json

import pytest

from bonecluster.config import load_config
from bonecluster.phantom_pretrain import pretrain_on_phantoms
from tests.conftest import load_benchmark
from tests.integration.test_bench_real_suite import _stand_in

PRETRAIN = ["data.size=32", "data.fit=letterbox", "phantoms.films=64", "phantoms.epochs=1", "phantoms.batch_size=16",
            "phantoms.validation_films=0", "train.device=cpu"]


def test_the_finding_score_and_the_phantom_knn_are_scored_on_each_sources_held_out_films(tmp_path,
                                                                                          single_torch_thread):
    data = _stand_in(tmp_path)
    weights = tmp_path / "pf.pt"
    pretrain_on_phantoms(load_config("cpu", overrides=PRETRAIN), weights, progress=False)
    out, work = tmp_path / "r.json", tmp_path / "work"
    result = load_benchmark("bench_phantom_findings").main(
        ["--data", str(data), "--work", str(work), "--weights", str(weights), "--json", str(out),
         "--sources", "mura-humerus", "fracatlas-hand", "--set", "stage2.pca_dim=8"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert list(result["sources"]) == ["mura-humerus", "fracatlas-hand"]
    for source, rows in result["sources"].items():
        r = rows[str(weights)]
        for piece in ("phantom_abnormality", "p_fracture", "p_plate", "p_lesion", "p_dislocation", "phantom_knn"):
            assert 0 <= r[piece] <= 1, (source, piece)
        assert 0 <= r["mean_score"] <= 1 and (r["framing_rho"] is None or -1 <= r["framing_rho"] <= 1)
        # the held-out films are bench_real_stage2's: its split, cut to the region for FracAtlas
        held_out = work / source / "split" / ("eval-hand.csv" if source == "fracatlas-hand" else "eval.csv")
        with open(held_out) as f:
            assert r["n_held_out"] == sum(1 for _ in csv.DictReader(f)) > 0


def test_weights_without_their_settings_are_a_clear_error(tmp_path):
    data = _stand_in(tmp_path)
    with pytest.raises(SystemExit, match="nothing.pt.json: not found"):
        load_benchmark("bench_phantom_findings").main(["--data", str(data), "--work", str(tmp_path / "w"),
                                                       "--weights", str(tmp_path / "nothing.pt"),
                                                       "--sources", "mura-elbow"])
