"""`bonecluster name --from`: over-clustered stage 1 named from a few labelled films per cluster,
then predictions and `evaluate` with the many-to-one names."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from bonecluster.cli import main
from bonecluster.data import prepare_sources
from bonecluster.data.phantoms import generate_phantoms
from bonecluster.predict import CONFIDENCE_TEMPERATURE, Predictor, load_run_config
from tests.integration.test_engine import TINY

K = 12   # more clusters than parts


@pytest.fixture(scope="module")
def setup(tmp_path_factory, single_torch_thread):
    root = tmp_path_factory.mktemp("naming")
    for name, n, seed, first in (("train", 56, 5, 1), ("labelled", 70, 11, 1001), ("eval", 42, 12, 2001)):
        generate_phantoms(root / name, n=n, size=32, seed=seed, progress=False, workers=1, first_patient=first)
    sets = [a for s in TINY + ["train.epochs=1", f"cluster.k={K}", "cluster.by_study=false", "cluster.n_init=1"]
            for a in ("--set", s)]
    run = root / "run"
    assert main(["train", str(root / "train"), "--out", str(run), "--stages", "1", "--quiet", *sets]) == 0
    return root, run


def test_training_names_are_audited_as_read_from_the_training_labels(setup):
    root, run = setup
    audit = json.loads((run / "stage1" / "naming.json").read_text())
    assert audit["method"] == "training-metadata" and audit["n_labels_read"] == 56   # phantoms carry parts


def test_name_from_labelled_films_reads_only_the_nearest_m_per_cluster(setup, capsys):
    root, run = setup
    assert main(["name", str(run), "--from", str(root / "labelled"), "--per-cluster", "3",
                 "--eval", str(root / "eval"), "--quiet"]) == 0
    assert "clusters from" in capsys.readouterr().out
    names = {int(k): v for k, v in json.loads((run / "stage1" / "names.json").read_text()).items()}
    audit = json.loads((run / "stage1" / "naming.json").read_text())
    assert audit["method"] == "nearest-to-centroid" and audit["per_cluster"] == 3
    assert set(names) == set(range(K))

    # recompute what a physician would have been shown: the labelled films in each cluster, nearest first
    cfg = load_run_config(run)
    data = prepare_sources([str(root / "labelled")], cfg.data, cache=root / "cache", progress=False)
    predictor = Predictor(run)
    clusters, _, emb = predictor.stage1_assignments(data)
    centroids = predictor.stage1.centroids.float().numpy()
    sq = ((emb - centroids[clusters]) ** 2).sum(1)
    read = 0
    for c in range(K):
        entry = audit["clusters"][str(c)]
        members = sorted(np.flatnonzero(clusters == c), key=lambda i: (sq[i], i))
        expected = [data.records[i].path for i in members[:3]]
        assert entry["files"] == expected
        votes = Counter(data.records[i].body_part for i in members[:3])
        assert entry["votes"] == dict(votes)
        if votes:
            assert names[c] == entry["name"] and votes[names[c]] == max(votes.values())
        else:
            assert names[c] == f"cluster-{c}"
        read += len(expected)
    assert audit["n_labels_read"] == read <= 3 * K
    assert len(set(names.values())) < K   # over-clustering: several clusters share a part


def test_predictions_sum_confidence_over_a_shared_name_and_evaluate_scores_the_names(setup, tmp_path):
    root, run = setup
    predictor = Predictor(run)
    cfg = load_run_config(run)
    data = prepare_sources([str(root / "eval")], cfg.data, cache=root / "cache", progress=False)
    preds, emb = predictor.predict_with_embeddings(data)
    centroids = predictor.stage1.centroids.float()
    x = torch.from_numpy(emb)
    prob = torch.softmax(-torch.cdist(x, centroids).pow(2) / CONFIDENCE_TEMPERATURE, dim=1).numpy()
    names = [predictor.names[c] for c in range(K)]
    for p, row in zip(preds, prob):
        assert p.cluster_name == names[p.cluster]
        same = [c for c in range(K) if names[c] == p.cluster_name]
        assert p.confidence == pytest.approx(row[same].sum(), abs=1e-5)
        assert p.confidence >= row[p.cluster] - 1e-6

    out = tmp_path / "metrics.json"
    assert main(["evaluate", str(run), str(root / "eval"), "--json", str(out), "--quiet"]) == 0
    s1 = json.loads(out.read_text())["stage1"]
    truth = [r.body_part for r in data.records]
    assert s1["accuracy_named"] == pytest.approx(np.mean([p.cluster_name == t for p, t in zip(preds, truth)]))
    audit = json.loads((run / "stage1" / "naming.json").read_text())
    assert s1["n_labels_read"] == audit["n_labels_read"]
    assert s1["n_names"] == sum(1 for c, n in enumerate(names) if n != f"cluster-{c}")


def test_naming_from_the_evaluation_data_is_refused(setup, capsys):
    root, run = setup
    before = (run / "stage1" / "names.json").read_text()
    assert main(["name", str(run), "--from", str(root / "eval"), "--eval", str(root / "eval"), "--quiet"]) == 1
    assert "overlaps the evaluation data" in capsys.readouterr().err
    assert (run / "stage1" / "names.json").read_text() == before   # nothing written
    assert main(["name", str(run), "--from", str(root / "labelled"), "--cluster", "0", "--quiet"]) == 1
    assert "not both" in capsys.readouterr().err
    assert main(["name", str(run), "--cluster", "0", "--as", "HAND", "--per-cluster", "3"]) == 1
    assert "go with --from" in capsys.readouterr().err


def test_evaluating_on_the_films_that_gave_the_names_is_flagged(setup, tmp_path):
    root, run = setup
    assert main(["name", str(run), "--from", str(root / "labelled"), "--per-cluster", "2", "--quiet"]) == 0
    held_out, leaked = tmp_path / "held.json", tmp_path / "leaked.json"
    assert main(["evaluate", str(run), str(root / "eval"), "--json", str(held_out), "--quiet"]) == 0
    assert main(["evaluate", str(run), str(root / "labelled"), "--json", str(leaked), "--quiet"]) == 0
    assert "n_named_from_evaluation" not in json.loads(held_out.read_text())["stage1"]
    audit = json.loads((run / "stage1" / "naming.json").read_text())
    read = {f for c in audit["clusters"].values() for f in c["files"]}
    studies = set(audit["studies_read"])
    assert read and studies
    # every film of a study one of the read films belongs to
    n = json.loads(leaked.read_text())["stage1"]["n_named_from_evaluation"]
    assert n >= len(read)


def test_a_persons_rename_is_marked_in_the_audit(setup):
    root, run = setup
    assert main(["name", str(run), "--cluster", "0", "--as", "WRIST"]) == 0
    entry = json.loads((run / "stage1" / "naming.json").read_text())["clusters"]["0"]
    assert entry["name"] == "WRIST" and entry["manual"] is True


def test_a_reference_from_another_model_is_ignored(setup, tmp_path, caplog):
    import shutil

    from bonecluster.typicality import Typicality

    root, run = setup
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    Typicality.fit(torch.randn(9, 5)).save(copy / "stage1" / "typicality.npz")   # not this model's films
    predictor = Predictor(copy)
    assert predictor.typicality is None and "predictions carry no typicality" in caplog.text
    assert Predictor(run).typicality is not None


def test_name_from_on_a_study_level_run(setup, tmp_path):
    """cluster.by_study (the cpu preset's): films go to their study's cluster, and the films shown
    are still the labelled ones in that cluster nearest its centroid."""
    root, _ = setup
    sets = [a for s in TINY + ["train.epochs=1", "cluster.k=7", "cluster.by_study=true", "cluster.n_init=1"]
            for a in ("--set", s)]
    run = tmp_path / "run"
    assert main(["train", str(root / "train"), "--out", str(run), "--stages", "1", "--quiet", *sets]) == 0
    assert main(["name", str(run), "--from", str(root / "labelled"), "--per-cluster", "2", "--quiet"]) == 0
    audit = json.loads((run / "stage1" / "naming.json").read_text())
    predictor = Predictor(run)
    data = prepare_sources([str(root / "labelled")], load_run_config(run).data, cache=tmp_path / "cache",
                           progress=False)
    clusters, _, _ = predictor.stage1_assignments(data)
    cluster_of = {r.path: int(c) for r, c in zip(data.records, clusters)}
    study_of = {r.path: r.study for r in data.records}
    for c, entry in audit["clusters"].items():
        assert len(entry["files"]) <= 2 and all(cluster_of[f] == int(c) for f in entry["files"])
    assert set(audit["studies_read"]) == {study_of[f] for e in audit["clusters"].values() for f in e["files"]}
    assert audit["n_labels_read"] == sum(len(e["files"]) for e in audit["clusters"].values())
