"""Stage 2 on real films, piece by piece: held-out AUROC of each part of the label-free score.

    python benchmarks/bench_real_stage2.py --data ../shared/data --source mura-humerus [--set stage2.size=128 ...]
    python benchmarks/bench_real_stage2.py --source mura-humerus --run /tmp/bench_real_stage2/mura-humerus/run
    python benchmarks/bench_real_stage2.py --source fracatlas-hand --ceiling --labels-seeds 0 1 2

One source is split by study (the file, where there is none: FracAtlas) with the fixed seed and
30% hold-out of ``bench_real.split_source``. One stage-2 part model is trained on the training side
without labels (``bonecluster.stage2.train.train_stage2``; preset ``cpu`` unless ``--preset``),
then every piece of its score is scored on the held-out films (image AUROC; labels only score):

* ``knn_global`` and ``knn_patch``: the kNN distances in the pooled features and the layer-3
  patches, and ``knn``, the two combined (``stage2.score``), the refiner's seed (with
  ``stage2.networks`` > 1 the seed is the mean rank with the extra networks, which keep only
  their training scores, so only this network's kNN is scored here);
* ``gauss_global`` and ``gauss_patch``: feature-space Gaussians fitted on the training films'
  features, not a ``stage2.score`` choice: the Mahalanobis distance to one Gaussian over the
  raw pooled features (Rippel et al. 2020; the kNN reads them PCA-whitened), and the largest
  distance over the L2-normalised layer-3 positions, one Gaussian each (PaDiM-like, Defard et
  al. 2021; ``bonecluster.anomaly``);
* ``label_free``: the product's score (the refined one by default), with its sensitivity,
  specificity and study kappa at the label-free threshold; ``label_free_study``: each held-out
  image scored with its study's mean label-free score (the views of a study share one label);
* ``seed_agreement``: the Spearman correlation, over the *training* studies (no label), of the
  refined score with this network's kNN seed, study means. A refinement that inverts its seed
  shows here as a negative figure without any label;
* with ``--labels-fraction F`` (default 0.05) and ``--labels-seeds``: the few-label probe, fitted
  afterwards on the trained part (``stage2.labels_*``; only its audited share of training labels is
  read), one row per label seed;
* with ``--ceiling``: the supervised yardsticks on the same films with *every* training label,
  HOG logistic regression (``bonecluster.yardstick.hog_reference``) and the part's network
  fine-tuned (``cnn_reference``, ``--cnn-epochs``, 20); ``--ceiling hog`` the first only.

Sources (``--source``): ``mura-humerus`` (256 px films), ``mura-humerus-64`` (the same studies
squashed to 64 px), ``mura-elbow``, and FracAtlas by region, ``fracatlas-hand`` (any upper-limb
film) and ``fracatlas-leg`` (single-region films; FracAtlas's fracture label). FracAtlas films
carry no MURA part, so the model is trained under the region's name. ``--eval-source`` scores
another source's held-out films with the same model (e.g. a MURA humerus model on FracAtlas
upper-limb films: the transfer to another hospital).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_real import split_source  # noqa: E402

SOURCES = {   # name: (folder or manifest under --data, FracAtlas region or None)
    "mura-humerus": ("mura-humerus", None),
    "mura-humerus-64": ("mura-humerus-64", None),
    "mura-elbow": ("mura-elbow", None),
    "fracatlas-hand": ("fracatlas/manifest.csv", "hand"),
    "fracatlas-leg": ("fracatlas/manifest.csv", "leg"),
}


def split_by_study(data: Path, name: str, work: Path) -> tuple[Path, Path]:
    """train.csv and eval.csv of a source, split by study with ``bench_real.split_source``'s seed
    and 30% hold-out. A FracAtlas region is the whole of FracAtlas split so (the split of
    ``bench_real_suite.py``), then cut to the region's single-region films with a label."""
    where, region = SOURCES[name]
    path = data / where
    if not path.exists():
        raise SystemExit(f"{path}: not found (is --data the folder that holds the real-film sources?)")
    train_csv, eval_csv = split_source(str(path), 0.3, work / "split")
    if region is None:
        return train_csv, eval_csv
    with open(path, newline="") as f:
        keep = {os.path.abspath(path.parent / row["path"]) for row in csv.DictReader(f)
                if (row.get("region") or "").strip() == region and (row.get("abnormal") or "") != ""}
    out = []
    for side in (train_csv, eval_csv):
        with open(side, newline="") as f:
            rows = list(csv.reader(f))
        target = side.with_name(f"{side.stem}-{region}.csv")
        with open(target, "w", newline="") as g:
            csv.writer(g).writerows([rows[0], *(r for r in rows[1:] if r[0] in keep)])
        out.append(target)
    return out[0], out[1]


