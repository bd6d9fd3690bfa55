"""Unit tests for bonecluster.augment (CPU and any accelerator present, tiny images)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from bonecluster.augment import (
    AugmentConfig,
    RadiographAugment,
    apply_affine,
    blur,
    sample_affine,
    uint8_to_unit_float,
)

SIDE = 32


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def identity_with(**changes) -> AugmentConfig:
    """The no-op config with a few transforms switched on."""
    return replace(AugmentConfig.identity(), **changes)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def batch() -> torch.Tensor:
    return torch.rand(6, 1, SIDE, SIDE, generator=seeded(0))


def available_devices() -> list[str]:
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    return devices


# --------------------------------------------------------------------------- basic contract


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_dtype_and_range_preserved(batch, dtype):
    augment = RadiographAugment(AugmentConfig(noise_std=0.1, brightness=(0.5, 2.0)))
    out = augment(batch.to(dtype), generator=seeded(1))
    assert out.shape == batch.shape
    assert out.dtype == dtype
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_disabled_is_identity(batch):
    augment = RadiographAugment(AugmentConfig(enabled=False))
    assert not augment.enabled
    assert torch.equal(augment(batch, generator=seeded(1)), batch)


def test_same_seed_same_output_different_seed_different(batch):
    augment = RadiographAugment(AugmentConfig(noise_std=0.05))
    first = augment(batch, generator=seeded(7))
    assert torch.equal(augment(batch, generator=seeded(7)), first)
    assert not torch.allclose(augment(batch, generator=seeded(8)), first)


def test_global_rng_is_reproducible_after_manual_seed(batch):
    augment = RadiographAugment()
    torch.manual_seed(5)
    first = augment(batch)
    torch.manual_seed(5)
    assert torch.equal(augment(batch), first)


def test_each_image_gets_its_own_parameters():
    same = torch.rand(1, 1, SIDE, SIDE, generator=seeded(2)).repeat(4, 1, 1, 1)
    out = RadiographAugment()(same, generator=seeded(3))
    flat = out.flatten(1)
    assert all(not torch.allclose(flat[0], flat[i]) for i in range(1, 4))


def test_no_gradient_graph_is_built(batch):
    out = RadiographAugment()(batch.requires_grad_(), generator=seeded(0))
    assert not out.requires_grad


@pytest.mark.parametrize("device", available_devices())
def test_runs_on_the_input_device(device, batch):
    x = batch.to(device)
    out = RadiographAugment(AugmentConfig(noise_std=0.05))(x, generator=seeded(4))
    assert out.device == x.device
    assert out.shape == x.shape


def test_rejects_integer_or_unbatched_input():
    augment = RadiographAugment()
    with pytest.raises(ValueError):
        augment(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError):
        augment(torch.zeros(1, 8, 8))


# --------------------------------------------------------------------------- affine math


def test_identity_config_is_identity(batch):
    out = RadiographAugment(AugmentConfig.identity())(batch, generator=seeded(9))
    assert torch.allclose(out, batch, atol=1e-5)


def test_identity_theta_is_exact():
    theta = sample_affine(3, SIDE, SIDE, AugmentConfig.identity(), seeded(0))
    assert torch.allclose(theta, torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).expand(3, 2, 3))


def test_horizontal_flip_mirrors_exactly(batch):
    cfg = identity_with(hflip_p=1.0)
    out = RadiographAugment(cfg)(batch, generator=seeded(0))
    assert torch.allclose(out, batch.flip(-1), atol=1e-5)


def test_vertical_flip_mirrors_exactly(batch):
    cfg = identity_with(vflip_p=1.0)
    out = RadiographAugment(cfg)(batch, generator=seeded(0))
    assert torch.allclose(out, batch.flip(-2), atol=1e-5)


def test_quarter_turn_theta_matches_rot90(batch):
    theta = torch.tensor([[[0.0, -1.0, 0.0], [1.0, 0.0, 0.0]]]).expand(len(batch), 2, 3)
    out = apply_affine(batch, theta)
    assert torch.allclose(out, torch.rot90(batch, k=1, dims=(-2, -1)), atol=1e-5)


def test_rotation_only_theta_is_a_bounded_rotation():
    cfg = identity_with(rotation_degrees=20.0)
    theta = sample_affine(64, SIDE, SIDE, cfg, seeded(1))
    linear = theta[:, :, :2]
    eye = torch.eye(2).expand(64, 2, 2)
    assert torch.allclose(linear @ linear.transpose(1, 2), eye, atol=1e-6)  # orthogonal
    assert torch.allclose(torch.linalg.det(linear), torch.ones(64), atol=1e-6)  # no reflection
    angles = torch.rad2deg(torch.atan2(linear[:, 1, 0], linear[:, 0, 0]))
    assert angles.abs().max() <= 20.0 + 1e-4
    assert angles.abs().max() > 10.0  # actually rotates
    assert torch.equal(theta[:, :, 2], torch.zeros(64, 2))  # about the centre


def test_crop_area_and_ratio_follow_config():
    cfg = identity_with(crop_scale=(0.25, 0.25), crop_ratio=(2.0, 2.0))
    theta = sample_affine(16, SIDE, SIDE, cfg, seeded(2))
    width, height = theta[:, 0, 0], theta[:, 1, 1]
    assert torch.allclose(width * height, torch.full((16,), 0.25))
    assert torch.allclose(width / height, torch.full((16,), 2.0))


def test_crop_stays_inside_image_without_rotation():
    cfg = identity_with(crop_scale=(0.3, 0.9), crop_ratio=(0.75, 1.33))
    ones = torch.ones(32, 1, SIDE, SIDE)
    out = RadiographAugment(cfg)(ones, generator=seeded(3))
    assert torch.allclose(out, ones, atol=1e-5)  # no zero padding leaks in at crop edges


def test_crop_zooms_in():
    cfg = identity_with(crop_scale=(0.25, 0.25))
    x = torch.zeros(1, 1, SIDE, SIDE)
    x[..., SIDE // 2 - 2: SIDE // 2 + 2, SIDE // 2 - 2: SIDE // 2 + 2] = 1.0  # 4x4 centre square
    centred = RadiographAugment(cfg)(x, generator=seeded(0))
    assert centred.sum() > 2.0 * x.sum()  # half-side crop: the square covers about 4x the pixels


def test_rotation_fills_corners_with_zeros():
    cfg = identity_with(rotation_degrees=45.0)
    ones = torch.ones(64, 1, SIDE, SIDE)
    out = RadiographAugment(cfg)(ones, generator=seeded(4))
    assert out[:, :, 0, 0].min() < 0.5  # some image rotated far enough to show a black corner


# --------------------------------------------------------------------------- intensity


def test_brightness_only_scales():
    cfg = identity_with(brightness=(0.5, 0.5))
    x = torch.full((2, 1, 4, 4), 0.6)
    assert torch.allclose(RadiographAugment(cfg)(x, generator=seeded(0)), torch.full_like(x, 0.3))


def test_contrast_keeps_mean():
    cfg = identity_with(contrast=(0.5, 0.5))
    x = torch.rand(3, 1, 8, 8, generator=seeded(1)) * 0.5 + 0.25
    out = RadiographAugment(cfg)(x, generator=seeded(0))
    assert torch.allclose(out.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=1e-6)
    assert torch.allclose(out.std(dim=(1, 2, 3)), 0.5 * x.std(dim=(1, 2, 3)), atol=1e-6)


def test_gamma_is_a_power_curve():
    cfg = identity_with(gamma=(2.0, 2.0))
    x = torch.rand(2, 1, 8, 8, generator=seeded(1))
    assert torch.allclose(RadiographAugment(cfg)(x, generator=seeded(0)), x.pow(2.0), atol=1e-6)


def test_noise_has_requested_std():
    cfg = identity_with(noise_std=0.05)
    x = torch.full((4, 1, SIDE, SIDE), 0.5)
    out = RadiographAugment(cfg)(x, generator=seeded(0))
    assert math.isclose((out - x).std().item(), 0.05, rel_tol=0.1)


def test_blur_off_changes_nothing_and_draws_nothing(batch):
    """blur_p=0 (the default) must leave every other transform's draws as they were."""
    base = RadiographAugment(AugmentConfig())(batch, generator=seeded(3))
    other_sigma = RadiographAugment(AugmentConfig(blur_sigma=(2.0, 3.0)))(batch, generator=seeded(3))
    assert torch.equal(base, other_sigma)
    gen = seeded(4)
    before = gen.get_state()
    assert blur(batch, 0.0, (1.0, 1.0), gen) is batch and torch.equal(gen.get_state(), before)


