"""benchmarks/bench_bf16_conv_grad.py: the bfloat16 weight-gradient check runs and its float32 control is right."""

from __future__ import annotations

import json

from tests.conftest import load_benchmark


def test_every_resnet_shape_is_checked_and_float32_is_never_wrong(tmp_path, capsys):
    bench = load_benchmark("bench_bf16_conv_grad")
    assert bench.main(["--reps", "2", "--json", str(tmp_path / "out.json")]) == 0
    rows = json.loads((tmp_path / "out.json").read_text())["rows"]
    assert {(r["kernel"], r["stride"], r["side"]) for r in rows} == {(k, s, side) for k, s, _ in bench.SHAPES
                                                                       for side in (1, 2, 3)}
    assert all(r["float32 channels-last"] == 0 and r["float32 default"] == 0 for r in rows)
    assert "3x3 s2 p1 | 1x1 |" in capsys.readouterr().out