def part_name(name: str) -> str:
    """The name the part model is trained under: MURA's folder part, or the FracAtlas region."""
    return {"mura-humerus": "HUMERUS", "mura-humerus-64": "HUMERUS", "mura-elbow": "ELBOW"}.get(
        name, name.upper())


def train_part(train_csv: Path, run: Path, cfg, part: str, progress: bool,
               phantom_cache: Path) -> tuple[float, float]:
    """Train the stage-2 model of one part on ``train_csv`` (labels unused); returns the seconds of
    the phantom pre-training (0 where none is asked for or ``phantom_cache`` holds it) and of the rest."""
    from bonecluster.data import prepare_sources
    from bonecluster.pipeline import resolve_phantom_weights
    from bonecluster.config import stage2_data_config
    from bonecluster.stage2.train import train_stage2

    t0 = time.perf_counter()
    data = prepare_sources([str(train_csv)], stage2_data_config(cfg), cache=run / "cache", progress=progress)
    t1 = time.perf_counter()
    # stage2.weights=phantoms: pre-trained once under phantom_cache, shared by every source of --work
    # (with phantoms.adapt, one per source: it adapts to the source's training films)
    cfg = resolve_phantom_weights(cfg, run, progress, stages=(2,), cache=phantom_cache, stage2_films=data)
    t2 = time.perf_counter()
    train_stage2(data, run, cfg, stage1_names=[part] * len(data), progress=progress)
    return t2 - t1, (t1 - t0) + (time.perf_counter() - t2)


def study_means(records, scores: np.ndarray) -> tuple[list, np.ndarray]:
    from bonecluster.data.records import study_key
    from bonecluster.metrics import study_level

    return study_level([study_key(r) for r in records], scores)


def threshold_metrics(records, scores: np.ndarray, threshold: float) -> dict:
    """Sensitivity, specificity (image) and Cohen's kappa (study means) at a threshold."""
    from bonecluster.metrics import binary_scores, cohen_kappa

    truth = np.array([bool(r.abnormal) for r in records])
    out = {k: binary_scores(truth, scores >= threshold)[k] for k in ("sensitivity", "specificity")}
    keys, study_scores = study_means(records, scores)
    _, study_truth = study_means(records, truth.astype(float))
    out["kappa_study"] = cohen_kappa(study_truth >= 0.5, study_scores >= threshold)
    out["flagged_share"] = float((scores >= threshold).mean())
    return out


def score_pieces(folder: Path, train, held_out) -> dict:
    """Held-out AUROC of every piece of a trained part's score, and the training-side agreement."""
    import torch

    from bonecluster.anomaly import gaussian_scores, patch_gaussian_scores
    from bonecluster.checkpoint import TrainedClusters
    from bonecluster.metrics import auroc
    from bonecluster.selftrain import study_mean
    from bonecluster.stage2.guard import spearman
    from bonecluster.stage2.scoring import (ANOMALY, PartAnomaly, knn_groups, knn_seed_scores, part_features,
                                            study_groups)

    trained = TrainedClusters.load(folder, torch.device("cpu"))
    anomaly = PartAnomaly.load(folder / ANOMALY)
    images = held_out.images()
    truth = held_out.abnormal(np.arange(len(held_out)))
    pooled, patches = part_features(trained, images, pool=anomaly.patch_pool)   # one feature pass for every piece
    parts = anomaly.knn_parts(trained, pooled, patches)
    pieces = {f"knn_{kind}": score for kind, score in parts.items()}
    pieces["knn"] = anomaly.combine(parts)
    # Feature-space Gaussians (not a stage2.score choice): one over the pooled features, and PaDiM's
    # one per layer3 position, fitted on the training films' features.
    train_pooled, train_patches = part_features(trained, train.images(), pool=anomaly.patch_pool)
    pieces["gauss_global"] = gaussian_scores(train_pooled, pooled)
    pieces["gauss_patch"] = patch_gaussian_scores(train_patches, patches)
    label_free = anomaly.refiner.score(images) if anomaly.refiner is not None else pieces["knn"]
    pieces["label_free"] = label_free
    # Every view of a study carries the study's mean label-free score (MURA labels whole studies).
    pieces["label_free_study"] = torch.as_tensor(study_mean(label_free.numpy(), study_groups(held_out).numpy()))
    out = {name: auroc(truth, s.numpy()) for name, s in pieces.items()}
    out.update(threshold_metrics(held_out.records, label_free.numpy(), anomaly.threshold))
    out["threshold_method"] = anomaly.threshold_method
    out["refined"] = anomaly.refiner is not None
    out["checks"] = anomaly.checks   # training's own label-free checks (stage2.guard), when it recorded them
    if anomaly.refiner is not None:   # label-free check: does the refinement keep its seed's direction?
        seed = knn_seed_scores(trained, train, trained.cfg.stage2, seed=trained.cfg.seed,
                               batch_size=trained.cfg.train.feature_batch_size)
        _, a = study_means(train.records, anomaly.train_scores.numpy())
        _, b = study_means(train.records, seed.numpy())
        out["seed_agreement"] = spearman(a, b)
    out["n_held_out"], out["abnormal_share"] = len(held_out), float(truth.mean())
    out["n_train"], out["n_train_groups"] = len(train), int(len(torch.unique(knn_groups(train))))
    return out


