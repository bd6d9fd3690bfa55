"""Simulated naming: a stand-in for a physician who names each stage-1 cluster after a look.

``bonecluster name RUN --from LABELLED --per-cluster M`` embeds the films of ``LABELLED`` with
the run's stage-1 model, and for each cluster takes the ``M`` labelled films assigned to it that
lie nearest its centroid: the films a physician would be shown first. Their majority body part
names the cluster (a tie goes to the part of the nearest film among the tied ones); a cluster
that no labelled film lands in stays ``cluster-N``. Only those films' labels are read, and the
audit (``stage1/naming.json``) lists every one of them.

Several clusters may get the same name (``cluster.k`` above the number of parts): predictions,
``evaluate`` and the viewer then report the part, and the confidence sums over its clusters.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from bonecluster.data.records import Record
from bonecluster.io import atomic_write_text
from bonecluster.names import NAMES, NAMING, save_cluster_names


@dataclass
class ClusterNaming:
    name: str                  # the majority part, or cluster-N without labelled films
    votes: dict[str, int]      # part -> films among the ones looked at
    files: list[str]           # the films whose labels were read, nearest the centroid first


@dataclass
class NamingAudit:
    """What ``naming.json`` holds: where the names came from and which labels were read."""

    method: str                        # "nearest-to-centroid" or "training-metadata"
    sources: list[str]
    per_cluster: int | None
    n_labels_read: int
    clusters: dict[int, ClusterNaming] = field(default_factory=dict)
    studies_read: list[str] = field(default_factory=list)   # study ids of the films read (evaluate checks them)

    @property
    def n_names(self) -> int:
        """Clusters that got a name (not ``cluster-N``)."""
        return sum(1 for c in self.clusters.values() if c.votes)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["clusters"] = {str(k): v for k, v in d["clusters"].items()}
        d["n_names"] = self.n_names
        return d

    def save(self, stage_dir: Path) -> None:
        atomic_write_text(Path(stage_dir) / NAMING, json.dumps(self.to_dict(), indent=2) + "\n")


def _sharing(records: Sequence[Record], paths: Sequence[str], studies: Sequence[str]) -> list[Record]:
    """The ``records`` that are one of ``paths`` (resolved) or belong to one of ``studies``."""
    paths = {os.path.realpath(p) for p in paths}
    studies = set(studies)
    return [r for r in records if os.path.realpath(r.path) in paths or (r.study and r.study in studies)]


def films_named_from(audit: dict | None, records: Sequence[Record]) -> int:
    """How many of ``records`` (evaluation films) share a file or a study with the films whose
    labels named the clusters (0 without an audit)."""
    if not audit:
        return 0
    files = [f for c in audit.get("clusters", {}).values() for f in c.get("files", [])]
    return len(_sharing(records, files, audit.get("studies_read", [])))


def load_naming_audit(stage_dir: str | Path) -> dict | None:
    """The audit of a stage's names as a dict (None when there is none, e.g. an older run)."""
    path = Path(stage_dir) / NAMING
    return json.loads(path.read_text()) if path.is_file() else None


def names_from_nearest(clusters: np.ndarray, sq_distances: np.ndarray, parts: Sequence[str | None], k: int,
                       per_cluster: int) -> dict[int, tuple[str, Counter, list[int]]]:
    """Majority part of the ``per_cluster`` labelled films nearest each cluster's centroid.

    Args:
        clusters: (N,) cluster of each film; sq_distances: (N,) its squared distance to that
            cluster's centroid; parts: (N,) body part or None (unlabelled films are never shown).
    Returns:
        cluster -> (name, votes, indices of the films looked at, nearest first), for the
        clusters with at least one labelled film.
    """
    if per_cluster < 1:
        raise ValueError(f"per_cluster must be at least 1, got {per_cluster}")
    out = {}
    for c in range(k):
        members = [i for i in np.flatnonzero(clusters == c) if parts[i]]
        if not members:
            continue
        shown = sorted(members, key=lambda i: (sq_distances[i], i))[:per_cluster]
        votes = Counter(parts[i] for i in shown)
        top = max(votes.values())
        name = next(parts[i] for i in shown if votes[parts[i]] == top)   # ties: the nearest film's part
        out[c] = (name, votes, shown)
    return out


