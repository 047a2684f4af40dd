"""Reports: figures and an HTML page for a trained run, a comparison of runs, and pictures of a dataset.

Every figure is a PNG written atomically; the HTML pages hold their CSS and images inline, so a page can be
mailed or moved on its own.
"""

from __future__ import annotations

import base64
import csv
import functools
import html
import io
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
import yaml
from matplotlib.axes import Axes
from matplotlib.colors import Normalize, PowerNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from imgclf.config import describe_settings
from imgclf.data import Dataset, dataset_label
from imgclf.errors import ImgclfError
from imgclf.evaluate import evaluate_with_logits, load_run_dataset
from imgclf.runs import (
    TrainedModel,
    atomic_write,
    how_to_finish,
    load_model,
    output_folder,
    read_json,
    read_metrics,
    read_summary,
    runs_below,
    unfinished,
    written_together,
)

GREEN, RED = "#1a7f37", "#cf222e"
TRAIN_COLOR, VAL_COLOR = "#0969da", "#e36209"
NUM_EXAMPLES = 24  # images per example grid: 3 rows of 8

STYLE = {"axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3,
         "font.size": 10, "axes.titleweight": "bold"}


def _styled(draw):
    """Draw in our style without changing the caller's: a notebook's matplotlib settings stay its own."""
    @functools.wraps(draw)
    def styled(*args, **kwargs):
        with matplotlib.rc_context(STYLE):
            return draw(*args, **kwargs)
    return styled


