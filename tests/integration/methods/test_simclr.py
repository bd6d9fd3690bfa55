"""Method simclr (methods/simclr.py): contrastive pre-training, then k-means once."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from bonecluster.augment import RadiographAugment
from bonecluster.checkpoint import CHECKPOINT, load_torch
from bonecluster.data.records import study_index
from bonecluster.engine import DeepClusterEngine
from bonecluster.methods._two_view import TwoViewPretraining
from tests.integration.methods.conftest import method_config, prepared, train_method


def test_pretraining_epochs_are_logged_and_end_in_k_clusters(phantoms, tmp_path):
    res, rows, trained = train_method(phantoms, tmp_path / "run", method_config("simclr", 2))
    assert [r["phase"] for r in rows] == ["simclr"] * 2 and res.epochs_run == 2
    saved = load_torch(tmp_path / "run" / CHECKPOINT)
    assert set(saved["pretrain"]) == {"head", "optimizer"} and "optimizer" not in saved   # no rounds, no backbone SGD
    assert len(trained.assignments) == 56 and trained.centroids.shape[0] == 7


def test_frozen_pretrained_features_are_clustered_without_training(phantoms, tmp_path):
    # The "pretrained network + k-means" baseline (docs/methods.md): `simclr` with no pre-training
    # epochs clusters the features of the weights it was given, which it must not change.
    torch.manual_seed(11)
    donor = torchvision.models.resnet18()  # stands in for ImageNet weights; its fc is dropped on load
    torch.save(donor.state_dict(), tmp_path / "weights.pt")
    cfg = method_config("simclr", 2, "selfsup.epochs=0", f"model.weights={tmp_path / 'weights.pt'}",
                        "model.sobel=false", "train.device=cpu")
    res, _, trained = train_method(phantoms, tmp_path / "run", cfg)
    assert res.epochs_run == 0 and res.history == []
    loaded = trained.model.state_dict()
    torch.testing.assert_close(loaded["backbone.layer4.1.conv2.weight"], donor.layer4[1].conv2.weight.detach())
    torch.testing.assert_close(loaded["backbone.conv1.weight"], donor.conv1.weight.detach().sum(1, keepdim=True))
    assert len(trained.assignments) == 56 and len(set(trained.assignments.tolist())) == 7


def test_study_mates_make_the_second_views_from_other_films_of_the_study(phantoms, tmp_path, caplog, monkeypatch):
    # Phantom studies hold several views of one part; with p = 1 every film that has a study mate
    # gets its second view from one of them, and that film is what the second augmentation sees.
    pairs, augmented = [], []
    second_films, augment = TwoViewPretraining.second_films, RadiographAugment.__call__

    def spy_pairs(self, batch, source, gen):
        first, second = second_films(self, batch, source, gen)
        pairs.append((batch[1].clone(), first, second))
        return first, second

    def spy_augment(self, x, *args, **kwargs):
        augmented.append(x.clone())
        return augment(self, x, *args, **kwargs)

    monkeypatch.setattr(TwoViewPretraining, "second_films", spy_pairs)
    monkeypatch.setattr(RadiographAugment, "__call__", spy_augment)
    cfg = method_config("simclr", 0, "train.device=cpu", "selfsup.study_pair_p=1.0")
    data = prepared(phantoms, tmp_path, cfg)
    studies = study_index(data.records)
    pixels = torch.from_numpy(data.images()).unsqueeze(1)
    with caplog.at_level("INFO", logger="bonecluster"):
        res = DeepClusterEngine(cfg, tmp_path / "run", progress=False).fit(data)
    announced = [r.getMessage() for r in caplog.records if "study mate" in r.getMessage()]
    with_mates = int((np.bincount(studies)[studies] >= 2).sum())
    assert announced == [f"selfsup.study_pair_p=1: {with_mates} of 56 films have a study mate"] and with_mates > 0
    assert res.epochs_run == 2 and len(pairs) >= 2 and len(augmented) == 2 * len(pairs)
    for (positions, first, second), x1, x2 in zip(pairs, augmented[0::2], augmented[1::2]):
        assert torch.equal(first, pixels[positions])
        assert torch.equal(x1, first.float() / 255) and torch.equal(x2, second.float() / 255)
        for pos, film in zip(positions.tolist(), second):
            matches = [j for j in range(56) if torch.equal(pixels[j], film)]
            assert matches and pos not in matches and all(studies[j] == studies[pos] for j in matches)


def test_study_mates_without_two_view_epochs_warn_that_they_do_nothing(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="bonecluster"):
        DeepClusterEngine(method_config("deepcluster", 1, "selfsup.study_pair_p=0.5"), tmp_path / "run",
                          progress=False)
    assert any("study_pair_p=0.5 does nothing here: method deepcluster" in r.getMessage() for r in caplog.records)


def test_a_study_pair_probability_outside_zero_to_one_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"selfsup.study_pair_p must be in \[0, 1\], got 1.5"):
        DeepClusterEngine(method_config("simclr", 0, "selfsup.study_pair_p=1.5"), tmp_path / "run", progress=False)


def test_multi_crop_adds_small_views_of_the_same_films_and_trains(phantoms, tmp_path, monkeypatch):
    # selfsup.local_crops: L extra views per film at half the size, each a crop of 5-25% of the film
    seen = []
    local_views = TwoViewPretraining.local_views

    def spy(self, x, gen):
        views = local_views(self, x, gen)
        seen.append((x.shape, views.shape))
        return views

    monkeypatch.setattr(TwoViewPretraining, "local_views", spy)
    # float32: the test is about the views. Their bfloat16 path (16-px small views: a CPU's bfloat16
    # weight gradient is wrong there, so they train in float32) is tested in test_divergence.py.
    cfg = method_config("simclr", 0, "train.device=cpu", "train.cpu_amp=false", "selfsup.local_crops=3")
    res, rows, trained = train_method(phantoms, tmp_path / "run", cfg)
    assert res.epochs_run == 2 and all(np.isfinite(float(r["loss"])) for r in rows)
    assert seen and all(v == (3 * x[0], 1, x[2] // 2, x[3] // 2) for x, v in seen)
    assert len(trained.assignments) == 56


def test_multi_crop_is_refused_where_it_cannot_run_and_warns_where_it_does_nothing(tmp_path, caplog):
    for extra, message in ((["method=dino"], "multi-crop views work with SimCLR's pre-training only .*, not dino"),
                           (["selfsup.local_scale=[0.3, 0.1]"], "local_scale a \\(low, high\\) share"),
                           (["selfsup.local_size=-8"], "local_size >= 0")):
        cfg = method_config("simclr", 0, "selfsup.local_crops=2", *extra)
        with pytest.raises(ValueError, match=message):
            DeepClusterEngine(cfg, tmp_path / "run", progress=False)
    with caplog.at_level("WARNING", logger="bonecluster"):
        DeepClusterEngine(method_config("deepcluster", 1, "selfsup.local_crops=2"), tmp_path / "dc", progress=False)
    assert any("local_crops=2 does nothing here: method deepcluster" in r.getMessage() for r in caplog.records)


def test_multi_crop_refuses_a_three_number_scale_and_a_fixed_size_backbone(tmp_path):
    with pytest.raises(ValueError, match="local_scale a \\(low, high\\) share"):
        DeepClusterEngine(method_config("simclr", 0, "selfsup.local_crops=2", "selfsup.local_scale=[0.1, 0.2, 0.3]"),
                          tmp_path / "run", progress=False)
    vit = ["model.arch=timm/test_vit", "model.sobel=false", "train.device=cpu", "selfsup.local_crops=2"]
    pytest.importorskip("timm")
    with pytest.raises(ValueError, match="may be built for 32 px only"):
        DeepClusterEngine(method_config("simclr", 0, *vit), tmp_path / "vit", progress=False)
