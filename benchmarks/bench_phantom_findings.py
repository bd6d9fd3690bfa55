"""The phantom finding head as a label-free abnormality score on real films (issue 27, item 4).

    bonecluster pretrain-phantoms --preset cpu --set seed=0 --out pf_0.pt     # phantoms only, no real film
    python benchmarks/bench_phantom_findings.py --data ../shared/data --weights pf_0.pt pf_1.pt

``pretrain-phantoms`` trains a backbone and one linear head per task (part, view, finding) on
labelled phantoms and keeps the heads beside the backbone. The finding head's ``1 - p(normal)``
(``bonecluster.phantom_pretrain.phantom_abnormality``) then scores each real film without any real
film having trained anything: knowledge of fractures, plates, lesions and dislocations that came
only from the generator.

Each source is split as ``bench_real_stage2.py`` splits it (seed 0, 30% held out by study), its
held-out films are prepared with the weights' own data settings (size, fit), and the score's image
AUROC is printed per source and weights file (labels only score), with each finding's own
probability beside it and the training films' framing correlation (``stage2.guard``'s fill share,
no label). Nothing is trained here: a run takes a minute or two per source, most of it decoding.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_real_stage2 import SOURCES, split_by_study  # noqa: E402


def config_for(weights: Path, preset: str, overrides: list[str]):
    """``preset`` with the network and data settings the weights were pre-trained with."""
    from bonecluster.config import load_config

    meta_path = weights.with_name(weights.name + ".json")
    if not meta_path.is_file():
        raise SystemExit(f"{meta_path}: not found (give weights written by `bonecluster pretrain-phantoms`)")
    meta = json.loads(meta_path.read_text())
    model, data = meta["model"], meta["data"]
    pinned = [f"model.arch={model['arch']}", f"model.sobel={str(model['sobel']).lower()}",
              f"model.small_input={str(model['small_input']).lower()}", f"data.size={data['size']}",
              f"data.fit={data['fit']}", f"data.pct_low={data['pct_low']}", f"data.pct_high={data['pct_high']}"]
    return load_config(preset, overrides=[*overrides, *pinned]), meta


def score_source(weights: Path, cfg, train, held_out) -> dict:
    """Held-out AUROC of the phantom finding score and of each finding's probability."""
    import torch

    from bonecluster.metrics import auroc
    from bonecluster.models import build_model
    from bonecluster.phantom_pretrain import (TASK_CLASSES, load_task_heads, phantom_abnormality,
                                              task_probabilities)
    from bonecluster.stage2.guard import fill_share, spearman
    from bonecluster.stage2.scoring import knn_groups

    device = torch.device("cpu")
    model = build_model(cfg.model, weights=str(weights), image_size=cfg.data.size).to(device)
    heads = load_task_heads(weights).to(device)
    images = held_out.images()
    truth = held_out.abnormal(np.arange(len(held_out)))
    probabilities = task_probabilities(model, heads, images, device)
    score = phantom_abnormality(probabilities)
    out = {"phantom_abnormality": auroc(truth, score), "mean_score": float(score.mean())}
    for i, finding in enumerate(TASK_CLASSES["finding"][1:], start=1):
        out[f"p_{finding}"] = auroc(truth, probabilities["finding"][:, i])
    train_images = train.images()
    train_score = phantom_abnormality(task_probabilities(model, heads, train_images, device))
    out["framing_rho"] = spearman(train_score, fill_share(train_images))   # no label: does it follow the framing?
    out["phantom_knn"] = auroc(truth, phantom_knn(model, cfg, train_images, knn_groups(train), images).numpy())
    out["n_held_out"], out["abnormal_share"] = len(held_out), float(truth.mean())
    return out