def check_no_overlap(labelled: Sequence[Record], evaluation: Sequence[Record], labelled_name: str,
                     evaluation_name: str) -> None:
    """ValueError when a film or a study is on both sides (names must not read evaluation labels)."""
    same = _sharing(labelled, [r.path for r in evaluation], [r.study for r in evaluation if r.study])
    if same:
        raise ValueError(f"{labelled_name} overlaps the evaluation data {evaluation_name}: {len(same)} film(s) "
                         f"share a file or a study with it, e.g. {same[0].path}; name clusters from films kept apart")


def name_clusters(run: str | Path, labelled: Sequence[str | Path], per_cluster: int,
                  evaluation: Sequence[str | Path] = (), cache: str | Path | None = None,
                  progress: bool = True) -> NamingAudit:
    """Name the run's stage-1 clusters from ``labelled`` films (see the module docstring).

    Writes ``RUN/stage1/names.json`` (every cluster: its new name or ``cluster-N``) and the audit
    ``RUN/stage1/naming.json``, and returns the audit. ``evaluation``: the data the names will be
    scored on; ``labelled`` sharing a file or a study with it is refused (ValueError).
    """
    import torch

    from bonecluster.data import ReaderLimits, SkipLog, fetch_options, prepare_sources, read_sources
    from bonecluster.predict import Predictor, check_run, load_run_config

    run = check_run(run)
    stage1 = run / "stage1"
    if not (stage1 / NAMES).is_file():
        raise FileNotFoundError(f"{run}: no stage-1 clusters to name (train stage 1 first)")
    cfg = load_run_config(run)
    sources = [str(s) for s in labelled]
    predictor = Predictor(run)
    with tempfile.TemporaryDirectory(prefix="bonecluster-name-") as tmp:
        if evaluation:   # DICOMweb sources among them are fetched into the same cache as the films named
            limits, fetch = ReaderLimits(cfg.data.max_csv_row_chars), fetch_options(cache or tmp, cfg.data, progress)
            check_no_overlap(read_sources(sources, SkipLog(), limits, fetch=fetch),
                             read_sources([str(e) for e in evaluation], SkipLog(), limits, fetch=fetch),
                             ", ".join(sources), ", ".join(map(str, evaluation)))
        data = prepare_sources(sources, cfg.data, cache=cache or tmp, progress=progress)
        clusters, _, embeddings = predictor.stage1_assignments(data)
    sq = predictor.stage1.cluster_distances(torch.from_numpy(embeddings), torch.from_numpy(clusters)).numpy()
    k = predictor.stage1.n_clusters
    named = names_from_nearest(clusters, sq, [r.body_part for r in data.records], k, per_cluster)
    audit = NamingAudit("nearest-to-centroid", sources, per_cluster, sum(len(v[2]) for v in named.values()))
    for c in range(k):
        name, votes, shown = named.get(c, (f"cluster-{c}", Counter(), []))
        audit.clusters[c] = ClusterNaming(name, dict(votes), [data.records[i].path for i in shown])
    audit.studies_read = sorted({data.records[i].study for v in named.values() for i in v[2] if data.records[i].study})
    save_cluster_names(stage1, {c: n.name for c, n in audit.clusters.items()})
    audit.save(stage1)
    return audit


def training_metadata_audit(records: Sequence[Record], assignments: np.ndarray, names: dict[int, str]) -> NamingAudit:
    """The audit of a run's default names: the majority part of each cluster among the training
    films that carry one, so every such label was read."""
    labelled = [r for r in records if r.body_part]
    audit = NamingAudit("training-metadata", [], None, len(labelled))
    for c, name in names.items():
        votes = Counter(r.body_part for r, a in zip(records, assignments) if a == c and r.body_part)
        audit.clusters[c] = ClusterNaming(name, dict(votes), [])
    return audit


__all__ = ["NAMING", "ClusterNaming", "NamingAudit", "check_no_overlap", "films_named_from", "load_naming_audit",
           "name_clusters", "names_from_nearest", "training_metadata_audit"]
