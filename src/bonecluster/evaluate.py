"""``bonecluster evaluate``: honest metrics for a run on labelled data.

``metrics.json`` has exactly these keys (a field whose labels are missing is left out)::

    {"stage1": {"n_images", "accuracy_hungarian", "accuracy_majority", "accuracy_named", "nmi", "ari",
                "per_part": {PART: {"n", "sensitivity", "specificity", "precision"}},
                "n_names", "n_labels_read", "n_named_from_evaluation",   # the last only when not 0
                "macro": {"sensitivity", "specificity", "precision"}},
     "stage2": {"per_part": {PART: {"n_images", "n_studies", "auroc", "sensitivity", "specificity",
                                    "precision", "kappa_study"}},
                "macro": {"auroc", "sensitivity", "specificity", "precision", "kappa_study"}},
     "stage2_few_labels": {"per_part": {...as stage2...}, "macro": {...as stage2...},   # few-label runs only
                           "labels_fraction": float,
                           "labels_used": {"images", "studies", "per_part": {PART: {"images", "studies",
                                           "labelled_studies"}}}},
     "skipped_files": int}

Definitions (values are fractions in [0, 1]):

- stage 1 scores the stage-1 clusters against the body-part labels. ``accuracy_hungarian`` maps
  clusters to parts one-to-one (Hungarian); ``accuracy_majority`` names every cluster after its
  commonest part (many-to-one) *on the evaluation labels*, a ceiling for any naming.
  ``accuracy_named`` uses the run's own cluster names (``names.json``; several clusters may share
  a name): the share of images whose cluster's name is their part, an unnamed ``cluster-N``
  counting as wrong. ``n_names`` counts the clusters with a name of their own and
  ``n_labels_read`` the labels those names were given from (the audit ``naming.json``: every
  labelled training film for the default names, the films looked at for ``bonecluster name
  --from``; left out when the run has no audit). ``per_part`` is one-vs-rest on the cluster
  names: sensitivity TP/(TP+FN), specificity TN/(TN+FP), precision TP/(TP+FP).
- stage 2 scores each body part's abnormality model: AUROC of the image scores, and sensitivity,
  specificity and precision of the image flags at the run's label-free threshold.
  ``kappa_study`` is Cohen's kappa between study labels and study flags (a study's score is the
  mean of its images' scores, MURA's convention, or the max with ``stage2.study_score=max``).
- ``stage2_few_labels`` (only for a run trained with ``stage2.labels_fraction`` > 0): the same
  figures for the few-label score (the probe's probability mixed with the label-free score,
  ``stage2.probe_mix``; flagged at the probe's own threshold, see ``FewLabelProbe.with_mix``), on
  the same images. The probe used the labels of ``labels_used`` training images, that fraction of the
  part's labelled training studies; ``stage2`` stays the label-free result.
- The preprint's "specificity" is TP/(TP+FP), i.e. precision; we report both under their names.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from bonecluster.config import config_from_dict, read_yaml
from bonecluster.data import PreparedDataset, prepare_sources
from bonecluster.io import atomic_write_text
from bonecluster.metrics import (auroc, binary_scores, cluster_scores, cohen_kappa, macro,
                                 per_class_binary, study_level)
from bonecluster.naming import films_named_from, load_naming_audit
from bonecluster.predict import ImagePrediction, Predictor
from bonecluster.report import write_report
from bonecluster.stage2.fewlabel import PROBE, FewLabelProbe
from bonecluster.timing import NO_TIMER, NoTimer

BINARY = ("sensitivity", "specificity", "precision")
log = logging.getLogger(__name__)


def evaluate(run: str | Path, sources: Sequence[str | Path], json_path: str | Path | None = None,
             report_dir: str | Path | None = None, progress: bool = True, limits: dict | None = None,
             timer: NoTimer = NO_TIMER) -> dict:
    """Predict with the run on ``sources``, score against their labels, and write
    ``metrics.json`` (default RUN/metrics.json) and, with ``report_dir``, ``report.html``.
    ``limits``: input-limit overrides of the run's config, e.g. ``{"pixel_cap": 4_000_000}``.
    ``timer`` records the phases "evaluation" and "report" (:mod:`bonecluster.timing`)."""
    run = Path(run)
    cfg = config_from_dict(read_yaml(run / "config.yaml"))
    cfg.data = cfg.data.with_limits(**(limits or {}))
    with timer.phase("evaluation"):
        data = prepare_sources(sources, cfg.data, cache=cfg.data.cache or run / "cache", progress=progress)
        predictor = Predictor(run)
        stage2_data = predictor.stage2_data(data, cfg.data.limits(), progress)   # data itself unless stage2.size
        preds, embeddings = predictor.predict_with_embeddings(data, stage2_data=stage2_data)
        few_preds, probes = few_label_predictions(predictor, stage2_data, preds)
        metrics = score(data, preds, study_how=cfg.stage2.study_score, few_preds=few_preds, probes=probes,
                        naming=naming_counts(run, predictor.names, data.records))
        checks = score_checks_of(predictor)
        if checks:
            metrics["stage2_checks"] = checks
        atomic_write_text(Path(json_path) if json_path else run / "metrics.json", json.dumps(metrics, indent=2))
    if report_dir is not None:
        with timer.phase("report"):
            write_report(run, data, preds, metrics, Path(report_dir) / "report.html", embeddings, cfg.seed,
                         few_preds=few_preds)
    return metrics


def score_checks_of(predictor: Predictor) -> dict[str, dict]:
    """Each part's label-free checks of its training scores, as training recorded them
    (:mod:`bonecluster.stage2.guard`; parts trained before the checks existed have none). They
    read no label, of the training films or of these: a warning here says the score may rank
    framing or have turned its seed round, whatever the held-out figures."""
    return {part: anomaly.checks for part, (_, anomaly) in sorted(predictor.parts.items()) if anomaly.checks}


def load_probes(run: str | Path, parts) -> dict[str, FewLabelProbe]:
    """The few-label probes of a run's part models (RUN/stage2/<PART>/probe.pt), where trained."""
    stage2 = Path(run) / "stage2"
    return {part: FewLabelProbe.load(stage2 / part / PROBE) for part in sorted(parts)
            if (stage2 / part / PROBE).exists()}


