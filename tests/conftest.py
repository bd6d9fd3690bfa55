"""Shared test helpers: tiny images written on the fly, and the optional ../shared/data."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module (benchmarks/ is not a package), loaded once."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before running it: its dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[name]


def write_png(path: Path, value: int | None = None, shape=(24, 32), seed: int = 0) -> Path:
    """An 8-bit grey PNG with a gradient plus noise (or a constant when value is given)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if value is None:
        rng = np.random.default_rng(seed)
        arr = np.linspace(0, 200, shape[0] * shape[1]).reshape(shape) + rng.integers(0, 50, shape)
    else:
        arr = np.full(shape, value)
    Image.fromarray(arr.astype(np.uint8), mode="L").save(path)
    return path


def make_mura_tree(root: Path, split: str = "train") -> list[Path]:
    """A tiny MURA-layout tree: 2 parts x 2 patients x 1 study x 2 images."""
    paths = []
    for part in ("XR_WRIST", "XR_HAND"):
        for i, label in enumerate(("positive", "negative")):
            for j in (1, 2):
                p = root / split / part / f"patient0000{i}" / f"study1_{label}" / f"image{j}.png"
                paths.append(write_png(p, seed=len(paths)))
    return paths


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture(scope="module")
def single_torch_thread():
    """Tiny tensors gain nothing from threads, and on a shared, loaded CPU OpenMP threads waiting
    on each other can make a forward pass 100x slower; restore the setting afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def pytest_terminal_summary(terminalreporter) -> None:
    """The CPU and its bfloat16 support at the end of the run, where a CI log's tail shows it:
    bfloat16 kernels (and their failures) differ between CPUs. Never fails the run itself."""
    try:
        from bonecluster.device import cpu_has_native_bf16

        info = cpuinfo()
        model = info.get("model name", "unknown")
        flags = set(info.get("flags", "").split())
        line = (f"machine: {model}; bfloat16 in hardware: {cpu_has_native_bf16()} (avx512_bf16: "
                f"{'avx512_bf16' in flags}, amx_bf16: {'amx_bf16' in flags}); torch {torch.__version__}, "
                f"{torch.get_num_threads()} threads")
    except Exception as err:  # noqa: BLE001 - a broken import is reported by the tests, not here
        line = f"machine: unknown ({err!r})"
    terminalreporter.write_line(line)


def cpuinfo() -> dict[str, str]:
    """/proc/cpuinfo's fields for the first CPU (``vendor_id``, ``model name``, ``flags``...), or
    none off Linux."""
    try:
        first = Path("/proc/cpuinfo").read_text().split("\n\n", 1)[0]
    except OSError:
        return {}
    return {key.strip(): value.strip() for key, value in (line.split(":", 1) for line in first.splitlines()
                                                          if ":" in line)}
