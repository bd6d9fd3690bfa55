"""The whole chain with pretrained-backbone families (issue 22), offline: a timm CNN, a tiny timm
ViT and a tiny transformers DINOv2 (``hf/<folder>``), each with random weights saved to a file and
loaded through ``model.weights=FILE``, then train both stages, evaluate, predict, serve (with its
heatmap) and export to ONNX with the parity check."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bonecluster.cli import main
from bonecluster.data.phantoms import generate_phantoms
from bonecluster.models import build_model
from bonecluster.predict import Predictor
from tests.integration.conftest import SERVE_SETS

timm = pytest.importorskip("timm")

# name -> (model settings, film side): a timm CNN, and a 3-block ViT with 16 px patches (2x2 grid).
# Not DINOv2's ViT: its layer scale starts at 1e-5, so with random weights every film gets almost
# the same CLS token, and the whitening then magnifies float rounding beyond the parity bound.
BACKBONES = {
    "cnn": ({"arch": "timm/resnet10t"}, 32),
    "vit": ({"arch": "timm/vit_tiny_patch16_224", "backbone_kwargs": {"depth": 3, "embed_dim": 48, "num_heads": 2}}, 32),
    "hf": ({"arch": "hf/{folder}"}, 28),   # a 3-layer DINOv2 written by save_pretrained into {folder}
}


def _hf_folder(root) -> str:
    transformers = pytest.importorskip("transformers")
    folder = root / "tiny-dinov2"
    # position embedding for 56 px films, the films 28 px: the interpolating path, as with a hub model
    config = transformers.Dinov2Config(hidden_size=48, num_hidden_layers=3, num_attention_heads=2,
                                       intermediate_size=96, patch_size=14, image_size=56)
    transformers.Dinov2Model(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(single_torch_thread):
    """Tiny tensors: one torch thread is faster than several fighting over a shared CPU."""


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("ph")
    generate_phantoms(root / "ph", n=28, size=64, seed=5, progress=False, workers=1)
    return root / "ph"


@pytest.fixture(scope="module", params=sorted(BACKBONES))
def trained(request, phantoms, tmp_path_factory):
    """(run folder, the weights file it started from, the backbone's settings)."""
    model, size = BACKBONES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "hf":
        model = {"arch": model["arch"].format(folder=_hf_folder(root))}
    start = build_model({**model, "sobel": True}, image_size=size)
    weights = root / "start.pt"
    torch.save(start.state_dict(), weights)
    sets = [f"model.arch={model['arch']}", f"model.weights={weights}", f"data.size={size}"]
    if "backbone_kwargs" in model:
        sets.append("model.backbone_kwargs=" + json.dumps(model["backbone_kwargs"]))
    run = root / "run"
    args = ["train", str(phantoms), "--out", str(run), "--quiet", *SERVE_SETS, *[a for s in sets for a in ("--set", s)]]
    assert main(args) == 0
    return run, start, model


def test_train_records_the_backbone_and_starts_from_the_file(trained):
    run, start, model = trained
    resolved = (run / "config.yaml").read_text()
    assert f"arch: {model['arch']}" in resolved
    assert (run / "stage2" / "summary.json").is_file()
    stage1 = Predictor(run).stage1
    assert stage1.model.arch == model["arch"] and stage1.model.feature_dim == start.feature_dim


def test_evaluate_and_predict(trained, phantoms, tmp_path, capsys):
    run, _, _ = trained
    assert main(["evaluate", str(run), str(phantoms), "--json", str(tmp_path / "m.json"), "--quiet"]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert 0.0 <= metrics["stage1"]["accuracy_hungarian"] <= 1.0
    capsys.readouterr()
    assert main(["predict", str(run), str(phantoms), "--quiet"]) == 0
    predictions = json.loads(capsys.readouterr().out)
    images = predictions["images"]
    assert len(images) == 28 and all(p["part"] and p["score"] >= 0 for p in images)


def test_serve_gives_a_heatmap(trained, phantoms):
    pytest.importorskip("fastapi")
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from bonecluster.serve import create_app

    run, _, _ = trained
    png = sorted(phantoms.rglob("*.png"))[0]
    with TestClient(create_app(run), base_url="http://127.0.0.1") as client:
        r = client.post("/api/predict", files={"file": ("x.png", png.read_bytes(), "image/png")})
        assert r.status_code == 200, r.text
        d = r.json()
        assert d["heatmap_layer"] in _cam_layer_names(run)
        heat = Image.open(io.BytesIO(client.get(d["heatmap_url"]).content))
        assert heat.mode == "RGBA"


def _cam_layer_names(run) -> list[str]:
    return list(Predictor(run).stage1.model.cam_layers())


def test_export_matches_torch(trained, phantoms, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from bonecluster.data import prepare_sources
    from bonecluster.predict import load_run_config
    from bonecluster.stage2.scoring import embed_images

    run, _, _ = trained
    out = tmp_path / "onnx"
    assert main(["export", str(run), "--out", str(out), "--part", "HAND"]) == 0
    cfg = load_run_config(run)
    predictor = Predictor(run)
    data = prepare_sources([phantoms], cfg.data, cache=tmp_path / "cache", progress=False)
    images = data.images()[:3]
    x = (images.astype(np.float32) / 255.0)[:, None]
    s1 = ort.InferenceSession(str(out / "stage1.onnx"), providers=["CPUExecutionProvider"])
    (emb,) = s1.run(["embedding"], {"image": x})
    assert np.abs(emb - embed_images(predictor.stage1, images).numpy()).max() < 1e-4
    trained_part, anomaly = predictor.parts["HAND"]
    s2 = ort.InferenceSession(str(out / "stage2_HAND.onnx"), providers=["CPUExecutionProvider"])
    (score,) = s2.run(["score"], {"image": x})
    assert np.abs(score - anomaly.score(trained_part, images).numpy()).max() < 1e-4


@pytest.mark.parametrize("method,epochs", [("simclr", 0), ("simclr", 1), ("dino", 1)])
def test_every_method_runs_on_a_timm_vit(phantoms, tmp_path, method, epochs):
    """k-means on frozen features (selfsup.epochs=0) and two-view fine-tuning (DINO's teacher is a
    copy of the network) on a tiny ViT."""
    from bonecluster.config import load_config
    from bonecluster.data import prepare_sources
    from bonecluster.engine import DeepClusterEngine
    from tests.integration.test_engine import TINY

    model, size = BACKBONES["vit"]
    cfg = load_config("cpu", overrides=TINY + [f"data.size={size}", f"model.arch={model['arch']}",
                                               "model.backbone_kwargs=" + json.dumps(model["backbone_kwargs"]),
                                               f"method={method}", f"selfsup.epochs={epochs}", "selfsup.batch_size=8"])
    data = prepare_sources([phantoms], cfg.data, cache=tmp_path / "cache", progress=False)
    result = DeepClusterEngine(cfg, tmp_path / "run", progress=False).fit(data)
    assert len(result.assignments) == len(data) and result.assignments.max() < cfg.cluster.k
