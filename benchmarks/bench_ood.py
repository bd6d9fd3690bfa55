"""How well the out-of-distribution flag (``typicality`` / ``in_distribution``) separates films a
run was not trained on from films like its training films. Two settings (issue 23):

    python benchmarks/bench_ood.py --data ../shared/data [--only phantom|upper-limb] [--set KEY=VALUE ...]

1. **A run trained on phantoms** (``--phantom-preset``, default ``cpu``, stage 1 only, on
   ``--phantoms`` generated films; or ``--phantom-run RUN``, e.g. the demo's run): the share of
   real films flagged (each real source apart and all together) against the share of new phantoms
   (another generator seed) flagged.
2. **A run trained on real upper-limb films** (``--preset``, default ``cpu-real``, stage 1 only;
   or ``--upper-run RUN`` trained by this script before): the training side (split by study, the
   rule of ``bench_real.py``) of mura-humerus, mura-elbow, FracAtlas's upper-limb films
   (region ``hand``) and fracture-parts' films with a part, plus mura-unlabelled. Scored on the
   held-out side of the same sources against every FracAtlas leg and hip film (one region only;
   no such film is trained on): both flagged shares and the AUROC between the two groups, with the
   mean 5-NN cosine distance as the score (typicality is that distance's rank among the training
   films' own).

Each figure is given for the space that ships (the stage-1 embedding, ``stage1/typicality.npz``)
and, for comparison, for the backbone's pooled features (L2-normalised, same k and percentile),
for a lever not shipped, ``pooled-mahalanobis`` (:class:`ClusterMahalanobis`; ``-cv``: its
threshold from cross-fitted reference distances, 5 folds), for the
network-free ``appearance`` histograms (``bonecluster.descriptors.appearance``, standardised by
the training films), for ``embedding+appearance`` (:class:`EitherFlags`: flagged when either
flags), and for a lever measured on 2026-12-06 (rule L), ``layers-mahalanobis-cv``
(:class:`LayerEnsemble`: every layer's channel means and spreads, :func:`layer_statistics`, each
with a cross-fitted cluster Mahalanobis distance, summed), with one ``layerN-mahalanobis-cv`` row per
layer beside it.
Beside each AUROC, a supervised reference: logistic regression told which group each film is in,
5-fold cross-validated on the same films (a ceiling for what the features hold, not a flag).
Labels (regions, parts) only choose which films are upper-limb, legs or hips; the training itself
reads none. Prints a JSON result and a table.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_real import split_source  # noqa: E402  (one split rule)
from bench_real_suite import SOURCES, emit, require_data  # noqa: E402

REAL = ("mura-humerus", "mura-elbow", "fracatlas", "fracture-parts", "mura-unlabelled")
UPPER_REGION = "hand"          # FracAtlas: any upper-limb film
OUTSIDE_REGIONS = ("leg", "hip")


def _write_manifest(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "body_part", "abnormal", "patient", "study", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def _rows(manifest: Path) -> list[dict]:
    with open(manifest, newline="") as f:
        return list(csv.DictReader(f))


def _regions(data: Path) -> dict[str, str]:
    """FracAtlas film (absolute path) -> its region, every film (joined regions keep their '+')."""
    manifest = data / SOURCES["fracatlas"]
    with open(manifest, newline="") as f:
        return {os.path.abspath(manifest.parent / r["path"]): (r.get("region") or "").strip() for r in csv.DictReader(f)}


def upper_limb_sets(data: Path, work: Path) -> dict[str, list[str]]:
    """Sources (manifests or folders) of: the label-free training pool, the held-out upper-limb
    films, and the leg and hip films. Missing sources are left out; MURA folders are upper limb."""
    sets: dict[str, list[str]] = {"train": [], "held_out": [], "outside": []}
    for name in ("mura-humerus", "mura-elbow"):
        if (data / SOURCES[name]).exists():
            tr, ev = split_source(str(data / SOURCES[name]), 0.3, work / "splits" / name)
            sets["train"].append(str(tr))
            sets["held_out"].append(str(ev))
    if (data / SOURCES["fracture-parts"]).exists():   # only films with a part are known upper-limb ones
        tr, ev = split_source(str(data / SOURCES["fracture-parts"]), 0.3, work / "splits" / "fracture-parts")
        for side, path in (("train", tr), ("held_out", ev)):
            rows = [r for r in _rows(path) if r["body_part"]]
            sets[side].append(str(_write_manifest(work / "sets" / f"fracture-parts-{side}.csv", rows)))
    if (data / SOURCES["fracatlas"]).exists():
        regions = _regions(data)
        tr, ev = split_source(str(data / SOURCES["fracatlas"]), 0.3, work / "splits" / "fracatlas")
        outside = []
        for side, path in (("train", tr), ("held_out", ev)):
            rows = _rows(path)
            upper = [r for r in rows if regions.get(r["path"]) == UPPER_REGION]
            sets[side].append(str(_write_manifest(work / "sets" / f"fracatlas-upper-{side}.csv", upper)))
            outside += [r for r in rows if regions.get(r["path"]) in OUTSIDE_REGIONS]
        sets["outside"].append(str(_write_manifest(work / "sets" / "fracatlas-leg-hip.csv", outside)))
    if (data / SOURCES["mura-unlabelled"]).exists():
        sets["train"].append(str(data / SOURCES["mura-unlabelled"]))
    missing = [k for k, v in sets.items() if not v]
    if missing:
        raise SystemExit(f"{data}: no films for {', '.join(missing)} (needs MURA folders and fracatlas)")
    return sets


def layer_statistics(model, images: np.ndarray, batch_size: int = 128) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Each film's channel means and standard deviations over the map of every layer Grad-CAM may
    explain (``model.cam_layers()``; a ResNet's layer1..layer4), and its pooled features from the
    same forward pass: uint8 (N, S, S) -> ({layer: (N, 2C)}, (N, D)).

    The means say what the layer sees, the spreads how it is drawn (the "style" statistics of
    Huang and Belongie 2017), shallow layers for grey level, noise and edges, deep ones for shape.
    ``model`` must be in eval mode (a trained run's is), so that BatchNorm uses its running
    statistics and a film's figures do not depend on its batch.
    """
    import torch

    found: dict[str, torch.Tensor] = {}
    hooks = []
    size = images.shape[1:3]
    hooks_for = model.cam_layers()
    for name, (module, to_map) in hooks_for.items():
        def keep(_m, _i, out, name=name, to_map=to_map):
            fmap = to_map(out, size).float()
            found[name] = torch.cat([fmap.mean((2, 3)), fmap.std((2, 3), correction=0)], 1)   # a 1 x 1 map: spread 0
        hooks.append(module.register_forward_hook(keep))
    stats: dict[str, list[np.ndarray]] = {}
    pooled = []
    try:
        with torch.no_grad():
            for s in range(0, len(images), batch_size):
                x = torch.from_numpy(np.ascontiguousarray(images[s:s + batch_size])).float().div_(255).unsqueeze(1)
                found.clear()
                pooled.append(model.features(x).float().numpy())
                if set(found) != set(hooks_for):
                    raise RuntimeError(f"layers {sorted(set(hooks_for) - set(found))} did not run in the forward pass")
                for name, v in found.items():
                    stats.setdefault(name, []).append(v.numpy())
    finally:
        for h in hooks:
            h.remove()
    return {name: np.concatenate(v) for name, v in stats.items()}, np.concatenate(pooled)


