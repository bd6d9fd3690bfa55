"""Stage 1 on real films, three held-out evaluations and their supervised ceilings, in one table.

    python benchmarks/bench_real_suite.py --data ../shared/data --preset cpu-real [--set k=v ...]
    python benchmarks/bench_real_suite.py --data ../shared/data --pool small      # the earlier 1,840-film kind of pool
    python benchmarks/bench_real_suite.py --data ../shared/data --run RUN         # score a trained run again

Every labelled source is split by study (the file, where there is none) with a fixed seed, 70%
train and 30% held out (``bench_real.split_source``), so no study is on both sides. Stage 1 trains
once, without labels, on the training side of the pool:

* ``all``: the training side of fracture-parts, mura-humerus, mura-elbow and fracatlas, plus every
  mura-unlabelled film (about 3,900 films);
* ``small``: the training side of fracture-parts and of mura-humerus-64 (same studies as
  mura-humerus, so its held-out studies stay unseen), about 1,500 films.

Then each evaluation embeds its films with the run's network and PCA-whitening, fits k-means with
k = its number of classes on its *training-side* films (no label read), assigns the held-out
films, and scores them (Hungarian accuracy, mean ± std over ``--kmeans-restarts`` seeds):

* (a) fracture-parts, 6 parts (``body_part``);
* (b) the clean MURA pair, ELBOW vs HUMERUS (``mura-elbow`` + ``mura-humerus``, folder labels);
* (c) FracAtlas regions (``region``: hand = any upper limb, leg, hip, shoulder = chest and
  shoulder), single-region films only.

The supervised ceiling of each is a logistic regression fitted with every training-side label
and scored on the same held-out films: on the embedding k-means sees, and on the backbone's
pooled features (standardised). ``ratio`` is the label-free figure over the embedding's ceiling.
"commonest class" is the share of the largest class among the scored films, which one cluster
holding every film would score: (b) is about 70% humerus. On such unequal classes a Hungarian
figure near that share may come from clusters that ignore the part, so the adjusted Rand index
(ARI: 0 for clusters independent of the part, whatever their sizes; 1 for the parts exactly) is
printed beside it.
For (a) the run's own stage-1 clusters (k = ``cluster.k``, fitted on the pool) are scored too,
as ``bench_real.py`` does. Labels only score.

``--space`` re-fits the space k-means works in on the pool's features of the same network before
scoring, to compare spaces on one trained network: ``pca`` (PCA-whitening of all features, what
``cluster.subspace=none`` fits; it reproduces such a run) or ``phantom-parts`` (whitening inside
the phantom part directions, ``cluster.subspace=phantom-parts``). The default, ``run``, keeps the
run's own. With ``--run``, ``--set`` takes ``cluster.*`` keys for that re-fit, e.g.
``--space pca --set cluster.eigen_power=0`` (PCA without whitening) or ``cluster.pca_dim=8``;
``--set cluster.study_links=K`` alone needs no ``--space``: each evaluation's k-means then merges
K over-clusters through shared studies (``bonecluster.study_links``), as the engine's final
clustering does, on evaluations whose training-side films share studies ((b) here; (a) and (c)
carry no study ids, so plain k-means). Such an evaluation also reports ``hungarian_study_vote``:
each held-out study's films in the cluster most of them take, which is what ``predict`` gives a
study_links run's studies (the main figure stays the film's own nearest centroid).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_real import final_kmeans, restart_seeds, split_source  # noqa: E402  (one split, seed and clustering rule)

# source name -> path inside --data
SOURCES = {
    "fracture-parts": "fracture-parts/manifest.csv",
    "mura-humerus": "mura-humerus",
    "mura-humerus-64": "mura-humerus-64",
    "mura-elbow": "mura-elbow",
    "fracatlas": "fracatlas/manifest.csv",
    "mura-unlabelled": "mura-unlabelled",
}
POOLS = {
    "all": (["fracture-parts", "mura-humerus", "mura-elbow", "fracatlas"], ["mura-unlabelled"]),
    "small": (["fracture-parts", "mura-humerus-64"], []),
}   # (sources whose training side is used, sources used whole: no labels, no held-out side)


# cluster settings that change only the final k-means, not the space it runs in (--run keeps the run's space)
FINAL_CLUSTERING_KEYS = ("cluster.study_links=", "cluster.n_init=", "cluster.niter=")


@dataclass(frozen=True)
class Evaluation:
    key: str
    title: str
    sources: tuple[str, ...]
    label: str              # "body_part" or "region"


EVALUATIONS = (
    Evaluation("a", "fracture-parts, 6 parts", ("fracture-parts",), "body_part"),
    Evaluation("b", "MURA elbow vs humerus", ("mura-elbow", "mura-humerus"), "body_part"),
    Evaluation("c", "FracAtlas regions", ("fracatlas",), "region"),
)


def require_data(data: str | Path) -> Path:
    """``--data`` as a Path; exits with a message when it is not a folder."""
    data = Path(data)
    if not data.is_dir():
        raise SystemExit(f"{data}: no such folder (give --data, the folder with the real-film sources)")
    return data


def emit(result: dict, print_table, json_path: str | None) -> dict:
    """Print the result as JSON and as a table, and write the JSON to ``json_path`` too."""
    print(json.dumps(result, indent=2))
    print_table(result)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
    return result


def split_all(data: Path, work: Path, holdout: float = 0.3) -> dict[str, tuple[Path, Path]]:
    """(train.csv, eval.csv) per labelled source present under ``data``, written under ``work/splits``."""
    splits = {}
    for name, rel in SOURCES.items():
        if name == "mura-unlabelled" or not (data / rel).exists():
            continue
        splits[name] = split_source(str(data / rel), holdout, work / "splits" / name)
    return splits


def pool_sources(pool: str, data: Path, splits: dict) -> list[str]:
    split_side, whole = POOLS[pool]
    missing = [s for s in split_side if s not in splits] + [s for s in whole if not (data / SOURCES[s]).exists()]
    if missing:
        raise SystemExit(f"{data}: missing {', '.join(missing)} for pool {pool!r}")
    return [str(splits[s][0]) for s in split_side] + [str(data / SOURCES[s]) for s in whole]


def region_labels(data: Path) -> dict[str, str]:
    """FracAtlas film path (absolute) -> region, for films of one region only."""
    manifest = data / SOURCES["fracatlas"]
    out = {}
    with open(manifest, newline="") as f:
        for row in csv.DictReader(f):
            region = (row.get("region") or "").strip()
            if region and "+" not in region:
                out[os.path.abspath(manifest.parent / row["path"])] = region
    return out


def _labels(records, label: str, regions: dict[str, str]) -> np.ndarray:
    if label == "region":
        return np.array([regions.get(os.path.abspath(r.path), "") for r in records])
    return np.array([r.body_part or "" for r in records])


def _embed(trained, images: np.ndarray, batch_size: int = 256):
    """uint8 (N, S, S) -> (whitened, L2-normalised embedding (N, d), pooled features (N, D)), numpy."""
    import torch

    from bonecluster.cluster import l2_normalise

    emb, raw = [], []
    with torch.no_grad():
        for s in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[s:s + batch_size])).float().div_(255).unsqueeze(1)
            feats = trained.model.features(x).float()
            raw.append(feats.numpy())
            emb.append(l2_normalise(trained.pca.transform(feats)).numpy())
    return np.concatenate(emb), np.concatenate(raw)


def _probe(x_train, y_train, x_eval, y_eval, standardise: bool) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = LogisticRegression(max_iter=5000, C=1.0)
    model = make_pipeline(StandardScaler(), clf) if standardise else clf
    model.fit(x_train, y_train)
    return float((model.predict(x_eval) == y_eval).mean())


def _majority_share(labels: np.ndarray) -> float:
    """Share of the commonest class: what one cluster holding every film scores (Hungarian)."""
    _, counts = np.unique(labels, return_counts=True)
    return float(counts.max() / counts.sum())


def score_evaluation(ev: Evaluation, run: Path, trained, splits: dict, regions: dict, restarts: int) -> dict:
    """Label-free k-means figure, supervised ceilings and their ratio for one evaluation."""
    import torch

    from bonecluster.data import prepare_sources
    from bonecluster.data.records import study_index
    from bonecluster.metrics import ari, hungarian_accuracy
    from bonecluster.predict import CONFIDENCE_TEMPERATURE
    from bonecluster.study_links import assign_clusters, cluster_probabilities, study_vote

    cfg = trained.cfg
    cache = cfg.data.cache or run / "cache"
    sides = {}
    for side, j in (("train", 0), ("eval", 1)):
        ds = prepare_sources([str(splits[s][j]) for s in ev.sources], cfg.data, cache=cache, progress=False)
        emb, raw = _embed(trained, ds.images())
        sides[side] = (emb, raw, _labels(ds.records, ev.label, regions), study_index(ds.records))
    (e_tr, r_tr, y_tr, s_tr), (e_ev, r_ev, y_ev, s_ev) = sides["train"], sides["eval"]
    scored, known = y_ev != "", y_tr != ""
    classes = sorted(set(y_ev[scored]) | set(y_tr[known]))
    k = len(classes)
    scores, aris, linked, voted = [], [], 0, []
    for r in range(restarts):
        km, merged = final_kmeans(torch.from_numpy(e_tr), k, restart_seeds(r, cfg.cluster.n_init), cfg.cluster, s_tr)
        linked += merged
        clusters = assign_clusters(torch.from_numpy(e_ev), km).numpy()
        if merged:   # each held-out study's films in the cluster most of them take (rule SV)
            prob = cluster_probabilities(torch.from_numpy(e_ev), km.centroids, km.groups, CONFIDENCE_TEMPERATURE)
            vote = study_vote(clusters, prob.numpy(), s_ev)
            voted.append(hungarian_accuracy(vote[scored], y_ev[scored]))
        scores.append(hungarian_accuracy(clusters[scored], y_ev[scored]))
        aris.append(ari(clusters[scored], y_ev[scored]))
    ceiling = _probe(e_tr[known], y_tr[known], e_ev[scored], y_ev[scored], standardise=False)
    ceiling_raw = _probe(r_tr[known], y_tr[known], r_ev[scored], y_ev[scored], standardise=True)
    out = {"title": ev.title, "classes": classes, "k": k, "train_films": len(y_tr), "train_labelled": int(known.sum()),
           "held_out_films": len(y_ev), "held_out_scored": int(scored.sum()),
           "study_links": linked,   # restarts whose clusters were merged through shared studies (0: plain k-means)
           "hungarian_study_vote": float(np.mean(voted)) if voted else None,   # those restarts, studies voting
           "majority_share": _majority_share(y_ev[scored]),
           "hungarian_mean": float(np.mean(scores)), "hungarian_std": float(np.std(scores)),
           "hungarian_scores": [round(s, 4) for s in scores],
           "ari_mean": float(np.mean(aris)), "ari_std": float(np.std(aris)),
           "probe_embedding": ceiling, "probe_pooled": ceiling_raw,
           "ratio": float(np.mean(scores)) / ceiling if ceiling > 0 else None}
    if ev.key == "a" and trained.centroids is not None:   # None: the space was re-fitted (--space)
        run_clusters = trained.assign(torch.from_numpy(e_ev))[0].numpy()
        out["run_clusters_hungarian"] = hungarian_accuracy(run_clusters[scored], y_ev[scored])
    return out


def refit_space(trained, space: str, pool: list[str], cache: Path, films: int) -> None:
    """Replace ``trained.pca`` by the ``space`` fitted on the pool's features (see ``--space``)."""
    import torch

    from bonecluster.cluster import fit_pca_whitening
    from bonecluster.data import prepare_sources
    from bonecluster.phantom_subspace import phantom_part_whitening, subspace_corpus

    cfg = trained.cfg
    ds = prepare_sources(pool, cfg.data, cache=cache, progress=False)
    feats = torch.from_numpy(_embed(trained, ds.images())[1])
    if space == "pca":
        trained.pca = fit_pca_whitening(feats, dim=cfg.cluster.pca_dim, eigen_power=cfg.cluster.eigen_power)
    else:
        corpus = subspace_corpus(films, cfg.data, cfg.seed)
        trained.pca = phantom_part_whitening(trained.model, feats, corpus, torch.device("cpu"), dim=cfg.cluster.pca_dim,
                                             eigen_power=cfg.cluster.eigen_power)
    trained.centroids = None   # the run's own clusters live in the old space


