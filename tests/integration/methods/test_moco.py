"""Method moco (methods/moco.py): queries against a momentum encoder's keys and a queue, then k-means once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bonecluster.checkpoint import CHECKPOINT, load_torch
from bonecluster.engine import DeepClusterEngine
from bonecluster.methods.moco import MoCo
from tests.integration.methods.conftest import method_config, train_method

MOCO = ("selfsup.epochs=3", "selfsup.batch_size=8", "selfsup.moco_queue=20", "train.device=cpu")


def test_resumes_to_identical_assignments_and_keeps_a_filled_queue(phantoms, tmp_path):
    cfg = method_config("moco", 1, *MOCO)
    full, rows, trained = train_method(phantoms, tmp_path / "full", cfg)
    part, _, _ = train_method(phantoms, tmp_path / "part", cfg, stop_after=2)
    saved = load_torch(tmp_path / "part" / CHECKPOINT)["pretrain"]
    assert part.interrupted and {"head", "optimizer", "key_net", "queue", "queue_next"} <= set(saved)
    resumed, _, _ = train_method(phantoms, tmp_path / "part", cfg, resume=True)
    np.testing.assert_array_equal(resumed.assignments, full.assignments)
    after_resume, uninterrupted = (load_torch(tmp_path / run / CHECKPOINT) for run in ("part", "full"))
    for key in ("model", "key_net"):
        state = after_resume["model"] if key == "model" else after_resume["pretrain"][key]
        want = uninterrupted["model"] if key == "model" else uninterrupted["pretrain"][key]
        for name in want:
            assert torch.equal(state[name], want[name]), f"{key}.{name} differs after resuming"
    assert torch.equal(after_resume["pretrain"]["queue"], uninterrupted["pretrain"]["queue"])
    assert after_resume["pretrain"]["queue_next"] == uninterrupted["pretrain"]["queue_next"]
    assert [r["phase"] for r in rows] == ["moco"] * 3 and len(trained.assignments) == 56
    # 56 films, batches of 8: 7 steps an epoch of 16 keys each (2 views of 8); a 20-row queue
    # has been overwritten with unit keys, and the key encoder trailed the trained network.
    checkpoint = load_torch(tmp_path / "full" / CHECKPOINT)
    queue = checkpoint["pretrain"]["queue"]
    assert queue.shape == (20, 16)
    torch.testing.assert_close(queue.norm(dim=1), torch.ones(20))
    assert checkpoint["pretrain"]["queue_next"] == (21 * 16) % 20 == 16
    weight = "backbone.conv1.weight"
    key, query = checkpoint["pretrain"]["key_net"]["model." + weight], checkpoint["model"][weight]
    unfitted = DeepClusterEngine(cfg, tmp_path / "unfitted", progress=False)
    start = unfitted.model.state_dict()[weight]
    assert not torch.equal(queue, unfitted.method.queue.cpu())   # real keys replaced the random start
    assert not torch.equal(key, query) and not torch.equal(key, start)   # it moved, and stayed behind
    # 21 steps at momentum 0.99 move it a small part of the way (the trained network drifts meanwhile)
    assert (key - start).norm() < (query.cpu() - start).norm()
    torch.testing.assert_close(trained.model.state_dict()[weight], query.cpu())   # k-means sees the queries' network


def test_the_queue_overwrites_its_oldest_rows():
    moco = MoCo.__new__(MoCo)
    moco.queue, moco.queue_next = torch.zeros(4, 2), 3
    moco.enqueue(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert moco.queue.tolist() == [[0.0, 1.0], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0]] and moco.queue_next == 1
    moco.enqueue(torch.arange(12.0).view(6, 2))   # more keys than rows: the last 4 stay
    assert moco.queue[:, 0].tolist() == [10.0, 4.0, 6.0, 8.0] and moco.queue_next == 1


def test_a_queue_longer_than_half_the_films_is_cut_to_it(phantoms, tmp_path, caplog):
    cfg = method_config("moco", 1, "selfsup.epochs=1", "selfsup.moco_queue=1024", "train.device=cpu")
    with caplog.at_level("INFO", logger="bonecluster"):
        train_method(phantoms, tmp_path / "run", cfg)
    assert load_torch(tmp_path / "run" / CHECKPOINT)["pretrain"]["queue"].shape == (28, 16)   # 56 films
    assert "selfsup.moco_queue=1024 is more than half of the 56 films: the queue holds 28 keys" in caplog.text


@pytest.mark.parametrize("setting, message", [("selfsup.moco_queue=-1", "moco_queue must be >= 0"),
                                              ("selfsup.moco_momentum=1", "moco_momentum in \\[0, 1\\)"),
                                              ("selfsup.moco_bn_groups=0", "moco_bn_groups >= 1")])
def test_bad_settings_are_refused_by_name(phantoms, tmp_path, setting, message):
    with pytest.raises(ValueError, match=message):
        train_method(phantoms, tmp_path / "run", method_config("moco", 1, *MOCO, setting))


def test_without_pretraining_epochs_it_clusters_the_untrained_network(phantoms, tmp_path):
    res, rows, trained = train_method(phantoms, tmp_path / "run", method_config("moco", 1, "selfsup.epochs=0"))
    assert res.epochs_run == 0 and rows == [] and trained.centroids.shape[0] == 7


def test_the_key_encoder_starts_from_the_given_weights(tmp_path):
    # cpu-real starts from phantom pre-training (model.weights): a key encoder left at random weights
    # would make the first hundred steps' keys noise.
    import torchvision

    torch.manual_seed(5)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "weights.pt")
    cfg = method_config("moco", 1, *MOCO, f"model.weights={tmp_path / 'weights.pt'}", "model.sobel=false")
    engine = DeepClusterEngine(cfg, tmp_path / "run", progress=False)
    key_net = engine.method.key_net
    for name, weight in engine.model.state_dict().items():
        torch.testing.assert_close(key_net.model.state_dict()[name], weight)
    assert all(not p.requires_grad for p in key_net.parameters())


def _bare_moco(key_net: torch.nn.Module, queue: torch.Tensor, groups: int = 4) -> MoCo:
    """A MoCo without an engine: the key encoder, queue and settings that view_loss reads."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    moco = MoCo.__new__(MoCo)
    moco.cfg = SimpleNamespace(selfsup=SimpleNamespace(temperature=0.2, moco_bn_groups=groups))
    moco.loop = SimpleNamespace(autocast=nullcontext)
    moco.key_net, moco.queue, moco.queue_next = key_net, queue, 0
    moco.shuffle = torch.Generator().manual_seed(0)
    return moco


