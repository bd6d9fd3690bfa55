"""The shared training loop on tiny phantoms: files, resume, collapse guard, safe loading, DDP.

Each method's own behaviour is tested in tests/integration/methods/test_<method>.py."""

from __future__ import annotations

import dataclasses
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from bonecluster.config import load_config
from bonecluster.data import prepare_sources
from bonecluster.data.phantoms import generate_phantoms
from bonecluster.checkpoint import CHECKPOINT, TrainedClusters, load_torch, read_metrics
from bonecluster.engine import DeepClusterEngine

TINY = ["data.size=32", "train.batch_size=16", "train.feature_batch_size=64", "cluster.pca_dim=16",
        "cluster.backend=torch", "train.lr=0.01",
        "stage2.networks=1",   # one network per part keeps the suite fast; test_seed_networks.py tests more
        "stage2.weights=same"]   # trained part networks, no phantom pre-training (test_phantom_pretrain.py tests it)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("ph")
    generate_phantoms(root / "ph", n=56, size=64, seed=3, progress=False, workers=1)
    return root / "ph"


def _cfg(epochs=3, *extra):
    return load_config("cpu", overrides=TINY + [f"train.epochs={epochs}", *extra])


def _data(phantoms, tmp_path, cfg):
    return prepare_sources([phantoms], cfg.data, cache=tmp_path / "cache", progress=False)


def test_fit_writes_config_metrics_checkpoint_and_model(phantoms, tmp_path):
    cfg = _cfg(3)
    data = _data(phantoms, tmp_path, cfg)
    res = DeepClusterEngine(cfg, tmp_path / "run", progress=False).fit(data)
    assert res.epochs_run == 3 and not res.collapsed and len(res.assignments) == len(data)
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert rows[0]["nmi_prev"] == "" and 0 <= float(rows[1]["nmi_prev"]) <= 1
    assert all(float(r["loss"]) > 0 and float(r["images_per_s"]) > 0 for r in rows)
    assert sum(int(s) for s in rows[0]["cluster_sizes"].split("|")) == len(data)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["epochs"] == 3
    ckpt = load_torch(tmp_path / "run" / CHECKPOINT)
    assert ckpt["epoch"] == 3 and len(ckpt["history"]) == 3
    trained = TrainedClusters.load(tmp_path / "run")
    np.testing.assert_array_equal(trained.assignments, res.assignments)
    assert trained.centroids.shape[0] == 7


def test_interrupted_run_resumes_to_identical_assignments(phantoms, tmp_path):
    cfg = _cfg(3, "train.device=cpu")  # bit-for-bit is a CPU promise: cuDNN's kernels are not deterministic
    data = _data(phantoms, tmp_path, cfg)
    full = DeepClusterEngine(cfg, tmp_path / "full", progress=False).fit(data)
    part = DeepClusterEngine(cfg, tmp_path / "part", progress=False).fit(data, stop_after=1)
    assert part.interrupted and part.epochs_run == 1
    assert load_torch(tmp_path / "part" / CHECKPOINT)["epoch"] == 1
    resumed = DeepClusterEngine(cfg, tmp_path / "part", progress=False).fit(data, resume=True)
    assert resumed.epochs_run == 3
    np.testing.assert_array_equal(resumed.assignments, full.assignments)
    full_rows = read_metrics(tmp_path / "full" / "metrics.csv")
    part_rows = read_metrics(tmp_path / "part" / "metrics.csv")
    assert [r["loss"] for r in part_rows] == [r["loss"] for r in full_rows]



