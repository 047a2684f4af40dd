"""Training: one readable loop over in-memory uint8 tensors augmented in whole batches.

`train()` makes or resumes a run folder (see runs.py), trains with the optimizer, schedule,
augmentation, label smoothing, EMA and early stopping of its config, and saves a resumable
checkpoint, the metrics and the model after every epoch.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import platform
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from imgclf import __version__, distributed
from imgclf.config import RunConfig, TrainConfig, apply_overrides, differing_settings, make_config, unused_settings
from imgclf.data import (
    LOAD_OPTIONS,
    Dataset,
    canonical_data_dir,
    canonical_dataset,
    dataset_label,
    file_digest,
    folder_stamp,
    load_config_dataset,
)
from imgclf.device import (
    autocast,
    cpu_name,
    keep_freed_memory,
    memory_format,
    resolve_device,
    resolve_precision,
    slow_precision,
    usable_cpus,
)
from imgclf.errors import ImgclfError, check_flags
from imgclf.evaluate import predict_logits
from imgclf.loader import alternating_flip, augment, batches, mixup, normalize, random_window
from imgclf.models import count_params, create_model, imagenet_weights
from imgclf.optim import LOOKAHEAD_ALPHA, LOOKAHEAD_EVERY, Lookahead, build_optimizer, lr_factor
from imgclf.runs import (
    TRAIN_IMAGES,
    all_finite,
    atomic_write,
    held_folder,
    in_use,
    is_stray,
    load_checkpoint,
    load_model,
    output_folder,
    read_json,
    read_metrics,
    save_checkpoint,
    save_model,
    write_fingerprints,
    write_metrics,
)

console = Console(highlight=False, soft_wrap=True)


@dataclass
class TrainResult:
    run_dir: Path
    history: list[dict[str, float]]  # the metrics.csv rows
    summary: dict[str, Any]  # the summary.json content
    reused: bool = False  # True when an identical finished run was found and nothing was trained
    model: torch.nn.Module | None = None  # the trained net in memory, in eval mode (loaded when reused, by rank 0)

    def __fspath__(self) -> str:  # evaluate(result), load_model(result), ...: the result stands for its run folder
        return str(self.run_dir)


@dataclass
class Learner:
    """What the training steps update: the net (DDP-wrapped when distributed) and its optimizer's companions."""
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # fp16 loss scaling (a no-op otherwise)
    ema: AveragedModel | None
    lookahead: Lookahead | None


@dataclass
class TrainImages:
    """The training set as the steps see it: uint8 on the device, augmented per batch, then normalized."""
    images: torch.Tensor
    labels: torch.Tensor
    mean: torch.Tensor  # per channel, in [0, 1] units
    std: torch.Tensor
    crop_padding: int  # pixels of translation
    cutout_size: int  # pixels
    memory_format: torch.memory_format  # the net's layout (channels_last for bf16 convnets)


# ---- the run folder -----------------------------------------------------------------------------------

def default_run_dir(config: RunConfig) -> Path:
    """runs/DATASET-MODEL-DATE-TIME, with -2, -3, ... after it for runs started within the same second (a loop)."""
    first = Path("runs") / f"{dataset_label(config.data.dataset)}-{config.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = first, 1
    while path.exists():
        n += 1
        path = first.with_name(f"{first.name}-{n}")
    return path


