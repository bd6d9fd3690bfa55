"""``model.arch=hf/<repo or folder>`` (issue 22): a transformers encoder, offline.

A tiny DINOv2 config with random weights is written with ``save_pretrained`` into a folder, which
stands in for a hub repo: ``hf/<folder>`` reads its config, ``model.weights=pretrained`` its
weights, and nothing touches the network (the offline test runs with ``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from bonecluster.backbones import BackboneError
from bonecluster.config import load_config
from bonecluster.gradcam import grad_cam
from bonecluster.models import build_model

transformers = pytest.importorskip("transformers")

SIZE = 28   # the films: 2 x 2 patches of 14 px


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A folder written by save_pretrained: a 3-layer DINOv2 with random weights (RGB), whose
    position embedding is for 56 px films (4 x 4 patches), as a hub model's is for its own size."""
    folder = tmp_path_factory.mktemp("hf") / "tiny-dinov2"
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                       intermediate_size=64, patch_size=14, image_size=56)
    torch.manual_seed(0)
    transformers.Dinov2Model(config).eval().save_pretrained(folder)
    return folder


def _model(repo, **kw):
    return build_model({"arch": f"hf/{repo}", "sobel": False, **kw}, image_size=SIZE).eval()


def test_pretrained_weights_arrive_with_the_patch_embedding_summed_to_grey(repo):
    rgb = transformers.Dinov2Model.from_pretrained(repo)
    grey = _model(repo, weights="pretrained")
    conv = grey.backbone.model.embeddings.patch_embeddings.projection
    assert conv.in_channels == 1
    assert torch.allclose(conv.weight, rgb.embeddings.patch_embeddings.projection.weight.sum(1, keepdim=True))
    assert torch.equal(grey.backbone.model.encoder.layer[2].mlp.fc1.weight, rgb.encoder.layer[2].mlp.fc1.weight)
    # a grey film through the summed kernel = the RGB model on that film repeated on R, G and B
    x = torch.rand(2, 1, SIZE, SIZE)
    with torch.no_grad():
        ours = grey.features(x)
        theirs = rgb(pixel_values=((x - grey.input_mean) / grey.input_std).repeat(1, 3, 1, 1)).pooler_output
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_random_weights_differ_and_files_load_unchanged(repo, tmp_path):
    from safetensors.torch import save_file

    pretrained = _model(repo, weights="pretrained")
    assert not torch.equal(_model(repo).backbone.model.encoder.layer[0].mlp.fc1.weight,
                           pretrained.backbone.model.encoder.layer[0].mlp.fc1.weight)
    torch.save(pretrained.state_dict(), tmp_path / "run.pt")                 # a bonecluster network's
    bare = {k: v.contiguous() for k, v in pretrained.backbone.model.state_dict().items()}
    save_file(bare, tmp_path / "bare.safetensors")                            # save_pretrained's keys
    for weights in (tmp_path / "run.pt", tmp_path / "bare.safetensors"):
        loaded = _model(repo, weights=str(weights))
        state, want = loaded.backbone.state_dict(), pretrained.backbone.state_dict()
        assert all(torch.equal(state[k], want[k]) for k in want), weights


def test_features_maps_and_grad_cam(repo):
    model = _model(repo, sobel=True)
    x = torch.rand(2, 1, SIZE, SIZE)
    pooled, mid, last = model.pooled_and_maps(x)
    assert torch.allclose(pooled, model.features(x), atol=1e-5)
    assert pooled.shape == (2, 32) and mid.shape == (2, 32, 2, 2) and last.shape == (2, 32, 2, 2)
    cam, layer = grad_cam(model, x, lambda p: p.pow(2).sum(dim=1))
    assert layer == "model.encoder.layer.1" and cam.max() == pytest.approx(1.0)


def test_a_run_rebuilds_without_the_repo(repo, tmp_path):
    model = _model(repo, weights="pretrained")
    hparams = model.hparams()
    assert hparams["backbone_saved"]["config"]["model_type"] == "dinov2"
    again = build_model({**hparams, "arch": "hf/" + str(tmp_path / "gone")})   # the repo folder is not read
    again.load_state_dict(model.state_dict())
    x = torch.rand(1, 1, SIZE, SIZE)
    assert torch.equal(again.eval().features(x), model.features(x))
    assert (again.input_mean, again.input_std) == (model.input_mean, model.input_std)