def _subplots(*grid: int, figsize: tuple[float, float], squeeze: bool = True):
    """(figure, axes) as pyplot's subplots, but outside pyplot: files only, never a window or a notebook's
    backend (and nothing for pyplot to keep until closed)."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*grid, squeeze=squeeze)


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write a figure as PNG atomically (a kill never leaves half a file)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight", facecolor="white")
    atomic_write(Path(path), buffer.getvalue())
    return Path(path)


# ---- single figures ----

@_styled
def plot_curves(metrics_rows: list[dict[str, float]], path: str | Path, kept_epoch: int | None = None) -> Path:
    """Loss and accuracy per epoch, train vs validation, with the learning rate underneath; `kept_epoch` marks
    an earlier epoch whose weights the model holds (early stopping)."""
    fig = Figure(figsize=(10, 6.2))
    grid = fig.add_gridspec(2, 2, height_ratios=[3, 1.3], hspace=0.45, wspace=0.25)
    loss_ax, acc_ax, lr_ax = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[1, :])
    epochs = [r["epoch"] for r in metrics_rows]
    marker = "o" if len(epochs) <= 30 else None  # dots help read short runs, clutter long ones

    def series(key: str) -> list[float] | None:
        values = [r.get(key, math.nan) for r in metrics_rows]
        return values if any(not math.isnan(v) for v in values) else None  # no val split: no val line

    for ax, key, title in ((loss_ax, "loss", "Loss"), (acc_ax, "acc", "Accuracy")):
        for split, color, label in (("train", TRAIN_COLOR, "train"), ("val", VAL_COLOR, "validation")):
            values = series(f"{split}_{key}")
            if values is not None:
                values = [v * 100 for v in values] if key == "acc" else values
                ax.plot(epochs, values, color=color, marker=marker, markersize=4, label=label)
        ax.set(title=title, xlabel="epoch", ylabel="accuracy (%)" if key == "acc" else "cross-entropy")
        if kept_epoch is not None and epochs and kept_epoch != epochs[-1]:
            ax.axvline(kept_epoch, color="#6e7781", linestyle="--", linewidth=1,
                       label=f"weights kept (epoch {kept_epoch})")
        ax.legend(frameon=False)
    lrs = series("lr")
    if lrs is not None:
        lr_ax.plot(epochs, lrs, color="#6e7781", marker=marker, markersize=3)
    lr_ax.set(title="Learning rate (end of epoch)", xlabel="epoch", ylabel="lr")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for ax in (loss_ax, acc_ax, lr_ax):
        ax.xaxis.get_major_locator().set_params(integer=True)
    return save_figure(fig, path)


@_styled
def plot_confusion(confusion, class_names: list[str], path: str | Path, split: str | None = None) -> Path:
    """Heat-map of the confusion matrix, coloured by row (the fraction of each true class)."""
    counts = np.asarray(confusion)
    n = len(class_names)
    normalized = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    side = min(max(5.5, 0.5 * n + 2), 16)  # cells stay square; 100 classes still fit a screen
    fig, ax = _subplots(figsize=(side + 1.2, side))
    small = n > 20  # past 20 classes the cells are too small for numbers
    # With many classes the few mistakes per pair are faint next to the diagonal: a square-root scale shows them.
    norm = PowerNorm(0.5, vmin=0, vmax=1) if small else Normalize(0, 1)
    image = ax.imshow(normalized, cmap="Blues", norm=norm, interpolation="nearest")
    ax.grid(False)
    fontsize = 9 if not small else max(5, min(8, 600 // n))
    _class_ticks(ax, "x", class_names, fontsize)
    ax.set_yticks(range(n), class_names, fontsize=fontsize)
    if not small:
        for i in range(n):
            for j in range(n):
                if counts[i, j]:  # blank zeros keep the eye on the mistakes that happen
                    ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if normalized[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted class", ylabel="true class",
           title=f"Confusion matrix{f', {split} split' if split else ''}"
                 + ("" if small else " (image counts; colour: each row's fraction)"))
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04,
                 label="fraction of the true class" + (" (square-root scale)" if small else ""))
    return save_figure(fig, path)


def _class_ticks(ax: Axes, axis: str, class_names: list[str], fontsize: float) -> None:
    """Class names under an x axis: upright when short (digits), slanted when long, vertical when many."""
    n = len(class_names)
    if max(map(len, class_names), default=0) <= 2:
        options = {"rotation": 0}
    elif n <= 20:
        options = {"rotation": 45, "ha": "right", "rotation_mode": "anchor"}
    else:
        options = {"rotation": 90}
    getattr(ax, f"set_{axis}ticks")(range(n), class_names, fontsize=fontsize, **options)


def most_confused_pairs(confusion, class_names: list[str], k: int = 10) -> list[tuple[str, str, int]]:
    """The k most frequent (true, predicted, count) mistakes, largest first; ties in class order."""
    counts = np.asarray(confusion)
    pairs = [(int(counts[i, j]), i, j) for i in range(len(counts)) for j in range(len(counts))
             if i != j and counts[i, j] > 0]
    pairs.sort(key=lambda p: (-p[0], p[1], p[2]))
    return [(class_names[i], class_names[j], c) for c, i, j in pairs[:k]]


def _short(name: str, length: int) -> str:
    """A class name cut to fit a small title: the start says most (and the tables have it whole)."""
    return name if len(name) <= length else name[:length - 1] + "…"


def _show_image(ax: Axes, image) -> None:
    array = np.asarray(image)
    if array.shape[0] == 1:
        ax.imshow(array[0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    else:
        ax.imshow(array.transpose(1, 2, 0), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)


@_styled
def plot_examples(images_uint8, true, pred, confidence, class_names: list[str], path: str | Path,
                  title: str) -> Path:
    """A grid of images titled "true / pred (conf%)": green when right, red when wrong."""
    n = len(images_uint8)
    cols = max(1, min(8, n))
    rows = max(1, math.ceil(n / cols))
    fig, axes = _subplots(rows, cols, figsize=(1.75 * cols, 2.1 * rows + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, t, p, c in zip(axes.flat, images_uint8, true, pred, confidence, strict=False):
        _show_image(ax, image)
        ax.axis("on")
        color = GREEN if int(t) == int(p) else RED
        ax.set_title(f"true: {_short(class_names[int(t)], 20)}\npred: {_short(class_names[int(p)], 15)} "
                     f"({float(c):.0%})", fontsize=7.5, color=color, fontweight="normal", loc="left")
        for spine in ax.spines.values():
            spine.set(visible=True, color=color, linewidth=2)
    if n == 0:  # e.g. no wrong predictions: say so rather than write an empty image
        axes[0, 0].text(0.5, 0.5, "no images", ha="center", va="center", fontsize=12, color="#6e7781")
    fig.suptitle(f"{title}: true and predicted class (the prediction's probability)", fontweight="bold")
    fig.tight_layout()
    return save_figure(fig, path)


@_styled
def plot_per_class(per_class_metrics: dict[str, dict[str, float]], path: str | Path) -> Path:
    """Horizontal bars of per-class F1, in class order, with the mean F1 as a dashed line. A class the split
    has no images of has no F1: marked n/a and left out of the mean."""
    names = list(per_class_metrics)
    scored = [per_class_metrics[c]["f1"] for c in names]
    f1 = [0.0 if v is None else v for v in scored]
    n = len(names)
    fig, ax = _subplots(figsize=(8, max(3, 0.28 * n + 1) if n <= 30 else 0.14 * n + 1))
    # red to green, skipping the pale ends
    colors = matplotlib.colormaps["RdYlGn"](np.clip(np.array(f1), 0, 1) * 0.8 + 0.1)
    ax.barh(range(n), f1, color=colors)
    ax.set_yticks(range(n), names, fontsize=9 if n <= 30 else 5)
    ax.invert_yaxis()  # first class on top, as in the tables
    ax.set(xlim=(0, 1.08), xlabel="F1 score")
    ax.grid(axis="y", visible=False)
    defined = [v for v in scored if v is not None]
    mean = float(np.mean(defined)) if defined else 0.0
    unscored = len(scored) - len(defined)
    ax.axvline(mean, color="#6e7781", linestyle="--", linewidth=1)
    ax.set_title(f"F1 per class (dashed: mean {mean:.3f}"
                 + (f" of {len(defined)}; {unscored} classes with no images here are n/a)" if unscored else ")"))
    if n <= 30:
        for i, v in enumerate(scored):
            ax.text((v or 0) + 0.01, i, "n/a" if v is None else f"{v:.2f}", va="center", fontsize=8)
    return save_figure(fig, path)


# ---- a run ----

def embedded_png(path: Path, alt: str) -> str:
    """An <img> holding the PNG itself, so the HTML page is one file that can be mailed or moved on its own."""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f"<img src='data:image/png;base64,{data}' alt='{html.escape(alt, quote=True)}' title='{Path(path).name}'>"


def _finished_run(run_dir: str | Path) -> Path:
    if not isinstance(run_dir, str | os.PathLike):
        raise ImgclfError(f"give a run folder (the --out of `imgclf train`), not {run_dir!r}")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ImgclfError(f"{run_dir} is not a run folder; give the --out folder of a finished `imgclf train` run")
    if unfinished(run_dir):
        raise ImgclfError(f"{run_dir} holds a run that has not finished; {how_to_finish(run_dir)}")
    missing = [f for f in ("config.yaml", "summary.json", "model.json") if not (run_dir / f).exists()]
    if missing and (run_dir / "study.json").exists():
        raise ImgclfError(f"{run_dir} is a tuning study, not a run: its report is {run_dir / 'report.html'} "
                          f"(re-run the same `imgclf tune` to rewrite it); for a trial, give {run_dir / 'trials'}/N-K")
    if missing:
        raise ImgclfError(f"{run_dir} is not a finished run ({', '.join(missing)} missing); "
                          "give the --out folder of a finished `imgclf train` run")
    return run_dir


def _run_config(run_dir: Path) -> dict[str, Any]:
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        config = None
    if not isinstance(config, dict):
        raise ImgclfError(f"{run_dir / 'config.yaml'} is damaged (not the YAML imgclf writes); restore the file")
    return config


def _evaluate_default_split(model: TrainedModel, data: Dataset, split: str | None, tta: bool | None
                            ) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    # A folder of training images only has no test split: its held-out val split is the best there is.
    if split is None and not {"test", "val"} & set(data.splits()):
        held = data.loaded_with.get("val_split") or 0
        why, fix = ((f"its --val-split {held:g} of {len(data.train)} images kept every one for training", "add images")
                    if held else ("this run held none out", "train it again with --val-split 0.1"))
        raise ImgclfError(f"{data.name} has no test images and {why}, so no image is left to score it on; {fix}, "
                          "or add a test/ folder")
    return evaluate_with_logits(model, data, split or ("test" if "test" in data.splits() else "val"), tta)


def _pick(indices: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """k of the indices, seeded: the same report every time, not just the first images of the split."""
    order = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed))
    return indices[order[:k]].sort().values


def example_grids(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, tuple[str, torch.Tensor]]:
    """{figure name: (title, image indices)}: some right, some wrong, and the mistakes of highest loss."""
    right = logits.argmax(1) == labels
    wrong = torch.nonzero(~right).flatten()
    losses = F.cross_entropy(logits[wrong], labels[wrong], reduction="none")
    return {
        "correct": ("Correct predictions", _pick(torch.nonzero(right).flatten(), NUM_EXAMPLES)),
        "wrong": ("Wrong predictions", _pick(wrong, NUM_EXAMPLES)),
        "top_losses": ("Top losses (most confidently wrong)",
                       wrong[torch.argsort(losses, descending=True, stable=True)][:NUM_EXAMPLES]),
    }


def write_report(run_dir: str | Path, split: str | None = None, tta: bool | None = None, device: str = "auto"
                 ) -> Path:
    """Figures in RUN/figures/ and RUN/report.html for a finished run; returns the HTML path. The model runs on
    `device` (auto: the GPU where there is one)."""
    run_dir = _finished_run(run_dir)
    model = load_model(run_dir, device)
    data = load_run_dataset(model, run_dir)
    # One inference pass gives both the metrics and the example grids, from the same tensors.
    metrics, logits, labels = _evaluate_default_split(model, data, split, tta)
    chosen = data.split(metrics["split"])
    confidence, predicted = logits.softmax(1).max(1)
    grids = example_grids(logits, labels)

    summary = read_summary(run_dir)
    pairs = most_confused_pairs(metrics["confusion_matrix"], model.class_names)
    with written_together(run_dir) as scratch:
        figures = scratch / "figures"
        plot_curves(read_metrics(run_dir / "metrics.csv"), figures / "curves.png", summary.get("kept_epoch"))
        plot_confusion(metrics["confusion_matrix"], model.class_names, figures / "confusion.png", metrics["split"])
        for name, (title, idx) in grids.items():
            plot_examples(chosen.images[idx], labels[idx], predicted[idx], confidence[idx], model.class_names,
                          figures / f"{name}.png", title)
        plot_per_class(metrics["per_class"], figures / "per_class.png")
        page = _report_html(run_dir, figures, summary, metrics, pairs, (run_dir / "config.yaml").read_text())
        atomic_write(scratch / "report.html", page)
    return run_dir / "report.html"


# ---- HTML ----

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1f2328; margin: 0;
       background: #f6f8fa; }
main { max-width: 1000px; margin: 0 auto; padding: 24px 32px 48px; background: white; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #d0d7de; }
.sub { color: #656d76; margin-top: 0; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #d0d7de; padding: 4px 10px; text-align: left; }
th { background: #f6f8fa; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.cards { display: flex; gap: 16px; flex-wrap: wrap; }
.card { border: 1px solid #d0d7de; border-radius: 8px; padding: 10px 18px; min-width: 140px; }
.card b { display: block; font-size: 1.7em; } .card span { color: #656d76; font-size: 0.9em; }
img { max-width: 100%; display: block; margin: 8px 0; }
pre { background: #f6f8fa; border: 1px solid #d0d7de; padding: 12px; overflow-x: auto; font-size: 0.85em; }
"""