def _features(trained, sources: list[str], cache: Path) -> dict[str, np.ndarray]:
    """Every film of ``sources`` in each space: the stage-1 embedding (N, d), the pooled features
    (N, D), the network-free appearance histograms (N, 64) and every layer's channel statistics
    ({layer: (N, 2C)}, :func:`layer_statistics`), by name."""
    import torch

    from bonecluster.cluster import l2_normalise
    from bonecluster.data import prepare_sources
    from bonecluster.descriptors import appearance

    ds = prepare_sources(sources, trained.cfg.data, cache=cache, progress=False)
    images = ds.images()
    layers, raw = layer_statistics(trained.model, images)   # one forward pass for both
    emb = l2_normalise(trained.pca.transform(torch.from_numpy(raw))).numpy()   # as bench_real_suite._embed
    return {"embedding": emb, "pooled": raw, "appearance": appearance(images).numpy(), "layers": layers}


def _concat(parts: list):
    """Films of several sources joined: arrays end to end, or layer by layer for a dict."""
    if isinstance(parts[0], dict):
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    return np.concatenate(parts)


def _inputs(feats: dict, space: str):
    """What a space reads: one array, or a tuple of arrays for a combined space ("a+b"); the
    pooled-feature spaces ("pooled", "pooled-mahalanobis") read the pooled features; "layers-..."
    every layer's statistics (a dict), "layerN-..." one layer's."""
    if space == "layers-mahalanobis-cv":
        return feats["layers"]
    if space.removesuffix("-mahalanobis-cv") in feats["layers"]:   # one layer's row
        return feats["layers"][space.removesuffix("-mahalanobis-cv")]
    keys = ["pooled" if k.startswith("pooled") else k for k in space.split("+")]
    return feats[keys[0]] if len(keys) == 1 else tuple(feats[k] for k in keys)


