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
    for variant in ("k", "15-named", "15-average", "15-spectral", "graph-spectral", "graph-ward"):
        assert bench.score_variant(variant, e_tr, y_tr, e_ev, y_ev, 3, seed=0) == 1.0
    wrong = np.where(y_tr == "x", "y", y_tr)   # the training labels name every x film y
    assert bench.score_variant("15-named", e_tr, wrong, e_ev, y_ev, 3, seed=0) == pytest.approx(2 / 3)


def test_graph_spectral_follows_the_neighbour_graphs_pieces_where_k_means_cuts_a_long_chain(bench):
    # 61 films along a 150-degree arc (one class, neighbour to neighbour alike) and 15 at the pole: two pieces of
    # the 10-NN graph (hence the warning). Joined by a bridge of films, neither graph variant keeps the arc whole.
    angles = np.deg2rad(np.linspace(0, 150, 61))
    arc = np.stack([np.cos(angles), np.sin(angles), np.zeros_like(angles)], 1)
    pole = np.array([0, 0, 1.0]) + np.random.default_rng(0).normal(0, 0.02, (15, 3))
    e = np.concatenate([arc, pole / np.linalg.norm(pole, axis=1, keepdims=True)])
    y = np.array(["arc"] * 61 + ["pole"] * 15)
    assert bench.score_variant("k", e, y, e, y, 2, seed=0) < 0.7
    with pytest.warns(UserWarning, match="not fully connected"):
        assert bench.score_variant("graph-spectral", e, y, e, y, 2, seed=0) == 1.0
    with pytest.raises(ValueError, match="unknown graph grouping 'single'"):
        bench.group_films_on_graph(e, 2, "single", seed=0)


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_a_mixture_keeps_a_wide_class_whole_beside_tight_ones_where_k_means_cuts_it(bench, covariance):
    rng = np.random.default_rng(0)
    wide, tight_a, tight_b = rng.normal(0, 2.5, (120, 2)), rng.normal([9, 0], 0.3, (20, 2)), rng.normal([0, 9], 0.3, (20, 2))
    e = np.concatenate([wide, tight_a, tight_b])
    y = np.array(["wide"] * 120 + ["a"] * 20 + ["b"] * 20)
    assert bench.score_variant("k", e, y, e, y, 3, seed=0) < 0.9
    assert bench.score_variant(f"gmm-{covariance}", e, y, e, y, 3, seed=0) > 0.98


def test_only_a_full_covariance_follows_a_tilted_class(bench):
    rng = np.random.default_rng(0)
    t = rng.uniform(-10, 10, 150)
    tilted = np.stack([t, t], 1) + rng.normal(0, 0.3, (150, 2))   # along the diagonal: no axis-aligned spread fits it
    e = np.concatenate([tilted, rng.normal([3, -3], 0.3, (40, 2)), rng.normal([-3, 3], 0.3, (40, 2))])
    y = np.array(["tilted"] * 150 + ["a"] * 40 + ["b"] * 40)
    assert bench.score_variant("gmm-full", e, y, e, y, 3, seed=0) == 1.0
    assert bench.score_variant("gmm-diag", e, y, e, y, 3, seed=0) < 0.7


def test_held_out_films_take_the_commonest_group_of_their_nearest_training_films(bench):
    e_tr = np.array([[1.0, 0.0], [0.9, 0.2], [0.9, 0.25], [0.0, 1.0], [0.1, 1.0]])
    groups = np.array([1, 0, 0, 2, 2])
    # the first film's nearest training film is in group 1, but two of its three nearest are in group 0
    assert bench.assign_by_neighbours(e_tr, groups, np.array([[1.0, 0.0], [0.0, 1.0]]), neighbours=3).tolist() == [0, 2]


def test_truth_check_measures_how_far_the_classes_are_from_the_k_means_optimum(bench):
    # class A: films at (0, 0) and (10, 0); class B at (5, 3). A's mean (5, 0), so A's sum of squares is 8 * 25 = 200;
    # k-means' best is {(0, 0)} against {(5, 3), (10, 0)}: 8 * (2.5**2 + 1.5**2) = 68. The classes are still a fixed
    # point of k-means (each film is nearer its own class mean), so started there it stays.
    films = np.repeat(np.array([[0, 0], [10, 0], [5, 3.0]]), 4, axis=0)
    labels = np.repeat(np.array(["A", "A", "B"]), 4)
    # held out: one film of each kind, an A film at (8, 0.5), an A film at (5, 2) nearer B's mean, an unlabelled one
    held = np.array([[0, 0], [10, 0], [5, 3], [8, 0.5], [5, 2], [1, 1.0]])
    held_labels = np.array(["A", "A", "B", "A", "A", ""])
    got = bench.truth_check(films, labels, held, held_labels)
    assert got["inertia_ratio"] == pytest.approx(200 / 68)
    assert got["from_truth_inertia_ratio"] == pytest.approx(200 / 68)
    assert got["nearest_mean"] == pytest.approx(4 / 5) and got["from_truth"] == pytest.approx(4 / 5)
    # k-means: {(0, 0)} and {(10, 0), (5, 3), (8, 0.5), (5, 2)}; at best 3 of the 5 scored films
    assert got["kmeans"] == pytest.approx(3 / 5)
    assert got["from_truth_iterations"] >= 1
    # an unlabelled training film is left out, as if it were not there
    assert (bench.truth_check(films, np.append(labels[:-1], ""), held, held_labels)
            == bench.truth_check(films[:-1], labels[:-1], held, held_labels))


def test_the_benchmark_scores_a_trained_run_on_the_suites_split(tmp_path, single_torch_thread, bench):
    data = _stand_in(tmp_path)
    sets = [a for s in TINY + ["train.epochs=1", "selfsup.epochs=1", "cluster.n_init=1", "model.weights=none"] for a in ("--set", s)]
    work = str(tmp_path / "work")
    load_benchmark("bench_real_suite").main(["--data", str(data), "--work", work, "--kmeans-restarts", "1", "--quiet", *sets])
    out = tmp_path / "over.json"
    result = bench.main(["--data", str(data), "--work", work, "--run", str(tmp_path / "work" / "run"), "--restarts", "2",
                         "--evaluations", "b", "c", "--variants", "k", "15-named", "15-ward", "--truth", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert set(result["evaluations"]) == {"b", "c"}
    for e in result["evaluations"].values():
        assert set(e["variants"]) == {"k", "15-named", "15-ward"}
        for row in e["variants"].values():
            assert len(row["scores"]) == 2 and 0 <= row["mean"] <= 1
        truth = e["truth"]
        assert set(truth) == {"inertia_ratio", "from_truth_inertia_ratio", "from_truth_iterations", "nearest_mean",
                              "from_truth", "kmeans"}
        # k-means started at the class means can only lower their sum of squares
        assert truth["from_truth_inertia_ratio"] <= truth["inertia_ratio"] + 1e-9
        assert all(0 <= truth[key] <= 1 for key in ("nearest_mean", "from_truth", "kmeans"))
    again = bench.main(["--data", str(data), "--work", work, "--run", str(tmp_path / "work" / "run"), "--restarts", "2",
                        "--evaluations", "b", "--variants", "15-named", "60-average"])
    # the same seeds give the same figures; a variant with more clusters than training films is skipped
    assert again["evaluations"]["b"]["variants"] == {"15-named": result["evaluations"]["b"]["variants"]["15-named"]}
