"""Simulated naming: majority of the labelled films nearest each centroid, overlap refusal, audit."""

import json

import numpy as np
import pytest

from bonecluster.data.records import Record
from bonecluster.naming import (NAMING, NamingAudit, check_no_overlap, load_naming_audit, names_from_nearest,
                                training_metadata_audit)


def test_majority_of_the_nearest_labelled_films_names_each_cluster():
    clusters = np.array([0, 0, 0, 0, 1, 1, 2])
    sq = np.array([0.1, 0.2, 0.3, 0.05, 0.4, 0.1, 0.2])
    parts = ["HAND", "WRIST", "WRIST", None, "ELBOW", "ELBOW", None]
    named = names_from_nearest(clusters, sq, parts, k=4, per_cluster=3)
    # cluster 0: the unlabelled film (nearest) is never shown; HAND, WRIST, WRIST -> WRIST
    name, votes, shown = named[0]
    assert name == "WRIST" and dict(votes) == {"HAND": 1, "WRIST": 2} and shown == [0, 1, 2]
    assert named[1][0] == "ELBOW" and named[1][2] == [5, 4]   # nearest first
    assert 2 not in named and 3 not in named   # no labelled film: stays unnamed


def test_only_the_m_nearest_are_read_and_a_tie_goes_to_the_nearest():
    clusters = np.zeros(5, int)
    sq = np.array([0.5, 0.1, 0.2, 0.3, 0.4])
    parts = ["HAND", "FINGER", "HAND", "FINGER", "HAND"]
    name, votes, shown = names_from_nearest(clusters, sq, parts, k=1, per_cluster=2)[0]
    assert shown == [1, 2] and dict(votes) == {"FINGER": 1, "HAND": 1}
    assert name == "FINGER"   # tie: the nearest film's part
    assert names_from_nearest(clusters, sq, parts, k=1, per_cluster=5)[0][0] == "HAND"   # 3 of 5
    with pytest.raises(ValueError, match="at least 1"):
        names_from_nearest(clusters, sq, parts, k=1, per_cluster=0)


def test_overlap_by_file_or_study_is_refused(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    evaluation = [Record(str(a)), Record(str(tmp_path / "c.png"), study="p1/s1")]
    check_no_overlap([Record(str(b)), Record(str(tmp_path / "d.png"), study="p2/s1")], evaluation, "L", "E")
    with pytest.raises(ValueError, match="L overlaps the evaluation data E: 1 film"):
        check_no_overlap([Record(str(tmp_path / "sub" / ".." / "a.png"))], evaluation, "L", "E")
    with pytest.raises(ValueError, match="share a file or a study"):
        check_no_overlap([Record(str(tmp_path / "e.png"), study="p1/s1")], evaluation, "L", "E")


def test_audit_counts_and_round_trip(tmp_path):
    records = [Record("a", body_part="HAND"), Record("b", body_part="HAND"), Record("c"), Record("d", body_part="WRIST")]
    audit = training_metadata_audit(records, np.array([0, 0, 1, 1]), {0: "HAND", 1: "WRIST", 2: "cluster-2"})
    assert audit.n_labels_read == 3 and audit.n_names == 2
    assert audit.clusters[0].votes == {"HAND": 2} and audit.clusters[2].votes == {}
    audit.save(tmp_path)
    back = load_naming_audit(tmp_path)
    assert back == json.loads((tmp_path / NAMING).read_text())
    assert back["method"] == "training-metadata" and back["n_names"] == 2 and back["n_labels_read"] == 3
    assert back["clusters"]["1"] == {"name": "WRIST", "votes": {"WRIST": 1}, "files": []}
    assert load_naming_audit(tmp_path / "none") is None
    assert NamingAudit("nearest-to-centroid", [], 5, 0).n_names == 0
