"""Fixtures shared by the integration tests: one tiny trained run for the viewer's tests, and a
real uvicorn server for it on a free local port."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
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


STAGE2_SETS = TINY + ["stage2.k=2", "stage2.epochs=1", "stage2.min_images=4"]


def train_stage2_only(root: Path, *args: str) -> Path:
    """Stage 2 alone on 168 training phantoms (about 8 studies per part) plus 42 validation ones,
    trained in seconds into ``root/run``; ``args`` are extra ``train`` arguments. Returns root."""
    generate_phantoms(root / "ph", n=168, size=64, seed=5, progress=False, workers=1)
    generate_phantoms(root / "ph", n=42, size=64, seed=5, split="valid", progress=False, workers=1)
    sets = [a for s in STAGE2_SETS for a in ("--set", s)]
    assert main(["train", str(root / "ph" / "train"), "--out", str(root / "run"), "--stages", "2", "--quiet",
                 *sets, *args]) == 0
    return root


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


@contextmanager
def serve_in_thread(app):
    """Serve ``app`` with uvicorn in a daemon thread on a free 127.0.0.1 port; yields its URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # a free port, held from the start: no race with other processes
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        srv.should_exit = True
        thread.join(15)
        sock.close()
