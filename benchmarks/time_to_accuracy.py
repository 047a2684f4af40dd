"""Measure time-to-accuracy of a recipe (or a model), or the raw throughput of every registered model.

    python benchmarks/time_to_accuracy.py --recipe mnist-fast --runs 3 [--dataset D] [--data-dir DIR]
    python benchmarks/time_to_accuracy.py --model mlp --dataset mnist --epochs 1
    python benchmarks/time_to_accuracy.py --recipe cifar10-fast --dataset DIR --val-split 0.1 --set lr=0.5 --no-save
    python benchmarks/time_to_accuracy.py --throughput [--models cnn,mlp] [--batch-size 512] [--precisions fp32]

Each timed run is a fresh process (seed 0, 1, ..., or from --first-seed): wall seconds run from that
process's start to the evaluated model, so imports, data loading (already downloaded), training and
evaluation all count.
Accuracy is on the test split; with --val-split F (choosing settings) it is on that held-out validation
split, never on the test split, as it is for a dataset without a test split.
Rows are printed and appended to benchmarks/RESULTS.md with the machine, torch version, date and commit.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def matmul_tflops() -> tuple[str, float]:
    """The matmul speed of this machine now, in the precision training picks here (bf16 where the CPU has
    AMX or AVX512-BF16, else fp32: emulated bf16 takes seconds for one such matmul). The development VM,
    always reported as "Intel(R) Xeon(R) Processor", ran bf16 matmuls at 1.3-1.6 TFLOP/s on 2026-11-22 and on
    the morning of 2026-12-01 and at 0.4-0.9 that evening: seconds in two rows compare only at the same speed."""
    import torch

    from imgclf.device import cpu_has_fast_bf16

    dtype = torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    a @ b  # oneDNN's first call picks its kernel
    seconds = []
    while sum(seconds) < 1.0:
        started = time.perf_counter()
        a @ b
        seconds.append(time.perf_counter() - started)
    return ("bf16" if dtype == torch.bfloat16 else "fp32"), 2 * 2048**3 / statistics.median(seconds) / 1e12


def machine(*speeds: tuple[str, float]) -> str:
    """Cores, processor name, its bf16 units and the matmul speeds measured around the runs (before, after: a
    drift shows)."""
    from imgclf.device import cpu_bf16_units, cpu_name

    tflops = " then ".join(f"{t:.2f}" for _, t in speeds)
    return (f"{os.cpu_count()} cores {cpu_name()} ({cpu_bf16_units() or 'no bf16 units'}), "
            f"{speeds[0][0]} matmul {tflops} TFLOP/s")


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, check=True).stdout.strip()
        # Rows appended to RESULTS.md itself do not change what is measured.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/",
                                ":(exclude,top)benchmarks/RESULTS.md"], capture_output=True,
                               text=True, cwd=Path(__file__).parent).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def append_results(header: str, row: str) -> None:
    """Add a row at the end of the first table below the header's title in RESULTS.md (made if missing)."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Measured results\n"
    title = header.splitlines()[0]
    if title not in text.splitlines():
        text = text.rstrip("\n") + f"\n\n{header}\n"
    lines = text.splitlines()
    at = lines.index(title)
    while not lines[at].startswith("|"):  # skip the prose between the title and its table
        at += 1
    while at < len(lines) and lines[at].startswith("|"):
        at += 1
    lines.insert(at, row)
    RESULTS.write_text("\n".join(lines) + "\n")


# ---- one timed run (the child process) -------------------------------------------------------------------

def child(args: argparse.Namespace) -> None:
    import imgclf

    overrides = json.loads(args.overrides)
    result = imgclf.train(recipe=args.recipe, model=args.model, out=args.out, quiet=True, **overrides)
    if os.environ.get("RANK", "0") != "0":  # --nproc: rank 0 evaluates and reports
        return
    started = time.perf_counter()
    metrics = imgclf.evaluate(result.run_dir, split=args.split)
    print(json.dumps({
        "evaluate_seconds": time.perf_counter() - started,  # loading the run and its data, TTA included
        "accuracy": metrics["accuracy"], "split": args.split, "dataset": result.summary["dataset"],
        "train_seconds": result.summary["train_seconds"], "epochs": len(result.history),
        "train_images_per_s": result.summary["train_images_per_s"],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "precision": result.summary["precision"], "threads": result.summary["threads"],
        "world_size": result.summary["world_size"],
    }))