def html_table(header: list[str] | None, rows: list[list[Any]]) -> str:
    """An escaped HTML table; numbers are right-aligned and formatted (1,234 and 0.123)."""
    def cell(v: Any) -> str:
        numeric = isinstance(v, int | float) and not isinstance(v, bool) or isinstance(v, str) and bool(
            re.fullmatch(r"-?[\d,.]+%", v))  # _pct's percentages line up as numbers too
        return f"<td class=num>{html.escape(_fmt(v))}</td>" if numeric else f"<td>{html.escape(_fmt(v))}</td>"

    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def html_page(title: str, body: str) -> str:
    """A self-contained HTML page (inline CSS) around a body."""
    return (f"<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
            f"<meta name=viewport content='width=device-width, initial-scale=1'>"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body><main>\n{body}\n</main></body></html>\n")


def _epochs(summary: dict[str, Any]) -> Any:
    run, kept = summary.get("epochs_run"), summary.get("kept_epoch")
    if kept is None or kept == run:
        return run
    return f"{run} (early stopping kept the weights of epoch {kept}, the best val accuracy)"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.2%}"


def _report_html(run_dir: Path, figures: Path, summary: dict[str, Any], metrics: dict[str, Any],
                 pairs: list[tuple[str, str, int]], config_text: str) -> str:
    e = html.escape
    seconds = summary.get("seconds")
    facts = [
        ["dataset", summary.get("dataset")], ["model", summary.get("model")],
        ["recipe", summary.get("recipe") or "(none: flags only)"],
        ["trainable parameters", summary.get("trainable_params")], ["epochs", _epochs(summary)],
        ["precision", summary.get("precision")],
        ["device / threads", f"{summary.get('device')} / {summary.get('threads')}"],
        ["wall time", f"{seconds:.1f} s" if isinstance(seconds, int | float) else "-"],
        ["machine", f"{summary.get('machine', '')} {summary.get('cpu', '')}".strip() or "-"],
        ["torch / imgclf", f"{summary.get('torch_version')} / {summary.get('imgclf_version')}"],
    ]
    split = f"{metrics['split']} split, {metrics['num_images']:,} images" + (" with TTA" if metrics["tta"] else "")
    cards = "".join(f"<div class=card><b>{e(value)}</b><span>{e(label)}</span></div>" for value, label in (
        (_pct(metrics["accuracy"]), "accuracy"), (_pct(metrics["top5_accuracy"]), "top-5 accuracy"),
        (f"{metrics['loss']:.4f}", "loss")))
    per_class = [[name, m["precision"], m["recall"], m["f1"], m["support"]] for name, m in metrics["per_class"].items()]

    many = len(metrics["per_class"]) > 30  # the page shrinks the matrix past reading its class names

    def figure(name: str, alt: str) -> str:
        return embedded_png(figures / f"{name}.png", alt)

    body = f"""
<h1>{e(run_dir.name)}</h1>
<p class=sub>{e(str(dataset_label(summary.get('dataset'))))} &middot; {e(str(summary.get('model')))} &middot;
{e(split)}</p>
<h2>Final metrics</h2>
<div class=cards>{cards}</div>
<h2>Run</h2>
{html_table(None, facts)}
<h2>Training curves</h2>
{figure("curves", "loss, accuracy and learning rate per epoch")}
<h2>Confusion matrix</h2>
{figure("confusion", "confusion matrix")}{"<p class=sub>At full size: figures/confusion.png</p>" if many else ""}
<h2>Most confused pairs</h2>
{html_table(["true", "predicted", "count"], [list(p) for p in pairs]) if pairs else "<p>No mistakes.</p>"}
<h2>Per class</h2>
{figure("per_class", "F1 per class")}
{html_table(["class", "precision", "recall", "F1", "support"], per_class)}
<h2>Examples</h2>
{figure("correct", "correct predictions")}
{figure("wrong", "wrong predictions")}
{figure("top_losses", "most confidently wrong predictions")}
<h2>Configuration (config.yaml)</h2>
<pre>{e(config_text)}</pre>
"""
    return html_page(f"imgclf report: {run_dir.name}", body)