def few_label_predictions(predictor: Predictor, data: PreparedDataset, preds: list[ImagePrediction]
                          ) -> tuple[list[ImagePrediction] | None, dict[str, FewLabelProbe]]:
    """The predictions with the few-label score (and the probe's threshold) for the
    images of parts that have a probe (others: no score). (None, {}) when no part has one.
    ``data``: the predicted records at stage 2's size (:meth:`Predictor.stage2_data`)."""
    probes = load_probes(predictor.run, predictor.parts)
    if not probes:
        return None, {}
    images = data.images()
    few = [replace(p, score=None, threshold=None, abnormal=None) for p in preds]
    for part, probe in probes.items():
        idx = np.array([i for i, p in enumerate(preds) if p.part == part and p.score is not None], np.int64)
        if not len(idx):
            continue
        trained, anomaly = predictor.parts[part]
        unsupervised = torch.tensor([preds[i].score for i in idx], dtype=torch.float32)
        prob = probe.score(trained, images[idx], anomaly, unsupervised=unsupervised)
        for i, s in zip(idx.tolist(), prob.tolist()):
            few[i] = replace(preds[i], score=s, threshold=probe.threshold, abnormal=bool(s >= probe.threshold))
    return few, probes


def naming_counts(run: str | Path, names: dict[int, str], records=()) -> dict:
    """``n_names``: clusters with a name of their own (not ``cluster-N``); ``n_labels_read``: the
    labels the names were given from, per the naming audit (None when the run has none);
    ``n_named_from_evaluation`` (only when not 0, with a warning): evaluation films that share a
    file or a study with the films whose labels gave the names."""
    audit = load_naming_audit(Path(run) / "stage1")
    out = {"n_names": sum(1 for c, n in names.items() if n != f"cluster-{c}"),
           "n_labels_read": None if audit is None else int(audit["n_labels_read"])}
    leaked = films_named_from(audit, records)
    if leaked:
        log.warning("%d evaluation film(s) share a file or a study with the films the cluster names were read "
                    "from (RUN/stage1/naming.json): accuracy_named is not a held-out figure", leaked)
        out["n_named_from_evaluation"] = leaked
    return out


