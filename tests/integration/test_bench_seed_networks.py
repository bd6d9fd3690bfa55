"""benchmarks/bench_seed_networks.py on tiny phantom runs: it must refit what the product fits."""

from __future__ import annotations

import json

import pytest

from bonecluster.cli import main
from bonecluster.data import PreparedDataset
from bonecluster.metrics import auroc
from bonecluster.stage2.parts import group_by_part
from bonecluster.stage2.scoring import ANOMALY, PartAnomaly
from tests.conftest import load_benchmark
from tests.integration.conftest import STAGE2_SETS, train_stage2_only

ONE_NETWORK = ["--set", "stage2.networks=1", "--set", "stage2.refine_rounds=1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two one-network stage-2 runs on the same phantoms, training seeds 0 and 1."""
    first = train_stage2_only(tmp_path_factory.mktemp("seednet0"), *ONE_NETWORK)
    second = tmp_path_factory.mktemp("seednet1")
    sets = [a for s in STAGE2_SETS for a in ("--set", s)]
    assert main(["train", str(first / "ph" / "train"), "--out", str(second / "run"), "--stages", "2", "--quiet",
                 *sets, *ONE_NETWORK, "--set", "seed=1"]) == 0
    return first, second


def test_one_network_refits_the_stored_refinement(runs, tmp_path):
    """With one network, the benchmark's refit must score the training images exactly as the run's
    own stored scorer does: the benchmark measures the product, not a copy of it."""
    first, _ = runs
    bench = load_benchmark("bench_seed_networks")
    result = bench.main(["--runs", str(first / "run"), "--eval", str(first / "ph" / "valid"), "--size", "1",
                         "--json", str(tmp_path / "r.json")])
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(result))
    data = PreparedDataset.load(first / "run" / "data.json")
    for part, pos in group_by_part(data).items():
        if part not in result["rows"][0]["networks"]["train"]:
            continue
        stored = PartAnomaly.load(first / "run" / "stage2" / part / ANOMALY)
        truth = data.abnormal(pos)
        assert result["rows"][0]["networks"]["train"][part] == pytest.approx(auroc(truth, stored.train_scores.numpy()))


def test_combinations_and_the_hog_seed(runs, tmp_path):
    first, second = runs
    bench = load_benchmark("bench_seed_networks")
    args = ["--runs", str(first / "run"), str(second / "run"), "--eval", str(first / "ph" / "valid")]
    pair = bench.main([*args, "--size", "2", "--hog-seed"])
    assert pair["combinations"] == 1 and set(pair["summary"]) == {"networks", "networks+hog"}
    singles = bench.main([*args, "--size", "1", "--max-combos", "1"])
    assert singles["combinations"] == 1
    for result in (pair, singles):
        for s in result["summary"].values():
            assert 0 <= s["held_out_min"] <= s["held_out_mean"] <= s["held_out_max"] <= 1
    hog = pair["hog_alone"]
    assert set(hog["held_out"]) | set(hog["not_refined"]) == set(pair["rows"][0]["networks"]["held_out"])
    # the HOG seed changes what the refinement starts from
    assert pair["rows"][0]["networks+hog"]["train"] != pair["rows"][0]["networks"]["train"]


def test_runs_of_other_data_and_bad_sizes_are_refused(runs, tmp_path, capsys):
    first, second = runs
    bench = load_benchmark("bench_seed_networks")
    with pytest.raises(SystemExit):
        bench.main(["--runs", str(first / "run"), "--eval", str(first / "ph" / "valid"), "--size", "2"])
    assert "--size" in capsys.readouterr().err
    other = json.loads((second / "run" / "data.json").read_text())
    other["records"], other["rows"] = other["records"][1:], other["rows"][1:]   # one image fewer
    other_run = tmp_path / "other"
    other_run.mkdir()
    (other_run / "data.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit):
        bench.main(["--runs", str(first / "run"), str(other_run), "--eval", str(first / "ph" / "valid"), "--size", "1"])
    assert "other images" in capsys.readouterr().err
