"""`bonecluster predict` and `bonecluster export` on a tiny run trained once on phantoms."""

from __future__ import annotations

import csv
import io
import dataclasses
import json
import shutil

import numpy as np
import pytest

from bonecluster.cli import main
from bonecluster.data.phantoms import generate_phantoms
from bonecluster.predict import CSV_COLUMNS, ImagePrediction, predict_paths, study_predictions
from tests.integration.test_cli_train import S2, SETS

PARTS = ["ELBOW", "FINGER", "FOREARM", "HAND", "HUMERUS", "SHOULDER", "WRIST"]
N = 28  # 4 images per body part: the smallest run with a stage-2 model for every part
FAST = ["--set", "train.epochs=1"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(single_torch_thread):
    """Tiny tensors: one torch thread is faster than several fighting over a shared CPU."""


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("ph")
    generate_phantoms(root / "ph", n=N, size=64, seed=5, progress=False, workers=1)
    return root / "ph"


@pytest.fixture(scope="module")
def run(phantoms, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    assert main(["train", str(phantoms), "--out", str(out), "--quiet", *SETS, *S2, *FAST]) == 0
    return out


@pytest.fixture
def study_folder(phantoms, tmp_path):
    """A plain folder (not MURA layout) with two study sub-folders, a corrupt PNG and a text file."""
    images = sorted((phantoms / "train").rglob("*.png"))
    root = tmp_path / "incoming"
    for i, src in enumerate(images[:6]):
        dst = root / f"study{i % 2}" / f"img{i}.png"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
    (root / "study0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (root / "notes.txt").write_text("not an image")
    return root


def _predict_json(capsys, *args) -> dict:
    assert main(["predict", *map(str, args), "--quiet"]) == 0
    return json.loads(capsys.readouterr().out)


# ----------------------------------------------------------------------------- predict


def test_predict_json_gives_every_image_and_study(run, phantoms, capsys):
    report = _predict_json(capsys, run, phantoms)
    assert set(report) == {"run", "study_score", "summary", "images", "studies", "skipped"}
    images = report["images"]
    assert len(images) == N and report["skipped"] == []
    assert report["summary"]["images"] == N and report["study_score"] == "mean"
    for p in images:
        assert 0 <= p["cluster"] < 7 and p["cluster_name"]
        assert 0 < p["confidence"] <= 1
        assert p["part"] in PARTS  # MURA folders give the part: every part has a model
        assert isinstance(p["score"], float) and p["score"] >= 0
        assert p["abnormal"] == (p["score"] >= p["threshold"])
        assert p["study"]
    # study level: the mean of its images' scores, flagged at the part's threshold
    studies = report["studies"]
    assert studies and sum(s["n_images"] for s in studies) == N
    for s in studies:
        members = [p["score"] for p in images if p["study"] == s["study"] and p["part"] == s["part"]]
        assert len(members) == s["n_images"]
        assert s["score"] == pytest.approx(np.mean(members))
        assert s["abnormal"] == (s["score"] >= s["threshold"])
    assert any(s["n_images"] > 1 for s in studies)


def test_predict_csv_skips_and_reports_a_corrupt_file(run, study_folder, tmp_path, capsys):
    out = tmp_path / "sub" / "pred.csv"
    assert main(["predict", str(run), str(study_folder), "--format", "csv", "--out", str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""  # the table went to --out
    assert "broken.png" in captured.err and "skipped 1 file(s)" in captured.err
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert list(rows[0]) == list(CSV_COLUMNS)
    assert len(rows) == 6 and not any("broken" in r["path"] for r in rows)
    assert {r["study"] for r in rows} == {"study0", "study1"}
    for r in rows:
        assert r["abnormal"] in ("true", "false") and r["study_abnormal"] in ("true", "false")
        assert (float(r["score"]) >= float(r["threshold"])) == (r["abnormal"] == "true")
        same = [float(x["score"]) for x in rows if x["study"] == r["study"] and x["part"] == r["part"]]
        assert float(r["study_score"]) == pytest.approx(np.mean(same))
    assert not list(out.parent.glob(".*.tmp"))  # written atomically, no temp file left


def test_predict_api_lists_skipped_files_with_reasons(run, study_folder):
    missing = study_folder / "no-such.png"
    report = predict_paths(run, [study_folder, missing], progress=False)
    assert len(report.images) == 6
    skipped = {s.path: s.reason for s in report.skipped}
    assert str(study_folder / "study0" / "broken.png") in skipped
    assert "no such file" in skipped[str(missing)]
    assert report.to_dict()["skipped"] == [s.to_dict() for s in report.skipped]


def test_predict_places_each_film_among_the_training_films(run, phantoms, tmp_path):
    """typicality.npz holds the training films' stage-1 embeddings; predictions are placed
    against it (how well the flag separates real out-of-distribution films is measured in
    docs/RESULTS.md, not here: a 28-film, one-epoch run has no notion of typical)."""
    from PIL import Image

    from bonecluster.checkpoint import TrainedClusters
    from bonecluster.typicality import Typicality

    kept = Typicality.load(run / "stage1" / "typicality.npz")
    trained = TrainedClusters.load(run / "stage1")
    assert kept.bank.shape == (N, trained.centroids.shape[1]) and len(kept.reference) == N
    noise = tmp_path / "odd" / "noise.png"
    noise.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)).save(noise)
    report = predict_paths(run, [phantoms, noise.parent], progress=False)
    assert len(report.images) == N + 1
    for p in report.images:
        assert 0.0 <= p.typicality <= 100.0
        assert p.in_distribution == (p.typicality >= 100.0 - kept.percentile)
    # a training film is its own nearest neighbour: no training film is farther out than itself
    assert all(p.in_distribution for p in report.images if p.path != str(noise))
    # the bank is the training films' embeddings: predicting them again places them alike
    again = sorted(p.typicality for p in report.images if p.path != str(noise))
    np.testing.assert_allclose(again, np.sort(kept.typicality(kept.bank)), atol=1e-9)
    report_csv = list(csv.DictReader(io.StringIO(report.to_csv())))
    assert {r["in_distribution"] for r in report_csv} <= {"true", "false"}


def test_predict_flat_folder_has_no_studies(run, phantoms, tmp_path, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, src in enumerate(sorted((phantoms / "train").rglob("*.png"))[:3]):
        shutil.copy(src, flat / f"{i}.png")
    report = _predict_json(capsys, run, flat / "0.png", flat / "1.png", flat / "2.png")
    assert len(report["images"]) == 3 and report["studies"] == []
    assert all(p["study"] is None and p["score"] is not None for p in report["images"])


def test_predict_dicom_files_group_by_study_uid(run, phantoms, tmp_path, capsys):
    from PIL import Image

    from tests.unit.dicom_utils import write_dicom

    pngs = sorted((phantoms / "train" / "XR_HAND").rglob("*.png"))[:2]
    dcm = [write_dicom(tmp_path / f"{i}.dcm", np.asarray(Image.open(p).convert("L")).astype(np.uint16) * 16,
                       body_part="HAND", study_uid="1.2.3.4") for i, p in enumerate(pngs)]
    report = _predict_json(capsys, run, *dcm)
    assert [p["path"] for p in report["images"]] == [str(d) for d in dcm]
    assert {p["part"] for p in report["images"]} == {"HAND"}  # BodyPartExamined picks the part model
    assert len(report["studies"]) == 1 and report["studies"][0]["study"] == "1.2.3.4"
    assert report["studies"][0]["n_images"] == 2


def test_study_score_max_and_mixed_parts():
    def pred(study, part, score, threshold=0.5):
        return ImagePrediction("p", 0, part, 1.0, part, score, threshold,
                               None if score is None else score >= threshold, study)

    images = [pred("a", "HAND", 0.2), pred("a", "HAND", 0.9), pred("a", "WRIST", 0.1, 0.3),
              pred(None, "HAND", 0.7), pred("b", None, None, None)]
    mean = {(s.study, s.part): s for s in study_predictions(images, "mean")}
    assert set(mean) == {("a", "HAND"), ("a", "WRIST")}
    assert mean["a", "HAND"].score == pytest.approx(0.55) and mean["a", "HAND"].abnormal
    assert mean["a", "WRIST"].n_images == 1 and not mean["a", "WRIST"].abnormal
    top = {(s.study, s.part): s for s in study_predictions(images, "max")}
    assert top["a", "HAND"].score == pytest.approx(0.9)
    with pytest.raises(ValueError):
        study_predictions(images, "median")


def test_predict_fails_cleanly_on_a_non_run_folder(phantoms, tmp_path, capsys):
    not_run = tmp_path / "not-a-run"
    not_run.mkdir()
    assert main(["predict", str(not_run), str(phantoms), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "not a run folder" in err and str(not_run) in err
    assert main(["predict", str(tmp_path / "missing"), str(phantoms), "--quiet"]) == 1
    assert str(tmp_path / "missing") in capsys.readouterr().err


def test_predict_fails_cleanly_when_nothing_reads(run, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    out = tmp_path / "never.json"
    assert main(["predict", str(run), str(bad), "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and str(bad) in err
    assert not out.exists()


# ----------------------------------------------------------------------------- export


def test_export_onnx_matches_torch(run, phantoms, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from bonecluster.data import prepare_sources
    from bonecluster.predict import Predictor, load_run_config
    from bonecluster.stage2.scoring import embed_images

    out = tmp_path / "onnx"
    assert main(["export", str(run), "--out", str(out), "--part", "HAND"]) == 0
    printed = capsys.readouterr().out.split()
    for name in ("stage1.onnx", "stage2_HAND.onnx", "manifest.json", "README.md"):
        assert (out / name).is_file() and str(out / name) in printed, name
    assert not (out / "stage2_WRIST.onnx").exists()  # --part limits stage 2
    manifest = json.loads((out / "manifest.json").read_text())
    cfg = load_run_config(run)
    assert manifest["input"]["shape"] == ["batch", 1, cfg.data.size, cfg.data.size]
    predictor = Predictor(run)
    assert manifest["stage1"]["clusters"] == {str(k): v for k, v in predictor.names.items()}
    trained, anomaly = predictor.parts["HAND"]
    assert manifest["stage2"]["HAND"]["threshold"] == anomaly.threshold
    assert manifest["stage2"]["HAND"]["score_kind"] == cfg.stage2.score == "global+patch"

    data = prepare_sources([phantoms], cfg.data, cache=tmp_path / "cache", progress=False)
    images = data.images()[:5]  # a batch of 5; the export example had 2 (dynamic batch axis)
    x = (images.astype(np.float32) / 255.0)[:, None]

    s1 = ort.InferenceSession(str(out / "stage1.onnx"), providers=["CPUExecutionProvider"])
    emb, prob, cluster, conf = s1.run(["embedding", "probabilities", "cluster", "confidence"], {"image": x})
    five = data.subset(np.arange(5))
    alone = dataclasses.replace(five, records=[dataclasses.replace(r, study=None) for r in five.records])
    preds = predictor.predict(alone)   # the graph sees one image at a time
    torch_emb = embed_images(predictor.stage1, images).numpy()
    assert np.abs(emb - torch_emb).max() < 1e-4
    assert np.abs(conf - np.array([p.confidence for p in preds])).max() < 1e-4
    assert cluster.tolist() == [p.cluster for p in preds]
    assert np.allclose(prob.sum(1), 1, atol=1e-5)
    # the run clusters studies: the manifest's centroids assign a study's mean embedding as predict does
    assert manifest["stage1"]["by_study"] is cfg.cluster.by_study is True
    from bonecluster.data.records import study_index

    studies = study_index(five.records)
    centroids = np.array(manifest["stage1"]["centroids"])
    by_study = predictor.predict(five)
    for s in np.unique(studies):
        mean = emb[studies == s].mean(0)
        mean /= np.linalg.norm(mean)
        nearest = int(np.argmin(((centroids - mean) ** 2).sum(1)))
        assert all(p.cluster == nearest for p, t in zip(by_study, studies) if t == s)

    s2 = ort.InferenceSession(str(out / "stage2_HAND.onnx"), providers=["CPUExecutionProvider"])
    _, score, abnormal = s2.run(["embedding", "score", "abnormal"], {"image": x})
    torch_score = anomaly.score(trained, images).numpy()
    assert score.shape == (5,) and np.abs(score - torch_score).max() < 1e-4
    assert abnormal.tolist() == (torch_score >= anomaly.threshold).tolist()


def test_export_fails_cleanly_without_models(tmp_path, capsys):
    empty = tmp_path / "empty-run"
    (empty / "stage1").mkdir(parents=True)
    assert main(["export", str(empty)]) == 1
    err = capsys.readouterr().err
    assert "not a run folder" in err and str(empty) in err
    assert not (empty / "onnx").exists()


def test_export_unknown_part_names_the_parts(run, tmp_path, capsys):
    assert main(["export", str(run), "--out", str(tmp_path / "o"), "--part", "KNEE"]) == 1
    err = capsys.readouterr().err
    assert "KNEE" in err and "HAND" in err
