"""The ONNX graphs of bonecluster.export against the torch code they mirror (no trained run)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from bonecluster.cluster import fit_pca_whitening, l2_normalise
from bonecluster.config import Config
from bonecluster.checkpoint import TrainedClusters
from bonecluster.export import Stage1Graph, Stage2Graph, _export
from bonecluster.models import DeepClusterNet
from bonecluster.predict import Predictor
from bonecluster.stage2.scoring import PartAnomaly, embed_images, part_features

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

SIZE = 32


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (10, SIZE, SIZE), dtype=np.uint8)


@pytest.fixture(scope="module")
def trained(images, single_torch_thread):
    torch.manual_seed(0)
    model = DeepClusterNet("resnet18", sobel=True, num_clusters=3).eval()
    with torch.no_grad():
        feats = model.features(torch.from_numpy(images).float().div(255).unsqueeze(1))
    pca = fit_pca_whitening(feats, dim=6)
    centroids = l2_normalise(torch.randn(3, 6))
    return TrainedClusters(model, pca, centroids, np.zeros(len(images), np.int64), Config())


def _anomaly(trained, images, kind: str) -> PartAnomaly:
    pooled, patches = part_features(trained, images)
    pca = fit_pca_whitening(pooled, dim=5)
    bank = l2_normalise(pca.transform(pooled))
    patch_bank = patches.reshape(-1, patches.shape[2])
    train_parts = (torch.rand(len(images)) + 0.5, torch.rand(len(images)) + 0.1)
    return PartAnomaly(bank, train_parts[0], 0.4, "quantile", 3, kind, pca, patch_bank, 2,
                       train_parts if kind == "global+patch" else ())


def _run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": x})


def test_stage1_graph_matches_the_predictor(trained, images, tmp_path):
    path = tmp_path / "stage1.onnx"
    assert _export(Stage1Graph(trained), torch.rand(2, 1, SIZE, SIZE), path, 17, "legacy") == "legacy"
    queries = images[:7]  # another batch size than the export's example
    emb, prob, cluster, conf = _run(path, (queries.astype(np.float32) / 255)[:, None])
    predictor = Predictor.__new__(Predictor)
    predictor.stage1 = trained
    predictor.names = {}   # every cluster its own cluster-N: predict's confidence is the graph's
    labels, confidence, _ = predictor._stage1(queries)
    assert np.abs(emb - embed_images(trained, queries).numpy()).max() < 1e-4
    assert cluster.tolist() == labels.tolist()
    assert np.abs(conf - confidence).max() < 1e-4
    assert prob.shape == (7, 3)
    # clusters 0 and 1 named alike: predict sums the graph's probabilities over them
    predictor.names = {0: "HAND", 1: "HAND", 2: "WRIST"}
    _, shared, _ = predictor._stage1(queries)
    summed = np.where(cluster < 2, prob[:, 0] + prob[:, 1], prob[:, 2])
    assert np.abs(shared - summed).max() < 1e-4


@pytest.mark.parametrize("kind, pool", [("global", 1), ("patch", 1), ("global+patch", 1), ("patch", 3)])
def test_stage2_graph_matches_part_anomaly_score(trained, images, tmp_path, kind, pool):
    trained = dataclasses.replace(trained, cfg=dataclasses.replace(
        trained.cfg, stage2=dataclasses.replace(trained.cfg.stage2, patch_pool=pool)))
    anomaly = _anomaly(trained, images, kind)
    path = tmp_path / "part.onnx"
    _export(Stage2Graph(trained, anomaly), torch.rand(2, 1, SIZE, SIZE), path, 17, "legacy")
    queries = np.ascontiguousarray(images[::-1][:4])
    emb, score, abnormal = _run(path, (queries.astype(np.float32) / 255)[:, None])
    expected = anomaly.score(trained, queries).numpy()
    assert np.abs(score - expected).max() < 1e-4
    assert abnormal.tolist() == (expected >= anomaly.threshold).tolist()
    pooled, _ = part_features(trained, queries)
    assert np.abs(emb - l2_normalise(anomaly.pca.transform(pooled)).numpy()).max() < 1e-4


def test_a_patch_score_without_patch_bank_is_refused(trained, images):
    anomaly = _anomaly(trained, images, "patch")
    anomaly.patch_bank = None
    with pytest.raises(ValueError, match="patch bank"):
        Stage2Graph(trained, anomaly)
