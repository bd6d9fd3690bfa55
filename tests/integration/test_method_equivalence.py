"""Every method gives bit for bit what it gave before the training loop was split into methods.

The first record (``golden/stage1_methods.json``, since replaced by the per-CPU files below, which
descend from it) was made at commit 623ee83, before the refactor into ``bonecluster.methods``
(issue 20): one fixed-seed stage-1 run per method on phantoms, on the CPU with one torch thread.
For each run it keeps the final assignments, the metrics history without its timing columns,
``names.json`` and a SHA-256 of the final network, PCA-whitening and centroids. A refactor that changes any bit of any of them fails here.

The record depends on the CPU's kernels (MKL and oneDNN pick their own code paths, so not even
``ATEN_CPU_CAPABILITY`` makes two CPUs agree: an AMD EPYC and an Intel CPU, both AVX512, give
different float32 histories), so there is one golden file per capability and CPU vendor,
``stage1_methods.<CAPABILITY>-<VENDOR>.json``, each naming the commit it was recorded at.
``stage1_methods.AVX512-GenuineIntel.json`` was first recorded at d06171d, a commit whose
behaviour matched an earlier AVX2 record on an AVX2 CPU, and recorded again when issue 24 made the
phantoms' findings conspicuous (the phantoms the runs train on changed; the code did not: the
record at d06171d still matched just before). ``stage1_methods.AVX512-AuthenticAMD.json`` was
recorded on 2026-12-06 at f4fe38f, a commit that matched the Intel record on the Intel CPU. On a
CPU with no golden file of its own the test is skipped, saying so; record one there at a commit
known to match. A run that a CPU's file does not hold (a ``RUNS`` entry added and recorded on
another kind of CPU) is skipped on that CPU, saying so. A deliberate change of behaviour (new
phantoms, a new default) re-records the file of every kind of CPU at hand and deletes the others,
which then skip until someone records them again::

    .venv/bin/python tests/integration/test_method_equivalence.py --record
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:   # run as a script with --record
    sys.path.insert(0, str(REPO))

from bonecluster.config import load_config  # noqa: E402
from bonecluster.data import prepare_sources  # noqa: E402
from bonecluster.data import phantoms as phantom_spec  # noqa: E402
from bonecluster.data.phantoms import generate_phantoms  # noqa: E402
from bonecluster.checkpoint import FINAL_MODEL, load_torch, read_metrics  # noqa: E402
from bonecluster.names import NAMES  # noqa: E402
from bonecluster.pipeline import train_stage1  # noqa: E402
from tests.integration.test_engine import SIMCLR, TINY  # noqa: E402

GOLDEN = Path(__file__).parent / "golden" / "stage1_methods.json"
TIMING = ("images_per_s", "seconds", "kmeans_seconds")   # wall-clock columns differ run to run
# metrics.csv columns added after the golden runs were recorded: left out where a run leaves them
# empty (no recorded method fills them), so the comparison stays exact for every column it had.
LATER_COLUMNS = ("phantom_loss",)

# One run per method, plus the DeepCluster options that change the loop's path (centroid top
# layer, over-clustered rounds, batch-statistics BatchNorm, image-level clusters).
RUNS = {
    "deepcluster": ["method=deepcluster"],
    "deepcluster-v2-overclustered": ["method=deepcluster", "cluster.top_layer_init=centroids", "cluster.train_k=9",
                                     "train.feature_bn=batch", "cluster.by_study=false"],
    "sela": ["method=sela"],
    "simclr": ["method=simclr"],
    "simclr-deepcluster": ["method=simclr-deepcluster"],
    "simclr-scan": ["method=simclr-scan"],
    "dino": ["method=dino", "selfsup.dino_prototypes=32"],
}
# model.channels_last=false: the golden runs were recorded in NCHW order (before the NHWC default);
# the layout changes float rounding only (tests/unit/test_models.py checks that bound).
# train.cpu_amp=false: they were recorded in float32, before the `cpu` preset trained in bfloat16
# on CPUs that have it (tests/integration/test_engine.py tests that path).
COMMON = TINY + SIMCLR + ["train.epochs=2", "train.device=cpu", "seed=4", "model.channels_last=false",
                          "train.cpu_amp=false"]


def _digest(tensors: dict) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a flat dict of tensors."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def run_fingerprint(phantoms: Path, root: Path, overrides: list[str]) -> dict:
    """Train stage 1 with ``overrides`` into ``root/run`` and return what must not change."""
    cfg = load_config("cpu", overrides=COMMON + overrides)
    data = prepare_sources([phantoms], cfg.data, cache=root / "cache", progress=False)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)   # reductions are summed in a thread-dependent order
    try:
        train_stage1(data, root / "run", cfg, progress=False)
    finally:
        torch.set_num_threads(previous)
    stage1 = root / "run" / "stage1"
    final = load_torch(stage1 / FINAL_MODEL)
    history = [{k: v for k, v in row.items() if k not in TIMING and not (k in LATER_COLUMNS and v == "")}
               for row in read_metrics(stage1 / "metrics.csv")]
    return {
        "assignments": final["assignments"].tolist(),
        "history": history,
        "names": json.loads((stage1 / NAMES).read_text()),
        "model_sha256": _digest(final["model"]),
        "pca_sha256": _digest(final["pca"]),
        "centroids_sha256": _digest({"centroids": final["centroids"]}),
    }


# The golden runs train on phantoms drawn with the findings of their records: the example
# sizes and every site on every part (before rule PP made five parts' three times larger and rule
# HD put HAND's fractures and dislocations at the metacarpals, rule WF2 WRIST's fractures at the
# radius and ulna). This test pins the methods' code,
# not the phantom spec, so it draws those phantoms (in this process: workers=1) and both CPUs'
# records stay valid.
RECORDED_FINDING_SIZES = dict.fromkeys(phantom_spec.FINDING_SIZE_FACTOR, 1.0)


def make_phantoms(root: Path) -> Path:
    with mock.patch.dict(phantom_spec.FINDING_SIZE_FACTOR, RECORDED_FINDING_SIZES), \
            mock.patch.object(phantom_spec, "METACARPAL_FINDINGS", frozenset()), \
            mock.patch.object(phantom_spec, "FOREARM_BONE_FRACTURES", frozenset()):
        generate_phantoms(root / "ph", n=56, size=64, seed=3, progress=False, workers=1)
    return root / "ph"


def cpu_vendor() -> str:
    """``vendor_id`` of /proc/cpuinfo (GenuineIntel, AuthenticAMD, ...), or ``platform.processor()``."""
    import platform

    from tests.conftest import cpuinfo

    return cpuinfo().get("vendor_id") or platform.processor() or "unknown"


def cpu_key() -> str:
    """What a golden file is recorded for: torch's CPU capability and the CPU's vendor."""
    return f"{torch.backends.cpu.get_cpu_capability()}-{cpu_vendor()}"


def golden_path(key: str) -> Path:
    return GOLDEN.with_name(f"{GOLDEN.stem}.{key}.json")


@pytest.fixture(scope="module")
def golden() -> dict:
    here = cpu_key()
    path = golden_path(here)
    if not path.is_file():
        pytest.skip(f"no golden run recorded for this CPU, {here} (only for "
                    f"{', '.join(sorted(p.name for p in GOLDEN.parent.glob(GOLDEN.stem + '*.json')))}); "
                    "record one at a commit known to match (--record)")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return make_phantoms(tmp_path_factory.mktemp("eq"))


@pytest.mark.parametrize("name", sorted(RUNS))
def test_method_matches_its_pre_refactor_run_bit_for_bit(name, golden, phantoms, tmp_path):
    if name not in golden["runs"]:
        pytest.skip(f"{name} is not recorded for this CPU, {cpu_key()} (recorded at {golden['recorded_at']}); "
                    "record it at a commit known to match (--record)")
    want = golden["runs"][name]
    got = run_fingerprint(phantoms, tmp_path, RUNS[name])
    where = f"(golden recorded on {golden['cpu']}, this CPU is {cpu_key()})"
    assert got["history"] == want["history"], f"{name}: metrics history differs {where}"
    assert got["assignments"] == want["assignments"], f"{name}: final assignments differ {where}"
    assert got["names"] == want["names"], f"{name}: names.json differs {where}"
    for key in ("model_sha256", "pca_sha256", "centroids_sha256"):
        assert got[key] == want[key], f"{name}: {key} differs {where}"


PRE_REFACTOR_METHODS = {"deepcluster", "sela", "simclr", "simclr-deepcluster", "simclr-scan", "dino"}


def test_the_golden_file_covers_every_method_that_existed_before_the_refactor(golden):
    from bonecluster.methods import method_names

    listed = {overrides[0].split("=", 1)[1] for overrides in RUNS.values()}
    recorded = {RUNS[name][0].split("=", 1)[1] for name in golden["runs"] if name in RUNS}
    assert PRE_REFACTOR_METHODS <= recorded <= listed <= set(method_names()) and set(golden["runs"]) <= set(RUNS)


def record() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        phantoms = make_phantoms(Path(tmp))
        runs = {}
        for name, overrides in RUNS.items():
            print(f"recording {name}", flush=True)
            runs[name] = run_fingerprint(phantoms, Path(tmp) / name, overrides)
    import subprocess

    here = cpu_key()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    path = golden_path(here)
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"cpu": here, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
                                "recorded_at": commit.stdout.strip() or None, "runs": runs}, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit(__doc__)
    record()
