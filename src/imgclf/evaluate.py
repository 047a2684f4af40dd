"""Evaluation and prediction: metrics of a trained model on a split, top-k labels for image files."""

from __future__ import annotations

import itertools
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from imgclf.config import load_recipe
from imgclf.data import (
    Dataset,
    TooManyPixels,
    UnsupportedImage,
    canonical_dataset,
    carves_test,
    files_under,
    load_dataset,
    read_image,
)
from imgclf.device import autocast, keep_freed_memory, memory_format, prediction_precision
from imgclf.errors import ImgclfError, is_number, is_whole
from imgclf.loader import normalize
from imgclf.runs import TrainedModel, load_model, warn_if_unfinished


def tta_shifts(augment: list[str], shift: int | None = None) -> list[tuple[int, int]]:
    """The (dy, dx) pixel shifts test-time augmentation averages, the centre first: with crop, the centre and
    two diagonal 1-pixel shifts (airbench), or with `shift` every translation up to that many pixels."""
    if "crop" in augment and shift:  # the centre first: a margin-gated TTA starts from it
        return sorted(((dy, dx) for dy in range(-shift, shift + 1) for dx in range(-shift, shift + 1)),
                      key=lambda offset: offset != (0, 0))
    if "crop" in augment:
        return [(0, 0), (-1, -1), (1, 1)]
    return [(0, 0)]


def tta_flips(augment: list[str]) -> bool:
    return "flip" in augment or "altflip" in augment


def tta_view_count(augment: list[str], shift: int | None = None) -> int:
    return len(tta_shifts(augment, shift)) * (2 if tta_flips(augment) else 1)


def tta_views(images: torch.Tensor, augment: list[str], shift: int | None = None) -> Iterator[torch.Tensor]:
    """The views averaged by test-time augmentation, those the net saw in training: each of tta_shifts in
    turn, followed by its left-right flip with flip or altflip."""
    flip = tta_flips(augment)
    offsets = tta_shifts(augment, shift)
    pad = max(abs(dy) for dy, _ in offsets)
    h, w = images.shape[-2:]
    if pad >= min(h, w):
        raise ImgclfError(f"tta_shift {pad} is not smaller than the {h}x{w} images; use a smaller shift")
    padded = F.pad(images, (pad,) * 4, mode="reflect") if pad else images
    for dy, dx in offsets:
        view = padded[..., pad + dy:pad + dy + h, pad + dx:pad + dx + w]
        yield view
        if flip:
            yield view.flip(3)


def _sum_of_views(net: torch.nn.Module, views: Iterator[torch.Tensor], start: int, stop: int | None) -> torch.Tensor:
    """The sum of the net's float logits over views[start:stop]: one view at a time, since 50 views of a batch
    need not be in memory together."""
    return sum(net(view).float() for view in itertools.islice(views, start, stop))


@torch.no_grad()
def predict_logits(net: torch.nn.Module, images: torch.Tensor, mean, std, *, batch_size: int = 500,
                   precision: str = "fp32", tta_augment: list[str] | None = None,
                   tta_shift: int | None = None, tta_margin: float | None = None) -> torch.Tensor:
    """Float32 logits for uint8 images (N, C, H, W); with tta_augment, averaged over the TTA views.

    With tta_margin, only images whose centre view (and its flip) leaves the top two classes' probabilities
    closer than tta_margin get the other views: the confident rest keep their prediction at a fraction of
    the cost (fashion-fast: 15% of the validation images, the same predictions)."""
    device = next(net.parameters()).device
    if len(images) > batch_size and device.type == "cpu":  # TTA on 10,000 images would otherwise page-fault
        keep_freed_memory()  # every batch in afresh; a few gain nothing, a server would keep its largest request's heap
    mean_t = torch.tensor(mean, device=device)
    std_t = torch.tensor(std, device=device)
    layout = memory_format(net, precision)
    # A net loaded from a run has contiguous filters, and a bf16 fastnet then predicted at a fraction of its
    # speed (for the training net, already in this layout, a no-op).
    net.to(memory_format=layout)
    if not len(images):
        return torch.empty(0, 0)
    was_training = net.training
    net.eval()

    def batches(rows: torch.Tensor) -> Iterator[torch.Tensor]:
        for start in range(0, len(rows), batch_size):
            x = normalize(images[rows[start:start + batch_size]].to(device), mean_t, std_t)
            yield x.contiguous(memory_format=layout)

    def views(x: torch.Tensor) -> Iterator[torch.Tensor]:
        return tta_views(x, tta_augment, tta_shift) if tta_augment is not None else iter([x])

    every_view = tta_view_count(tta_augment, tta_shift) if tta_augment is not None else 1
    first = 2 if every_view > 1 and tta_flips(tta_augment) else 1  # the centre and its flip
    rows = torch.arange(len(images))
    try:  # a training net goes back to training mode also when a view is refused (tta_shift too large)
        with autocast(device, precision):
            logits = torch.cat([_sum_of_views(net, views(x), 0, first) for x in batches(rows)]) / first
            if every_view > first:
                # Full batches of the unsure images: small ones ran at a fraction of speed. Margin 1: all are unsure.
                if tta_margin is not None and tta_margin < 1:
                    top2 = logits.softmax(1).topk(min(2, logits.shape[1]), dim=1).values
                    rows = rows[(top2[:, 0] - top2[:, -1] < tta_margin).cpu()]  # a CPU index, as for the images
                for start, x in zip(range(0, len(rows), batch_size), batches(rows), strict=True):
                    batch_rows = rows[start:start + batch_size]
                    rest = _sum_of_views(net, views(x), first, None)
                    logits[batch_rows] = (logits[batch_rows] * first + rest) / every_view
    finally:
        net.train(was_training)
    return logits


