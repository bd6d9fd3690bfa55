"""benchmarks/bench_real_stage2.py: the CNN yardstick trains as many epochs as asked (--cnn-epochs)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from tests.conftest import load_benchmark


class _Films:
    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def abnormal(self, idx):
        return np.arange(len(idx)) % 2 == 0

    def images(self):
        return np.zeros((self.n, 4, 4), np.uint8)


def test_the_cnn_yardstick_trains_the_epochs_asked_for_and_hog_only_skips_it(monkeypatch):
    import bonecluster.checkpoint as checkpoint
    import bonecluster.yardstick as yardstick

    bench = load_benchmark("bench_real_stage2")
    calls = []
    monkeypatch.setattr(yardstick, "hog_reference", lambda *a: 0.5)
    monkeypatch.setattr(yardstick, "cnn_reference",
                        lambda model, *a, seed, epochs: calls.append((model, seed, epochs)) or 0.75)
    monkeypatch.setattr(checkpoint.TrainedClusters, "load", staticmethod(lambda folder, device=None: SimpleNamespace(model="net")))
    assert bench.yardsticks("f", _Films(6), _Films(4), seed=3, cnn_epochs=60) == {"hog_sup": 0.5, "cnn_sup": 0.75}
    assert bench.yardsticks("f", _Films(6), _Films(4), seed=3) == {"hog_sup": 0.5, "cnn_sup": 0.75}
    assert calls == [("net", 3, 60), ("net", 3, 20)]   # 20 unless asked: the real-film figures were measured so
    assert bench.yardsticks("f", _Films(6), _Films(4), seed=3, which="hog", cnn_epochs=60)["cnn_sup"] is None
    assert len(calls) == 2
