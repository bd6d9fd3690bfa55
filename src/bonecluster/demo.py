"""``bonecluster demo``: the main job on built-in synthetic data.

It generates phantom radiographs, trains stage 1 (body parts) with the given config (the ``cpu``
preset by default) and prints what it found, scored against the phantoms' known parts (labels
used only to score). It grows into the full two-stage run (stage 2, evaluation, HTML report) as
those pieces land.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from bonecluster.config import Config
from bonecluster.io import atomic_write_text
from bonecluster.pipeline import train

PHANTOM_SIZE = 128


def run_demo(out: str | Path, cfg: Config, n: int = 1400, seed: int = 0, progress: bool = True) -> dict:
    t0 = time.perf_counter()
    out = Path(out)
    phantoms = make_demo_phantoms(out, n, seed, progress)
    summary = train([phantoms], out, cfg, stages=[1], progress=progress)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write_text(out / "demo.json", json.dumps(summary, indent=2))
    _print_summary(summary, out)
    return summary


def make_demo_phantoms(out: Path, n: int, seed: int, progress: bool) -> Path:
    """Generate the phantoms once; a rerun with the same n and seed reuses them."""
    from bonecluster.data.phantoms import generate_phantoms

    phantoms, stamp = out / "phantoms", out / "phantoms.json"
    wanted = {"n": n, "size": PHANTOM_SIZE, "seed": seed}
    if not (stamp.exists() and json.loads(stamp.read_text()) == wanted):
        s = generate_phantoms(phantoms, n=n, size=PHANTOM_SIZE, seed=seed, progress=progress)
        print(f"phantoms: {s.n_images} images, {s.n_studies} studies "
              f"({s.n_abnormal_studies} abnormal) in {s.seconds:.1f} s")
        atomic_write_text(stamp, json.dumps(wanted))
    return phantoms


def _print_summary(summary: dict, out: Path) -> None:
    s1 = summary["stage1"]
    print(f"\nstage 1 (body parts): {s1['n_images']} images -> {s1['k']} clusters, "
          f"{s1['epochs_run']} epochs, {s1['seconds']:.0f} s")
    if "scored_on_labels" in s1:
        m = s1["scored_on_labels"]
        print(f"  Hungarian accuracy {m['accuracy_hungarian']:.3f}   NMI {m['nmi']:.3f}   "
              f"ARI {m['ari']:.3f}   (phantom labels used only to score)")
    print(f"  cluster sizes: {' '.join(str(x) for x in s1['cluster_sizes'])}")
    print(f"skipped files: {summary['skipped_files']}; total {summary['seconds']:.0f} s; run folder: {out}")