def few_label_rows(folder: Path, train, held_out, fraction: float, label_seeds: list[int]) -> list[dict]:
    """Held-out AUROC of the few-label probe fitted on the trained part, one row per label seed."""
    import torch
    from dataclasses import replace

    from bonecluster.checkpoint import TrainedClusters
    from bonecluster.metrics import auroc
    from bonecluster.stage2.fewlabel import train_part_probe
    from bonecluster.stage2.scoring import ANOMALY, PartAnomaly

    trained = TrainedClusters.load(folder, torch.device("cpu"))
    anomaly = PartAnomaly.load(folder / ANOMALY)
    images = held_out.images()
    truth = held_out.abnormal(np.arange(len(held_out)))
    unsupervised = anomaly.score(trained, images)
    rows = []
    for s in label_seeds:
        s2 = replace(trained.cfg.stage2, labels_fraction=fraction, labels_seed=s)
        probe = train_part_probe(trained, train, anomaly, s2, folder.name,
                                 batch_size=trained.cfg.train.feature_batch_size)
        if probe is None:
            rows.append({"labels_seed": s, "auroc": None})
            continue
        prob = probe.score(trained, images, anomaly, unsupervised=unsupervised)
        rows.append({"labels_seed": s, "auroc": auroc(truth, prob.numpy()), "labels_read": probe.n_labels})
    return rows


def yardsticks(folder: Path, train, held_out, seed: int, which: str = "all", cnn_epochs: int = 20) -> dict:
    """Supervised references with every training label (not the product's scores); ``which`` "hog"
    skips the fine-tuned CNN (hours on a CPU at 224 px), trained ``cnn_epochs``."""
    import torch

    from bonecluster.checkpoint import TrainedClusters
    from bonecluster.yardstick import cnn_reference, hog_reference

    truth = train.abnormal(np.arange(len(train)))
    vtruth = held_out.abnormal(np.arange(len(held_out)))
    images, vimages = train.images(), held_out.images()
    out = {"hog_sup": hog_reference(images, truth, vimages, vtruth), "cnn_sup": None}
    if which == "all":
        model = TrainedClusters.load(folder, torch.device("cpu")).model
        out["cnn_sup"] = cnn_reference(model, images, truth, vimages, vtruth, seed=seed, epochs=cnn_epochs)
    return out