def score(data: PreparedDataset, preds: list[ImagePrediction], study_how: str = "mean",
          few_preds: list[ImagePrediction] | None = None, probes: dict | None = None,
          naming: dict | None = None) -> dict:
    out: dict = {}
    s1 = stage1_metrics(data, preds)
    if s1:
        out["stage1"] = {**s1, **(naming or {})}
    s2 = stage2_metrics(data, preds, study_how)
    if s2:
        out["stage2"] = s2
    if few_preds is not None:
        few = few_label_metrics(data, few_preds, probes or {}, study_how)
        if few:
            out["stage2_few_labels"] = few
    out["skipped_files"] = len(data.skipped)
    return _drop_none(out)


def few_label_metrics(data: PreparedDataset, few_preds: list[ImagePrediction], probes: dict[str, FewLabelProbe],
                      study_how: str = "mean") -> dict:
    """``stage2`` figures for the probe scores, with the fraction and the count of labels used."""
    m = stage2_metrics(data, few_preds, study_how)
    if not m:
        return {}
    fractions = sorted({p.fraction for p in probes.values()})
    per_part = {part: {"images": p.n_labels, "studies": p.n_studies, "labelled_studies": p.n_labelled_studies}
                for part, p in probes.items()}
    return {**m, "labels_fraction": fractions[0] if len(fractions) == 1 else fractions,
            "labels_used": {"images": sum(v["images"] for v in per_part.values()),
                            "studies": sum(v["studies"] for v in per_part.values()), "per_part": per_part}}


def stage1_metrics(data: PreparedDataset, preds: list[ImagePrediction]) -> dict:
    pairs = [(p, r.body_part) for p, r in zip(preds, data.records) if r.body_part and p.cluster is not None]
    if not pairs:
        return {}
    clusters = [p.cluster for p, _ in pairs]
    names = [p.cluster_name for p, _ in pairs]
    truth = [t for _, t in pairs]
    per_part = per_class_binary(names, truth, sorted(set(truth)))
    named = float(np.mean([n == t for n, t in zip(names, truth)]))   # cluster-N never equals a part
    return {"n_images": len(pairs), **cluster_scores(clusters, truth), "accuracy_named": named, "per_part": per_part,
            "macro": macro(per_part, BINARY)}


def stage2_metrics(data: PreparedDataset, preds: list[ImagePrediction], study_how: str = "mean") -> dict:
    by_part: dict[str, list[int]] = defaultdict(list)
    for i, (p, r) in enumerate(zip(preds, data.records)):
        if p.score is not None and r.abnormal is not None:
            by_part[p.part].append(i)
    per_part = {part: _part_metrics(data, preds, idx, study_how) for part, idx in sorted(by_part.items())}
    if not per_part:
        return {}
    return {"per_part": per_part, "macro": macro(per_part, ("auroc", *BINARY, "kappa_study"))}


def _part_metrics(data: PreparedDataset, preds: list[ImagePrediction], idx: list[int], how: str) -> dict:
    truth = data.abnormal(idx)
    scores = np.array([preds[i].score for i in idx], float)
    threshold = preds[idx[0]].threshold
    studies = [data.records[i].study or data.records[i].path for i in idx]
    keys, study_scores = study_level(studies, scores, how)
    study_truth = [truth[[s == k for s in studies]].any() for k in keys]
    return {"n_images": len(idx), "n_studies": len(keys), "auroc": auroc(truth, scores),
            **binary_scores(truth, scores >= threshold),
            "kappa_study": cohen_kappa(study_truth, study_scores >= threshold)}


def _drop_none(d):
    """Undefined ratios (an empty denominator) are left out, as the schema says."""
    if isinstance(d, dict):
        return {k: _drop_none(v) for k, v in d.items() if v is not None}
    return d
