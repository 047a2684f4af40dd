"""Run folders, trained models on disk, and atomic writes.

A run folder holds:
  config.yaml        everything needed to repeat the run
  metrics.csv        one row per finished epoch
  model.safetensors  the trained weights (tensors only: loading runs no code)
  model.json         how to rebuild the net, class names, normalization, input shape, version
  train_images.npy   a 64-bit hash of each training image, so evaluate can tell when it scores images it trained on
  checkpoint.pt      the state to resume from, rewritten atomically after every epoch
  summary.json       final metrics and timings, written when the run finishes
Every file is written to a temporary file first and then renamed, so a crash or a kill
leaves the previous version intact, never a half-written one.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import glob
import io
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import safetensors.torch
import torch
from safetensors import SafetensorError

from imgclf import __version__
from imgclf.config import SPLIT_OPTIONS
from imgclf.device import resolve_device
from imgclf.errors import ImgclfError, is_finite_number
from imgclf.models import create_model

TRAIN_IMAGES = "train_images.npy"  # see the module docstring
METRIC_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]


def output_folder(path: str | Path, contents: str, *datasets: str | None) -> Path:
    """`path` as the --out folder for `contents`; a file there is refused before any work, not at the first write
    with mkdir's "File exists". So is a folder inside an image-folder dataset: its files would become a class."""
    if not isinstance(path, str | os.PathLike):
        raise ImgclfError(f"the folder to write {contents} into is a path such as 'out', not {path!r}")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ImgclfError(f"--out {path} is a file, not a folder; give the folder to write {contents} into")
    return outside_datasets(path, contents, *datasets)


def outside_datasets(path: Path, contents: str, *datasets: str | None, flag: str = "--out") -> Path:
    """`path`, unless it lies inside an image-folder dataset, where what is written would become a class (a
    hidden folder's files are never read: there it may go)."""
    from imgclf.data import image_folder  # here: runs.py is imported by modules that data.py's imports need

    for dataset in datasets:
        if dataset and (folder := image_folder(dataset)):
            folder = folder.resolve()
            if path.resolve().is_relative_to(folder) and not any(
                    part.startswith(".") for part in path.resolve().relative_to(folder).parts):
                raise ImgclfError(f"{flag} {path} is inside the dataset folder {folder}, where {contents} would be "
                                  "read as images of a class; give a folder outside it")
    return path


def missing_folders(path: Path) -> list[Path]:
    """path and those of its parents that do not exist, deepest first: what a write there makes."""
    return [folder for folder in (path, *path.parents) if not folder.exists()]


def file_in_the_way(folder: Path) -> Path:
    """The file that stands where folder, or one of its parents, should be (folder itself if none does)."""
    return next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), folder)


def remove_empty(folders: list[Path]) -> None:
    """Remove these folders where still empty (deepest first): a failed write leaves none behind."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


@contextlib.contextmanager
def folder_lock(folder: Path, busy: str | None = None):
    """An exclusive lock on `folder` while the block runs: with `busy`, ImgclfError(busy) if another process
    holds it, else wait for it. The system drops it when the process ends, killed or not: no stale lock is left.
    Windows has no flock: nothing is locked there."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (fcntl.LOCK_NB if busy else 0))
        except BlockingIOError:
            raise ImgclfError(busy) from None
        yield
    finally:
        os.close(fd)


def in_use(folder: Path) -> bool:
    """Whether another process holds `folder` with folder_lock (a run training there)."""
    if not folder.is_dir():
        return False
    try:
        with folder_lock(folder, busy="in use"):
            return False
    except ImgclfError:
        return True
    except OSError:  # a folder that cannot be opened is not locked by imgclf
        return False


@contextlib.contextmanager
def held_folder(path: Path, busy: str):
    """The run folder `path` (made if missing), locked while the block runs: ImgclfError(busy) if another process
    holds it. Temporary files that killed writes left there are removed."""
    made = missing_folders(path)
    path.mkdir(parents=True, exist_ok=True)
    try:
        if not os.access(path, os.W_OK | os.X_OK):  # else the first checkpoint would fail after an epoch of training
            raise ImgclfError(f"{path} is read-only, so no checkpoint could be saved there; make it writable or "
                              "copy the run to a folder of yours and use that")
        with folder_lock(path, busy):
            for stale in path.rglob(".*.tmp"):  # what a kill during atomic_write left: no other process writes now
                stale.unlink(missing_ok=True)
            yield
    finally:
        remove_empty(made)  # a run refused before it wrote anything leaves no empty folders behind


