"""Datasets as whole uint8 tensors in memory: MNIST, Fashion-MNIST, CIFAR-10/100, digits, image folders.

These datasets fit in RAM, and batches sliced from one (N, C, H, W) tensor are far faster on a CPU than a
per-image DataLoader pipeline, so every source is decoded once into that form.
"""

import errno
import functools
import gzip
import hashlib
import http.client
import json
import math
import multiprocessing
import numbers
import os
import pickle
import shutil
import struct
import sys
import tarfile
import tempfile
import unicodedata
import urllib.request
import warnings
import zipfile
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image, ImageOps

from imgclf.config import MAX_IMAGE_SIZE, RunConfig
from imgclf.errors import ImgclfError, check_flags, did_you_mean, is_number, is_whole
from imgclf.runs import (
    atomic_write,
    file_in_the_way,
    folder_lock,
    missing_folders,
    outside_datasets,
    remove_empty,
    sweep_stale,
    temporary_file,
)

SPLITS = ("train", "val", "test")
# The names each split's folder goes by in the layouts users bring (Roboflow's valid/, Kaggle's Training/),
# matched without regard to case.
_SPLIT_FOLDERS = {"train": ("train", "training"), "val": ("val", "valid", "validation"), "test": ("test", "testing")}
_FIXED_TEST_SEED = 0  # test splits we carve never depend on the run seed, so test scores stay comparable
_CHUNK = 1024  # images per step of batched conversions: bounds the temporaries to tens of MB
_DECODE_WORKERS = 2
_POOL_MIN_FILES = 1000  # below this, starting worker processes costs more than it saves
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}  # palette images count as colour: telling needs a decode
_TIMEOUT = 60  # seconds a download may stall before the next mirror is tried
_FIX = "delete it and run again to re-download, or replace it with the canonical file"

_IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
              "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