def time_to_accuracy(args: argparse.Namespace) -> None:
    import imgclf
    from imgclf.config import make_config, parse_settings

    overrides = {k: v for k, v in {"dataset": args.dataset, "data_dir": args.data_dir, "epochs": args.epochs,
                                   "val_split": args.val_split}.items() if v is not None}
    overrides |= parse_settings(args.set)  # e.g. lr=0.5, model.widths=[32,64,128]: try a change on val
    config = make_config(recipe=args.recipe, model=args.model, **overrides)
    # Download and decode once before timing: the timed runs measure training, not the network.
    data = imgclf.load_dataset(config.data.dataset, config.data.data_dir, val_split=config.data.val_split,
                               grayscale=config.data.grayscale)
    # Choosing settings (--val-split F): score on the held-out val split, never on the test split we report.
    tuning = bool(args.val_split)
    split = "test" if data.test is not None and len(data.test) and not tuning else "val"
    commit = git_commit()  # of the code the runs use, not of the tree when they end
    speed_before = matmul_tflops()  # on an idle machine, before the runs
    runs = []
    for seed in range(args.first_seed, args.first_seed + args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            launcher = [sys.executable] if args.nproc == 1 else [
                sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc)]
            command = [*launcher, __file__, "--child", "--out", f"{tmp}/run", "--split", split,
                       "--overrides", json.dumps({**overrides, "seed": seed})]
            command += ["--recipe", args.recipe] if args.recipe else []
            command += ["--model", args.model] if args.model else []
            started = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True)
            wall = time.perf_counter() - started
            if done.returncode != 0:
                sys.exit(f"run {seed} failed: {done.stderr.strip()[-3000:]}")
            run = json.loads(done.stdout.strip().splitlines()[-1])
            run["wall_seconds"] = wall
            runs.append(run)
            print(f"seed {seed}: {run['accuracy']:.4f} {split} accuracy in {wall:.1f}s (training "
                  f"{run['train_seconds']:.1f}s, evaluation {run['evaluate_seconds']:.1f}s; "
                  f"{run['train_images_per_s']:,.0f} train img/s, peak RSS {run['peak_rss_mib']:,.0f} MiB)")
    host = machine(speed_before, matmul_tflops())  # a speed that drifted during the runs shows
    accuracies = [r["accuracy"] * 100 for r in runs]
    walls = [r["wall_seconds"] for r in runs]
    std = statistics.stdev(accuracies) if len(runs) > 1 else 0.0
    name = args.recipe or f"{args.model} ({args.epochs or config.train.epochs} epochs)"
    name += f" --epochs {args.epochs}" if args.recipe and args.epochs else ""
    name += "".join(f" {setting}" for setting in args.set) + (f" --nproc {args.nproc}" if args.nproc > 1 else "")
    command = "python benchmarks/time_to_accuracy.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    rate = statistics.mean(r["train_images_per_s"] for r in runs)
    seeds = f", seeds {args.first_seed}-{args.first_seed + args.runs - 1}" if args.first_seed else ""
    world = runs[0]["world_size"]
    threads = f"{world} processes x {runs[0]['threads']}" if world > 1 else runs[0]["threads"]
    row = (f"| {name} | {runs[0]['dataset']} | {split} | {statistics.mean(accuracies):.2f} ± {std:.2f} "
           f"(n={len(runs)}{seeds}) | {statistics.mean(walls):.1f} | {rate:,.0f} "
           f"| {max(r['peak_rss_mib'] for r in runs):,.0f} | {runs[0]['precision']}, {threads} threads "
           f"| {host} | {_torch_version()} | {time.strftime('%Y-%m-%d')} | {commit} | `{command}` |")
    header = ("## Time to accuracy\n\n| recipe | dataset | split | accuracy % (mean ± std) | wall s | train img/s "
              "| peak RSS MiB | precision | machine | torch | date | commit | command |\n"
              "|---|---|---|---|---:|---:|---:|---|---|---|---|---|---|")
    print(row)
    if not args.no_save:
        append_results(header, row)


def _torch_version() -> str:
    import torch

    return torch.__version__


# ---- throughput --------------------------------------------------------------------------------------------