def top_classes(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of each row's k highest scores, ties in class order: bf16 logits often tie exactly,
    and topk's order among ties is unspecified, so predict could name another class than argmax (and the
    accuracy) counted."""
    values, indices = scores.sort(dim=1, descending=True, stable=True)
    return values[:, :k], indices[:, :k]


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> dict[str, Any]:
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support  # seconds to import: on use

    labels = labels.cpu()
    logits = logits.cpu()
    predicted = logits.argmax(1)  # the first of tied classes, as top_classes
    k = min(5, len(class_names))
    top5 = (top_classes(logits, k)[1] == labels[:, None]).any(1).sum().item() / len(labels)
    classes = list(range(len(class_names)))
    # A class never predicted has no precision, one absent from the split no recall or F1: None, not a 0 that
    # would pull a mean F1 down for classes the split cannot score.
    precision, recall, f1, support = precision_recall_fscore_support(
        labels.numpy(), predicted.numpy(), labels=classes, zero_division=np.nan)
    return {
        "accuracy": (predicted == labels).sum().item() / len(labels),  # 336/360 exactly, as scikit-learn's
        "top5_accuracy": top5 if len(class_names) >= 10 else None,
        "loss": F.cross_entropy(logits, labels).item(),
        "num_images": len(labels),
        "per_class": {name: {"precision": _defined(p), "recall": _defined(r), "f1": None if s == 0 else _defined(f),
                             "support": int(s)}
                      for name, p, r, f, s in zip(class_names, precision, recall, f1, support, strict=True)},
        "confusion_matrix": confusion_matrix(labels.numpy(), predicted.numpy(), labels=classes).tolist(),
    }


def _defined(value) -> float | None:
    return None if np.isnan(value) else float(value)


def as_model(run_or_model: str | Path | TrainedModel, device: str = "cpu") -> tuple[TrainedModel, Path | None]:
    """(model, its run folder) for a run folder, loaded on `device`, or (model, None) for a model already loaded
    (where it is)."""
    if isinstance(run_or_model, TrainedModel):
        return run_or_model, None
    model = load_model(run_or_model, device)
    warn_if_unfinished(run_or_model)  # a stopped run's last epoch: usable, but not the model it would become
    return model, Path(run_or_model)


def load_run_dataset(model: TrainedModel, run_dir: Path | None, dataset: str | None = None,
                     data_dir: str | None = None) -> Dataset:
    """The data to evaluate a model on, read at the model's input shape.

    By default the run's own dataset with its own val split, seed and grayscale setting (from its
    model.json, or the config.yaml of a run saved before model.json kept them), so its validation split is rebuilt
    exactly; `dataset` names another one instead, read whole: no validation split, and a folder of class folders
    only is all test split.
    """
    config = load_recipe(run_dir) if run_dir is not None and (run_dir / "config.yaml").exists() else None
    own_name = config.data.dataset if config else model.info.get("dataset")
    name = dataset or own_name
    if name is None:
        raise ImgclfError("this model does not record its dataset; pass --dataset NAME_OR_FOLDER")
    if dataset is None and Path(name).is_absolute() and not Path(name).exists():  # runs record folders in full
        raise ImgclfError(f"{name}, the image folder this run was trained on, is gone; move it back (evaluate "
                          "also takes its new place as --dataset)")
    own = dataset is None or (own_name is not None  # the run's own dataset, also when named again
                              and canonical_dataset(dataset) == canonical_dataset(own_name))
    options: dict[str, Any] = {"data_dir": data_dir or (config.data.data_dir if config else None)}
    split = model.info.get("split") or (config.split_options() if config else None)
    if own and split:  # its validation split is rebuilt exactly
        options.update(split)
    elif not own:  # another dataset keeps only how to read it: none of it is held out for a validation split
        options.update(val_split=0)
    options["channels"], options["image_size"] = model.input_shape[:2]
    data = load_dataset(name, **options)
    return data.all_as_test() if not own and carves_test(name) else data


def _align_labels(split_labels: torch.Tensor, data_classes: list[str], model_classes: list[str]) -> torch.Tensor:
    if data_classes == model_classes:
        return split_labels
    if set(data_classes) - set(model_classes):
        extra = sorted(set(data_classes) - set(model_classes))[:5]
        raise ImgclfError(f"the dataset has classes the model does not know ({', '.join(extra)}); "
                          "evaluate on data whose class names match the model's")
    mapping = torch.tensor([model_classes.index(c) for c in data_classes])
    return mapping[split_labels]


def prediction_options(model: TrainedModel, tta: bool | None,
                       tta_margin: float | None = None) -> tuple[bool, dict[str, Any]]:
    """(tta, predict_logits keywords) for a run: `tta=None` and `tta_margin=None` use its recipe's settings
    (tta_margin 1: every image gets every view); its precision, where the device has it (prediction_precision)."""
    if tta is not None and not isinstance(tta, bool):  # "false" would be true
        raise ImgclfError(f"tta is True, False or None (the run's recipe setting), not {tta!r}")
    if tta_margin is not None and (not is_number(tta_margin) or not 0 < tta_margin <= 1):
        raise ImgclfError(f"TTA margin {tta_margin!r}: use a probability in (0, 1]; 1 gives every image every view")
    asked, tta = tta, bool(model.info.get("tta", False)) if tta is None else tta
    device = next(model.net.parameters()).device
    options = {"precision": prediction_precision(model.info.get("precision", "fp32"), device)}
    if tta:
        views = {"tta_augment": model.info.get("augment", []), "tta_shift": model.info.get("tta_shift"),
                 "tta_margin": model.info.get("tta_margin") if tta_margin is None else tta_margin}
        # A run trained without flips or crops has only the image itself: say so rather than claim TTA.
        tta = tta_view_count(views["tta_augment"], views["tta_shift"]) > 1
        options.update(views if tta else {})
        if asked and not tta:
            warnings.warn("this run trained without crops or flips, so TTA has no views to average: predicting "
                          "each image as it is", stacklevel=3)
    return tta, options


def evaluate_with_logits(model: TrainedModel, data: Dataset, split: str, tta: bool | None = None,
                         batch_size: int = 500, tta_margin: float | None = None
                         ) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """evaluate() on a loaded model and dataset, also returning the logits and the (model-aligned) labels."""
    chosen = data.split(split)
    if (split == "val" and model.info.get("val_digest") and canonical_dataset(data.name) == model.info.get("dataset")
            and chosen.digest() != model.info["val_digest"]):
        # A folder whose images changed since training (or another seed or --val-split) carves another validation
        # split, which may hold training images: its score would look better than it is.
        if model.info.get("train_digest"):
            raise ImgclfError("this run trained on a Dataset object whose validation split is not the one rebuilt "
                              "here; pass that object: evaluate(run, dataset=data, split='val')")
        raise ImgclfError(f"the validation split of {data.name} is not the one this run held out (images added, "
                          "removed or changed since training?), so it may hold training images; evaluate on "
                          "--split test, or train again")
    if tuple(chosen.images.shape[1:]) != tuple(model.input_shape):
        raise ImgclfError(f"{data.name} images are {tuple(chosen.images.shape[1:])} but the model takes "
                          f"{tuple(model.input_shape)}; evaluate on data of the model's shape")
    if split != "train" and model.train_fingerprints is not None:
        # e.g. a copy of the training folder, scored whole, or a test folder that shares files with the training one
        seen = chosen.count_among(model.train_fingerprints)
        if seen:
            warnings.warn(f"{seen:,} of the {len(chosen):,} {split} images of {data.name} are images this model "
                          "trained on (the same pixels), so its score overstates how it does on new images; "
                          "evaluate on images kept out of training", stacklevel=2)
    tta, options = prediction_options(model, tta, tta_margin)
    # On the CPU, beside the labels and images: a report picks its example images by them.
    logits = predict_logits(model.net, chosen.images, model.mean, model.std, batch_size=batch_size, **options).cpu()
    labels = _align_labels(chosen.labels, data.class_names, model.class_names)
    metrics = classification_metrics(logits, labels, model.class_names)
    return {"dataset": data.name, "split": split, "tta": tta, **metrics}, logits, labels


def evaluate(run_or_model: str | Path | TrainedModel, dataset: str | Dataset | None = None, *,
             split: str = "test", tta: bool | None = None, data_dir: str | None = None,
             batch_size: int = 500, tta_margin: float | None = None, device: str = "auto") -> dict[str, Any]:
    """Accuracy, top-5, loss, per-class precision/recall/F1 and the confusion matrix on a split.

    By default the run's own dataset (with its own validation split and seed) and its test split.
    `tta=None` and `tta_margin=None` use the run's recipe settings. A run folder is loaded on `device` ("auto":
    the GPU where there is one).
    """
    if dataset is not None and (not isinstance(dataset, str | os.PathLike | Dataset) or dataset == ""):
        raise ImgclfError(f"dataset is a name, an image folder or a loaded Dataset, not {dataset!r}")
    if not is_whole(batch_size):
        raise ImgclfError(f"batch_size {batch_size!r}: give a whole number of images, 1 or more")
    model, run_dir = as_model(run_or_model, device)
    data = dataset if isinstance(dataset, Dataset) else load_run_dataset(model, run_dir, dataset, data_dir)
    return evaluate_with_logits(model, data, split, tta, batch_size, tta_margin)[0]


def read_images(sources: list[str | Path | BinaryIO], input_shape: tuple[int, int, int],
                names: list[str] | None = None, max_pixels: int | None = None) -> torch.Tensor:
    """Image files (paths, or open binary files named by `names`) of any size and mode -> uint8 (N, C, H, W)
    in the model's channels and size. `max_pixels` refuses images that would decode to more pixels."""
    c, h, w = input_shape
    arrays = []
    for source, name in zip(sources, names or sources, strict=True):
        try:
            arrays.append(read_image(source, "L" if c == 1 else "RGB", (w, h), max_pixels))
        except FileNotFoundError:
            raise ImgclfError(f"{name} does not exist; check the path") from None
        except UnsupportedImage as e:
            raise ImgclfError(f"{name} has {e}") from None
        except TooManyPixels as e:
            raise ImgclfError(f"{name} is {e}, more than the {max_pixels:,} pixels allowed; shrink it first") from None
        except Image.DecompressionBombError:
            raise ImgclfError(f"{name} has more pixels than can be decoded safely ({2 * Image.MAX_IMAGE_PIXELS:,}); "
                              "shrink it first") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise ImgclfError(f"{name} is not an image that can be read ({type(e).__name__}); "
                              "give PNG, JPEG, BMP, WebP, GIF or TIFF files") from None
    return torch.from_numpy(np.stack(arrays))


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")  # picked out of a folder