_CIFAR100_FINE = """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup
dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard
lion lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree
pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal
shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone
television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm""".split()
_CIFAR100_COARSE = """aquatic_mammals fish flowers food_containers fruit_and_vegetables
household_electrical_devices household_furniture insects large_carnivores large_man-made_outdoor_things
large_natural_outdoor_scenes large_omnivores_and_herbivores medium_mammals non-insect_invertebrates people
reptiles small_mammals trees vehicles_1 vehicles_2""".split()
_CIFAR100_SOURCE = {
    "folder": "cifar100", "mirrors": ["https://www.cs.toronto.edu/~kriz/"],
    "archive": ("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),
    "files": {"cifar-100-python/train": "16019d7e3df5f24257cddd939b257f8d",
              "cifar-100-python/test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
              "cifar-100-python/meta": "7973b15100ade9c7d40fb424638fde48"},
}

# The canonical sources. files (name -> md5) live in <data root>/<folder>/; a file's url is a mirror + its
# name, tried in order. Datasets with an archive download and extract it to get their files.
DATASETS: dict[str, dict] = {
    "mnist": {
        "kind": "idx", "description": "handwritten digits, 28x28 grayscale",
        "classes": [str(d) for d in range(10)], "shape": (1, 28, 28), "train_size": 60000, "test_size": 10000,
        "folder": "mnist",
        "mirrors": ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"],
        "files": dict(zip(_IDX_FILES, ["f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
                                       "9fb629c4189551a2d022fa330f9573f3",
                                       "ec29112dd5afa0611ce80d1b7f02629c"], strict=True)),
    },
    "fashion-mnist": {
        "kind": "idx", "description": "Zalando clothing photos, 28x28 grayscale",
        "classes": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                    "Bag", "Ankle boot"],
        "shape": (1, 28, 28), "train_size": 60000, "test_size": 10000,
        "folder": "fashion-mnist", "mirrors": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
        "files": dict(zip(_IDX_FILES, ["8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
                                       "bef4ecab320f06d8554ea6380940ec79",
                                       "bb300cfdad3c16e7a12a480ee83cd310"], strict=True)),
    },
    "cifar10": {
        "kind": "cifar10", "description": "tiny natural photos, 32x32 RGB",
        "classes": "airplane automobile bird cat deer dog frog horse ship truck".split(),
        "shape": (3, 32, 32), "train_size": 50000, "test_size": 10000,
        "folder": "cifar10", "mirrors": ["https://www.cs.toronto.edu/~kriz/"],
        "archive": ("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),
        "files": {"cifar-10-batches-py/data_batch_1": "c99cafc152244af753f735de768cd75f",
                  "cifar-10-batches-py/data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
                  "cifar-10-batches-py/data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
                  "cifar-10-batches-py/data_batch_4": "634d18415352ddfa80567beed471001a",
                  "cifar-10-batches-py/data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
                  "cifar-10-batches-py/test_batch": "40351d587109b95175f43aff81a1287e",
                  "cifar-10-batches-py/batches.meta": "5ff9c542aee3614f3951f8cda6e48888"},
    },
    "cifar100": {
        "kind": "cifar100", "description": "tiny natural photos, 32x32 RGB, 100 fine classes",
        "classes": _CIFAR100_FINE, "shape": (3, 32, 32), "train_size": 50000, "test_size": 10000,
        **_CIFAR100_SOURCE,
    },
    "cifar100-coarse": {
        "kind": "cifar100", "description": "CIFAR-100 labelled with its 20 superclasses",
        "classes": _CIFAR100_COARSE, "shape": (3, 32, 32), "train_size": 50000, "test_size": 10000,
        **_CIFAR100_SOURCE,
    },
    "digits": {
        "kind": "digits", "description": "scikit-learn's bundled handwritten digits, 8x8 grayscale, offline",
        "classes": [str(d) for d in range(10)], "shape": (1, 8, 8), "train_size": 1437, "test_size": 360,
        "folder": "digits", "mirrors": [], "files": {},
    },
}


@dataclass
class Split:
    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def digest(self) -> str:
        """Of its images and labels: tells whether a rebuilt split holds the same images as before."""
        return self.hash_into(hashlib.sha256()).hexdigest()[:16]

    @functools.cached_property
    def fingerprints(self) -> np.ndarray:
        """One 64-bit hash of each image's pixels (uint64, in image order): finds the same image in another split or
        folder, whatever its file name or label. Kept once computed: tune's trials train on one Dataset."""
        rows = self.images.flatten(1).contiguous().numpy()  # reshape(n, -1) fails on an empty split
        return np.frombuffer(b"".join(hashlib.blake2b(row, digest_size=8).digest() for row in rows), dtype=np.uint64)

    def count_among(self, fingerprints: np.ndarray) -> int:
        """How many of its images have one of these fingerprints (another split's)."""
        return int(np.isin(self.fingerprints, fingerprints).sum())

    def hash_into(self, h: Any) -> Any:
        """h (a hashlib object), updated with the split's images and then its labels."""
        h.update(self.images.contiguous().numpy())
        h.update(self.labels.contiguous().numpy())
        return h


LOAD_OPTIONS = ("val_split", "subset", "grayscale", "image_size")  # how load_dataset read a Dataset


@dataclass
class Dataset:
    """A loaded dataset. A folder with only test/ loads with an empty train split, for evaluation; its mean
    and std are then 0 and 1, so evaluate with the normalization stored with the trained model."""

    name: str
    class_names: list[str]
    train: Split
    val: Split | None
    test: Split | None
    mean: tuple[float, ...]  # per channel, of the train split, in [0, 1] pixel units
    std: tuple[float, ...]
    folder_stamp: str | None = None  # an image folder's files as loaded (folder_stamp()), None for a named dataset
    # load_dataset's LOAD_OPTIONS, which a run trained on this object records in its config.yaml, and the seed that
    # carved its validation split, which the run's model.json records (the run's own seed may differ)
    loaded_with: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train.images.shape[1:]
        return c, h, w

    @property
    def in_channels(self) -> int:
        return self.image_shape[0]

    @property
    def image_size(self) -> int:
        return self.image_shape[1]

    def splits(self) -> dict[str, Split]:
        """The non-empty splits, in train/val/test order."""
        return {s: getattr(self, s) for s in SPLITS if getattr(self, s) is not None and len(getattr(self, s))}

    def split(self, name: str) -> Split:
        if name not in SPLITS:
            raise ImgclfError(f"unknown split {name!r}; use one of {', '.join(SPLITS)}")
        if name not in self.splits():
            # Scoring on the training images is rarely what is meant: name train only when it is all there is.
            have = " or ".join(f"--split {s}" for s in self.splits() if s != "train") or "--split train"
            carve = name == "val" and len(self.train) > 0
            raise ImgclfError(f"{self.name} has no {name} split; use {have}"
                              + ("; a val split is carved from train when training with --val-split above 0 "
                                 "(e.g. 0.1)" if carve else ""))
        return getattr(self, name)

    def check_trainable(self) -> None:
        """Refuse, in one line, a dataset that no classifier can be trained on."""
        if len(self.train) == 0:
            raise ImgclfError(f"{self.name} has no training images; give a dataset or folder with a train split")
        if self.num_classes < 2:
            raise ImgclfError(f"{self.name} has {self.num_classes} class; a classifier needs 2 or more "
                              "(for a folder: one sub-folder per class)")

    def all_as_test(self) -> "Dataset":
        """This dataset with every image in its test split: a folder of class folders only, given to evaluate,
        is scored whole, not on the fifth of it that load_dataset carves as a test split for training on it."""
        parts = [s for s in (self.train, self.val, self.test) if s is not None]
        every = Split(torch.cat([s.images for s in parts]), torch.cat([s.labels for s in parts]))
        return replace(self, train=Split(every.images[:0], every.labels[:0]), val=None, test=every)

    def also_in_train(self) -> dict[str, int]:
        """How many images of each held-out split that has any have the pixels of a training image (a file copied
        into two splits): their score overstates the model."""
        counts = {s: split.count_among(self.train.fingerprints) for s, split in self.splits().items() if s != "train"}
        return {s: n for s, n in counts.items() if n}

    def class_counts(self) -> dict[str, list[int]]:
        return {s: torch.bincount(split.labels, minlength=self.num_classes).tolist()
                for s, split in self.splits().items()}

    def summary(self) -> str:
        counts = self.class_counts()
        sizes = ", ".join(f"{s} {len(split)}" for s, split in self.splits().items())
        width = max(len("class"), *(len(n) for n in self.class_names)) + 2
        shape = "x".join(map(str, self.image_shape))
        mean, std = (tuple(round(v, 4) for v in values) for values in (self.mean, self.std))
        lines = [f"{self.name}: {self.num_classes} class{'es' if self.num_classes != 1 else ''}, {shape} uint8 "
                 f"images; {sizes}",
                 *([f"train mean {mean} std {std}"] if len(self.train) else []),  # none in an evaluation folder
                 "class".ljust(width) + "".join(s.rjust(8) for s in counts)]
        lines += [n.ljust(width) + "".join(str(counts[s][i]).rjust(8) for s in counts)
                  for i, n in enumerate(self.class_names)]
        if repeats := self.also_in_train():
            lines.append("same pixels as a train image: " + ", ".join(f"{n} {s}" for s, n in repeats.items()))
        return "\n".join(lines)


@dataclass
class DatasetInfo:
    name: str
    num_classes: int
    channels: int | None  # None where unknown before decoding (image folders)
    image_size: int | None
    train_size: int | None
    test_size: int | None
    class_names: list[str]
    description: str
    present: bool | None = None  # list_datasets: all its files are there and pass their md5 checks
    damaged: str | None = None  # list_datasets: which file is there but fails its check, and the fix

    @property
    def shape(self) -> str:
        return f"{self.channels}x{self.image_size}x{self.image_size}" if self.image_size else "any"


def data_root(data_dir: str | Path | None = None) -> Path:
    root = Path(data_dir or os.environ.get("IMGCLF_DATA") or "~/.cache/imgclf").expanduser()
    if root.exists() and not root.is_dir():
        given = "--data-dir" if data_dir else "IMGCLF_DATA" if os.environ.get("IMGCLF_DATA") else "the data folder"
        raise ImgclfError(f"{given} {root} is a file, not a folder; give the folder that holds the datasets")
    return root


def _unknown(name: str) -> ImgclfError:
    return ImgclfError(f"unknown dataset {name!r}{did_you_mean(name, DATASETS)}: not a known name and not an "
                       f"existing folder; use one of {', '.join(DATASETS)}, or the path of an image folder")


def image_folder(name: str | os.PathLike) -> Path | None:
    """The folder an image-folder dataset names, or None: a dataset's name wins over a same-named folder."""
    path = Path(name).expanduser()
    return path if name not in DATASETS and path.is_dir() else None


def own_val_folder(name: str | os.PathLike) -> Path | None:
    """An image folder's own validation folder (val/, Valid/, ...), which any val_split leaves as it is."""
    try:
        return _split_dirs(folder).get("val") if (folder := image_folder(name)) else None
    except (ImgclfError, OSError):  # an ambiguous or unreadable layout: loading it says so
        return None


def dataset_info(name: str) -> DatasetInfo:
    if name in DATASETS:
        d = DATASETS[name]
        c, h, _ = d["shape"]
        return DatasetInfo(name, len(d["classes"]), c, h, d["train_size"], d["test_size"], list(d["classes"]),
                           d["description"])
    if (folder := image_folder(name)) is None:
        raise _unknown(name)
    class_names, _, _ = _scan_folder(folder)
    return DatasetInfo(name, len(class_names), None, None, None, None, class_names, "image folder")


def carves_test(name: str) -> bool:
    """Whether load_dataset carves name's test split: a folder of class folders only, without split folders."""
    folder = image_folder(name)
    return folder is not None and "all" in _split_dirs(folder.resolve())


def canonical_dataset(name: str) -> str:
    """A dataset's name, or an image folder's absolute path (a relative one depends on the current folder)."""
    folder = image_folder(name)
    return str(folder.resolve()) if folder else name


def dataset_label(name: str | None) -> str | None:
    """A dataset's name as shown: an image folder's own name, not the absolute path its runs record."""
    return Path(name).name if name and ("/" in str(name) or os.sep in str(name)) else name


def canonical_data_dir(data_dir: str | Path | None) -> str | None:
    """A data folder's absolute path; None (the default cache) stays None."""
    return data_dir and str(Path(data_dir).expanduser().resolve())


def list_datasets(data_dir: str | Path | None = None) -> list[DatasetInfo]:
    """Each named dataset; `present` when all its files are there and pass their md5 checks (as loading needs),
    `damaged` says which file is there but fails its check (a download does not replace it), or is None."""
    root = data_root(data_dir)
    passes: dict[Path, bool] = {}  # cifar100 and cifar100-coarse share their files: each is read once
    listed = []
    for name, d in DATASETS.items():
        paths = {root / d["folder"] / f: md5 for f, md5 in d["files"].items()}
        for path, md5 in paths.items():
            if path not in passes and path.is_file():
                passes[path] = file_digest(path) == md5
        damaged = next((f"{path} fails its md5 check; {_FIX}" for path in paths if passes.get(path) is False), None)
        listed.append(replace(dataset_info(name), damaged=damaged,
                              present=all(passes.get(path) for path in paths)))
    return listed


# ---- downloads and checksums ----

def file_digest(path: Path | str, algorithm: str = "md5") -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def _verify(name: str, path: Path, digest: str, algorithm: str = "md5") -> None:
    """A digest may be the start of one: torchvision names its weights files by their sha256's first 8 digits."""
    if not (got := file_digest(path, algorithm)).startswith(digest):
        raise ImgclfError(f"{name}: {path} failed its {algorithm} check (got {got}, want {digest}); {_FIX}")


def _download(urls: list[str], dest: Path, digest: str, algorithm: str = "md5") -> None:
    """Fetch dest from the first url that answers; raise OSError naming every url's failure if none does."""
    sweep_stale(dest.parent, dest.name, ".part", seconds=0)  # what a killed download left: callers hold the lock
    failures = []
    for url in urls:
        try:
            fd, tmp = temporary_file(dest.parent, dest.name, ".part")
        except OSError as e:
            raise _unwritable(dest.parent, e) from None
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=_TIMEOUT) as response:
                size = int(response.headers.get("Content-Length") or 0)
                print(f"downloading {url}" + (f" ({size / 1e6:.1f} MB)" if size else ""), file=sys.stderr, flush=True)
                shutil.copyfileobj(response, out, 1 << 20)
                received = out.tell()
                out.flush()
                os.fsync(out.fileno())  # on disk before it is renamed into place: a power cut leaves no empty file
            if size and received < size:  # the server closed the connection early: say so, not "md5"
                failures.append(f"{url} was cut off after {received:,} of its {size:,} bytes")
            elif (got := file_digest(tmp, algorithm)).startswith(digest):
                os.chmod(tmp, 0o644)  # mkstemp makes files private; datasets are meant to be shared
                os.replace(tmp, dest)
                return
            else:  # a damaged transfer, a changed mirror or a captive portal's page: the next mirror may do better
                failures.append(f"{url} failed its {algorithm} check (got {got}, want {digest})")
        except OSError as e:
            if e.errno in _LOCAL_WRITE_ERRORS:  # the disk, not the server: another mirror would fail the same way
                raise _unwritable(dest.parent, e) from None
            failures.append(f"{url}: {e}")  # URLError and timeouts are OSErrors
        except (ValueError, http.client.HTTPException) as e:
            failures.append(f"{url}: {e}")
        finally:
            Path(tmp).unlink(missing_ok=True)
    raise OSError(", ".join(failures))


