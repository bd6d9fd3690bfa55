"""Backbones by name (issue 22): timm models built, loaded and explained offline.

Every model here has random weights (a tiny ViT through ``model.backbone_kwargs``); nothing is
downloaded: the one test that asks for hub weights runs with ``HF_HUB_OFFLINE=1`` and an empty
cache, in a subprocess so that the setting is read when huggingface_hub is imported.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bonecluster.backbones import BackboneError, build_backbone, check_arch
from bonecluster.config import apply_override, load_config
from bonecluster.gradcam import grad_cam
from bonecluster.models import build_model

timm = pytest.importorskip("timm")

TINY_VIT = {"depth": 3, "embed_dim": 48, "num_heads": 2}
VIT = "timm/vit_small_patch14_dinov2.lvd142m"


def _vit(size: int = 56, sobel: bool = False, **kw):
    return build_model({"arch": VIT, "sobel": sobel, "backbone_kwargs": TINY_VIT, **kw}, image_size=size).eval()


def _cnn(sobel: bool = True, **kw):
    return build_model({"arch": "timm/resnet18", "sobel": sobel, **kw}, image_size=64).eval()


# ------------------------------------------------------------------------------------ names


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "timm/convnext_tiny", "timm/anything"])
def test_check_arch_accepts_the_families(arch):
    check_arch(arch)   # cheap: builds nothing, so an unknown timm name is caught by the builder


@pytest.mark.parametrize("arch", ["vgg16", "timm/", "hf", "resnet"])
def test_check_arch_names_the_bad_arch(arch):
    with pytest.raises(BackboneError, match=f"unknown model.arch '{arch}'"):
        check_arch(arch)


def test_unknown_timm_name_suggests_close_names():
    with pytest.raises(BackboneError, match=r"timm has no model 'vit_smal_patch14_dinov2'.*timm/vit_small_patch14_dinov2"):
        build_model({"arch": "timm/vit_smal_patch14_dinov2"}, image_size=56)


def test_missing_timm_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)   # import timm -> ImportError
    with pytest.raises(BackboneError, match=r"needs the timm package: pip install 'bonecluster\[timm\]'"):
        build_model({"arch": "timm/resnet18"}, image_size=64)


def test_vit_size_must_be_a_multiple_of_its_patch():
    with pytest.raises(BackboneError, match=r"multiple of 14; got 96 \(try data.size=84 or 98\)"):
        _vit(size=96)


def test_small_input_and_resnet_kwargs_are_refused():
    with pytest.raises(BackboneError, match="small_input applies to the torchvision ResNets"):
        build_model({"arch": "timm/resnet18", "small_input": True}, image_size=64)
    with pytest.raises(BackboneError, match="backbone_kwargs"):
        build_model({"arch": "resnet18", "backbone_kwargs": {"depth": 2}})
    with pytest.raises(BackboneError, match=r"timm/resnet18 could not be built with model.backbone_kwargs=.*no_such"):
        build_model({"arch": "timm/resnet18", "backbone_kwargs": {"no_such_argument": 1}}, image_size=64)
    with pytest.raises(BackboneError, match=r"may not set \['in_chans', 'num_classes'\]"):
        build_model({"arch": "timm/resnet18", "backbone_kwargs": {"num_classes": 5, "in_chans": 3}}, image_size=64)
    with pytest.raises(BackboneError, match=r"timm/convnext_atto.bad_tag could not be built"):
        build_model({"arch": "timm/convnext_atto.bad_tag"}, image_size=64)
    with pytest.raises(BackboneError, match=r"timm/convnext_atto.bad_tag: Invalid pretrained tag"):
        load_config("cpu", overrides=["data.size=0", "model.arch=timm/convnext_atto.bad_tag"])


def test_backbone_kwargs_override_parses_a_mapping():
    cfg = apply_override(load_config("cpu"), "model.backbone_kwargs={depth: 2, drop_path_rate: 0.1}")
    assert cfg.model.backbone_kwargs == {"depth": 2, "drop_path_rate": 0.1}
    with pytest.raises(ValueError, match="expected a mapping"):
        apply_override(load_config("cpu"), "model.backbone_kwargs=3")


# ------------------------------------------------------------------------------------ grey input


def test_grey_normalisation_is_the_models_own_averaged_over_rgb():
    # ImageNet statistics (timm's resnet18) and the 0.5 / 0.5 of an AugReg ViT
    cnn = build_backbone("timm/resnet18", in_channels=1, image_size=64)
    assert cnn.mean == pytest.approx((0.485 + 0.456 + 0.406) / 3) and cnn.std == pytest.approx((0.229 + 0.224 + 0.225) / 3)
    vit = build_backbone("timm/vit_tiny_patch16_224.augreg_in21k", in_channels=1, image_size=32,
                         kwargs={"depth": 1})
    assert (vit.mean, vit.std) == (pytest.approx(0.5), pytest.approx(0.5))


def test_built_for_the_films_channels():
    assert _cnn(sobel=True).backbone.conv1.weight.shape[1] == 2      # Sobel: d/dx, d/dy
    assert _vit(sobel=False).backbone.patch_embed.proj.weight.shape[1] == 1


# ------------------------------------------------------------------------------------ weights


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("make", [_cnn, _vit], ids=["cnn", "vit"])
def test_weights_arrive_unchanged_from_pt_safetensors_and_folder(tmp_path, make):
    from safetensors.torch import save_file

    saved = make()
    torch.save(saved.state_dict(), tmp_path / "net.pt")                           # a DeepClusterNet's
    bare = {k: v.contiguous() for k, v in saved.backbone.state_dict().items()}
    save_file(bare, tmp_path / "backbone.safetensors")                            # the bare timm model's
    folder = tmp_path / "saved"
    folder.mkdir()
    save_file(bare, folder / "model.safetensors")                                 # a saved folder
    for weights in (tmp_path / "net.pt", tmp_path / "backbone.safetensors", folder):
        loaded = make(weights=str(weights))
        assert _same_state(loaded.backbone, saved.backbone), weights
    fresh = make()
    assert not _same_state(fresh.backbone, saved.backbone)   # the comparison can fail


def test_rgb_weights_are_summed_to_grey(tmp_path):
    rgb = timm.create_model("resnet18", num_classes=1000, in_chans=3)   # classifier and all, as a hub file
    torch.save(rgb.state_dict(), tmp_path / "rgb.pt")
    grey = _cnn(sobel=False, weights=str(tmp_path / "rgb.pt"))
    assert torch.allclose(grey.backbone.conv1.weight, rgb.conv1.weight.sum(dim=1, keepdim=True))
    assert torch.equal(grey.backbone.layer4[1].conv2.weight, rgb.layer4[1].conv2.weight)


def test_vit_file_from_another_size_is_resampled(tmp_path):
    small = _vit(size=28)
    torch.save(small.state_dict(), tmp_path / "vit28.pt")
    big = _vit(size=56, weights=str(tmp_path / "vit28.pt"))   # 2x2 -> 4x4 position embedding
    assert big.backbone.pos_embed.shape[1] == 1 + 16
    assert torch.equal(big.backbone.blocks[1].mlp.fc1.weight, small.backbone.blocks[1].mlp.fc1.weight)


def test_architecture_mismatch_is_one_clear_line(tmp_path):
    torch.save(_cnn().state_dict(), tmp_path / "resnet.pt")
    with pytest.raises(ValueError, match=r"resnet.pt.*does not match.*timm/convnext_atto.*another model.arch"):
        build_model({"arch": "timm/convnext_atto", "sobel": True, "weights": str(tmp_path / "resnet.pt")},
                    image_size=64)


def test_missing_file_and_ambiguous_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope.pt.*not found \(model.arch=timm/resnet18"):
        _cnn(weights=str(tmp_path / "nope.pt"))
    (tmp_path / "a.pt").write_bytes(b"")
    (tmp_path / "b.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="holds 2 weights files"):
        _cnn(weights=str(tmp_path))


def test_imagenet_is_for_resnets_only():
    with pytest.raises(BackboneError, match="use model.weights=pretrained"):
        _cnn(weights="imagenet")


def test_offline_hub_with_an_empty_cache_is_one_clear_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch")}
    code = ("from bonecluster.models import build_model\n"
            "build_model({'arch': 'timm/resnet18.a1_in1k', 'weights': 'pretrained'}, image_size=64)\n")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert "BackboneError: model.arch=timm/resnet18.a1_in1k" in last
    assert "HF_HUB_OFFLINE is set" in last and "model.weights=FILE" in last
    assert not any((tmp_path / "hf").rglob("*.safetensors"))


# ------------------------------------------------------------------------------------ features and maps


@pytest.mark.parametrize("make", [_cnn, _vit], ids=["cnn", "vit"])
def test_pooled_and_maps_agree_with_features(make):
    model = make()
    size = model.image_size
    x = torch.rand(2, 1, size, size)
    pooled, mid, last = model.pooled_and_maps(x)
    assert torch.allclose(pooled, model.features(x), atol=1e-5)
    assert pooled.shape == (2, model.feature_dim) and mid.ndim == 4 and last.ndim == 4


def _swin(**kw):
    """A tiny Swin: its stages come out channels-last (N, h, w, C)."""
    tiny = {"depths": (1, 1), "num_heads": (1, 2), "embed_dim": 24, "window_size": 7}
    return build_model({"arch": "timm/swin_tiny_patch4_window7_224", "sobel": False, "backbone_kwargs": tiny, **kw},
                       image_size=56).eval()


@pytest.mark.parametrize("make", [_cnn, _vit, _swin], ids=["cnn", "vit", "swin"])
def test_grad_cam_explains_timm_backbones(make):
    model = make()
    size = model.image_size
    x = torch.rand(2, 1, size, size)
    cam, layer = grad_cam(model, x, lambda pooled: pooled.pow(2).sum(dim=1))
    assert cam.shape == (2, size, size) and layer in model.cam_layers()
    assert cam.max() == pytest.approx(1.0)   # a ViT's last block would give an all-zero map
    module, to_map = model.cam_layers()[layer]
    outputs = []
    handle = module.register_forward_hook(lambda _m, _i, out: outputs.append(out))
    model.features(x)
    handle.remove()
    feature_map = to_map(outputs[0], (size, size))   # channels first, whatever the family's layout
    assert feature_map.shape[0] == 2 and feature_map.shape[2] == feature_map.shape[3] < feature_map.shape[1]


def test_checkpoint_hparams_rebuild_a_vit(tmp_path):
    model = _vit(size=56)
    again = build_model({**model.hparams(), "channels_last": model.channels_last})
    again.load_state_dict(model.state_dict())
    x = torch.rand(1, 1, 56, 56)
    assert torch.equal(again.eval().features(x), model.features(x))


def test_pipeline_checks_the_model_before_any_film(tmp_path):
    from bonecluster.pipeline import check_model

    cfg = apply_override(apply_override(load_config("cpu"), f"model.arch={VIT}"), "data.size=64")
    with pytest.raises(BackboneError, match="multiple of 14"):
        check_model(cfg)
    cfg = apply_override(apply_override(cfg, "data.size=56"), "stage2.size=64")   # stage 1 fits, stage 2 does not
    check_model(cfg, stages=[1])
    with pytest.raises(BackboneError, match=r"multiple of 14; got 64 \(try stage2.size=56 or 70\)"):
        check_model(cfg)
    cfg = apply_override(apply_override(load_config("cpu"), "model.arch=timm/resnet18"),
                         f"model.weights={Path(tmp_path) / 'missing.pt'}")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        check_model(cfg)


def test_size_zero_takes_the_backbones_own():
    assert load_config("cpu", overrides=["data.size=0"]).data.size == 224
    vit = load_config("cpu", overrides=["data.size=0", f"model.arch={VIT}"])
    assert vit.data.size == 518 and vit.data.size % 14 == 0
    assert load_config("cpu", overrides=["data.size=96", f"model.arch={VIT}"]).data.size == 96   # given: kept
    with pytest.raises(BackboneError, match="timm has no model"):
        load_config("cpu", overrides=["data.size=0", "model.arch=timm/no_such_net"])


def test_the_core_package_does_not_import_timm():
    code = ("import sys\n"
            "import bonecluster.cli, bonecluster.models, bonecluster.pipeline, bonecluster.engine\n"
            "from bonecluster.models import build_model\n"
            "build_model({'arch': 'resnet18'})\n"
            "assert 'timm' not in sys.modules, 'timm imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
