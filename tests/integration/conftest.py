"""Fixtures shared by the integration tests: one tiny trained run for the viewer's tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bonecluster.cli import main
from bonecluster.data.phantoms import generate_phantoms
from tests.integration.test_engine import TINY

SERVE_SETS = [a for s in TINY + ["train.epochs=2", "stage2.k=2", "stage2.epochs=1", "stage2.min_images=4",
                                 "data.workers=1"] for a in ("--set", s)]


def train_tiny_run(root: Path, n: int = 42, size: int = 64, extra: list[str] | None = None) -> tuple[Path, Path]:
    """Phantoms and a two-stage run trained on them in seconds: (run folder, phantom root)."""
    generate_phantoms(root / "ph", n=n, size=size, seed=5, progress=False, workers=1)
    run = root / "run"
    assert main(["train", str(root / "ph"), "--out", str(run), "--quiet", *SERVE_SETS, *(extra or [])]) == 0
    return run, root / "ph"


@pytest.fixture(scope="session")
def tiny_serve_run(tmp_path_factory) -> tuple[Path, Path]:
    """The viewer tests' run (trained once per session, one torch thread): (run folder, phantoms).

    Tests that rename clusters change its names.json files; test_serve.py restores stage 1's.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_tiny_run(tmp_path_factory.mktemp("serve"))
    finally:
        torch.set_num_threads(previous)
