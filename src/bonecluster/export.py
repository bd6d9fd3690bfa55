"""``bonecluster export``: a run folder's models as ONNX graphs, for inference without PyTorch.

:func:`export_onnx` writes, into ``OUT`` (default ``RUN/onnx``)::

    stage1.onnx           the stage-1 model with its PCA-whitening and centroids
    stage2_<PART>.onnx    one per body part, with the part's banks and threshold in the graph
    manifest.json         what the graphs expect and return, cluster names, thresholds
    README.md             the same in words

Input of every graph: ``image``, float32 ``(N, 1, S, S)``, the image as the network sees it
after the cache: decoded, intensity-scaled to the ``pct_low``..``pct_high`` percentiles,
squashed (or letterboxed, or deskewed) to S x S uint8 (``data.size``, ``data.fit``), then divided by 255, so
values lie in [0, 1]. The model's own normalisation (grey mean/std) and the Sobel filter are
inside the graph. N is dynamic. A run trained with ``stage2.size`` has stage-2 graphs that take
the film decoded the same way at that side instead (the manifest's ``input_size`` of each part).

``stage1.onnx`` outputs:

* ``embedding`` (N, d) float32: pooled backbone features, PCA-whitened and L2-normalised (the
  space the k-means centroids live in);
* ``probabilities`` (N, k) float32: softmax over ``-||embedding - centroid||^2 / T`` with
  T = :data:`bonecluster.predict.CONFIDENCE_TEMPERATURE`;
* ``cluster`` (N,) int64: the nearest centroid (names in the manifest's ``clusters``); for a run
  trained with ``cluster.by_study`` this is the image alone, and ``predict`` assigns the study's
  mean embedding instead (the manifest then carries the ``centroids`` to do the same);
* ``confidence`` (N,) float32: ``probabilities[cluster]``. ``bonecluster predict`` reports the sum
  of ``probabilities`` over the clusters that share the cluster's name (the same, unless names
  are shared: names can change after export, so that sum is left to the caller).

``stage2_<PART>.onnx`` outputs (the scoring of :class:`bonecluster.stage2.scoring.PartAnomaly` is in the
graph, its kNN banks are constants):

* ``embedding`` (N, d2) float32: the part model's pooled features, PCA-whitened with the
  part's own PCA and L2-normalised (the global bank's space);
* ``score`` (N,) float32: the abnormality score. ``global`` = mean over the ``knn`` nearest bank
  rows of ``1 - embedding . bank``; ``patch`` = max over layer3 positions of the mean over the
  ``patch_knn`` nearest bank patches of ``1 - patch . bank_patch`` (patches L2-normalised, after
  the ``stage2.patch_pool`` neighbourhood average, the manifest's ``patch_pool``);
  ``global+patch`` = the mean of ``global / scale_global`` and ``patch / scale_patch`` (the
  medians of the training scores, in the manifest's ``score_scales``);
* ``abnormal`` (N,) bool: ``score >= threshold``.

A part whose score is refined (``stage2.refine_rounds``, the manifest's ``refined``) outputs the
refiner's score instead: the mean over its E logistic models and over the image and its left-right
mirror of ``sigmoid(((HOG(view) - mean) / scale) @ coef[e] + intercept[e])``, the HOG descriptor
computed in the graph (:func:`bonecluster.descriptors.hog`); the kNN score that seeded it is not
output.

The patch score compares every position with every bank patch: memory grows as
N x positions x bank patches, so feed large banks small batches.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bonecluster.checkpoint import TrainedClusters
from bonecluster.io import atomic_write_text
from bonecluster.predict import CONFIDENCE_TEMPERATURE, Predictor, check_run, load_run_config
from bonecluster.selftrain import refined_score
from bonecluster.stage2.scoring import PartAnomaly, patch_vectors

log = logging.getLogger("bonecluster")

DEFAULT_OPSET = 18
MANIFEST = "manifest.json"
EXPORTERS = ("auto", "dynamo", "legacy")
_SINGLE_FILE_LIMIT = 1_500_000_000  # bytes of constants above which weights go to a .data file


class _Whitening(nn.Module):
    """``l2_normalise(((x - mean) @ components) * scale)`` with the PCA as buffers."""

    def __init__(self, pca) -> None:
        super().__init__()
        self.register_buffer("mean", pca.mean.detach().float().cpu().clone())
        self.register_buffer("components", pca.components.detach().float().cpu().clone())
        self.register_buffer("scale", pca.scale.detach().float().cpu().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(((x - self.mean) @ self.components) * self.scale, p=2.0, dim=1, eps=1e-12)


class Stage1Graph(nn.Module):
    """Image -> embedding, cluster probabilities (k), nearest cluster and its probability. A cluster of
    several centroids (``cluster.study_links``) takes its nearest centroid's and sums their probabilities."""

    output_names = ("embedding", "probabilities", "cluster", "confidence")

    def __init__(self, trained: TrainedClusters, temperature: float = CONFIDENCE_TEMPERATURE) -> None:
        super().__init__()
        self.model = trained.model.cpu().eval()
        self.whiten = _Whitening(trained.pca)
        self.register_buffer("centroids", trained.centroids.detach().float().cpu().clone())
        groups = trained.centroid_clusters().cpu().long()
        self.register_buffer("groups", groups.clone())
        self.register_buffer("membership", F.one_hot(groups, trained.n_clusters).float())   # (K, k)
        self.temperature = float(temperature)

    def forward(self, image: torch.Tensor):
        x = self.whiten(self.model.features(image))
        c = self.centroids
        sq = (x.pow(2).sum(1, keepdim=True) - 2 * x @ c.T + c.pow(2).sum(1)).clamp_min(0)
        prob = torch.softmax(-sq / self.temperature, dim=1) @ self.membership
        cluster = self.groups[torch.argmin(sq, dim=1)]
        return x, prob, cluster, prob.gather(1, cluster.view(-1, 1)).squeeze(1)