def test_cpu_amp_trains_in_bfloat16_on_a_native_cpu_and_falls_back_to_float32_elsewhere(phantoms, tmp_path, monkeypatch,
                                                                                       caplog):
    """``train.cpu_amp``: autocast in bfloat16 where the CPU has it in hardware (forced here, so the
    path runs on any CPU; emulated it is only slower), float32 and a log line where it has not."""
    import bonecluster.device as device

    cfg32 = _cfg(2, "train.device=cpu", "train.cpu_amp=false", "cluster.by_study=false")
    cfg16 = _cfg(2, "train.device=cpu", "train.cpu_amp=true", "cluster.by_study=false")
    data = _data(phantoms, tmp_path, cfg32)
    plain = DeepClusterEngine(cfg32, tmp_path / "fp32", progress=False).fit(data)
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level("INFO", logger="bonecluster"):
        fallback = DeepClusterEngine(cfg16, tmp_path / "fallback", progress=False).fit(data)
    assert "no bfloat16 in hardware" in caplog.text
    np.testing.assert_array_equal(fallback.assignments, plain.assignments)   # float32 after all
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    engine = DeepClusterEngine(cfg16, tmp_path / "bf16", progress=False)
    assert engine.use_amp and engine.amp_dtype == torch.bfloat16
    seen = []
    engine.model.backbone.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    res = engine.fit(data)
    assert torch.bfloat16 in seen and not res.collapsed and len(res.assignments) == len(data)
    n_final = len(data) // cfg16.train.feature_batch_size + 1   # the final clustering's feature pass ...
    assert set(seen[-n_final:]) == {torch.float32}               # ... runs in float32
    rows = read_metrics(tmp_path / "bf16" / "metrics.csv")
    assert all(np.isfinite(float(r["loss"])) and float(r["loss"]) > 0 for r in rows)
    assert [r["loss"] for r in rows] != [r["loss"] for r in read_metrics(tmp_path / "fp32" / "metrics.csv")]
    # the final clusters come from float32 features, as predict computes them: it assigns the same
    from bonecluster.cluster import assign, l2_normalise

    trained = TrainedClusters.load(tmp_path / "bf16")
    with torch.no_grad():
        x = torch.from_numpy(data.images()).float().div(255).unsqueeze(1)
        again = assign(l2_normalise(trained.pca.transform(trained.model.features(x))), trained.centroids)[0]
    np.testing.assert_array_equal(again.numpy(), res.assignments)
    # the checkpoint says what trained; resuming it in the other precision says so
    assert load_torch(tmp_path / "bf16" / CHECKPOINT)["precision"] == "bfloat16"
    assert load_torch(tmp_path / "fallback" / CHECKPOINT)["precision"] == "float32"
    part = DeepClusterEngine(cfg16, tmp_path / "switch", progress=False)
    part.fit(data, stop_after=1)
    caplog.clear()
    with caplog.at_level("WARNING", logger="bonecluster"):
        DeepClusterEngine(cfg32, tmp_path / "switch", progress=False).fit(data, resume=True)
    assert "trained in bfloat16 so far, in float32 from here" in caplog.text


@pytest.mark.slow
def test_compiled_backbone_trains_like_the_plain_one_and_writes_the_same_run_files(phantoms, tmp_path):
    """``train.compile``: the backbone compiled in place, so the run's weights keep their names and
    load without compiling; the first epoch (same start, same pseudo-labels) matches the plain run."""
    plain_cfg = _cfg(2, "train.device=cpu", "train.cpu_amp=false")
    data = _data(phantoms, tmp_path, plain_cfg)
    DeepClusterEngine(plain_cfg, tmp_path / "plain", progress=False).fit(data)
    engine = DeepClusterEngine(_cfg(2, "train.device=cpu", "train.cpu_amp=false", "train.compile=true"),
                               tmp_path / "compiled", progress=False)
    assert engine.model.backbone._compiled_call_impl is not None   # nn.Module.compile, in place
    compiled = engine.fit(data)
    assert not compiled.collapsed and len(compiled.assignments) == len(data)
    first = [float(read_metrics(tmp_path / run / "metrics.csv")[0]["loss"]) for run in ("plain", "compiled")]
    assert first[1] == pytest.approx(first[0], rel=1e-3)
    a, b = (TrainedClusters.load(tmp_path / run) for run in ("plain", "compiled"))
    assert list(b.model.state_dict()) == list(a.model.state_dict()) and b.model.backbone._compiled_call_impl is None
    assert not any("_orig_mod" in key for key in load_torch(tmp_path / "compiled" / CHECKPOINT)["model"])