# ---- comparing runs ----

COMPARE_COLUMNS = ["run", "dataset", "model", "params", "epochs", "split", "accuracy", "top5", "minutes", "differs"]
# Where a run was made, not what it is; dataset and model have their own columns.
NOT_A_DIFFERENCE = {"data.dataset", "data.data_dir", "model.name", "train.device", "train.threads"}


def compare_runs(run_dirs: list[str | Path] | str | Path, out_dir: str | Path = "compare", device: str = "auto"
                 ) -> list[dict[str, Any]]:
    """Evaluate finished runs on `device` (test split, or val without one); write compare.csv/.html and two charts.

    A folder that is not a run stands for the finished runs anywhere below it (runs/, a study's trials/)."""
    if isinstance(run_dirs, str | os.PathLike):  # one folder, not a sequence of one-letter names
        run_dirs = [run_dirs]
    if not isinstance(run_dirs, list | tuple) or not all(isinstance(r, str | os.PathLike) for r in run_dirs):
        raise ImgclfError(f"give run folders: a path or a list of paths, not {run_dirs!r}")
    if not run_dirs:
        raise ImgclfError("no runs to compare; give one or more run folders")
    out_dir = output_folder(out_dir, "the comparison")
    if (out_dir / "config.yaml").exists():  # its figures and report would mix with the run's own
        raise ImgclfError(f"--out {out_dir} holds a training run; give the comparison a folder of its own")
    # resolved run folder (a run given twice is one) -> (folder, name, whether found below a folder given)
    named: dict[Path, tuple[Path, str, bool]] = {}
    for given in map(Path, run_dirs):
        if not given.is_dir() or (given / "config.yaml").exists():
            named.setdefault(_finished_run(given).resolve(), (given, given.name, False))
            continue
        finished, stopped = runs_below(given)
        if stopped:
            warnings.warn(f"skipped {len(stopped)} unfinished run(s) below {given}: "
                          f"{', '.join(str(p) for p in stopped[:3])}{' ...' if len(stopped) > 3 else ''}", stacklevel=2)
        if not finished:
            raise ImgclfError(f"{given} is not a run folder and holds no finished runs; give the --out folder of a "
                              "finished `imgclf train` run, or a folder of them")
        for run_dir in finished:
            try:
                named.setdefault(_finished_run(run_dir).resolve(), (run_dir, str(run_dir.relative_to(given)), True))
            except ImgclfError as e:  # one damaged run among many: the rest still compare, as unfinished ones do
                warnings.warn(f"skipped {e}", stacklevel=2)

    def skipped(e: ImgclfError, found: bool, run_dir: Path) -> None:
        if not found:  # a run named on its own: its damage is the answer
            raise e
        warnings.warn(f"skipped {e}" if str(run_dir) in str(e) else f"skipped {run_dir}: {e}", stacklevel=3)

    names = [name for _, name, _ in named.values()]
    runs = []  # (folder, name, found, summary, config, model.json) of the runs whose files read
    for run_dir, name, found in named.values():
        try:
            runs.append((run_dir, name if names.count(name) == 1 else str(run_dir), found,  # not m1 twice
                         read_summary(run_dir), _run_config(run_dir), read_json(run_dir / "model.json")))
        except ImgclfError as e:
            skipped(e, found, run_dir)
    output_folder(out_dir, "the comparison", *((config.get("data") or {}).get("dataset") for *_, config, _ in runs))
    rows, configs = [], []
    for run_dir, name, found, summary, config, model_json in runs:
        try:
            model = load_model(run_dir, device)
            data = load_run_dataset(model, run_dir)
            metrics = _evaluate_default_split(model, data, None, None)[0]
        except ImgclfError as e:  # weights missing or damaged, a config.yaml changed by hand, nothing held out
            skipped(e, found, run_dir)
            continue
        architecture, given = model_json.get("architecture") or {}, config.get("model") or {}
        if isinstance(architecture.get("options"), dict):  # as built, defaults filled in: cnn and cnn with its
            # defaults do not differ; a transfer base keeps its file (the built model records no path)
            config = {**config, "model": {"name": architecture.get("name"), **architecture["options"],
                                          **{k: given[k] for k in ("weights",) if k in given}}}
        configs.append(config)
        rows.append({
            "run": name,
            "dataset": summary.get("dataset") or (config.get("data") or {}).get("dataset"),
            "model": summary.get("model") or model_json.get("architecture", {}).get("name"),
            "params": summary.get("trainable_params"),
            "epochs": summary.get("epochs_run"),
            "split": metrics["split"],
            "accuracy": round(metrics["accuracy"], 5),
            "top5": None if metrics["top5_accuracy"] is None else round(metrics["top5_accuracy"], 5),
            "minutes": round(summary.get("seconds", 0) / 60, 3),
        })
    if not rows:
        raise ImgclfError("none of the runs could be read (see the warnings); nothing to compare")
    for row, differs in zip(rows, config_differences(configs), strict=True):
        row["differs"] = describe_settings(differs)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COMPARE_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    table = [[r["run"], r["dataset"], r["model"], r["params"], r["epochs"], r["split"], _pct(r["accuracy"]),
              _pct(r["top5"]), r["minutes"], r["differs"]] for r in rows]
    with written_together(out_dir) as scratch:
        atomic_write(scratch / "compare.csv", text.getvalue())
        plot_accuracy_bars(rows, scratch / "accuracy.png")
        plot_accuracy_vs_time(rows, scratch / "accuracy_vs_time.png")
        body = (f"<h1>Comparison of {len(rows)} runs</h1>"
                + html_table(["run", "dataset", "model", "params", "epochs", "split", "accuracy", "top-5",
                              "minutes", "differs (from the other runs)"], table)
                + "<h2>Accuracy</h2>" + embedded_png(scratch / "accuracy.png", "accuracy per run")
                + "<h2>Accuracy vs training time</h2>" + embedded_png(scratch / "accuracy_vs_time.png",
                                                                       "accuracy vs minutes"))
        atomic_write(scratch / "compare.html", html_page("imgclf comparison", body))
    return rows


