"""Unit tests for bonecluster.models and bonecluster.device (CPU, tiny inputs, no downloads)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
import torchvision

from bonecluster import models
from bonecluster.device import amp_enabled, pick_device, seed_everything
from bonecluster.models import (
    ARCHS,
    DeepClusterNet,
    SobelFilter,
    adapt_first_conv,
    build_model,
    count_parameters,
)

SIDE = 16


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def tiny_model(**kwargs) -> DeepClusterNet:
    kwargs.setdefault("small_input", True)
    return DeepClusterNet(**kwargs)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(3, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("arch, feature_dim", [("resnet18", 512), ("resnet34", 512)])
def test_feature_and_logit_shapes(arch, feature_dim, images):
    model = tiny_model(arch=arch, num_clusters=5).eval()
    assert model.feature_dim == feature_dim
    assert model.features(images).shape == (3, feature_dim)
    assert model(images).shape == (3, 5)


def test_resnet50_has_2048_features():
    model = tiny_model(arch="resnet50", num_clusters=4).eval()
    x = torch.rand(2, 1, 16, 16)
    assert model.feature_dim == 2048
    assert model.features(x).shape == (2, 2048)
    assert model(x).shape == (2, 4)


def test_archs_constant_lists_supported_models():
    assert ARCHS == ("resnet18", "resnet34", "resnet50")
    with pytest.raises(ValueError, match="unknown model.arch"):
        DeepClusterNet(arch="vgg16")


def test_imagenet_stem_runs_on_larger_images():
    model = DeepClusterNet(small_input=False).eval()
    assert model.backbone.conv1.kernel_size == (7, 7)
    assert not isinstance(model.backbone.maxpool, torch.nn.Identity)
    assert model.features(torch.rand(2, 1, 64, 64)).shape == (2, 512)


def test_small_input_stem_is_3x3_stride_1_without_maxpool():
    model = tiny_model()
    assert model.backbone.conv1.kernel_size == (3, 3)
    assert model.backbone.conv1.stride == (1, 1)
    assert isinstance(model.backbone.maxpool, torch.nn.Identity)


@pytest.mark.parametrize("sobel, channels", [(False, 1), (True, 2)])
def test_first_conv_input_channels(sobel, channels, images):
    model = tiny_model(sobel=sobel).eval()
    assert model.in_channels == channels
    assert model.backbone.conv1.in_channels == channels
    assert model.preprocess(images).shape == (3, channels, SIDE, SIDE)
    assert model.features(images).shape == (3, 512)


def test_rejects_non_grey_input():
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        tiny_model()(torch.rand(2, 3, SIDE, SIDE))


def test_eval_mode_is_deterministic(images):
    model = tiny_model(sobel=True).eval()
    with torch.no_grad():
        assert torch.equal(model.features(images), model.features(images))


# --------------------------------------------------------------------------- Sobel


def vertical_edge(side: int = 8) -> torch.Tensor:
    """(1, 1, side, side): left half 0, right half 1."""
    x = torch.zeros(1, 1, side, side)
    x[..., side // 2:] = 1.0
    return x


def test_sobel_vertical_edge_responds_in_x_only():
    out = SobelFilter()(vertical_edge(8))
    assert out.shape == (1, 2, 8, 8)
    grad_x, grad_y = out[0, 0], out[0, 1]
    assert torch.equal(grad_y, torch.zeros(8, 8))  # replicate padding: no spurious border edges
    expected_x = torch.zeros(8, 8)
    expected_x[:, 3:5] = -4.0  # kernel weights 1+2+1 on each side of the step
    assert torch.equal(grad_x, expected_x)


def test_sobel_horizontal_edge_responds_in_y_only():
    out = SobelFilter()(vertical_edge(8).transpose(-1, -2))
    assert torch.equal(out[0, 0], torch.zeros(8, 8))
    assert out[0, 1].abs().max() == 4.0


def test_sobel_is_not_trainable():
    sobel = SobelFilter()
    assert list(sobel.parameters()) == []
    model = tiny_model(sobel=True)
    assert not any(name.startswith("sobel") for name, _ in model.named_parameters())
    assert not any(key.startswith("sobel") for key in model.state_dict())
    assert count_parameters(model, trainable_only=True) == count_parameters(model)


def test_sobel_kernels_follow_the_model_to_a_dtype():
    model = tiny_model(sobel=True).double().eval()
    assert model.features(torch.rand(1, 1, 8, 8, dtype=torch.float64)).dtype == torch.float64


# --------------------------------------------------------------------------- top layer


def test_top_layer_init_and_reset_changes_k():
    model = tiny_model(num_clusters=7)
    assert model.num_clusters == 7
    model.reset_top_layer(12, generator=torch.Generator().manual_seed(1))
    assert model.top_layer.weight.shape == (12, 512)
    assert model.num_clusters == 12
    assert torch.equal(model.top_layer.bias, torch.zeros(12))
    assert 0.008 < model.top_layer.weight.std().item() < 0.012  # N(0, 0.01), DeepCluster's init


def test_reset_top_layer_is_deterministic_given_generator():
    model = tiny_model()
    model.reset_top_layer(5, generator=torch.Generator().manual_seed(3))
    first = model.top_layer.weight.clone()
    model.reset_top_layer(5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(model.top_layer.weight, first)
    model.reset_top_layer(5, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(model.top_layer.weight, first)


def test_reset_top_layer_with_generator_leaves_global_rng_alone():
    model = tiny_model()
    torch.manual_seed(2)
    expected = torch.rand(3)
    torch.manual_seed(2)
    model.reset_top_layer(5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.rand(3), expected)


def test_reset_top_layer_is_deterministic_given_global_seed():
    model = tiny_model()
    torch.manual_seed(11)
    model.reset_top_layer(6)
    first = model.top_layer.weight.clone()
    torch.manual_seed(11)
    model.reset_top_layer(6)
    assert torch.equal(model.top_layer.weight, first)


def test_reset_top_layer_keeps_dtype_and_is_trainable():
    model = tiny_model().double()
    model.reset_top_layer(4)
    assert model.top_layer.weight.dtype == torch.float64
    loss = model(torch.rand(2, 1, 8, 8, dtype=torch.float64)).logsumexp(dim=1).mean()
    loss.backward()
    assert model.top_layer.weight.grad is not None
    assert model.backbone.conv1.weight.grad is not None


def test_hparams_rebuild_same_architecture():
    model = tiny_model(sobel=True, num_clusters=9)
    rebuilt = DeepClusterNet(**model.hparams())
    assert rebuilt.hparams() == model.hparams()
    assert set(rebuilt.state_dict()) == set(model.state_dict())


# --------------------------------------------------------------------------- memory layout


def _conv_weights(model: DeepClusterNet) -> list[torch.Tensor]:
    return [m.weight for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d)]


def test_channels_last_is_the_default_and_can_be_switched_off():
    on, off = tiny_model(sobel=True), tiny_model(sobel=True, channels_last=False)
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in _conv_weights(on))
    assert not any(w.is_contiguous() for w in _conv_weights(on) if w.shape[-1] > 1)   # 1x1 kernels are both
    assert all(w.is_contiguous() for w in _conv_weights(off))
    assert not build_model({"channels_last": False, "small_input": True}).channels_last


@pytest.mark.parametrize("sobel", [False, True])
def test_channels_last_computes_the_same_network_up_to_rounding(sobel):
    """Same weights in both layouts: the same features and the same gradients, within float rounding."""
    x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    nchw = DeepClusterNet(sobel=sobel, channels_last=False)
    nhwc = DeepClusterNet(sobel=sobel, channels_last=True)
    nhwc.load_state_dict(nchw.state_dict())
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in _conv_weights(nhwc))  # loading keeps it
    outs = []
    for model in (nchw, nhwc):
        model.train()
        feats = model.features(x)
        feats.square().sum().backward()
        outs.append((feats.detach(), model.backbone.conv1.weight.grad.clone()))
    (f0, g0), (f1, g1) = outs
    assert torch.allclose(f0, f1, rtol=1e-3, atol=1e-3)   # train-mode BN on a 1x1 map magnifies rounding
    assert (g0 - g1).abs().max() <= 1e-3 * g0.abs().max()   # the first conv's gradient, relative to its size


def test_weights_saved_in_one_layout_load_in_the_other(tmp_path, images):
    source = tiny_model(sobel=True, num_clusters=6).eval()   # channels_last
    path = tmp_path / "model.pt"
    torch.save(source.state_dict(), path)
    loaded = tiny_model(sobel=True, num_clusters=6, weights=str(path), channels_last=False).eval()
    assert all(w.is_contiguous() for w in _conv_weights(loaded))
    with torch.no_grad():
        assert torch.allclose(loaded.features(images), source.features(images), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- weights files


def test_weights_file_round_trip(tmp_path, images):
    source = tiny_model(sobel=True, num_clusters=6).eval()
    path = tmp_path / "model.pt"
    torch.save(source.state_dict(), path)
    loaded = tiny_model(sobel=True, num_clusters=6, weights=str(path)).eval()
    with torch.no_grad():
        assert torch.equal(loaded.features(images), source.features(images))
        assert torch.equal(loaded(images), source(images))  # the top layer fits, so it loads too


def test_weights_file_with_other_k_loads_backbone_and_keeps_fresh_top_layer(tmp_path, images):
    source = tiny_model(num_clusters=6).eval()
    path = tmp_path / "model.pt"
    torch.save({"model": source.state_dict(), "epoch": 3}, path)  # a checkpoint-style wrapper
    loaded = tiny_model(num_clusters=4, weights=path).eval()
    assert loaded.num_clusters == 4
    with torch.no_grad():
        assert torch.equal(loaded.features(images), source.features(images))


def test_torchvision_style_state_dict_loads(tmp_path, images):
    source = tiny_model().eval()
    state = {k.removeprefix("backbone."): v for k, v in source.state_dict().items() if k.startswith("backbone.")}
    state["fc.weight"] = torch.zeros(1000, 512)  # an ImageNet head is ignored
    state["fc.bias"] = torch.zeros(1000)
    path = tmp_path / "tv.pth"
    torch.save(state, path)
    loaded = tiny_model(weights=path).eval()
    with torch.no_grad():
        assert torch.equal(loaded.features(images), source.features(images))


def test_compiled_and_ddp_prefixes_are_stripped(tmp_path, images):
    source = tiny_model().eval()
    path = tmp_path / "wrapped.pt"
    torch.save({f"module._orig_mod.{k}": v for k, v in source.state_dict().items()}, path)
    loaded = tiny_model(weights=path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(images), source(images))


def test_mismatched_weights_file_names_the_file(tmp_path):
    path = tmp_path / "sobel_model.pt"
    torch.save(tiny_model(sobel=True).state_dict(), path)
    with pytest.raises(ValueError, match="sobel_model.pt") as err:
        tiny_model(sobel=False, weights=path)
    assert "conv1.weight" in str(err.value)


def test_weights_file_of_other_arch_reports_missing_keys(tmp_path):
    path = tmp_path / "r18.pt"
    torch.save(tiny_model(arch="resnet18").state_dict(), path)
    with pytest.raises(ValueError, match="r18.pt.*missing keys"):
        tiny_model(arch="resnet34", weights=path)


def test_missing_weights_file_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        tiny_model(weights=tmp_path / "nope.pt")


def test_unreadable_weights_file_names_the_file(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt"):
        tiny_model(weights=path)


# --------------------------------------------------------------------------- ImageNet adaptation


def test_adapt_first_conv_sums_rgb_exactly():
    weight = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    grey = adapt_first_conv(weight, 1)
    assert grey.shape == (2, 1, 2, 2)
    assert torch.equal(grey[:, 0], weight[:, 0] + weight[:, 1] + weight[:, 2])
    two = adapt_first_conv(weight, 2)
    assert two.shape == (2, 2, 2, 2)
    assert torch.equal(two[:, 0], grey[:, 0] / 2) and torch.equal(two[:, 1], grey[:, 0] / 2)


def test_adapt_first_conv_preserves_response_to_replicated_grey():
    weight = torch.randn(4, 3, 3, 3)
    grey = torch.rand(1, 1, 8, 8)
    rgb_response = torch.nn.functional.conv2d(grey.repeat(1, 3, 1, 1), weight)
    for channels in (1, 2):
        adapted = adapt_first_conv(weight, channels)
        response = torch.nn.functional.conv2d(grey.repeat(1, channels, 1, 1), adapted)
        assert torch.allclose(response, rgb_response, atol=1e-5)


def test_adapt_first_conv_rejects_non_rgb():
    with pytest.raises(ValueError, match="RGB"):
        adapt_first_conv(torch.zeros(4, 1, 3, 3), 1)


class _FakeWeights:
    """Stands in for torchvision's weights enum: returns a random RGB ResNet state dict."""

    def __init__(self, arch: str):
        torch.manual_seed(0)
        self.state = getattr(torchvision.models, arch)(weights=None).state_dict()
        self.IMAGENET1K_V1 = SimpleNamespace(get_state_dict=lambda progress=True, **_: self.state)


