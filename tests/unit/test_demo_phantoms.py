"""The demo draws its phantoms once and redraws them when what they would look like changes."""

from __future__ import annotations

import json

from bonecluster.data import phantoms as ph
from bonecluster.demo import make_demo_phantoms


def _mtimes(folder):
    return {p: p.stat().st_mtime_ns for p in sorted(folder.rglob("*.png"))}


def test_demo_phantoms_are_reused_until_the_findings_sizes_or_sites_change(tmp_path, monkeypatch):
    folder = tmp_path / "phantoms"
    make_demo_phantoms(folder, 14, 0, "train", progress=False)
    first = _mtimes(folder)
    stamp = json.loads(folder.with_suffix(".json").read_text())
    assert first and stamp["finding_sizes"] == ph.FINDING_SIZE_FACTOR
    make_demo_phantoms(folder, 14, 0, "train", progress=False)
    assert _mtimes(folder) == first   # the same settings: nothing drawn again
    monkeypatch.setattr(ph, "FINDING_SIZE_FACTOR", dict.fromkeys(ph.FINDING_SIZE_FACTOR, 1.0))
    make_demo_phantoms(folder, 14, 0, "train", progress=False)
    again = _mtimes(folder)
    assert again.keys() == first.keys() and all(again[p] > first[p] for p in first)
    assert json.loads(folder.with_suffix(".json").read_text())["finding_sizes"] == ph.FINDING_SIZE_FACTOR
    monkeypatch.setattr(ph, "METACARPAL_FINDINGS", frozenset())   # the sites, as before rule HD
    make_demo_phantoms(folder, 14, 0, "train", progress=False)
    third = _mtimes(folder)
    assert all(third[p] > again[p] for p in again)
    assert json.loads(folder.with_suffix(".json").read_text())["metacarpal_findings"] == []
    monkeypatch.setattr(ph, "FOREARM_BONE_FRACTURES", frozenset())   # WRIST's fracture sites, as before rule WF2
    make_demo_phantoms(folder, 14, 0, "train", progress=False)
    fourth = _mtimes(folder)
    assert all(fourth[p] > third[p] for p in third)
    assert json.loads(folder.with_suffix(".json").read_text())["forearm_bone_fractures"] == []
