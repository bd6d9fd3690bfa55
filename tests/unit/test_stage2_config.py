"""Stage 2's engine settings: stage2_config, stage2.weights, check_stage2 and the seed networks."""

from __future__ import annotations

import logging

import pytest

from bonecluster.config import load_config
from bonecluster.stage2.train import _seed_networks, check_stage2, stage2_config, stage2_weights


def test_same_keeps_stage_1s_start_and_any_other_value_replaces_it():
    cfg = load_config("cpu", overrides=["model.weights=start.pt", "stage2.weights=same", "stage2.k=4",
                                        "stage2.epochs=3"])
    s2 = stage2_config(cfg)
    assert s2.model.weights == "start.pt" and s2.cluster.k == 4 and s2.train.epochs == 3
    assert cfg.model.weights == "start.pt"   # the stage-1 config is not changed in place
    for value in ("Same", " SAME "):
        assert stage2_config(load_config("cpu", overrides=["model.weights=a.pt", f"stage2.weights={value}"])
                             ).model.weights == "a.pt"
    assert stage2_config(load_config("cpu", overrides=["stage2.weights=b.pt"])).model.weights == "b.pt"
    with pytest.raises(ValueError, match="stage2.weights is empty"):
        stage2_weights(load_config("cpu", overrides=["stage2.weights= "]))


def test_the_cpu_preset_scores_parts_with_untrained_phantom_networks_and_the_library_default_trains_them():
    s2 = load_config("cpu").stage2
    assert (s2.weights, s2.epochs, s2.networks) == ("phantoms", 0, 1)
    default = load_config(None).stage2
    assert (default.weights, default.epochs, default.networks) == ("same", 10, 3)


def test_extra_seed_networks_only_where_something_is_trained_and_refined():
    cfg = load_config("cpu", overrides=["stage2.networks=3", "stage2.epochs=2", "stage2.refine_rounds=1"]).stage2
    assert _seed_networks(cfg) == 3
    assert _seed_networks(load_config("cpu", overrides=["stage2.networks=3", "stage2.epochs=0"]).stage2) == 1
    assert _seed_networks(load_config("cpu", overrides=["stage2.networks=3", "stage2.epochs=2",
                                                        "stage2.refine_rounds=0"]).stage2) == 1


@pytest.mark.parametrize("setting, message", [("stage2.networks=0", "stage2.networks"),
                                              ("stage2.epochs=-1", "stage2.epochs"),
                                              ("stage2.refine_C=0", "stage2.refine_C"),
                                              ("stage2.probe_mix=2", "stage2.probe_mix"),
                                              ("stage2.patch_pool=2", "stage2.patch_pool"),
                                              ("stage2.patch_pool=0", "stage2.patch_pool"),
                                              ("stage2.patch_coreset=1", "stage2.patch_coreset"),
                                              ("stage2.patch_coreset=-0.1", "stage2.patch_coreset")])
def test_check_stage2_names_the_setting_out_of_range(setting, message):
    with pytest.raises(ValueError, match=message):
        check_stage2(load_config("cpu", overrides=[setting]))
    check_stage2(load_config("cpu"))


def test_several_networks_without_epochs_warn_that_they_are_one(caplog, tmp_path):
    from bonecluster.stage2.train import train_stage2

    class NoParts:   # train_stage2 warns before it groups any image
        records = []
        pre = load_config("cpu").data.preprocess()   # decoded at stage 2's size already

    cfg = load_config("cpu", overrides=["stage2.networks=3", "stage2.epochs=0", "stage2.refine_rounds=2"])
    with caplog.at_level(logging.WARNING, logger="bonecluster"):
        assert train_stage2(NoParts(), tmp_path, cfg, stage1_names=[]) == {}
    assert "ignored with stage2.epochs=0" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bonecluster"):
        train_stage2(NoParts(), tmp_path, load_config("cpu", overrides=["stage2.networks=3", "stage2.epochs=2"]),
                     stage1_names=[])
    assert "ignored" not in caplog.text


@pytest.mark.parametrize("setting", ["stage2.patch_pool=3", "stage2.patch_coreset=0.1"])
def test_patch_settings_without_a_patch_score_warn_that_they_are_ignored(caplog, tmp_path, setting):
    from bonecluster.stage2.train import train_stage2

    class NoParts:   # train_stage2 warns before it groups any image
        records = []
        pre = load_config("cpu").data.preprocess()

    for score, warned in (("global", True), ("patch", False), ("global+patch", False)):
        caplog.clear()
        cfg = load_config("cpu", overrides=[setting, f"stage2.score={score}"])
        with caplog.at_level(logging.WARNING, logger="bonecluster"):
            train_stage2(NoParts(), tmp_path, cfg, stage1_names=[])
        assert ("stage2.score=global does not use" in caplog.text) == warned


def test_stage_1s_final_cluster_merging_is_not_carried_into_the_parts():
    cfg = load_config("cpu-real")
    assert cfg.cluster.study_links == 30 and stage2_config(cfg).cluster.study_links == 0


def test_stage2_size_sets_the_part_networks_films_and_nothing_of_stage_1():
    from bonecluster.config import stage2_data_config

    cfg = load_config("cpu", overrides=["data.size=64", "stage2.size=128"])
    assert stage2_config(cfg).data.size == 128 == stage2_data_config(cfg).size
    assert stage2_config(cfg).data.fit == cfg.data.fit and cfg.data.size == 64
    same = load_config("cpu", overrides=["data.size=96"])
    assert same.stage2.size == 0 and stage2_config(same).data.size == 96


def test_stage2_phantom_weights_are_pretrained_at_stage2_size(monkeypatch, tmp_path):
    from bonecluster import pipeline

    sizes = []

    def fake_weights(cfg, cache, progress, info, films):
        sizes.append(cfg.data.size)
        return f"phantoms-{cfg.data.size}.pt"

    monkeypatch.setattr(pipeline, "_phantom_weights", fake_weights)
    cfg = load_config("cpu", overrides=["data.size=64", "stage2.size=128"])   # stage2.weights: phantoms
    assert pipeline.resolve_phantom_weights(cfg, tmp_path, progress=False).stage2.weights == "phantoms-128.pt"
    assert sizes == [128]