SCRATCH_PREFIX = ".imgclf-scratch-"  # written_together's folders
STRAY_SECONDS = 60  # a temporary file (of atomic_write, of a download) untouched this long was left by a kill


def is_stray(path: Path) -> bool:
    """A temporary file that atomic_write leaves when killed mid-write (held_folder's .*.tmp)."""
    return path.name.startswith(".") and path.name.endswith(".tmp")


def temporary_file(folder: Path, name: str, suffix: str) -> tuple[int, str]:
    """mkstemp's (fd, path) for a file that becomes `folder/name`: `.NAME.XXXX{suffix}`, as sweep_stale finds it."""
    return tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=suffix)


def sweep_stale(folder: Path, name: str, suffix: str, seconds: float = STRAY_SECONDS) -> None:
    """Delete the temporary files of `name` (temporary_file's) in `folder` that a killed write left: those
    untouched for a minute (a write still going on, in another process, touches its file all the time), or for
    `seconds` (0 where the caller holds the folder's lock, so no other process writes one)."""
    for stray in folder.glob(f".{glob.escape(name)}.*{suffix}"):
        with contextlib.suppress(OSError):
            if time.time() - stray.stat().st_mtime >= seconds:
                stray.unlink()


def atomic_write(path: Path, data: bytes | str | Callable[[BinaryIO], object]) -> None:
    """Write `data` (or what the function `data` writes into the open file) as `path`, whole or not at all."""
    path = Path(path)
    # The folders this write makes, deepest first: a failed write leaves none of them behind.
    made = missing_folders(path.parent)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # a file where a folder should be: name it, not "File exists"
        raise ImgclfError(f"{file_in_the_way(path.parent)} is a file, not a folder, so {path} cannot be written "
                          "there; choose another --out") from None
    try:
        fd, tmp = temporary_file(path.parent, path.name, ".tmp")
    except OSError as e:  # a read-only folder, say: name the file meant, not a temporary name
        raise OSError(e.errno, e.strerror, str(path)) from None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; give the file the permissions open() would
        with os.fdopen(fd, "wb") as f:
            if callable(data):  # large arrays: written straight to the file, not copied in memory first
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        sweep_stale(path.parent, path.name, ".tmp")  # of this file's writes that were killed
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        remove_empty(made)
        if isinstance(e, OSError) and e.filename in (None, tmp):  # name the file meant, not the temporary one
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise


@contextlib.contextmanager
def written_together(folder: Path):
    """A scratch folder whose files replace folder's only when the block ends without error. Outputs that
    belong together (a page and its figures) take seconds to draw: a kill meanwhile leaves folder's earlier set
    whole, not half old and half new (only one in the milliseconds of the final copies mixes them). Pages go
    last, so one never names figures still to come. The scratch folder is a hidden one in folder: where a kill
    leaves it, the next outputs written there remove it."""
    made = missing_folders(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stray in folder.glob(f"{SCRATCH_PREFIX}*"):  # not touched for an hour: no drawing takes that long
        with contextlib.suppress(OSError):  # another process may remove its own meanwhile
            if time.time() - stray.stat().st_mtime > 3600:
                shutil.rmtree(stray, ignore_errors=True)
    try:
        scratch = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=folder))
    except OSError as e:  # name the folder the user chose, not the scratch folder's made-up name
        raise OSError(e.errno, e.strerror, str(folder)) from None
    try:
        yield scratch
        files = [p for p in scratch.rglob("*") if p.is_file()]
        for file in sorted(files, key=lambda p: (p.suffix == ".html", p)):
            atomic_write(folder / file.relative_to(scratch), file.read_bytes())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        remove_empty(made)


def write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, out.getvalue())