@pytest.fixture
def fake_imagenet(monkeypatch):
    fake = _FakeWeights("resnet18")
    monkeypatch.setattr(torchvision.models, "get_model_weights", lambda arch: fake)
    return fake.state


@pytest.mark.parametrize("sobel, channels", [(False, 1), (True, 2)])
def test_imagenet_weights_are_adapted_without_download(fake_imagenet, sobel, channels):
    model = DeepClusterNet(sobel=sobel, weights="imagenet")
    expected_conv1 = fake_imagenet["conv1.weight"].sum(dim=1, keepdim=True).repeat(1, channels, 1, 1) / channels
    assert torch.equal(model.backbone.conv1.weight, expected_conv1)
    assert torch.equal(model.backbone.layer4[1].conv2.weight, fake_imagenet["layer4.1.conv2.weight"])
    assert torch.equal(model.backbone.bn1.running_mean, fake_imagenet["bn1.running_mean"])
    assert model.top_layer.weight.shape == (7, 512)  # ImageNet's fc is not used


def test_imagenet_weights_with_small_input_keep_random_stem(fake_imagenet, caplog):
    with caplog.at_level(logging.WARNING, logger="bonecluster"):
        model = tiny_model(weights="imagenet")
    assert model.backbone.conv1.weight.shape == (64, 1, 3, 3)
    assert torch.equal(model.backbone.layer1[0].conv1.weight, fake_imagenet["layer1.0.conv1.weight"])
    assert "random init" in caplog.text


