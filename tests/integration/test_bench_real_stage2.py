"""benchmarks/bench_real_stage2.py end to end on the phantom stand-in for ../shared/data."""

from __future__ import annotations

import csv
import json

import pytest

from tests.conftest import load_benchmark
from tests.integration.test_bench_real_suite import _stand_in
from tests.integration.test_engine import TINY

TINY_S2 = TINY + ["stage2.epochs=1", "stage2.k=3", "stage2.min_images=5", "stage2.networks=2"]


def _sets(items):
    return [a for s in items for a in ("--set", s)]


def test_every_piece_is_scored_held_out_with_the_seed_agreement_the_probe_and_the_yardsticks(tmp_path,
                                                                                            single_torch_thread):
    data = _stand_in(tmp_path)
    bench = load_benchmark("bench_real_stage2")
    out = tmp_path / "r.json"
    work = tmp_path / "work"
    result = bench.main(["--data", str(data), "--work", str(work), "--source", "mura-humerus",
                         "--eval-source", "fracatlas-hand", "--labels-seeds", "0", "1", "--labels-fraction", "0.3",
                         "--ceiling", "--json", str(out), "--quiet", *_sets(TINY_S2)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["part"] == "HUMERUS" and result["size"] == 32 and result["train_seconds"] > 0
    # trained part networks (stage2.weights=same): no phantom pre-training asked for, none made
    assert 0 <= result["pretrain_seconds"] < 5 and not (work / "phantom-cache" / "phantom-weights").exists()
    own, other = result["evaluations"]["mura-humerus"], result["evaluations"]["fracatlas-hand"]
    for r in (own, other):
        for piece in ("knn_global", "knn_patch", "knn", "gauss_global", "gauss_patch", "label_free", "label_free_study"):
            assert 0 <= r[piece] <= 1
        assert r["refined"] and -1 <= r["seed_agreement"] <= 1
        assert set(r["checks"]) == {"seed_agreement", "framing", "warnings"}
        assert 0 <= r["sensitivity"] <= 1 and 0 <= r["specificity"] <= 1 and 0 <= r["flagged_share"] <= 1
    # FracAtlas films are each their own study: the study mean is the film's own score
    assert other["label_free_study"] == pytest.approx(other["label_free"])
    rows = own["few_label"]
    assert [x["labels_seed"] for x in rows] == [0, 1]
    assert all(x["auroc"] is None or 0 <= x["auroc"] <= 1 for x in rows)
    assert 0 <= own["yardstick"]["hog_sup"] <= 1 and 0 <= own["yardstick"]["cnn_sup"] <= 1
    assert "few_label" not in other and "yardstick" not in other
    # the split is by study: no study on both sides, and the training side alone was trained on
    with open(work / "mura-humerus" / "split" / "train.csv") as f:
        train_studies = {r["study"] for r in csv.DictReader(f)}
    with open(work / "mura-humerus" / "split" / "eval.csv") as f:
        eval_studies = {r["study"] for r in csv.DictReader(f)}
    assert train_studies and eval_studies and not (train_studies & eval_studies)
    assert own["n_train"] == sum(1 for _ in open(work / "mura-humerus" / "split" / "train.csv")) - 1
    # the FracAtlas region keeps only its single-region films (the stand-in's ELBOW is "hand+shoulder")
    with open(work / "fracatlas-hand" / "split" / "eval-hand.csv") as f:
        assert other["n_held_out"] == sum(1 for _ in csv.DictReader(f)) > 0
    # scoring a trained run again gives the same figures, without training
    again = bench.main(["--data", str(data), "--work", str(work), "--source", "mura-humerus", "--quiet",
                        "--run", str(work / "mura-humerus" / "run"), "--ceiling", "hog"])
    assert again["train_seconds"] is None and again["pretrain_seconds"] is None
    hog_only = again["evaluations"]["mura-humerus"]["yardstick"]
    assert hog_only["cnn_sup"] is None and hog_only["hog_sup"] == pytest.approx(own["yardstick"]["hog_sup"])
    assert again["evaluations"]["mura-humerus"]["label_free"] == pytest.approx(own["label_free"])


def test_a_missing_source_and_an_untrained_run_are_clear_errors(tmp_path):
    bench = load_benchmark("bench_real_stage2")
    with pytest.raises(SystemExit, match="mura-elbow: not found"):
        bench.main(["--data", str(tmp_path), "--work", str(tmp_path / "w"), "--source", "mura-elbow"])
    data = _stand_in(tmp_path)
    with pytest.raises(SystemExit, match="no trained stage-2 part model"):
        bench.main(["--data", str(data), "--work", str(tmp_path / "w"), "--source", "mura-elbow",
                    "--run", str(tmp_path / "nothing")])
