"""benchmarks/gpu_check.sh refuses clearly on a machine without a CUDA GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here: the script would run for minutes")
def test_gpu_check_says_there_is_no_gpu(tmp_path):
    r = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True,
                       env={**os.environ, "PYTHON": sys.executable}, timeout=120)
    assert r.returncode == 2 and "no CUDA GPU visible" in r.stderr
    assert not list((tmp_path / "out").glob("*.log"))   # nothing ran
