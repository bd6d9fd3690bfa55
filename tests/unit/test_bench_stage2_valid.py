"""benchmarks/bench_stage2.py --valid-n: more held-out phantoms, of the run's own phantom seed."""

from __future__ import annotations

import json

import pytest

from tests.conftest import load_benchmark


def test_more_held_out_phantoms_are_drawn_once_with_the_runs_phantom_seed(tmp_path):
    bench = load_benchmark("bench_stage2")
    work = tmp_path / "run"
    work.mkdir()
    (work / "phantoms-valid.json").write_text(json.dumps({"seed": 3, "split": "valid"}))
    assert bench.held_out_folder(work, None, 0) == work / "phantoms-valid"   # the run's own by default
    folder = bench.held_out_folder(work, 14, 0)
    assert folder == work / "phantoms-valid-14"
    stamp = json.loads((work / "phantoms-valid-14.json").read_text())
    assert stamp["seed"] == 3 and stamp["split"] == "valid" and stamp["n"] == 14   # the stamp's seed, not 0
    pngs = sorted(folder.rglob("*.png"))
    assert len(pngs) == 14 and all("valid" in p.parts for p in pngs)
    before = {p: p.stat().st_mtime_ns for p in pngs}
    bench.held_out_folder(work, 14, 0)
    assert {p: p.stat().st_mtime_ns for p in sorted(folder.rglob("*.png"))} == before   # reused, not redrawn


def test_each_finding_kind_is_scored_against_the_parts_normal_images_only():
    bench = load_benchmark("bench_stage2")
    kinds = ["", "", "", "fracture", "fracture", "plate", "lesion"]
    scores = [0.1, 0.5, 0.3, 0.4, 0.6, 0.9, 0.2]
    cells = bench.finding_cells(kinds, scores)
    assert list(cells) == ["fracture", "plate", "lesion", "dislocation"]
    # fracture 0.4 beats 0.1 and 0.3 (not 0.5), 0.6 beats all three: 5 of 6 pairs
    assert cells["fracture"][0] == pytest.approx(5 / 6) and cells["fracture"][1] == 2
    assert cells["plate"] == (1.0, 1)             # the other kinds' images are not its negatives
    assert cells["lesion"][0] == pytest.approx(1 / 3)   # 0.2 beats 0.1 only
    assert cells["dislocation"] == (None, 0)      # no image of that kind: no AUROC