def images_per_second(net, batch_size: int, shape: tuple[int, int, int], precision: str, min_steps: int,
                      min_seconds: float) -> tuple[float, float]:
    """(train, inference) images/s of a net on random data: train = forward, backward and an SGD step."""
    import torch
    import torch.nn.functional as F

    from imgclf.device import autocast, memory_format

    cpu = torch.device("cpu")
    fmt = memory_format(net, precision)
    net = net.to(memory_format=fmt)
    x = torch.randn(batch_size, *shape).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch_size,))
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)

    def train_step() -> None:
        with autocast(cpu, precision):
            loss = F.cross_entropy(net(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def infer_step() -> None:
        with torch.no_grad(), autocast(cpu, precision):
            net(x)

    rates = []
    for step, training in ((train_step, True), (infer_step, False)):
        net.train(training)
        step()  # warm-up: oneDNN picks its kernels on the first call
        started, n = time.perf_counter(), 0
        while n < min_steps or time.perf_counter() - started < min_seconds:
            step()
            n += 1
        rates.append(n * batch_size / (time.perf_counter() - started))
    return rates[0], rates[1]


def throughput(args: argparse.Namespace) -> None:
    import torch

    from imgclf.device import keep_freed_memory
    from imgclf.models import MODELS, create_model

    keep_freed_memory()  # as training does
    names = args.models.split(",") if args.models else sorted(MODELS)
    try:  # SIZExSIZExCHANNELS, e.g. 32x32x3, 28x28x1, or 24x24x3 to see what lower-resolution epochs would cost
        height, width, c = (int(v) for v in args.shape.split("x"))
    except ValueError:
        sys.exit(f"--shape {args.shape}: use HEIGHTxWIDTHxCHANNELS, e.g. 32x32x3")
    if height != width:
        sys.exit(f"--shape {args.shape}: the models take square images")
    size = height
    precisions = args.precisions.split(",")
    if not set(precisions) <= {"fp32", "bf16"}:
        sys.exit(f"--precisions {args.precisions}: use fp32, bf16 or fp32,bf16")
    command = "python benchmarks/time_to_accuracy.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    header = (f"## Throughput (images/s, batch {args.batch_size})\n\n| model | input | precision | train img/s "
              "| inference img/s | machine | torch | date | commit | command |\n"
              "|---|---|---|---:|---:|---|---|---|---|---|")
    host = machine(matmul_tflops())  # before the models load the machine
    torch.manual_seed(0)
    for name in names:
        for precision in precisions:
            try:
                net = create_model(name, num_classes=10, in_channels=c, image_size=size)
            except Exception as e:  # a model that does not fit this input size
                print(f"{name}: skipped ({e})")
                break
            train_rate, infer_rate = images_per_second(net, args.batch_size, (c, size, size), precision,
                                                       args.min_steps, args.min_seconds)
            row = (f"| {name} | {c}x{size}x{size} | {precision} | {train_rate:,.0f} | {infer_rate:,.0f} "
                   f"| {host} | {torch.__version__} | {time.strftime('%Y-%m-%d')} | {git_commit()} "
                   f"| `{command}` |")
            print(row)
            if not args.no_save:
                append_results(header, row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe")
    parser.add_argument("--model")
    parser.add_argument("--dataset")
    parser.add_argument("--data-dir")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--val-split", type=float)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + runs - 1")
    parser.add_argument("--nproc", type=int, default=1, help="train each run in N processes (torchrun + DDP)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe setting, e.g. --set lr=0.5 --set model.widths=[32,64,128]")
    parser.add_argument("--throughput", action="store_true")
    parser.add_argument("--models", help="throughput: comma-separated model names (default: all)")
    parser.add_argument("--shape", default="32x32x3", help="throughput: input HxWxC (default 32x32x3)")
    parser.add_argument("--precisions", default="fp32,bf16",
                        help="throughput: comma-separated, of fp32 and bf16 (bf16 is slow without AMX/AVX512-BF16)")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--min-steps", type=int, default=3)
    parser.add_argument("--min-seconds", type=float, default=5.0)
    parser.add_argument("--no-save", action="store_true", help="print only; do not append to RESULTS.md")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--split", help=argparse.SUPPRESS)
    parser.add_argument("--overrides", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not (args.child or args.throughput or args.recipe or args.model):
        parser.error("give --recipe or --model (time to accuracy) or --throughput")
    from imgclf.errors import ImgclfError

    try:
        if args.child:
            child(args)
        elif args.throughput:
            throughput(args)
        else:
            # A stopped benchmark (kill, timeout) stops its timed run too: SystemExit in subprocess.run kills the
            # child, which would otherwise train on and hold the cores.
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
            time_to_accuracy(args)
    except ImgclfError as e:  # bad input: one line, as from the imgclf command
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
