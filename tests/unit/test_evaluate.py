"""evaluate.score on hand-made predictions: exact numbers, and the schema's left-out fields."""

from __future__ import annotations

import numpy as np
import pytest

from bonecluster.data.cache import PreparedDataset
from bonecluster.data.decode import Preprocess
from bonecluster.data.records import Record, SkipLog
from bonecluster.evaluate import score
from bonecluster.report import comparison_table
from bonecluster.predict import ImagePrediction


def _data(records):
    return PreparedDataset("/nowhere", Preprocess(size=8), records, np.arange(len(records)), SkipLog())


def _pred(cluster, name, part, s, t=0.5):
    return ImagePrediction("p", cluster, name, 1.0, part, s, t, None if s is None else s >= t)


def test_exact_stage1_and_stage2_numbers():
    recs = [Record(f"{i}", study=f"s{i // 2}", body_part=bp, abnormal=ab) for i, (bp, ab) in
            enumerate([("HAND", True), ("HAND", True), ("HAND", False), ("HAND", False),
                       ("WRIST", False), ("WRIST", False)])]
    preds = [_pred(0, "HAND", "HAND", 0.9), _pred(0, "HAND", "HAND", 0.7),
             _pred(0, "HAND", "HAND", 0.6), _pred(1, "WRIST", "HAND", 0.1),
             _pred(1, "WRIST", "WRIST", 0.2), _pred(1, "WRIST", "WRIST", 0.3)]
    m = score(_data(recs), preds)
    s1 = m["stage1"]
    assert s1["n_images"] == 6 and s1["accuracy_hungarian"] == pytest.approx(5 / 6)
    assert s1["per_part"]["HAND"] == {"n": 4, "sensitivity": 0.75, "specificity": 1.0, "precision": 1.0}
    assert s1["per_part"]["WRIST"]["precision"] == pytest.approx(2 / 3)
    hand = m["stage2"]["per_part"]["HAND"]
    # scores .9 .7 (abnormal) .6 .1 (normal), threshold .5: tp 2, fp 1, tn 1
    assert hand["n_images"] == 4 and hand["n_studies"] == 2 and hand["auroc"] == 1.0
    assert hand["sensitivity"] == 1.0 and hand["specificity"] == 0.5 and hand["precision"] == pytest.approx(2 / 3)
    # studies: s0 mean .8 -> flagged (abnormal), s1 mean .35 -> not flagged (normal): perfect kappa
    assert hand["kappa_study"] == pytest.approx(1.0)
    wrist = m["stage2"]["per_part"]["WRIST"]
    assert "auroc" not in wrist and "sensitivity" not in wrist and "precision" not in wrist  # undefined: left out
    assert wrist["specificity"] == 1.0
    assert m["stage2"]["macro"]["auroc"] == 1.0 and m["skipped_files"] == 0


def test_unlabelled_data_gives_only_the_skip_count():
    recs = [Record("a"), Record("b")]
    m = score(_data(recs), [_pred(0, "cluster-0", None, None), _pred(1, "cluster-1", None, None)])
    assert m == {"skipped_files": 0}


def test_comparison_table_puts_preprint_specificity_under_precision():
    table = comparison_table({"stage1": {"macro": {"sensitivity": 0.5, "specificity": 0.9, "precision": 0.4}}})
    row = next(line for line in table.splitlines() if line.startswith("stage1 precision"))
    assert "40.00" in row and "99.53" in row
    spec = next(line for line in table.splitlines() if line.startswith("stage1 specificity"))
    assert "99.53" not in spec and "99.63" in spec


def test_accuracy_named_counts_shared_names_and_unnamed_clusters():
    recs = [Record(f"{i}", body_part=bp) for i, bp in enumerate(["HAND", "HAND", "WRIST", "WRIST", "ELBOW"])]
    # clusters 0 and 2 are both HAND (many-to-one); cluster 3 has no name: its film counts as wrong
    preds = [_pred(0, "HAND", None, None), _pred(2, "HAND", None, None), _pred(1, "WRIST", None, None),
             _pred(2, "HAND", None, None), _pred(3, "cluster-3", None, None)]
    s1 = score(_data(recs), preds, naming={"n_names": 3, "n_labels_read": 12})["stage1"]
    assert s1["accuracy_named"] == pytest.approx(3 / 5)
    assert s1["n_names"] == 3 and s1["n_labels_read"] == 12
    unknown = score(_data(recs), preds, naming={"n_names": 3, "n_labels_read": None})["stage1"]
    assert "n_labels_read" not in unknown   # no audit: left out, as the schema says
