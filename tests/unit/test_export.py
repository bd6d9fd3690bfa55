"""The ONNX graphs of bonecluster.export against the torch code they mirror (no trained run)."""

from __future__ import annotations

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


def _anomaly(trained, images, kind: str, pool: int = 1) -> PartAnomaly:
    pooled, patches = part_features(trained, images, pool=pool)
    pca = fit_pca_whitening(pooled, dim=5)
    bank = l2_normalise(pca.transform(pooled))
    patch_bank = patches.reshape(-1, patches.shape[2])
    train_parts = (torch.rand(len(images)) + 0.5, torch.rand(len(images)) + 0.1)
    return PartAnomaly(bank, train_parts[0], 0.4, "quantile", 3, kind, pca, patch_bank, 2,
                       train_parts if kind == "global+patch" else (), patch_pool=pool)


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
    anomaly = _anomaly(trained, images, kind, pool)
    path = tmp_path / "part.onnx"
    _export(Stage2Graph(trained, anomaly), torch.rand(2, 1, SIZE, SIZE), path, 17, "legacy")
    queries = np.ascontiguousarray(images[::-1][:4])
    emb, score, abnormal = _run(path, (queries.astype(np.float32) / 255)[:, None])
    expected = anomaly.score(trained, queries).numpy()
    assert np.abs(score - expected).max() < 1e-4
    assert abnormal.tolist() == (expected >= anomaly.threshold).tolist()
    pooled, _ = part_features(trained, queries)
    assert np.abs(emb - l2_normalise(anomaly.pca.transform(pooled)).numpy()).max() < 1e-4


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_the_neighbourhood_pool_exports_with_its_edges(tmp_path, exporter):
    """patch_vectors with a 3 x 3 pool on a 5 x 4 map (edges and corners average fewer positions):
    the ONNX graph gives the torch figures with either exporter."""
    from bonecluster.stage2.scoring import patch_vectors

    class Pool(torch.nn.Module):
        output_names = ("patches",)

        def forward(self, image):   # the exporter names its input "image"
            return patch_vectors(image, 3)

    mid = torch.randn(3, 6, 5, 4)
    path = tmp_path / "pool.onnx"
    try:
        _export(Pool(), mid[:2], path, 17, exporter)
    except Exception as error:   # dynamo needs onnxscript; legacy must always work
        if exporter == "legacy":
            raise
        pytest.skip(f"the dynamo exporter is not usable here: {error}")
    (out,) = _run(path, mid.numpy())
    assert np.abs(out - patch_vectors(mid, 3).numpy()).max() < 1e-5


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_hog_exports_without_nan_where_a_film_is_flat(tmp_path, exporter):
    """The refiner's HOG in a graph: flat regions (no gradient) gave NaN through the legacy exporter's
    atan2 before the angle was set to 0 there, so a refined part scored NaN (found 2026-12-07)."""
    from bonecluster.descriptors import hog

    class Hog(torch.nn.Module):
        output_names = ("hog",)

        def forward(self, image):
            return hog(image)

    x = torch.zeros(2, 1, 32, 32)
    x[:, :, :, 16:] = 0.8            # one vertical edge, flat elsewhere
    x[1, :, 8:12, 4:8] = 0.3         # and a small square on the second film
    path = tmp_path / "hog.onnx"
    try:
        _export(Hog(), x, path, 17, exporter)
    except Exception as error:   # dynamo needs onnxscript; legacy must always work
        if exporter == "legacy":
            raise
        pytest.skip(f"the dynamo exporter is not usable here: {error}")
    (out,) = _run(path, x.numpy())
    assert not np.isnan(out).any()
    assert np.abs(out - hog(x).numpy()).max() < 1e-5


def test_a_patch_score_without_patch_bank_is_refused(trained, images):
    anomaly = _anomaly(trained, images, "patch")
    anomaly.patch_bank = None
    with pytest.raises(ValueError, match="patch bank"):
        Stage2Graph(trained, anomaly)
