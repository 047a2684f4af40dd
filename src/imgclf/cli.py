"""The `imgclf` command: a thin layer over the Python API.

Exit status: 0 success, 1 a problem with the input (one line on stderr), 2 a usage error,
130 interrupted.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from imgclf.config import (
    AUGMENTATIONS,
    OPTIMIZERS,
    PRECISIONS,
    PRUNERS,
    SAMPLERS,
    SCHEDULES,
    list_recipes,
    parse_settings,
)
from imgclf.errors import ImgclfError, PeerLost, UsageError, one_line, one_line_warning, unexpected

console = Console(highlight=False, soft_wrap=True)
# How long a rank other than 0 waits, on an error, for rank 0 to say it first (see main).
SHARED_ERROR_GRACE_SECONDS = 10
MODEL_HELP = "model name (see `imgclf models`); replaces the recipe's model and its options (its own name keeps them)"
TTA_MARGIN_HELP = ("with TTA, give the other views only to images whose centre view leaves the top two classes "
                   "closer than this probability (1: every image every view; default: the run's recipe setting)")


def _train(args: argparse.Namespace) -> None:
    from imgclf import distributed
    from imgclf.train import RESUME_MAY_CHANGE, train

    if args.nproc is not None and args.nproc != 1 and not distributed.launched_by_torchrun():
        # The same command in N processes through torchrun's launcher; there WORLD_SIZE > 1 makes --nproc a no-op.
        distributed.launch(args.nproc, args.argv)
        return

    overrides = {k: getattr(args, k) for k in (
        "dataset", "data_dir", "val_split", "subset", "image_size", "epochs", "batch_size", "lr", "optimizer",
        "schedule", "warmup_epochs", "weight_decay", "label_smoothing", "augment", "ema", "early_stopping",
        "precision", "device", "seed", "threads")}
    overrides["grayscale"] = True if args.grayscale else None
    overrides["tta"] = args.tta
    settings = parse_settings(args.set)
    _note_own_val_folder(args.dataset, args.val_split)
    if args.resume:
        if not args.out:
            raise UsageError("--resume needs --out RUN_DIR: the run folder to continue")
        flags = {**overrides, "recipe": args.recipe, "model": args.model, "set": args.set or None}
        given = [k for k, v in flags.items() if v is not None and k not in RESUME_MAY_CHANGE]
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            raise UsageError(f"--resume continues the run with its own settings, so {flags} would be ignored; "
                              "drop them, or train with them into a new --out")
        train(out=args.out, resume=True, device=args.device, threads=args.threads, data_dir=args.data_dir,
              report=args.report, tensorboard=args.tensorboard)
        return
    if not args.dataset and not args.recipe:
        raise UsageError("no dataset given; add --dataset NAME (see `imgclf datasets`) or --recipe NAME")
    train(recipe=args.recipe, model=args.model, out=args.out, report=args.report, tensorboard=args.tensorboard,
          **_with_flags(settings, overrides))


def _with_flags(settings: dict[str, Any], flags: dict[str, Any]) -> dict[str, Any]:
    """The --set settings and the flags given (not None), each setting given once."""
    flags = {k: v for k, v in flags.items() if v is not None}
    if conflicts := sorted(set(flags) & set(settings)):
        raise UsageError(f"{', '.join(conflicts)} given both as a flag and in --set; give each setting once")
    return {**flags, **settings}


def _note_own_val_folder(dataset: str | None, val_split: float | None) -> None:
    from imgclf.data import own_val_folder

    if val_split is not None and dataset and (folder := own_val_folder(dataset)):
        warnings.warn(f"{dataset} has its own {folder.name}/ folder, which is the validation split: --val-split is "
                      "ignored", stacklevel=3)


def _evaluate(args: argparse.Namespace) -> None:
    from imgclf.evaluate import evaluate

    metrics = evaluate(args.run, args.dataset, split=args.split, tta=args.tta,
                       data_dir=args.data_dir, tta_margin=args.tta_margin, device=args.device)
    if args.tta_margin is not None and not metrics["tta"] and not args.tta:  # with --tta, evaluate warned
        warnings.warn("--tta-margin changes nothing without TTA", stacklevel=1)
    if args.json:
        print(json.dumps(metrics))
        return
    top5 = metrics["top5_accuracy"]
    console.print(f"{escape(metrics['dataset'])} {metrics['split']} split, {metrics['num_images']:,} images"
                  f"{' with TTA' if metrics['tta'] else ''}: accuracy [bold]{metrics['accuracy']:.2%}[/]"
                  f"{f', top-5 {top5:.2%}' if top5 is not None else ''}, loss {metrics['loss']:.4f}")
    table = Table("class", "precision", "recall", "F1", "support")
    for i, (name, m) in enumerate(metrics["per_class"].items()):
        label = escape(name) if name == str(i) else f"{i} {escape(name)}"  # i: its row in the confusion matrix
        table.add_row(label, *("-" if m[k] is None else f"{m[k]:.3f}" for k in ("precision", "recall", "f1")),
                      str(m["support"]))
    console.print(table)
    if len(metrics["confusion_matrix"]) <= 20:
        matrix = Table("true \\ predicted", *[str(i) for i in range(len(metrics["confusion_matrix"]))])
        for i, row in enumerate(metrics["confusion_matrix"]):
            matrix.add_row(str(i), *[str(v) for v in row])
        console.print(matrix)


def _predict(args: argparse.Namespace) -> None:
    from imgclf.evaluate import predict_files, predictions_json

    files, results = predict_files(args.run, args.images, top_k=args.top_k, tta=args.tta, tta_margin=args.tta_margin,
                                   device=args.device)
    if args.json:
        print(json.dumps(predictions_json(files, results)))
        return
    for path, top in zip(files, results, strict=True):
        labels = [f"[bold]{escape(c)}[/] {p:.1%}" if i == 0 else f"{escape(c)} {p:.1%}" for i, (c, p) in enumerate(top)]
        console.print(f"{escape(str(path))}: " + ", ".join(labels))


def _export(args: argparse.Namespace) -> None:
    from imgclf.export import export_onnx

    result = export_onnx(args.run, args.out, tta=args.tta)  # warns when the run has no TTA views
    views = f", {result.views}-view TTA inside" if result.tta else ""
    bf16 = (f"; the run predicts in {result.run_precision}, the graph in float32, so probabilities differ slightly"
            if result.run_precision != "fp32" else "")
    console.print(f"wrote {escape(str(result.path))} ({result.num_bytes / 1e6:.1f} MB{views}): uint8 images "
                  f"(N, C, H, W) in, logits out; "
                  f"onnxruntime matches PyTorch float32 to {result.max_difference:.1e}{bf16}")


def _serve(args: argparse.Namespace) -> None:
    from imgclf.serve import serve

    serve(args.run, host=args.host, port=args.port, device=args.device)


def _summary(args: argparse.Namespace) -> None:
    from imgclf.models import model_summary

    if not args.recipe and not args.model:
        raise UsageError("give --model NAME or --recipe NAME_OR_YAML")
    # --model replaces the recipe's, as in train; --image-size and --set are checked as train checks them
    flags = {"image_size": args.image_size, "dataset": args.dataset, "data_dir": args.data_dir}
    summary = model_summary(args.model, args.recipe, **_with_flags(parse_settings(args.set), flags))
    if args.json:
        print(json.dumps(summary.to_dict()))
        return
    channels, size = summary.input_shape[:2]
    console.print(f"{escape(summary.model)} for {escape(summary.dataset)}: {channels}x{size}x{size} images, "
                  f"{summary.num_classes} classes{' (--dataset NAME for another)' if not args.dataset else ''}")
    console.print(summary.table())


def _models(args: argparse.Namespace) -> None:
    from imgclf.models import list_models

    table = Table("model", "description")
    for name, description in list_models():
        table.add_row(name, description)
    console.print(table)


def _recipes(args: argparse.Namespace) -> None:
    table = Table("recipe", "description")
    for name, description in list_recipes():
        table.add_row(name, description)
    console.print(table)


def _datasets(args: argparse.Namespace) -> None:
    from imgclf.data import list_datasets, load_dataset

    loading = {"image_size": args.image_size} | ({} if args.val_split is None else {"val_split": args.val_split})
    if args.name == "show":  # `imgclf datasets show NAME`: pictures of the dataset (a folder named show: ./show)
        if not args.show_name:
            raise UsageError("`imgclf datasets show` needs a dataset: imgclf datasets show NAME [--out DIR]")
        _note_own_val_folder(args.show_name, args.val_split)
        from imgclf.report import show_dataset
        from imgclf.runs import output_folder

        name = Path(args.show_name).expanduser().resolve().name  # `show .` is named after the folder, too
        # checked before a download or a folder's decoding
        out = output_folder(args.out or f"dataset-{name}", "the pictures", args.show_name)
        data = load_dataset(args.show_name, args.data_dir, **loading)
        console.print(escape(data.summary()))
        for path in show_dataset(data, out):
            console.print(f"wrote {escape(str(path))}")
        return
    if args.show_name or args.out:
        raise UsageError("a second name and --out only go with `show`; to draw it: "
                         f"imgclf datasets show {args.name or 'NAME'}")
    if args.name:
        _note_own_val_folder(args.name, args.val_split)
        data = load_dataset(args.name, args.data_dir, **loading)
        console.print(escape(data.summary()))
        return
    if args.val_split is not None or args.image_size is not None:
        raise UsageError("--val-split and --image-size describe one dataset: imgclf datasets NAME --val-split F")
    table = Table("dataset", "classes", "image", "train", "test", "present")
    listed = list_datasets(args.data_dir)
    for d in listed:
        state = "yes" if d.present else "damaged" if d.damaged else "no (downloads)"
        table.add_row(d.name, str(d.num_classes), d.shape, f"{d.train_size:,}",
                      f"{d.test_size:,}" if d.test_size else "-", state)
    console.print(table)
    for problem in dict.fromkeys(d.damaged for d in listed if d.damaged):  # cifar100's is coarse's too
        console.print(escape(problem))
    console.print("Any folder of images (one sub-folder per class) works as a dataset too: --dataset PATH")


def _device_option(parser: argparse.ArgumentParser) -> None:
    """--device of the commands that run a trained model (train's own defaults to its recipe's)."""
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="where the model runs (default: auto, the GPU where there is one)")


def _report(args: argparse.Namespace) -> None:
    from imgclf.report import write_report

    path = write_report(args.run, split=args.split, device=args.device)
    print(path)
    if args.open:
        import webbrowser

        if not webbrowser.open(path.resolve().as_uri()):
            warnings.warn("no web browser found to open it; open the file above yourself", stacklevel=1)


def _compare(args: argparse.Namespace) -> None:
    from imgclf.data import dataset_label
    from imgclf.report import compare_runs

    rows = compare_runs(args.runs, args.out, device=args.device)
    cells = {"run": [escape(r["run"]) for r in rows],
             "dataset": [escape(str(dataset_label(r["dataset"]))) for r in rows],
             "model": [r["model"] for r in rows], "params": [f"{r['params']:,}" for r in rows],
             "epochs": [str(r["epochs"]) for r in rows],
             "accuracy": [f"{r['accuracy']:.2%}" + (" val" if r["split"] == "val" else "") for r in rows],
             "top-5": ["-" if r["top5"] is None else f"{r['top5']:.2%}" for r in rows],
             "minutes": [f"{r['minutes']:.2f}" for r in rows]}
    differs = [escape(r["differs"]) for r in rows]
    beside = any(differs) and console.width >= 120  # else listed under the table: a narrow column is unreadable
    if beside:
        cells["differs"] = differs
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for name, column in cells.items():  # a narrow terminal wraps names and settings, never cuts a number
        text = name in ("run", "dataset", "model", "differs")
        widest = max(len(name), *map(len, column))
        table.add_column(name, overflow="fold", justify="left" if text else "right", no_wrap=not text,
                         min_width=min(widest, 10) if text else widest)
    for row in zip(*cells.values(), strict=True):
        table.add_row(*row)
    console.print(table)
    if any(differs) and not beside:
        console.print("differs (from the other runs):")
        for name, settings in zip(cells["run"], differs, strict=True):
            if settings:
                console.print(f"  {name}: {settings}")
    console.print(f"wrote {escape(str(Path(args.out) / 'compare.html'))}, compare.csv, accuracy.png, "
                  "accuracy_vs_time.png")


def _tune(args: argparse.Namespace) -> None:
    from imgclf.tune import tune

    _note_own_val_folder(args.dataset, args.val_split)
    tune(args.dataset, args.space, sampler=args.sampler, pruner=args.pruner, trials=args.trials,
         timeout=args.timeout, epochs=args.epochs, executions=args.executions_per_trial, subset=args.subset,
         workers=args.workers, storage=args.storage, study=args.study, out=args.out, data_dir=args.data_dir,
         val_split=args.val_split, settings=parse_settings(args.set))


def _path(text: str, fix: str = "give a path, or leave the flag out for its default") -> str:
    if not text.strip():  # would mean the current folder: every image or run below it
        raise argparse.ArgumentTypeError(f"empty; {fix}")
    return text


_named_path = functools.partial(_path, fix="give a path (an unset shell variable?)")


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0 to 65535; 0: any free one)")
    return int(text)


class _OneLineErrors(argparse.ArgumentParser):
    """Usage errors in one line: argparse's usage block above them was 15 lines for `train`, which buried them."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


