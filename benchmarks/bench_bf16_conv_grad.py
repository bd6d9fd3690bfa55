"""Is this machine's bfloat16 convolution weight gradient right? A check of the fault in PyTorch's
CPU bfloat16 convolution that :func:`bonecluster.device.one_pixel_strided_convs` steers training around.

    python benchmarks/bench_bf16_conv_grad.py [--reps 12] [--device cpu] [--json OUT]

For three of a ResNet-18's convolution shapes (3x3 with stride 2 and 1, and the 1x1 stride-2
shortcut; not the 7x7 stem), 256 to 512 channels and a batch of 48, over maps of 1, 2 and 3
pixels, it compares the weight gradient (only that) computed under bfloat16 autocast with a
float32 computation from the same bfloat16-rounded inputs, ``--reps`` times with fresh random
inputs, and prints how many calls were wrong (off by more than 5 % of the gradient's largest
entry, or not finite), next to float32 itself as a control.

On 2026-12-07 (torch 2.14.1, 2-core AMD EPYC with AVX512-BF16, no AMX) the 3x3 stride-2 padding-1
convolution over a 1x1 map was wrong in 6-7 of 12 calls in channels-last layout and 10-11 of 12 in
the default one over two runs (garbage up to 1e35, or NaN); every other shape, and float32
throughout, was right.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

# (kernel, stride, padding) of a ResNet-18's convolutions
SHAPES = [(3, 2, 1), (3, 1, 1), (1, 2, 0)]


def wrong_calls(kernel: int, stride: int, padding: int, side: int, bf16: bool, channels_last: bool, reps: int,
                device: torch.device, generator: torch.Generator, channels: int = 256, batch: int = 48) -> int:
    """How many of ``reps`` weight gradients of one convolution over ``side``-px maps were wrong."""
    conv = torch.nn.Conv2d(channels, 2 * channels, kernel, stride, padding, bias=False).to(device)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    conv = conv.to(memory_format=layout)
    out_side = (side + 2 * padding - kernel) // stride + 1
    wrong = 0
    for _ in range(reps):
        x = torch.randn(batch, channels, side, side, generator=generator).to(device)
        x = (x.to(torch.bfloat16) if bf16 else x).contiguous(memory_format=layout)
        upstream = torch.randn(batch, 2 * channels, out_side, out_side, generator=generator).to(device)
        if bf16:   # the float32 reference sees the same rounded numbers
            upstream = upstream.to(torch.bfloat16).float()
        conv.weight.grad = None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = conv(x)
        out.float().backward(upstream)
        weight = conv.weight.detach().clone().requires_grad_()
        F.conv2d(x.float(), weight, None, stride, padding).backward(upstream)
        error = (conv.weight.grad - weight.grad).abs().max()
        wrong += not bool(error <= 0.05 * weight.grad.abs().max() + 1e-3)
    return wrong


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
    print(f"torch {torch.__version__}, {device}, {args.reps} calls per cell; wrong weight gradients:")
    print("kernel stride pad | map | bf16 channels-last | bf16 default | float32 channels-last | float32 default")
    for kernel, stride, padding in SHAPES:
        for side in (1, 2, 3):
            cells = {f"{'bf16' if bf16 else 'float32'} {'channels-last' if cl else 'default'}":
                     wrong_calls(kernel, stride, padding, side, bf16, cl, args.reps, device, generator)
                     for bf16 in (True, False) for cl in (True, False)}
            rows.append({"kernel": kernel, "stride": stride, "padding": padding, "side": side, **cells})
            print(f"{kernel}x{kernel} s{stride} p{padding} | {side}x{side} | "
                  + " | ".join(f"{v}/{args.reps}" for v in cells.values()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "device": str(device), "reps": args.reps, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
