"""Label-free score refinement (`stage2.refine_rounds`) end to end: train, files, evaluate, export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bonecluster.cli import main
from bonecluster.data import PreparedDataset
from bonecluster.checkpoint import TrainedClusters
from bonecluster.stage2.parts import group_by_part
from bonecluster.stage2.scoring import ANOMALY, PartAnomaly
from tests.integration.conftest import STAGE2_SETS, train_stage2_only

REFINE = ["--set", "stage2.refine_rounds=2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Stage 2 alone on 168 phantoms with a two-round refinement of every part's score."""
    return train_stage2_only(tmp_path_factory.mktemp("refine"), *REFINE)


def test_refined_parts_score_with_their_hog_model(run):
    data = PreparedDataset.load(run / "run" / "data.json")
    parts = group_by_part(data)
    assert len(parts) == 7
    for part, positions in parts.items():
        folder = run / "run" / "stage2" / part
        raw = torch.load(folder / ANOMALY, weights_only=True)   # plain tensors and values
        # one HOG model per default share (0.3 to 0.7), rows of coef
        assert raw["refiner"]["rounds"] == 2 and raw["refiner"]["shares"] == [0.3, 0.4, 0.5, 0.6, 0.7]
        assert raw["refiner"]["coef"].shape[0] == 5 == raw["refiner"]["intercept"].shape[0]
        anomaly = PartAnomaly.load(folder / ANOMALY)
        images = data.subset(positions).images()
        trained = TrainedClusters.load(folder)
        scores = anomaly.score(trained, images)
        assert torch.equal(scores, anomaly.refiner.score(images))
        assert torch.allclose(anomaly.train_scores, scores, atol=1e-6)   # training scores are the refiner's
        assert bool(((scores > 0) & (scores < 1)).all()) and 0 < anomaly.threshold < 1
        # the kNN score that seeded it is still there, on its own scale
        assert not torch.allclose(anomaly.knn_score(trained, images), scores)
        # the label-free checks of the training scores were stored with them (stage2.guard)
        checks = raw["checks"]
        assert set(checks) == {"seed_agreement", "framing", "warnings"} and anomaly.checks == checks
        assert -1 <= checks["seed_agreement"] <= 1 and -1 <= checks["framing"] <= 1


def test_evaluate_scores_the_refined_parts(run):
    out = run / "out"
    assert main(["evaluate", str(run / "run"), str(run / "ph" / "valid"), "--json", str(out / "m.json"),
                 "--quiet"]) == 0
    m = json.loads((out / "m.json").read_text())
    assert len(m["stage2"]["per_part"]) == 7 and 0 <= m["stage2"]["macro"]["auroc"] <= 1


def test_onnx_export_carries_the_refiner(run, capsys):
    ort = pytest.importorskip("onnxruntime")
    target = run / "onnx"
    assert main(["export", str(run / "run"), "--out", str(target), "--part", "HAND"]) == 0
    manifest = json.loads((target / "manifest.json").read_text())
    assert manifest["stage2"]["HAND"]["refined"] is True
    assert "refined without labels" in (target / "README.md").read_text()
    data = PreparedDataset.load(run / "run" / "data.json")
    images = data.subset(group_by_part(data)["HAND"]).images()[:6]
    anomaly = PartAnomaly.load(run / "run" / "stage2" / "HAND" / ANOMALY)
    session = ort.InferenceSession(str(target / manifest["stage2"]["HAND"]["file"]))
    _, score, abnormal = session.run(None, {"image": (images[:, None] / 255.0).astype(np.float32)})
    expected = anomaly.refiner.score(images).numpy()
    assert np.allclose(score, expected, atol=1e-5)
    assert (abnormal == (expected >= anomaly.threshold)).mean() >= 5 / 6   # a score on the threshold may flip


def test_bad_refinement_settings_fail_before_training(run, tmp_path, capsys):
    for bad in ("stage2.refine_rounds=-1", "stage2.refine_share=1.0", "stage2.refine_share=[0.5,0]",
                "stage2.refine_share=[]", "stage2.refine_C=0"):
        sets = [a for s in STAGE2_SETS + [bad] for a in ("--set", s)]
        assert main(["train", str(run / "ph" / "train"), "--out", str(tmp_path / "r"), "--stages", "2",
                     "--quiet", *sets]) != 0
        assert "refine" in capsys.readouterr().err
        assert not (tmp_path / "r" / "stage2").exists()