class _Switch(argparse.BooleanOptionalAction):
    """--x / --no-x that refuses both in one command, where the last would silently win."""

    def __call__(self, parser, namespace, values, option_string=None):
        value = not option_string.startswith("--no-")
        if getattr(namespace, self.dest) not in (None, value):
            parser.error(f"{self.option_strings[0]} and {self.option_strings[1]} contradict each other; give one")
        super().__call__(parser, namespace, values, option_string)


def build_parser() -> argparse.ArgumentParser:
    # Its sub-command parsers are of the same class.
    parser = _OneLineErrors(prog="imgclf", description="Train, evaluate and use image classifiers.")
    parser.add_argument("--version", action="version", version=f"imgclf {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model into a run folder")
    p.add_argument("--dataset", help="dataset name (see `imgclf datasets`) or image-folder path")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--recipe", help="recipe name (see `imgclf recipes`) or YAML file; flags override it")
    p.add_argument("--data-dir", type=_path, help="dataset folder (default: $IMGCLF_DATA or ~/.cache/imgclf)")
    p.add_argument("--epochs", type=int, help="passes over the training images")
    p.add_argument("--batch-size", type=int, help="images per step, over all processes")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--optimizer", choices=OPTIMIZERS, help="nesterov: SGD with Nesterov momentum; muon: see README")
    p.add_argument("--schedule", choices=SCHEDULES, help="how the learning rate changes after the warm-up")
    p.add_argument("--warmup-epochs", type=float, help="linear warm-up from 0 to --lr over this many epochs")
    p.add_argument("--weight-decay", type=float, help="decoupled for adamw, else L2; weights only (muon: the head's)")
    p.add_argument("--label-smoothing", type=float, help="probability spread over the other classes, e.g. 0.1")
    p.add_argument("--augment", help=f"comma-separated: {','.join(AUGMENTATIONS)} (or none)")
    p.add_argument("--ema", type=float, help="EMA decay of the weights, e.g. 0.999")
    p.add_argument("--early-stopping", type=int, metavar="PATIENCE", help="epochs without val gain")
    p.add_argument("--val-split", type=float, help="fraction held out for validation (default 0.1)")
    p.add_argument("--subset", type=int, help="train on a stratified sample of N images")
    p.add_argument("--grayscale", action="store_true", help="convert the images to one gray channel")
    p.add_argument("--image-size", type=int, help="resize the images to this size in pixels (any dataset)")
    p.add_argument("--tta", action=_Switch,
                   help="whether evaluate and predict use test-time augmentation by default (default: the recipe's)")
    p.add_argument("--seed", type=int, help="of the weights, the validation split and the batches (default 0)")
    p.add_argument("--precision", choices=PRECISIONS, help="auto: bf16 or fp16 where the device has it fast, else fp32")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="auto: the GPU where there is one")
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores, split between processes)")
    p.add_argument("--nproc", type=int, metavar="N", help="train in N processes on this machine (torchrun + DDP); "
                   "--batch-size stays the global batch")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any recipe setting or model option, repeatable: --set momentum=0.9 --set model.widths=[32,64]")
    p.add_argument("--out", type=_path, help="run folder (default: runs/<dataset>-<model>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    p.add_argument("--report", action="store_true", help="write RUN/report.html when training ends")
    p.add_argument("--tensorboard", action="store_true", help="also log metrics for TensorBoard (optional extra)")
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="metrics of a trained run on a split")
    p.add_argument("run", type=_named_path, help="run folder")
    p.add_argument("--dataset", help="another dataset or folder with the same class names")
    p.add_argument("--data-dir", type=_path, help="dataset folder (default: the run's)")
    p.add_argument("--split", default="test", choices=("test", "val", "train"),
                   help="val rebuilds the run's own validation split (default: test)")
    p.add_argument("--tta", action=_Switch,
                   help="average the test-time augmentation views (default: the run's recipe setting)")
    p.add_argument("--tta-margin", type=float, metavar="M", help=TTA_MARGIN_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _device_option(p)
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("predict", help="top-k labels for image files")
    p.add_argument("run", type=_named_path, help="run folder")
    p.add_argument("images", nargs="+", type=_named_path, help="image files, or folders of them")
    p.add_argument("--top-k", type=int, default=3, help="labels shown per image (default 3)")
    p.add_argument("--tta", action=_Switch,
                   help="average the test-time augmentation views (default: the run's recipe setting)")
    p.add_argument("--tta-margin", type=float, metavar="M", help=TTA_MARGIN_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _device_option(p)
    p.set_defaults(func=_predict)

    p = sub.add_parser("export", help="write the trained model as one ONNX file (normalization included)")
    p.add_argument("run", type=_named_path, help="run folder")
    p.add_argument("--out", type=_path,
                   help="the .onnx file to write, or a folder for FOLDER/model.onnx (default: RUN/model.onnx)")
    p.add_argument("--tta", action=_Switch,
                   help="average the test-time augmentation views inside the graph (default: the run's setting)")
    p.set_defaults(func=_export)

    p = sub.add_parser("serve", help="HTTP prediction server for a trained run (POST images to /predict)")
    p.add_argument("run", type=_named_path, help="run folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine "
                   "only; 0.0.0.0 for every network)")
    p.add_argument("--port", type=_port, default=8000, help="default: 8000; 0 picks a free one")
    _device_option(p)
    p.set_defaults(func=_serve)

    p = sub.add_parser("summary", help="Keras-like table of a model's layers and parameters")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--recipe", help="recipe name (see `imgclf recipes`) or YAML file")
    p.add_argument("--dataset", help="input shape and classes from this dataset (default: the recipe's)")
    p.add_argument("--data-dir", type=_path, help="where an image folder's decoded cache goes (as for train)")
    p.add_argument("--image-size", type=int, help="the images resized to this size in pixels, as train's option")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a recipe setting or model option, as for train: --set model.widths=[32,64]")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_summary)

    sub.add_parser("models", help="list the model registry").set_defaults(func=_models)
    sub.add_parser("recipes", help="list the shipped recipes").set_defaults(func=_recipes)

    p = sub.add_parser("report", help="figures and an HTML report of a trained run")
    p.add_argument("run", type=_named_path, help="run folder")
    p.add_argument("--split", choices=("test", "val", "train"),
                   help="default: test, or val when there is no test split")
    p.add_argument("--open", action="store_true", help="open the report in a web browser")
    _device_option(p)
    p.set_defaults(func=_report)

    p = sub.add_parser("compare", help="compare finished runs: table, CSV, charts and an HTML page")
    p.add_argument("runs", nargs="+", type=_named_path,
                   help="run folders, or folders of runs (runs/, a study's trials/)")
    p.add_argument("--out", type=_path, default="compare", help="output folder (default: compare/)")
    _device_option(p)
    p.set_defaults(func=_compare)

    p = sub.add_parser("tune", help="search hyper-parameters (Optuna); resumable, parallel, shareable studies")
    p.add_argument("--dataset", required=True, help="dataset name or image-folder path; trials score on its val split")
    p.add_argument("--space", default="cnn-small", help="search space: cnn-small, cnn-keras, hparams-grid or a YAML "
                   "file (default: cnn-small)")
    p.add_argument("--sampler", default="tpe", choices=SAMPLERS, help="default: tpe")
    p.add_argument("--pruner", default="median", choices=PRUNERS, help="default: median")
    p.add_argument("--trials", type=int, help="total trials the study should hold (default: 20; grid: every point); "
                   "a re-run adds the missing ones")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="stop starting trials after this long")
    p.add_argument("--epochs", type=int, help="epochs per trial (default: the space's)")
    p.add_argument("--executions-per-trial", type=int, default=1, metavar="K", help="average K seeds per trial")
    p.add_argument("--subset", type=int, help="train each trial on a stratified sample of N images")
    p.add_argument("--val-split", type=float, metavar="F",
                   help="score trials on this fraction of the training set (default: the space's)")
    p.add_argument("--workers", type=int, default=1, help="worker processes on this machine (they split the cores)")
    p.add_argument("--storage", help="study storage: postgresql://USER:PASSWORD@HOST/DB to share it between "
                   "machines (default: a journal file OUT/study.log)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="fix a recipe setting or "
                   "model option the space does not search, repeatable: --set augment=[crop,flip]")
    p.add_argument("--study", help="study name (default: <dataset>-<space>)")
    p.add_argument("--out", type=_path, default="tune",
                   help="output folder: trials.csv, best.yaml, report (default: tune/)")
    p.add_argument("--data-dir", type=_path)
    p.set_defaults(func=_tune)

    p = sub.add_parser("datasets", help="list datasets, describe one, or `show NAME` to draw it",
                       usage="imgclf datasets [--data-dir DIR] | imgclf datasets [show] NAME [--data-dir DIR] "
                             "[--val-split F] [--image-size N] [--out DIR (with show)]")
    p.add_argument("name", nargs="?", help="a dataset name or folder: show its classes and class distribution; "
                   "or `show`, then NAME: write samples.png and distribution.png")
    p.add_argument("show_name", nargs="?", metavar="NAME", help="after `show`: the dataset to draw")
    p.add_argument("--out", type=_path, help="with show: output folder (default: ./dataset-<name>)")
    p.add_argument("--data-dir", type=_path)
    p.add_argument("--val-split", type=float, help="fraction of the training images held out (default 0.1)")
    p.add_argument("--image-size", type=int, help="resize the images to this size in pixels (needed for a folder "
                   "of non-square or large images)")
    p.set_defaults(func=_datasets)
    for command in sub.choices.values():
        command.set_defaults(command_parser=command)  # so a stray argument is reported with its command's usage
    return parser


def _version() -> str:
    from imgclf import __version__

    return __version__


def _silence_stdout() -> None:
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.__stdout__.fileno())  # the exit-time flush would fail again


