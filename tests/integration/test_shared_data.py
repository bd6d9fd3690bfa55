"""The three datasets in ../shared/data load with their documented counts (skips if absent)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from bonecluster.data import SkipLog, prepare, read_records
from bonecluster.data.decode import Preprocess

pytestmark = pytest.mark.shared


def test_mura_humerus_64(shared_data):
    skips = SkipLog()
    recs = read_records(shared_data / "mura-humerus-64", skips)
    assert len(recs) == 1132 and len(skips) == 0
    assert sum(r.abnormal for r in recs) == 534
    assert {r.body_part for r in recs} == {"HUMERUS"}
    assert all(r.study and r.patient for r in recs)


def test_fracture_parts_manifest(shared_data):
    skips = SkipLog()
    recs = read_records(shared_data / "fracture-parts" / "manifest.csv", skips)
    assert len(recs) == 1002 and len(skips) == 0
    parts = Counter(r.body_part for r in recs if r.body_part)
    assert sum(parts.values()) == 551
    assert parts == {"ELBOW": 93, "FINGER": 132, "FOREARM": 86, "HUMERUS": 89, "SHOULDER": 99, "WRIST": 52}
    assert all(r.abnormal is True for r in recs if r.body_part)


def test_mura_samples_decode(shared_data, tmp_path):
    recs = read_records(shared_data / "mura-samples")
    assert len(recs) == 7
    assert {r.body_part for r in recs} == {"FINGER", "FOREARM", "HAND", "WRIST"}
    ds = prepare(recs, tmp_path / "cache", Preprocess(size=32), workers=1, progress=False)
    assert len(ds) == 7 and len(ds.skipped) == 0
    imgs = ds.images()
    assert imgs.shape == (7, 32, 32) and all(img.std() > 5 for img in imgs)