def prepare_run_dir(config: RunConfig, run_dir: Path, resume: bool) -> tuple[RunConfig, str]:
    """Decide what to do with the folder: 'new', 'resume' or 'reuse'. Never touches an unrelated run."""
    config_path = run_dir / "config.yaml"
    output_folder(run_dir, "the run", config.data.dataset)
    if not config_path.exists():
        if resume:
            raise ImgclfError(f"{run_dir} holds no run to resume; drop --resume to start a new run there")
        if run_dir.exists() and any(not is_stray(p) for p in run_dir.iterdir()):  # a kill's leftovers: not a run
            raise ImgclfError(f"{run_dir} exists and is not an imgclf run folder; choose another --out")
        return config, "new"
    try:
        raw = yaml.safe_load(config_path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        raw = None
    # Every section: defaults would stand in for those a cut file lost, and resume another run.
    if not isinstance(raw, dict) or not {"data", "model", "train"} <= raw.keys():
        raise ImgclfError(f"{run_dir} exists and is not an imgclf run folder (its config.yaml is not a whole "
                          "run's); choose another --out, or restore the file")
    stored = RunConfig.from_dict(raw, source=str(config_path))
    finished = (run_dir / "summary.json").exists()
    # Stopped before its first checkpoint: nothing to continue from, nothing to lose by starting over.
    started = finished or (run_dir / "checkpoint.pt").exists()
    if resume:
        stored.data.data_dir = config.data.data_dir or stored.data.data_dir
        stored.train.device, stored.train.threads = config.train.device, config.train.threads
        return stored, "reuse" if finished else "resume" if started else "new"
    if not started:
        return config, "new"
    if stored.what() != config.what():
        kind, hint = ("finished run", "") if finished else ("run", " (or --resume to continue that run)")
        differs = differing_settings(stored.what(), config.what())
        raise ImgclfError(f"{run_dir} already holds a different {kind} ({differs}); choose another --out{hint}; "
                          "nothing was changed")
    if finished:
        return stored, "reuse"
    raise ImgclfError(f"{run_dir} holds an unfinished run of this configuration; "
                      "add --resume to continue it, or choose another --out")


def _progress(disable: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TextColumn("{task.fields[stats]}"), TimeRemainingColumn(), console=console, transient=True,
                    disable=disable)


# ---- training ------------------------------------------------------------------------------------------

# Where and how a resumed run trains may change (a moved data folder, another machine); what it trains may not.
RESUME_MAY_CHANGE = ("device", "threads", "data_dir")


def train(config: RunConfig | None = None, *, out: str | Path | None = None, resume: bool = False,
          dataset: Dataset | str | None = None, recipe: str | None = None, model: str | None = None,
          quiet: bool = False, report: bool = False, tensorboard: bool = False,
          on_epoch: Callable[[dict[str, float]], None] | None = None, **overrides: Any) -> TrainResult:
    """Train a model and return its run folder and metrics.

    Either pass a RunConfig (flat options then change it), or build one from a recipe and/or flat options,
    e.g. `train(dataset="mnist", model="mlp", epochs=1, out="runs/mnist-mlp")`.
    A Dataset object may be passed as `dataset` to skip loading (its name is recorded; the data options that
    load_dataset takes, such as subset or val_split, are then its own and refused here).
    `report=True` writes RUN/report.html when training ends; RUN/figures/curves.png is redrawn every epoch.
    `tensorboard=True` also logs the epoch metrics to RUN/tensorboard/ (needs the tensorboard package).
    `on_epoch(row)` is called with each epoch's metrics once they are saved (tuning reports them to its pruner;
    an exception it raises stops training, and the checkpoint of that epoch stays resumable).
    """
    if config is not None and not isinstance(config, RunConfig):
        raise ImgclfError(f"train's first argument is a RunConfig, not {config!r}; for a recipe: "
                          f"train(recipe={str(config)!r}, ...)")
    if out is not None and (not isinstance(out, str | os.PathLike) or os.fspath(out) == ""):
        raise ImgclfError(f"out is the run folder, a path such as 'runs/mnist-mlp', not {out!r}")
    if resume and out is None:  # not a new folder named after the time, which holds nothing to resume
        raise ImgclfError("resume=True needs out: the folder of the run to continue")
    if on_epoch is not None and not callable(on_epoch):  # else it would fail only after the first epoch
        raise ImgclfError(f"on_epoch must be a function of the epoch's metrics, not {on_epoch!r}")
    check_flags(resume=resume, quiet=quiet, report=report, tensorboard=tensorboard)
    dataset_obj = dataset if isinstance(dataset, Dataset) else None
    if resume:
        given = {"config": config, "recipe": recipe, "model": model, "dataset": None if dataset_obj else dataset,
                 **overrides}
        ignored = [k for k, v in given.items() if v is not None and k not in RESUME_MAY_CHANGE]
        if ignored:
            raise ImgclfError(f"resume=True continues the run with its own settings, so {', '.join(ignored)} would "
                              "be ignored; drop them, or train with them into a new out")
    loading = [key for key in LOAD_OPTIONS if key in overrides]
    if dataset_obj is not None and loading:
        raise ImgclfError(f"{', '.join(loading)} would be ignored: the Dataset passed is already loaded; give "
                          "them to load_dataset instead")
    dataset_name = dataset_obj.name if dataset_obj else dataset
    if config is None:
        config = make_config(recipe=recipe, model=model, dataset=dataset_name, **overrides)
    elif recipe or model:
        raise ImgclfError("pass a RunConfig or recipe= / model=, not both (set config.model.name to change its model)")
    else:  # options given beside a config change it, as they would change a recipe
        config = apply_overrides(copy.deepcopy(config), dataset=dataset_name, **overrides)
    if dataset_obj is not None:  # config.yaml says how the object was loaded, not the recipe's own data settings
        for key in LOAD_OPTIONS:
            setattr(config.data, key, dataset_obj.loaded_with.get(key, getattr(config.data, key)))
    world_size = distributed.world_size()  # checked before joining: then no rank has a process group to tear down
    if config.train.batch_size % world_size:
        raise ImgclfError(f"batch size {config.train.batch_size} does not split evenly over {world_size} processes; "
                          f"use a multiple of {world_size} (the batch size is the global batch)")
    ctx, rank_device = distributed.setup(config.train.device)
    threads, finished = torch.get_num_threads(), False
    try:
        # `held`: the run folder, while this process trains in it. The run seeds torch's global generator (weight
        # init, dropout); fork_rng gives the caller (a notebook) its CPU stream back afterwards. Not the GPUs':
        # saving theirs would start a CUDA context on every GPU, in every DDP rank.
        with contextlib.ExitStack() as held, torch.random.fork_rng(devices=[]):
            result = _train(config, out, resume, dataset_obj, quiet or not ctx.is_main, report, tensorboard,
                            on_epoch, ctx, rank_device, held)
        finished = True
        return result
    except RuntimeError as e:
        raise distributed.peer_failure(ctx, e) or e from None
    finally:
        torch.set_num_threads(threads)  # the caller's (a notebook's) setting outlives the run's --threads
        if finished:
            distributed.leave_together(ctx)


def _open_run(config: RunConfig, out: str | Path | None, resume: bool, ctx: distributed.Context,
              held: contextlib.ExitStack) -> tuple[RunConfig, Path, str]:
    """Rank 0 decides the run folder and what to do with it, and holds it while it trains there (a second
    process, say a --resume while the run goes on, is refused); every rank gets its decision (or its error)."""
    def decide() -> tuple[RunConfig, Path, str]:
        run_dir = Path(out) if out else default_run_dir(config)
        busy = (f"{run_dir} is in use by another imgclf process (training there); wait for it to end or stop it, "
                "or choose another --out")
        try:
            decided, mode = prepare_run_dir(config, run_dir, resume)
        except ImgclfError:  # e.g. "add --resume", wrong while the run still trains: say that first
            if in_use(run_dir):
                raise ImgclfError(busy) from None
            raise
        if mode != "reuse":
            held.enter_context(held_folder(run_dir, busy))
            decided, mode = prepare_run_dir(config, run_dir, resume)  # as it is now that no one else writes
        return decided, run_dir, mode

    return ctx.from_main(decide)


def _train(config: RunConfig, out, resume: bool, dataset_obj: Dataset | None, quiet: bool, report: bool,
           tensorboard: bool, on_epoch, ctx: distributed.Context, rank_device: torch.device | None,
           held: contextlib.ExitStack) -> TrainResult:
    config, run_dir, mode = _open_run(_with_absolute_paths(config), out, resume, ctx, held)
    say = (lambda *a: None) if quiet else console.print
    if mode == "reuse":
        return _reuse_finished_run(config, run_dir, dataset_obj, rank_device, say, report, ctx)
    # Rank 0 reads the run folder, here and below: the other machines of a multi-machine run have no copy of it.
    recorded = ctx.from_main(lambda: read_json(run_dir / "model.json")) if mode == "resume" else {}
    # Only the object says which images a run started on it trained on: loaded by name, any edit to them is lost.
    if mode == "resume" and dataset_obj is None and recorded.get("train_digest"):
        raise ImgclfError(f"{run_dir} holds a run started on a Dataset object; resume it with that Dataset "
                          "(train(dataset=..., out=..., resume=True))")
    if mode == "resume" and dataset_obj is not None:
        if recorded.get("train_digest") != dataset_obj.train.digest():  # None: a run started from a name
            raise ImgclfError(f"{run_dir} holds a run started on other images than the Dataset passed; resume it "
                              "with the Dataset it started with (or without one, if it started from a name)")
    # On rank 0, whose folder the stamp was taken of (another machine's copy has other file times), before decoding.
    if mode == "resume" and ctx.from_main(lambda: _folder_changed(config, recorded, dataset_obj)):
        raise ImgclfError(f"{config.data.dataset} changed (images added, removed or rewritten) since {run_dir} "
                          "started on it, so resuming would train on other images; start a new run with another --out")

    # Checked before any writing; made after config.yaml (its folder alone would make --out "not a run folder").
    make_board, board = _tensorboard_writer(run_dir) if tensorboard and ctx.is_main else None, None
    cfg = config.train
    started = time.perf_counter()
    threads = _capped_threads(cfg.threads)
    _warn_of_wasted_settings(cfg, new_run=mode == "new")
    if threads or ctx.enabled:
        torch.set_num_threads(threads or distributed.threads_per_rank(ctx))
    torch.manual_seed(cfg.seed)
    device = rank_device or resolve_device(cfg.device)
    if device.type == "cpu":
        keep_freed_memory()
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every step has the same shapes: pick the fastest kernels once
    data = dataset_obj or load_config_dataset(config)
    data.check_trainable()
    if cfg.early_stopping and (data.val is None or len(data.val) == 0):
        raise ImgclfError(f"early stopping watches the val accuracy, and {data.name} has no val split here; "
                          "set --val-split above 0, or drop --early-stopping")
    c, h, w = data.train.images.shape[1:]
    # A resumed run's checkpoint holds every weight: the file it started from may be gone.
    options = {k: v for k, v in config.model.options.items() if not (k == "weights" and mode == "resume")}
    net = create_model(config.model.name, num_classes=data.num_classes, in_channels=c, image_size=h,
                       **options).to(device)
    # Of the transfer base as read, so that the same command after the file changed trains again, not reuses.
    weights_md5 = (recorded.get("weights_md5") if mode == "resume"
                   else options.get("weights") and ctx.is_main and file_digest(options["weights"]))
    if getattr(net, "freeze_features", False) and not config.model.options.get("weights") and mode == "new":
        warnings.warn("freeze_features without weights: the frozen conv base is random and only the head learns; "
                      "give the base's weights with --set model.weights=FILE.safetensors (a vgg run's "
                      "model.safetensors will do)", stacklevel=3)
    _check_trainable(net, config.model.name, cfg, (c, h, w), len(data.train), ctx, device)
    if mode == "new":  # a run started before these checks still resumes
        _check_tta_shifts(cfg, h)
    if mode == "resume" and cfg.precision == "fp16" and device.type == "cpu":  # a GPU run, resumed on a CPU
        precision = resolve_precision("auto", device)
        say(f"[yellow]warning:[/] fp16 is for GPUs: this CPU goes on in {precision}")
    else:
        precision = resolve_precision(cfg.precision, device)
    layout = memory_format(net, precision)
    net = net.to(memory_format=layout)
    optimizer = build_optimizer(net, cfg, precision)
    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True) if cfg.ema else None
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    train_images, train_labels = data.train.images.to(device), data.train.labels.to(device)
    mean, std = torch.tensor(data.mean, device=device), torch.tensor(data.std, device=device)
    # Drop the last partial batch (each epoch reshuffles, so no image is lost for good): a batch of one
    # would break batch norm, and small last batches make noisy steps.
    steps_per_epoch = max(1, len(train_images) // cfg.batch_size)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)  # the same on every rank: same order
    history: list[dict[str, float]] = []
    best = {"val_acc": -1.0, "epoch": 0, "state": None}
    start_epoch = 1
    earlier_seconds = 0.0  # of the processes before a resume, up to the checkpoint each one left

    def patience_spent(epoch: int) -> bool:
        return bool(cfg.early_stopping) and epoch - best["epoch"] >= cfg.early_stopping

    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    if mode == "resume":
        state = ctx.from_main(lambda: load_checkpoint(run_dir / "checkpoint.pt"))
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        try:
            generator.set_state(state["generator"])
        except RuntimeError:  # saved on another kind of device (a GPU run resumed on a CPU): its state does not fit
            generator.manual_seed(cfg.seed * 1_000_003 + state["epoch"])
            say("resuming on another kind of device: the shuffling from here differs from an uninterrupted run")
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:  # dropout on a GPU draws from its own
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        if scaler.is_enabled() and state.get("scaler"):  # fp16: the loss scale it had reached, not 65536 again
            scaler.load_state_dict(state["scaler"])
        history, best = state["history"], state["best"]
        earlier_seconds = state.get("seconds", 0.0)  # checkpoints before 2026-12-07 lack it
        start_epoch = state["epoch"] + 1
        say(f"resuming {escape(str(run_dir))} after epoch {state['epoch']} of {cfg.epochs}")
        if ctx.is_main and (run_dir / "model.onnx").exists():  # else it would pass for the finished model
            (run_dir / "model.onnx").unlink()
            say("removed model.onnx, exported before the run ended: export the run again once it has")
        if patience_spent(state["epoch"]) and best["state"] is not None:
            start_epoch = cfg.epochs + 1  # it had stopped early and was killed while saving: no more epochs
            say(f"early stopping had ended it: keeping the weights of epoch {best['epoch']}")
    else:
        if ctx.is_main:
            # A run that stopped before its first checkpoint may have left its model and curves: they are not
            # this configuration's, so evaluate must not find them.
            for leftover in ("model.safetensors", "model.json", TRAIN_IMAGES, "metrics.csv", "report.html",
                             "model.onnx"):
                (run_dir / leftover).unlink(missing_ok=True)
            shutil.rmtree(run_dir / "figures", ignore_errors=True)
            atomic_write(run_dir / "config.yaml", config.to_yaml())
        if hasattr(net, "init_from_data"):  # e.g. fastnet's whitening filters
            sample = train_images[torch.randperm(len(train_images), generator=generator, device=device)[:5000]]
            net.init_from_data(normalize(sample, mean, std))
    # After init_from_data: a slow copy of the random init would pull the whitening filters back towards it.
    lookahead = Lookahead(net, [t.to(device) for t in state["lookahead"]] if mode == "resume" else None
                          ) if cfg.lookahead else None
    train_set = TrainImages(train_images, train_labels, mean, std,
                            crop_padding=_crop_padding(cfg, h),
                            cutout_size=cfg.cutout_size if cfg.cutout_size is not None else max(1, h // 4),
                            memory_format=layout)

    trainable, total = count_params(net)
    ranks = f"{ctx.world_size} processes ({ctx.backend}) x " if ctx.enabled else ""
    # The test count too: a folder without split folders has a test split carved from it, not trained on.
    held_out = [f"{len(split):,} {name}" for name, split in data.splits().items() if name != "train"]
    sizes = " / ".join([f"{len(train_images):,} train", *held_out])
    say(f"[bold]{config.model.name}[/] on {escape(data.name)}: {sizes} images {tuple(data.train.images.shape[1:])}, "
        f"{data.num_classes} classes, {trainable:,} trainable params, {precision} on {device.type} "
        f"({ranks}{torch.get_num_threads()} thread{'s' * (torch.get_num_threads() > 1)}) -> {escape(str(run_dir))}")
    if slow := slow_precision(precision, device):
        say(f"[yellow]warning:[/] {slow}")
    # DDP wraps the net after init_from_data and resume: it copies rank 0's weights to every rank.
    learner = Learner(distributed.wrap(net, ctx, device), optimizer, scaler, ema, lookahead)

    def evaluation_net() -> torch.nn.Module:
        return ema.module if ema is not None else net

    val_digest = data.val.digest() if data.val is not None and len(data.val) else None
    # Only a Dataset object is compared by its pixels when it is trained into this folder again (a named dataset is
    # known by its config, an image folder by its files' stamp), so only then is the training split hashed (0.2 s
    # for CIFAR's).
    train_digest = data.train.digest() if dataset_obj is not None else None
    # A Dataset object's validation split was carved by the seed it was loaded with, not the run's (tune's repeated
    # executions train on one object with seeds S, S+1, ...).
    split = config.split_options() | ({"seed": dataset_obj.loaded_with["seed"]}
                                       if dataset_obj is not None and "seed" in dataset_obj.loaded_with else {})
    if ctx.is_main:
        write_fingerprints(run_dir, data.train.fingerprints)
        if repeats := data.also_in_train():
            counts = " and ".join(f"{n:,} of the {len(data.split(s)):,} {s} images" for s, n in repeats.items())
            warnings.warn(f"{counts} of {data.name} are also training images (the same pixels), so their accuracy "
                          "overstates the model; keep each image in one split (remove repeated files)", stacklevel=3)

    def save_weights() -> None:
        save_model(run_dir, evaluation_net(), data.class_names, data.mean, data.std, (c, h, w),
                   dataset=config.data.dataset, augment=cfg.augment, tta=cfg.tta, tta_shift=cfg.tta_shift,
                   tta_margin=cfg.tta_margin, precision=precision, val_digest=val_digest, train_digest=train_digest,
                   split=split, folder_stamp=data.folder_stamp, weights_md5=weights_md5 or None)

    def draw_curves(kept_epoch: int | None = None) -> None:
        from imgclf.report import plot_curves  # matplotlib loads only when a run gets this far
        plot_curves(history, run_dir / "figures" / "curves.png", kept_epoch)

    def save_all(epoch: int) -> None:
        nonlocal checkpointed
        if not ctx.is_main:
            return
        save_weights()
        write_metrics(run_dir / "metrics.csv", history)
        save_checkpoint(run_dir / "checkpoint.pt", {
            "epoch": epoch, "model": net.state_dict(), "optimizer": optimizer.state_dict(),
            "ema": ema.state_dict() if ema is not None else None, "generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(),  # dropout draws from it (on a GPU, from cuda_rng)
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "lookahead": lookahead.slow if lookahead is not None else None,
            "history": history, "best": best, "seconds": earlier_seconds + time.perf_counter() - started})
        checkpointed = epoch
        if history and not quiet:  # a live loss plot for a user watching (0.4 s a redraw: not for tuning)
            draw_curves()

    epoch = start_epoch - 1
    checkpointed = start_epoch - 1  # the epoch the checkpoint on disk holds, for the message on Ctrl-C
    try:
        with _progress(disable=quiet) as progress:
            for epoch in range(start_epoch, cfg.epochs + 1):
                task = progress.add_task(f"epoch {epoch}/{cfg.epochs}", total=steps_per_epoch, stats="")
                row = train_one_epoch(learner, train_set, cfg, epoch, steps_per_epoch, generator, precision, ctx,
                                      partial(progress.update, task))
                row["epoch"] = epoch
                # Rank 0's batch-norm statistics everywhere, and in the copies that hold them: each rank
                # updates its own from its slice of the batch.
                ctx.broadcast_tensors(net.buffers())
                if ema is not None:
                    ctx.broadcast_tensors(ema.module.buffers())
                if lookahead is not None:
                    ctx.broadcast_tensors(lookahead.slow)
                    if epoch == cfg.epochs:  # end on the slow weights, before they are scored and saved
                        lookahead.step(net, 1.0)
                # The loss is read before each step: the last step can still leave weights no model should keep.
                if not all_finite(list(evaluation_net().state_dict().values())):
                    raise diverged("weights are not finite", f"in epoch {epoch}", epoch)
                if data.val is not None and len(data.val) > 0:
                    row.update(validate(evaluation_net(), data, precision, ctx))
                progress.remove_task(task)
                history.append(row)
                improved = row.get("val_acc", -1.0) > best["val_acc"]
                if improved and cfg.early_stopping:
                    best = {"val_acc": row["val_acc"], "epoch": epoch,
                            "state": {k: v.detach().clone() for k, v in evaluation_net().state_dict().items()}}
                say(_epoch_line(row, cfg.epochs, len(train_images)))
                if make_board is not None:
                    board = board or make_board()
                    for key, value in row.items():
                        if key != "epoch":
                            board.add_scalar(key, value, epoch)
                    board.flush()
                save_all(epoch)
                if on_epoch is not None:
                    on_epoch(row)
                if patience_spent(epoch) and epoch < cfg.epochs:
                    say(f"early stopping: no val accuracy gain for {cfg.early_stopping} epochs; "
                        f"keeping the weights of epoch {best['epoch']}")
                    break
    except KeyboardInterrupt:
        if (run_dir / "checkpoint.pt").exists():
            say(f"\ninterrupted in epoch {checkpointed + 1}: the checkpoint after epoch {checkpointed} is saved "
                f"in {escape(str(run_dir))}; continue with `imgclf train --resume --out {escape(str(run_dir))}"
                + (f" --nproc {ctx.world_size}`" if ctx.enabled else "`"))
        else:
            say("\ninterrupted in epoch 1, before the first checkpoint: nothing to resume; the same command "
                "starts the run again")
        raise

    kept_epoch = history[-1]["epoch"] if history else 0  # the epoch whose weights the model holds
    if cfg.early_stopping and best["state"] is not None:
        evaluation_net().load_state_dict(best["state"])
        kept_epoch = best["epoch"]
    seconds = earlier_seconds + time.perf_counter() - started  # a resumed run counts all of its training
    summary = {
        "imgclf_version": __version__, "torch_version": torch.__version__, "dataset": data.name,
        "model": config.model.name, "recipe": config.recipe, "epochs_run": len(history),
        "trainable_params": trainable, "total_params": total, "precision": precision, "device": str(device),
        "threads": torch.get_num_threads(), "world_size": ctx.world_size, "backend": ctx.backend,
        "machine": platform.machine(), "cpu": cpu_name(),
        "seconds": round(seconds, 2), "train_seconds": round(sum(r["seconds"] for r in history), 2),
        "train_images": len(train_images),
        "train_images_per_s": round(steps_per_epoch * min(cfg.batch_size, len(train_images)) * len(history)
                                    / max(sum(r["seconds"] for r in history), 1e-9), 1),
        "final": history[-1] if history else {}, "kept_epoch": kept_epoch,
        "best_val_acc": max((r["val_acc"] for r in history if "val_acc" in r), default=None),
    }
    if not ctx.is_main:
        return TrainResult(run_dir, history, summary, model=evaluation_net().eval())
    try:
        save_weights()  # the final weights: lookahead's slow weights or early stopping's best epoch
        if history and (quiet or kept_epoch != history[-1]["epoch"]):  # early stopping's epoch marked
            draw_curves(kept_epoch)
        atomic_write(run_dir / "summary.json", json.dumps(summary, indent=2))
    except KeyboardInterrupt:
        say(f"\ninterrupted while saving the trained model; `imgclf train --resume --out {escape(str(run_dir))}` "
            "saves it without training again")
        raise
    say(f"done in {seconds:.1f}s: model saved to {escape(str(run_dir))}")
    if cfg.tta and any("val_acc" in r for r in history):  # one view per epoch keeps the epochs cheap
        split = "" if data.test is not None and len(data.test) else " --split val"  # evaluate's default is test
        say(f"the epochs' val accuracy is of the plain images; `imgclf evaluate {escape(str(run_dir))}{split}` adds "
            "the run's test-time augmentation")
    if report:
        from imgclf.report import write_report
        say(f"report: {escape(str(write_report(run_dir)))}")
    return TrainResult(run_dir, history, summary, model=evaluation_net().eval())


def _with_absolute_paths(config: RunConfig) -> RunConfig:
    """An image folder, a data folder and a transfer base by their absolute paths, so that `imgclf evaluate RUN`
    finds them from any folder; weights "imagenet" as the file fetched into the data folder (each rank waits for
    one download), so the run records that file."""
    config = dataclasses.replace(config, data=dataclasses.replace(
        config.data, dataset=canonical_dataset(config.data.dataset), data_dir=canonical_data_dir(config.data.data_dir)))
    if isinstance(weights := config.model.options.get("weights"), str):
        weights = (imagenet_weights(config.model.name, config.model.options, config.data.data_dir)
                   if weights == "imagenet"
                   else Path(weights).expanduser().resolve())
        config = dataclasses.replace(config, model=dataclasses.replace(
            config.model, options={**config.model.options, "weights": str(weights)}))
    return config


def _capped_threads(threads: int | None) -> int | None:
    """The --threads to use (None: torch's default), at most the usable CPUs. stacklevel 4: the caller of train()."""
    if threads and threads > (cpus := usable_cpus()):  # more threads than CPUs made a test suite 6x slower
        warnings.warn(f"--threads {threads} is more than the {cpus} CPUs this process may use, which would slow "
                      f"training down; using {cpus}", stacklevel=4)
        return cpus
    return threads


def _warn_of_wasted_settings(cfg: TrainConfig, new_run: bool) -> None:
    """Settings that train, but waste the run. stacklevel 4: the warnings name the caller of train()."""
    if cfg.warmup_epochs and cfg.warmup_epochs >= cfg.epochs:  # fine for a quick try of a recipe, not for a result
        warnings.warn(f"the warm-up ({cfg.warmup_epochs:g} epochs) lasts the whole {cfg.epochs}-epoch run, so the "
                      f"learning rate never reaches its peak {cfg.lr:g}; use fewer --warmup-epochs", stacklevel=4)
    if new_run and (unused := unused_settings(cfg)):  # accepted and recorded, yet they would change nothing
        warnings.warn(f"{', '.join(unused)}: not used by this configuration, so they change nothing; drop them or "
                      "change what they go with", stacklevel=4)


def _reuse_finished_run(config: RunConfig, run_dir: Path, dataset_obj: Dataset | None,
                        rank_device: torch.device | None, say: Callable[..., None], report: bool,
                        ctx: distributed.Context) -> TrainResult:
    """The finished run in run_dir, after checking it was trained on these images (and weights file). Rank 0
    checks and loads it; the other ranks (whose machines may have no copy of the folder) get its metrics, and no
    model."""
    loaded: list[TrainResult] = []  # rank 0's, with its model

    def check_and_load() -> tuple[list[dict[str, float]], dict[str, Any]]:
        loaded.append(_check_and_load_finished_run(config, run_dir, dataset_obj, rank_device))
        return loaded[0].history, loaded[0].summary

    history, summary = ctx.from_main(check_and_load)
    if not ctx.is_main:
        return TrainResult(run_dir, history, summary, reused=True)
    reused = loaded[0]
    say(f"{escape(str(run_dir))} already holds a finished run of this configuration: reusing its model, not "
        "retraining (delete the folder or choose another --out to train again)")
    if report:
        from imgclf.report import write_report
        say(f"report: {escape(str(write_report(run_dir)))}")
    return reused


def _folder_changed(config: RunConfig, recorded: dict[str, Any], dataset_obj: Dataset | None) -> bool:
    """Whether the image folder a run was trained on has other files now (its model.json records their stamp)."""
    stamp, folder = recorded.get("folder_stamp"), config.data.dataset
    return dataset_obj is None and bool(stamp) and Path(folder).is_dir() and folder_stamp(folder) != stamp


def _check_tta_shifts(cfg: TrainConfig, height: int) -> None:
    """TTA averages shifted views wherever augment has crop: refuse shifts that training never makes."""
    padding = _crop_padding(cfg, height)
    if "crop" in cfg.augment and padding == 0:
        raise ImgclfError("crop_padding 0 makes augment crop shift nothing; drop crop from the augmentations, or "
                          "use 1 or more pixels")
    if "crop" in cfg.augment and (cfg.tta_shift or 0) > padding:
        raise ImgclfError(f"tta_shift {cfg.tta_shift} would average views shifted further than crop_padding {padding} "
                          f"moved any training image; use tta_shift {padding} or less, or a larger crop_padding")


def _crop_padding(cfg: TrainConfig, height: int) -> int:
    """Pixels of translation of augment crop: the setting, else an eighth of the image (4 for 32x32)."""
    return cfg.crop_padding if cfg.crop_padding is not None else max(1, height // 8)


def _check_and_load_finished_run(config: RunConfig, run_dir: Path, dataset_obj: Dataset | None,
                                 rank_device: torch.device | None) -> TrainResult:
    recorded = read_json(run_dir / "model.json")
    digest, folder = recorded.get("train_digest"), config.data.dataset
    if dataset_obj is not None and digest and dataset_obj.train.digest() != digest:
        raise ImgclfError(f"{run_dir} holds a finished run of this configuration trained on other images than "
                          "the Dataset passed; choose another out (or delete the folder) to train on these")
    if dataset_obj is None and digest:  # reloading the data to compare would cost a load, or a download
        warnings.warn(f"{run_dir} was trained on a Dataset object, whose images may differ from {folder} loaded by "
                      "name; pass that Dataset to check, or choose another out", stacklevel=4)
    if _folder_changed(config, recorded, dataset_obj):
        raise ImgclfError(f"{folder} changed (images added, removed or rewritten) since {run_dir} was trained "
                          "on it; choose another --out (or delete that run) to train on the folder as it is now")
    weights, weights_md5 = config.model.options.get("weights"), recorded.get("weights_md5")
    if weights_md5 and Path(weights).is_file() and file_digest(weights) != weights_md5:
        raise ImgclfError(f"{weights} changed since {run_dir} was trained from it; choose another --out (or "
                          "delete that run) to train from the file as it is now")
    # Read first: a damaged file is said before "reusing".
    trained = load_model(run_dir, rank_device or resolve_device(config.train.device)).net.eval()
    return TrainResult(run_dir, read_metrics(run_dir / "metrics.csv"), read_json(run_dir / "summary.json"),
                       reused=True, model=trained)


def _check_trainable(net: torch.nn.Module, name: str, cfg: TrainConfig, shape: tuple[int, int, int], train_size: int,
                     ctx: distributed.Context, device: torch.device) -> None:
    """Fail before training on settings this net and these images cannot train with."""
    h, w = shape[1:]
    if cfg.whiten_bias_epochs is not None and whitening_bias(net) is None:
        raise ImgclfError(f"whiten_bias_epochs is for nets with a patch-whitening layer (fastnet); "
                          f"{name} has none: remove it from the recipe")
    if cfg.progressive_size:
        _check_progressive(net, name, cfg.progressive_size, shape, device)
    for setting, pixels, used in (("crop_padding", cfg.crop_padding, "crop" in cfg.augment),
                                  ("cutout_size", cfg.cutout_size, "cutout" in cfg.augment),
                                  ("tta_shift", cfg.tta_shift, cfg.tta)):
        if used and pixels is not None and pixels >= min(h, w):
            raise ImgclfError(f"{setting} {pixels} is not smaller than the {h}x{w} images; use fewer pixels")
    per_rank = min(cfg.batch_size, train_size) // ctx.world_size
    if per_rank < 2 and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules()):
        raise ImgclfError(f"batches of {per_rank} image{'s' if per_rank != 1 else ''}"
                          f"{' per process' if ctx.enabled else ''}: batch norm needs 2 or more; use a larger "
                          "--batch-size, or a model without batch norm")


def _check_progressive(net: torch.nn.Module, name: str, size: int, shape: tuple[int, int, int],
                       device: torch.device) -> None:
    """Fail before training if the model cannot train on size x size windows of its images."""
    if size >= min(shape[1:]):
        raise ImgclfError(f"progressive_size {size} must be smaller than the images ({shape[1]}x{shape[2]})")
    was_training = net.training
    try:
        with torch.no_grad():
            net.eval()(torch.zeros(2, shape[0], size, size, device=device))
    except RuntimeError:
        raise ImgclfError(f"model {name} cannot take {size}x{size} inputs (too small for its pools, or not a fully "
                          "convolutional model such as fastnet); use a larger progressive_size, or drop it") from None
    finally:
        net.train(was_training)


def _tensorboard_writer(run_dir: Path) -> Callable[[], Any]:
    """A function that makes the run's TensorBoard writer (which makes its folder at once)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImgclfError("--tensorboard needs the tensorboard package: pip install tensorboard "
                          "(or the imgclf[tensorboard] extra)") from None
    return partial(SummaryWriter, str(run_dir / "tensorboard"))


def whitening_bias(net: torch.nn.Module) -> torch.nn.Parameter | None:
    """The bias of a net's frozen patch-whitening layer (fastnet's `whiten`), which whiten_bias_epochs limits."""
    whiten = getattr(net, "whiten", None)
    return getattr(whiten, "bias", None)


def diverged(reason: str, when: str, epoch: int) -> ImgclfError:
    kept = "the checkpoint of the last finished epoch is kept" if epoch > 1 else "nothing was saved"
    return ImgclfError(f"training diverged ({reason}) {when}; {kept}: lower --lr, set grad_clip, or use --precision "
                       "fp32")


def train_one_epoch(learner: Learner, train_set: TrainImages, cfg, epoch: int, steps_per_epoch: int,
                    generator: torch.Generator, precision: str, ctx: distributed.Context,
                    on_progress: Callable[..., None]) -> dict[str, float]:
    """One pass over the (shuffled, augmented) training set; `epoch` counts from 1. Returns its metrics row."""
    net, optimizer = learner.net, learner.optimizer
    net.train()
    images, device = train_set.images, train_set.images.device
    if "altflip" in cfg.augment:
        images = alternating_flip(images, epoch - 1, cfg.seed)
    # Alone, one generator shuffles and augments (as before ranks existed); with ranks, the shared one only
    # shuffles, and each rank's augmentation gets its own draws, reseeded per epoch so --resume replays it.
    augment_generator = generator if not ctx.enabled else torch.Generator(device=device).manual_seed(
        cfg.seed * 1_000_003 + (epoch - 1) * 1009 + ctx.rank + 1)
    if ctx.enabled:  # dropout draws from the global streams (CPU and GPU), seeded alike on every rank: not the same
        # masks on each rank's images, and a stream apart from the augmentation's (the CPU's takes 32 bits of a seed)
        torch.manual_seed(int(np.random.SeedSequence([cfg.seed, epoch, ctx.rank, 1]).generate_state(1)[0]))
    inner = distributed.unwrap(net)
    bias = whitening_bias(inner)
    bias_done = cfg.whiten_bias_epochs is not None and epoch > cfg.whiten_bias_epochs and bias is not None
    # Alone, freezing the bias also spares the backward pass through the first block. DDP expects a gradient
    # for every parameter it was built with, so ranks drop the bias's gradient after each backward instead:
    # the optimizer skips a parameter without one, and the bias stays put as it would alone.
    freeze_bias, drop_bias_grad = bias_done and not ctx.enabled, bias_done and ctx.enabled
    if freeze_bias:
        bias.requires_grad_(False)  # for this epoch only: the trained net keeps a trainable bias
    first_step = (epoch - 1) * steps_per_epoch
    started = time.perf_counter()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for step, (x, y) in enumerate(batches(images, train_set.labels, cfg.batch_size, shuffle=True,
                                          generator=generator, drop_last=True, part=(ctx.rank, ctx.world_size))):
        factor = lr_factor(cfg, first_step + step, steps_per_epoch)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * factor * group["lr_scale"]
        x = augment(x, cfg.augment, augment_generator, train_set.crop_padding, train_set.cutout_size)
        if cfg.progressive_size and first_step + step < cfg.progressive_epochs * steps_per_epoch:
            x = random_window(x, cfg.progressive_size, augment_generator)
        x = normalize(x, train_set.mean, train_set.std)
        if "mixup" in cfg.augment:
            x, partner, weight = mixup(x, cfg.mixup_alpha, augment_generator)
        x = x.contiguous(memory_format=train_set.memory_format)
        with autocast(device, precision):
            logits = net(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            if "mixup" in cfg.augment:
                loss = weight * loss + (1 - weight) * F.cross_entropy(logits.float(), y[partner],
                                                                      label_smoothing=cfg.label_smoothing)
        if cfg.l1:
            loss = loss + cfg.l1 * sum(p.abs().sum() for p in net.parameters() if p.ndim > 1 and p.requires_grad)
        optimizer.zero_grad(set_to_none=True)
        learner.scaler.scale(loss).backward()
        if drop_bias_grad:
            bias.grad = None
        if cfg.grad_clip is not None:
            learner.scaler.unscale_(optimizer)  # the norm of the true gradients, not of fp16's scaled ones
            torch.nn.utils.clip_grad_norm_(inner.parameters(), cfg.grad_clip)
        learner.scaler.step(optimizer)
        learner.scaler.update()
        if learner.ema is not None:
            learner.ema.update_parameters(inner)
        if learner.lookahead is not None and (first_step + step) % LOOKAHEAD_EVERY == 0:
            learner.lookahead.step(inner, LOOKAHEAD_ALPHA * factor**3)  # hold on tighter as the lr decays
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        if step % 10 == 0 or step + 1 == steps_per_epoch:  # reading a value waits for a GPU: not every step
            if not torch.isfinite(loss_sum):
                raise diverged(f"loss is {loss_sum.item() / seen}", f"by step {step + 1} of epoch {epoch}", epoch)
            rate = seen / (time.perf_counter() - started)
            on_progress(completed=step + 1,
                        stats=f"loss {loss_sum.item() / seen:.4f} acc {correct.item() / seen:.2%} {rate:,.0f} img/s")
    if freeze_bias:
        bias.requires_grad_(True)
    loss_sum, correct, seen = ctx.sum(loss_sum, correct, torch.tensor(seen))
    return {"train_loss": (loss_sum / seen).item(), "train_acc": (correct / seen).item(),
            "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.perf_counter() - started, 3)}


def validate(net: torch.nn.Module, data: Dataset, precision: str, ctx: distributed.Context) -> dict[str, float]:
    """Loss and accuracy on the val split, each rank predicting its own part of it."""
    part = ctx.shard(len(data.val))
    logits = predict_logits(net, data.val.images[part], data.mean, data.std, precision=precision)
    labels = data.val.labels[part].to(logits.device)
    # A val split smaller than the world leaves some ranks nothing to predict (empty logits have no classes).
    loss_sum, correct = ((F.cross_entropy(logits, labels, reduction="sum"), (logits.argmax(1) == labels).sum())
                         if len(labels) else (torch.zeros(()), torch.zeros(())))
    loss_sum, correct, n = ctx.sum(loss_sum, correct, torch.tensor(len(labels)))
    return {"val_loss": (loss_sum / n).item(), "val_acc": (correct / n).item()}


def _epoch_line(row: dict[str, float], epochs: int, n: int) -> str:
    val = (f"  val loss {row['val_loss']:.4f} acc {row['val_acc']:.2%}" if "val_acc" in row else "")
    return (f"epoch {int(row['epoch'])}/{epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.2%}"
            f"{val}  lr {row['lr']:.3g}  {row['seconds']:.1f}s  {n / row['seconds']:,.0f} img/s")
