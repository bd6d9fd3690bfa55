"""`bonecluster train --stages 1` end to end on tiny phantoms."""

from __future__ import annotations

import json

import pytest

from bonecluster.cli import main
from bonecluster.data.phantoms import generate_phantoms
from tests.integration.test_engine import TINY

SETS = [a for s in TINY + ["train.epochs=2"] for a in ("--set", s)]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("ph")
    generate_phantoms(root / "ph", n=42, size=64, seed=5, progress=False, workers=1)
    return root / "ph"


def test_train_stage1_writes_a_complete_run_folder(phantoms, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(phantoms), "--out", str(run), "--stages", "1", "--quiet", *SETS]) == 0
    out = capsys.readouterr().out
    assert "stage 1: 42 images, k=7, 2 epochs" in out
    assert "Hungarian accuracy" in out and "labels not used in training" in out
    for name in ("config.yaml", "data.json", "skipped.csv", "stage1/model.pt", "stage1/checkpoint.pt",
                 "stage1/metrics.csv", "stage1/config.yaml", "stage1/summary.json"):
        assert (run / name).is_file(), name
    summary = json.loads((run / "stage1" / "summary.json").read_text())
    assert sum(summary["cluster_sizes"]) == 42
    assert 0 <= summary["scored_on_labels"]["accuracy_hungarian"] <= 1
    # a finished run resumes to the same end without training again
    assert main(["train", str(phantoms), "--out", str(run), "--resume", "--quiet", *SETS]) == 0
    assert json.loads((run / "stage1" / "summary.json").read_text())["cluster_sizes"] == summary["cluster_sizes"]


def test_stage2_is_refused_clearly_until_it_exists(phantoms, tmp_path, capsys):
    assert main(["train", str(phantoms), "--out", str(tmp_path / "r"), "--stages", "1,2", *SETS]) == 1
    assert "stage 2" in capsys.readouterr().err


def test_bad_override_names_the_key(phantoms, tmp_path, capsys):
    assert main(["train", str(phantoms), "--out", str(tmp_path / "r"), "--set", "train.epoch=3"]) == 1
    assert "train.epoch" in capsys.readouterr().err


def test_resume_without_checkpoint_fails_clearly(phantoms, tmp_path, capsys):
    assert main(["train", str(phantoms), "--out", str(tmp_path / "r"), "--resume", "--quiet", *SETS]) == 1
    assert "no checkpoint" in capsys.readouterr().err


def test_demo_runs_end_to_end_small(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--n", "28", *SETS]) == 0
    out = capsys.readouterr().out
    assert "stage 1 (body parts): 28 images -> 7 clusters" in out and "Hungarian accuracy" in out
    assert (tmp_path / "demo" / "demo.json").is_file()
