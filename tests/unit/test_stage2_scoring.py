"""Stage 2's patch vectors: PatchCore's neighbourhood average (stage2.patch_pool) and coreset bank
(stage2.patch_coreset) in bonecluster.stage2.scoring."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from bonecluster.anomaly import greedy_coreset
from bonecluster.checkpoint import TrainedClusters
from bonecluster.cluster import fit_pca_whitening, l2_normalise
from bonecluster.config import Config
from bonecluster.models import DeepClusterNet
from bonecluster.stage2.scoring import knn_fit, part_features, patch_vectors

SIZE = 48


def test_patch_vectors_without_pool_are_the_normalised_positions():
    mid = torch.randn(2, 4, 3, 5)
    out = patch_vectors(mid, 1)
    assert out.shape == (2, 15, 4)
    assert torch.allclose(out[1, 7], mid[1, :, 1, 2] / mid[1, :, 1, 2].norm())


@pytest.mark.parametrize("pool", [0, 2])
def test_an_even_or_empty_pool_is_refused(pool):
    with pytest.raises(ValueError, match="odd"):
        patch_vectors(torch.zeros(1, 2, 3, 3), pool)


def test_a_3x3_pool_averages_each_position_with_the_neighbours_on_the_map():
    """One channel of ones at the centre of a 3 x 3 map and a second channel of ones everywhere:
    every position's 3 x 3 window holds the centre, so channel 0 is 1 / (positions in the window)."""
    mid = torch.zeros(1, 2, 3, 3)
    mid[0, 0, 1, 1] = 1.0
    mid[0, 1] = 1.0
    out = patch_vectors(mid, 3).reshape(3, 3, 2)
    window = torch.tensor([[4.0, 6.0, 4.0], [6.0, 9.0, 6.0], [4.0, 6.0, 4.0]])   # corners see 4 positions
    expected = torch.stack([1.0 / window, torch.ones(3, 3)], dim=-1)
    assert torch.allclose(out, expected / expected.norm(dim=-1, keepdim=True))


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (8, SIZE, SIZE), dtype=np.uint8)


@pytest.fixture(scope="module")
def network(images):
    """One untrained part network and its PCA, built once; each test sets its own stage-2 settings."""
    torch.manual_seed(0)
    model = DeepClusterNet("resnet18", sobel=True, num_clusters=2).eval()
    with torch.no_grad():
        feats = model.features(torch.from_numpy(images).float().div(255).unsqueeze(1))
    return TrainedClusters(model, fit_pca_whitening(feats, dim=4), l2_normalise(torch.randn(2, 4)),
                           np.zeros(len(images), np.int64), Config())


def _trained(network, **stage2):
    return replace(network, cfg=replace(network.cfg, stage2=replace(network.cfg.stage2, **stage2)))


def test_part_features_pool_the_map(images, network, single_torch_thread):
    trained = _trained(network)
    _, a = part_features(trained, images)
    _, b = part_features(trained, images, pool=3)
    assert a.shape == b.shape and not torch.allclose(a, b)
    with torch.no_grad():
        _, mid, _ = trained.model.pooled_and_maps(torch.from_numpy(images).float().div(255).unsqueeze(1))
    assert torch.allclose(b, patch_vectors(mid, 3), atol=1e-5)


def test_a_pooled_bank_is_queried_pooled_and_the_pool_survives_saving(images, network, tmp_path, single_torch_thread):
    """fit_part_anomaly keeps stage2.patch_pool with the bank; new films are scored with it, also after
    a save and load (a bank of pooled patches queried with unpooled ones would score everything odd)."""
    from bonecluster.stage2.scoring import PartAnomaly
    from bonecluster.stage2.train import fit_part_anomaly

    from bonecluster.data.records import Record

    class Films:   # what fit_part_anomaly reads of a PreparedDataset: two films per study
        def __init__(self):
            self.records = [Record(f"f{i}.png", patient=f"p{i // 2}", study=f"s{i // 2}") for i in range(len(images))]

        def images(self):
            return images

        def __len__(self):
            return len(images)

    trained = _trained(network, score="patch", patch_pool=3, refine_rounds=0)
    anomaly = fit_part_anomaly(trained, Films(), trained.cfg.stage2, seed=0, batch_size=4)
    assert anomaly.patch_pool == 3
    _, pooled = part_features(trained, images[:3], pool=3)
    expected = anomaly.knn_parts(trained, None, pooled)["patch"]
    assert torch.allclose(anomaly.score(trained, images[:3]), expected)
    anomaly.save(tmp_path / "anomaly.pt")
    assert torch.allclose(PartAnomaly.load(tmp_path / "anomaly.pt").score(trained, images[:3]), expected)


def test_the_coreset_bank_keeps_its_share_of_the_patches(images, network, single_torch_thread):
    trained = _trained(network, score="patch", patch_coreset=0.25)
    groups = torch.arange(len(images))
    _, _, _, _, bank = knn_fit(trained, images, groups, trained.cfg.stage2, seed=3, batch_size=4)
    _, patches = part_features(trained, images)
    every = patches.reshape(-1, patches.shape[2])
    size = round(0.25 * len(every))
    assert bank.shape == (size, every.shape[1])
    assert torch.equal(bank, every[greedy_coreset(every, size, seed=3).sort().values])
    plain = _trained(network, score="patch")
    _, _, _, _, whole = knn_fit(plain, images, groups, plain.cfg.stage2, seed=3, batch_size=4)
    assert len(whole) == len(every)   # no coreset: every patch (under patch_bank_size)


def test_a_coreset_of_one_study_is_refused(images, network, single_torch_thread):
    """A bank whose patches all come from one study leaves nothing for that study's films to be
    compared with (each is scored without its own study), so it is refused by name."""
    trained = _trained(network, score="patch", patch_coreset=0.001)   # one patch of 72
    with pytest.raises(ValueError, match="stage2.patch_coreset=0.001 keeps 1 patches, all of one study"):
        knn_fit(trained, images, torch.arange(len(images)), trained.cfg.stage2, seed=0, batch_size=4)
