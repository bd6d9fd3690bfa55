"""Stage-2 seed networks: how much does seeding the refinement from several networks help?

Takes several one-network stage-2 runs (``stage2.networks=1``) trained on the same images with
different seeds, and for every combination of ``--size`` of them refits each part's label-free
refinement from the mean rank of their kNN scores, which is what ``stage2.networks=SIZE`` does
inside one run. Scores the held-out ``--eval`` images (labels only score) and the training images
(image AUROC, macro over parts), and prints mean +- standard deviation, the worst combination and
the share at or above ``--bar`` for each seeding:

- ``networks``: the networks' kNN scores alone (the product's seed);
- ``networks+hog`` (with ``--hog-seed``): a kNN score on HOG descriptors of the part's training
  images (standardised, PCA-whitened to ``stage2.pca_dim``, ``stage2.knn`` neighbours,
  leave-one-study-out) joined as one more seed. A trial, not a product setting: on the demo
  phantoms it raised one network's held-out macro AUROC from 0.712 to 0.755, on real humerus
  over 84 triplets it left the figure where it was (docs/RESULTS.md);
- ``hog`` (with ``--hog-seed``, once): the HOG kNN seed alone, no network at all.

Example (nine networks on real humerus, then all 84 triplets)::

    for s in 0 1 2 3 4 5 6 7 8; do
      python benchmarks/bench_real.py --split ../shared/data/mura-humerus-64 --holdout 0.3 --stages 2 \\
          --set seed=$s --set stage2.networks=1 --set stage2.weights=same --set stage2.epochs=10 \\
          --work /tmp/hum/s$s
    done
    python benchmarks/bench_seed_networks.py --runs /tmp/hum/s*/run --eval /tmp/hum/s0/eval.csv --size 3 --hog-seed

Refitting the refinement takes a few seconds per part and combination; ``--max-combos`` draws a
seeded random subset when there are many.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from pathlib import Path

import numpy as np
import torch

from bonecluster.anomaly import knn_scores, mean_rank
from bonecluster.cluster import fit_pca_whitening, l2_normalise
from bonecluster.config import config_from_dict, read_yaml
from bonecluster.data import PreparedDataset, prepare_sources
from bonecluster.descriptors import hog_features
from bonecluster.checkpoint import TrainedClusters
from bonecluster.metrics import auroc
from bonecluster.selftrain import ScoreRefiner, standardisation
from bonecluster.stage2.parts import group_by_part
from bonecluster.stage2.scoring import knn_seed_scores, study_groups


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=Path, nargs="+", required=True, help="one-network run folders, same training data")
    ap.add_argument("--eval", required=True, help="labelled held-out data (labels only score)")
    ap.add_argument("--size", type=int, default=3, help="networks per combination (stage2.networks)")
    ap.add_argument("--hog-seed", action="store_true", help="also seed with a HOG kNN score (a trial)")
    ap.add_argument("--max-combos", type=int, default=0, help="at most this many combinations (0 = all)")
    ap.add_argument("--bar", type=float, default=0.65, help="report the share of combinations at or above this")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if not 1 <= args.size <= len(args.runs):
        ap.error(f"--size must be between 1 and the number of runs ({len(args.runs)}), got {args.size}")

    cfg = config_from_dict(read_yaml(args.runs[0] / "config.yaml"))
    train = PreparedDataset.load(args.runs[0] / "data.json")
    for run in args.runs[1:]:   # each network's seed must score the same images
        if [r.path for r in PreparedDataset.load(run / "data.json").records] != [r.path for r in train.records]:
            ap.error(f"{run} was trained on other images than {args.runs[0]}; give runs of the same data")
    held_out = prepare_sources([args.eval], cfg.data, cache=args.runs[0] / "cache", progress=False)
    parts = part_seeds(args.runs, train, held_out, cfg, args.hog_seed)
    combos = list(itertools.combinations(range(len(args.runs)), args.size))
    if 0 < args.max_combos < len(combos):
        combos = sorted(random.Random(0).sample(combos, args.max_combos))

    seedings = {"networks": False, "networks+hog": True} if args.hog_seed else {"networks": False}
    rows = [{"runs": [str(args.runs[i]) for i in c],
             **{name: refined_auroc(parts, cfg, c, with_hog) for name, with_hog in seedings.items()}}
            for c in combos]
    result = {"size": args.size, "combinations": len(rows), "bar": args.bar,
              "summary": {name: summarise([r[name] for r in rows], args.bar) for name in seedings},
              "rows": rows}
    if args.hog_seed:
        result["hog_alone"] = refined_auroc(parts, cfg, (), with_hog=True)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


def part_seeds(runs: list[Path], train: PreparedDataset, held_out: PreparedDataset, cfg, with_hog: bool) -> dict:
    """Per part: training images, study ids, labels, held-out images and labels, every run's kNN
    seed of the training images (and the HOG kNN seed)."""
    held_groups, held_images, parts = group_by_part(held_out), held_out.images(), {}
    for part, pos in group_by_part(train).items():
        if part not in held_groups or not (runs[0] / "stage2" / part / "model.pt").exists():
            continue
        subset = train.subset(pos)
        images, groups = subset.images(), study_groups(subset)
        networks = [knn_seed_scores(TrainedClusters.load(run / "stage2" / part), subset, cfg.stage2, seed=cfg.seed,
                                    batch_size=cfg.train.feature_batch_size) for run in runs]
        vpos = held_groups[part]
        parts[part] = {"images": images, "groups": groups.numpy(), "truth": train.abnormal(pos),
                       "held_images": held_images[vpos], "held_truth": held_out.abnormal(vpos),
                       "networks": networks,
                       "hog": hog_knn_seed(images, groups, cfg) if with_hog else None}
    if not parts:
        raise SystemExit("no part has both trained stage-2 models and held-out images")
    return parts


def hog_knn_seed(images: np.ndarray, groups: torch.Tensor, cfg) -> torch.Tensor:
    """(N,) leave-one-study-out kNN distance of each training image on whitened HOG descriptors."""
    feats = hog_features(images).double()
    mean, scale = standardisation(feats)
    z = ((feats - mean) / scale).float()
    bank = l2_normalise(fit_pca_whitening(z, dim=cfg.stage2.pca_dim).transform(z))
    return knn_scores(bank, bank, k=cfg.stage2.knn, exclude_self=True, groups=groups)


def refined_auroc(parts: dict, cfg, combo: tuple[int, ...], with_hog: bool) -> dict:
    """Refit each part's refinement from the mean rank of the ``combo`` networks' seeds (and the
    HOG kNN seed); held-out and training image AUROC per part and their macro means."""
    s2, out = cfg.stage2, {"held_out": {}, "train": {}, "not_refined": []}
    for name, p in parts.items():
        seeds = [p["networks"][i] for i in combo] + ([p["hog"]] if with_hog else [])
        seed = mean_rank(seeds) if len(seeds) > 1 else seeds[0]
        refiner = ScoreRefiner.fit(p["images"], seed.numpy(), p["groups"], s2.refine_rounds, s2.refine_share,
                                   s2.refine_C)
        if refiner is None:   # the seed ranks every study alike: nothing was learnt, left out of the macro
            out["not_refined"].append(name)
            continue
        out["held_out"][name] = auroc(p["held_truth"], refiner.score(p["held_images"]).numpy())
        out["train"][name] = auroc(p["truth"], refiner.score(p["images"]).numpy())
    for key in ("held_out", "train"):
        out[f"{key}_macro"] = float(np.mean(list(out[key].values()))) if out[key] else float("nan")
    return out


def summarise(results: list[dict], bar: float) -> dict:
    held = np.array([r["held_out_macro"] for r in results])
    return {"held_out_mean": float(held.mean()), "held_out_std": float(held.std()), "held_out_min": float(held.min()),
            "held_out_max": float(held.max()), "at_or_above_bar": int((held >= bar).sum()),
            "train_mean": float(np.mean([r["train_macro"] for r in results]))}


def print_table(result: dict) -> None:
    n = result["combinations"]
    print(f"{n} combinations of {result['size']} network(s); held-out and training image AUROC, macro over parts")
    print(f"{'seeding':<14}{'held out':>18}{'worst':>8}{'best':>8}{'>= bar':>9}{'train':>8}")
    for name, s in result["summary"].items():
        print(f"{name:<14}{s['held_out_mean']:>11.3f} +- {s['held_out_std']:.3f}{s['held_out_min']:>8.3f}"
              f"{s['held_out_max']:>8.3f}{s['at_or_above_bar']:>5}/{n:<3}{s['train_mean']:>8.3f}")
    if "hog_alone" in result:
        h = result["hog_alone"]
        print(f"{'hog alone':<14}{h['held_out_macro']:>11.3f}{'':>32}{h['train_macro']:>8.3f}")
    left_out = sorted({p for r in result["rows"] for name in result["summary"] for p in r[name]["not_refined"]}
                      | set(result.get("hog_alone", {}).get("not_refined", [])))
    if left_out:
        print(f"left out of some macros (the seed ranked every study alike, nothing to refine): {', '.join(left_out)}")


if __name__ == "__main__":
    main()