class EitherFlags:
    """Two typicalities at once (a lever measured beside the shipped flag): a film is out of
    distribution when either flags it, and its typicality is the smaller (same percentile).
    Queries are a pair of arrays, one per space; ``distance`` is 100 - typicality (for the AUROC)."""

    def __init__(self, first, second):
        if first.percentile != second.percentile:
            raise ValueError("the two typicalities need the same percentile")
        self.parts, self.percentile = (first, second), first.percentile

    def typicality(self, queries) -> np.ndarray:
        return np.minimum(*(t.typicality(q) for t, q in zip(self.parts, queries)))

    def distance(self, queries) -> np.ndarray:
        return 100.0 - self.typicality(queries)

    def in_distribution(self, typicality: np.ndarray) -> np.ndarray:
        return np.asarray(typicality) >= 100.0 - self.percentile


def _auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
    return float(roc_auc_score(y, np.r_[inside, outside]))


def _probe_auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """Supervised reference: 5-fold cross-validated logistic regression told which group each
    film is in (labels used; a ceiling for what the features hold, not a flag)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.concatenate([inside, outside])
    y = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    return _auroc(*np.split(cross_val_predict(model, x, y, cv=folds, method="predict_proba")[:, 1], [len(inside)]))


def _as_query(x):
    import torch

    if isinstance(x, dict):   # every layer's statistics: read as numpy
        return x
    return tuple(torch.from_numpy(a) for a in x) if isinstance(x, tuple) else torch.from_numpy(x)


def _joined(x) -> np.ndarray:
    if isinstance(x, dict):
        return np.concatenate(list(x.values()), axis=1)
    return np.concatenate(x, axis=1) if isinstance(x, tuple) else x


def _flag_stats(typ, queries) -> dict:
    t = typ.typicality(_as_query(queries))
    return {"films": len(t), "flagged": float(np.mean(~typ.in_distribution(t))),
            "median_typicality": float(np.median(t))}


class _PercentileFlag:
    """Typicality as :class:`bonecluster.typicality.Typicality` gives it, for a lever with its own
    ``distance(x)`` and a sorted ``reference`` of the training films' distances."""

    reference: np.ndarray
    percentile: float

    def distance(self, x) -> np.ndarray:
        raise NotImplementedError

    def typicality(self, x) -> np.ndarray:
        from bonecluster.typicality import percentile_rank

        return percentile_rank(self.reference, self.distance(x))

    def in_distribution(self, typicality: np.ndarray) -> np.ndarray:
        return np.asarray(typicality) >= 100.0 - self.percentile