# Errors of writing an open file: not EACCES, which a refused connection can raise too (creating the file is apart).
_LOCAL_WRITE_ERRORS = (errno.ENOSPC, errno.EROFS, getattr(errno, "EDQUOT", errno.ENOSPC))


def _unwritable(folder: Path, error: OSError) -> ImgclfError:
    return ImgclfError(f"cannot write into {folder} ({error.strerror or error}); free some space there, or point "
                       "--data-dir (or IMGCLF_DATA) at a writable folder")


# torchvision's ImageNet weights of VGG and ResNet-18 (IMAGENET1K_V1): a name's hex starts the file's sha256.
PRETRAINED = {name: f"https://download.pytorch.org/models/{name}-{digest}.pth" for name, digest in (
    ("vgg11", "8a719046"), ("vgg13", "19584684"), ("vgg16", "397923af"), ("vgg19", "dcbb9e9d"),
    ("vgg11_bn", "6002323d"), ("vgg13_bn", "abd245e5"), ("vgg16_bn", "6c64b313"), ("vgg19_bn", "c79401a0"),
    ("resnet18", "f37072fd"))}


def pretrained_file(name: str, data_dir: str | Path | None = None) -> Path:
    """The ImageNet weights file of PRETRAINED[name] in <data root>/weights/, downloaded on first use and checked
    against the sha256 start its name carries, as datasets are against their md5."""
    url = PRETRAINED[name]
    folder = data_root(data_dir) / "weights"
    dest = folder / url.rsplit("/", 1)[1]
    if not dest.is_file():
        made = _made_folder(folder)
        try:
            with folder_lock(folder):
                if not dest.is_file():  # another process may have fetched it while this one waited
                    _download([url], dest, dest.stem.rsplit("-", 1)[1], "sha256")
        except OSError as e:
            raise ImgclfError(f"cannot download the ImageNet weights {dest.name} ({e}); offline, put the "
                              f"file from {url} into {folder}") from None
        finally:
            remove_empty(made)  # a failed download leaves no empty folders behind
    _verify(f"ImageNet weights {name}", dest, dest.stem.rsplit("-", 1)[1], "sha256")
    return dest


