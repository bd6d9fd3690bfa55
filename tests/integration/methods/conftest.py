"""Shared by the per-method tests: tiny phantoms and one call that trains a method on them."""

from __future__ import annotations

from pathlib import Path

import pytest

from bonecluster.checkpoint import TrainedClusters, read_metrics
from bonecluster.config import load_config
from bonecluster.data import PreparedDataset, prepare_sources
from bonecluster.data.phantoms import generate_phantoms
from bonecluster.engine import DeepClusterEngine, FitResult
from tests.integration.test_engine import SIMCLR, TINY


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ph")
    generate_phantoms(root / "ph", n=56, size=64, seed=3, progress=False, workers=1)
    return root / "ph"


def method_config(method: str, epochs: int = 2, *extra: str):
    """The TINY settings with short pre-training and SCAN, for ``method``."""
    return load_config("cpu", overrides=TINY + SIMCLR + [f"train.epochs={epochs}", f"method={method}", *extra])


def prepared(phantoms: Path, tmp_path: Path, cfg) -> PreparedDataset:
    return prepare_sources([phantoms], cfg.data, cache=tmp_path / "cache", progress=False)


def train_method(phantoms: Path, out: Path, cfg, **fit) -> tuple[FitResult, list[dict], TrainedClusters | None]:
    """Fit ``cfg`` into ``out``: (result, metrics.csv rows, the trained run unless interrupted)."""
    res = DeepClusterEngine(cfg, out, progress=False).fit(prepared(phantoms, out.parent, cfg), **fit)
    rows = read_metrics(out / "metrics.csv") if (out / "metrics.csv").exists() else []   # none without epochs
    return res, rows, None if res.interrupted else TrainedClusters.load(out)
