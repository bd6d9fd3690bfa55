from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bonecluster.config import Config, apply_override, config_from_dict, load_config, preset_names, to_yaml


def test_presets_load_and_differ():
    cpu, paper = load_config("cpu"), load_config("paper")
    assert cpu.data.size == 64 and paper.data.size == 224
    cpu_real, gpu_real = load_config("cpu-real"), load_config("gpu-real")
    assert cpu_real.method == "moco" and gpu_real.method == "simclr"   # gpu-real is not measured yet
    assert gpu_real.data.size > cpu_real.data.size and gpu_real.selfsup.epochs > cpu_real.selfsup.epochs


def test_every_preset_is_documented_and_offered():
    names = preset_names()
    assert {"cpu", "cpu-real", "gpu-real", "paper"} <= set(names)
    table = (Path(__file__).parents[2] / "docs" / "presets.md").read_text()
    for name in names:
        assert f"| `{name}`" in table, f"preset {name} has no row in docs/presets.md"
        load_config(name)
    listed = "--preset " + "|".join(names)   # the hand-written usage lines
    for page in ("README.md", "docs/methods.md", "docs/presets.md"):
        assert listed in (Path(__file__).parents[2] / page).read_text(), f"{page} does not list {listed}"


def test_override_types_are_checked():
    cfg = apply_override(Config(), "data.size=96")
    assert cfg.data.size == 96
    assert apply_override(cfg, "data.pct_low=1").data.pct_low == 1.0
    with pytest.raises(ValueError, match="expected int"):
        apply_override(cfg, "data.size=big")
    with pytest.raises(ValueError, match="unknown config key 'data.sise'"):
        apply_override(cfg, "data.sise=3")
    with pytest.raises(ValueError, match="key=value"):
        apply_override(cfg, "data.size")


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="cpu"):
        load_config("fast")


def test_file_then_overrides_last_wins(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  size: 80\n  fit: letterbox\n")
    cfg = load_config("cpu", f, ["data.size=72"])
    assert (cfg.data.size, cfg.data.fit) == (72, "letterbox")


def test_yaml_round_trip():
    cfg = load_config("cpu", overrides=["seed=3"])
    assert config_from_dict(yaml.safe_load(to_yaml(cfg))) == cfg


def test_cli_method_choices_are_the_registered_methods():
    from bonecluster.cli import build_parser
    from bonecluster.methods import method_names

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    method = next(a for a in train._actions if a.dest == "method")
    assert tuple(method.choices) == method_names() and method_names()[0] == "deepcluster"
    assert {"deepcluster", "sela", "simclr", "simclr-deepcluster", "simclr-scan", "dino", "simclr-phantoms"} <= set(method_names())


def test_method_and_selfsup_keys_override():
    from bonecluster.config import load_config

    cfg = load_config("cpu", overrides=["method=simclr", "selfsup.epochs=3", "selfsup.augment.rotation_degrees=5"])
    assert cfg.method == "simclr" and cfg.selfsup.epochs == 3 and cfg.selfsup.augment.rotation_degrees == 5.0
