"""benchmarks/bench_naming.py end to end on a phantom stand-in for ../shared/data."""

from __future__ import annotations

import json

from tests.conftest import load_benchmark
from tests.integration.test_bench_real_suite import _stand_in
from tests.integration.test_engine import TINY


def test_accuracy_named_for_each_k_and_m_beside_the_references(tmp_path, single_torch_thread):
    data = _stand_in(tmp_path)
    sets = [a for s in TINY + ["train.epochs=1", "selfsup.epochs=1", "cluster.n_init=1", "model.weights=none"] for a in ("--set", s)]
    out = tmp_path / "result.json"
    result = load_benchmark("bench_naming").main(["--data", str(data), "--work", str(tmp_path / "work"),
                                                  "--k", "4", "9", "--m", "1", "3", "--restarts", "2",
                                                  "--json", str(out), "--quiet", *sets])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert set(result["evaluations"]) == {"a", "b"}
    for e in result["evaluations"].values():
        assert set(e["table"]) == {4, 9}
        assert e["reference"]["k"] == len(e["reference"]["classes"])
        for k, row in e["table"].items():
            assert set(row) == {1, 3}
            for m, cell in row.items():
                assert len(cell["accuracy_named"]) == 2 and 0 <= cell["accuracy_named_mean"] <= 1
                # at most M films looked at per cluster, and only labelled training-side films
                assert cell["n_labels_read_max"] <= min(k * m, e["train_labelled"])
                assert cell["n_names_mean"] <= k
            assert row[1]["n_labels_read_max"] <= row[3]["n_labels_read_max"]
