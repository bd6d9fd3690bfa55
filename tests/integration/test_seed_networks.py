"""`stage2.networks`: several stage-2 networks per part seed one refinement (end to end)."""

from __future__ import annotations

import json

import pytest
import torch

from bonecluster.cli import main
from bonecluster.config import config_from_dict, read_yaml
from bonecluster.data import PreparedDataset
from bonecluster.checkpoint import CHECKPOINT, FINAL_MODEL, TrainedClusters
from bonecluster.stage2.parts import group_by_part
from bonecluster.stage2.scoring import ANOMALY, PartAnomaly, knn_seed_scores
from bonecluster.stage2.train import SEED_SCORES, fit_part_anomaly, saved_extra_seeds
from tests.integration.conftest import STAGE2_SETS, train_stage2_only

NETWORKS = ["--set", "stage2.networks=2", "--set", "stage2.refine_rounds=1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_stage2_only(tmp_path_factory.mktemp("nets"), *NETWORKS)


def test_each_part_keeps_the_extra_networks_scores_only(run):
    summary = json.loads((run / "run" / "stage2" / "summary.json").read_text())
    data = PreparedDataset.load(run / "run" / "data.json")
    for part, positions in group_by_part(data).items():
        folder = run / "run" / "stage2" / part
        assert summary[part]["networks"] == 2
        extra = folder / "seed-net-1"
        saved = torch.load(extra / SEED_SCORES, weights_only=True)
        assert saved["seed"] == 1 and saved["scores"].shape == (len(positions),) == (saved["n_images"],)
        assert not (extra / CHECKPOINT).exists() and not (extra / FINAL_MODEL).exists()
        assert (folder / FINAL_MODEL).exists()   # network 0 stays whole: it is the part's model


def test_the_refinement_starts_from_both_networks(run):
    """Refitting with network 0's seed alone must give another scorer than the stored one, and
    refitting with both seeds must give the stored one back."""
    data = PreparedDataset.load(run / "run" / "data.json")
    cfg = config_from_dict(read_yaml(run / "run" / "config.yaml"))
    part, positions = next(iter(group_by_part(data).items()))
    folder = run / "run" / "stage2" / part
    subset, trained = data.subset(positions), TrainedClusters.load(folder)
    s2cfg = config_from_dict(read_yaml(folder / "config.yaml"))
    stored = PartAnomaly.load(folder / ANOMALY)
    (extra,) = saved_extra_seeds(folder, len(positions), s2cfg.stage2)
    fit = {"seed": s2cfg.seed, "batch_size": s2cfg.train.feature_batch_size}
    both = fit_part_anomaly(trained, subset, s2cfg.stage2, (extra,), **fit)
    alone = fit_part_anomaly(trained, subset, s2cfg.stage2, **fit)
    assert torch.allclose(both.train_scores, stored.train_scores, atol=1e-6)
    assert not torch.allclose(alone.train_scores, stored.train_scores, atol=1e-3)
    assert not torch.equal(knn_seed_scores(trained, subset, s2cfg.stage2, **fit), extra)   # two different networks
    assert cfg.stage2.networks == 2
    with pytest.raises(FileNotFoundError, match="seed-net-1"):   # scores for other images are refused
        saved_extra_seeds(folder, len(positions) + 1, s2cfg.stage2)


def test_resume_reuses_finished_seed_scores(run, tmp_path):
    data = PreparedDataset.load(run / "run" / "data.json")
    part = next(iter(group_by_part(data)))
    stamp = (run / "run" / "stage2" / part / "seed-net-1" / SEED_SCORES).stat().st_mtime_ns
    sets = [a for s in STAGE2_SETS for a in ("--set", s)]
    assert main(["train", str(run / "ph" / "train"), "--out", str(run / "run"), "--stages", "2", "--quiet",
                 "--resume", *sets, *NETWORKS]) == 0
    assert (run / "run" / "stage2" / part / "seed-net-1" / SEED_SCORES).stat().st_mtime_ns == stamp


def test_bad_network_counts_fail_before_training(run, tmp_path, capsys):
    for bad in (["stage2.networks=0"], ["stage2.networks=1.5"]):
        sets = [a for s in STAGE2_SETS + bad for a in ("--set", s)]
        assert main(["train", str(run / "ph" / "train"), "--out", str(tmp_path / "r"), "--stages", "2",
                     "--quiet", *sets]) != 0
        assert "stage2.networks" in capsys.readouterr().err
        assert not (tmp_path / "r" / "stage2").exists()


def test_without_refinement_one_network_is_trained_and_the_user_is_told(run, tmp_path, caplog):
    sets = [a for s in STAGE2_SETS + ["stage2.networks=2", "stage2.refine_rounds=0"] for a in ("--set", s)]
    assert main(["train", str(run / "ph" / "train"), "--out", str(tmp_path / "r"), "--stages", "2",
                 "--quiet", *sets]) == 0
    assert "stage2.networks=2 is ignored" in caplog.text
    assert not list((tmp_path / "r" / "stage2").glob("*/seed-net-1"))
    summary = json.loads((tmp_path / "r" / "stage2" / "summary.json").read_text())
    assert {s["networks"] for s in summary.values()} == {1}


def test_resume_removes_a_seed_network_left_by_a_kill_after_its_scores_were_written(tmp_path):
    # A kill between writing seed_scores.pt and deleting the network leaves both; --resume reuses the
    # scores and must then delete the network, as the uninterrupted run does (tests/integration/test_kill.py).
    from bonecluster.config import load_config
    from bonecluster.checkpoint import save_torch
    from bonecluster.stage2.train import _extra_seed_scores

    folder = tmp_path / "seed-net-1"
    folder.mkdir()
    scores = torch.arange(5, dtype=torch.float32)
    save_torch(folder / SEED_SCORES, {"scores": scores, "n_images": 5, "seed": 1})
    for name in (CHECKPOINT, FINAL_MODEL):
        (folder / name).write_bytes(b"left by the kill")
    cfg = load_config("cpu", overrides=["stage2.networks=2", "stage2.refine_rounds=4", "stage2.epochs=1"])
    extra, seconds = _extra_seed_scores(list(range(5)), tmp_path, cfg, resume=True, progress=False)
    assert len(extra) == 1 and torch.equal(extra[0], scores) and seconds == 0.0
    assert sorted(p.name for p in folder.iterdir()) == [SEED_SCORES]