def _made_folder(folder: Path) -> list[Path]:
    """Make folder (and its parents), or say in one line why it cannot be; returns the folders made."""
    made = missing_folders(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ImgclfError(f"{file_in_the_way(folder)} is a file, not a folder, so {folder} cannot be made; move "
                          "it, or point --data-dir (or IMGCLF_DATA) at another folder") from None
    except OSError as e:
        raise _unwritable(folder.parent, e) from None
    return made


def _extract(name: str, archive: Path, folder: Path, wanted: list[str]) -> None:
    """Extract into a temp dir, then move only the wanted files into place: nothing already there changes.
    Called with the folder locked, so an earlier temp dir there is what a killed extraction left."""
    for stray in folder.glob(".extract-*"):
        shutil.rmtree(stray, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".extract-"))
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")  # refuses absolute paths, '..', devices and links out of tmp
        for rel in wanted:
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            with open(tmp / rel, "r+b") as extracted:  # Windows flushes only files open for writing
                os.fsync(extracted.fileno())
            os.replace(tmp / rel, folder / rel)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ImgclfError(f"{name}: could not extract {archive} ({e}); {_FIX}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _ensure_files(name: str, root: Path, download: bool) -> Path:
    spec = DATASETS[name]
    folder = root / spec["folder"]

    def missing_files() -> list[str]:
        return [f for f in spec["files"] if not (folder / f).is_file()]

    if missing := missing_files():
        archive, archive_md5 = spec.get("archive") or (None, None)

        def where() -> str:  # the files still missing: a download may have fetched some before one failed
            still = [f for f in missing if not (folder / f).is_file()]
            need = f"{archive} (or its extracted {missing[0].split('/')[0]}/)" if archive else ", ".join(still)
            return (f"put {need} in {folder}, or point --data-dir (or IMGCLF_DATA) at a folder that has "
                    f"{spec['folder']}/ with them")

        if not download and not (archive and (folder / archive).is_file()):  # a local archive only extracts
            raise ImgclfError(f"{name}: {', '.join(missing)} missing from {folder}; {where()}, "
                              "or allow downloads")
        made = _made_folder(folder)
        try:
            # Processes that start together (the ranks of --nproc, tune's workers, two commands) fetch each
            # file once, the others waiting for it.
            with folder_lock(folder):
                if missing := missing_files():  # else another process fetched them while this one waited
                    for f in [archive] if archive else missing:
                        if not (folder / f).is_file():
                            _download([m + f for m in spec["mirrors"]], folder / f, archive_md5 or spec["files"][f])
                    if archive:
                        _verify(name, folder / archive, archive_md5)
                        _extract(name, folder / archive, folder, missing)
        except OSError as e:
            raise ImgclfError(f"{name}: could not download ({e}); {where()}") from e
        finally:
            remove_empty(made)  # a failed download leaves no empty folders behind (a good one fills them)
    for f, md5 in spec["files"].items():
        _verify(name, folder / f, md5)
    return folder


# ---- named datasets: each loader gives class names and {split: (images NCHW uint8, labels int64)} ----

Arrays = dict[str, tuple[np.ndarray, np.ndarray]]


def _checked(name: str, images: np.ndarray, labels: np.ndarray, num_classes: int, path: Path):
    if len(images) != len(labels):
        raise ImgclfError(f"{name}: {path} has {len(labels)} labels for {len(images)} images; {_FIX}")
    if len(labels) and not 0 <= labels.min() <= labels.max() < num_classes:
        raise ImgclfError(f"{name}: {path} has labels outside 0..{num_classes - 1}; {_FIX}")
    return np.ascontiguousarray(images), labels.astype(np.int64)


def _read_idx(name: str, path: Path, magic: int, ndim: int) -> np.ndarray:
    try:
        with gzip.open(path) as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # not gzip, or truncated
        raise ImgclfError(f"{name}: {path} is not a readable gzip file ({e}); {_FIX}") from e
    header = 4 + 4 * ndim
    if len(raw) < header or struct.unpack(">I", raw[:4])[0] != magic:
        raise ImgclfError(f"{name}: {path} is not an IDX file (magic {raw[:4].hex()}, want {magic:08x}); "
                          f"{_FIX}")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) - header != np.prod(shape):
        raise ImgclfError(f"{name}: {path} holds {len(raw) - header} bytes of data but its header {shape} "
                          f"says {np.prod(shape)}; {_FIX}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape).copy()


def _load_idx(name: str, folder: Path) -> tuple[list[str], Arrays]:
    classes = DATASETS[name]["classes"]
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(name, folder / f"{prefix}-images-idx3-ubyte.gz", 0x803, 3)
        labels_path = folder / f"{prefix}-labels-idx1-ubyte.gz"
        labels = _read_idx(name, labels_path, 0x801, 1)
        splits[split] = _checked(name, images[:, None], labels, len(classes), labels_path)
    return list(classes), splits


class _CifarUnpickler(pickle.Unpickler):
    """Pickles can run arbitrary code, so only the globals that pickled numpy arrays need are allowed."""

    allowed = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")  # the originals are Python 2 pickles with byte-string keys
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in self.allowed:
            raise ImgclfError(f"refusing to unpickle {module}.{name} in {self.path}: not a CIFAR file; "
                              f"{_FIX}")
        return super().find_class(module, name)


def _unpickle(name: str, path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, path).load()
    except ImgclfError:
        raise
    except Exception as e:  # a damaged pickle can fail in many ways; all mean the same to the user
        raise ImgclfError(f"{name}: {path} is not a readable CIFAR pickle ({e!r}); {_FIX}") from e
    if not isinstance(obj, dict):
        raise ImgclfError(f"{name}: {path} holds a {type(obj).__name__}, not a CIFAR dict; {_FIX}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_arrays(name: str, path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(name, path)
    data = d.get("data")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ImgclfError(f"{name}: {path} has no (N, 3072) uint8 'data' array; {_FIX}")
    if label_key not in d:
        raise ImgclfError(f"{name}: {path} has no {label_key!r}; {_FIX}")
    return _checked(name, data.reshape(-1, 3, 32, 32), np.asarray(d[label_key]), num_classes, path)


def _names(name: str, path: Path, key: str) -> list[str]:
    if not (names := _unpickle(name, path).get(key)):
        raise ImgclfError(f"{name}: {path} has no {key!r}; {_FIX}")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _load_cifar10(name: str, folder: Path) -> tuple[list[str], Arrays]:
    base = folder / "cifar-10-batches-py"
    classes = _names(name, base / "batches.meta", "label_names")
    batches = [_cifar_arrays(name, base / f"data_batch_{i}", "labels", len(classes)) for i in range(1, 6)]
    train = np.concatenate([x for x, _ in batches]), np.concatenate([y for _, y in batches])
    return classes, {"train": train, "test": _cifar_arrays(name, base / "test_batch", "labels", len(classes))}


def _load_cifar100(name: str, folder: Path) -> tuple[list[str], Arrays]:
    base = folder / "cifar-100-python"
    level = "coarse" if name.endswith("coarse") else "fine"
    classes = _names(name, base / "meta", f"{level}_label_names")
    return classes, {s: _cifar_arrays(name, base / s, f"{level}_labels", len(classes))
                     for s in ("train", "test")}


def _load_digits(name: str, folder: Path) -> tuple[list[str], Arrays]:
    from sklearn.datasets import load_digits  # here: scikit-learn takes seconds to import, and most runs need less

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)[:, None]  # sklearn stores 0..16
    labels = digits.target.astype(np.int64)
    train, test = _split_indices(labels, _FIXED_TEST_SEED, test_size=0.2)  # digits comes as one set
    return list(DATASETS[name]["classes"]), {"train": (images[train], labels[train]),
                                             "test": (images[test], labels[test])}


_LOADERS = {"idx": _load_idx, "cifar10": _load_cifar10, "cifar100": _load_cifar100, "digits": _load_digits}


# ---- image folders ----

def files_under(folder: Path) -> list[str]:
    """Every file below folder in a stable order, leaving out hidden ones (.DS_Store, .ipynb_checkpoints/) and
    pipes, sockets and devices (opening a pipe waits for a writer: forever). Linked folders are followed (as a linked
    class folder is), each real folder once: a link loop ends; dangling links stay, to be skipped with a warning."""
    found, seen = [], {os.path.realpath(folder)}

    def visit(path: str) -> None:  # depth first, files before sub-folders, each in name order (as os.walk)
        try:
            with os.scandir(path) as listing:
                entries = sorted((e for e in listing if not e.name.startswith(".")), key=lambda e: e.name)
        except OSError:  # unreadable: as os.walk, left out
            return
        folders = []
        for entry in entries:  # the entry types come with the listing: no stat per file, except for links
            if entry.is_dir():
                if (real := os.path.realpath(entry.path)) not in seen:
                    seen.add(real)
                    folders.append(entry.path)
            elif entry.is_file() or entry.is_symlink() and not os.path.exists(entry.path):
                found.append(entry.path)
        for sub in folders:
            visit(sub)

    visit(str(folder))
    return found


def _folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "__MACOSX")))


