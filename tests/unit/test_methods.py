"""The method registry and the small pieces the methods share (training runs: test_engine.py,
bit-for-bit equivalence: test_method_equivalence.py)."""

from __future__ import annotations

import math

import pytest
import torch

from bonecluster.checkpoint import FORMAT, load_run_file
from bonecluster.cluster import summarise_clusters
from bonecluster.methods import DEFAULT, available, get_method, method_names
from bonecluster.methods._base import Method, epoch_generator, register, warmup_cosine


def test_every_method_module_registers_the_name_of_its_file_and_has_a_summary():
    for name, summary in available().items():
        cls = get_method(name)
        assert issubclass(cls, Method) and cls.name == name
        assert summary and not summary.endswith(":"), f"methods/{name.replace('-', '_')}.py needs a docstring"


def test_the_paper_method_comes_first_and_every_known_method_is_there():
    assert method_names()[0] == DEFAULT == "deepcluster"
    assert set(method_names()) == {"deepcluster", "sela", "simclr", "simclr-deepcluster", "simclr-scan", "dino",
                                  "simclr-phantoms", "moco"}


def test_an_unknown_method_names_the_choices():
    with pytest.raises(ValueError, match=r"method='kmeans': choose one of deepcluster, "):
        get_method("kmeans")


def test_one_name_cannot_be_registered_by_two_classes():
    @register("test-only-method")
    class First(Method):
        pass

    assert register("test-only-method")(First) is First   # the same class again is fine
    with pytest.raises(ValueError, match="registered twice"):
        @register("test-only-method")
        class Second(Method):
            pass


def test_combined_methods_take_each_phase_from_its_parent():
    simclr_dc = get_method("simclr-deepcluster")
    deepcluster, simclr = get_method("deepcluster"), get_method("simclr")
    assert issubclass(simclr_dc, deepcluster) and issubclass(simclr_dc, simclr)
    # the rounds come from DeepCluster, the pre-training from SimCLR
    assert simclr_dc.cluster_epoch is deepcluster.cluster_epoch
    assert simclr_dc.pretrain_epoch is simclr.pretrain_epoch
    assert get_method("sela").centroid_top_layer and not deepcluster.centroid_top_layer


def test_epoch_generator_depends_only_on_seed_epoch_and_stream():
    draw = [torch.rand(3, generator=epoch_generator(*key)) for key in [(1, 2, 0), (1, 2, 0), (1, 3, 0), (1, 2, 1),
                                                                        (2, 2, 0)]]
    assert torch.equal(draw[0], draw[1])
    assert all(not torch.equal(draw[0], d) for d in draw[2:])


def test_warmup_then_cosine_to_the_floor():
    lrs = [warmup_cosine(1.0, e, epochs=6, warmup=2, min_ratio=0.1) for e in range(6)]
    assert lrs[:2] == pytest.approx([1 / 3, 2 / 3])
    assert lrs[2] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert lrs[3] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 3)))
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))


def test_summarise_clusters_gives_means_and_keeps_the_fallback_of_an_empty_cluster():
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]])
    fallback = torch.full((3, 2), 9.0)
    km = summarise_clusters(x, torch.tensor([0, 0, 1]), 3, fallback=fallback)
    assert torch.equal(km.centroids, torch.tensor([[1.0, 0.0], [0.0, 4.0], [9.0, 9.0]]))
    assert km.inertia == pytest.approx(2.0) and km.assignments.tolist() == [0, 0, 1]
    assert torch.equal(summarise_clusters(x, torch.tensor([0, 0, 0]), 2).centroids[1], torch.zeros(2))


def test_run_files_without_a_format_read_as_format_1_and_newer_ones_name_their_format(tmp_path):
    torch.save({"epoch": 3}, tmp_path / "old.pt")   # as written before the key existed
    assert load_run_file(tmp_path / "old.pt")["epoch"] == 3
    torch.save({"format": FORMAT, "epoch": 3}, tmp_path / "now.pt")
    assert load_run_file(tmp_path / "now.pt")["epoch"] == 3
    torch.save({"format": FORMAT + 1}, tmp_path / "new.pt")
    with pytest.raises(RuntimeError, match=rf"new.pt: written in run-file format {FORMAT + 1}; this bonecluster reads"):
        load_run_file(tmp_path / "new.pt")


