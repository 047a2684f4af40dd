"""Milliseconds of one fastnet training step (forward, backward, optimizer step) on random data, with or without
each CPU speed-up, so their effect can be checked on any machine.

    python benchmarks/fastnet_step.py [--batch-size 512] [--shape 32x32x3] [--widths 64,256,256]
        [--torch-layers] [--no-keep-freed-memory] [--frozen-whiten-bias] [--precision auto|bf16|fp32] [--compile]
        [--optimizer nesterov|muon]

--torch-layers swaps fastnet's Conv3x3 and MaxPool2x2 for torch's nn.Conv2d and nn.MaxPool2d (and turns the
fused kernel off);
--no-keep-freed-memory leaves glibc's default (a fresh mmap for every large tensor);
--frozen-whiten-bias times a step after whiten_bias_epochs; --compile runs the net through torch.compile
(inductor; best with --torch-layers, so that no custom autograd function breaks the graph). The precision
and layout are training's: auto is bf16 autocast with channels_last where the CPU has AMX or AVX512-BF16,
else fp32. IMGCLF_FUSED=0 in the environment times torch's max-pool, batch norm and GELU instead of the fused
kernel of imgclf/kernels.py. --optimizer muon times training's Muon (Newton-Schulz steps for the conv
filters) instead of Nesterov SGD. Nothing is saved.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from imgclf import kernels
from imgclf.config import TrainConfig
from imgclf.device import autocast, keep_freed_memory, memory_format, resolve_precision
from imgclf.models import Conv3x3, MaxPool2x2, create_model
from imgclf.optim import build_optimizer


def with_torch_layers(net: nn.Module) -> None:
    for block in net.blocks:
        for name in ("conv1", "conv2"):
            ours = getattr(block, name)
            plain = nn.Conv2d(ours.in_channels, ours.out_channels, 3, padding=1, bias=False)
            plain.weight.data.copy_(ours.weight.data)
            setattr(block, name, plain)
        if isinstance(block.pool, MaxPool2x2):
            block.pool = nn.MaxPool2d(2)
    assert not any(isinstance(m, Conv3x3 | MaxPool2x2) for m in net.modules())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--shape", default="32x32x3", help="input HxWxC")
    parser.add_argument("--widths", default="64,256,256")
    parser.add_argument("--torch-layers", action="store_true")
    parser.add_argument("--no-keep-freed-memory", action="store_true")
    parser.add_argument("--frozen-whiten-bias", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--optimizer", choices=("nesterov", "muon"), default="nesterov")
    args = parser.parse_args()
    if args.torch_layers:
        os.environ["IMGCLF_FUSED"] = "0"  # the fused kernel replaces torch's pool, batch norm and GELU
    if not args.no_keep_freed_memory:
        keep_freed_memory()
    size, _, channels = (int(v) for v in args.shape.split("x"))
    torch.manual_seed(0)
    net = create_model("fastnet", in_channels=channels, image_size=size,
                       widths=[int(w) for w in args.widths.split(",")])
    if args.torch_layers:
        with_torch_layers(net)
    net.whiten.bias.requires_grad_(not args.frozen_whiten_bias)
    precision = resolve_precision(args.precision, torch.device("cpu"))
    layout = memory_format(net, precision)
    net = net.to(memory_format=layout)
    optimizer = build_optimizer(net, TrainConfig(optimizer=args.optimizer, lr=0.01, muon_lr=0.01), precision)
    x = torch.randn(args.batch_size, channels, size, size).contiguous(memory_format=layout)
    y = torch.randint(0, 10, (args.batch_size,))
    forward = torch.compile(net) if args.compile else net

    def step() -> None:
        with autocast(torch.device("cpu"), precision):
            loss = F.cross_entropy(forward(x).float(), y, label_smoothing=0.2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):  # oneDNN picks its kernels on the first calls (and torch.compile compiles)
        step()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = (time.perf_counter() - started) / args.steps
    print(f"fastnet {args.widths} at {args.shape}, batch {args.batch_size}, {precision}"
          f"{', torch.compile' if args.compile else ''}{', fused kernel' if kernels.library() else ''}, "
          f"{args.optimizer}, "
          f"{torch.get_num_threads()} threads: "
          f"{seconds * 1000:.1f} ms a step, {args.batch_size / seconds:,.0f} img/s")


if __name__ == "__main__":
    main()