def print_table(result: dict) -> None:
    def f(v):
        return "-" if v is None else f"{v:.3f}"

    for key, r in result["evaluations"].items():
        print(f"\n{key}: {r['n_held_out']} held-out films ({r['abnormal_share']:.0%} abnormal), model trained on "
              f"{r['n_train']} films in {r['n_train_groups']} studies, size {result['size']} px")
        for name in ("knn_global", "knn_patch", "knn", "gauss_global", "gauss_patch", "label_free", "label_free_study"):
            if name in r:
                print(f"  {name:16s} AUROC {f(r[name])}")
        print(f"  at the label-free threshold ({r['threshold_method']}): sensitivity {f(r['sensitivity'])}, "
              f"specificity {f(r['specificity'])}, study kappa {f(r['kappa_study'])}, flagged {r['flagged_share']:.0%}")
        if r.get("seed_agreement") is not None:
            print(f"  seed agreement (training studies, no label): Spearman {r['seed_agreement']:+.3f}")
        if (r.get("checks") or {}).get("framing") is not None:
            print(f"  framing (training films, no label): Spearman {r['checks']['framing']:+.3f} with the fill share"
                  + (" -- warned" if any("framing" in w for w in r["checks"]["warnings"]) else ""))
        rows = r.get("few_label") or []
        vals = [x["auroc"] for x in rows if x["auroc"] is not None]
        if vals:
            print(f"  few-label ({result['labels_fraction']:.0%}) AUROC {np.mean(vals):.3f} ± {np.std(vals):.3f} "
                  f"over {len(vals)} label seeds: {', '.join(f(v) for v in vals)}")
        if r.get("yardstick"):
            y = r["yardstick"]
            print(f"  yardstick (every label): HOG {f(y['hog_sup'])}, CNN {f(y['cnn_sup'])}")
    print(f"\ntraining {result['train_seconds']} s, scoring {result['score_seconds']} s")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data", help="the folder holding the real-film sources")
    ap.add_argument("--source", choices=sorted(SOURCES), default="mura-humerus", help="train and evaluate on this")
    ap.add_argument("--eval-source", choices=sorted(SOURCES), action="append", default=[],
                    help="also score this source's held-out films with the same model")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override KEY=VALUE")
    ap.add_argument("--run", help="score this trained run (its RUN/stage2/<PART>) instead of training one")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "bench_real_stage2"))
    ap.add_argument("--labels-fraction", type=float, default=0.05)
    ap.add_argument("--labels-seeds", type=int, nargs="*", default=[], help="few-label probe label seeds (none: off)")
    ap.add_argument("--ceiling", nargs="?", const="all", choices=("all", "hog"),
                    help="also train the supervised yardsticks (every label); 'hog': the HOG one only")
    ap.add_argument("--cnn-epochs", type=int, default=20, help="epochs of the fine-tuned CNN yardstick (--ceiling)")
    ap.add_argument("--json", help="write the result here too")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)

    from bonecluster.config import load_config
    from bonecluster.data import prepare_sources

    data, work = Path(args.data), Path(args.work)
    splits = {}
    for name in dict.fromkeys([args.source, *args.eval_source]):
        splits[name] = split_by_study(data, name, work / name)
    part = part_name(args.source)
    train_seconds = pretrain_seconds = None
    if args.run:
        run = Path(args.run)
    else:
        run = work / args.source / "run"
        cfg = load_config(args.preset, overrides=args.overrides)
        pretrain, rest = train_part(splits[args.source][0], run, cfg, part, not args.quiet, work / "phantom-cache")
        pretrain_seconds, train_seconds = round(pretrain, 1), round(rest, 1)
    t1 = time.perf_counter()
    folder = run / "stage2" / part
    if not folder.is_dir():
        raise SystemExit(f"{folder}: no trained stage-2 part model here")
    from bonecluster.checkpoint import TrainedClusters

    cfg = TrainedClusters.load(folder).cfg
    train = prepare_sources([str(splits[args.source][0])], cfg.data, cache=run / "cache", progress=False)
    evaluations = {}
    for name in splits:
        held_out = prepare_sources([str(splits[name][1])], cfg.data, cache=run / "cache", progress=False)
        r = score_pieces(folder, train, held_out)
        if args.labels_seeds and name == args.source:
            r["few_label"] = few_label_rows(folder, train, held_out, args.labels_fraction, args.labels_seeds)
        if args.ceiling and name == args.source:
            r["yardstick"] = yardsticks(folder, train, held_out, cfg.seed, args.ceiling, args.cnn_epochs)
        evaluations[name] = r
    result = {"source": args.source, "part": part, "preset": args.preset, "overrides": args.overrides,
              "size": cfg.data.size, "fit": cfg.data.fit, "labels_fraction": args.labels_fraction,
              "train_seconds": train_seconds, "pretrain_seconds": pretrain_seconds,
              "score_seconds": round(time.perf_counter() - t1, 1),
              "evaluations": evaluations}
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
