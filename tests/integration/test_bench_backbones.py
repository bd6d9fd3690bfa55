"""benchmarks/bench_backbones.py: feature-extraction speed per backbone, on tiny sizes."""

from __future__ import annotations

import json

import pytest

from tests.conftest import load_benchmark


def test_rows_per_arch_with_speed_and_sizes(tmp_path, single_torch_thread):
    pytest.importorskip("timm")
    out = tmp_path / "b.json"
    result = load_benchmark("bench_backbones").main(["--arch", "resnet18", "--arch", "timm/resnet10t", "--size", "32",
                                                     "--images", "4", "--batch", "2", "--json", str(out)])
    assert json.loads(out.read_text()) == result
    rows = {r["arch"]: r for r in result["rows"]}
    assert set(rows) == {"resnet18", "timm/resnet10t"}
    assert rows["resnet18"]["feature_dim"] == 512 and rows["resnet18"]["parameters_m"] == pytest.approx(11.2, abs=0.1)
    assert all(r["images"] == 4 and r["images_per_s"] > 0 and r["size"] == 32 for r in rows.values())