def phantom_knn(model, cfg, train_images: np.ndarray, train_groups, images: np.ndarray):
    """Stage 2's own kNN score (``stage2.score``, leave-one-study-out bank of the training films
    ``train_images`` with their study ids ``train_groups``, no label) on the phantom-pretrained
    features instead of a part model trained on the films: (M,)."""
    from types import SimpleNamespace

    from bonecluster.anomaly import combine_scores, knn_scores, patch_knn_scores
    from bonecluster.cluster import l2_normalise
    from bonecluster.stage2.scoring import knn_fit, part_features

    s2, holder = cfg.stage2, SimpleNamespace(model=model.eval())   # part_features reads .model only
    _, train_parts, pca, bank, patch_bank = knn_fit(holder, train_images, train_groups, s2, seed=cfg.seed,
                                                    batch_size=cfg.train.feature_batch_size)
    pooled, patches = part_features(holder, images, cfg.train.feature_batch_size, s2.patch_pool)
    parts = []
    if s2.score in ("global", "global+patch"):
        parts.append(knn_scores(bank, l2_normalise(pca.transform(pooled)), k=s2.knn))
    if s2.score in ("patch", "global+patch"):
        parts.append(patch_knn_scores(patch_bank, patches, k=s2.patch_knn))
    return parts[0] if len(parts) == 1 else combine_scores(train_parts, parts)[1]


def print_table(rows: dict, weights: list[str]) -> None:
    cols = ["phantom_abnormality", "p_fracture", "p_plate", "p_lesion", "p_dislocation", "framing_rho", "phantom_knn"]
    print("| source | weights | " + " | ".join(cols) + " | held out |")
    print("|---" * (len(cols) + 3) + "|")
    for source, per_weights in rows.items():
        for w in weights:
            r = per_weights[w]
            cells = [f"{r[c]:.3f}" if isinstance(r.get(c), float) else "-" for c in cols]
            print(f"| {source} | {Path(w).name} | " + " | ".join(cells) + f" | {r['n_held_out']} |")
        if len(weights) > 1:
            values = [per_weights[w]["phantom_abnormality"] for w in weights]
            print(f"| {source} | mean over {len(weights)} | {np.mean(values):.3f} ± {np.std(values):.3f} |"
                  + " |" * (len(cols)))
    means = [np.mean([per_weights[w]["phantom_abnormality"] for w in weights]) for per_weights in rows.values()]
    print(f"\nmean over {len(rows)} sources: {np.mean(means):.3f}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data", help="the folder holding the real-film sources")
    ap.add_argument("--weights", nargs="+", required=True, help="weights files written by pretrain-phantoms")
    ap.add_argument("--sources", nargs="+", choices=sorted(SOURCES), default=list(SOURCES))
    ap.add_argument("--preset", default="cpu", help="the preset the weights were pre-trained with")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override KEY=VALUE")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "bench_phantom_findings"))
    ap.add_argument("--json", help="write the result here too")
    args = ap.parse_args(argv)

    from bonecluster.data import prepare_sources

    data, work = Path(args.data), Path(args.work)
    t0 = time.perf_counter()
    rows: dict[str, dict] = {}
    for name in args.sources:
        train_csv, eval_csv = split_by_study(data, name, work / name)
        rows[name], prepared = {}, {}   # weights pre-trained at the same data settings share the films
        for w in args.weights:
            cfg, _ = config_for(Path(w), args.preset, args.overrides)
            key = (cfg.data.size, cfg.data.fit, cfg.data.pct_low, cfg.data.pct_high)
            if key not in prepared:
                cache = work / "cache" / "-".join(map(str, key))
                prepared[key] = [prepare_sources([str(csv)], cfg.data, cache=cache, progress=False)
                                 for csv in (train_csv, eval_csv)]
            rows[name][w] = score_source(Path(w), cfg, *prepared[key])
    result = {"weights": args.weights, "preset": args.preset, "overrides": args.overrides,
              "seconds": round(time.perf_counter() - t0, 1), "sources": rows}
    print_table(rows, args.weights)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