def test_shuffled_key_groups_come_back_in_the_views_order():
    linear = torch.nn.Linear(6, 3)
    views = torch.randn(10, 6)
    got = _bare_moco(linear, torch.zeros(0, 3), groups=3).key_projections(views)
    torch.testing.assert_close(got, linear(views).detach())


def test_keys_are_normalised_over_shuffled_groups_of_at_least_two_views():
    # 5 films make 10 views; 4 groups of 3, 3, 2 and 2 (not 3, 3, 3 and 1, on which BatchNorm fails).
    views = torch.randn(10, 6, generator=torch.Generator().manual_seed(3))
    got = _bare_moco(torch.nn.BatchNorm1d(6, affine=False), torch.zeros(0, 6), groups=4).key_projections(views)
    order = torch.randperm(10, generator=torch.Generator().manual_seed(0))   # _bare_moco's shuffle
    groups = order.tensor_split(4)
    assert [len(g) for g in groups] == [3, 3, 2, 2]
    for rows in groups:
        x = views[rows]
        want = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5)
        torch.testing.assert_close(got[rows], want)


def test_a_cut_queue_keeps_its_newest_keys_oldest_first():
    moco = _bare_moco(torch.nn.Identity(), torch.arange(6.0).view(6, 1))
    moco.queue_next = 2   # row 2 is the oldest key, row 1 the newest
    moco.fit_queue(6)     # 6 films: at most 3 keys
    assert moco.queue.flatten().tolist() == [5.0, 0.0, 1.0] and moco.queue_next == 0
    moco.fit_queue(100)   # never grows
    assert len(moco.queue) == 3


def test_each_views_query_is_paired_with_the_other_views_key():
    from bonecluster.selfsup import queue_info_nce

    g = torch.Generator().manual_seed(4)
    out, queue = torch.randn(8, 5, generator=g), torch.nn.functional.normalize(torch.randn(6, 5, generator=g), dim=1)
    moco = _bare_moco(torch.nn.Identity(), queue)   # keys = the views themselves, here the queries
    loss = moco.view_loss(out, out)
    q1, q2 = out[:4], out[4:]
    expected = (queue_info_nce(q1, q2, queue, 0.2) + queue_info_nce(q2, q1, queue, 0.2)) / 2
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(moco.new_keys, torch.nn.functional.normalize(out, dim=1))


def test_a_run_of_another_method_is_not_resumed_as_moco(phantoms, tmp_path):
    # cpu-real trained simclr before 2026-12-07: resuming such a run with today's preset must say so.
    train_method(phantoms, tmp_path / "run", method_config("simclr", 1, *MOCO), stop_after=1)
    with pytest.raises(ValueError, match="trained with method=simclr, and this run asks for method=moco: "
                                         "resume with --method simclr"):
        train_method(phantoms, tmp_path / "run", method_config("moco", 1, *MOCO), resume=True)