def read_metrics(path: Path) -> list[dict[str, float]]:
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if "epoch" not in (reader.fieldnames or []):
                raise ValueError("not imgclf's header")
            # "" is a metric the run did not have (no val split); None, a row cut short
            rows = [{k: float(v) if v != "" else float("nan") for k, v in row.items()} for row in reader]
    except FileNotFoundError:
        raise ImgclfError(f"{path} is missing; retrain the run or restore the file") from None
    except (csv.Error, ValueError, TypeError, UnicodeDecodeError):  # TypeError: a row with extra or missing fields
        raise ImgclfError(f"{path} is damaged (not the CSV imgclf writes); retrain the run or restore "
                          "the file") from None
    return rows


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object written by imgclf (model.json, summary.json), or a one-line error if missing or damaged."""
    try:
        value = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ImgclfError(f"{path} is missing; retrain the run or restore the file") from None
    except (ValueError, UnicodeDecodeError):
        value = None
    if not isinstance(value, dict):
        raise ImgclfError(f"{path} is damaged (not the JSON object imgclf writes); retrain the run or restore "
                          "the file")
    return value


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every value of the floating-point tensors is finite (one wait for a GPU, not one per tensor)."""
    return bool(torch.stack([t.isfinite().all() for t in tensors if t.is_floating_point()]).all())


def read_summary(run_dir: Path) -> dict[str, Any]:
    """A finished run's summary.json, its numbers checked: reports and comparisons compute with them."""
    path = Path(run_dir) / "summary.json"
    summary = read_json(path)
    for key in ("seconds", "trainable_params", "epochs_run", "kept_epoch"):
        if summary.get(key) is not None and not is_finite_number(summary[key]):
            raise ImgclfError(f"{path} is damaged ({key} is {summary[key]!r}, not a number); retrain the run or "
                              "restore the file")
    return summary


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, buffer.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        # weights_only: a checkpoint is tensors, numbers and dicts; refuse anything that would run code.
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ImgclfError(f"no checkpoint at {path}; start the run without --resume") from None
    except Exception as e:
        raise ImgclfError(f"checkpoint {path} is unreadable ({type(e).__name__}); "
                          "start the run again without --resume into a new --out") from None


@dataclass
class TrainedModel:
    """A net plus everything needed to feed it: the result of `load_model`."""

    net: torch.nn.Module
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_shape: tuple[int, int, int]  # (C, H, W)
    info: dict[str, Any] = field(default_factory=dict)  # the rest of model.json (dataset, augment, tta, ...)
    run_dir: Path | None = None  # the run folder load_model read it from

    @functools.cached_property
    def train_fingerprints(self) -> np.ndarray | None:
        """Split.fingerprints of its training images, where its run kept them: read when first asked for (by
        evaluate), not by predict, serve or export."""
        return _read_fingerprints(self.run_dir / TRAIN_IMAGES) if self.run_dir is not None else None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def save_model(run_dir: Path, net: torch.nn.Module, class_names: list[str], mean, std,
               input_shape: tuple[int, int, int], **info: Any) -> None:
    run_dir = Path(run_dir)
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    atomic_write(run_dir / "model.safetensors", safetensors.torch.save(state))
    meta = {
        "format": "imgclf-model",
        "imgclf_version": __version__,
        "architecture": net.spec,
        "class_names": list(class_names),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "input_shape": list(input_shape),
        **info,
    }
    atomic_write(run_dir / "model.json", json.dumps(meta, indent=2))