def _split_dirs(root: Path) -> dict[str, Path]:
    """The split folders of a dataset folder ({'all': root} where it has none), refusing ambiguous layouts."""
    folders = _folders(root)
    found: dict[str, list[Path]] = {}
    for d in folders:
        for split, names in _SPLIT_FOLDERS.items():
            if d.name.lower() in names:
                found.setdefault(split, []).append(d)
    if not found:
        return {"all": root}
    if twice := next((dirs for dirs in found.values() if len(dirs) > 1), None):
        raise ImgclfError(f"{root} has both {twice[0].name}/ and {twice[1].name}/ for one split; merge them, "
                          "or rename one")
    others = [d.name for d in folders if d not in [ds[0] for ds in found.values()]]
    if len(found) == 1 and len(others) >= 2 and not _folders(alone := next(iter(found.values()))[0]):
        # train/ beside bus/ and car/, with images of its own: a class (CIFAR-100 has one). Not train/ beside
        # test1/ alone, nor train/ and val/ beside labels/: flat splits, which no class folders describe.
        warnings.warn(f"{root}: {alone.name}/ holds images, not class folders, beside {len(others)} other "
                      f"folders: it is read as a class named {alone.name}", stacklevel=4)
        return {"all": root}
    if others:
        have = ", ".join(f"{ds[0].name}/" for ds in found.values())
        raise ImgclfError(f"{root} has split folders ({have}) and also {', '.join(others[:3])}/: move class "
                          f"folders into {found.get('train', next(iter(found.values())))[0]}/, or move the "
                          "others out")
    return {split: dirs[0] for split, dirs in found.items()}


def _scan_folder(root: Path) -> tuple[list[str], dict[str, list[tuple[str, str]]], dict[str, Path]]:
    """Class names, (file, class) per split and the split folders; a root without train/val/test folders
    (or their other names, _SPLIT_FOLDERS) is one split, 'all'."""
    split_dirs = _split_dirs(root)
    files, classes = {}, set()
    for split, d in split_dirs.items():
        class_dirs = _folders(d)
        # One name per class: archives made on macOS spell accented folder names decomposed (NFD), so one
        # split's café would otherwise be another class than the other's.
        names = {c: unicodedata.normalize("NFC", c.name) for c in class_dirs}
        classes.update(names.values())
        files[split] = [(f, names[c]) for c in class_dirs for f in files_under(c)]
    image_suffixes = Image.registered_extensions()
    for d in {root, *split_dirs.values()}:
        if loose := sorted(p.name for p in d.iterdir() if p.is_file() and p.suffix.lower() in image_suffixes
                           and not p.name.startswith(".")):
            warnings.warn(f"{d}: {len(loose)} image(s) outside any class folder are not used, e.g. "
                          f"{', '.join(loose[:3])}; move them into their class folder", stacklevel=4)
    if not classes:
        raise ImgclfError(f"{root} has no class sub-folders; put images in {root}/<class>/ "
                          f"or {root}/train/<class>/")
    return sorted(classes), files, split_dirs


