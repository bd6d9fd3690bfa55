from __future__ import annotations

import os

import pytest

from bonecluster.io import WriteError, atomic_open, atomic_write_text


def test_atomic_write_replaces_whole_file(tmp_path):
    p = tmp_path / "a" / "f.txt"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two"
    assert os.listdir(p.parent) == ["f.txt"]


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    p = tmp_path / "f.txt"
    atomic_write_text(p, "old")
    with pytest.raises(RuntimeError):
        with atomic_open(p, "w") as f:
            f.write("half")
            raise RuntimeError("boom")
    assert p.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_folder_names_the_path(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(WriteError, match=str(ro / "f.txt")):
            atomic_write_text(ro / "f.txt", "x")
    finally:
        ro.chmod(0o700)


def test_file_size_limit_gives_clear_error(tmp_path):
    """A full disk, simulated with RLIMIT_FSIZE in a child process."""
    import subprocess
    import sys

    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))\n"
        "from bonecluster.io import atomic_write_bytes, WriteError\n"
        f"p = {str(tmp_path / 'big.bin')!r}\n"
        "try:\n"
        "    atomic_write_bytes(p, b'x' * 100000)\n"
        "except WriteError as e:\n"
        "    print('ERR', e); sys.exit(3)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 3, r.stderr
    assert "big.bin" in r.stdout
    assert os.listdir(tmp_path) == []