def test_a_trained_run_loads_onto_any_device_with_its_bookkeeping_on_the_cpu(phantoms, tmp_path):
    """Only the network moves to the requested device; the assignments (numpy) and centroids stay
    on the CPU. "meta" stands in for CUDA on a machine without one: loading the whole file onto
    the device, as an H100 run once did, breaks ``.numpy()`` on both."""
    cfg = _cfg(1)
    DeepClusterEngine(cfg, tmp_path / "run", progress=False).fit(_data(phantoms, tmp_path, cfg))
    trained = TrainedClusters.load(tmp_path / "run", device="meta")
    assert next(trained.model.parameters()).device.type == "meta"
    assert isinstance(trained.assignments, np.ndarray) and trained.centroids.device.type == "cpu"


SIMCLR = ["selfsup.epochs=2", "selfsup.batch_size=16", "selfsup.hidden_dim=32", "selfsup.proj_dim=16",
          "scan.epochs=5", "scan.views=2", "scan.neighbours=5", "scan.batch_size=16"]


def test_study_level_clustering_gives_a_study_one_cluster_in_every_round(phantoms, tmp_path):
    from dataclasses import replace

    from bonecluster.data.records import study_index

    from bonecluster.names import save_cluster_names
    from bonecluster.predict import Predictor

    cfg = _cfg(2, "cluster.by_study=true")
    data = _data(phantoms, tmp_path, cfg)
    studies = study_index(data.records)
    assert studies.max() + 1 < len(data)   # the phantoms come in studies of several views
    res = DeepClusterEngine(cfg, tmp_path / "run" / "stage1", progress=False).fit(data)
    ckpt = load_torch(tmp_path / "run" / "stage1" / CHECKPOINT)
    save_cluster_names(tmp_path / "run" / "stage1", {})
    predicted = np.array([p.cluster for p in Predictor(tmp_path / "run").predict(data)])
    for labels in (res.assignments, ckpt["assignments"].numpy(), predicted):   # final, last round, predict
        for s in np.unique(studies):
            assert len(set(labels[studies == s])) == 1
    assert len(set(res.assignments)) > 1
    np.testing.assert_array_equal(predicted, res.assignments)   # predict assigns studies as training did
    # without studies (every image its own) the option changes nothing
    flat = replace(data, records=[replace(r, study=None) for r in data.records])
    on = DeepClusterEngine(cfg, tmp_path / "on", progress=False).fit(flat)
    off = DeepClusterEngine(_cfg(2, "cluster.by_study=false"), tmp_path / "off", progress=False).fit(flat)
    np.testing.assert_array_equal(on.assignments, off.assignments)


def test_too_few_studies_fall_back_to_images_with_a_warning(phantoms, tmp_path, caplog):
    from dataclasses import replace

    cfg = _cfg(1, "cluster.by_study=true")
    data = _data(phantoms, tmp_path, cfg)
    few = replace(data, records=[replace(r, study=f"s{i % 5}") for i, r in enumerate(data.records)])
    with caplog.at_level("WARNING", logger="bonecluster"):
        res = DeepClusterEngine(cfg, tmp_path / "run", progress=False).fit(few)
    assert "5 studies cannot make 7 clusters" in caplog.text and len(set(res.assignments)) > 5


def test_negative_train_k_is_a_clear_error():
    with pytest.raises(ValueError, match="cluster.train_k"):
        DeepClusterEngine(_cfg(1, "cluster.train_k=-1"), "unused", progress=False)


@pytest.mark.parametrize("power", ["0.5", "-1"])
def test_eigen_power_outside_its_range_is_a_clear_error(power):
    with pytest.raises(ValueError, match=r"cluster.eigen_power must be in \[-0.5, 0\]"):
        DeepClusterEngine(_cfg(1, f"cluster.eigen_power={power}"), "unused", progress=False)