def read_header(path: str) -> tuple[int, int, bool] | None:
    """(width, height, gray) as the image is shown: a phone photo's EXIF rotation swaps width and height."""
    try:
        with Image.open(path) as im:  # reads the header only
            turned = im.getexif().get(ExifTags.Base.Orientation) in (5, 6, 7, 8)
            w, h = (im.height, im.width) if turned else (im.width, im.height)
            return w, h, im.mode in _GRAY_MODES
    except Exception:  # PIL raises many exception types for non-images; each means "skip this file"
        return None


class TooManyPixels(ValueError):
    """An image that would decode to more pixels than the caller allows (its message: the decoded size)."""


class UnsupportedImage(ValueError):
    """An image file that reads but whose pixels imgclf cannot map to 0..255 (its message: why, and the fix)."""


def read_image(path: str | Path | BinaryIO, mode: str, size: tuple[int, int],
               max_pixels: int | None = None) -> np.ndarray:
    """One image file -> uint8 (C, H, W) in `mode` ('L' or 'RGB') and `size` (w, h); raises on a bad file.

    With `max_pixels`, an image that would decode to more pixels raises TooManyPixels before it is decoded.
    """
    with warnings.catch_warnings():
        # PIL's warning names no fix: the caller's limit decides, or PIL's error at twice it, which callers word
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = Image.open(path)
    with im:
        im.draft(mode, size)  # JPEG: decode big photos at 1/2..1/8 scale, ~5x faster, ~same pixels
        if max_pixels is not None and im.width * im.height > max_pixels:
            raise TooManyPixels(f"{im.width}x{im.height}")
        if im.mode == "F" or (im.mode == "I" and im.format not in ("PNG", "PPM")):  # PNG and PGM "I" are 16-bit
            # 32-bit integer or float pixels (scientific TIFFs) have no standard range: any scaling is a guess
            raise UnsupportedImage(f"{im.mode} (32-bit) pixels; convert it to 8 or 16 bits")
        im = ImageOps.exif_transpose(im)  # phone photos: apply the rotation tag
        if im.mode.startswith("I"):  # 16-bit gray (I;16, or I as PNG opens it): PIL's convert clips to 255
            im = Image.fromarray((np.asarray(im, dtype=np.float64) / 257).clip(0, 255).round().astype(np.uint8))
        if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
            # On white, as image viewers show transparency: dropping alpha would keep whatever colour the
            # transparent pixels happen to store (often black).
            im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))
        converted = im.convert(mode)
    if converted.size != size:
        converted = converted.resize(size, Image.Resampling.BILINEAR)
    pixels = np.asarray(converted)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def _decode_image(path: str, mode: str, size: tuple[int, int]) -> np.ndarray | None:
    try:
        return read_image(path, mode, size)
    except Exception:  # truncated or corrupt files pass the header check and fail only here
        return None


def _map(fn, items: list) -> list:
    if len(items) < _POOL_MIN_FILES:
        return [fn(x) for x in items]
    with multiprocessing.Pool(_DECODE_WORKERS) as pool:
        return pool.map(fn, items, chunksize=256)


def _decode_folder(root: Path, files: dict, class_names: list[str], channels: int | None,
                   image_size: int | None) -> dict[str, np.ndarray]:
    paths = [p for entries in files.values() for p, _ in entries]
    headers = dict(zip(paths, _map(read_header, paths), strict=True))
    if not (readable := [h for h in headers.values() if h is not None]):
        raise ImgclfError(f"{root} has no readable images among {len(paths)} files; put PNG/JPEG/BMP/WebP/"
                          f"GIF images in {root}/<class>/ or {root}/<split>/<class>/")
    channels = channels or (1 if all(gray for _, _, gray in readable) else 3)
    w, h = (image_size, image_size) if image_size else Counter((w, h) for w, h, _ in readable).most_common(1)[0][0]
    if w != h or w > MAX_IMAGE_SIZE:  # the models take square images, of small-image sizes
        why = "not square" if w != h else f"more than {MAX_IMAGE_SIZE} pixels a side"
        raise ImgclfError(f"most images in {root} are {w}x{h} ({why}); pass --image-size N to resize every image "
                          f"to NxN, e.g. --image-size {min(max(w, h), 64)}")
    todo = [p for p in paths if headers[p] is not None]
    decode = partial(_decode_image, mode="L" if channels == 1 else "RGB", size=(w, h))
    decoded = dict(zip(todo, _map(decode, todo), strict=True))
    label_of = {c: i for i, c in enumerate(class_names)}
    arrays = {"skipped": np.array([p for p in paths if decoded.get(p) is None], dtype=str)}
    for split, entries in files.items():
        kept = [(decoded[p], label_of[c], Path(p).relative_to(root).as_posix()) for p, c in entries
                if decoded.get(p) is not None]
        images = np.stack([x for x, _, _ in kept]) if kept else np.zeros((0, channels, h, w), np.uint8)
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = np.array([y for _, y, _ in kept], np.int64)
        arrays[f"{split}_files"] = np.array([f for _, _, f in kept], dtype=str)
    return arrays


def _carved_test(files: np.ndarray, labels: np.ndarray, fraction: float = 0.2) -> np.ndarray:
    """Which images of a folder without split folders are test images: those whose path hashes below `fraction`.

    Each image's split depends on its own path only, so adding or removing images never moves another one
    between train and test (a seeded shuffle would, and a later model would then be tested on images an earlier
    one trained on). A class that would have no training image keeps all of its images for training.
    """
    digests = [hashlib.sha256(f.encode()).digest()[:8] for f in files]
    test = np.array([int.from_bytes(d, "big") / 2**64 < fraction for d in digests], dtype=bool)
    for label in np.unique(labels):
        if test[labels == label].all():
            test[labels == label] = False
    return test


def _write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    try:  # uncompressed: reading the cache must be much faster than decoding
        atomic_write(path, lambda file: np.savez(file, **arrays))
    except (OSError, ImgclfError) as e:
        warnings.warn(f"could not write the folder cache {path} ({e}); the next load decodes again",
                      stacklevel=4)


def _file_stamp(path: str) -> tuple[int, int, int]:
    """(size, mtime, ctime) in ns: ctime changes with any rewrite, also one that restores size and mtime.
    A file that cannot be read (a dangling link, say) gets -1s: it is decoded, fails and is skipped."""
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1, -1
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj).encode()).hexdigest()


