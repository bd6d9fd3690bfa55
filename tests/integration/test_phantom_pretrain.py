"""`bonecluster pretrain-phantoms` and `model.weights=phantoms` in a training run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from bonecluster.checkpoint import FINAL_MODEL
from bonecluster.cli import main
from bonecluster.data import PreparedDataset
from bonecluster.data.phantoms import generate_phantoms
from bonecluster.phantom_pretrain import films_digest
from tests.integration.test_engine import TINY

PRETRAIN = ["phantoms.films=48", "phantoms.epochs=1", "phantoms.batch_size=16", "phantoms.validation_films=14"]


def _sets(items):
    return [a for s in items for a in ("--set", s)]


def test_the_cli_writes_weights_a_run_can_start_from(tmp_path, capsys, single_torch_thread):
    out = tmp_path / "phantoms.pt"
    assert main(["pretrain-phantoms", "--out", str(out), "--films", "48", "--epochs", "1", "--quiet",
                 *_sets(TINY + PRETRAIN[2:])]) == 0
    printed = capsys.readouterr().out
    assert f"model.weights={out}" in printed and "part " in printed
    meta = json.loads((tmp_path / "phantoms.pt.json").read_text())
    assert meta["phantoms"]["films"] == 48 and meta["data"]["size"] == 32
    generate_phantoms(tmp_path / "ph", n=28, size=64, seed=3, progress=False, workers=1)
    run = tmp_path / "run"
    assert main(["train", str(tmp_path / "ph"), "--out", str(run), "--stages", "1", "--quiet",
                 *_sets(TINY + ["train.epochs=1", f"model.weights={out}"])]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["weights"] == str(out)


def test_model_weights_phantoms_pretrains_once_and_the_run_names_the_file(tmp_path, single_torch_thread):
    generate_phantoms(tmp_path / "ph", n=28, size=64, seed=3, progress=False, workers=1)
    sets = _sets(TINY + PRETRAIN + ["train.epochs=1", "model.weights=phantoms", f"data.cache={tmp_path / 'cache'}"])
    assert main(["train", str(tmp_path / "ph"), "--out", str(tmp_path / "run1"), "--stages", "1", "--quiet", *sets]) == 0
    files = list((tmp_path / "cache" / "phantom-weights").glob("*.pt"))
    assert len(files) == 1
    weights = yaml.safe_load((tmp_path / "run1" / "config.yaml").read_text())["model"]["weights"]
    assert weights == str(files[0].resolve())
    stamp = files[0].stat().st_mtime_ns
    # a second run with the same settings reuses the file; a new network starts from it
    assert main(["train", str(tmp_path / "ph"), "--out", str(tmp_path / "run2"), "--stages", "1", "--quiet", *sets]) == 0
    assert files[0].stat().st_mtime_ns == stamp
    saved = torch.load(files[0], weights_only=True)["model"]
    assert "backbone.conv1.weight" in saved


def test_stage2_weights_phantoms_scores_each_part_with_the_untrained_phantom_network(tmp_path, single_torch_thread):
    """The `cpu` preset's stage 2: phantom weights of its own, no epochs; stage 1 keeps its random start."""
    generate_phantoms(tmp_path / "ph", n=28, size=64, seed=3, progress=False, workers=1)
    cache = tmp_path / "cache"
    sets = _sets(TINY + PRETRAIN + ["train.epochs=1", "stage2.weights=phantoms", "stage2.epochs=0", "stage2.k=2",
                                    "stage2.min_images=4", f"data.cache={cache}"])
    run = tmp_path / "run"
    assert main(["train", str(tmp_path / "ph"), "--out", str(run), "--quiet", *sets]) == 0
    files = list((cache / "phantom-weights").glob("*.pt"))
    assert len(files) == 1
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["stage2"]["weights"] == str(files[0].resolve()) and config["model"]["weights"] == "none"
    backbone = torch.load(files[0], weights_only=True)["model"]
    stage1 = torch.load(run / "stage1" / FINAL_MODEL, weights_only=True)
    parts = sorted((run / "stage2").glob(f"*/{FINAL_MODEL}"))
    assert len(parts) == 7
    key = "backbone.conv1.weight"
    for part in parts:   # untrained: every part network is the phantom backbone itself
        assert torch.equal(torch.load(part, weights_only=True)["model"][key], backbone[key]), part
    assert not torch.equal(stage1["model"][key], backbone[key])   # stage 1 did not start from it
    summary = json.loads((run / "stage2" / "summary.json").read_text())
    assert all(s["epochs_run"] == 0 and s["networks"] == 1 for s in summary.values())
    # stage 1 alone asks for no stage-2 pre-training
    assert main(["train", str(tmp_path / "ph"), "--out", str(tmp_path / "s1"), "--stages", "1", "--quiet",
                 *_sets(TINY + PRETRAIN + ["train.epochs=1", "stage2.weights=phantoms",
                                           f"data.cache={tmp_path / 'cache2'}"])]) == 0
    assert not (tmp_path / "cache2" / "phantom-weights").exists()
    assert yaml.safe_load((tmp_path / "s1" / "config.yaml").read_text())["stage2"]["weights"] == "phantoms"