def test_blur_matches_a_gaussian_kernel():
    """An impulse far from the edges spreads into the normalised 2-D Gaussian of the drawn sigma."""
    x = torch.zeros(1, 1, 21, 21)
    x[0, 0, 10, 10] = 1.0
    out = blur(x, 1.0, (1.0, 1.0), seeded(0))
    t = torch.arange(-10, 11, dtype=torch.float32)
    g = torch.exp(-0.5 * t**2)
    g[t.abs() > 3] = 0.0          # the kernel's radius is 3 sigma
    g = g / g.sum()
    assert torch.allclose(out[0, 0], torch.outer(g, g), atol=1e-6)
    assert math.isclose(out.sum().item(), 1.0, rel_tol=1e-5)


def test_blur_is_per_image_keeps_flat_images_flat_and_smooths():
    flat = torch.full((3, 1, 16, 16), 0.3)
    assert torch.allclose(blur(flat, 1.0, (0.5, 2.0), seeded(0)), flat, atol=1e-6)   # edges replicated
    x = torch.rand(8, 1, 16, 16, generator=seeded(1))
    out = blur(x, 0.5, (1.0, 2.0), seeded(2))

    def roughness(t):  # mean absolute difference between horizontal neighbours, per image
        return (t[..., 1:] - t[..., :-1]).abs().mean(dim=(1, 2, 3))

    untouched = torch.isclose(roughness(out), roughness(x))
    assert 0 < int(untouched.sum()) < 8                       # some images blurred, some not
    assert torch.equal(out[untouched], x[untouched])
    assert (roughness(out[~untouched]) < 0.6 * roughness(x[~untouched])).all()
    assert RadiographAugment(identity_with(blur_p=1.0))(x, generator=seeded(0)).shape == x.shape