def _stamp(class_names: list[str], files: dict[str, list[tuple[str, str]]]) -> str:
    return _digest([class_names, [(p, *_file_stamp(p)) for entries in files.values() for p, _ in entries]])[:32]


def folder_stamp(root: str | Path) -> str | None:
    """Of an image folder's classes and files (paths, sizes, times), without decoding them: tells whether its
    images changed since a run was trained on it. None when it is no longer an image folder."""
    try:
        class_names, files, _ = _scan_folder(Path(root).resolve())
    except (ImgclfError, OSError):
        return None
    return _stamp(class_names, files)


def _load_folder(root: Path, cache_root: Path, channels: int | None,
                 image_size: int | None) -> tuple[list[str], Arrays, str]:
    class_names, files, split_dirs = _scan_folder(root.resolve())
    stamp = _stamp(class_names, files)
    # Absolute paths: a moved folder decodes again. The class list: cached labels index it, and an empty class
    # folder added or removed changes it without changing any file. Named <folder>-<contents>, so that a new
    # version of a folder's cache replaces the old one instead of piling up beside it.
    folder_key = _digest(["v5", str(root.resolve()), channels, image_size])[:16]
    cache = cache_root / "folder-cache" / f"{folder_key}-{stamp}.npz"
    needed = {"skipped"} | {f"{s}_{part}" for s in files for part in ("images", "labels", "files")}
    try:
        with np.load(cache) as z:
            arrays = {k: z[k] for k in z.files}
        if not needed <= arrays.keys():
            raise ValueError("incomplete cache")
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):  # no cache yet, or a damaged one
        arrays = _decode_folder(root.resolve(), files, class_names, channels, image_size)
        _write_cache(cache, arrays)
        for old in cache.parent.glob(f"{folder_key}-*.npz"):
            if old != cache:
                old.unlink(missing_ok=True)
    if len(skipped := arrays["skipped"]):
        warnings.warn(f"{root}: skipped {len(skipped)} file(s) that are not readable 8- or 16-bit images, e.g. "
                      f"{', '.join(skipped[:3])}", stacklevel=3)
    splits = {s: (arrays[f"{s}_images"], arrays[f"{s}_labels"]) for s in files}
    if "all" in splits:
        images, labels = splits.pop("all")
        test = _carved_test(arrays["all_files"], labels)
        splits = {"train": (images[~test], labels[~test]), "test": (images[test], labels[test])}
    if "train" not in splits:  # evaluation-only folder
        images = next(iter(splits.values()))[0]
        splits["train"] = images[:0], np.zeros(0, np.int64)
    elif empty := [c for i, c in enumerate(class_names) if not (splits["train"][1] == i).any()]:
        where = split_dirs.get("train", root)
        if missing := [c for c in empty if not (where / c).is_dir()]:  # a class only the val or test split has
            other = next(d for d in split_dirs.values() if (d / missing[0]).is_dir())
            raise ImgclfError(f"class folder {missing[0]} is in {other} but not in {where}; add it with "
                              f"training images, or remove it from {other}")
        several = len(empty) > 1
        raise ImgclfError(f"class folder{'s' if several else ''} {', '.join(empty[:5])} in {where} "
                          f"hold{'' if several else 's'} no readable training images; add images or remove "
                          f"the folder{'s' if several else ''}")
    return class_names, splits, stamp


# ---- common processing ----

def _split_indices(labels: np.ndarray, seed: int, **size) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded split of range(len(labels)) by train_size= or test_size=; both parts sorted."""
    from sklearn.model_selection import train_test_split  # here: a second of imports that only splits need

    idx = np.arange(len(labels))
    # A class of one image cannot be stratified, and sklearn then refuses for every class: it trains, and the
    # other classes are stratified.
    alone = np.bincount(labels)[labels] < 2
    rest = dict(size)
    if isinstance(size.get("train_size"), numbers.Integral):  # a subset's count includes them
        rest["train_size"] = size["train_size"] - int(alone.sum())
    try:
        a, b = train_test_split(idx[~alone], stratify=labels[~alone], random_state=seed, **rest)
        a = np.concatenate([a, idx[alone]])
    except ValueError:  # still too small to stratify (fewer held-out images than classes): unstratified beats refusing
        try:
            a, b = train_test_split(idx, random_state=seed, **size)
        except ValueError as e:
            raise ImgclfError(f"cannot split {len(labels)} images ({e}); use more images, or a smaller "
                              "--val-split / --subset") from e
    # The first part (training images) must keep every class, which a large second part or a class of one or
    # two images can take (stratified or not): one image of each class it lost comes back.
    lost = np.setdiff1d(labels[b], labels[a])
    back = np.array([b[labels[b] == c][0] for c in lost], dtype=idx.dtype)
    a, b = np.concatenate([a, back]), np.setdiff1d(b, back)
    return np.sort(a), np.sort(b)


def _to_channels(images: torch.Tensor, channels: int | None) -> torch.Tensor:
    if channels is None or images.shape[1] == channels:
        return images
    if channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)  # ITU-R 601, as PIL's convert("L")
    out = torch.empty((len(images), 1, *images.shape[2:]), dtype=torch.uint8)
    for i in range(0, len(images), _CHUNK):
        out[i:i + _CHUNK] = (images[i:i + _CHUNK] * luma).sum(1, keepdim=True).round().clamp(0, 255)
    return out


def _resize(images: torch.Tensor, size: int | None) -> torch.Tensor:
    if size is None or images.shape[2:] == (size, size):
        return images
    out = torch.empty((*images.shape[:2], size, size), dtype=torch.uint8)
    for i in range(0, len(images), _CHUNK):
        x = F.interpolate(images[i:i + _CHUNK].float(), (size, size), mode="bilinear", antialias=True)
        out[i:i + _CHUNK] = x.round().clamp(0, 255)
    return out


def _converted(images: torch.Tensor, channels: int | None, size: int | None,
               pick: np.ndarray | None = None) -> torch.Tensor:
    """images[pick] (all where pick is None) in `channels` and size x size, a chunk at a time."""
    n = len(images) if pick is None else len(pick)
    shape = (channels or images.shape[1], *((size, size) if size else images.shape[2:]))
    if shape == tuple(images.shape[1:]):
        return images if pick is None else images[pick]
    try:
        out = torch.empty((n, *shape), dtype=torch.uint8)
    except (RuntimeError, MemoryError):  # torch says "can't allocate memory" with a stack trace
        raise ImgclfError(f"not enough memory for {n:,} images at {shape[1]}x{shape[2]} pixels "
                          f"({n * math.prod(shape) / 2**30:,.2f} GiB); use a smaller --image-size") from None
    for i in range(0, n, _CHUNK):
        part = images[i:i + _CHUNK] if pick is None else images[pick[i:i + _CHUNK]]
        out[i:i + _CHUNK] = _resize(_to_channels(part, channels), size)
    return out


def _mean_std(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact, from per-channel pixel histograms: uint8 has 256 values, and counting beats float sums.
    numpy's single-threaded bincount, because torch's threaded ops slow down badly on a busy CPU."""
    c = images.shape[1]
    if len(images) == 0:
        return (0.0,) * c, (1.0,) * c
    pixels, hist = images.numpy(), np.zeros((c, 256), np.int64)
    for i in range(0, len(pixels), _CHUNK):
        for ch in range(c):
            hist[ch] += np.bincount(pixels[i:i + _CHUNK, ch].ravel(), minlength=256)
    p = hist / hist.sum(1, keepdims=True)
    values = np.arange(256) / 255
    mean = p @ values
    std = np.sqrt(np.maximum(p @ values**2 - mean**2, 0))
    std[std < 1e-3] = 1.0  # a constant channel: nothing to scale, and dividing by 0 would train on NaN
    return tuple(mean.tolist()), tuple(std.tolist())