def print_table(result: dict) -> None:
    print(f"\npool {result['pool']} ({result['train_films']} films, labels unused), preset {result['preset']} "
          f"{' '.join(result['overrides'])}; train {result['train_seconds']} s; space {result['space']} "
          f"({result['embedding_dim']} dims, eigen power {result['eigen_power']})")
    print("| evaluation | k | train / held-out (scored) | commonest class | label-free Hungarian | ARI | probe on embedding | "
          "probe on pooled features | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key, e in result["evaluations"].items():
        extra = f" (run's k={result['k']} clusters: {e['run_clusters_hungarian']:.3f})" if "run_clusters_hungarian" in e else ""
        if e.get("hungarian_study_vote") is not None:   # what predict gives a study_links run's studies
            extra += f" (studies voting, as predict: {e['hungarian_study_vote']:.3f})"
        print(f"| ({key}) {e['title']} | {e['k']} | {e['train_films']} / {e['held_out_films']} ({e['held_out_scored']}) "
              f"| {e['majority_share']:.3f} | {e['hungarian_mean']:.3f} ± {e['hungarian_std']:.3f}{extra} "
              f"| {e['ari_mean']:.3f} | {e['probe_embedding']:.3f} "
              f"| {e['probe_pooled']:.3f} | {e['ratio']:.2f} |")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data", help="the folder holding the real-film sources")
    ap.add_argument("--pool", choices=sorted(POOLS), default="all", help="label-free training films (default all)")
    ap.add_argument("--preset", default="cpu-real")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="config override KEY=VALUE; with --run, cluster.* keys for the re-fitted --space")
    ap.add_argument("--run", help="score this trained run instead of training one")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "bench_real_suite"))
    ap.add_argument("--space", choices=("run", "pca", "phantom-parts"), default="run",
                    help="re-fit the clustering space on the pool's features first (default: the run's own)")
    ap.add_argument("--subspace-films", type=int,
                    help="labelled phantoms the phantom-parts space is fitted on (default: the run's cluster.subspace_films)")
    ap.add_argument("--kmeans-restarts", type=int, default=5)
    ap.add_argument("--json", help="write the result here too")
    ap.add_argument("--quiet", action="store_true", help="no progress bars while training")
    args = ap.parse_args(argv)

    from bonecluster.checkpoint import TrainedClusters
    from bonecluster.config import apply_override, load_config
    from bonecluster.pipeline import train

    data, work = require_data(args.data), Path(args.work)
    splits = split_all(data, work)
    t0 = time.perf_counter()
    if args.run:
        run = Path(args.run)
        n_train = None
    else:
        run = work / "run"
        cfg = load_config(args.preset, overrides=args.overrides)
        summary = train(pool_sources(args.pool, data, splits), run, cfg, stages=[1], progress=not args.quiet)
        n_train = summary["stage1"]["n_images"]
    t1 = time.perf_counter()
    trained = TrainedClusters.load(run / "stage1")
    if args.run and args.overrides:   # e.g. --space pca --set cluster.eigen_power=0: another space, same network
        final_only = all(o.startswith(FINAL_CLUSTERING_KEYS) for o in args.overrides)   # the space stays the run's
        if (args.space == "run" and not final_only) or any(not o.startswith("cluster.") or o.startswith("cluster.subspace=")
                                                           for o in args.overrides):
            raise SystemExit("with --run, --set takes only cluster.* keys (the space itself is --space), "
                             "and needs --space pca or phantom-parts unless it sets only "
                             + ", ".join(k.rstrip("=") for k in FINAL_CLUSTERING_KEYS))
        for item in args.overrides:
            trained.cfg = apply_override(trained.cfg, item)
    if args.space != "run":
        refit_space(trained, args.space, pool_sources(args.pool, data, splits), trained.cfg.data.cache or run / "cache",
                    args.subspace_films or trained.cfg.cluster.subspace_films)
    regions = region_labels(data) if (data / SOURCES["fracatlas"]).exists() else {}
    evaluations = {ev.key: score_evaluation(ev, run, trained, splits, regions, args.kmeans_restarts)
                   for ev in EVALUATIONS if all(s in splits for s in ev.sources)}
    result = {"pool": args.pool if not args.run else f"run {run}", "preset": args.preset, "overrides": args.overrides,
              "space": args.space, "embedding_dim": trained.pca.output_dim,
              "eigen_power": trained.cfg.cluster.eigen_power,
              "train_films": n_train if n_train is not None else len(trained.assignments),
              "train_seconds": round(t1 - t0, 1), "score_seconds": round(time.perf_counter() - t1, 1),
              "k": trained.cfg.cluster.k, "evaluations": evaluations}
    return emit(result, print_table, args.json)


if __name__ == "__main__":
    main()
