"""Apply a trained run folder to images: stage-1 cluster and body part, stage-2 abnormality.

:class:`Predictor` loads what a run folder holds (stage-1 model, centroids and cluster names;
one model, embedding bank and threshold per body part) and predicts for a prepared dataset.
``evaluate`` and ``predict`` build on it.

:func:`predict_paths` (the ``bonecluster predict`` command) reads image files, folders (searched
recursively), DICOM files, MURA trees or CSV manifests with the run's own data settings, decodes
them into a cache (a temporary folder removed afterwards, unless ``cache`` names one to keep and
reuse; a run trained with ``stage2.size`` gets each film decoded a second time, at stage 2's size),
predicts in chunks and returns a :class:`PredictionReport`:

* one :class:`ImagePrediction` per image that decoded;
* one :class:`StudyPrediction` per study and body part where the records carry a study id (MURA
  ``patientX/studyY_label/``, a DICOM StudyInstanceUID, or the sub-folder an image sits in below
  an input folder): the mean of its images' scores (the max with ``stage2.study_score=max`` in
  the run's config), flagged when it reaches the part's threshold;
* the files that were skipped, each with its reason.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from bonecluster.cluster import study_means
from bonecluster.config import stage2_data_config
from bonecluster.checkpoint import FINAL_MODEL, TrainedClusters
from bonecluster.data import fetch_options
from bonecluster.data.cache import PreparedDataset, prepare_like
from bonecluster.data.decode import Limits, Preprocess
from bonecluster.data.dicomweb import is_dicomweb
from bonecluster.data.records import study_index, study_key
from bonecluster.stage2.scoring import ANOMALY, PartAnomaly, embed_images
from bonecluster.study_links import cluster_probabilities, group_sums, study_vote
from bonecluster.typicality import TYPICALITY, Typicality

# Softmax temperature over negative squared distances to the stage-1 centroids. Embeddings are
# L2-normalised, so squared distances lie in [0, 4]; 0.1 turns a 0.2 gap into e^-2. The result
# ranks how clearly an image belongs to its cluster; it is not a calibrated probability.
CONFIDENCE_TEMPERATURE = 0.1
log = logging.getLogger(__name__)


@dataclass
class ImagePrediction:
    path: str
    cluster: int | None        # stage-1 cluster id (None when the run has no stage 1)
    cluster_name: str | None   # its name (majority body part, cluster-N, or a user's name)
    confidence: float | None   # softmax over centroid distances (CONFIDENCE_TEMPERATURE), summed
                               # over the clusters that share the name
    part: str | None           # the body part whose stage-2 model scored it
    score: float | None        # stage-2 abnormality score (see stage2.score), None without a part model
    threshold: float | None
    abnormal: bool | None
    study: str | None = None   # the record's study id (None when the input has no studies)
    # How typical the film is of the run's training films (bonecluster.typicality): the % of
    # training films at least as far from their own nearest neighbours; None for a run without
    # stage1/typicality.npz (no stage 1, or trained before the flag existed).
    typicality: float | None = None
    in_distribution: bool | None = None  # typicality within the documented percentile (99th)

    def to_dict(self) -> dict:
        return asdict(self)


class Predictor:
    """A run folder's models, ready to predict (on the CPU by default).

    A run trained with ``--stages 2`` alone has no stage-1 model: its predictions then carry no
    cluster, and stage 2 needs the body part from the data's metadata.
    """

    def __init__(self, run: str | Path, device: str | torch.device = "cpu"):
        from bonecluster.names import load_cluster_names

        self.run = Path(run)
        stage1 = self.run / "stage1"
        has_stage1 = (stage1 / FINAL_MODEL).exists()
        self.stage1 = TrainedClusters.load(stage1, device) if has_stage1 else None
        self.names = load_cluster_names(stage1) if has_stage1 else {}
        self.typicality = self._load_typicality(stage1) if has_stage1 else None
        self.parts = self._load_parts(device)
        if self.stage1 is None and not self.parts:
            raise FileNotFoundError(f"{self.run}: no trained model (neither stage1/ nor stage2/<PART>/)")
        self.stage2_pre = self._stage2_preprocess()

    def _load_typicality(self, stage1: Path) -> Typicality | None:
        """The out-of-distribution reference, when it belongs to this model (same number of
        training films, same embedding size); otherwise a warning and no flag."""
        if not (stage1 / TYPICALITY).is_file():
            return None
        kept = Typicality.load(stage1 / TYPICALITY)
        n, d = len(self.stage1.assignments), self.stage1.centroids.shape[1]
        if kept.bank.shape != (n, d):
            log.warning("%s: made for %d films of %d dimensions, but the model has %d of %d; predictions carry "
                        "no typicality", stage1 / TYPICALITY, *kept.bank.shape, n, d)
            return None
        return kept

    def _load_parts(self, device) -> dict[str, tuple[TrainedClusters, PartAnomaly]]:
        parts = {}
        for folder in sorted((self.run / "stage2").glob("*/")):
            if (folder / FINAL_MODEL).exists() and (folder / ANOMALY).exists():
                parts[folder.name] = (TrainedClusters.load(folder, device), PartAnomaly.load(folder / ANOMALY))
        return parts

    def _stage2_preprocess(self) -> Preprocess | None:
        """How the part models' films are decoded (their size is ``stage2.size``); None without parts.

        A part folder trained at another size than the run's last stage-2 training (say, a part
        skipped for too few films after ``--stages 2 --set stage2.size=...``) is left out, with a
        warning, rather than making the whole run unusable."""
        if not self.parts:
            return None
        wanted = stage2_data_config(load_run_config(self.run)).preprocess()
        for part, (trained, _) in list(self.parts.items()):
            pre = trained.cfg.data.preprocess()
            if pre != wanted:
                log.warning("%s: trained on %d px films (%s), not the run's stage 2 (%d px); left out: train stage 2 "
                            "again", self.run / "stage2" / part, pre.size, pre.key(), wanted.size)
                del self.parts[part]
        return wanted if self.parts else None

    def stage2_data(self, data: PreparedDataset, limits: Limits | None = None, progress: bool = False,
                    workers: int | None = None) -> PreparedDataset:
        """``data`` (decoded for stage 1) as the part models take it: the same records at stage 2's
        size, decoded once into the same cache (``data`` itself when the sizes are one).
        ``limits``: the decoding limits (:meth:`bonecluster.config.DataConfig.limits`); ``workers``:
        decoding processes (None: up to 8)."""
        if self.stage2_pre is None:
            return data
        return prepare_like(data, self.stage2_pre, limits if limits is not None else Limits(), workers, progress)

    def predict(self, data: PreparedDataset, use_metadata_parts: bool = True,
                stage2_data: PreparedDataset | None = None) -> list[ImagePrediction]:
        """One prediction per record. Stage 2 uses the metadata body part when there is one
        (and ``use_metadata_parts``), else the stage-1 cluster name. ``stage2_data``: the same
        records at stage 2's size (:meth:`stage2_data`), needed when it is not stage 1's."""
        return self.predict_with_embeddings(data, use_metadata_parts, stage2_data)[0]

    def predict_with_embeddings(self, data: PreparedDataset, use_metadata_parts: bool = True,
                                stage2_data: PreparedDataset | None = None
                                ) -> tuple[list[ImagePrediction], np.ndarray | None]:
        """Predictions plus the stage-1 embeddings (N, d) they came from (None without stage 1)."""
        images = data.images()
        n = len(data.records)
        clusters, confidence, embeddings = (self._stage1(images, data.records) if self.stage1
                                            else ([None] * n, [None] * n, None))
        names = [None if c is None else self.names.get(int(c), f"cluster-{int(c)}") for c in clusters]
        parts = [(r.body_part if use_metadata_parts and r.body_part else nm) for r, nm in zip(data.records, names)]
        scores = self._stage2(self._stage2_images(images, stage2_data), parts) if self.parts else {}
        typical, inside = self._typicality(embeddings, n)
        out = []
        for i, rec in enumerate(data.records):
            model = self.parts.get(parts[i])
            threshold = model[1].threshold if model else None
            score = scores.get(i)
            out.append(ImagePrediction(rec.path, _opt(int, clusters[i]), names[i], _opt(float, confidence[i]),
                                       parts[i] if model else None, score, threshold,
                                       None if score is None else bool(score >= threshold), rec.study,
                                       _opt(float, typical[i]), _opt(bool, inside[i])))
        return out, embeddings

    def _typicality(self, embeddings: np.ndarray | None, n: int) -> tuple[list, list]:
        """Typicality (%) and in-distribution flag of each image; Nones without a reference."""
        if self.typicality is None or embeddings is None:
            return [None] * n, [None] * n
        typical = self.typicality.typicality(torch.from_numpy(embeddings))
        return typical.tolist(), self.typicality.in_distribution(typical).tolist()

    def stage1_assignments(self, data: PreparedDataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stage-1 clusters (N,), confidences (N,) and embeddings (N, d) of a prepared dataset."""
        if self.stage1 is None:
            raise ValueError(f"{self.run}: no stage-1 model")
        return self._stage1(data.images(), data.records)

    def _stage1(self, images: np.ndarray, records=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Clusters, confidences and embeddings (N, d). A run trained with ``cluster.by_study``
        assigns studies as it clustered them: each image takes the cluster (and confidence) of its
        study's mean embedding; the embeddings stay per image. A run whose clusters were merged
        through studies (``cluster.study_links``) gives a study's images the cluster most of them take
        (:func:`bonecluster.study_links.study_vote`; each keeps its own confidence in it). Without
        ``records`` every image is its own study."""
        x = embed_images(self.stage1, images)
        points, studies = x, None
        if self.stage1.cfg.cluster.by_study and records is not None:
            studies = torch.from_numpy(study_index(records))
            points = study_means(x, studies)
        labels, _ = self.stage1.assign(points)
        # a name several clusters share (over-clustering, many-to-one names) is one answer, and so
        # is a cluster of several centroids (cluster.study_links): the confidence sums over them
        soft = cluster_probabilities(points, self.stage1.centroids, None, CONFIDENCE_TEMPERATURE)   # (N, K)
        if self.stage1.groups is not None and records is not None:   # rule SM's clusters: a study votes (rule SV)
            clusters = group_sums(soft, self.stage1.groups)
            labels = torch.from_numpy(study_vote(labels.numpy(), clusters.numpy(), study_index(records)))
        same = self._same_name(self.stage1.n_clusters)[labels][:, self.stage1.centroid_clusters()]
        prob = (soft * same).sum(1)
        if studies is not None:
            labels, prob = labels[studies], prob[studies]
        return labels.numpy(), prob.numpy(), x.numpy()

    def _same_name(self, k: int) -> torch.Tensor:
        """(k, k) float: 1 where clusters i and j carry the same name (the diagonal always)."""
        names = [self.names.get(c, f"cluster-{c}") for c in range(k)]
        return torch.tensor([[float(a == b) for b in names] for a in names])

    def _stage2_images(self, images: np.ndarray, stage2_data: PreparedDataset | None) -> np.ndarray:
        """(N, S2, S2) uint8: ``stage2_data``'s films, or stage 1's ``images`` when they are at stage
        2's size; ValueError when neither is."""
        if stage2_data is not None:
            if len(stage2_data) != len(images):
                raise ValueError(f"stage2_data holds {len(stage2_data)} films for {len(images)} to predict")
            images = stage2_data.images()
        size = self.stage2_pre.size
        if len(images) and images.shape[-1] != size:
            raise ValueError(f"{self.run}: the stage-2 models take {size} px films (stage2.size) and these are "
                             f"{images.shape[-1]} px; pass the same records at {size} px as stage2_data "
                             "(Predictor.stage2_data)")
        return images

    def _stage2(self, images: np.ndarray, parts: list[str]) -> dict[int, float]:
        scores: dict[int, float] = {}
        for part, (trained, anomaly) in self.parts.items():
            idx = np.array([i for i, p in enumerate(parts) if p == part], np.int64)
            if len(idx):
                s = anomaly.score(trained, images[idx])
                scores.update(zip(idx.tolist(), s.tolist()))
        return scores


def _opt(kind, value):
    return None if value is None else kind(value)


# ----------------------------------------------------------------------------- predict_paths

CSV_COLUMNS = ("path", "cluster", "cluster_name", "confidence", "part", "score", "threshold", "abnormal",
               "study", "study_score", "study_abnormal", "typicality", "in_distribution")


@dataclass
class StudyPrediction:
    """A study's images of one body part, scored together (see :func:`study_predictions`)."""

    study: str
    part: str
    n_images: int
    score: float               # mean (or max) of its images' stage-2 scores
    threshold: float
    abnormal: bool             # score >= threshold

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SkippedFile:
    path: str
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class StoredReport:
    """A study's Structured Report sent back to the DICOMweb source its films came from (``--store``)."""

    study: str
    source: str
    series_uid: str
    sop_instance_uid: str
    stored: bool
    reason: str | None = None   # why the server did not store it

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PredictionReport:
    """What :func:`predict_paths` returns; ``to_json`` / ``to_csv`` are the command's outputs."""

    run: str
    study_score: str                       # "mean" or "max"
    images: list[ImagePrediction]
    studies: list[StudyPrediction] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    stored: list[StoredReport] = field(default_factory=list)

    def summary(self) -> dict:
        out = {"images": len(self.images), "studies": len(self.studies), "skipped": len(self.skipped),
               "abnormal_images": sum(1 for p in self.images if p.abnormal),
               "abnormal_studies": sum(1 for s in self.studies if s.abnormal)}
        if self.stored:
            out["reports_stored"] = sum(1 for s in self.stored if s.stored)
            out["reports_not_stored"] = sum(1 for s in self.stored if not s.stored)
        return out

    def to_dict(self) -> dict:
        out = {"run": self.run, "study_score": self.study_score, "summary": self.summary(),
               "images": [p.to_dict() for p in self.images],
               "studies": [s.to_dict() for s in self.studies],
               "skipped": [s.to_dict() for s in self.skipped]}
        if self.stored:
            out["stored"] = [s.to_dict() for s in self.stored]
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def to_csv(self) -> str:
        """One row per predicted image (columns :data:`CSV_COLUMNS`); skipped files are not rows."""
        by_key = {(s.study, s.part): s for s in self.studies}
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for p in self.images:
            study = by_key.get((p.study, p.part))
            row = {**p.to_dict(), "study_score": study.score if study else None,
                   "study_abnormal": study.abnormal if study else None}
            writer.writerow([_csv_cell(row[c]) for c in CSV_COLUMNS])
        return buf.getvalue()

    def render(self, out_format: str = "json") -> str:
        if out_format == "json":
            return self.to_json()
        if out_format == "csv":
            return self.to_csv()
        raise ValueError(f"unknown output format {out_format!r}; choose json or csv")


def check_run(run: str | Path) -> Path:
    """``run`` as a Path when it holds a trained model; FileNotFoundError naming it otherwise."""
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: not a run folder (no such folder)")
    has_stage1 = (run / "stage1" / FINAL_MODEL).is_file()
    has_stage2 = any(p.is_file() for p in (run / "stage2").glob(f"*/{FINAL_MODEL}"))
    if not (has_stage1 or has_stage2):
        raise FileNotFoundError(f"{run}: not a run folder (no stage1/{FINAL_MODEL} nor stage2/<PART>/{FINAL_MODEL}; "
                                "make one with `bonecluster train`)")
    return run


def load_run_config(run: str | Path):
    """The run's resolved config: RUN/config.yaml, else the one a stage's engine run wrote."""
    from bonecluster.config import config_from_dict, read_yaml

    run = Path(run)
    candidates = [run / "config.yaml", run / "stage1" / "config.yaml", *sorted(run.glob("stage2/*/config.yaml"))]
    for path in candidates:
        if path.is_file():
            return config_from_dict(read_yaml(path))
    raise FileNotFoundError(f"{run}: no config.yaml (neither RUN/config.yaml nor a stage's config.yaml)")


def predict_paths(run: str | Path, inputs: Sequence[str | Path], progress: bool = True,
                  cache: str | Path | None = None, use_metadata_parts: bool = True,
                  batch_size: int = 256, device: str | torch.device = "cpu",
                  limits: Mapping[str, Any] | None = None, store: bool = False) -> PredictionReport:
    """Predict every image under ``inputs`` with the run folder ``run``.

    ``inputs``: image files, DICOM files, folders (searched recursively), MURA roots or CSV
    manifests, decoded with the run's data settings (size, fit, intensity percentiles). Files
    that cannot be used are skipped (one warning each on stderr) and listed in ``.skipped``; a
    missing input is skipped too. ``cache``: where decoded pixels go (default a temporary folder,
    removed afterwards). ``use_metadata_parts``: stage 2 takes the body part from the metadata
    (MURA folders, DICOM BodyPartExamined, a manifest) when there is one, else the stage-1 cluster
    name. ``limits``: input limits that replace the run's (``{"pixel_cap": N}``, keys from
    :attr:`bonecluster.config.DataConfig.LIMITS`). ``store``: send each study's result back, as a
    DICOM Structured Report (:mod:`bonecluster.structured_report`), to the DICOMweb source its films
    came from (``.stored``; at least one input must be a ``dicomweb+`` source). Raises
    FileNotFoundError when ``run`` is not a run folder and DataError when no image could be read.
    """
    from bonecluster.data import DataError, SkipLog, prepare

    run = check_run(run)
    cfg = load_run_config(run)
    if limits:
        cfg.data = cfg.data.with_limits(**limits)
    predictor = Predictor(run, device)
    if not inputs:
        raise DataError("no input given")
    if store and not any(is_dicomweb(i) for i in inputs):
        raise DataError("--store sends the results back to a DICOMweb source, and no input is one "
                        "(dicomweb+http://HOST:PORT/dicom-web)")
    if store and importlib.util.find_spec("dicomweb_client") is None:   # fail before predicting, not after
        raise DataError("--store needs dicomweb-client: pip install 'bonecluster[pacs]'")
    skips = SkipLog()
    names = ", ".join(str(s) for s in inputs)
    with tempfile.TemporaryDirectory(prefix="bonecluster-predict-") as tmp:
        records, origin = _read_inputs(inputs, skips, cfg.data, cache or tmp, progress)
        if not records:
            raise DataError(f"no image found in {names}{_reasons(skips)}")
        workers = 1 if len(records) < 64 else (cfg.data.workers or None)
        try:
            data = prepare(records, cache or tmp, cfg.data.preprocess(), cfg.data.limits(), skips,
                           workers=workers, progress=progress)
        except DataError as err:
            raise DataError(f"none of the {len(records)} image(s) in {names} could be read{_reasons(skips)}") from err
        stage2_data = predictor.stage2_data(data, cfg.data.limits(), progress, workers)
        images = _predict_chunks(predictor, data, batch_size, progress, use_metadata_parts, stage2_data)
        how = cfg.stage2.study_score
        report = PredictionReport(str(run), how, images, study_predictions(images, how),
                                  [SkippedFile(s.path, s.reason) for s in skips.items])
        if store:   # before the temporary cache, which holds the fetched films' headers, goes
            report.stored = store_reports(report, origin, run, fetch_options(cache or tmp, cfg.data, progress))
    return report


def study_predictions(images: Sequence[ImagePrediction], how: str = "mean") -> list[StudyPrediction]:
    """Aggregate the scored images of each (study, body part): their mean (or max) score, flagged
    at the part's threshold. Images without a study or without a score are left out."""
    from bonecluster.metrics import study_level

    groups: dict[tuple[str, str], list[ImagePrediction]] = {}
    for p in images:
        if p.study is not None and p.score is not None and p.part is not None:
            groups.setdefault((p.study, p.part), []).append(p)
    out = []
    for (study, part), members in groups.items():
        _, scores = study_level([study] * len(members), [m.score for m in members], how)
        score, threshold = float(scores[0]), float(members[0].threshold)
        out.append(StudyPrediction(study, part, len(members), score, threshold, bool(score >= threshold)))
    return out


def _read_inputs(inputs, skips, data_cfg, cache, progress: bool) -> tuple[list, dict[str, str]]:
    """Records of every input, and for each record fetched from a DICOMweb input that input's
    address (by path); a missing or unreadable input is skipped, not fatal. DICOMweb inputs are
    fetched into ``cache``."""
    from bonecluster.data import read_sources

    records, origin = [], {}
    for src in inputs:
        got = read_sources([src], skips, data_cfg.reader_limits(), skip_bad_sources=True,
                           fetch=fetch_options(cache, data_cfg, progress))
        if is_dicomweb(src):
            origin.update({r.path: str(src) for r in got})
        records += got
    found: set[str] = set()
    unique = []
    for r in records:   # an image named by two inputs is predicted once
        if os.path.realpath(r.path) not in found:
            found.add(os.path.realpath(r.path))
            unique.append(r)
    records = unique
    for src in map(Path, inputs):  # a single file that yields no record is not an image
        if src.is_file() and src.suffix.lower() != ".csv" and os.path.realpath(src) not in found:
            skips.add(src, "not an image or DICOM file")
    return records, origin


def store_reports(report: PredictionReport, origin: Mapping[str, str], run: Path, options) -> list[StoredReport]:
    """One Structured Report per study whose films came from a DICOMweb source, stored back there
    with STOW-RS (:func:`bonecluster.data.dicomweb.store`, one client per source); a report that
    cannot be built or that the server refuses is listed with the reason, and the others are still
    sent."""
    from bonecluster import __version__
    from bonecluster.data.dicomweb import store
    from bonecluster.structured_report import PartResult, headers, study_report

    groups: dict[tuple[str, str], list[ImagePrediction]] = {}
    for p in report.images:
        if p.path in origin:
            groups.setdefault((origin[p.path], p.study or p.path), []).append(p)
    scored = {(s.study, s.part): s for s in report.studies}
    run_id, version = run_identity(run), f"bonecluster {__version__}"
    out: list[StoredReport] = []
    reports: dict[str, list] = {}   # source -> [(study, SR)]
    for (source, study), films in groups.items():
        parts = sorted({p.part or p.cluster_name or "unknown" for p in films})
        results = []
        for part in parts:
            mine = [p for p in films if (p.part or p.cluster_name or "unknown") == part]
            s = scored.get((study, part))
            results.append(PartResult(part, len(mine), s.score if s else None, s.threshold if s else None,
                                      s.abnormal if s else None))
        try:
            reports.setdefault(source, []).append((study, study_report([headers(p.path) for p in films], results,
                                                                       run_id, version)))
        except Exception as err:  # noqa: BLE001 - a film's header unreadable now: that study's report only
            out.append(StoredReport(study, source, "", "", False, f"cannot build the report: {err}"))
    for source, built in reports.items():
        for (study, sr), reason in zip(built, store(source, [sr for _, sr in built], options)):
            out.append(StoredReport(study, source, str(sr.SeriesInstanceUID), str(sr.SOPInstanceUID),
                                    reason is None, reason))
    for item in out:
        if not item.stored:
            log.warning("report for study %s not stored in %s: %s", item.study, item.source, item.reason)
    return out


def run_identity(run: str | Path) -> str:
    """``NAME@DIGEST``: the run folder's name and a digest of its config and trained models, which
    changes whenever the model does (written into every stored report)."""
    import hashlib

    run = Path(run)
    digest = hashlib.sha256()
    for path in [run / "config.yaml", *sorted(run.glob("stage*/**/" + FINAL_MODEL))]:
        if path.is_file():
            digest.update(path.relative_to(run).as_posix().encode())
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return f"{run.name}@{digest.hexdigest()[:16]}"


def _predict_chunks(predictor: Predictor, data: PreparedDataset, batch_size: int, progress: bool,
                    use_metadata_parts: bool, stage2_data: PreparedDataset | None = None) -> list[ImagePrediction]:
    """Predict about ``batch_size`` images at a time (bounded memory, a progress bar on stderr). A chunk
    ends where a study does, so the images of a study listed together are assigned together (by
    their mean embedding, or by their vote: :meth:`Predictor._stage1`)."""
    from tqdm.auto import tqdm

    out: list[ImagePrediction] = []
    keys = [study_key(r) for r in data.records]
    with tqdm(total=len(data), desc="predict", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        start = 0
        while start < len(data):
            end = min(start + batch_size, len(data))
            while end < len(data) and keys[end] == keys[end - 1]:
                end += 1
            chunk = np.arange(start, end)
            out += predictor.predict(data.subset(chunk), use_metadata_parts,
                                     None if stage2_data is None else stage2_data.subset(chunk))
            bar.update(end - start)
            start = end
    return out


def _reasons(skips, limit: int = 3) -> str:
    if not len(skips):
        return ""
    shown = "; ".join(f"{s.path}: {s.reason}" for s in skips.items[:limit])
    more = f"; and {len(skips) - limit} more" if len(skips) > limit else ""
    return f" ({len(skips)} skipped: {shown}{more})"


def _csv_cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