def test_eigen_power_zero_reaches_the_saved_projection(phantoms, tmp_path):
    cfg = _cfg(1, "cluster.eigen_power=0")
    data = _data(phantoms, tmp_path, cfg)
    res = DeepClusterEngine(cfg, tmp_path / "run", progress=False).fit(data)
    trained = TrainedClusters.load(tmp_path / "run", device="cpu")
    torch.testing.assert_close(trained.pca.scale, torch.ones_like(trained.pca.scale), rtol=0, atol=0)
    assert trained.centroids.shape == (7, trained.pca.output_dim) and len(res.assignments) == len(data)


def test_unknown_method_is_a_clear_error():
    with pytest.raises(ValueError, match="method='kmeans'"):
        DeepClusterEngine(_cfg(1, "method=kmeans"), "unused", progress=False)


def test_resume_without_checkpoint_is_a_clear_error(phantoms, tmp_path):
    cfg = _cfg(1)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        DeepClusterEngine(cfg, tmp_path / "none", progress=False).fit(_data(phantoms, tmp_path, cfg), resume=True)


def test_collapse_stops_early_with_a_warning(phantoms, tmp_path, caplog):
    cfg = _cfg(3, "cluster.collapse_share=0.01")
    res = DeepClusterEngine(cfg, tmp_path / "run", progress=False).fit(_data(phantoms, tmp_path, cfg))
    assert res.collapsed and res.epochs_run == 1
    assert "collapsed" in caplog.text


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoints_never_unpickle_arbitrary_objects(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": _Evil()}, f, protocol=2)
    with pytest.raises(RuntimeError, match="evil.pt"):
        load_torch(path)
    torch.save({"ok": torch.ones(2)}, tmp_path / "ok.pt")
    assert load_torch(tmp_path / "ok.pt")["ok"].sum() == 2


def test_two_process_ddp_run_with_gloo(phantoms, tmp_path):
    """torchrun --nproc_per_node=2 runs the unchanged `train` command on the CPU (gloo)."""
    sets = [a for s in TINY + ["train.epochs=2", "train.device=cpu"] for a in ("--set", s)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "bonecluster", "train", str(phantoms), "--out", str(tmp_path / "run"), "--stages", "1",
           "--quiet", *sets]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert r.stdout.count("stage 1: 56 images") == 1  # only rank 0 prints
    rows = read_metrics(tmp_path / "run" / "stage1" / "metrics.csv")
    assert [int(x["epoch"]) for x in rows] == [1, 2]
    trained = TrainedClusters.load(tmp_path / "run" / "stage1")
    assert len(trained.assignments) == 56


@pytest.mark.parametrize("method", ["deepcluster", "simclr"])
def test_frozen_backbone_trains_only_the_heads(phantoms, tmp_path, method):
    cfg = _cfg(1, f"method={method}", "selfsup.epochs=1", "model.freeze=true", "train.feature_bn=recompute")
    data = _data(phantoms, tmp_path, cfg)
    engine = DeepClusterEngine(cfg, tmp_path / "run", progress=False)
    before = {k: v.clone() for k, v in engine.model.backbone.state_dict().items()}
    head_moved = []
    if method == "deepcluster":   # the top layer is redrawn every round: compare it around one step
        step = engine.method._pseudo_label_step

        def watched(net, top_optimizer, x, y):
            start = engine.model.top_layer.weight.detach().clone()
            loss = step(net, top_optimizer, x, y)
            head_moved.append(not torch.equal(start, engine.model.top_layer.weight))
            return loss

        engine.method._pseudo_label_step = watched
        engine.fit(data)
    else:
        head = {k: v.clone() for k, v in engine.method.head.state_dict().items()}
        engine.fit(data)
        head_moved.append(any(not torch.equal(head[k], v) for k, v in engine.method.head.state_dict().items()))
    after = engine.model.backbone.state_dict()
    # weights and BatchNorm statistics alike: precise BN is skipped for a frozen backbone
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert head_moved and all(head_moved)


def test_backbone_lr_scale_sets_the_backbones_group(phantoms, tmp_path):
    cfg = _cfg(1, "train.backbone_lr_scale=0.1", "train.lr=0.02")
    engine = DeepClusterEngine(cfg, tmp_path / "run", progress=False)
    engine.fit(_data(phantoms, tmp_path, cfg))
    (group,) = engine.method.optimizer.param_groups
    assert engine.method._lr(0) > 0 and group["lr_scale"] == 0.1
    assert group["lr"] == pytest.approx(0.1 * engine.method._lr(0))
    with pytest.raises(ValueError, match="backbone_lr_scale"):
        DeepClusterEngine(_cfg(1, "train.backbone_lr_scale=-1"), tmp_path / "bad", progress=False)


def test_layer_lr_decay_reaches_the_simclr_optimiser_and_is_range_checked(tmp_path):
    cfg = _cfg(1, "method=simclr", "selfsup.epochs=1", "train.layer_lr_decay=0.5", "train.backbone_lr_scale=0.5")
    engine = DeepClusterEngine(cfg, tmp_path / "run", progress=False)
    scales = [g["lr_scale"] for g in engine.method.pretrain_optimizer.param_groups]
    assert scales == [0.5 / 16, 0.5 / 8, 0.5 / 4, 0.5 / 2, 0.5, 1.0]   # stem .. layer4, then the projection head
    for bad in ("0", "1.5", "-0.5"):
        with pytest.raises(ValueError, match="layer_lr_decay must be in"):
            DeepClusterEngine(_cfg(1, f"train.layer_lr_decay={bad}"), tmp_path / f"bad{bad}", progress=False)


def _bn_stats(engine):
    return [t.clone() for m in engine.model.modules() if isinstance(m, torch.nn.BatchNorm2d)
            for t in (m.running_mean, m.running_var)]


def test_precise_bn_on_a_subset_reads_exactly_the_seeded_subset(phantoms, tmp_path):
    data = _data(phantoms, tmp_path, _cfg(1))
    engine = DeepClusterEngine(_cfg(1, "train.feature_bn=recompute", "train.bn_images=20"), tmp_path / "a",
                               progress=False)
    chosen = engine._bn_subset(data)
    again = engine._bn_subset(data)
    assert len(chosen) == 20 and list(chosen.rows) == list(again.rows)   # the same films every epoch
    assert list(chosen.rows) == sorted(set(chosen.rows)) and set(chosen.rows) <= set(data.rows)
    engine._recompute_bn_stats(data)
    on_subset = _bn_stats(engine)
    everything = DeepClusterEngine(_cfg(1, "train.feature_bn=recompute"), tmp_path / "b", progress=False)
    everything._recompute_bn_stats(chosen)   # the full pass over just those films: the same statistics
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(on_subset, _bn_stats(everything)))
    everything._recompute_bn_stats(data)   # and other statistics than the pass over every film
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(on_subset, _bn_stats(everything)))
    # a subset at least as large as the data is the data
    assert DeepClusterEngine(_cfg(1, "train.bn_images=56"), tmp_path / "c", progress=False)._bn_subset(data) is data