def test_bad_input_is_one_clear_line(repo, tmp_path, monkeypatch):
    with pytest.raises(BackboneError, match=r"multiple of 14; got 32"):
        build_model({"arch": f"hf/{repo}", "sobel": False}, image_size=32)
    with pytest.raises(BackboneError, match=r"hf/.*missing: its config could not be loaded"):
        build_model({"arch": f"hf/{tmp_path / 'missing'}"}, image_size=SIZE)
    assert load_config("cpu", overrides=["data.size=0", f"model.arch=hf/{repo}"]).data.size == 56   # its config's
    with pytest.raises(BackboneError, match=r"\['num_hidden_layerz'\] are not fields of"):
        build_model({"arch": f"hf/{repo}", "backbone_kwargs": {"num_hidden_layerz": 1}}, image_size=SIZE)
    with pytest.raises(BackboneError, match=r"may not set \['num_channels'\]"):
        build_model({"arch": f"hf/{repo}", "backbone_kwargs": {"num_channels": 1}}, image_size=SIZE)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(BackboneError, match=r"needs the transformers package: pip install 'bonecluster\[hf\]'"):
        build_model({"arch": f"hf/{repo}"}, image_size=SIZE)


def test_offline_hub_repo_is_one_clear_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    code = "from bonecluster.models import build_model\nbuild_model({'arch': 'hf/microsoft/rad-dino'}, image_size=224)\n"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode != 0 and "BackboneError: model.arch=hf/microsoft/rad-dino" in last
    assert "HF_HUB_OFFLINE is set" in last


def _save(tmp_path, name, model, processor=None):
    folder = tmp_path / name
    model.save_pretrained(folder)
    if processor is not None:
        processor.save_pretrained(folder)
    return folder


def test_a_vit_has_no_random_pooler_and_its_blocks_are_found(tmp_path):
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                                    patch_size=14, image_size=56)
    folder = _save(tmp_path, "vit", transformers.ViTModel(config, add_pooling_layer=False))
    model = _model(folder, weights="pretrained")
    assert getattr(model.backbone.model, "pooler", None) is None   # the features are the normed CLS token
    x = torch.rand(2, 1, SIZE, SIZE)
    with torch.no_grad():
        out = model.backbone.run(model.preprocess(x))
    assert torch.allclose(model.features(x), out.last_hidden_state[:, 0], atol=1e-6)
    layers = list(model.cam_layers())
    assert len(layers) == 2 and layers[-1].endswith(".1")   # 3 blocks, the last left out
    cam, _ = grad_cam(model, x, lambda p: p.pow(2).sum(dim=1))
    assert cam.max() == pytest.approx(1.0)


def test_the_processor_gives_size_and_normalisation(tmp_path):
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64, patch_size=14, image_size=56)
    processor = transformers.BitImageProcessor(size={"shortest_edge": 42}, crop_size={"height": 42, "width": 42},
                                               image_mean=[0.5, 0.6, 0.7], image_std=[0.2, 0.3, 0.4])
    folder = _save(tmp_path, "with-processor", transformers.Dinov2Model(config), processor)
    assert load_config("cpu", overrides=["data.size=0", f"model.arch=hf/{folder}"]).data.size == 42
    model = build_model({"arch": f"hf/{folder}"}, image_size=42)
    assert float(model.input_mean) == pytest.approx(0.6) and float(model.input_std) == pytest.approx(0.3)


def test_a_swin_type_encoder_is_refused_in_one_line(tmp_path):
    config = transformers.SwinConfig(image_size=56, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 1],
                                     window_size=7)
    folder = _save(tmp_path, "swin", transformers.SwinModel(config))
    with pytest.raises(BackboneError, match="several resolutions"):
        build_model({"arch": f"hf/{folder}"}, image_size=56)
