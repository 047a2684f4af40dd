"""The machine: which device, and which precision and memory layout run fastest on it; the CPU's name."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
from pathlib import Path

import torch

from imgclf.config import DEVICES
from imgclf.errors import ImgclfError


@functools.cache
def cpuinfo() -> str:
    """/proc/cpuinfo's text, or "" where there is none (macOS, Windows)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def usable_cpus() -> int:
    """The CPUs this process may run on (a container's or taskset's share), where the system says; else all."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_name() -> str:
    names = [line.split(":", 1)[1].strip() for line in cpuinfo().splitlines() if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def cpu_bf16_units() -> str | None:
    """The CPU's bf16 matrix instructions: "AMX", "AVX512-BF16" (e.g. AMD Zen 4) or None."""
    flags = cpuinfo()
    return "AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else None


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16 make bf16 convolutions 2-4x faster than fp32; elsewhere bf16 is slower."""
    return cpu_bf16_units() is not None


def resolve_device(name: str | torch.device) -> torch.device:
    """'auto' is the GPU where there is one; 'cuda:1' names one of several."""
    kind, _, index = str(name).partition(":")
    if kind not in DEVICES or (index and not (kind == "cuda" and index.isdigit())):
        raise ImgclfError(f"unknown device {name!r}; use one of {', '.join(DEVICES)} (cuda:N for one of several GPUs)")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise ImgclfError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def visible_gpus() -> list[str]:
    """This process's GPUs as CUDA_VISIBLE_DEVICES names them (their indices where it is unset)."""
    count = torch.cuda.device_count()
    listed = [name.strip() for name in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if name.strip()]
    return listed[:count] if listed else [str(i) for i in range(count)]


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision a run trains in: "auto" is the fastest one the device has."""
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            raise ImgclfError("fp16 is for CUDA GPUs; use --precision bf16 or fp32 on the CPU")
        return precision
    if device.type == "cuda":
        return "bf16" if _gpu_has_bf16() else "fp16"
    # Measured (benchmarks/RESULTS.md, throughput): bf16 trains every registered model faster than fp32, from
    # 1.5x (mlp, lenet) to 4x (resnet18) with AMX, 1.6x to 2.3x with AVX512-BF16 alone (Zen 4); without either
    # it is slower.
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def _gpu_has_bf16() -> bool:
    return torch.cuda.is_bf16_supported(including_emulation=False)  # not T4, V100 and older


def slow_precision(precision: str, device: torch.device) -> str | None:
    """Why training in `precision` on `device` would be slow, or None."""
    if precision == "bf16" and device.type == "cpu" and not cpu_has_fast_bf16():
        # Measured on an AMD EPYC with AVX2 only: a fastnet step 12x slower in bf16 than in fp32.
        return ("this CPU has no AMX or AVX512-BF16, so bf16 runs several times slower than fp32 here; use "
                "--precision auto or fp32")
    if precision == "bf16" and device.type == "cuda" and not _gpu_has_bf16():
        return "this GPU has no bf16 units, so bf16 is emulated here; use --precision auto (fp16) or fp32"
    return None


def prediction_precision(run_precision: str, device: torch.device) -> str:
    """The run's precision, unless this device lacks it: a run trained in bf16 on a CPU with AMX, or in fp16 on a
    GPU, is predicted in fp32 on a CPU without fast bf16, where bf16 runs many times slower (fastnet trained at
    8 against 101 img/s on an AVX2 EPYC, benchmarks/RESULTS.md), and fp16 is never used on a CPU. A bf16 run is
    never predicted in fp16 on a GPU without bf16: activations that bf16 holds can overflow fp16 to inf."""
    if run_precision == "fp32" or (run_precision == "fp16" and device.type == "cuda"):
        return run_precision
    if device.type == "cuda":
        return "bf16" if _gpu_has_bf16() else "fp32"
    return resolve_precision("auto", device)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def memory_format(net: torch.nn.Module, precision: str) -> torch.memory_format:
    """channels_last for convnets in reduced precision (oneDNN's fast bf16 layout on AMX CPUs) and in fp32 on
    CPUs without fast bf16 (faster on an AVX2 EPYC: the throughput rows at 6521ec7 in benchmarks/RESULTS.md),
    else contiguous."""
    if not any(isinstance(m, torch.nn.Conv2d) for m in net.modules()):
        return torch.contiguous_format
    on_cpu = next(net.parameters()).device.type == "cpu"
    fp32_fast = precision == "fp32" and on_cpu and not cpu_has_fast_bf16()
    return torch.channels_last if precision != "fp32" or fp32_fast else torch.contiguous_format


@functools.cache  # once per process: training and every prediction call ask for it
def keep_freed_memory() -> None:
    """Let glibc's malloc keep and reuse freed blocks instead of handing every large one back to the system.

    By default each block above 32 MB (a batch of activations or their gradients) is a fresh mmap whose pages
    fault in on first touch, every step: 7-13% of a fastnet step on CIFAR-10 (benchmarks/fastnet_step.py
    --no-keep-freed-memory). The process keeps its peak heap until it ends. Elsewhere (macOS, musl) a no-op.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-4, 0)  # M_MMAP_MAX: serve large blocks from the heap, not from mmap
    libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: never shrink the heap