@pytest.mark.parametrize("value", [-1, 2.5])
def test_a_bad_bn_subset_size_fails_before_training(value):
    cfg = _cfg(1)   # set past the loader's own type check, as a notebook editing a Config would
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, bn_images=value))
    with pytest.raises(ValueError, match="train.bn_images must be a whole number"):
        DeepClusterEngine(cfg, "/nonexistent", progress=False)


def test_study_links_keep_every_centroid_and_predict_export_and_naming_follow_their_clusters(phantoms, tmp_path):
    from bonecluster.data.records import study_index
    from bonecluster.export import Stage1Graph
    from bonecluster.names import save_cluster_names
    from bonecluster.predict import Predictor
    from bonecluster.stage2.scoring import embed_images

    cfg = _cfg(1, "cluster.by_study=false", "cluster.study_links=12", "cluster.k=4")
    data = _data(phantoms, tmp_path, cfg)
    res = DeepClusterEngine(cfg, tmp_path / "run" / "stage1", progress=False).fit(data)
    trained = TrainedClusters.load(tmp_path / "run" / "stage1")
    assert trained.centroids.shape[0] == 12 and trained.groups is not None and trained.n_clusters == 4
    assert sorted(set(trained.groups.tolist())) == [0, 1, 2, 3]
    np.testing.assert_array_equal(trained.assignments, res.assignments)
    # every film goes where its nearest centroid's cluster is, in training and in predict
    emb = embed_images(trained, data.images())
    labels, _ = trained.assign(emb)
    np.testing.assert_array_equal(labels.numpy(), res.assignments)
    save_cluster_names(tmp_path / "run" / "stage1", {})
    from dataclasses import replace

    alone = replace(data, records=[replace(r, study=None) for r in data.records])
    preds = Predictor(tmp_path / "run").predict(alone)   # images without studies: as training assigned them
    np.testing.assert_array_equal([p.cluster for p in preds], res.assignments)
    assert all(0 < p.confidence <= 1 + 1e-6 for p in preds)
    # with their studies, a study's images take the cluster most of them are in (ties: the larger summed
    # probability), each with its own confidence in that cluster
    voted = Predictor(tmp_path / "run").predict(data)
    studies = study_index(data.records)
    film = np.array([p.cluster for p in preds])
    for s in np.unique(studies):
        mine = studies == s
        clusters = {voted[i].cluster for i in np.flatnonzero(mine)}
        assert len(clusters) == 1
        counts = np.bincount(film[mine], minlength=4)
        assert counts[clusters.pop()] == counts.max()
    assert any(len(set(film[studies == s])) > 1 for s in np.unique(studies))   # the vote had work to do
    # the exported graph gives k cluster probabilities and the same clusters and confidences
    graph = Stage1Graph(trained).eval()
    x = torch.from_numpy(data.images()[:6]).float().div(255).unsqueeze(1)
    with torch.no_grad():
        _, prob, cluster, conf = graph(x)
    assert prob.shape == (6, 4) and torch.allclose(prob.sum(1), torch.ones(6), atol=1e-5)
    assert cluster.tolist() == [p.cluster for p in preds[:6]]
    np.testing.assert_allclose(conf.numpy(), [p.confidence for p in preds[:6]], atol=1e-5)
    # how central a film is: the distance to the nearest centroid of its own cluster, and to the
    # nearest of another cluster's centroids when it is asked about that cluster
    sq = torch.cdist(emb, trained.centroids).pow(2)
    dist = trained.cluster_distances(emb, torch.from_numpy(res.assignments))
    torch.testing.assert_close(dist, sq.min(1).values, atol=1e-5, rtol=1e-5)
    other = (torch.from_numpy(res.assignments) + 1) % 4
    mine = trained.groups[None, :] == other[:, None]
    torch.testing.assert_close(trained.cluster_distances(emb, other), sq.masked_fill(~mine, float("inf")).min(1).values)
    assert (trained.cluster_distances(emb, other) > dist).all()
    assert study_index(data.records).max() + 1 < len(data)   # the phantoms come in studies
    # `bonecluster name`: one name per cluster (not per centroid), from the films nearest its centroids
    from bonecluster.naming import name_clusters

    # naming reads the films with their studies, so a film is in the cluster its study voted for
    audit = name_clusters(tmp_path / "run", [phantoms], per_cluster=2, cache=tmp_path / "cache", progress=False)
    assert sorted(audit.clusters) == [0, 1, 2, 3] and audit.n_labels_read == 8
    in_study = np.array([p.cluster for p in voted])
    dist_in_study = trained.cluster_distances(emb, torch.from_numpy(in_study))
    for c, named in audit.clusters.items():
        shown = [i for i, r in enumerate(data.records) if r.path in named.files]
        assert set(in_study[shown]) == {c}
        central = dist_in_study[in_study == c].sort().values[:2]
        torch.testing.assert_close(dist_in_study[shown].sort().values, central)


