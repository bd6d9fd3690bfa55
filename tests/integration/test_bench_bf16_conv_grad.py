"""benchmarks/bench_bf16_conv_grad.py: the bfloat16 gradient check runs and its float32 control is right."""

from __future__ import annotations

import json

from tests.conftest import load_benchmark


def test_every_shape_and_map_is_checked_and_the_float32_control_is_never_wrong(tmp_path, capsys):
    bench = load_benchmark("bench_bf16_conv_grad")
    assert bench.main(["--reps", "2", "--json", str(tmp_path / "out.json")]) == 0
    rows = json.loads((tmp_path / "out.json").read_text())["rows"]
    assert [(r["convolution"], r["side"]) for r in rows] == [(s[0], side) for s in bench.SHAPES for side in (1, 2, 3)]
    assert all(r["float32 control"] == 0 for r in rows)
    assert "3x3 s2 | 1x1 |" in capsys.readouterr().out