def test_an_optimiser_saved_in_one_group_loads_into_backbone_and_head_groups():
    from bonecluster.methods._base import load_optimizer_state, set_learning_rate

    backbone, head = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))], [torch.nn.Parameter(torch.ones(4))]
    old = torch.optim.SGD(backbone + head, lr=0.1, momentum=0.9)   # one group, as before lr_scale existed
    for p in backbone + head:
        p.grad = torch.full_like(p, 2.0)
    old.step()
    new = torch.optim.SGD([{"params": backbone, "lr_scale": 0.1}, {"params": head, "lr_scale": 1.0}], lr=0.1,
                          momentum=0.9)
    load_optimizer_state(new, old.state_dict(), "test")
    assert [g["lr_scale"] for g in new.param_groups] == [0.1, 1.0]   # this run's scales, not the file's
    for p in backbone + head:
        assert torch.equal(new.state[p]["momentum_buffer"], old.state[p]["momentum_buffer"])
    set_learning_rate(new, 0.5)
    assert [g["lr"] for g in new.param_groups] == [pytest.approx(0.05), 0.5]
    other = torch.optim.SGD([{"params": head}], lr=0.1)      # a frozen backbone: fewer parameters
    with pytest.raises(ValueError, match="holds 3 parameters and this run's 1: resume with the model.freeze"):
        load_optimizer_state(other, old.state_dict(), "test")


def test_layer_lr_decay_gives_each_resnet_stage_its_rate_in_parameter_order():
    from bonecluster.methods._base import backbone_groups, backbone_parameters
    from bonecluster.models import DeepClusterNet

    model = DeepClusterNet("resnet18", sobel=True, num_clusters=3)
    (whole,) = backbone_groups(model, 0.5)          # no decay: one group, as before the setting
    assert whole["lr_scale"] == 0.5 and len(whole["params"]) == len(backbone_parameters(model))
    groups = backbone_groups(model, 0.5, layer_decay=0.5)
    # stem, layer1 .. layer4: the last stage keeps backbone_lr_scale, each earlier one half the next
    assert [g["lr_scale"] for g in groups] == [0.5 * 0.5 ** 4, 0.5 * 0.5 ** 3, 0.5 * 0.25, 0.5 * 0.5, 0.5]
    flat = [p for g in groups for p in g["params"]]
    assert [id(p) for p in flat] == [id(p) for p in backbone_parameters(model)]   # no top layer, order kept
    stem = {id(p) for p in (*model.backbone.conv1.parameters(), *model.backbone.bn1.parameters())}
    assert {id(p) for p in groups[0]["params"]} == stem
    assert {id(p) for p in groups[4]["params"]} == {id(p) for p in model.backbone.layer4.parameters()}
    model.freeze_backbone()
    assert backbone_groups(model, 1.0, layer_decay=0.5) == []


def test_layer_lr_decay_refuses_a_backbone_without_resnet_stages():
    from bonecluster.methods._base import backbone_groups, resnet_stage

    assert [resnet_stage(n) for n in ("backbone.conv1.weight", "backbone.bn1.bias", "backbone.layer3.0.conv1.weight",
                                      "backbone.blocks.0.attn.qkv.weight", "top_layer.weight")] == [0, 0, 3, None, None]

    class Vit(torch.nn.Module):
        arch, frozen = "timm/vit_tiny", False

        def __init__(self):
            super().__init__()
            self.backbone = torch.nn.ModuleDict({"blocks": torch.nn.Linear(2, 2)})

    assert len(backbone_groups(Vit(), 1.0)) == 1
    with pytest.raises(ValueError, match=r"layer_lr_decay=0.5 needs a ResNet backbone.*'timm/vit_tiny'.*backbone.blocks"):
        backbone_groups(Vit(), 1.0, layer_decay=0.5)
