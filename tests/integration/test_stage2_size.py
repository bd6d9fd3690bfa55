"""`stage2.size`: stage 2 decodes, trains, predicts, evaluates, serves and exports at its own side,
apart from stage 1's `data.size`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bonecluster.cli import main
from bonecluster.checkpoint import TrainedClusters
from bonecluster.config import load_config
from bonecluster.data import DataError, prepare_like, prepare_sources
from bonecluster.predict import Predictor, load_run_config, predict_paths
from bonecluster.config import stage2_data_config
from bonecluster.stage2.train import check_stage2
from tests.integration.test_cli_train import S2, SETS

# 28 phantoms, 4 a part (a stage-2 model for every part), and one torch thread, as predict's tests
from tests.integration.test_cli_predict_export import N, _one_thread, phantoms  # noqa: F401  (fixtures)

STAGE2_SIZE = 48  # stage 1 trains at 32 px (TINY)


@pytest.fixture(scope="module")
def run(phantoms, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    assert main(["train", str(phantoms), "--out", str(out), "--quiet", *SETS, *S2, "--set", "train.epochs=1",
                 "--set", f"stage2.size={STAGE2_SIZE}"]) == 0
    return out


def test_parts_train_at_their_own_size_from_one_cache(run):
    cfg = load_run_config(run)
    assert cfg.data.size == 32 and cfg.stage2.size == STAGE2_SIZE
    assert TrainedClusters.load(run / "stage1").cfg.data.size == 32
    parts = sorted(p.name for p in (run / "stage2").iterdir() if p.is_dir())
    assert len(parts) == 7
    for part in parts:
        assert TrainedClusters.load(run / "stage2" / part).cfg.data.size == STAGE2_SIZE, part
    stores = sorted(p.name for p in (run / "cache").iterdir() if p.is_dir() and p.name.startswith("v"))
    assert sorted(s.split("-")[1] for s in stores) == ["s32", f"s{STAGE2_SIZE}"]   # one store per size, one folder
    assert Predictor(run).stage2_pre.size == STAGE2_SIZE


def test_predict_scores_parts_at_stage2_size(run, phantoms):
    report = predict_paths(run, [phantoms], progress=False)
    assert len(report.images) == N and all(p.score is not None for p in report.images)
    # the same scores as the part models give the films decoded at stage 2's size directly
    cfg = load_run_config(run)
    films = prepare_sources([phantoms], stage2_data_config(cfg), cache=run / "cache", progress=False)
    by_path = {p.path: p for p in report.images}
    predictor = Predictor(run)
    for part, (trained, anomaly) in predictor.parts.items():
        idx = [i for i, r in enumerate(films.records) if by_path[r.path].part == part]
        if idx:
            direct = anomaly.score(trained, films.images()[idx]).numpy()
            assert np.allclose(direct, [by_path[films.records[i].path].score for i in idx], atol=1e-5), part


def test_predictor_refuses_stage1_sized_films_for_stage2(run, phantoms):
    cfg = load_run_config(run)
    data = prepare_sources([phantoms], cfg.data, cache=run / "cache", progress=False)
    predictor = Predictor(run)
    with pytest.raises(ValueError, match=f"take {STAGE2_SIZE} px films"):
        predictor.predict(data)
    preds = predictor.predict(data, stage2_data=predictor.stage2_data(data))
    assert all(p.score is not None for p in preds)


def test_evaluate_and_export_use_stage2_size(run, phantoms, tmp_path):
    assert main(["evaluate", str(run), str(phantoms), "--json", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert set(metrics["stage2"]["per_part"]) == {p.name for p in (run / "stage2").iterdir() if p.is_dir()}
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    assert main(["export", str(run), "--out", str(tmp_path / "onnx"), "--part", "HAND"]) == 0
    manifest = json.loads((tmp_path / "onnx" / "manifest.json").read_text())
    assert manifest["input"]["size"] == 32 and manifest["stage2"]["HAND"]["input_size"] == STAGE2_SIZE
    assert f"(N, 1, {STAGE2_SIZE}, {STAGE2_SIZE})" in (tmp_path / "onnx" / "README.md").read_text()
    import onnxruntime as ort

    films = prepare_sources([phantoms], stage2_data_config(load_run_config(run)), cache=run / "cache", progress=False)
    images = films.images()[:3]
    graph = ort.InferenceSession(str(tmp_path / "onnx" / "stage2_HAND.onnx"), providers=["CPUExecutionProvider"])
    (score,) = graph.run(["score"], {"image": (images.astype(np.float32) / 255.0)[:, None]})
    trained, anomaly = Predictor(run).parts["HAND"]
    assert np.abs(score - anomaly.score(trained, images).numpy()).max() < 1e-4


def test_prepare_like_names_a_file_that_changed_or_no_longer_decodes(phantoms, tmp_path):
    import shutil

    folder = tmp_path / "films"
    shutil.copytree(phantoms, folder)
    cfg = load_config("cpu", overrides=["data.size=32", "data.workers=1"])
    data = prepare_sources([folder], cfg.data, cache=tmp_path / "cache", progress=False)
    at_48 = stage2_data_config(load_config("cpu", overrides=["data.size=32", "stage2.size=48"]))
    changed, broken = data.records[2].path, data.records[3].path
    shutil.copyfile(data.records[0].path, changed)   # still an image, but another one: the views would disagree
    with pytest.raises(DataError, match="changed between its decoding at 32 px and at 48 px"):
        prepare_like(data, at_48.preprocess(), progress=False)
    with open(broken, "wb") as f:
        f.write(b"not an image any more")
    with pytest.raises(DataError, match="decoded at 32 px but not at 48 px"):
        prepare_like(data, at_48.preprocess(), progress=False)
    assert prepare_like(data, data.pre) is data


@pytest.mark.parametrize("bad", [-1, 8, 1.5, True])
def test_stage2_size_out_of_range_fails_first(bad):
    cfg = load_config("cpu")
    cfg.stage2.size = bad
    with pytest.raises(ValueError, match="stage2.size must be 0"):
        check_stage2(cfg)


def test_viewer_scores_an_upload_at_stage2_size(run, phantoms):
    import warnings

    from bonecluster.serve import create_app

    with warnings.catch_warnings():  # starlette suggests httpx2; httpx is what the project pins
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient

    import bonecluster.serve.app as app

    seen = []
    real_grad_cam = app.grad_cam

    def grad_cam(model, film, target):
        seen.append(film.shape)
        return real_grad_cam(model, film, target)

    png = sorted(phantoms.glob("train/XR_HAND/**/*.png"))[0]
    expected = predict_paths(run, [png], progress=False, use_metadata_parts=False).images[0]
    with pytest.MonkeyPatch.context() as patch, TestClient(create_app(run), base_url="http://127.0.0.1") as client:
        patch.setattr(app, "grad_cam", grad_cam)
        r = client.post("/api/predict", files={"file": ("x.png", png.read_bytes(), "image/png")})
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["part"] == expected.part and d["score"] == pytest.approx(expected.score, abs=1e-5)
    assert d["heatmap_url"] is not None and seen == [(STAGE2_SIZE, STAGE2_SIZE)]   # the part network's own size


def test_part_models_of_another_size_are_left_out_with_a_warning(run, phantoms, tmp_path, caplog):
    import shutil

    from bonecluster.config import read_yaml

    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("cache", "onnx"))
    cfg = read_yaml(copy / "config.yaml")
    cfg["stage2"]["size"] = 0   # the run's stage 2 is now stage 1's size: the 48-px part folders are stale
    (copy / "config.yaml").write_text(_yaml(cfg))
    with caplog.at_level("WARNING", logger="bonecluster"):
        predictor = Predictor(copy)
    assert predictor.parts == {} and predictor.stage2_pre is None
    assert "trained on 48 px films" in caplog.text and "left out" in caplog.text
    report = predict_paths(copy, [phantoms], progress=False)   # stage 1 still predicts
    assert all(p.cluster is not None and p.score is None for p in report.images)


def _yaml(mapping) -> str:
    import yaml

    return yaml.safe_dump(mapping, sort_keys=False)


def test_few_label_probes_fit_and_score_at_stage2_size(tmp_path_factory):
    from bonecluster.evaluate import evaluate
    from tests.integration.conftest import train_stage2_only

    root = train_stage2_only(tmp_path_factory.mktemp("few"), "--labels-fraction", "0.2",
                             "--set", f"stage2.size={STAGE2_SIZE}")
    run, valid = root / "run", root / "ph" / "valid"
    metrics = evaluate(run, [valid], root / "m.json", progress=False)
    assert metrics["stage2_few_labels"]["labels_fraction"] == 0.2
    from bonecluster.evaluate import few_label_predictions

    predictor = Predictor(run)
    data = prepare_sources([valid], load_run_config(run).data, cache=run / "cache", progress=False)
    films = predictor.stage2_data(data)
    assert films.pre.size == STAGE2_SIZE and data.pre.size == 32
    preds = predictor.predict(data, stage2_data=films)
    few, probes = few_label_predictions(predictor, films, preds)
    assert probes
    per_part = metrics["stage2_few_labels"]["per_part"]
    for part, probe in probes.items():
        idx = [i for i, p in enumerate(preds) if p.part == part]
        trained, anomaly = predictor.parts[part]
        direct = probe.score(trained, films.images()[idx], anomaly)
        assert np.allclose(direct.numpy(), [few[i].score for i in idx], atol=1e-5), part
        assert per_part[part]["n_images"] == len(idx)
