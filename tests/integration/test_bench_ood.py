"""benchmarks/bench_ood.py end to end on a phantom stand-in for ../shared/data."""

from __future__ import annotations

import csv
import json
import os

import pytest

from tests.conftest import load_benchmark
from tests.integration.test_bench_real_suite import _stand_in
from tests.integration.test_engine import TINY

SPACES = ("embedding", "pooled", "pooled-mahalanobis", "pooled-mahalanobis-cv", "appearance",
          "embedding+appearance", "layers-mahalanobis-cv", "layer1-mahalanobis-cv", "layer4-mahalanobis-cv")


def test_both_settings_report_flagged_shares_and_the_auroc(tmp_path, single_torch_thread):
    data = _stand_in(tmp_path)   # its fracatlas calls HUMERUS films "leg", and has no hip
    tiny = TINY + ["train.epochs=1", "selfsup.epochs=1", "cluster.n_init=1", "model.weights=none"]
    sets = [a for s in tiny for a in ("--set", s)]
    phantom_sets = [a for s in tiny for a in ("--phantom-set", s)]
    out = tmp_path / "result.json"
    work = tmp_path / "work"
    result = load_benchmark("bench_ood").main(["--data", str(data), "--work", str(work), "--phantoms", "70",
                                               "--json", str(out), "--quiet", *sets, *phantom_sets])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))

    phantom = result["phantom"]
    assert phantom["reference_drift"] < 1e-4   # the shipped reference is this run's training films
    for space in SPACES:
        rows = phantom["spaces"][space]
        assert set(rows) == {"new phantoms", "mura-humerus", "mura-elbow", "fracatlas", "fracture-parts",
                             "mura-unlabelled", "all real films", "auroc", "probe_auroc"}
        assert 0 <= rows.pop("auroc") <= 1 and 0 <= rows.pop("probe_auroc") <= 1
        assert rows["all real films"]["films"] == sum(rows[n]["films"] for n in rows if n not in
                                                      ("new phantoms", "all real films"))
        assert rows["new phantoms"]["films"] == 70
        for r in rows.values():
            assert 0 <= r["flagged"] <= 1 and 0 <= r["median_typicality"] <= 100
    # flagged by either reference: at least as often as by each, at most as by both together
    for name, either in phantom["spaces"]["embedding+appearance"].items():
        parts = [phantom["spaces"][space][name]["flagged"] for space in ("embedding", "appearance")]
        assert max(parts) - 1e-9 <= either["flagged"] <= sum(parts) + 1e-9

    upper = result["upper_limb"]
    assert upper["reference_drift"] < 1e-4
    with open(data / "fracatlas" / "manifest.csv") as f:
        regions = {os.path.abspath(data / "fracatlas" / r["path"]): r["region"] for r in csv.DictReader(f)}
    legs = sum(region == "leg" for region in regions.values())
    trained = json.loads((work / "upper-run" / "data.json").read_text())
    trained_paths = {os.path.abspath(r["path"]) for r in trained["records"]}
    assert upper["train_films"] == len(trained_paths)
    # no leg film and no non-upper-limb FracAtlas film is trained on
    assert not any(regions.get(p, "hand") != "hand" for p in trained_paths)
    for space in SPACES:
        rows = upper["spaces"][space]
        assert rows["leg and hip"]["films"] == legs
        assert 0 < rows["held-out upper limb"]["films"]
        assert 0 <= rows["auroc"] <= 1 and 0 <= rows["probe_auroc"] <= 1


def test_a_cross_fitted_reference_stops_flagging_films_like_the_training_films():
    # Anisotropic features, few films for their dimension (as 700 phantoms in 512 pooled
    # dimensions): in-sample Mahalanobis distances are far tighter than a new film's, so the 99th
    # percentile flags nearly every new film from the same distribution; cross-fitted ones do not.
    import numpy as np

    ClusterMahalanobis = load_benchmark("bench_ood").ClusterMahalanobis
    rng = np.random.default_rng(0)
    scale = 1.0 / np.arange(1, 129) ** 0.8
    train, new = rng.normal(size=(300, 128)) * scale, rng.normal(size=(1000, 128)) * scale
    clusters = rng.integers(0, 5, 300)
    flagged = {}
    for folds in (0, 5):
        flag = ClusterMahalanobis(train, clusters, folds=folds)
        flagged[folds] = float(np.mean(~flag.in_distribution(flag.typicality(new))))
    assert flagged[0] > 0.5 and flagged[5] <= 0.05, flagged
    far = ClusterMahalanobis(train, clusters, folds=5)
    assert np.mean(~far.in_distribution(far.typicality(new + 3 * scale))) > 0.9   # a shifted film is still flagged


def test_layer_statistics_are_each_layers_channel_means_and_spreads():
    import numpy as np
    import torch

    from bonecluster.config import load_config
    from bonecluster.models import build_model

    bench = load_benchmark("bench_ood")
    cfg = load_config("cpu", overrides=TINY)
    torch.manual_seed(0)
    model = build_model(cfg.model, num_clusters=3, image_size=32).eval()
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32), dtype=np.uint8)
    stats, _ = bench.layer_statistics(model, images, batch_size=2)   # batches must not change a film's figures
    assert list(stats) == ["layer1", "layer2", "layer3", "layer4"]
    with torch.no_grad():
        x = torch.from_numpy(images[3:4]).float().div(255).unsqueeze(1)
        fmap = model.backbone.layer2(model.backbone.layer1(model.backbone.maxpool(model.backbone.relu(
            model.backbone.bn1(model.backbone.conv1(model.preprocess(x)))))))
    assert stats["layer2"].shape == (5, 2 * fmap.shape[1])
    expected = torch.cat([fmap.mean((2, 3)), fmap.std((2, 3), correction=0)], 1)[0].numpy()
    assert np.allclose(stats["layer2"][3], expected, atol=1e-5)


def test_the_layer_ensemble_flags_films_unlike_the_training_films_in_any_layer():
    import numpy as np

    LayerEnsemble = load_benchmark("bench_ood").LayerEnsemble
    rng = np.random.default_rng(1)
    scale = {"shallow": 1.0 / np.arange(1, 33), "deep": 1.0 / np.arange(1, 65) ** 0.5}
    train = {n: rng.normal(size=(400, len(s))) * s for n, s in scale.items()}
    clusters = rng.integers(0, 4, 400)
    ens = LayerEnsemble(train, clusters, folds=5)
    assert len(ens.reference) == 400 and np.all(np.diff(ens.reference) >= 0)
    # the reference is each film's cross-fitted distances summed over the layers, on one split
    ClusterMahalanobis = load_benchmark("bench_ood").ClusterMahalanobis
    fold = np.random.default_rng(0).permutation(400) % 5
    alone = {n: ClusterMahalanobis(x, clusters, folds=5, fold=fold) for n, x in train.items()}
    expected = sum(alone[n].film_reference / np.median(alone[n].film_reference) for n in train)
    assert np.allclose(ens.reference, np.sort(expected))
    like = {n: rng.normal(size=(1000, len(s))) * s for n, s in scale.items()}
    flagged = np.mean(~ens.in_distribution(ens.typicality(like)))
    assert flagged <= 0.05, flagged
    # a film that differs in the shallow layer's statistics alone is flagged
    odd = dict(like, shallow=like["shallow"] + 3 * scale["shallow"])
    assert np.mean(~ens.in_distribution(ens.typicality(odd))) > 0.9
    with pytest.raises(ValueError, match="cross-fitted"):
        LayerEnsemble(train, clusters, folds=0)