def test_study_links_without_studies_fall_back_to_plain_clusters_with_a_warning(phantoms, tmp_path, caplog):
    from dataclasses import replace

    cfg = _cfg(1, "cluster.by_study=false", "cluster.study_links=12")
    data = _data(phantoms, tmp_path, cfg)
    flat = replace(data, records=[replace(r, study=None) for r in data.records])
    with caplog.at_level("WARNING", logger="bonecluster"):
        on = DeepClusterEngine(cfg, tmp_path / "on", progress=False).fit(flat)
    assert "0% of the 56 images share a study with another (needs 50%)" in caplog.text
    off = DeepClusterEngine(_cfg(1, "cluster.by_study=false"), tmp_path / "off", progress=False).fit(flat)
    np.testing.assert_array_equal(on.assignments, off.assignments)
    assert TrainedClusters.load(tmp_path / "on").groups is None


def test_study_links_above_the_number_of_images_fall_back_with_a_warning(phantoms, tmp_path, caplog):
    cfg = _cfg(1, "cluster.by_study=false", "cluster.study_links=500")
    data = _data(phantoms, tmp_path, cfg)
    with caplog.at_level("WARNING", logger="bonecluster"):
        DeepClusterEngine(cfg, tmp_path / "run", progress=False).fit(data)
    assert "56 images cannot make more than 500 clusters" in caplog.text
    assert TrainedClusters.load(tmp_path / "run").groups is None
    caplog.clear()
    with caplog.at_level("WARNING", logger="bonecluster"):   # e.g. cpu-real's 30 with cluster.k=30 for naming
        DeepClusterEngine(_cfg(1, "cluster.by_study=false", "cluster.study_links=7"), tmp_path / "k", progress=False).fit(data)
    assert "7 clusters are not more than the 7 to make" in caplog.text


