"""Multi-process training on PyTorch's distributed engine: torchrun starts the ranks, DDP averages gradients.

What a distributed run means (the same as a single-process run of the same config):
- `batch_size` is the global batch. Each of the N ranks takes batch_size / N images of every step, and DDP
  averages the gradients, so a recipe's batch size and learning rate mean the same on 1 or N processes.
- Every rank draws the same shuffled order each epoch (same seed) and takes its own slice of every batch:
  the ranks see disjoint shards. Augmentation draws its own random numbers on each rank.
- Batch norm: SyncBatchNorm on CUDA. On the CPU PyTorch has no SyncBatchNorm, so each rank normalises over
  its own slice of the batch; the running statistics come from rank 0.
- Validation is split between the ranks and its sums are reduced; only rank 0 writes the run folder.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import signal
import sys
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from imgclf.device import usable_cpus
from imgclf.errors import ImgclfError, PeerLost


def timeout_seconds() -> float:
    """A rank that waits longer than this for the others gives up, so a stuck or dead peer ends the job
    instead of hanging it. Rank 0 writes checkpoints and plots between epochs, far below the default 300 s."""
    value = os.environ.get("IMGCLF_DIST_TIMEOUT", "300")
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise ImgclfError(f"IMGCLF_DIST_TIMEOUT={value!r} is not a number of seconds above 0; set e.g. 600, or unset "
                          "it for the default 300")
    return seconds


LAUNCHER_PID = "IMGCLF_LAUNCHER_PID"  # set by `imgclf train --nproc` for its ranks, which end with it


@dataclass
class Context:
    rank: int = 0
    world_size: int = 1
    local_world_size: int = 1  # ranks on this machine, which share its cores
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (a picklable object)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def from_main(self, read: Callable[[], Any]) -> Any:
        """Rank 0's `read()` on every rank: rank 0 reads (a run folder the other machines may not have), the
        others get its value, or its error as an ImgclfError, so no rank waits for a broadcast that never comes."""
        if not self.enabled:
            return read()
        outcome = None
        if self.is_main:
            try:
                outcome = (None, read())
            except Exception as e:
                self.broadcast((str(e) if isinstance(e, ImgclfError) else f"rank 0 failed ({type(e).__name__}: {e})",
                                None))
                raise
        error, value = self.broadcast(outcome)
        if error is not None:
            raise ImgclfError(error)
        return value

    def broadcast_tensors(self, tensors: Iterable[torch.Tensor]) -> None:
        """Rank 0's values of `tensors` on every rank, in place (e.g. batch-norm statistics)."""
        if self.enabled:
            for tensor in tensors:
                dist.broadcast(tensor, src=0)

    def sum(self, *values: torch.Tensor) -> list[torch.Tensor]:
        """Element-wise sums over the ranks (float64, so counts stay exact)."""
        if not self.enabled:
            return [v.double() for v in values]
        # nccl reduces on this rank's GPU; the values may be on it or on the CPU (counts), so each is moved first
        device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")
        stacked = torch.stack([torch.as_tensor(v).to(device, torch.float64).reshape(()) for v in values])
        dist.all_reduce(stacked)
        return list(stacked.cpu())

    def shard(self, n: int) -> slice:
        """This rank's contiguous part of n items (parts differ by at most one item)."""
        start, stop = n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size
        return slice(start, stop)


def world_size() -> int:
    """How many ranks torchrun started (1 without torchrun), known before joining the process group."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_by_torchrun() -> bool:
    return world_size() > 1


def end_with_parent(parent: int) -> None:
    """This process ends when its parent `parent` does, even killed (SIGKILL runs no handler that could stop
    it): else a rank of `train --nproc` or a worker of `tune --workers` trains on, unseen, and writes its
    folder beside the next command."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it ended before the line above took effect
        os.kill(os.getpid(), signal.SIGTERM)


