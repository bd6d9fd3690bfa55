"""benchmarks/bench_findings.py (issue 24's yardstick) end to end on a few phantoms."""

from __future__ import annotations

import json

import numpy as np

from bonecluster import BODY_PARTS
from bonecluster.data.phantoms import FINDINGS
from tests.conftest import load_benchmark


def test_yardstick_reports_every_part_and_finding_and_reuses_its_phantoms(tmp_path):
    bench = load_benchmark("bench_findings")
    out = tmp_path / "result.json"
    args = ["--n", "210", "--valid-n", "140", "--seeds", "3", "--work", str(tmp_path / "work"), "--json", str(out)]
    result = bench.main(args)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["size"] == 64 and result["valid_n"] == 140   # the cpu preset's decoding
    (row,) = result["rows"]
    assert row["seed"] == 3 and row["n_valid"] == 140
    assert set(row["per_part"]) <= set(BODY_PARTS) and len(row["per_part"]) >= 5
    assert all(0.0 <= a <= 1.0 for a in row["per_part"].values())
    assert row["macro"] == np.mean(list(row["per_part"].values()))
    assert set(row["per_finding"]) == set(FINDINGS)
    assert set(row["per_part_finding"]) == set(row["per_part"])
    # a second run draws no phantoms again and gives the same figures
    again = bench.main(args)
    assert again["rows"][0]["per_part"] == row["per_part"]


def test_finding_of_reads_the_generator_index(tmp_path):
    bench = load_benchmark("bench_findings")
    index = tmp_path / "valid_phantom_findings.csv"
    index.write_text("study,body_part,abnormal,finding,views\n"
                     "phantoms/valid/XR_HAND/patient90001/study1_positive/,HAND,1,plate,2\n"
                     "phantoms/valid/XR_HAND/patient90002/study1_negative/,HAND,0,,3\n")
    findings = bench.study_findings(tmp_path, "valid")
    assert bench.finding_of("/x/phantoms/valid/XR_HAND/patient90001/study1_positive/image2.png", findings) == "plate"
    assert bench.finding_of("/x/phantoms/valid/XR_HAND/patient90002/study1_negative/image1.png", findings) == ""


def test_without_work_the_phantoms_are_drawn_afresh_and_removed(tmp_path, monkeypatch):
    bench = load_benchmark("bench_findings")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    result = bench.main(["--n", "70", "--valid-n", "70", "--seeds", "4"])
    assert result["rows"][0]["n_valid"] == 70
    assert list(scratch.iterdir()) == []   # no stale phantoms for the next run to reuse
