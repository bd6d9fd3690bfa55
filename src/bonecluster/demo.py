"""``bonecluster demo``: the main job on built-in synthetic data.

Today it generates phantoms and prepares the decode-once cache, then prints a summary; it grows
into the full two-stage run (train, evaluate, report) as those pieces land.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from bonecluster.config import Config, to_yaml
from bonecluster.data import prepare_sources, write_skipped_csv
from bonecluster.io import atomic_write_text


def run_demo(out: str | Path, cfg: Config, n: int = 1400, seed: int = 0) -> dict:
    from bonecluster.data.phantoms import generate_phantoms

    out = Path(out)
    phantoms = out / "phantoms"
    stamp = out / "phantoms.json"
    wanted = {"n": n, "size": 128, "seed": seed}
    if not (stamp.exists() and json.loads(stamp.read_text()) == wanted):
        summary = generate_phantoms(phantoms, n=n, size=128, seed=seed)
        print(f"phantoms: {summary.n_images} images, {summary.n_studies} studies "
              f"({summary.n_abnormal_studies} abnormal) in {summary.seconds:.1f} s")
        atomic_write_text(stamp, json.dumps(wanted))
    atomic_write_text(out / "config.yaml", to_yaml(cfg))
    ds = prepare_sources([phantoms], cfg.data, cache=out / "cache")
    ds.save(out / "dataset.json")
    write_skipped_csv(out / "skipped.csv", ds.skipped)
    result = _summary(ds)
    atomic_write_text(out / "summary.json", json.dumps(result, indent=2))
    _print_summary(result, out)
    return result


def _summary(ds) -> dict:
    parts = Counter(r.body_part for r in ds.records)
    abnormal = sum(1 for r in ds.records if r.abnormal)
    return {**ds.summary(), "per_part": dict(sorted(parts.items())), "abnormal_images": abnormal}


def _print_summary(s: dict, out: Path) -> None:
    print(f"cache: {s['images']} images at {s['size']} px, {s['skipped']} skipped, "
          f"{s['decoded']} decoded / {s['reused']} reused in {s['seconds']:.1f} s")
    print("images per body part: " + ", ".join(f"{k} {v}" for k, v in s["per_part"].items()))
    print(f"run folder: {out}")
