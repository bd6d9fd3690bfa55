"""Hard kills (SIGKILL) of `bonecluster prepare` and `bonecluster train`, then a rerun.

Each test kills the real CLI in a subprocess at seeded random points, then checks what a kill
may leave and that a rerun ends exactly where an uninterrupted run ends:

* prepare: every file of the cache is, at any kill, a byte prefix of a clean run's file (pixels
  are written before index lines, so no index line points at missing pixels), and the rerun
  ends byte for byte equal to a clean prepare of the same data in another folder, with no temp
  files left and a consistent index.
* train --stages 1: the checkpoint on disk always loads (a kill during its write leaves the
  previous one), and `--resume` ends with the same assignments, losses and cluster sizes as an
  uninterrupted run with the same seed.

Kill points come from a seeded RNG and mix pure timing with polling for a file to appear or grow,
so that most kills land mid-work; every kill is printed with where it landed (`pytest -s`).
``BONECLUSTER_KILL_TRIALS`` (default 5) sets the number of kills per test, e.g. 30 for a long run.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from bonecluster.cli import main
from bonecluster.config import load_config
from bonecluster.data import prepare_sources
from bonecluster.data.cache import PixelStore
from bonecluster.data.decode import Preprocess
from bonecluster.data.phantoms import generate_phantoms
from bonecluster.checkpoint import CHECKPOINT, FINAL_MODEL, load_torch

KILLS = int(os.environ.get("BONECLUSTER_KILL_TRIALS", "5"))
SEED = int(os.environ.get("BONECLUSTER_KILL_SEED", "7"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

N_PREPARE = 768      # 12 index batches of 64: kills land between, inside and around them
SIZE = 32
PRE = Preprocess(size=SIZE)
ROW = SIZE * SIZE

TRAIN_SETS = ["data.size=32", "train.batch_size=16", "train.feature_batch_size=64", "cluster.pca_dim=16",
              "cluster.backend=torch", "train.lr=0.01", "train.epochs=3", "data.workers=1",
              "train.device=cpu", "stage2.weights=same"]  # identical resumes are a CPU promise (cuDNN is not deterministic)


# ----------------------------------------------------------------------------- helpers


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "bonecluster", *args]


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    """The command in its own process group (so a kill also takes its decode workers)."""
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)


def _kill(proc: subprocess.Popen) -> bool:
    """SIGKILL the process group; True when the command was still running (the kill landed)."""
    running = proc.poll() is None
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    return running


def _poll(proc: subprocess.Popen, ready, timeout: float = 120.0) -> None:
    """Wait until ``ready()`` holds or the command ends (then the kill will find it done)."""
    end = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < end:
        if ready():
            return
        time.sleep(0.0005)


def _run(cmd: list[str], log: Path, timeout: float = 300) -> None:
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV, timeout=timeout)
    log.write_bytes(r.stdout)
    assert r.returncode == 0, r.stdout.decode(errors="replace")[-3000:]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _temps(folder: Path, pid: int | None = None) -> list[Path]:
    """Temp files under ``folder`` (those of writer ``pid`` only, when given: their names carry it)."""
    return sorted(p for p in folder.rglob("*.tmp") if pid is None or f".pid{pid}-" in p.name)


def _index_lines(cache: Path) -> int:
    return (_read(_store(cache) / "index.jsonl") or b"").count(b"\n")


def _store(cache: Path) -> Path:
    return cache / PRE.key()


def _read(path: Path) -> bytes | None:
    return path.read_bytes() if path.exists() else None


def _dataset(cache: Path) -> dict | None:
    """dataset.json without its absolute store path (the only part that names the folder)."""
    path = cache / "dataset.json"
    if not path.exists():
        return None
    d = json.loads(path.read_text())
    assert d.pop("store") == str(_store(cache))
    return d


def _report(name: str, landed: Counter, kills: int, chains: int, seconds: float) -> None:
    print(f"\n{name}: {kills} kills, {chains} reruns to the end, all equal to the clean run ({seconds:.0f} s): "
          + ", ".join(f"{k} {v}" for k, v in sorted(landed.items())))


# ----------------------------------------------------------------------------- prepare


@pytest.fixture(scope="module")
def many_phantoms(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kill_ph")
    generate_phantoms(root / "ph", n=N_PREPARE, size=64, seed=11, progress=False, workers=1)
    return root / "ph"


@pytest.fixture(scope="module")
def clean_cache(many_phantoms, tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("kill_clean") / "cache"  # in this process: saves a start-up
    assert main(["prepare", str(many_phantoms), "--out", str(cache), "--size", str(SIZE), "--workers", "1"]) == 0
    assert len(_read(_store(cache) / "index.jsonl").splitlines()) == N_PREPARE
    return cache


def _check_prepare_crash_state(victim: Path, clean: Path, pid: int) -> list[str]:
    """What a killed prepare may leave: prefixes of the clean files, never more. Returns flags."""
    flags = []
    store, ref = _store(victim), _store(clean)
    index, pixels = _read(store / "index.jsonl") or b"", _read(store / "pixels.u8") or b""
    ref_index, ref_pixels = (ref / "index.jsonl").read_bytes(), (ref / "pixels.u8").read_bytes()
    assert ref_index.startswith(index), "index.jsonl is not a prefix of a clean run's"
    assert ref_pixels[:len(pixels)] == pixels, "pixels.u8 is not a prefix of a clean run's"
    complete = index[:index.rfind(b"\n") + 1]
    rows = max((json.loads(line)["row"] + 1 for line in complete.splitlines()), default=0)
    assert len(pixels) >= rows * ROW, "an index line points at pixels that were never written"
    if complete != index:
        flags.append("torn index line")
    if len(pixels) > rows * ROW:
        flags.append("pixels ahead of index")
    meta = _read(store / "meta.json")
    assert meta in (None, (ref / "meta.json").read_bytes())
    assert _dataset(victim) in (None, _dataset(clean))
    assert _read(victim / "skipped.csv") in (None, (clean / "skipped.csv").read_bytes())
    if _temps(victim, pid):
        flags.append("during an atomic write")
    n = len(complete.splitlines())
    if not index and not pixels:
        flags.append("before the first batch")
    elif n < N_PREPARE:
        flags.append("mid-decode")
    elif _dataset(victim) is None or not (victim / "skipped.csv").exists():
        flags.append("after decode")
    else:
        flags.append("after the last write")
    return flags


def _assert_prepare_equals_clean(victim: Path, clean: Path) -> None:
    store, ref = _store(victim), _store(clean)
    for name in ("meta.json", "index.jsonl", "pixels.u8"):
        assert (store / name).read_bytes() == (ref / name).read_bytes(), name
    assert _dataset(victim) == _dataset(clean)
    assert (victim / "skipped.csv").read_bytes() == (clean / "skipped.csv").read_bytes()
    assert _temps(victim) == [], "temp files left behind"
    reopened = PixelStore(store, PRE).open()
    assert len(reopened.entries) == N_PREPARE and reopened.n_rows * ROW == _size(store / "pixels.u8")
    assert sorted(p.name for p in victim.iterdir()) == ["dataset.json", "skipped.csv", PRE.key()]
    assert sorted(p.name for p in store.iterdir()) == [".lock", "index.jsonl", "meta.json", "pixels.u8"]


def test_killed_prepare_reruns_to_a_byte_identical_cache(many_phantoms, clean_cache, tmp_path):
    rng = np.random.default_rng(SEED)
    total_pixels = _size(_store(clean_cache) / "pixels.u8")
    landed, kills, chains, t0 = Counter(), 0, 0, time.perf_counter()
    while kills < KILLS:
        victim = tmp_path / f"victim{chains}"
        chains += 1
        for _ in range(int(rng.integers(2, 5))):  # 2-4 kills into the same cache, then a clean finish
            workers = str(rng.choice([1, 2]))
            cmd = _cli("prepare", str(many_phantoms), "--out", str(victim), "--size", str(SIZE), "--workers", workers)
            pixels = _store(victim) / "pixels.u8"
            mode = ("bytes", "delay", "after-decode", "bytes")[kills % 4]  # every kind, from the first 3 kills
            start, lines = _size(pixels), _index_lines(victim)
            if start >= total_pixels:  # all decoded already: only the final writes are left
                mode = "delay"
            threshold = int(rng.integers(start + 1, total_pixels)) if start + 1 < total_pixels else total_pixels
            delay = float(rng.uniform(0.0, 2.5))
            proc = _start(cmd, tmp_path / "log.txt")
            if mode == "bytes":        # a kill right after N pixel bytes reached the disk
                _poll(proc, lambda: _size(pixels) >= threshold)
            elif mode == "delay":      # pure timing: start-up, decoding or the final writes
                _poll(proc, lambda: False, timeout=delay)
            else:                      # during the final writes (dataset.json, skipped.csv)
                _poll(proc, lambda: _size(pixels) >= total_pixels)
                time.sleep(float(rng.uniform(0.0, 0.01)))
            hit = _kill(proc)
            kills += 1
            flags = _check_prepare_crash_state(victim, clean_cache, proc.pid) if hit else ["after completion"]
            if hit and (_index_lines(victim) > lines or (victim / "dataset.json").exists()
                        or _temps(victim, proc.pid)):
                flags.append("landed mid-work")  # this process had written something, and had more to do
            landed.update(flags)
            print(f"kill {kills}: {mode}, workers {workers}: {', '.join(flags)}")
            if not hit or kills >= KILLS:
                break
        if hit:
            _run(cmd, tmp_path / "log.txt")
        else:
            assert proc.returncode == 0
        _assert_prepare_equals_clean(victim, clean_cache)
        shutil.rmtree(victim)
    _report("prepare", landed, kills, chains, time.perf_counter() - t0)
    assert landed["landed mid-work"] >= (KILLS + 1) // 2, landed


def test_every_crash_state_of_the_cache_is_repaired_byte_for_byte(many_phantoms, clean_cache, tmp_path):
    """The states a kill can leave, made directly: the index cut at any byte, and the pixels cut
    anywhere at or after the rows that index references (they are written first)."""
    rng = np.random.default_rng(SEED + 1)
    ref = _store(clean_cache)
    ref_index, ref_pixels = (ref / "index.jsonl").read_bytes(), (ref / "pixels.u8").read_bytes()
    cfg = load_config("cpu", overrides=[f"data.size={SIZE}", "data.workers=1"])
    cuts = [0, len(ref_index) - 1, len(ref_index)] + rng.integers(0, len(ref_index), max(KILLS, 5)).tolist()
    for i, cut in enumerate(cuts):
        complete = ref_index[:cut][:ref_index[:cut].rfind(b"\n") + 1]
        rows = len(complete.splitlines())  # no skipped files: line i holds row i
        pix_cut = int(rng.integers(rows * ROW, len(ref_pixels) + 1))
        cache = tmp_path / f"c{i}"
        _store(cache).mkdir(parents=True)
        shutil.copy(ref / "meta.json", _store(cache) / "meta.json")
        (_store(cache) / "index.jsonl").write_bytes(ref_index[:cut])
        (_store(cache) / "pixels.u8").write_bytes(ref_pixels[:pix_cut])
        data = prepare_sources([many_phantoms], cfg.data, cache=cache, progress=False)
        assert data.n_decoded == N_PREPARE - rows and data.n_reused == rows
        store = _store(cache)
        assert (store / "index.jsonl").read_bytes() == ref_index, cut
        assert (store / "pixels.u8").read_bytes() == ref_pixels, cut
        shutil.rmtree(cache)


# ----------------------------------------------------------------------------- train


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kill_train_ph")
    generate_phantoms(root / "ph", n=56, size=64, seed=3, progress=False, workers=1)
    return root / "ph"


def _train_cmd(phantoms: Path, run: Path, resume: bool) -> list[str]:
    sets = [a for s in TRAIN_SETS for a in ("--set", s)]
    return _cli("train", str(phantoms), "--out", str(run), "--stages", "1", "--quiet",
                *(["--resume"] if resume else []), *sets)


def _final(run: Path) -> dict:
    rows = list(csv.DictReader(open(run / "stage1" / "metrics.csv", newline="")))
    return {"assignments": load_torch(run / "stage1" / FINAL_MODEL)["assignments"].tolist(),
            "losses": [(r["epoch"], r["loss"], r["nmi_prev"], r["cluster_sizes"]) for r in rows],
            "sizes": json.loads((run / "stage1" / "summary.json").read_text())["cluster_sizes"],
            "names": json.loads((run / "stage1" / "names.json").read_text())}


@pytest.fixture(scope="module")
def clean_run(phantoms, tmp_path_factory) -> dict:
    run = tmp_path_factory.mktemp("kill_train_clean") / "run"
    _run(_train_cmd(phantoms, run, resume=False), run.parent / "log.txt")
    return _final(run)


def _check_train_crash_state(run: Path, last_epoch: int, pid: int) -> tuple[int, list[str]]:
    """Whatever a kill leaves under a final name must load; the checkpoint never goes back."""
    stage1, flags, epoch = run / "stage1", [], last_epoch
    if (stage1 / CHECKPOINT).exists():
        ckpt = load_torch(stage1 / CHECKPOINT)  # raises on a half-written checkpoint
        epoch = int(ckpt["epoch"])
        assert last_epoch <= epoch <= 3 and len(ckpt["history"]) == epoch
    if (stage1 / FINAL_MODEL).exists():
        assert len(load_torch(stage1 / FINAL_MODEL)["assignments"]) == 56
    for name in ("stage1/metrics.csv", "stage1/config.yaml", "config.yaml", "skipped.csv"):
        if (run / name).exists():
            assert (run / name).read_text().strip(), name
    for name in ("data.json", "stage1/summary.json", "stage1/names.json"):
        if (run / name).exists():
            json.loads((run / name).read_text())
    temps = [p.name for p in _temps(run, pid)]
    if any(t.startswith(f".{CHECKPOINT}.") for t in temps):
        flags.append("during a checkpoint write")
        if (stage1 / CHECKPOINT).exists():
            flags.append("previous checkpoint loaded")
    elif temps:
        flags.append("during another atomic write")
    if not (stage1 / CHECKPOINT).exists():
        flags.append("before the first checkpoint")
    elif (stage1 / FINAL_MODEL).exists():
        flags.append("after the model was written")
    else:
        flags.append(f"after epoch {epoch}")
    return epoch, flags


def test_killed_train_resumes_to_identical_assignments(phantoms, clean_run, tmp_path):
    rng = np.random.default_rng(SEED + 2)
    landed, kills, chains, t0 = Counter(), 0, 0, time.perf_counter()
    while kills < KILLS:
        run = tmp_path / f"run{chains}"
        chains += 1
        epoch = 0
        for _ in range(int(rng.integers(2, 5))):  # 2-4 kills into the same run, then a clean finish
            ckpt = run / "stage1" / CHECKPOINT
            cmd = _train_cmd(phantoms, run, resume=ckpt.exists())
            mode = ("checkpoint-write", "delay", "after-checkpoint", "checkpoint-write")[kills % 4]
            if epoch == 3:  # only the final clustering is left: no checkpoint will be written
                mode = "delay"
            delay = float(rng.uniform(0.5, 6.0))
            before = ckpt.stat().st_mtime_ns if ckpt.exists() else 0
            started = time.time_ns()
            proc = _start(cmd, tmp_path / "log.txt")
            if mode == "checkpoint-write":   # while a new checkpoint.pt replacing one is being written
                _poll(proc, lambda: ckpt.exists() and any((run / "stage1").glob(f".{CHECKPOINT}.pid{proc.pid}-*.tmp")))
                time.sleep(float(rng.uniform(0.0, 0.01)))
            elif mode == "delay":            # pure timing: start-up, prepare, an epoch, the final step
                _poll(proc, lambda: False, timeout=delay)
            else:                            # part-way through the epoch after a new checkpoint
                _poll(proc, lambda: ckpt.exists() and ckpt.stat().st_mtime_ns != before)
                time.sleep(float(rng.uniform(0.0, 1.0)))
            hit = _kill(proc)
            kills += 1
            epoch, flags = _check_train_crash_state(run, epoch, proc.pid)
            flags = flags if hit else ["after completion"]
            config = run / "config.yaml"  # the first file a train writes, once started up
            if hit and not (config.exists() and config.stat().st_mtime_ns >= started):
                flags.append("during start-up")
            landed.update(flags)
            print(f"kill {kills}: {mode}: {', '.join(flags)}")
            if not hit or kills >= KILLS:
                break
        if hit:
            _run(_train_cmd(phantoms, run, resume=(run / "stage1" / CHECKPOINT).exists()), tmp_path / "log.txt")
        else:
            assert proc.returncode == 0
        assert _final(run) == clean_run
        assert _temps(run) == [], "temp files left behind"
        shutil.rmtree(run)
    _report("train", landed, kills, chains, time.perf_counter() - t0)
    assert kills - landed["after completion"] - landed["during start-up"] >= (KILLS + 1) // 2, landed
    assert landed["previous checkpoint loaded"] >= 1, landed  # a kill mid-write kept the previous one


# ----------------------------------------------------------------------------- stage-2 seed networks

SEED_NET_SETS = TRAIN_SETS + ["stage2.k=2", "stage2.epochs=2", "stage2.min_images=4", "stage2.networks=2",
                              "stage2.refine_rounds=1"]


def _stage2_cmd(phantoms: Path, run: Path, resume: bool) -> list[str]:
    sets = [a for s in SEED_NET_SETS for a in ("--set", s)]
    return _cli("train", str(phantoms), "--out", str(run), "--stages", "2", "--quiet",
                *(["--resume"] if resume else []), *sets)


def _stage2_scores(run: Path) -> dict:
    """Every part's stored training scores (the refined ones) and its extra network's seed."""
    return {part.name: (load_torch(part / "anomaly.pt")["train_scores"].tolist(),
                        load_torch(part / "seed-net-1" / "seed_scores.pt")["scores"].tolist())
            for part in sorted((run / "stage2").iterdir()) if part.is_dir()}


@pytest.fixture(scope="module")
def part_phantoms(tmp_path_factory) -> Path:
    """16 films a part (about 6 studies): enough for the refinement to depend on both seeds."""
    root = tmp_path_factory.mktemp("kill_stage2_ph")
    generate_phantoms(root / "ph", n=112, size=64, seed=3, progress=False, workers=1)
    return root / "ph"


def test_killed_seed_network_training_resumes_to_identical_scores(part_phantoms, tmp_path):
    """stage2.networks=2: kills while an extra network trains, and after its scores are written
    (its checkpoint then deleted), are resumed to exactly the scores of an uninterrupted run."""
    phantoms = part_phantoms
    clean = tmp_path / "clean"
    _run(_stage2_cmd(phantoms, clean, resume=False), tmp_path / "log.txt")
    expected = _stage2_scores(clean)
    assert len(expected) == 7
    run, landed = tmp_path / "run", []
    stage2 = run / "stage2"
    points = {"extra network mid-training": lambda: any(stage2.glob("*/seed-net-1/checkpoint.pt")),
              "extra network's scores written": lambda: any(stage2.glob("*/seed-net-1/seed_scores.pt"))}
    for name, ready in points.items():
        proc = _start(_stage2_cmd(phantoms, run, resume=stage2.exists()), tmp_path / "log.txt")
        _poll(proc, ready)
        if _kill(proc):
            landed.append(name)
        for part in stage2.glob("*/seed-net-1"):   # nothing half-written under a final name
            if (part / "seed_scores.pt").exists():
                load_torch(part / "seed_scores.pt")
            if (part / CHECKPOINT).exists():
                load_torch(part / CHECKPOINT)
    _run(_stage2_cmd(phantoms, run, resume=True), tmp_path / "log.txt")
    assert landed, "no kill landed while stage 2 ran"
    print("seed-network kills landed:", ", ".join(landed))
    assert _stage2_scores(run) == expected
    assert not list(stage2.glob("*/seed-net-1/" + CHECKPOINT)) and _temps(run) == []


# ----------------------------------------------------------------------------- temp files


def test_a_killed_writers_temp_file_is_removed_by_the_next_write(tmp_path):
    """A kill between a temp file's creation and its rename leaves it; the next atomic write into
    that folder removes it once its writer is dead, and never while the writer lives."""
    from bonecluster.io import atomic_write_text

    code = ("import sys, time\nfrom bonecluster.io import atomic_open\n"
            "with atomic_open(sys.argv[1], 'w') as f:\n"
            "    f.write('half'); f.flush(); print('inside', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "big.json")], stdout=subprocess.PIPE,
                            env=ENV, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == b"inside"
        live = _temps(tmp_path, proc.pid)
        assert len(live) == 1
        atomic_write_text(tmp_path / "other.json", "{}")
        assert _temps(tmp_path) == live  # the writer is alive: its temp file stays
    finally:
        _kill(proc)
        proc.stdout.close()
    assert live[0].exists() and not (tmp_path / "big.json").exists()
    atomic_write_text(tmp_path / "other.json", "{}")
    assert _temps(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["other.json"]