class _QuietWhenPipeCloses:
    """stdout for long jobs: when the reader of a pipe goes away (`imgclf train ... | head`), the job goes on
    without output instead of dying on the next progress line."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def _quiet(self) -> None:
        _silence_stdout()
        self._stream = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the process)

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._quiet()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._quiet()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, stray = parser.parse_known_args(argv)
    if stray:
        args.command_parser.error(f"unrecognized arguments: {' '.join(stray)}")
    args.argv = sys.argv[1:] if argv is None else list(argv)
    warnings.showwarning = one_line_warning
    for stream in (sys.stdout, sys.stderr):  # a terminal or pipe that is not UTF-8 still gets every file name
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):  # not surrogateescape
            stream.reconfigure(errors="backslashreplace")
    if args.command in ("train", "tune"):
        sys.stdout = _QuietWhenPipeCloses(sys.stdout)
    try:
        args.func(args)
    except BrokenPipeError:  # `imgclf evaluate RUN | head` stopped reading: nothing more to say
        _silence_stdout()
        return 1
    except ImgclfError as e:
        rank, message = os.environ.get("RANK", "0"), one_line(e)
        if rank != "0" and not isinstance(e, PeerLost):
            # Most errors meet every rank and rank 0 says them: this rank waits, so that torchrun does not stop
            # rank 0 before it has, and is stopped once rank 0 has ended. Still here, the error was this rank's
            # alone (a dataset missing on this machine), so it says it itself.
            time.sleep(SHARED_ERROR_GRACE_SECONDS)
            message = f"rank {rank}: {message}"
        print(f"imgclf: error: {message}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":  # every rank got the Ctrl-C: one says it
            print("imgclf: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not bad input: keep it to one line unless asked
        if os.environ.get("IMGCLF_DEBUG"):
            raise
        print(f"imgclf: {unexpected(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
