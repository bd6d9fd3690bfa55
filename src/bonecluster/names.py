"""Cluster names: ``names.json`` of a stage folder, cluster id -> name, editable by people.

Training writes the default names (:func:`bonecluster.pipeline.default_cluster_names`); a person
renames clusters with ``bonecluster name`` or in the viewer; prediction and stage 2 read them.
Reading and writing them needs nothing of the training code.
"""

from __future__ import annotations

import json
from pathlib import Path

from bonecluster.io import atomic_write_text

NAMES = "names.json"
NAMING = "naming.json"   # the audit of how the names were given (bonecluster.naming), beside names.json


def save_cluster_names(stage_dir: Path, names: dict[int, str]) -> None:
    atomic_write_text(Path(stage_dir) / NAMES, json.dumps({str(k): v for k, v in sorted(names.items())}, indent=2))


def load_cluster_names(stage_dir: Path) -> dict[int, str]:
    return {int(k): v for k, v in json.loads((Path(stage_dir) / NAMES).read_text()).items()}


def name_cluster(run: str | Path, cluster: int, name: str, stage: str = "stage1") -> dict[int, str]:
    """Give a cluster a human name (e.g. after looking at its images); persists in names.json."""
    stage_dir = Path(run) / stage
    if not (stage_dir / NAMES).exists():
        raise FileNotFoundError(f"{stage_dir / NAMES}: no trained {stage} in {run}")
    names = load_cluster_names(stage_dir)
    if cluster not in names:
        raise ValueError(f"{stage} has clusters {min(names)}..{max(names)}, not {cluster}")
    name = name.strip()
    if not name or len(name) > 64 or any(c in name for c in "/\\\0"):
        raise ValueError(f"cluster name {name!r} must be 1-64 characters without slashes")
    names[cluster] = name
    save_cluster_names(stage_dir, names)
    _mark_manual(stage_dir, cluster, name)
    return names


def _mark_manual(stage_dir: Path, cluster: int, name: str) -> None:
    """Keep the naming audit true after a person's rename: the cluster's entry says so (no stored
    label was read for it; the labels read for the earlier name stay counted)."""
    path = Path(stage_dir) / NAMING
    if not path.is_file():
        return
    audit = json.loads(path.read_text())
    entry = audit.setdefault("clusters", {}).setdefault(str(cluster), {"votes": {}, "files": []})
    entry.update(name=name, manual=True)
    atomic_write_text(path, json.dumps(audit, indent=2) + "\n")
