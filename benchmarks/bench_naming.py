"""Accuracy per click: over-clustered stage 1 named from M labelled films per cluster (issue 23).

    python benchmarks/bench_naming.py --data ../shared/data --run RUN [--k 7 15 30 60] [--m 1 3 5]
    python benchmarks/bench_naming.py --data ../shared/data [--preset cpu-real] [--set KEY=VALUE ...]

The network is a stage-1 run trained without labels on training-side films only: ``--run`` (e.g.
the upper-limb run of ``bench_ood.py``, or ``bench_real_suite.py``'s pool run), or one trained
here on ``bench_real_suite``'s pool ``all``. Every source is split by study with the rule of
``bench_real.py`` (seed 0, 30% held out), so a held-out film's study is never trained on or
looked at. For each evaluation

* (a) fracture-parts, its 6 parts (``body_part``);
* (b) MURA elbow vs humerus (``mura-elbow`` + ``mura-humerus``, folder labels);

and each ``k``, k-means (the run's settings, ``--restarts`` seeds) is fitted on the evaluation's
training-side films without labels. Then, for each ``M``, every cluster is named by the majority
part of the M *labelled training-side* films in it nearest its centroid
(:func:`bonecluster.naming.names_from_nearest`, what ``bonecluster name --from`` does); a cluster
without one stays unnamed. The held-out films are assigned to the clusters and scored:
``accuracy_named`` is the share whose cluster's name is their part (unnamed = wrong), with the
number of labels read. Beside it: the label-free Hungarian figure at k = the number of parts and
the supervised ceilings (logistic regression with every training-side label, on the embedding
and on the pooled features), from ``bench_real_suite.score_evaluation`` on the same films.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_real import restart_seeds  # noqa: E402
from bench_real_suite import (EVALUATIONS, _embed, emit, pool_sources, region_labels, require_data,  # noqa: E402
                              score_evaluation, split_all)

NAMING_EVALUATIONS = ("a", "b")


def named_accuracy(train_emb: np.ndarray, train_parts: list[str | None], eval_emb: np.ndarray,
                   eval_parts: np.ndarray, k: int, ms: list[int], seeds: list[int], cfg_cluster) -> dict[int, dict]:
    """accuracy_named and labels read for each M, one k-means fit (the best of ``seeds``)."""
    import torch

    from bonecluster.cluster import assign, kmeans_best_of
    from bonecluster.naming import names_from_nearest

    x = torch.from_numpy(train_emb)
    km = kmeans_best_of(x, k, seeds, niter=cfg_cluster.niter, init=cfg_cluster.init, backend=cfg_cluster.backend)
    clusters, sq = assign(x, km.centroids)
    held = assign(torch.from_numpy(eval_emb), km.centroids)[0].numpy()
    out = {}
    for m in ms:
        named = names_from_nearest(clusters.numpy(), sq.numpy(), train_parts, k, m)
        names = np.array([named[c][0] if c in named else f"cluster-{c}" for c in range(k)])
        out[m] = {"accuracy_named": float(np.mean(names[held] == eval_parts)),
                  "n_labels_read": int(sum(len(v[2]) for v in named.values())), "n_names": len(named)}
    return out


def run_evaluation(ev, run: Path, trained, splits: dict, ks: list[int], ms: list[int], restarts: int) -> dict:
    from bonecluster.data import prepare_sources

    cfg = trained.cfg
    cache = cfg.data.cache or run / "cache"
    sides = {}
    for side, j in (("train", 0), ("eval", 1)):
        ds = prepare_sources([str(splits[s][j]) for s in ev.sources], cfg.data, cache=cache, progress=False)
        sides[side] = (_embed(trained, ds.images())[0], [r.body_part for r in ds.records])
    (e_tr, p_tr), (e_ev, p_ev) = sides["train"], sides["eval"]
    scored = np.array([bool(p) for p in p_ev])
    e_ev, y_ev = e_ev[scored], np.array([p for p in p_ev if p])
    table = {}
    for k in ks:
        per_restart = [named_accuracy(e_tr, p_tr, e_ev, y_ev, k, ms, restart_seeds(r, cfg.cluster.n_init), cfg.cluster)
                       for r in range(restarts)]
        table[k] = {m: {"accuracy_named_mean": float(np.mean([r[m]["accuracy_named"] for r in per_restart])),
                        "accuracy_named_std": float(np.std([r[m]["accuracy_named"] for r in per_restart])),
                        "accuracy_named": [round(r[m]["accuracy_named"], 4) for r in per_restart],
                        "n_labels_read_max": max(r[m]["n_labels_read"] for r in per_restart),
                        "n_names_mean": float(np.mean([r[m]["n_names"] for r in per_restart]))} for m in ms}
    return {"title": ev.title, "train_films": len(p_tr), "train_labelled": sum(1 for p in p_tr if p),
            "held_out_scored": int(scored.sum()), "table": table}


def print_table(result: dict) -> None:
    for key, e in result["evaluations"].items():
        ref = e["reference"]
        print(f"\n({key}) {e['title']}: {e['held_out_scored']} held-out films scored; names read from "
              f"{e['train_labelled']} labelled training-side films at most; label-free Hungarian at k = "
              f"{ref['k']}: {ref['hungarian_mean']:.3f} ± {ref['hungarian_std']:.3f}; supervised ceilings "
              f"{ref['probe_embedding']:.3f} (embedding) / {ref['probe_pooled']:.3f} (pooled)")
        ms = sorted({int(m) for row in e["table"].values() for m in row})
        print("| k | " + " | ".join(f"M = {m}: accuracy_named (labels read)" for m in ms) + " |")
        print("|---|" + "---|" * len(ms))
        for k, row in e["table"].items():
            print(f"| {k} | " + " | ".join(f"{row[m]['accuracy_named_mean']:.3f} ± {row[m]['accuracy_named_std']:.3f} "
                                          f"({row[m]['n_labels_read_max']})" for m in ms) + " |")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--run", help="a stage-1 run trained on training-side films only (default: train one)")
    ap.add_argument("--preset", default="cpu-real")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override (training here)")
    ap.add_argument("--k", type=int, nargs="+", default=[7, 15, 30, 60])
    ap.add_argument("--m", type=int, nargs="+", default=[1, 3, 5])
    ap.add_argument("--restarts", type=int, default=3, help="k-means seeds per k (mean ± std reported)")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "bench_naming"))
    ap.add_argument("--json")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    from bonecluster.checkpoint import TrainedClusters
    from bonecluster.config import load_config
    from bonecluster.pipeline import train

    data, work = require_data(args.data), Path(args.work)
    splits = split_all(data, work)
    t0 = time.perf_counter()
    if args.run:
        run = Path(args.run)
    else:
        run = work / "run"
        train(pool_sources("all", data, splits), run, load_config(args.preset, overrides=args.overrides),
              stages=[1], progress=not args.quiet)
    trained = TrainedClusters.load(run / "stage1")
    regions = region_labels(data) if "fracatlas" in splits else {}
    evaluations = {}
    for ev in EVALUATIONS:
        if ev.key not in NAMING_EVALUATIONS or not all(s in splits for s in ev.sources):
            continue
        evaluations[ev.key] = run_evaluation(ev, run, trained, splits, args.k, args.m, args.restarts)
        evaluations[ev.key]["reference"] = score_evaluation(ev, run, trained, splits, regions, args.restarts)
    result = {"run": str(run), "seconds": round(time.perf_counter() - t0, 1), "k": args.k, "m": args.m,
              "restarts": args.restarts, "evaluations": evaluations}
    return emit(result, print_table, args.json)


if __name__ == "__main__":
    main()
