"""Where a fastnet training step goes: each 3x3 conv's forward, input gradient and weight gradient.

    python benchmarks/conv_backward.py [--batch-size 512] [--widths 64,256,256] [--shape 32x32x3] [--seconds 1]

Times the three parts of every conv of fastnet (bf16, channels_last, the trainer's settings) with
torch's own kernels, plus a plain matrix product of the weight gradient's size, which is what the weight
gradient would cost at the processor's matmul speed. Prints a Markdown table; nothing is saved.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def milliseconds(fn, min_seconds: float = 1.0) -> float:
    fn()
    runs, started = 0, time.perf_counter()
    while runs < 3 or time.perf_counter() - started < min_seconds:
        fn()
        runs += 1
    return (time.perf_counter() - started) / runs * 1000


def conv_shapes(widths: list[int], height: int, channels: int) -> list[tuple[int, int, int]]:
    """(in channels, out channels, spatial size) of fastnet's 3x3 convs: whitening k=2, a 2x pool per block."""
    shapes, c, size = [], 2 * channels * 4, height - 1
    for width in widths:
        shapes.append((c, width, size))
        size //= 2
        shapes.append((width, width, size))
        c = width
    return shapes


def time_conv(n: int, c_in: int, c_out: int, size: int, seconds: float) -> list[float]:
    """Milliseconds of forward, input gradient, weight gradient and a matmul of the weight gradient's size."""
    def bf16(*shape):
        return torch.randn(*shape).bfloat16().contiguous(memory_format=torch.channels_last)
    x, w, grad = bf16(n, c_in, size, size), bf16(c_out, c_in, 3, 3), bf16(n, c_out, size, size)

    def backward(mask):
        return torch.ops.aten.convolution_backward(grad, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask)
    # The weight gradient is a (c_out x n*size*size) by (n*size*size x 9*c_in) product.
    a, b = torch.randn(c_out, n * size * size).bfloat16(), torch.randn(n * size * size, 9 * c_in).bfloat16()
    kernels = [lambda: F.conv2d(x, w, padding=1), lambda: backward([True, False, False]),
               lambda: backward([False, True, False]), lambda: a @ b]
    return [milliseconds(kernel, seconds) for kernel in kernels]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--widths", default="64,256,256")
    parser.add_argument("--shape", default="32x32x3", help="input HxWxC")
    parser.add_argument("--seconds", type=float, default=1.0, help="time each kernel for at least this long")
    args = parser.parse_args()
    from imgclf.device import keep_freed_memory

    keep_freed_memory()  # as training does: without it, page faults on fresh outputs inflate every figure
    height, _, channels = (int(v) for v in args.shape.split("x"))
    n = args.batch_size
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {n}, bf16 channels_last\n")
    print("| conv | forward ms | input grad ms | weight grad ms | same-size matmul ms | weight grad TFLOP/s |")
    print("|---|---:|---:|---:|---:|---:|")
    totals = [0.0] * 4
    for c_in, c_out, size in conv_shapes([int(w) for w in args.widths.split(",")], height, channels):
        times = time_conv(n, c_in, c_out, size, args.seconds)
        totals = [t + s for t, s in zip(totals, times, strict=True)]
        flops = 2 * c_out * n * size * size * 9 * c_in
        print(f"| {c_in}->{c_out} at {size}x{size} | " + " | ".join(f"{t:.1f}" for t in times)
              + f" | {flops / times[2] / 1e9:.2f} |")
    print("| total | " + " | ".join(f"{t:.1f}" for t in totals) + " | |")


if __name__ == "__main__":
    main()