def image_files(sources: list[str | Path]) -> tuple[list[str], set[str]]:
    """The files to predict, and which of them were found in folders: each file as given, and for each folder
    the image files below it, sorted."""
    out, listed = [], set()
    for source in map(str, sources):
        if not Path(source).is_dir():
            out.append(source)
            continue
        found = [f for f in files_under(Path(source)) if f.lower().endswith(IMAGE_SUFFIXES)]
        if not found:
            raise ImgclfError(f"folder {source} holds no readable image files ({', '.join(IMAGE_SUFFIXES)}); "
                              "give image files or a folder of them")
        out += found
        listed.update(found)
    return out, listed


def predictions_json(names: list[str], results: list[list[tuple[str, float]]]) -> list[dict[str, Any]]:
    """The JSON of `imgclf predict --json` and of the prediction server: per image, its top labels."""
    return [{"image": str(name), "top": [{"label": c, "probability": p} for c, p in top]}
            for name, top in zip(names, results, strict=True)]


def _check_top_k(top_k) -> None:
    if not is_whole(top_k):
        raise ImgclfError(f"top-k {top_k!r}: ask for 1 or more labels per image (a whole number)")


def predict(run_or_model: str | Path | TrainedModel, images: str | Path | list[str | Path] | torch.Tensor, *,
            top_k: int = 3, tta: bool | None = None, tta_margin: float | None = None,
            device: str = "auto") -> list[list[tuple[str, float]]]:
    """Top-k (class name, probability) for each image file (a folder: each readable image below it, in the order
    predict_files names them) or for each image of a uint8 (N, C, H, W) tensor or numpy array. A folder's files
    that do not decode are skipped with a warning: predict_files also returns the names of those predicted."""
    _check_top_k(top_k)
    model, _ = as_model(run_or_model, device)
    if isinstance(images, np.ndarray):  # copied if read-only (np.broadcast_to), which torch warns about
        images = torch.from_numpy(images if images.flags.writeable else images.copy())
    if not isinstance(images, torch.Tensor):
        return predict_files(model, images, top_k=top_k, tta=tta, tta_margin=tta_margin, device=device)[1]
    if images.dtype != torch.uint8 or tuple(images.shape[1:]) != tuple(model.input_shape):
        # floats in [0, 1] would be scaled as 0..255 pixels, and predicted wrong without a word
        raise ImgclfError(f"images are a {images.dtype} tensor of shape {tuple(images.shape)}; give uint8 pixels "
                          f"(0..255) of shape (N, {', '.join(map(str, model.input_shape))}), e.g. "
                          "(x * 255).round().to(torch.uint8) for floats in [0, 1]")
    if not len(images):
        return []
    logits = predict_logits(model.net, images, model.mean, model.std, **prediction_options(model, tta, tta_margin)[1])
    probabilities = logits.softmax(1)
    k = max(1, min(top_k, model.num_classes))
    values, indices = top_classes(probabilities, k)
    return [[(model.class_names[i], float(p)) for p, i in zip(ps.tolist(), idx.tolist(), strict=True)]
            for ps, idx in zip(values, indices, strict=True)]


