"""A full disk and a read-only output folder under the real CLI (`prepare`, `train`, `evaluate`).

A full disk is simulated with ``RLIMIT_FSIZE`` in the child (Python ignores SIGXFSZ, so a write
past the limit fails with EFBIG, as a write to a full disk fails with ENOSPC). A read-only folder
is a folder with mode 0555; since root ignores folder permissions, a child run by root first
drops CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH and CAP_FOWNER from its capability bounding set, so
it is held to the permission bits like any other user (the test skips, saying why, when neither
works).

Every case must end with exit status 1, one ``error: ...`` line naming the path and no
traceback, no temp file, nothing half-written, and every earlier output byte for byte intact.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import resource
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from bonecluster.cli import main
from bonecluster.data.decode import Preprocess
from bonecluster.data.phantoms import generate_phantoms
from bonecluster.checkpoint import load_torch

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SETS = [a for s in ("data.size=32", "train.batch_size=16", "train.feature_batch_size=64", "cluster.pca_dim=16",
                    "cluster.backend=torch", "train.lr=0.01", "train.epochs=1", "data.workers=1", "stage2.weights=same")
        for a in ("--set", s)]
N = 42
S48 = Preprocess(size=48).key()

_PR_CAPBSET_DROP = 24
_DAC_CAPS = (1, 2, 3)  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER


# ----------------------------------------------------------------------------- running the CLI


def _drop_dac_caps() -> None:
    """In the child, before exec: root without these capabilities obeys permission bits."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in _DAC_CAPS:
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def _child_setup(fsize: int | None, read_only: bool):
    def setup() -> None:
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        if read_only and os.geteuid() == 0:
            _drop_dac_caps()
    return setup


def _cli(args: list[str], fsize: int | None = None, read_only: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bonecluster", *args], capture_output=True, text=True,
                          env=ENV, timeout=300, preexec_fn=_child_setup(fsize, read_only))


def _ok(args: list[str]) -> None:
    """A run that sets the scene: in this process (no second start-up), without faults."""
    assert main(args) == 0