def load_config_dataset(config: RunConfig) -> Dataset:
    """The images a run of `config` trains on, with the validation split its seed carves."""
    data = config.data
    return load_dataset(data.dataset, data.data_dir, subset=data.subset, image_size=data.image_size,
                        **config.split_options())


def load_dataset(name: str, data_dir: str | Path | None = None, *, val_split: float = 0.1,
                 subset: int | None = None, grayscale: bool = False, seed: int = 0, download: bool = True,
                 image_size: int | None = None, channels: int | None = None) -> Dataset:
    """Load a named dataset (see DATASETS) or an image folder. A name wins over a same-named folder in the
    working directory (write ./mnist for the folder). A folder's own val/ is used whatever val_split says."""
    if not is_number(val_split) or not 0 <= val_split < 1:
        raise ImgclfError(f"val_split must be a number in [0, 1), got {val_split!r}; use e.g. --val-split 0.1, "
                          "or 0")
    if not isinstance(name, str | os.PathLike) or name == "":  # Path("") would be the working directory
        raise ImgclfError(f"give a dataset name (see `imgclf datasets`) or an image folder, not {name!r}")
    if data_dir is not None and not isinstance(data_dir, str | os.PathLike):
        raise ImgclfError(f"data_dir is a folder path, not {data_dir!r}")
    check_flags(grayscale=grayscale, download=download)
    if not is_whole(seed, 0, 2**32 - 1):
        raise ImgclfError(f"seed {seed!r}: use a whole number from 0 to 2**32 - 1")
    if channels not in (None, 1, 3):
        raise ImgclfError(f"channels must be 1 or 3, got {channels}; pass channels=1 or channels=3")
    if grayscale and channels == 3:
        raise ImgclfError("grayscale means 1 channel but channels=3; drop grayscale or channels")
    if image_size is not None and not is_whole(image_size, 1, MAX_IMAGE_SIZE):  # as RunConfig.validate says it
        raise ImgclfError(f"invalid image size {image_size!r}; use 1 to {MAX_IMAGE_SIZE} pixels (small-image "
                          "classifiers)")
    if subset is not None and not is_whole(subset):
        raise ImgclfError(f"invalid subset {subset!r}; use a positive whole number of images")
    # Python numbers from here on: numpy's (np.int64(32) from a sweep) trip up JSON and scikit-learn's checks.
    # np.float32(0.2) by its shortest text: as a float it is 0.2000000003, which holds out one image more.
    val_split = float(str(val_split)) if isinstance(val_split, np.floating) else float(val_split)
    seed = int(seed)
    subset, image_size = (None if n is None else int(n) for n in (subset, image_size))
    channels = 1 if grayscale else channels
    root = data_root(data_dir)
    if name in DATASETS:
        spec = DATASETS[name]
        folder = _ensure_files(name, root, download) if spec["files"] else root / spec["folder"]
        (class_names, arrays), stamp = _LOADERS[spec["kind"]](name, folder), None
    elif folder := image_folder(name):
        outside_datasets(root, "its cache of decoded images", name, flag="--data-dir")
        class_names, arrays, stamp = _load_folder(folder, root, channels, image_size)
    else:
        raise _unknown(name)

    raw = {s: (torch.from_numpy(x), torch.from_numpy(y)) for s, (x, y) in arrays.items()}
    # Which images of the raw arrays each split takes (None: all of them); converted only at the end, so a subset
    # does not resize the training images it leaves out, and nothing is copied before it is converted.
    picks: dict[str, tuple[str, np.ndarray | None]] = {s: (s, None) for s in raw}
    labels = raw["train"][1]
    kept = np.arange(len(labels))
    if "val" not in raw and val_split > 0 and len(labels):
        kept, held = _split_indices(labels.numpy(), seed, test_size=val_split)
        picks["val"] = "train", held
    if subset is not None:
        if subset < len(class_names):
            raise ImgclfError(f"subset={subset} is fewer than the {len(class_names)} classes; use --subset "
                              f"{len(class_names)} or more")
        if subset < len(kept):
            kept = kept[_split_indices(labels.numpy()[kept], seed, train_size=subset)[0]]
        elif subset > len(kept):
            warnings.warn(f"subset {subset:,} is more than the {len(kept):,} training images of {name}: "
                          "training on all of them", stacklevel=2)
    picks["train"] = "train", None if len(kept) == len(labels) else kept
    splits = {s: (_converted(raw[source][0], channels, image_size, pick),
                  raw[source][1] if pick is None else raw[source][1][pick]) for s, (source, pick) in picks.items()}
    images, labels = splits["train"]
    mean, std = _mean_std(images)
    val, test = (Split(*splits[s]) if s in splits else None for s in ("val", "test"))
    loaded_with = dict(zip(LOAD_OPTIONS, (val_split, subset, grayscale, image_size), strict=True)) | {"seed": seed}
    return Dataset(name, class_names, Split(images, labels), val, test, mean, std, stamp, loaded_with)