def config_differences(configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per run, the settings (data.X, train.X, model.X) in which the runs differ. A model option is compared
    only between runs of that model: an MLP has no filters to differ in."""
    flat = [{f"{section}.{key}": value for section in ("data", "model", "train")
             for key, value in (config.get(section) or {}).items()} for config in configs]
    models = [f.get("model.name") for f in flat]
    differences: list[dict[str, Any]] = [{} for _ in flat]
    for key in dict.fromkeys(k for f in flat for k in f):
        if key in NOT_A_DIFFERENCE:
            continue
        for i, f in enumerate(flat):
            peers = [g for g, m in zip(flat, models, strict=True) if not key.startswith("model.") or m == models[i]]
            if key in f and any(g.get(key) != f[key] for g in peers):
                differences[i][key.split(".", 1)[1] if key.startswith(("data.", "train.")) else key] = f[key]
    return differences


def _dataset_colors(rows: list[dict[str, Any]]) -> dict[str, Any]:
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    return {d: matplotlib.colormaps["tab10"](i % 10) for i, d in enumerate(datasets)}


def _splits(rows: list[dict[str, Any]]) -> list[str]:
    """The splits the runs were scored on, test first."""
    return sorted({r["split"] for r in rows}, key=["test", "val", "train"].index)


def _run_label(row: dict[str, Any], one_line: bool = False) -> str:
    if row["run"] == row["model"]:
        return row["model"]
    return f"{row['run']} ({row['model']})" if one_line else f"{row['model']}\n{row['run']}"


@_styled
def plot_accuracy_bars(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """One bar per run, grouped (ordered and coloured) by dataset, with the accuracy written on it."""
    colors = _dataset_colors(rows)
    ordered = sorted(rows, key=lambda r: list(colors).index(r["dataset"]))  # stable: runs keep their order
    fig, ax = _subplots(figsize=(max(6, 1.3 * len(rows) + 2), 4.8))
    x = np.arange(len(ordered))
    splits = _splits(rows)
    # Scores of different splits side by side: the bars not scored on the first split are hatched and labelled.
    bars = ax.bar(x, [r["accuracy"] * 100 for r in ordered], color=[colors[r["dataset"]] for r in ordered],
                  width=0.65, hatch=[None if r["split"] == splits[0] else "//" for r in ordered], edgecolor="white")
    ax.bar_label(bars, labels=[f"{r['accuracy']:.1%}" + ("" if len(splits) == 1 else f"\n{r['split']}")
                               for r in ordered], padding=2, fontsize=9)
    slanted = max(len(r["run"]) for r in ordered) > 14  # long names: one slanted line each
    labels = [_run_label(r, one_line=slanted) for r in ordered]
    ax.set_xticks(x, labels, fontsize=8, **({"rotation": 30, "ha": "right", "rotation_mode": "anchor"}
                                            if slanted else {}))
    ax.set(ylim=(0, 112), ylabel=f"accuracy (%), {' or '.join(splits)} split", title="Accuracy per run")
    ax.grid(axis="x", visible=False)
    handles = [Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    names = [dataset_label(d) for d in colors]
    if len(splits) > 1:
        handles.append(Rectangle((0, 0), 1, 1, facecolor="#d0d7de", hatch="//", edgecolor="white"))
        names.append(f"scored on {' or '.join(splits[1:])}")
    ax.legend(handles, names, title="dataset", frameon=False, loc="upper left", bbox_to_anchor=(1, 1))
    return save_figure(fig, path)


@_styled
def plot_accuracy_vs_time(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Accuracy against training minutes, one labelled point per run."""
    colors = _dataset_colors(rows)
    fig, ax = _subplots(figsize=(7.5, 4.8))
    for dataset, color in colors.items():
        mine = [r for r in rows if r["dataset"] == dataset]
        ax.scatter([r["minutes"] for r in mine], [r["accuracy"] * 100 for r in mine], color=color, s=50,
                   label=dataset_label(dataset), zorder=3)
    splits = _splits(rows)
    for r in rows:
        label = r["run"] + ("" if r["split"] == splits[0] else f" ({r['split']} split)")
        ax.annotate(label, (r["minutes"], r["accuracy"] * 100), textcoords="offset points", xytext=(6, 4),
                    fontsize=8)
    minutes = [r["minutes"] for r in rows if r["minutes"] > 0]
    if minutes and max(minutes) / min(minutes) > 20:  # seconds-long and hour-long runs on one readable axis
        ax.set_xscale("log")
    else:
        ax.set_xlim(left=0, right=max(minutes, default=1) * 1.25)
    accuracies = [r["accuracy"] * 100 for r in rows]
    ax.set_ylim(max(0, min(accuracies) - 5), min(100, max(accuracies) + 3) + 2)  # a 100% point off the edge
    ax.set(xlabel="wall time (minutes)", ylabel=f"accuracy (%), {' or '.join(splits)} split",
           title="Accuracy vs training time")
    # Below the axes: the point labels run to the right, where a legend would cover them.
    ax.legend(title="dataset", frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.14),
              ncol=min(len(colors), 4))
    return save_figure(fig, path)