def test_a_missing_stage2_weights_file_fails_before_decoding(tmp_path, capsys):
    generate_phantoms(tmp_path / "ph", n=28, size=64, seed=3, progress=False, workers=1)
    code = main(["train", str(tmp_path / "ph"), "--out", str(tmp_path / "run"), "--quiet",
                 *_sets(TINY + [f"stage2.weights={tmp_path / 'nope.pt'}"])])
    err = capsys.readouterr().err
    assert code != 0 and "stage2.weights" in err and "nope.pt" in err and "model.weights" not in err
    assert not (tmp_path / "run" / "data.json").exists()
    # a run without stage 2 does not read it; a bad stage-2 setting fails before any pre-training
    assert main(["train", str(tmp_path / "ph"), "--out", str(tmp_path / "s1"), "--stages", "1", "--quiet",
                 *_sets(TINY + ["train.epochs=1", f"stage2.weights={tmp_path / 'nope.pt'}"])]) == 0
    code = main(["train", str(tmp_path / "ph"), "--out", str(tmp_path / "bad"), "--quiet",
                 *_sets(TINY + ["stage2.weights=phantoms", "stage2.networks=0", f"data.cache={tmp_path / 'c'}"])])
    assert code != 0 and "stage2.networks" in capsys.readouterr().err
    assert not (tmp_path / "c").exists() and not (tmp_path / "bad" / "data.json").exists()


def test_both_networks_on_phantoms_share_one_pretrained_file_and_stage2_alone_skips_stage_1s(tmp_path,
                                                                                               single_torch_thread):
    generate_phantoms(tmp_path / "ph", n=28, size=64, seed=3, progress=False, workers=1)
    cache = tmp_path / "cache"
    base = TINY + PRETRAIN + ["train.epochs=1", "stage2.epochs=0", "stage2.k=2", "stage2.min_images=4",
                              f"data.cache={cache}"]
    assert main(["train", str(tmp_path / "ph"), "--out", str(tmp_path / "run"), "--quiet",
                 *_sets(base + ["model.weights=phantoms", "stage2.weights=phantoms"])]) == 0
    files = list((cache / "phantom-weights").glob("*.pt"))
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert len(files) == 1 and config["model"]["weights"] == config["stage2"]["weights"] == str(files[0].resolve())
    # stage 2 alone with its own weights: stage 1's network is never built, so it is not pre-trained
    other = tmp_path / "cache2"
    assert main(["train", str(tmp_path / "ph"), "--out", str(tmp_path / "s2"), "--stages", "2", "--quiet",
                 *_sets(base[:-1] + [f"data.cache={other}", "model.weights=phantoms",
                                     f"stage2.weights={files[0]}"])]) == 0
    assert not (other / "phantom-weights").exists()
    assert yaml.safe_load((tmp_path / "s2" / "config.yaml").read_text())["model"]["weights"] == "phantoms"


