"""Batched, device-agnostic augmentations for grey radiographs.

DeepCluster (Caron et al. 2018, §4) trains on random resized crops and horizontal flips; this
module keeps those and adds the nuisances real radiographs vary in: a small rotation (patient
positioning), and exposure differences (brightness, contrast, gamma) plus optional sensor
noise. Everything acts on a whole float batch ``(N, 1, S, S)`` in ``[0, 1]`` on whatever device
it is on, so the training loop can read uint8 from the cache, move it to the GPU and augment
there, with no per-image PIL work and no Python loop over images.

Geometry (crop + rotation + flips) is one affine per image, applied in a single
``affine_grid``/``grid_sample`` pass; areas that fall outside the image are filled with zeros
(black), which is what the background of most radiographs looks like anyway.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _as_range(value: tuple[float, float] | list[float], name: str) -> tuple[float, float]:
    low, high = (float(v) for v in value)
    if low > high:
        raise ValueError(f"{name} must be (low, high) with low <= high, got {value}")
    return low, high


@dataclass
class AugmentConfig:
    """Augmentation parameters; every jitter range is ``(low, high)`` of a multiplicative factor.

    * ``crop_scale`` / ``crop_ratio``: random resized crop, as fraction of the image area and
      width/height aspect ratio (as in torchvision's RandomResizedCrop); the crop is resized
      back to the input size.
    * ``rotation_degrees``: uniform rotation in ``[-d, d]`` about the crop centre.
    * ``hflip_p``: left/right mirroring. Left and right limbs are both in the data, so this is
      a true invariance.
    * ``vflip_p``: 0 by default: radiographs are displayed with a canonical "up" (fingers up on
      a hand film), and an upside-down image is not one the model will ever be asked to sort.
    * ``brightness``: ``x * b``; ``contrast``: ``(x - mean) * c + mean`` per image;
      ``gamma``: ``x ** g`` with ``g`` drawn log-uniformly, so (0.8, 1.25) is symmetric.
    * ``noise_std``: std of additive Gaussian noise (0 disables it).
    * ``blur_p``: probability of a Gaussian blur of ``blur_sigma`` pixels (uniform in that range,
      per image). Films reach the network from sources of other resolutions (a 64-px film
      enlarged to 96 px is soft, a 512-px one made smaller is sharp), so sharpness says where a
      film came from, not what it shows. 0 (the default) disables it and draws no random numbers.
    * ``shutter_p``: probability of drawing random collimation shutters on an image: each side,
      with probability 1/2, gets a band of up to ``shutter_max`` of the image side filled with one
      grey level drawn uniformly in [0, 1] per image (real films are collimated, the shutters
      dark or bright, so the network should not sort films by them). 0 disables it.
    * ``zoom_out_p``: probability of shrinking an image inside its frame after the crop, by a side
      factor drawn uniformly in ``zoom_out`` (e.g. (1, 2): down to half the side), at a random place,
      with black around it. How much of the frame a film fills says how it was framed (a scanned
      film in a black canvas, a tight collimation), not what it shows; it led stage-2 scores on
      real films (docs/RESULTS.md, issue 27) and splits stage-1 clusters. 0 (the default) disables
      it and draws no random numbers.
    * ``enabled=False`` makes the module return its input untouched (evaluation).
    """

    enabled: bool = True
    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    rotation_degrees: float = 15.0
    hflip_p: float = 0.5
    vflip_p: float = 0.0
    brightness: tuple[float, float] = (0.8, 1.2)
    contrast: tuple[float, float] = (0.8, 1.2)
    gamma: tuple[float, float] = (0.8, 1.25)
    noise_std: float = 0.0
    shutter_p: float = 0.0
    shutter_max: float = 0.15
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.5, 1.5)
    zoom_out_p: float = 0.0
    zoom_out: tuple[float, float] = (1.0, 2.0)

    def __post_init__(self) -> None:
        # Accept lists (YAML) and validate once, so bad configs fail before training starts.
        self.crop_scale = _as_range(self.crop_scale, "crop_scale")
        self.crop_ratio = _as_range(self.crop_ratio, "crop_ratio")
        self.brightness = _as_range(self.brightness, "brightness")
        self.contrast = _as_range(self.contrast, "contrast")
        self.gamma = _as_range(self.gamma, "gamma")
        self.blur_sigma = _as_range(self.blur_sigma, "blur_sigma")
        self.zoom_out = _as_range(self.zoom_out, "zoom_out")
        if self.zoom_out[0] < 1.0:
            raise ValueError(f"zoom_out factors must be >= 1 (1 = no shrinking), got {self.zoom_out}")
        if not (0.0 < self.crop_scale[0] and self.crop_scale[1] <= 1.0):
            raise ValueError(f"crop_scale must lie in (0, 1], got {self.crop_scale}")
        if self.crop_ratio[0] <= 0.0:
            raise ValueError(f"crop_ratio must be positive, got {self.crop_ratio}")
        if self.gamma[0] <= 0.0:
            raise ValueError(f"gamma must be positive, got {self.gamma}")
        if self.brightness[0] < 0.0 or self.contrast[0] < 0.0:
            raise ValueError("brightness and contrast factors must be >= 0")
        if not 0.0 <= self.shutter_max < 0.5:
            raise ValueError(f"shutter_max must be in [0, 0.5), got {self.shutter_max}")
        if self.blur_sigma[0] < 0.0:
            raise ValueError(f"blur_sigma must be >= 0 pixels, got {self.blur_sigma}")
        for name in ("hflip_p", "vflip_p", "shutter_p", "blur_p", "zoom_out_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        if self.rotation_degrees < 0.0 or self.noise_std < 0.0:
            raise ValueError("rotation_degrees and noise_std must be >= 0")

    @classmethod
    def identity(cls) -> AugmentConfig:
        """An enabled config whose every transform is a no-op (exercises the full code path)."""
        return cls(
            crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), rotation_degrees=0.0, hflip_p=0.0, vflip_p=0.0,
            brightness=(1.0, 1.0), contrast=(1.0, 1.0), gamma=(1.0, 1.0), noise_std=0.0,
        )


# --------------------------------------------------------------------------- random draws


def _rng_device(generator: torch.Generator | None) -> torch.device:
    # Parameters are drawn where the generator lives (the CPU global RNG by default), so a seed
    # gives the same augmentation whichever device the images are on.
    return generator.device if generator is not None else torch.device("cpu")


def _uniform(low: float, high: float, n: int, generator: torch.Generator | None) -> Tensor:
    """``n`` draws from U(low, high), shape ``(n,)``. Always consumes ``n`` numbers, even if low == high,
    so switching one transform off does not change the draws of the others."""
    u = torch.rand(n, generator=generator, device=_rng_device(generator))
    return low + (high - low) * u


def _bernoulli(p: float, n: int, generator: torch.Generator | None) -> Tensor:
    """``n`` booleans, True with probability ``p``, shape ``(n,)``."""
    return torch.rand(n, generator=generator, device=_rng_device(generator)) < p


# --------------------------------------------------------------------------- geometry


def sample_affine(
    n: int, height: int, width: int, cfg: AugmentConfig, generator: torch.Generator | None = None
) -> Tensor:
    """Draw one crop + rotation + flip affine per image, as ``affine_grid`` thetas ``(n, 2, 3)``.

    ``theta`` maps output coordinates ``u`` (normalised to [-1, 1]) to input coordinates
    ``p = t + R @ S @ F @ u``: flip the output (F = diag(+-1, +-1)), shrink it to the crop size
    (S = diag(w, h) as fractions of the image side), rotate it about the crop centre (R, a
    rotation in pixel space expressed in normalised coordinates), and move it to the crop
    centre ``t``, drawn so that the unrotated crop lies inside the image. With ``cfg.zoom_out_p``
    the output window grows past the crop by the zoom factor (the crop shrinks inside the frame),
    its centre drawn so that the crop stays inside the window; the rest samples zeros.
    Draws come from ``generator`` on its device; thetas are float32 on that device.
    """
    scale = _uniform(*cfg.crop_scale, n, generator)
    log_ratio = _uniform(math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1]), n, generator)
    ratio = torch.exp(log_ratio)
    # Crop sides as fractions of the image sides, for area fraction `scale` and aspect `ratio`
    # (width / height) in pixels; clamped because an extreme ratio cannot fit otherwise.
    crop_w = torch.sqrt(scale * ratio * height / width).clamp(max=1.0)
    crop_h = torch.sqrt(scale / ratio * width / height).clamp(max=1.0)
    # The (1 - 1/side) factor keeps the outermost output pixel centres on or inside the outermost
    # input pixel centres, so bilinear sampling never mixes in the zero padding at a crop edge.
    centre_x = (1.0 - crop_w) * (1.0 - 1.0 / width) * _uniform(-1.0, 1.0, n, generator)
    centre_y = (1.0 - crop_h) * (1.0 - 1.0 / height) * _uniform(-1.0, 1.0, n, generator)

    angle = torch.deg2rad(_uniform(-cfg.rotation_degrees, cfg.rotation_degrees, n, generator))
    flip_x = 1.0 - 2.0 * _bernoulli(cfg.hflip_p, n, generator).float()
    flip_y = 1.0 - 2.0 * _bernoulli(cfg.vflip_p, n, generator).float()
    if cfg.zoom_out_p > 0:   # drawn last, so the draws above stay as they were without it
        zoomed = _bernoulli(cfg.zoom_out_p, n, generator)
        zoom = torch.where(zoomed, _uniform(*cfg.zoom_out, n, generator), torch.ones(n, device=zoomed.device))
        # The window (zoom x the crop) moves the crop anywhere inside it: its centre shifts by up to
        # (zoom - 1) x the crop's half side, in the rotated, flipped frame of the window.
        shift_x = (zoom - 1.0) * crop_w * _uniform(-1.0, 1.0, n, generator)
        shift_y = (zoom - 1.0) * crop_h * _uniform(-1.0, 1.0, n, generator)
        cos, sin = torch.cos(angle), torch.sin(angle)
        centre_x = centre_x + cos * shift_x - sin * (height / width) * shift_y
        centre_y = centre_y + sin * (width / height) * shift_x + cos * shift_y
        crop_w, crop_h = crop_w * zoom, crop_h * zoom

    cos, sin = torch.cos(angle), torch.sin(angle)
    sx, sy = crop_w * flip_x, crop_h * flip_y
    # R @ diag(sx, sy), with R = [[cos, -sin*H/W], [sin*W/H, cos]] (pixel rotation in [-1, 1] coords).
    row_x = torch.stack([cos * sx, -sin * (height / width) * sy, centre_x], dim=1)
    row_y = torch.stack([sin * (width / height) * sx, cos * sy, centre_y], dim=1)
    return torch.stack([row_x, row_y], dim=1)


def apply_affine(x: Tensor, theta: Tensor) -> Tensor:
    """Resample ``x`` ``(N, C, H, W)`` through per-image affines ``theta`` ``(N, 2, 3)``; zeros outside."""
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def blur(x: Tensor, p: float, sigma: tuple[float, float], generator: torch.Generator | None = None) -> Tensor:
    """Gaussian blur of ``x`` ``(N, C, H, W)`` with probability ``p`` per image, its sigma drawn
    uniformly in ``sigma`` (pixels). One separable convolution for the whole batch: each image
    gets its own kernel (grouped convolution), sigma 0 is the identity. Edges are replicated, so a
    blurred flat image stays flat. With ``p <= 0`` nothing is drawn and ``x`` is returned."""
    if p <= 0.0:
        return x
    n, c, height, width = x.shape
    apply = _bernoulli(p, n, generator)
    sigmas = _uniform(*sigma, n, generator) * apply.float()
    radius = max(1, math.ceil(3.0 * sigma[1]))
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    s = sigmas.to(device=x.device, dtype=x.dtype).clamp(min=1e-3).repeat_interleave(c).view(-1, 1)
    kernel = torch.exp(-0.5 * (offsets / s) ** 2)             # (N*C, 2r+1); a near-0 sigma is a delta
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    flat = x.reshape(1, n * c, height, width)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="replicate"), kernel.view(n * c, 1, 1, -1), groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="replicate"), kernel.view(n * c, 1, -1, 1), groups=n * c)
    return flat.view(n, c, height, width)


# --------------------------------------------------------------------------- intensity


def _per_image(values: Tensor, like: Tensor) -> Tensor:
    """``(N,)`` -> ``(N, 1, 1, 1)`` on ``like``'s device and dtype, for broadcasting over pixels."""
    return values.to(device=like.device, dtype=like.dtype).view(-1, 1, 1, 1)


def jitter_intensity(x: Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None) -> Tensor:
    """Per-image gamma, contrast and brightness jitter on ``x`` ``(N, 1, H, W)`` in [0, 1].

    Gamma comes first, while values are still in [0, 1] where ``x ** g`` is a monotone
    exposure curve; contrast is taken about each image's own mean.
    """
    n = x.shape[0]
    log_gamma = _uniform(math.log(cfg.gamma[0]), math.log(cfg.gamma[1]), n, generator)
    contrast = _uniform(*cfg.contrast, n, generator)
    brightness = _uniform(*cfg.brightness, n, generator)

    x = x.clamp(0.0, 1.0).pow(_per_image(torch.exp(log_gamma), x))
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * _per_image(contrast, x) + mean
    return x * _per_image(brightness, x)


def add_shutters(x: Tensor, p: float, max_inset: float, generator: torch.Generator | None = None) -> Tensor:
    """Random collimation shutters on ``x`` ``(N, 1, H, W)``: with probability ``p`` per image, each
    side (left, right, top, bottom) independently with probability 1/2 is covered by a band of
    ``U(0, max_inset)`` of the image side, filled with one level ``U(0, 1)`` per image."""
    if p <= 0.0:
        return x
    n, _, height, width = x.shape
    apply = _bernoulli(p, n, generator)
    sides = _bernoulli(0.5, 4 * n, generator).view(n, 4) & apply.unsqueeze(1)
    insets = _uniform(0.0, max_inset, 4 * n, generator).view(n, 4) * sides.float()
    level = _uniform(0.0, 1.0, n, generator)
    cols = (torch.arange(width, device=x.device, dtype=x.dtype) + 0.5) / width
    rows = (torch.arange(height, device=x.device, dtype=x.dtype) + 0.5) / height
    ins = insets.to(device=x.device, dtype=x.dtype)
    keep_x = (cols >= ins[:, 0:1]) & (cols <= 1.0 - ins[:, 1:2])           # (N, W)
    keep_y = (rows >= ins[:, 2:3]) & (rows <= 1.0 - ins[:, 3:4])           # (N, H)
    keep = (keep_y.unsqueeze(2) & keep_x.unsqueeze(1)).unsqueeze(1).to(x.dtype)  # (N, 1, H, W)
    return x * keep + _per_image(level, x) * (1.0 - keep)


def add_noise(x: Tensor, std: float, generator: torch.Generator | None = None) -> Tensor:
    """Add N(0, std^2) noise. The noise is drawn on ``x``'s device (a full-size tensor is too big
    to ship from the CPU every batch) by a generator seeded from ``generator``, so it is still
    reproducible from one seed, on a given device."""
    if std <= 0.0:
        return x
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=_rng_device(generator)).item())
    noise_generator = torch.Generator(device=x.device).manual_seed(seed)
    noise = torch.randn(x.shape, generator=noise_generator, device=x.device, dtype=x.dtype)
    return x + std * noise