# ---- datasets ----

@_styled
def plot_samples(data: Dataset, path: str | Path, per_class: int = 8, seed: int = 0) -> Path:
    """Sample images: a row of `per_class` images per class up to 20 classes, else one image per class."""
    split = next(iter(data.splits().values()))  # train, or test for a test-only folder
    generator = torch.Generator().manual_seed(seed)
    n = data.num_classes
    picks = []
    for c in range(n):
        idx = torch.nonzero(split.labels == c).flatten()
        picks.append(idx[torch.randperm(len(idx), generator=generator)[:per_class if n <= 20 else 1]])
    if n <= 20:
        fig, axes = _subplots(n, per_class, figsize=(1.1 * per_class + 1.2, 1.1 * n + 0.6), squeeze=False)
        for c, idx in enumerate(picks):
            for j, ax in enumerate(axes[c]):
                ax.axis("off")
                if j < len(idx):
                    _show_image(ax, split.images[idx[j]])
                    ax.axis("on")
                    for spine in ax.spines.values():
                        spine.set_visible(False)
            axes[c, 0].set_ylabel(data.class_names[c], rotation=0, ha="right", va="center", fontsize=9)
    else:
        cols = math.ceil(math.sqrt(n))
        rows = math.ceil(n / cols)
        fig, axes = _subplots(rows, cols, figsize=(1.2 * cols, 1.35 * rows + 0.6), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for c, (ax, idx) in enumerate(zip(axes.flat, picks, strict=False)):
            if len(idx):
                _show_image(ax, split.images[idx[0]])
                ax.set_title(_short(data.class_names[c], 16), fontsize=7)
    fig.suptitle(f"{data.name}: sample images per class", fontweight="bold")
    fig.tight_layout()
    return save_figure(fig, path)


@_styled
def plot_distribution(data: Dataset, path: str | Path) -> Path:
    """Images per class in each split, as grouped bars."""
    counts = data.class_counts()
    n = data.num_classes
    fig, ax = _subplots(figsize=(min(max(7, 0.22 * n * len(counts) + 2), 24), 4.5))  # 100 classes: 24 inches
    width = 0.8 / max(len(counts), 1)
    colors = {"train": TRAIN_COLOR, "val": VAL_COLOR, "test": "#8250df"}
    for k, (split, values) in enumerate(counts.items()):
        ax.bar(np.arange(n) + (k - (len(counts) - 1) / 2) * width, values, width, color=colors[split],
               label=f"{split} ({sum(values):,})")
    _class_ticks(ax, "x", data.class_names, 9 if n <= 20 else 6)
    ax.set(ylabel="images", title=f"{data.name}: images per class")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.grid(axis="x", visible=False)
    ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1, 1))
    return save_figure(fig, path)


def show_dataset(data: Dataset, out_dir: str | Path) -> list[Path]:
    """samples.png and distribution.png for a loaded dataset, in out_dir."""
    out_dir = output_folder(out_dir, "the pictures")
    return [plot_samples(data, out_dir / "samples.png"), plot_distribution(data, out_dir / "distribution.png")]
