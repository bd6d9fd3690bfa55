"""Stage-2 abnormality scores: per-part image AUROC on held-out phantoms, labels used only to score.

Trains (or reuses) a demo run -- ``bonecluster.demo.run_demo`` with the demo's settings
(``DEMO_OVERRIDES``, then ``--set``): 1,400 training phantoms and
n/4 held-out ``valid`` phantoms of the given seed -- then, for each body part, refits the
label-free anomaly model (``stage2.*`` settings, ``--set`` overrides applied) from the part model
and the part's training images, and scores the held-out images of that part. Refitting only the
anomaly model is cheap (seconds), so scoring settings can be compared on the same trained models;
settings that change training (``stage2.k``, ``stage2.epochs``) need a fresh ``--work`` folder.

Examples::

    python benchmarks/bench_stage2.py --work /tmp/s2dev --seed 0
    python benchmarks/bench_stage2.py --work runs/demo --set stage2.score=global --set stage2.pca_dim=16
    python benchmarks/bench_stage2.py --work /tmp/s2seed1 --seed 1 --json stage2-seed1.json

Prints one row per part (images, abnormal share, AUROC, AUROC with every view scored by its
study's mean score, share of training and held-out images
flagged at the label-free threshold, sensitivity, specificity) and the macro mean over parts.

``--ceiling`` adds two *supervised* references trained on every training label of the part, to
show how far a label-free score could go on these images at all: an L2 logistic regression on
HOG of each image and its mirror (``hog_sup``), and the part's stage-2 network fine-tuned with
binary cross-entropy, flips and small affine jitter (``cnn_sup``, ``--cnn-epochs``: 60). They are not the
product's scores and use labels that the label-free stage never sees. Twenty epochs of the demo's
~200 films a part (about 140 steps) left the CNN under-trained: 60 read 0.942 / 0.958 / 0.950 against
0.911 / 0.913 / 0.925 on three demo runs (rule Y60, docs/BENCHMARKS.md), for about 12 minutes a run
instead of 5 on a 2-core CPU.

``--valid-n 1400`` scores on that many held-out phantoms instead of the run's 350 (drawn once into
``WORK/phantoms-valid-N`` with the run's phantom seed, split ``valid``: other patients than
training's): the run's 50 held-out films a part hold 5-9 abnormal studies, so one part's AUROC
moves by a tenth between seeds.

``--by-finding`` adds, per part, the AUROC of each finding kind's held-out images against the part's
normal images (from the generator's ``valid_phantom_findings.csv``), for the label-free score and,
with ``--ceiling``, for both references: which kind of finding a score misses, not only which part.

``--hog-sizes 64 96 128`` trains only the HOG reference, on the phantoms decoded at each of those
sizes (same HOG cells of 8 px), to ask whether a larger image would let any score see more.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from bonecluster.config import apply_override, config_from_dict, load_config, read_yaml, stage2_data_config
from bonecluster.data import prepare_sources
from bonecluster.data.phantoms import FINDINGS
from bonecluster.checkpoint import TrainedClusters
from bonecluster.metrics import auroc
from bonecluster.selftrain import study_mean
from bonecluster.stage2.parts import group_by_part
from bonecluster.stage2.scoring import study_groups
from bonecluster.stage2.train import fit_part_anomaly, saved_extra_seeds
from bonecluster.yardstick import cnn_reference_scores, hog_reference_by_part, hog_reference_scores

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_findings import finding_of, kind_auroc, study_findings  # noqa: E402  (one reading of the findings index)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-stage2"), help="demo run folder (reused if trained)")
    ap.add_argument("--seed", type=int, default=0, help="phantom and training seed of a new run")
    ap.add_argument("--n", type=int, default=1400)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--ceiling", action="store_true", help="also train supervised references on every label")
    ap.add_argument("--valid-n", type=int, metavar="N",
                    help="score on N held-out phantoms of the run's seed instead of its own (n/4)")
    ap.add_argument("--cnn-epochs", type=int, default=60,
                    help="epochs of the supervised CNN reference (--ceiling; 20 before rule Y60)")
    ap.add_argument("--by-finding", action="store_true",
                    help="also report each finding kind's AUROC against the part's normal images")
    ap.add_argument("--hog-sizes", type=int, nargs="*", default=[], metavar="PX",
                    help="also train the supervised HOG reference at each of these image sizes")
    args = ap.parse_args()

    work = args.work
    if not (work / "stage2").is_dir():
        from bonecluster.demo import DEMO_OVERRIDES, run_demo

        # as `bonecluster demo` trains: its settings first, then --set
        cfg = load_config(args.preset, overrides=[*DEMO_OVERRIDES, f"seed={args.seed}", *args.set])
        t0 = time.perf_counter()
        run_demo(work, cfg, n=args.n, seed=args.seed, progress=False)
        print(f"trained the demo run in {time.perf_counter() - t0:.0f} s")
    cfg = config_from_dict(read_yaml(work / "config.yaml"))
    films = stage2_data_config(cfg)   # the size the part models were trained at (stage2.size), whatever --set says
    for item in args.set:
        cfg = apply_override(cfg, item)
    train = prepare_sources([work / "phantoms"], films, cache=work / "cache", progress=False)
    held_out = held_out_folder(work, args.valid_n, args.seed)
    valid = prepare_sources([held_out], films, cache=work / "cache", progress=False)
    valid_groups = group_by_part(valid)
    valid_findings = study_findings(held_out, "valid") if args.by_finding else {}

    valid_images = valid.images()   # each call copies every row: once, not once a part
    rows, ceiling, by_finding, t0 = {}, {}, {}, time.perf_counter()
    for part, pos in group_by_part(train).items():
        folder = work / "stage2" / part
        if part not in valid_groups or not (folder / "model.pt").exists():
            continue
        trained = TrainedClusters.load(folder)
        # the run's other seed networks (stage2.networks) by their stored scores; --set stage2.networks=1 drops them
        extra = saved_extra_seeds(folder, len(pos), cfg.stage2)
        anomaly = fit_part_anomaly(trained, train.subset(pos), cfg.stage2, extra, seed=cfg.seed,
                                   batch_size=cfg.train.feature_batch_size)
        vpos = valid_groups[part]
        truth = valid.abnormal(vpos)
        scores = anomaly.score(trained, valid_images[vpos]).numpy()
        flags = scores >= anomaly.threshold
        scored = {"label_free": scores}
        if args.ceiling:
            train_truth = train.abnormal(pos)
            scored.update(supervised_ceiling(folder, train.subset(pos).images(), train_truth,
                                             valid_images[vpos], cfg.seed, epochs=args.cnn_epochs))
            ceiling[part] = {name: auroc(truth, scored[name]) for name in ("hog_sup", "cnn_sup")}
        if args.by_finding:
            kinds = [finding_of(valid.records[i].path, valid_findings) for i in vpos]
            by_finding[part] = {name: finding_cells(kinds, s) for name, s in scored.items()}
        # every held-out view of a study scored with its study's mean (the views share one label)
        study_scores = study_mean(scores, study_groups(valid.subset(vpos)).numpy())
        rows[part] = {"n": len(vpos), "abnormal": float(truth.mean()), "auroc": auroc(truth, scores),
                      "auroc_study": auroc(truth, study_scores),
                      "flag_train": float((anomaly.train_scores >= anomaly.threshold).float().mean()),
                      "flag_valid": float(flags.mean()),
                      "sensitivity": float(flags[truth].mean()) if truth.any() else None,
                      "specificity": float((~flags[~truth]).mean()) if (~truth).any() else None}
    seconds = time.perf_counter() - t0

    keys = ("auroc", "auroc_study", "flag_train", "flag_valid", "sensitivity", "specificity")
    print(f"{'part':<10}{'n':>5}{'abn':>7}" + "".join(f"{k:>13}" for k in keys))
    for part, r in rows.items():
        print(f"{part:<10}{r['n']:>5}{r['abnormal']:>7.2f}"
              + "".join(f"{r[k]:>13.3f}" if r[k] is not None else f"{'-':>13}" for k in keys))
    macro = {k: float(np.mean([r[k] for r in rows.values() if r[k] is not None])) for k in keys}
    print(f"{'macro':<22}" + "".join(f"{macro[k]:>13.3f}" for k in keys))
    print(f"settings: {cfg.stage2}; anomaly fit + scoring {seconds:.1f} s")
    if ceiling:
        print("supervised references, every training label (held-out AUROC):")
        for part, c in ceiling.items():
            print(f"  {part:<10} hog_sup {c['hog_sup']:.3f}  cnn_sup {c['cnn_sup']:.3f}")
        print(f"  {'macro':<10} hog_sup {np.mean([c['hog_sup'] for c in ceiling.values()]):.3f}  "
              f"cnn_sup {np.mean([c['cnn_sup'] for c in ceiling.values()]):.3f}")
    if by_finding:
        print("by finding kind (held-out AUROC of each kind's images against the part's normal images):")
        for part, per_score in by_finding.items():
            for name, cells in per_score.items():
                print(f"  {part:<10} {name:<11}" + "  ".join(
                    f"{kind} {a:.2f} ({n})" if a is not None else f"{kind} - ({n})" for kind, (a, n) in cells.items()))
    by_size = {size: hog_reference_at_size(work, cfg, size, held_out) for size in args.hog_sizes}
    for size, per_part in by_size.items():
        print(f"supervised HOG reference at {size} px: macro {np.mean(list(per_part.values())):.3f}  "
              + "  ".join(f"{part} {a:.3f}" for part, a in per_part.items()))
    if args.json:
        args.json.write_text(json.dumps({"work": str(work), "held_out": str(held_out),
                                         "stage2": vars(cfg.stage2), "per_part": rows,
                                         "macro": macro, "seconds": round(seconds, 1),
                                         "supervised_ceiling": ceiling or None,
                                         "by_finding": by_finding or None,
                                         "hog_reference_by_size": by_size or None}, indent=2, default=str))


def held_out_folder(work: Path, valid_n: int | None, default_seed: int) -> Path:
    """The run's own held-out phantoms, or ``valid_n`` of them drawn with the run's phantom seed
    (its stamp's; ``default_seed`` for a run from before the stamp) into ``work/phantoms-valid-N``."""
    if valid_n is None:
        return work / "phantoms-valid"
    from bonecluster.demo import make_demo_phantoms

    stamp = work / "phantoms-valid.json"
    seed = json.loads(stamp.read_text())["seed"] if stamp.exists() else default_seed
    return make_demo_phantoms(work / f"phantoms-valid-{valid_n}", valid_n, seed, "valid", progress=False)


def hog_reference_at_size(work: Path, cfg, size: int, held_out: Path) -> dict[str, float]:
    """Held-out AUROC per part of the supervised HOG reference on phantoms decoded at ``size`` px
    (``held_out``: the folder of :func:`held_out_folder`)."""
    from dataclasses import replace

    data_cfg = replace(cfg.data, size=size)
    train = prepare_sources([work / "phantoms"], data_cfg, cache=work / "cache", progress=False)
    valid = prepare_sources([held_out], data_cfg, cache=work / "cache", progress=False)
    return hog_reference_by_part(train, valid)


def supervised_ceiling(folder: Path, train_images: np.ndarray, train_truth: np.ndarray, valid_images: np.ndarray,
                       seed: int, epochs: int) -> dict[str, np.ndarray]:
    """Held-out scores (M,) of two references trained on every training label of one part."""
    import torch

    hog_scores = hog_reference_scores(train_images, train_truth, valid_images)
    torch.manual_seed(seed)   # before loading: the network's construction draws from it (figures recorded so)
    model = TrainedClusters.load(folder).model
    return {"hog_sup": hog_scores,
            "cnn_sup": cnn_reference_scores(model, train_images, train_truth, valid_images, seed=None, epochs=epochs)}


def finding_cells(kinds: list[str], scores: np.ndarray) -> dict[str, tuple[float | None, int]]:
    """Per finding kind of one part's held-out images ('' for normal): (AUROC against the normal
    images or None, number of images of that kind)."""
    scored = [(kind, "part", s) for kind, s in zip(kinds, scores)]
    return {kind: kind_auroc(scored, "part", kind) for kind in FINDINGS}


if __name__ == "__main__":
    main()
