"""Is this machine's bfloat16 convolution weight gradient right? A check of the fault in PyTorch's
CPU bfloat16 convolution that :func:`bonecluster.device.one_pixel_strided_convs` steers training around.

    python benchmarks/bench_bf16_conv_grad.py [--reps 12] [--device cpu] [--json OUT]

For a ResNet-18's 3x3 (stride 2 and 1) and 1x1 stride-2 convolutions, a 5x5 stride-2 one and a
depthwise 3x3 stride-2 one (EfficientNet-like), 256 channels in and a batch of 48, over maps of 1, 2
and 3 pixels, it compares the gradients computed under bfloat16 autocast with a float32 computation
from the same bfloat16-rounded inputs, ``--reps`` times with fresh random inputs, and prints how many
calls were wrong (off by more than 5 % of the gradient's largest entry, or not finite): the weight
gradient in both memory layouts, the input gradient, and float32 itself as a control.

On 2026-12-07 (torch 2.14.1, 2-core AMD EPYC with AVX512-BF16, no AMX) the weight gradient of the
3x3 and 5x5 stride-2 convolutions over a 1x1 map was wrong in 6-12 of 12 calls over three runs
(garbage up to 1e35, or NaN), the depthwise one's in 1 of 12 (channels-last); every other cell, every
input gradient and float32 were right.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

# (name, kernel, stride, padding, depthwise)
SHAPES = [("3x3 s2", 3, 2, 1, False), ("3x3 s1", 3, 1, 1, False), ("1x1 s2", 1, 2, 0, False),
          ("5x5 s2", 5, 2, 2, False), ("3x3 s2 depthwise", 3, 2, 1, True)]


def wrong_calls(kernel: int, stride: int, padding: int, depthwise: bool, side: int, bf16: bool, channels_last: bool,
                reps: int, device: torch.device, generator: torch.Generator, channels: int = 256,
                batch: int = 48) -> tuple[int, int]:
    """How many of ``reps`` (weight, input) gradients of one convolution over ``side``-px maps were wrong."""
    out_channels = channels if depthwise else 2 * channels
    conv = torch.nn.Conv2d(channels, out_channels, kernel, stride, padding, groups=channels if depthwise else 1,
                           bias=False).to(device)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    conv = conv.to(memory_format=layout)
    out_side = (side + 2 * padding - kernel) // stride + 1
    wrong_weight = wrong_input = 0
    for _ in range(reps):
        x = torch.randn(batch, channels, side, side, generator=generator).to(device)
        x = (x.to(torch.bfloat16) if bf16 else x).contiguous(memory_format=layout).requires_grad_()
        upstream = torch.randn(batch, out_channels, out_side, out_side, generator=generator).to(device)
        if bf16:   # the float32 reference sees the same rounded numbers
            upstream = upstream.to(torch.bfloat16).float()
        conv.weight.grad = None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = conv(x)
        out.float().backward(upstream)
        weight = conv.weight.detach().clone().requires_grad_()
        x_ref = x.detach().float().requires_grad_()
        F.conv2d(x_ref, weight, None, stride, padding, groups=conv.groups).backward(upstream)
        wrong_weight += not _close(conv.weight.grad, weight.grad)
        wrong_input += not _close(x.grad.float(), x_ref.grad)
    return wrong_weight, wrong_input


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return bool((got - want).abs().max() <= 0.05 * want.abs().max() + 1e-3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=12, help="calls per shape (default 12)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="also write the table here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    rows = []
    print(f"torch {torch.__version__}, {device}, {args.reps} calls per cell; wrong gradients:")
    columns = ("weight, bf16 channels-last", "weight, bf16 default", "input, bf16 default", "float32 control")
    print("convolution | map | " + " | ".join(columns))
    for name, kernel, stride, padding, depthwise in SHAPES:
        for side in (1, 2, 3):
            weight_cl = wrong_calls(kernel, stride, padding, depthwise, side, True, True, args.reps, device, generator)[0]
            weight, inputs = wrong_calls(kernel, stride, padding, depthwise, side, True, False, args.reps, device,
                                         generator)
            control = wrong_calls(kernel, stride, padding, depthwise, side, False, False, args.reps, device, generator)
            cells = dict(zip(columns, (weight_cl, weight, inputs, max(control))))
            rows.append({"convolution": name, "side": side, **cells})
            print(f"{name} | {side}x{side} | " + " | ".join(f"{v}/{args.reps}" for v in cells.values()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "device": str(device), "reps": args.reps, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