def _assert_clear_error(r: subprocess.CompletedProcess, path: Path, reason: str) -> str:
    """Exit 1, no traceback, exactly one ``error:`` line that names ``path`` and the reason."""
    assert r.returncode == 1, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [line for line in r.stderr.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert len(lines) == 1, r.stderr[-3000:]
    assert str(path) in lines[0] and reason in lines[0], lines[0]
    print(f"\n{' '.join(r.args[2:4])}: {lines[0]}")
    return lines[0]


# ----------------------------------------------------------------------------- what is left behind


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _assert_nothing_half_written(folder: Path) -> None:
    """No temp file; every file under its final name is complete (it parses or loads)."""
    assert not [p for p in folder.rglob("*") if p.name.endswith(".tmp")], "temp file left behind"
    for p in folder.rglob("*"):
        if p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".pt":
            load_torch(p)
        elif p.suffix == ".html":
            assert p.read_text().rstrip().endswith("</html>")
        elif p.name == "index.jsonl":
            text = p.read_bytes()
            assert not text or text.endswith(b"\n")
            rows = [json.loads(line)["row"] for line in text.splitlines()]
            size = int(p.parent.name.split("-s")[1].split("-")[0])
            pixels = p.parent / "pixels.u8"
            assert (pixels.stat().st_size if pixels.exists() else 0) == (max(rows, default=-1) + 1) * size * size


def _copy_run(run: Path, to: Path) -> Path:
    """A copy of a run folder; the large .pt files are hard links (they are only ever replaced
    by a rename, never written in place, so the original stays as it is)."""
    def link_or_copy(src, dst):
        return os.link(src, dst) if src.endswith(".pt") else shutil.copy2(src, dst)
    shutil.copytree(run, to, copy_function=link_or_copy)
    return to


def _make_read_only(folder: Path) -> None:
    for p in [folder, *folder.rglob("*")]:
        if p.is_dir():
            p.chmod(0o555)
        else:
            p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _make_writable(folder: Path) -> None:
    for p in [folder, *folder.rglob("*")]:
        p.chmod(p.stat().st_mode | stat.S_IWUSR)


@contextlib.contextmanager
def _read_only(*folders: Path):
    """The folders (and all they hold) are read-only inside the block, writable again after it."""
    try:
        for folder in folders:
            _make_read_only(folder)
        yield
    finally:
        for folder in folders:
            _make_writable(folder)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults_ph")
    generate_phantoms(root / "ph", n=N, size=64, seed=5, progress=False, workers=1)
    return root / "ph"


@pytest.fixture(scope="module")
def trained(phantoms, tmp_path_factory, single_torch_thread) -> Path:
    run = tmp_path_factory.mktemp("faults_run") / "run"
    _ok(["train", str(phantoms), "--out", str(run), "--stages", "1", "--quiet", *SETS])
    return run


@pytest.fixture(scope="module")
def read_only_works(tmp_path_factory) -> None:
    """Skip, saying why, when a child cannot be kept from writing into a 0555 folder."""
    ro = tmp_path_factory.mktemp("ro_probe") / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    code = "open(__import__('sys').argv[1], 'w')"
    try:
        r = subprocess.run([sys.executable, "-c", code, str(ro / "x")], capture_output=True, text=True,
                           preexec_fn=_child_setup(None, read_only=True))
    except subprocess.SubprocessError as err:  # prctl refused (no CAP_SETPCAP)
        pytest.skip(f"cannot drop root's DAC capabilities in the child: {err}")
    finally:
        ro.chmod(0o755)
    if r.returncode == 0:
        pytest.skip("a 0555 folder does not stop this child from writing (root without a way to drop "
                    "CAP_DAC_OVERRIDE, or a file system that ignores modes)")
    assert "PermissionError" in r.stderr


# ----------------------------------------------------------------------------- disk full


def test_prepare_on_a_full_disk(phantoms, tmp_path):
    cache = tmp_path / "cache"
    _ok(["prepare", str(phantoms), "--out", str(cache), "--size", "32", "--workers", "1"])
    before = _snapshot(cache)
    # 42 rows of 48x48 need 97 KB of pixels; the file may grow to 20 KB only
    r = _cli(["prepare", str(phantoms), "--out", str(cache), "--size", "48", "--workers", "1"], fsize=20_000)
    _assert_clear_error(r, cache / S48 / "pixels.u8", "File too large")
    _assert_nothing_half_written(cache)
    after = _snapshot(cache)
    assert {k: v for k, v in after.items() if not k.startswith(S48)} == before  # earlier outputs intact
    assert after[f"{S48}/pixels.u8"] == hashlib.sha256(b"").hexdigest()  # the failed batch rolled back
    # with space again, the same command completes
    _ok(["prepare", str(phantoms), "--out", str(cache), "--size", "48", "--workers", "1"])
    assert (cache / S48 / "pixels.u8").stat().st_size == N * 48 * 48
    _assert_nothing_half_written(cache)


def test_train_on_a_full_disk(phantoms, trained, tmp_path):
    # a new run: the 89 MB checkpoint is the first file over a 2 MB limit
    run = tmp_path / "new"
    r = _cli(["train", str(phantoms), "--out", str(run), "--stages", "1", "--quiet", *SETS], fsize=2_000_000)
    _assert_clear_error(r, run / "stage1" / "checkpoint.pt", "File too large")
    assert not (run / "stage1" / "checkpoint.pt").exists()
    _assert_nothing_half_written(run)
    # a finished run resumed: the final model is the first large write; the old one stays
    old = _copy_run(trained, tmp_path / "old")
    before = _snapshot(old)
    r = _cli(["train", str(phantoms), "--out", str(old), "--stages", "1", "--quiet", "--resume", *SETS],
             fsize=2_000_000)
    _assert_clear_error(r, old / "stage1" / "model.pt", "File too large")
    after = _snapshot(old)
    assert after.pop("data.json") and before.pop("data.json")  # rewritten: it names this folder's cache
    assert after == before  # the small files rewritten on the way hold the same bytes
    _assert_nothing_half_written(old)


def test_evaluate_on_a_full_disk(phantoms, trained, tmp_path):
    out = tmp_path / "out"
    before = _snapshot(trained)
    # metrics.json (about 1 KB) fits under 50 KB, report.html (about 150 KB) does not
    r = _cli(["evaluate", str(trained), str(phantoms), "--json", str(out / "metrics.json"),
              "--report", str(out / "report"), "--quiet"], fsize=50_000)
    _assert_clear_error(r, out / "report" / "report.html", "File too large")
    assert "stage1" in json.loads((out / "metrics.json").read_text())
    assert not (out / "report" / "report.html").exists()
    _assert_nothing_half_written(out)
    assert _snapshot(trained) == before


# ----------------------------------------------------------------------------- read-only folders


def test_prepare_into_read_only_folders(phantoms, tmp_path, read_only_works):
    ro = tmp_path / "ro"
    ro.mkdir()
    cache = tmp_path / "cache"
    _ok(["prepare", str(phantoms), "--out", str(cache), "--size", "32", "--workers", "1"])
    before = _snapshot(cache)
    with _read_only(ro, cache):
        r = _cli(["prepare", str(phantoms), "--out", str(ro / "cache"), "--size", "32"], read_only=True)
        _assert_clear_error(r, ro / "cache", "Permission denied")
        # a complete cache is read from a read-only folder; writing dataset.json then fails
        r = _cli(["prepare", str(phantoms), "--out", str(cache), "--size", "32"], read_only=True)
        _assert_clear_error(r, cache / "dataset.json", "Permission denied")
    assert list(ro.iterdir()) == []
    assert _snapshot(cache) == before
    _assert_nothing_half_written(cache)


def test_train_into_a_read_only_run_folder(phantoms, trained, tmp_path, read_only_works):
    old = _copy_run(trained, tmp_path / "old")
    before = _snapshot(old)
    with _read_only(old):
        r = _cli(["train", str(phantoms), "--out", str(old), "--stages", "1", "--quiet", "--resume", *SETS],
                 read_only=True)
        _assert_clear_error(r, old / "config.yaml", "Permission denied")
    assert _snapshot(old) == before
    _assert_nothing_half_written(old)


def test_evaluate_a_read_only_run_into_read_only_folders(phantoms, trained, tmp_path, read_only_works):
    ro, out = tmp_path / "ro", tmp_path / "out"
    ro.mkdir()
    run = _copy_run(trained, tmp_path / "run")
    before = _snapshot(run)
    with _read_only(ro, run):
        # the run (and its complete cache) is only read; metrics.json goes elsewhere, report.html cannot
        r = _cli(["evaluate", str(run), str(phantoms), "--json", str(out / "metrics.json"),
                  "--report", str(ro / "report"), "--quiet"], read_only=True)
        _assert_clear_error(r, ro / "report" / "report.html", "Permission denied")
        assert "stage1" in json.loads((out / "metrics.json").read_text())
    assert list(ro.iterdir()) == []
    assert _snapshot(run) == before
    _assert_nothing_half_written(run)
    _assert_nothing_half_written(out)