# --------------------------------------------------------------------------- module


class RadiographAugment(nn.Module):
    """Random crop/rotation/flip + exposure jitter for a batch ``(N, 1, H, W)`` in [0, 1].

    ``forward(x, generator=None)`` returns a new batch of the same shape, dtype and device,
    clamped to [0, 1]. The same generator state gives the same output; with ``generator=None``
    the global CPU RNG is used (reproducible after ``torch.manual_seed``). With
    ``cfg.enabled == False`` the input is returned unchanged.
    """

    def __init__(self, cfg: AugmentConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else AugmentConfig()

    @property
    def enabled(self) -> bool:
        return self.cfg.enabled

    @torch.no_grad()  # data preparation: never part of the autograd graph
    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if x.ndim != 4 or not x.is_floating_point():
            raise ValueError(f"expected a float batch (N, C, H, W), got {x.dtype} of shape {tuple(x.shape)}")
        if not self.enabled or x.shape[0] == 0:
            return x
        n, _, height, width = x.shape
        x = apply_affine(x, sample_affine(n, height, width, self.cfg, generator))
        # (draws nothing when off, so the other transforms' draws stay as they were before it)
        x = blur(x, self.cfg.blur_p, self.cfg.blur_sigma, generator)
        x = jitter_intensity(x, self.cfg, generator)
        x = add_noise(x, self.cfg.noise_std, generator)
        x = add_shutters(x, self.cfg.shutter_p, self.cfg.shutter_max, generator)
        return x.clamp_(0.0, 1.0)

    def extra_repr(self) -> str:
        return repr(self.cfg)


def uint8_to_unit_float(images: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 grey images ``(N, H, W)`` or ``(N, 1, H, W)`` -> float ``(N, 1, H, W)`` in [0, 1], same device.

    Convert after moving to the GPU: the uint8 batch is 4x smaller to transfer.
    """
    if images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")
    if images.ndim == 3:
        images = images.unsqueeze(1)
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"expected (N, H, W) or (N, 1, H, W), got {tuple(images.shape)}")
    return images.to(dtype).div_(255.0)