# --------------------------------------------------------------------------- config and helpers


def test_zoom_out_shrinks_the_image_inside_a_black_frame():
    ones = torch.ones(64, 1, SIDE, SIDE)
    out = RadiographAugment(identity_with(zoom_out_p=1.0, zoom_out=(2.0, 2.0)))(ones, generator=seeded(5))
    # half the side: a quarter of the frame keeps the film, the rest is black, at a random place
    film = out > 0.5
    assert torch.allclose(film.float().mean(dim=(1, 2, 3)), torch.full((64,), 0.25), atol=0.04)
    rows = film.any(dim=3).squeeze(1).float().sum(dim=1)
    assert torch.all((rows - SIDE / 2).abs() <= 1)
    tops = film.any(dim=3).squeeze(1).float().argmax(dim=1)
    assert len(torch.unique(tops)) > 4 and int(tops.max()) <= SIDE // 2     # placed anywhere inside


def test_zoom_out_keeps_rotated_crops_inside_the_window():
    cfg = identity_with(zoom_out_p=1.0, zoom_out=(1.5, 2.5), rotation_degrees=40.0, crop_scale=(0.5, 1.0))
    theta = sample_affine(500, SIDE, SIDE, cfg, seeded(6))
    # the crop's centre in output coordinates must lie within the window by the crop's half side
    a, t = theta[:, :, :2], theta[:, :, 2]
    base = sample_affine(500, SIDE, SIDE, replace(cfg, zoom_out_p=0.0), seeded(6))
    u = torch.linalg.solve(a, (base[:, :, 2] - t).unsqueeze(-1)).squeeze(-1)   # old crop centre, output coords
    half = torch.linalg.norm(base[:, :, :2], dim=1) / torch.linalg.norm(a, dim=1)   # crop half side, per axis
    assert torch.all(u.abs() <= 1 - half + 1e-5)


def test_zoom_out_off_draws_nothing(batch):
    base = RadiographAugment(AugmentConfig())(batch, generator=seeded(3))
    other = RadiographAugment(AugmentConfig(zoom_out=(1.5, 3.0)))(batch, generator=seeded(3))
    assert torch.equal(base, other)
    with pytest.raises(ValueError, match="zoom_out"):
        AugmentConfig(zoom_out=(0.5, 2.0))
    with pytest.raises(ValueError, match="zoom_out_p"):
        AugmentConfig(zoom_out_p=1.5)


def test_config_accepts_lists_and_validates():
    cfg = AugmentConfig(crop_scale=[0.4, 1.0])
    assert cfg.crop_scale == (0.4, 1.0)
    with pytest.raises(ValueError, match="crop_scale"):
        AugmentConfig(crop_scale=(0.5, 1.5))
    with pytest.raises(ValueError, match="low <= high"):
        AugmentConfig(brightness=(1.2, 0.8))
    with pytest.raises(ValueError, match="hflip_p"):
        AugmentConfig(hflip_p=2.0)
    with pytest.raises(ValueError, match="blur_p"):
        AugmentConfig(blur_p=-0.1)
    with pytest.raises(ValueError, match="blur_sigma"):
        AugmentConfig(blur_sigma=(-1.0, 1.0))
    assert AugmentConfig(blur_sigma=[0.0, 2.0]).blur_sigma == (0.0, 2.0)


def test_default_config_never_flips_vertically():
    assert AugmentConfig().vflip_p == 0.0


def test_uint8_to_unit_float():
    raw = torch.tensor([[[0, 255], [51, 102]]], dtype=torch.uint8)
    out = uint8_to_unit_float(raw)
    assert out.shape == (1, 1, 2, 2) and out.dtype == torch.float32
    assert torch.allclose(out.flatten(), torch.tensor([0.0, 1.0, 0.2, 0.4]))