class ClusterMahalanobis(_PercentileFlag):
    """A lever measured beside the shipped flag (not shipped): the smallest Mahalanobis distance
    from a film's pooled features (N, D) to the run's stage-1 cluster means, with one shared
    Ledoit-Wolf covariance of the training films around their cluster's mean (Lee et al. 2018,
    "A simple unified framework for detecting out-of-distribution samples", with the label-free
    clusters for classes). Typicality as :class:`bonecluster.typicality.Typicality`, against the
    training films' own distances: in-sample (``folds=0``), or cross-fitted (``folds=K``: each
    fold's distances to the means and covariance fitted on the other K-1 folds, so the reference
    is not tighter than a new film's distance to the fit on all of them)."""

    def __init__(self, feats: np.ndarray, clusters: np.ndarray, percentile: float = 99.0, folds: int = 0,
                 seed: int = 0, fold: np.ndarray | None = None):
        if len(feats) != len(clusters):
            raise ValueError(f"{len(feats)} training films but {len(clusters)} cluster assignments")
        if folds == 1 or folds < 0:
            raise ValueError(f"folds must be 0 (in-sample) or at least 2, got {folds}")
        feats, clusters = np.asarray(feats, np.float64), np.asarray(clusters)
        self.means, self.precision = self._fit(feats, clusters)
        self.percentile = percentile
        if folds:
            reference = np.empty(len(feats))
            if fold is None:   # each film's fold (given, when several fits must share them)
                fold = np.random.default_rng(seed).permutation(len(feats)) % folds
            elif len(fold) != len(feats) or set(np.unique(fold)) != set(range(folds)):
                raise ValueError(f"fold must give each of the {len(feats)} films one of {folds} folds")
            for f in range(folds):
                means, precision = self._fit(feats[fold != f], clusters[fold != f])
                reference[fold == f] = self._distance(feats[fold == f], means, precision)
        else:
            reference = self.distance(feats)
        self.film_reference = reference   # film by film, in the training films' order (LayerEnsemble adds them up)
        self.reference = np.sort(reference)

    @staticmethod
    def _fit(feats: np.ndarray, clusters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cluster means (C, D) and the shared Ledoit-Wolf precision (D, D) of the residuals."""
        from sklearn.covariance import LedoitWolf

        ids = np.unique(clusters)
        means = np.stack([feats[clusters == c].mean(0) for c in ids])
        residuals = feats - means[np.searchsorted(ids, clusters)]
        return means, LedoitWolf().fit(residuals).precision_

    @staticmethod
    def _distance(x: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float64)
        best = np.full(len(x), np.inf)
        for mean in means:
            diff = x - mean
            best = np.minimum(best, np.einsum("nd,de,ne->n", diff, precision, diff))
        return np.sqrt(np.maximum(best, 0.0))

    def distance(self, x) -> np.ndarray:
        return self._distance(x, self.means, self.precision)



class LayerEnsemble(_PercentileFlag):
    """A lever measured beside the shipped flag (rule L, 2026-12-06): one cross-fitted
    :class:`ClusterMahalanobis` per layer on its channel statistics (:func:`layer_statistics`),
    each layer's distance divided by the median of its training films' cross-fitted distances, and
    the sum over layers as the score (Lee et al. 2018's feature ensemble, with equal weights, since
    no out-of-distribution film may choose them). Its reference: the training films' cross-fitted
    sums. Queries are ``{layer: (N, 2C)}``."""

    def __init__(self, layers: dict[str, np.ndarray], clusters: np.ndarray, percentile: float = 99.0,
                 folds: int = 5, seed: int = 0):
        if folds < 2:
            raise ValueError(f"the ensemble's reference is cross-fitted: folds must be at least 2, got {folds}")
        self.percentile = percentile
        fold = np.random.default_rng(seed).permutation(len(clusters)) % folds   # one split for every layer: the sums are cross-fitted
        self.layers = {name: ClusterMahalanobis(x, clusters, percentile, folds=folds, fold=fold)
                       for name, x in layers.items()}
        self.scale = {name: float(np.median(m.film_reference)) or 1.0 for name, m in self.layers.items()}
        self.reference = np.sort(sum(m.film_reference / self.scale[name] for name, m in self.layers.items()))

    def distance(self, x: dict) -> np.ndarray:
        return sum(m.distance(x[name]) / self.scale[name] for name, m in self.layers.items())


def _spaces(run: Path, train_sources: list[str], cache: Path) -> tuple[object, dict]:
    """The run's model and one typicality per space: the shipped one, the pooled features (plain
    and cluster Mahalanobis), the appearance histograms, and the shipped one with the appearance."""
    import torch

    from bonecluster.checkpoint import TrainedClusters
    from bonecluster.typicality import TYPICALITY, Typicality

    trained = TrainedClusters.load(run / "stage1")
    shipped = Typicality.load(run / "stage1" / TYPICALITY)
    feats = _features(trained, train_sources, cache)
    emb, raw = feats["embedding"], feats["pooled"]
    if shipped.bank.shape != emb.shape:
        raise SystemExit(f"{run}: its typicality reference holds {tuple(shipped.bank.shape)} but the training "
                         f"films give {emb.shape}: not the films this run was trained on")
    # the shipped file is this run's, row for row (the cluster assignments are paired by position)
    drift = float(np.abs(emb - shipped.bank.numpy()).max())
    spaces = {"embedding": shipped, "pooled": Typicality.fit(torch.from_numpy(raw)),
              "pooled-mahalanobis": ClusterMahalanobis(raw, trained.assignments),
              "pooled-mahalanobis-cv": ClusterMahalanobis(raw, trained.assignments, folds=5)}
    spaces["appearance"] = Typicality.fit(torch.from_numpy(feats["appearance"]), standardise=True,
                                          metric="euclidean")
    spaces["embedding+appearance"] = EitherFlags(shipped, spaces["appearance"])
    ensemble = spaces["layers-mahalanobis-cv"] = LayerEnsemble(feats["layers"], trained.assignments)
    for name, layer in ensemble.layers.items():   # reported beside the ensemble, not chosen from (rule L)
        spaces[f"{name}-mahalanobis-cv"] = layer
    return trained, spaces, drift


def phantom_setting(args, work: Path, data: Path) -> dict:
    from bonecluster.config import load_config
    from bonecluster.data.phantoms import generate_phantoms
    from bonecluster.pipeline import train

    t0 = time.perf_counter()
    if args.phantom_run:
        run = Path(args.phantom_run)
        train_src = [str(Path(args.phantom_run_data))] if args.phantom_run_data else None
        if train_src is None:
            raise SystemExit("--phantom-run needs --phantom-run-data (the phantoms it was trained on)")
    else:
        cfg = load_config(args.phantom_preset, overrides=args.phantom_overrides)
        root = work / "phantoms"
        if not root.exists():
            generate_phantoms(root, n=args.phantoms, size=cfg.data.size, seed=0, progress=not args.quiet)
        run = work / "phantom-run"
        train([str(root)], run, cfg, stages=[1], progress=not args.quiet)
        train_src = [str(root)]
    trained_s = time.perf_counter() - t0
    cache = work / "cache-phantom-run"
    trained, spaces, drift = _spaces(run, train_src, cache)
    fresh = work / "phantoms-new"   # another generator seed, at the run's size
    if not fresh.exists():
        generate_phantoms(fresh, n=max(args.phantoms // 4, 70), size=trained.cfg.data.size, seed=1, progress=False)
    queries = {"new phantoms": _features(trained, [str(fresh)], cache)}
    for name in REAL:
        if (data / SOURCES[name]).exists():
            queries[name] = _features(trained, [str(data / SOURCES[name])], cache)
    real = [q for name, q in queries.items() if name in REAL]
    queries["all real films"] = {key: _concat([q[key] for q in real]) for key in real[0]}
    out = {"run": str(run), "train_seconds": round(trained_s, 1), "reference_drift": drift, "spaces": {}}
    for space, typ in spaces.items():
        out["spaces"][space] = {name: _flag_stats(typ, _inputs(q, space)) for name, q in queries.items()}
        new, real = _inputs(queries["new phantoms"], space), _inputs(queries["all real films"], space)
        out["spaces"][space]["auroc"] = _auroc(typ.distance(_as_query(new)), typ.distance(_as_query(real)))
        out["spaces"][space]["probe_auroc"] = _probe_auroc(_joined(new), _joined(real))
    return out


def upper_limb_setting(args, work: Path, data: Path) -> dict:
    from bonecluster.config import load_config
    from bonecluster.pipeline import train

    sets = upper_limb_sets(data, work)
    t0 = time.perf_counter()
    run = Path(args.upper_run) if args.upper_run else work / "upper-run"
    if not args.upper_run:
        cfg = load_config(args.preset, overrides=args.overrides)
        train(sets["train"], run, cfg, stages=[1], progress=not args.quiet)
    trained_s = time.perf_counter() - t0
    cache = work / "cache-upper-run"
    trained, spaces, drift = _spaces(run, sets["train"], cache)
    held, outside = _features(trained, sets["held_out"], cache), _features(trained, sets["outside"], cache)
    out = {"run": str(run), "train_seconds": round(trained_s, 1), "reference_drift": drift,
           "train_films": len(spaces["embedding"].reference), "spaces": {}}
    for space, typ in spaces.items():
        inside, beyond = _inputs(held, space), _inputs(outside, space)
        d_in, d_out = typ.distance(_as_query(inside)), typ.distance(_as_query(beyond))
        out["spaces"][space] = {"held-out upper limb": _flag_stats(typ, inside),
                                "leg and hip": _flag_stats(typ, beyond),
                                "auroc": _auroc(d_in, d_out), "probe_auroc": _probe_auroc(_joined(inside), _joined(beyond))}
    return out


def print_tables(result: dict) -> None:
    if "phantom" in result:
        r = result["phantom"]
        print(f"\n1. run trained on phantoms ({r['run']}): share flagged out of distribution")
        names = [n for n in next(iter(r["spaces"].values())) if n not in ("auroc", "probe_auroc")]
        print("| space | " + " | ".join(names) + " | AUROC new phantoms vs real (on the space's distance; combined: 100 - typicality) | supervised reference |")
        print("|---|" + "---|" * (len(names) + 2))
        for space, rows in r["spaces"].items():
            print(f"| {space} | " + " | ".join(f"{rows[n]['flagged']:.3f} ({rows[n]['films']})" for n in names)
                  + f" | {rows['auroc']:.3f} | {rows['probe_auroc']:.3f} |")
    if "upper_limb" in result:
        r = result["upper_limb"]
        print(f"\n2. run trained on {r['train_films']} real upper-limb films ({r['run']})")
        print("| space | held-out upper limb flagged | leg and hip flagged | AUROC (on the space's distance; combined: 100 - typicality) | supervised reference |")
        print("|---|---|---|---|---|")
        for space, rows in r["spaces"].items():
            h, o = rows["held-out upper limb"], rows["leg and hip"]
            print(f"| {space} | {h['flagged']:.3f} ({h['films']}) | {o['flagged']:.3f} ({o['films']}) | {rows['auroc']:.3f} "
                  f"| {rows['probe_auroc']:.3f} |")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data", help="the folder holding the real-film sources")
    ap.add_argument("--only", choices=("phantom", "upper-limb"), help="run one of the two settings")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "bench_ood"))
    ap.add_argument("--phantoms", type=int, default=700, help="phantoms the phantom run trains on (default 700)")
    ap.add_argument("--phantom-preset", default="cpu")
    ap.add_argument("--phantom-set", dest="phantom_overrides", action="append", default=[],
                    help="config override for the phantom run")
    ap.add_argument("--phantom-run", help="use this phantom-trained run instead of training one")
    ap.add_argument("--phantom-run-data", help="the phantom folder --phantom-run was trained on")
    ap.add_argument("--preset", default="cpu-real", help="preset of the upper-limb run (default cpu-real)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override for the upper-limb run")
    ap.add_argument("--upper-run", help="use this upper-limb run (trained by this script before) instead of training one")
    ap.add_argument("--json", help="write the result here too")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    data, work = require_data(args.data), Path(args.work)
    result: dict = {}
    if args.only in (None, "phantom"):
        result["phantom"] = phantom_setting(args, work, data)
    if args.only in (None, "upper-limb"):
        result["upper_limb"] = upper_limb_setting(args, work, data)
    return emit(result, print_tables, args.json)


if __name__ == "__main__":
    main()