def predict_files(run_or_model: str | Path | TrainedModel, sources: str | Path | list[str | Path], *,
                  top_k: int = 3, tta: bool | None = None, tta_margin: float | None = None, device: str = "auto"
                  ) -> tuple[list[str], list[list[tuple[str, float]]]]:
    """(the files predicted, the top-k labels of each) for image files and folders. A file in a folder that does
    not decode (not an image, truncated, 32-bit pixels) is skipped with a warning, as training skips it; a file
    named itself is an error."""
    _check_top_k(top_k)  # before any image is decoded
    model, _ = as_model(run_or_model, device)
    paths = list(sources) if isinstance(sources, list | tuple) else [sources]  # not a name's letters
    if odd := [p for p in paths if not isinstance(p, str | os.PathLike)]:  # a PIL image, say: not "does not exist"
        raise ImgclfError(f"images: give image files, folders, or a uint8 tensor (N, C, H, W), not a "
                          f"{type(odd[0]).__module__}.{type(odd[0]).__name__}")
    if not paths:
        raise ImgclfError("no images given; give one or more image files or folders")
    files, listed = image_files(paths)
    decoded, kept, skipped = [], [], []
    for file in files:
        try:
            decoded.append(read_images([file], model.input_shape))
            kept.append(file)
        except ImgclfError:
            if file not in listed:
                raise
            skipped.append(file)
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable image file(s), e.g. {', '.join(sorted(skipped)[:3])}",
                      stacklevel=2)
    if not kept:
        raise ImgclfError(f"none of the {len(files)} image files could be decoded; give PNG, JPEG, BMP, WebP, GIF "
                          "or TIFF files")
    return kept, predict(model, torch.cat(decoded), top_k=top_k, tta=tta, tta_margin=tta_margin)