class Stage2Graph(nn.Module):
    """Image -> the part's global embedding, abnormality score and flag (banks in the graph)."""

    output_names = ("embedding", "score", "abnormal")

    def __init__(self, trained: TrainedClusters, anomaly: PartAnomaly) -> None:
        super().__init__()
        kind = anomaly.score_kind
        if kind not in ("global", "patch", "global+patch"):
            raise ValueError(f"unknown stage-2 score {kind!r}")
        self.model = trained.model.cpu().eval()
        self.whiten = _Whitening(anomaly.pca if anomaly.pca is not None else trained.pca)
        self.use_global = kind in ("global", "global+patch")
        self.use_patch = kind in ("patch", "global+patch")
        if self.use_global:
            self.register_buffer("bank", anomaly.bank.detach().float().cpu().clone())
            self.knn = max(1, min(int(anomaly.knn), len(anomaly.bank)))
        if self.use_patch:
            if anomaly.patch_bank is None:
                raise ValueError("the part's anomaly file has no patch bank for its patch score")
            self.register_buffer("patch_bank", anomaly.patch_bank.detach().float().cpu().clone())
            self.patch_knn = max(1, min(int(anomaly.patch_knn), len(anomaly.patch_bank)))
            self.patch_pool = int(anomaly.patch_pool)
        # combine_scores' scales: the median of each score over the training images
        self.scales = ([float(t.float().median().clamp_min(1e-12)) for t in anomaly.train_parts]
                       if self.use_global and self.use_patch else [])
        self.threshold = float(anomaly.threshold)
        self.refined = anomaly.refiner is not None
        if self.refined:
            r = anomaly.refiner
            for name in ("mean", "scale", "coef", "intercept"):
                self.register_buffer(f"refine_{name}", getattr(r, name).detach().float().cpu().clone())

    def forward(self, image: torch.Tensor):
        pooled, mid, _ = self.model.pooled_and_maps(image)
        emb = self.whiten(pooled)
        parts = []
        if self.use_global:
            top = (emb @ self.bank.T).topk(self.knn, dim=1).values
            parts.append((1.0 - top).mean(dim=1))
        if self.use_patch:
            patches = patch_vectors(mid, self.patch_pool)
            top = (patches @ self.patch_bank.T).topk(self.patch_knn, dim=2).values
            parts.append((1.0 - top).mean(dim=2).amax(dim=1))
        if self.refined:   # the kNN score only seeded the refiner
            score = refined_score(image, self.refine_mean, self.refine_scale, self.refine_coef,
                                  self.refine_intercept)
        elif len(parts) == 1:
            score = parts[0]
        else:
            score = sum(p / s for p, s in zip(parts, self.scales)) / len(parts)
        return emb, score, score >= self.threshold


