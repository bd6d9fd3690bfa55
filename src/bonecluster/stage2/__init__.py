"""Stage 2: one deep-clustering model per body part, and a label-free abnormality score.

For each body part, a DeepCluster engine is trained on that part's images only (the grouping
comes from the data's metadata where it exists, e.g. MURA folders, else from the stage-1 cluster
names). An image's abnormality score is a kNN distance to the part's training images in the part
model's features, which by default only seeds a label-free refinement; the threshold is chosen
without labels (see :mod:`bonecluster.anomaly`). Training images are scored leaving out their
study. Few-label mode (``stage2.labels_fraction`` > 0) adds a probe reported apart.

The modules, each importing only those above it in this list (import from them; this package
file imports nothing, so that prediction and the viewer never load the training code)::

    parts.py     which images belong to which part (metadata, else the stage-1 cluster name)
    scoring.py   the part model's features, the kNN/patch score, PartAnomaly (anomaly.pt)
    refine.py    the label-free refinement of that score (bonecluster.selftrain.ScoreRefiner)
    fewlabel.py  the few-label probe (--labels-fraction; probe.pt)
    train.py     train_stage2: per part, the engine, the extra seed networks, the scorer, the probe

Files, per part::

    RUN/stage2/<PART>/            the engine run (config, metrics.csv, checkpoint.pt, model.pt)
    RUN/stage2/<PART>/anomaly.pt  banks (global (N, d) and patch (P, c)), PCA, training scores,
                                  score scales, threshold, settings, the optional refiner
    RUN/stage2/<PART>/probe.pt    few-label mode only: the logistic probe and the audit of the
                                  training labels it used (count, positions, paths)
    RUN/stage2/<PART>/seed-net-I/seed_scores.pt   stage2.networks > 1: an extra network's kNN scores
"""