def load_model(run_dir: str | Path, device: str | torch.device = "cpu") -> TrainedModel:
    """Rebuild a trained net from a run folder, reading only JSON and safetensors."""
    if not isinstance(run_dir, str | os.PathLike):
        given = "a bare torch module (it has no class names or normalization)" if isinstance(
            run_dir, torch.nn.Module) else repr(run_dir)[:80]
        raise ImgclfError(f"give a run folder (the --out of `imgclf train`, or the result train returns) or a model "
                          f"from load_model, not {given}")
    device = resolve_device(device)
    run_dir = Path(run_dir)
    meta_path, weights_path = run_dir / "model.json", run_dir / "model.safetensors"
    if not run_dir.is_dir():
        raise ImgclfError(f"{run_dir} is not a run folder; give the --out folder of an `imgclf train` run")
    if not meta_path.exists() or not weights_path.exists():
        raise ImgclfError(f"{run_dir} holds no trained model (model.json + model.safetensors); "
                          "train it first, or give the --out folder of a finished `imgclf train` run")
    try:
        meta = json.loads(meta_path.read_text())
        if not isinstance(meta, dict) or meta.get("format") != "imgclf-model":
            raise ValueError("not an imgclf model")
        arch = meta["architecture"]
        with torch.random.fork_rng(devices=[]):  # its random init is overwritten: the caller's seeded stream stays
            net = create_model(arch["name"], num_classes=arch["num_classes"], in_channels=arch["in_channels"],
                               image_size=arch["image_size"], **arch.get("options", {}))
        class_names, mean, std = list(map(str, meta["class_names"])), tuple(meta["mean"]), tuple(meta["std"])
        input_shape = tuple(int(n) for n in meta["input_shape"])
        if (len(class_names) != arch["num_classes"] or len(input_shape) != 3
                or input_shape[:2] != (arch["in_channels"], arch["image_size"])):
            raise ValueError("class names or input shape do not match the architecture")
        if not (len(mean) == len(std) == input_shape[0] and all(map(is_finite_number, mean + std))
                and min(std) > 0):
            raise ValueError(f"mean and std are not {input_shape[0]} finite numbers each, std above 0")
        split = meta.get("split", {})
        if not isinstance(split, dict) or set(split) - set(SPLIT_OPTIONS):
            raise ValueError(f"split is not a mapping of {', '.join(SPLIT_OPTIONS)}")
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError, ImgclfError) as e:
        raise ImgclfError(f"{meta_path} is not an imgclf model description ({type(e).__name__}: {e}); "
                          "retrain the run or restore the file") from None
    try:
        state = safetensors.torch.load_file(str(weights_path))
        net.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ImgclfError(f"{weights_path} does not hold this model's weights ({first}); "
                          "retrain the run or restore the file") from None
    if not all_finite(list(state.values())):  # a run that diverged
        raise ImgclfError(f"{weights_path} holds weights that are not finite (training diverged); train into "
                          "another --out (or delete this run) with a lower --lr")
    net.to(device).eval()
    return TrainedModel(net=net, class_names=class_names, mean=mean, std=std, input_shape=input_shape,
                        info={k: v for k, v in meta.items() if k not in ("mean", "std", "class_names")},
                        run_dir=run_dir)


def write_fingerprints(run_dir: Path, fingerprints: np.ndarray) -> None:
    """Split.fingerprints of the run's training images, for evaluate (written as the run starts or resumes)."""
    atomic_write(run_dir / TRAIN_IMAGES, lambda f: np.save(f, fingerprints, allow_pickle=False))


def _read_fingerprints(path: Path) -> np.ndarray | None:
    """The hashes of a run's training images, or None (a run saved before they were kept, or a damaged file: the
    check they serve is skipped, with a warning for the damaged file)."""
    if not path.exists():
        return None
    try:
        hashes = np.load(path, allow_pickle=False)
        if hashes.dtype != np.uint64 or hashes.ndim != 1:
            raise ValueError(f"{hashes.dtype} array of {hashes.ndim} dimensions")
        return hashes
    except (ValueError, OSError, EOFError) as e:
        warnings.warn(f"{path} is damaged ({type(e).__name__}), so evaluate cannot tell whether it scores images "
                      "this run trained on; delete it to go on without that check, or train into a new --out",
                      stacklevel=3)
        return None


def natural_key(name: str) -> list[Any]:
    """Sort key that puts run-10 after run-2 (and model.filters[10] after model.filters[2])."""
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name)]


def runs_below(folder: str | Path) -> tuple[list[Path], list[Path]]:
    """The finished and the unfinished run folders anywhere below `folder`, each in natural order."""
    found = sorted({p.parent for p in Path(folder).rglob("config.yaml")}, key=lambda p: natural_key(str(p)))
    return [p for p in found if not unfinished(p)], [p for p in found if unfinished(p)]


def unfinished(run_dir: str | Path) -> bool:
    """A run that started (it has its config.yaml) and has not written summary.json: still training, or stopped."""
    return (Path(run_dir) / "config.yaml").exists() and not (Path(run_dir) / "summary.json").exists()


def how_to_finish(run_dir: str | Path) -> str:
    """What finishes an unfinished run: time, while another process trains it, or a resume."""
    if in_use(Path(run_dir)):
        return "it is still training"
    if not (Path(run_dir) / "checkpoint.pt").exists():  # a pruned or failed trial of a study keeps none
        return "it stopped and kept no checkpoint to resume from; train it again"
    return f"continue it with `imgclf train --resume --out {run_dir}`"


def warn_if_unfinished(run_dir: str | Path) -> None:
    if unfinished(run_dir):
        warnings.warn(f"{run_dir} has not finished training: this is the model of its last finished epoch "
                      f"({how_to_finish(run_dir)})", stacklevel=2)