def test_imagenet_download_goes_through_torchvision_loader(monkeypatch):
    calls = []
    fake = _FakeWeights("resnet18")
    monkeypatch.setattr(torchvision.models, "get_model_weights", lambda arch: calls.append(arch) or fake)
    assert models._download_imagenet_state_dict("resnet18") is fake.state
    assert calls == ["resnet18"]


# --------------------------------------------------------------------------- helpers


def test_build_model_from_mapping_object_and_overrides():
    from_dict = build_model({"arch": "resnet18", "sobel": True, "small_input": True, "num_clusters": 3, "other": 1})
    assert from_dict.hparams() == {"arch": "resnet18", "sobel": True, "num_clusters": 3, "small_input": True,
                                   "channels_last": True}
    cfg = SimpleNamespace(arch="resnet18", sobel=False, small_input=True, num_clusters=3, lr=0.05)
    assert build_model(cfg, num_clusters=8).num_clusters == 8
    with pytest.raises(TypeError, match="lr"):
        build_model(cfg, lr=0.1)


def test_count_parameters_matches_torch():
    model = tiny_model()
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())
    model.backbone.conv1.weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == count_parameters(model) - 64 * 9


# --------------------------------------------------------------------------- device


def test_pick_device_cpu_and_auto():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device(" CPU ") == torch.device("cpu")
    assert pick_device("auto").type in {"cuda", "mps", "cpu"}
    assert pick_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_pick_device_cuda_unavailable_is_clear(name):
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        pick_device(name)