def export_onnx(run: str | Path, out_dir: str | Path | None = None, opset: int = DEFAULT_OPSET,
                parts: Sequence[str] | None = None, exporter: str = "auto") -> list[Path]:
    """Write ``stage1.onnx``, ``stage2_<PART>.onnx``, ``manifest.json`` and ``README.md``.

    ``out_dir`` defaults to ``RUN/onnx``; ``parts`` limits stage 2 to those body parts (default
    all). ``exporter``: ``dynamo`` (torch.export + onnxscript), ``legacy`` (TorchScript), or
    ``auto`` (dynamo, then legacy if dynamo fails). Returns the paths written. Raises
    FileNotFoundError when ``run`` has no trained model, ValueError for an unknown part.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    run = check_run(run)
    cfg = load_run_config(run)
    out = Path(out_dir) if out_dir is not None else run / "onnx"
    predictor = Predictor(run)
    chosen = dict(predictor.parts)
    if parts:
        unknown = sorted(set(parts) - set(chosen))
        if unknown:
            raise ValueError(f"{run}: no stage-2 model for {', '.join(unknown)} "
                             f"(parts: {', '.join(sorted(chosen)) or 'none'})")
        chosen = {p: chosen[p] for p in parts}
    size = cfg.data.size
    example = torch.rand(2, 1, size, size)
    written: list[Path] = []
    manifest = _manifest_header(run, cfg, opset)
    if predictor.stage1 is not None:
        path = out / "stage1.onnx"
        manifest["exporter"] = _export(Stage1Graph(predictor.stage1), example, path, opset, exporter)
        written.append(path)
        k = predictor.stage1.n_clusters
        manifest["stage1"] = {
            "file": path.name, "outputs": list(Stage1Graph.output_names),
            "embedding_dim": int(predictor.stage1.pca.output_dim), "k": k,
            "confidence_temperature": CONFIDENCE_TEMPERATURE,
            "clusters": {str(c): predictor.names.get(c, f"cluster-{c}") for c in range(k)},
            # A by-study run assigns a study by its mean embedding (as predict does), which a
            # one-image graph cannot see: the centroids let a caller do it from `embedding`.
            "by_study": bool(predictor.stage1.cfg.cluster.by_study)}
        if manifest["stage1"]["by_study"]:
            manifest["stage1"]["centroids"] = predictor.stage1.centroids.float().tolist()
        if predictor.stage1.groups is not None:   # cluster.study_links: several centroids per cluster
            manifest["stage1"]["centroid_clusters"] = predictor.stage1.groups.tolist()
    manifest["stage2"] = {}
    for part, (trained, anomaly) in chosen.items():
        path = out / f"stage2_{_safe(part)}.onnx"
        graph = Stage2Graph(trained, anomaly)
        part_size = trained.cfg.data.size   # stage2.size, or stage 1's
        manifest["exporter"] = _export(graph, torch.rand(2, 1, part_size, part_size), path, opset, exporter)
        written.append(path)
        manifest["stage2"][part] = {
            "file": path.name, "outputs": list(Stage2Graph.output_names), "input_size": part_size,
            "threshold": anomaly.threshold, "threshold_method": anomaly.threshold_method,
            "score_kind": anomaly.score_kind, "refined": graph.refined, "knn": getattr(graph, "knn", None),
            "patch_knn": getattr(graph, "patch_knn", None), "patch_pool": getattr(graph, "patch_pool", None),
            "score_scales": graph.scales or None,
            "bank_size": int(len(anomaly.bank)),
            "patch_bank_size": None if anomaly.patch_bank is None else int(len(anomaly.patch_bank))}
    written.append(atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n"))
    written.append(atomic_write_text(out / "README.md", _readme(manifest)))
    return written


def _export(graph: nn.Module, example: torch.Tensor, path: Path, opset: int, exporter: str) -> str:
    """Export ``graph`` with a dynamic batch axis; returns the exporter that worked."""
    graph.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(graph.output_names)
    big = sum(b.numel() * b.element_size() for b in graph.buffers()) > _SINGLE_FILE_LIMIT
    # a temp file then a rename, unless the weights go to an external file named after the graph
    tmp = path if big else path.with_name(f".{path.name}.tmp")
    errors = []
    for kind in (("dynamo", "legacy") if exporter == "auto" else (exporter,)):
        try:
            with torch.no_grad():
                if kind == "dynamo":
                    torch.onnx.export(graph, (example,), str(tmp), dynamo=True, input_names=["image"],
                                      output_names=names, opset_version=opset, verbose=False,
                                      dynamic_shapes={"image": {0: torch.export.Dim("batch")}},
                                      external_data=big)
                else:
                    torch.onnx.export(graph, (example,), str(tmp), dynamo=False, input_names=["image"],
                                      output_names=names, opset_version=opset,
                                      dynamic_axes={n: {0: "batch"} for n in ["image", *names]})
        except Exception as err:  # noqa: BLE001 - try the next exporter, report all if none works
            errors.append(f"{kind}: {type(err).__name__}: {err}")
            log.debug("ONNX export of %s with the %s exporter failed: %s", path.name, kind, err)
            continue
        if big:
            log.warning("%s: over %d bytes of weights, stored beside it in %s.data",
                        path, _SINGLE_FILE_LIMIT, path.name)
        else:
            tmp.replace(path)
        return kind
    raise RuntimeError(f"cannot export {path}: " + " | ".join(errors))


def _manifest_header(run: Path, cfg, opset: int) -> dict:
    d = cfg.data
    return {
        "format": "bonecluster-onnx/1", "run": str(run), "opset": opset,
        "input": {"name": "image", "dtype": "float32", "shape": ["batch", 1, d.size, d.size],
                  "range": [0.0, 1.0], "size": d.size, "fit": d.fit,
                  "intensity_percentiles": [d.pct_low, d.pct_high],
                  "preprocessing": (f"decode; scale intensities to the {d.pct_low}..{d.pct_high} percentiles; "
                                    f"{d.fit} to {d.size}x{d.size} uint8; divide by 255 "
                                    "(grey mean/std normalisation and Sobel are inside the graphs)")},
        "study_score": cfg.stage2.study_score,
    }


def _readme(m: dict) -> str:
    lines = [
        "# bonecluster ONNX export", "",
        f"Exported from `{m['run']}` (opset {m['opset']}, {m.get('exporter', '-')} exporter).", "",
        f"Input `image`: float32 (N, 1, {m['input']['size']}, {m['input']['size']}) in [0, 1]: "
        f"{m['input']['preprocessing']}.", "",
    ]
    if "stage1" in m:
        s1 = m["stage1"]
        lines += [f"## {s1['file']}", "",
                  f"- `embedding` (N, {s1['embedding_dim']}): PCA-whitened, L2-normalised features",
                  f"- `probabilities` (N, {s1['k']}): softmax(-squared distance to centroid / "
                  f"{s1['confidence_temperature']})",
                  "- `cluster` (N,) int64: nearest centroid; `confidence` (N,): its probability "
                  "(`predict` sums `probabilities` over the clusters that share a name)", "",
                  "Clusters: " + ", ".join(f"{k} = {v}" for k, v in s1["clusters"].items()), ""]
        if s1.get("by_study"):
            lines += ["This run clusters studies (`cluster.by_study`): `bonecluster predict` gives every image of a "
                      "study the cluster of the study's mean `embedding` (averaged, then L2-normalised) under the "
                      "nearest of the manifest's `centroids`. The graph's own `cluster` is that of the image alone.",
                      ""]
    for part, s in m["stage2"].items():
        score = (f"HOG logistic score refined without labels from the {s['score_kind']} kNN score, mean "
                 "over the refiner's models and over the image and its mirror" if s.get("refined") else
                 f"{s['score_kind']} kNN abnormality score (global knn={s['knn']}, patch knn={s['patch_knn']}, "
                 f"scales={s['score_scales']})")
        size = s.get("input_size", m["input"]["size"])
        lines += [f"## {s['file']} ({part})", "",
                  *([f"Input `image`: (N, 1, {size}, {size}), decoded as above at this side (`stage2.size`)."]
                    if size != m["input"]["size"] else []),
                  "- `embedding`: the part's PCA-whitened, L2-normalised global features",
                  f"- `score` (N,): {score}",
                  f"- `abnormal` (N,) bool: score >= {s['threshold']:.6g} ({s['threshold_method']})", ""]
    lines += [f"A study's score is the {m['study_score']} of its images' scores, flagged at the same threshold.",
              "See `manifest.json` for the same facts in machine-readable form.", ""]
    return "\n".join(lines)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)