@pytest.mark.parametrize("sets, message", [
    (["cluster.study_links=-1"], "give a number of clusters above cluster.k"),
    (["cluster.study_links=30", "cluster.by_study=true"], "exclude each other"),
    (["cluster.study_links=30", "cluster.by_study=false", "method=simclr-scan"], "SCAN"),
    (["cluster.study_links=30", "cluster.by_study=false", "method=sela"], "Sinkhorn"),
])
def test_study_links_settings_that_cannot_work_are_clear_errors(sets, message):
    with pytest.raises(ValueError, match=message):
        DeepClusterEngine(_cfg(1, *sets), "unused", progress=False)


def test_a_study_links_run_exports_an_onnx_graph_that_predicts_its_clusters(phantoms, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    import json
    from dataclasses import replace

    from bonecluster.export import export_onnx
    from bonecluster.names import save_cluster_names
    from bonecluster.predict import Predictor

    cfg = _cfg(1, "cluster.by_study=false", "cluster.study_links=12", "cluster.k=4")
    data = _data(phantoms, tmp_path, cfg)
    DeepClusterEngine(cfg, tmp_path / "run" / "stage1", progress=False).fit(data)
    save_cluster_names(tmp_path / "run" / "stage1", {})
    export_onnx(tmp_path / "run", tmp_path / "onnx")
    manifest = json.loads((tmp_path / "onnx" / "manifest.json").read_text())["stage1"]
    assert manifest["k"] == 4 and len(manifest["centroid_clusters"]) == 12
    session = ort.InferenceSession(str(tmp_path / "onnx" / "stage1.onnx"), providers=["CPUExecutionProvider"])
    x = (data.images()[:5].astype(np.float32) / 255.0)[:, None]
    prob, cluster, conf = session.run(["probabilities", "cluster", "confidence"], {"image": x})
    five = data.subset(np.arange(5))
    preds = Predictor(tmp_path / "run").predict(replace(five, records=[replace(r, study=None) for r in five.records]))
    assert prob.shape == (5, 4) and cluster.tolist() == [p.cluster for p in preds]
    assert np.abs(conf - np.array([p.confidence for p in preds])).max() < 1e-4