def test_pick_device_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown device"):
        pick_device("gpu0")


def test_amp_on_cuda_and_on_a_cpu_only_when_asked_and_native(monkeypatch):
    import bonecluster.device as device

    assert amp_enabled("cuda") and amp_enabled(torch.device("cuda:0"))
    assert not amp_enabled("cpu") and not amp_enabled(torch.device("mps"))
    assert not amp_enabled("mps", cpu=True)
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)
    assert not amp_enabled("cpu", cpu=True)
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    assert amp_enabled("cpu", cpu=True) and device.amp_dtype("cpu") == torch.bfloat16


def test_the_strided_convolutions_that_see_one_pixel_are_found_by_size():
    from bonecluster.device import cpu_bf16_hazard, one_pixel_strided_convs

    model = build_model(arch="resnet18", sobel=True)
    model.train()
    # a ResNet halves the map 4 times before layer4 (stem conv, max pool, layer2, layer3)
    assert one_pixel_strided_convs(model, 16) == ["backbone.layer4.0.conv1"]
    assert one_pixel_strided_convs(model, 8) == ["backbone.layer3.0.conv1", "backbone.layer4.0.conv1"]
    assert one_pixel_strided_convs(model, 17) == [] and one_pixel_strided_convs(model, 64) == []
    assert model.training   # the probe leaves every module's mode as it found it, and no hook behind
    assert not any(m._forward_pre_hooks for m in model.modules())
    model.backbone.layer1.eval()
    assert one_pixel_strided_convs(model, 16) and model.training and not model.backbone.layer1.training
    assert cpu_bf16_hazard(model, 16, torch.device("cpu"), torch.bfloat16) == ["backbone.layer4.0.conv1"]
    assert cpu_bf16_hazard(model, 16, torch.device("cpu"), torch.float16) == []      # autocast off
    assert cpu_bf16_hazard(model, 16, torch.device("cuda"), torch.bfloat16) == []    # only seen on a CPU
    pytest.importorskip("timm")
    vit = build_model(arch="timm/test_vit", sobel=False, image_size=32)
    vit.train()
    assert one_pixel_strided_convs(vit, 16) == []   # built for 32 px: it refuses 16, so nothing can be said
    assert vit.training and not any(m._forward_pre_hooks for m in vit.modules())   # also after the refusal


def test_mixed_precision_reads_amp_and_cpu_amp(monkeypatch):
    import bonecluster.device as device
    from bonecluster.config import TrainConfig

    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    assert device.mixed_precision(TrainConfig(), "cpu") == (False, torch.float16)   # off by default
    assert device.mixed_precision(TrainConfig(cpu_amp=True), "cpu") == (True, torch.bfloat16)
    assert device.mixed_precision(TrainConfig(cpu_amp=True, amp=False), "cpu")[0] is False   # amp is the master switch
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)
    assert device.mixed_precision(TrainConfig(cpu_amp=True), "cpu")[0] is False


def test_seed_everything_reproduces_draws():
    import random

    import numpy as np

    seed_everything(123)
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_everything(123)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first
