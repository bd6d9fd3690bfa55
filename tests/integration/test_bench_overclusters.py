"""benchmarks/bench_overclusters.py: the naming and merging pieces exactly, and end to end on a phantom stand-in."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import load_benchmark
from tests.integration.test_bench_real_suite import _stand_in
from tests.integration.test_engine import TINY


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_overclusters")


def test_each_cluster_is_named_by_its_commonest_label_and_an_unlabelled_one_stays_unnamed(bench):
    clusters = np.array([0, 0, 0, 1, 1, 2, 2])
    labels = np.array(["a", "a", "b", "", "c", "", ""])
    assert bench.majority_names(clusters, labels, 4).tolist() == ["a", "c", "", ""]


@pytest.mark.parametrize("how", ["ward", "average", "complete", "spectral"])
def test_every_merge_joins_the_centroids_that_point_the_same_way(bench, how):
    centroids = np.array([[1.0, 0.05, 0], [1.0, -0.05, 0], [0, 1.0, 0.05], [0.02, 1.0, -0.05], [0.03, 0.02, 1.0]])
    groups = bench.merge_centroids(centroids, 3, how, seed=0)
    assert groups[0] == groups[1] and groups[2] == groups[3] and len(set(groups.tolist())) == 3
    with pytest.raises(ValueError, match="unknown merge 'median'"):
        bench.merge_centroids(centroids, 3, "median", seed=0)


def test_variants_score_separated_blobs_and_named_reads_the_training_labels(bench):
    rng = np.random.default_rng(0)
    centres = np.eye(3) * 5
    def blobs(n):
        y = np.repeat(np.array(["x", "y", "z"]), n)
        return np.concatenate([c + rng.normal(0, 0.1, (n, 3)) for c in centres]), y
    e_tr, y_tr = blobs(20)
    e_ev, y_ev = blobs(5)
    for variant in ("k", "15-named", "15-average", "15-spectral"):
        assert bench.score_variant(variant, e_tr, y_tr, e_ev, y_ev, 3, seed=0) == 1.0
    wrong = np.where(y_tr == "x", "y", y_tr)   # the training labels name every x film y
    assert bench.score_variant("15-named", e_tr, wrong, e_ev, y_ev, 3, seed=0) == pytest.approx(2 / 3)


def test_the_benchmark_scores_a_trained_run_on_the_suites_split(tmp_path, single_torch_thread, bench):
    data = _stand_in(tmp_path)
    sets = [a for s in TINY + ["train.epochs=1", "selfsup.epochs=1", "cluster.n_init=1", "model.weights=none"] for a in ("--set", s)]
    work = str(tmp_path / "work")
    load_benchmark("bench_real_suite").main(["--data", str(data), "--work", work, "--kmeans-restarts", "1", "--quiet", *sets])
    out = tmp_path / "over.json"
    result = bench.main(["--data", str(data), "--work", work, "--run", str(tmp_path / "work" / "run"), "--restarts", "2",
                         "--evaluations", "b", "c", "--variants", "k", "15-named", "15-ward", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert set(result["evaluations"]) == {"b", "c"}
    for e in result["evaluations"].values():
        assert set(e["variants"]) == {"k", "15-named", "15-ward"}
        for row in e["variants"].values():
            assert len(row["scores"]) == 2 and 0 <= row["mean"] <= 1
    again = bench.main(["--data", str(data), "--work", work, "--run", str(tmp_path / "work" / "run"), "--restarts", "2",
                        "--evaluations", "b", "--variants", "15-named", "60-average"])
    # the same seeds give the same figures; a variant with more clusters than training films is skipped
    assert again["evaluations"]["b"]["variants"] == {"15-named": result["evaluations"]["b"]["variants"]["15-named"]}