def setup(device_name: str) -> tuple[Context, torch.device | None]:
    """Join the process group when started by torchrun; returns the context and, on CUDA, this rank's GPU."""
    if not launched_by_torchrun():
        return Context(), None
    if launcher := os.environ.get(LAUNCHER_PID):
        end_with_parent(int(launcher))
    cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    backend = "nccl" if cuda else "gloo"
    device = None
    if cuda:
        local_rank, gpus = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
        if local_rank >= gpus:
            raise ImgclfError(f"{os.environ.get('LOCAL_WORLD_SIZE', local_rank + 1)} processes on this machine but "
                              f"{gpus} GPU(s): one process per GPU; use --nproc {gpus} (--nproc_per_node for "
                              "torchrun), or --device cpu")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_seconds()))
    world = dist.get_world_size()
    ctx = Context(dist.get_rank(), world, int(os.environ.get("LOCAL_WORLD_SIZE", world)), backend)
    return ctx, device


def threads_per_rank(ctx: Context) -> int:
    """This machine's cores split between its ranks (torchrun itself sets 1 thread per rank)."""
    return max(1, usable_cpus() // ctx.local_world_size)


def wrap(net: torch.nn.Module, ctx: Context, device: torch.device) -> torch.nn.Module:
    """The module to train with: DDP around `net` (and SyncBatchNorm on CUDA), or `net` itself."""
    if not ctx.enabled:
        return net
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        return DistributedDataParallel(net, device_ids=[device.index])
    return DistributedDataParallel(net)


def unwrap(net: torch.nn.Module) -> torch.nn.Module:
    return getattr(net, "module", net)


def leave_together(ctx: Context) -> None:
    """After a finished run, leave the process group, all ranks together (a rank that tore its gloo group down
    while another was still finishing aborted now and then: "terminate called without an active exception").

    A rank that stops on an error keeps its connections until its process ends: a peer waiting for it in a
    collective would otherwise say it lost contact and end the job before this rank has said why it stopped."""
    if ctx.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def peer_failure(ctx: Context, error: BaseException) -> ImgclfError | None:
    """A one-line error for a collective that failed because another rank died or timed out."""
    # gloo's lost connections come as plain RuntimeErrors from some calls (DDP's first broadcast).
    lost = isinstance(error, dist.DistError) or any(
        words in str(error) for words in ("Connection closed by peer", "Connection reset by peer"))
    if not ctx.enabled or not lost:  # a bug elsewhere stays what it is
        return None
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    first_line = first_line.split("] ", 1)[-1].split(". ")[0][:160]  # drop gloo's source-file prefix
    return PeerLost(f"rank {ctx.rank}: lost contact with the other ranks ({first_line}); the job stops. "
                       "Rerun with --resume to continue from the last finished epoch (or the start if none finished)")


def launch(nproc: int, argv: list[str]) -> None:
    """`imgclf train --nproc N ...`: run `torchrun --standalone --nproc_per_node N -m imgclf ...` here."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise ImgclfError(f"--nproc {nproc}; use 1 or more processes")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          monitor_interval=0.5)
    for name in ["torch.distributed.elastic", *logging.root.manager.loggerDict]:  # we say what failed, once
        if name.startswith("torch.distributed.elastic"):  # (its modules' loggers set their own levels)
            logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ[LAUNCHER_PID] = str(os.getpid())
    try:
        elastic_launch(config, sys.executable)("-m", "imgclf", *argv)
    except SignalException as e:  # the agent has stopped the ranks; the last checkpoint stays resumable
        if e.sigval == signal.SIGINT:  # Ctrl-C: rank 0 has said where to resume from
            raise SystemExit(130) from None
        raise ImgclfError(f"stopped by {e.sigval.name}; the ranks were stopped: continue with --resume") from None
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        # A rank killed by a signal is the cause, whichever the agent saw first: a peer that lost contact with it
        # may have ended (status 1, its error said) by the same poll. SIGTERM is the agent stopping the others.
        rank, failure = next(((r, f) for r, f in sorted(e.failures.items())
                              if f.exitcode < 0 and -f.exitcode != signal.SIGTERM), (rank, failure))
        if failure.exitcode in (1, 2):  # the rank said its one-line error (2: a usage error); the others stopped
            raise SystemExit(failure.exitcode) from None
        raise ImgclfError(f"distributed training failed: rank {rank} ended with status {failure.exitcode} "
                          f"({failure.signal_name() if failure.exitcode < 0 else 'see its output above'}); "
                          "the other ranks were stopped; continue with --resume") from None
