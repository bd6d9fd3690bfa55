"""Device selection, mixed-precision policy and seeding, shared by training and evaluation.

Everything else in the package takes a :class:`torch.device` and never assumes CUDA, so the
same code runs on NVIDIA GPUs, Apple silicon (MPS) and plain CPUs.
"""

from __future__ import annotations

import random

import numpy as np
import torch

_KNOWN_TYPES = ("cuda", "mps", "cpu")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def pick_device(name: str | torch.device = "auto") -> torch.device:
    """Resolve a device name to a usable :class:`torch.device`.

    ``"auto"`` prefers CUDA, then MPS, then CPU. An explicit ``"cuda"``, ``"cuda:1"``, ``"mps"``
    or ``"cpu"`` is checked here, so a typo or a missing GPU fails at start-up with a message
    that says what is available, rather than deep inside the first forward pass.
    """
    if isinstance(name, torch.device):
        name = str(name)
    name = name.strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"unknown device {name!r}; use 'auto', 'cuda', 'cuda:N', 'mps' or 'cpu'") from err
    if device.type not in _KNOWN_TYPES:
        raise ValueError(f"unsupported device {name!r}; use 'auto', 'cuda', 'cuda:N', 'mps' or 'cpu'")
    _check_available(device)
    return device


def _check_available(device: torch.device) -> None:
    """Raise a RuntimeError naming the device when it cannot be used on this machine."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"device {str(device)!r} requested but CUDA is not available "
                "(no NVIDIA GPU, or torch was built without CUDA); use device='auto' or 'cpu'"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise RuntimeError(f"device {str(device)!r} requested but only {count} CUDA device(s) are visible")
    elif device.type == "mps":
        if not _mps_available():
            raise RuntimeError(
                f"device {str(device)!r} requested but MPS (Apple silicon GPU) is not available; "
                "use device='auto' or 'cpu'"
            )


def cpu_has_native_bf16() -> bool:
    """Whether this CPU does bfloat16 maths in hardware (AVX512-BF16 or AMX tiles).

    There oneDNN's bfloat16 convolutions beat float32 by far (ResNet-18 at 96 px on a 2-core
    Intel CPU with AMX: training 2.1x, the forward pass 3x; docs/BENCHMARKS.md); elsewhere
    bfloat16 is emulated and slower than float32.
    """
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except (AttributeError, RuntimeError):   # an older torch, or a build without the probes
        return False


def amp_enabled(device: torch.device | str, cpu: bool = False) -> bool:
    """Whether to train with automatic mixed precision: on CUDA always; on a CPU only when asked
    (``cpu``, the ``train.cpu_amp`` setting) and the CPU does bfloat16 in hardware
    (:func:`cpu_has_native_bf16`).

    MPS autocast support is still partial, so MPS stays in float32.
    """
    kind = torch.device(device).type
    return kind == "cuda" or (kind == "cpu" and cpu and cpu_has_native_bf16())


def amp_dtype(device: torch.device | str) -> torch.dtype:
    """The autocast dtype on ``device``: bfloat16 on a CPU; on CUDA bfloat16 only where the GPU
    does it in hardware (Ampere on); emulated bf16 on a V100 or T4 is slow, so those use float16
    with a loss scaler."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.bfloat16
    with torch.cuda.device(device):
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def mixed_precision(train_cfg, device: torch.device | str) -> tuple[bool, torch.dtype]:
    """``(use autocast, its dtype)`` for a :class:`~bonecluster.config.TrainConfig` (``amp``,
    ``cpu_amp``) on ``device``; the dtype is float16 (unused) when autocast is off."""
    use = bool(train_cfg.amp) and amp_enabled(device, cpu=bool(train_cfg.cpu_amp))
    return use, (amp_dtype(device) if use else torch.float16)


def one_pixel_strided_convs(model: torch.nn.Module, size: int) -> list[str]:
    """The strided convolution modules (stride and kernel > 1) that a ``(1, 1, size, size)`` film
    reaches as a map one pixel high or wide, by name, found with one eager forward pass
    (``model.features`` when it has one, never compiled; a DDP wrapper is looked through). A
    forward pass that raises (a ViT built for another size) gives the ones reached before it.

    Measured here (``benchmarks/bench_bf16_conv_grad.py``; torch 2.14.1, 2-core AMD EPYC with
    AVX512-BF16, other CPUs untested): the bfloat16 weight gradient of a 3x3 or 5x5 stride-2
    convolution over a 1x1 map was garbage or NaN in 6-12 of 12 calls (a depthwise 3x3 one's in 1 of
    12), while 1x1 stride-2 and 3x3 stride-1 convolutions there, every one over 2x2 maps, the input
    gradients and float32 were right. Every strided convolution over a one-pixel map is treated as
    suspect. A ResNet with the ImageNet stem gives layer4 1x1 maps from 16-px films down (with
    ``model.small_input`` from 4 px).
    """
    import torch._dynamo   # its switch runs a compiled backbone eagerly

    model = getattr(model, "module", model)
    device = next(model.parameters()).device
    modes = {module: module.training for module in model.modules()}
    names = []
    hooks = [module.register_forward_pre_hook(lambda _, args, name=name: names.append(name)
                                              if min(args[0].shape[-2:]) == 1 else None)
             for name, module in model.named_modules()
             if isinstance(module, torch.nn.Conv2d) and max(module.stride) > 1 and max(module.kernel_size) > 1]
    try:
        model.eval()
        with torch.no_grad(), torch._dynamo.config.patch(disable=True):   # eager, also under train.compile
            getattr(model, "features", model)(torch.zeros(1, 1, size, size, device=device))
    except (RuntimeError, ValueError, AssertionError):   # a backbone built for another size
        pass
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in modes.items():
            module.training = training
    return names


def cpu_bf16_hazard(model: torch.nn.Module, size: int, device: torch.device, dtype: torch.dtype) -> list[str]:
    """:func:`one_pixel_strided_convs` at ``size`` where ``model``'s backbone would train in
    bfloat16 on a CPU, else ``[]`` (the callers then train those films in float32). A frozen
    backbone computes no convolution gradient, so it has none."""
    backbone = getattr(getattr(model, "module", model), "backbone", model)
    if torch.device(device).type != "cpu" or dtype != torch.bfloat16:
        return []
    if not any(p.requires_grad for p in backbone.parameters()):
        return []
    return one_pixel_strided_convs(model, size)


def bf16_fallback_message(setting: str, size: int, hazard: list[str], outcome: str) -> str:
    """The warning when :func:`cpu_bf16_hazard` finds ``hazard`` at ``setting`` = ``size`` px."""
    return (f"{setting}: at {size} px the network's {', '.join(hazard)} sees 1x1 maps, where this CPU's bfloat16 "
            f"weight gradient may be wrong (NaN or garbage; docs/RELIABILITY.md): {outcome}")


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global RNG and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # NumPy only takes 32-bit seeds
    torch.manual_seed(seed)  # also seeds all CUDA devices (lazily) and MPS
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