def test_the_cli_adapts_to_real_films_it_is_given_and_refuses_adapt_without_them(tmp_path, capsys,
                                                                                  single_torch_thread):
    generate_phantoms(tmp_path / "films", n=20, size=64, seed=5, progress=False, workers=1)   # stand-ins, unlabelled use
    out = tmp_path / "adapted.pt"
    assert main(["pretrain-phantoms", "--out", str(out), "--films", "48", "--epochs", "1", "--quiet",
                 "--adapt-to", str(tmp_path / "films"), *_sets(TINY + PRETRAIN[2:])]) == 0
    assert "adapting to 20 real films" in capsys.readouterr().out
    meta = json.loads((tmp_path / "adapted.pt.json").read_text())
    assert meta["phantoms"]["adapt"] == 1.0 and meta["adapted_to"]["films"] == 20
    assert "domain_accuracy" in meta["history"][0]
    with pytest.raises(SystemExit, match="--adapt-to DATA"):
        main(["pretrain-phantoms", "--out", str(tmp_path / "no.pt"), "--quiet",
              *_sets(TINY + PRETRAIN + ["phantoms.adapt=0.5"])])
    with pytest.raises(SystemExit, match="phantoms.adapt=0 switches adaptation off"):
        main(["pretrain-phantoms", "--out", str(tmp_path / "no.pt"), "--quiet", "--adapt-to", str(tmp_path / "films"),
              *_sets(TINY + PRETRAIN + ["phantoms.adapt=0"])])
    assert not (tmp_path / "no.pt").exists()


def test_a_run_with_adapt_pretrains_on_its_own_decoded_films_before_training(tmp_path, single_torch_thread):
    generate_phantoms(tmp_path / "ph", n=28, size=64, seed=3, progress=False, workers=1)
    cache = tmp_path / "cache"
    base = TINY + PRETRAIN + ["train.epochs=1", "stage2.epochs=0", "stage2.k=2", "stage2.min_images=4",
                              f"data.cache={cache}", "phantoms.adapt=1", "stage2.size=48"]
    assert main(["train", str(tmp_path / "ph"), "--out", str(tmp_path / "run"), "--quiet",
                 *_sets(base + ["model.weights=phantoms", "stage2.weights=phantoms"])]) == 0
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    stage1, stage2 = Path(config["model"]["weights"]), Path(config["stage2"]["weights"])
    assert stage1.parent == stage2.parent == (cache / "phantom-weights").resolve()
    films = PreparedDataset.load(tmp_path / "run" / "data.json")
    for weights, size in ((stage1, 32), (stage2, 48)):   # each adapted to the run's 28 films at its stage's size
        meta = json.loads(weights.with_name(weights.name + ".json").read_text())
        assert meta["adapted_to"]["films"] == 28 and meta["data"]["size"] == size
    assert json.loads(stage1.with_name(stage1.name + ".json").read_text())["adapted_to"]["digest"] == \
        films_digest(np.asarray(films.images()))


def test_under_torchrun_rank_0_adapts_once_and_every_rank_trains_from_its_file(tmp_path):
    """Two CPU processes (gloo): rank 0 decodes, pre-trains against the films and hands the file's
    path to rank 1, which never reads the films to find it."""
    generate_phantoms(tmp_path / "ph", n=28, size=64, seed=3, progress=False, workers=1)
    cache = tmp_path / "cache"
    sets = _sets(TINY + PRETRAIN + ["train.epochs=1", "train.device=cpu", "model.weights=phantoms",
                                    "phantoms.adapt=1", f"data.cache={cache}"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "bonecluster", "train", str(tmp_path / "ph"), "--out", str(tmp_path / "run"), "--stages", "1",
           "--quiet", *sets]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    files = list((cache / "phantom-weights").glob("*.pt"))
    assert len(files) == 1
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]["weights"] == str(files[0].resolve())
    assert json.loads(files[0].with_name(files[0].name + ".json").read_text())["adapted_to"]["films"] == 28
