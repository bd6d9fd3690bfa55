"""benchmarks/bench_real.py end to end on phantoms (the real-data script, without the real data)."""

from __future__ import annotations

import json

import pytest

from bonecluster.data.phantoms import generate_phantoms
from tests.conftest import load_benchmark
from tests.integration.test_engine import TINY


@pytest.mark.parametrize("method, spread", [("deepcluster", True), ("sela", False)])
def test_bench_real_trains_evaluates_and_reports_the_kmeans_spread(tmp_path, single_torch_thread, method, spread):
    generate_phantoms(tmp_path / "train", n=56, size=64, seed=3, progress=False, workers=1)
    generate_phantoms(tmp_path / "eval", n=28, size=64, seed=3, split="valid", progress=False, workers=1)
    sets = [a for s in TINY + ["train.epochs=2", f"method={method}"] for a in ("--set", s)]
    out = tmp_path / "result.json"
    result = load_benchmark("bench_real").main(["--train", str(tmp_path / "train"), "--eval", str(tmp_path / "eval"),
                                 "--stages", "1", "--work", str(tmp_path / "work"), "--json", str(out),
                                 "--kmeans-restarts", "3", *sets])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    stage1 = result["metrics"]["stage1"]
    assert stage1["n_images"] == 28 and 0 <= stage1["accuracy_hungarian"] <= 1
    restarts = result["stage1_kmeans_restarts"]
    if not spread:  # Sinkhorn-balanced clusters are not plain k-means: nothing to re-draw
        assert restarts is None
        return
    assert restarts["restarts"] == 3 and len(restarts["scores"]) == 3
    assert all(1 / 7 <= s <= 1 for s in restarts["scores"])  # Hungarian over 7 parts is at least 1/7
    assert restarts["min"] <= restarts["mean"] <= restarts["max"]


def test_the_split_does_not_depend_on_how_the_source_is_spelled(tmp_path, monkeypatch):
    """Files without a study are split by their path inside the source, not by the path as typed:
    a relative and an absolute spelling of one manifest must give the same two sides."""
    from tests.conftest import write_png

    data = tmp_path / "films"
    lines = ["path,body_part,abnormal"]
    for i in range(40):
        write_png(data / "images" / f"f{i}.png", seed=i)
        lines.append(f"images/f{i}.png,WRIST,1")
    (data / "manifest.csv").write_text("\n".join(lines) + "\n")
    split_source = load_benchmark("bench_real").split_source
    monkeypatch.chdir(tmp_path)
    sides = []
    for source, work in (("films/manifest.csv", "a"), (str(data / "manifest.csv"), "b"),
                         (str(data / "images" / ".." / "manifest.csv"), "c")):
        train, held_out = split_source(source, 0.3, tmp_path / work)
        sides.append([sorted(line.split(",")[0] for line in p.read_text().splitlines()[1:]) for p in (train, held_out)])
    assert sides[0] == sides[1] == sides[2]
    train, held_out = sides[0]
    assert len(train) + len(held_out) == 40 and not set(train) & set(held_out) and 0 < len(held_out) < 40
