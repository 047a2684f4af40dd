"""Typed run configuration: dataclasses that load from and save to YAML recipes.

A run is fully described by a `RunConfig` (data + model + train). Recipes are partial YAML
files with the same three sections; command-line flags and keyword arguments override them.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Hashable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from imgclf.errors import ImgclfError, did_you_mean, is_number

OPTIMIZERS = ("sgd", "nesterov", "muon", "adam", "adamw", "rmsprop")
SCHEDULES = ("constant", "step", "cosine", "onecycle", "linear")
# altflip: each image flipped every other epoch; mixup: images blended in pairs, and their labels with them
AUGMENTATIONS = ("crop", "flip", "altflip", "cutout", "mixup")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SAMPLERS = ("random", "grid", "tpe")  # of `imgclf tune`
PRUNERS = ("none", "median", "hyperband")
DEVICES = ("auto", "cpu", "cuda")
# The train options that take one of a few names (augment: a list of them).
NAMED_CHOICES = {"optimizer": OPTIMIZERS, "schedule": SCHEDULES, "precision": PRECISIONS, "device": DEVICES,
                 "augment": AUGMENTATIONS}
SPLIT_OPTIONS = ("val_split", "grayscale", "seed")  # what RunConfig.split_options gives, and model.json's split holds
MAX_IMAGE_SIZE = 1024  # pixels a side: datasets are held in memory, and 60,000 images at 1024 px are 190 GB


def name_problem(key: str, value: Any) -> str | None:
    """What is wrong with a value of NAMED_CHOICES' option `key` (a name, or a list of them), as in
    "optimizer 'sgdd'; choose from ...", or None where it takes every name given."""
    allowed = NAMED_CHOICES.get(key, ())
    wrong = [v for v in (value if isinstance(value, list) else [value]) if allowed and v not in allowed]
    return f"{key} {wrong[0]!r}; choose from {', '.join(allowed)}" if wrong else None


@dataclass
class DataConfig:
    dataset: str = "mnist"  # a dataset name or an image-folder path
    data_dir: str | None = None  # None: $IMGCLF_DATA, else ~/.cache/imgclf
    val_split: float = 0.1  # fraction of the training set held out for validation
    subset: int | None = None  # stratified sample of N training images, for quick runs
    grayscale: bool = False
    image_size: int | None = None  # pixels: resize any dataset to this (image folders' default: most common size)


@dataclass
class ModelConfig:
    name: str = "cnn"
    options: dict[str, Any] = field(default_factory=dict)  # keyword options of create_model


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128  # images per optimizer step
    optimizer: str = "adam"
    lr: float = 1e-3  # peak learning rate
    momentum: float | None = None  # None: 0.9 for sgd/nesterov, 0 for rmsprop (the Keras default)
    adam_beta1: float = 0.9  # adam/adamw: decay of the gradient average (Keras' beta_1)
    adam_beta2: float = 0.999  # adam/adamw: decay of the squared-gradient average (Keras' beta_2)
    rmsprop_rho: float = 0.9  # rmsprop: decay of the squared-gradient average (Keras' rho; torch's alpha is 0.99)
    eps: float | None = None  # adam/adamw/rmsprop: added to the denominator; None: torch's 1e-8 (Keras: 1e-7)
    grad_clip: float | None = None  # clip the gradients' global L2 norm to this before each step
    weight_decay: float = 0.0  # decoupled for adamw, L2 gradient term otherwise; weights only, not biases/BN
    l1: float = 0.0  # L1 penalty: loss += l1 * sum(|w|) over weights (Keras' L1L2 regularizer, l1 part)
    schedule: str = "constant"
    warmup_epochs: float = 0.0  # linear warm-up from 0 to lr over this many epochs
    final_lr_fraction: float = 0.0  # 'linear' schedule: decay linearly to lr * this at the end
    muon_lr: float = 0.1  # optimizer muon: peak step of hidden conv/linear weights, relative to their norm
    muon_momentum: float = 0.6  # optimizer muon: their momentum (the other parameters use momentum, lr)
    bias_lr_scale: float = 1.0  # lr multiplier for batch-norm parameters (fast nets use 64)
    whiten_bias_epochs: int | None = None  # fastnet: train the whitening bias in the first N epochs only, which
    # spares later steps the first conv's input gradient (5% of a CIFAR step); None: all epochs
    lookahead: bool = False  # pull the weights towards their moving average every 5 steps (fast nets)
    step_size: int = 10  # 'step' schedule: multiply lr by step_gamma every step_size epochs
    step_gamma: float = 0.1
    label_smoothing: float = 0.0
    augment: list[str] = field(default_factory=list)  # any of AUGMENTATIONS (above)
    crop_padding: int | None = None  # pixels of translation by random crop; None: image size / 8 (4 for 32x32)
    cutout_size: int | None = None  # pixels: side of the cutout square; None: image size / 4 (8 for 32x32)
    mixup_alpha: float = 0.2  # mixup: the blend weight is drawn from Beta(alpha, alpha); small alpha, mild blends
    progressive_size: int | None = None  # pixels: train the first progressive_epochs on random windows this big
    progressive_epochs: float = 0.0  # (cheaper steps; fully convolutional nets only, e.g. fastnet)
    ema: float | None = None  # decay of the exponential moving average of weights, e.g. 0.999
    early_stopping: int | None = None  # patience in epochs without val accuracy improvement
    tta: bool = False  # evaluate with test-time augmentation by default
    tta_shift: int | None = None  # pixels: TTA views at every shift up to this far (with crop); None: the
    # centre and two diagonal 1-pixel shifts (airbench)
    tta_margin: float | None = None  # probability: only images whose centre view (and its flip) puts the top two
    # classes closer than this get the other TTA views, a fraction of the cost; None or 1: every image gets every view
    precision: str = "auto"  # auto: bf16 on CPUs with AMX or AVX512-BF16 and on CUDA (else fp16 there), else fp32
    device: str = "auto"
    seed: int = 0
    threads: int | None = None  # CPU threads; None: all physical cores


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    recipe: str | None = None  # the recipe this run started from, for the record
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "description": self.description,
            "recipe": self.recipe,
            "data": dataclasses.asdict(self.data),
            "model": {"name": self.model.name, **self.model.options},
            "train": dataclasses.asdict(self.train),
        }

    def split_options(self) -> dict[str, Any]:
        """The load_dataset options that decide which images a run holds out for validation (its model.json
        keeps them, so a loaded model rebuilds that split)."""
        return dict(zip(SPLIT_OPTIONS, (self.data.val_split, self.data.grayscale, self.train.seed), strict=True))

    def what(self) -> dict[str, Any]:
        """to_dict() without the fields that say where, not what: two runs that differ only there are the same
        run (a moved data folder, another device or thread count, another machine)."""
        out = self.to_dict()
        out["data"].pop("data_dir")
        out["train"].pop("device")
        out["train"].pop("threads")
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> RunConfig:
        if not isinstance(raw, dict):
            raise ImgclfError(f"{source} must be a YAML mapping with data, model and train sections, not "
                              f"{type(raw).__name__} {str(raw)[:40]!r}")
        unknown = set(raw) - {"description", "recipe", "data", "model", "train"}
        if unknown:
            raise ImgclfError(f"{source}: unknown section(s) {sorted(unknown)}; use data, model, train")
        if not isinstance(raw.get("model") or {}, dict):
            raise ImgclfError(f"{source}: model must be a mapping such as {{name: cnn}}, not {raw['model']!r}")
        model = dict(raw.get("model") or {})
        name = model.pop("name", "cnn")
        if not isinstance(name, str):  # a list or number would fail as an internal error in the model registry
            raise ImgclfError(f"{source}: model name {name!r} is not a name; write e.g. name: cnn "
                              "(see `imgclf models`)")
        if odd := [key for key in model if not isinstance(key, str)]:
            raise ImgclfError(f"{source}: model option {odd[0]!r} is not an option name; write e.g. widths: [32, 64] "
                              f"(see `imgclf summary {name}`)")
        for key in ("recipe", "description"):  # written to each run's config.yaml and shown as text
            if not isinstance(raw.get(key) or "", str):
                raise ImgclfError(f"{source}: {key} {raw[key]!r} is not text; write e.g. {key}: my-recipe")
        config = cls(
            data=_build(DataConfig, raw.get("data") or {}, f"{source}: data"),
            model=ModelConfig(name=name, options=model),
            train=_build(TrainConfig, raw.get("train") or {}, f"{source}: train"),
            recipe=raw.get("recipe"),
            description=raw.get("description") or "",
        )
        config.validate(source)
        return config

    def validate(self, source: str = "config") -> None:
        """Check every setting; each is first made its field's type (a config changed in Python: lr = "1e-3"
        becomes 0.001, augment = "crop" ["crop"], epochs = "2" an error naming it)."""
        t, d = self.train, self.data
        for section in (t, d):
            for spec in dataclasses.fields(section):
                setattr(section, spec.name, typed_option(spec.name, spec.type, getattr(section, spec.name), source))
        problems = [name_problem(key, getattr(t, key)) for key in NAMED_CHOICES]
        checks = [(problem is None, problem) for problem in problems]
        checks += [
            (t.epochs >= 1, f"epochs {t.epochs}; use 1 or more"),
            (t.batch_size >= 1, f"batch size {t.batch_size}; use 1 or more"),
            (t.lr > 0, f"learning rate {t.lr}; use a positive number"),
            (t.muon_lr > 0 and 0 <= t.muon_momentum < 1,
             f"muon_lr {t.muon_lr} / muon_momentum {t.muon_momentum}; use a positive lr and a momentum in [0, 1)"),
            (t.weight_decay >= 0 and t.l1 >= 0, f"weight decay {t.weight_decay} / l1 {t.l1}; use 0 or more"),
            (0 <= t.label_smoothing < 1, f"label smoothing {t.label_smoothing}; use a value in [0, 1)"),
            (t.progressive_size is None or t.progressive_size >= 1,
             f"progressive size {t.progressive_size}; use a window side in pixels, smaller than the images"),
            (t.progressive_epochs >= 0, f"progressive epochs {t.progressive_epochs}; use 0 or more"),
            (t.warmup_epochs >= 0, f"warm-up epochs {t.warmup_epochs}; use 0 or more"),
            (t.momentum is None or 0 <= t.momentum < 1, f"momentum {t.momentum}; use a value in [0, 1)"),
            (all(0 <= b < 1 for b in (t.adam_beta1, t.adam_beta2, t.rmsprop_rho)),
             f"adam_beta1 {t.adam_beta1} / adam_beta2 {t.adam_beta2} / rmsprop_rho {t.rmsprop_rho}; use values in "
             "[0, 1)"),
            (t.eps is None or t.eps > 0, f"eps {t.eps}; use a small positive number, e.g. 1e-7"),
            (t.grad_clip is None or t.grad_clip > 0, f"grad_clip {t.grad_clip}; use a positive gradient norm"),
            (t.step_size >= 1, f"step_size {t.step_size}; use 1 or more epochs"),
            (0 < t.step_gamma <= 1, f"step_gamma {t.step_gamma}; use a factor in (0, 1], e.g. 0.1"),
            (0 <= t.final_lr_fraction <= 1, f"final_lr_fraction {t.final_lr_fraction}; use a fraction in [0, 1]"),
            (t.bias_lr_scale > 0, f"bias_lr_scale {t.bias_lr_scale}; use a positive factor"),
            (t.early_stopping is None or t.early_stopping >= 1,
             f"early stopping patience {t.early_stopping}; use 1 or more epochs"),
            (t.crop_padding is None or t.crop_padding >= 0, f"crop_padding {t.crop_padding}; use 0 or more pixels"),
            (t.cutout_size is None or t.cutout_size >= 1, f"cutout_size {t.cutout_size}; use 1 or more pixels"),
            (t.mixup_alpha > 0, f"mixup_alpha {t.mixup_alpha}; use a positive number, e.g. 0.2"),
            (t.threads is None or t.threads >= 1, f"threads {t.threads}; use 1 or more"),
            (0 <= t.seed < 2**32, f"seed {t.seed}; use a whole number from 0 to 2**32 - 1"),  # numpy's range
            (t.whiten_bias_epochs is None or t.whiten_bias_epochs >= 0,
             f"whiten_bias_epochs {t.whiten_bias_epochs}; use 0 or more epochs"),
            (t.tta_shift is None or (isinstance(t.tta_shift, int) and t.tta_shift >= 1),
             f"tta_shift {t.tta_shift}; use a whole number of pixels, 1 or more"),
            (t.tta_margin is None or 0 < t.tta_margin <= 1,
             f"tta_margin {t.tta_margin}; use a probability in (0, 1], e.g. 0.6"),
            (t.ema is None or 0 < t.ema < 1, f"ema decay {t.ema}; use a value in (0, 1), e.g. 0.999"),
            (0 <= d.val_split < 1, f"val split {d.val_split}; use a fraction in [0, 1)"),
            (d.subset is None or d.subset > 0, f"subset {d.subset}; use a positive number of images"),
            (d.image_size is None or 1 <= d.image_size <= MAX_IMAGE_SIZE,
             f"image size {d.image_size}; use 1 to {MAX_IMAGE_SIZE} pixels (small-image classifiers)"),
        ]
        for ok, problem in checks:
            if not ok:
                raise ImgclfError(f"{source}: invalid {problem}")


def _build(cls: type, values: dict[str, Any], source: str) -> Any:
    if not isinstance(values, dict):
        raise ImgclfError(f"{source} must be a mapping of option: value")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(names)
    if unknown:
        hints = "".join(did_you_mean(u, names) for u in sorted(unknown, key=str))
        raise ImgclfError(f"{source}: unknown option(s) {sorted(unknown, key=str)}{hints}; "
                          f"valid options: {', '.join(names)}")
    return cls(**{name: typed_option(name, names[name].type, value, source) for name, value in values.items()})


def unused_settings(t: TrainConfig) -> list[str]:
    """Settings changed from their default that this configuration never reads (momentum with adam, say)."""
    optimizer, schedule = f"optimizer {t.optimizer}", f"schedule {t.schedule}"
    augment = f"augment {','.join(t.augment) or 'none'}"
    reads = {"momentum": (t.optimizer in ("sgd", "nesterov", "muon", "rmsprop"), optimizer),
             "muon_lr": (t.optimizer == "muon", optimizer), "muon_momentum": (t.optimizer == "muon", optimizer),
             "adam_beta1": (t.optimizer in ("adam", "adamw"), optimizer),
             "adam_beta2": (t.optimizer in ("adam", "adamw"), optimizer),
             "rmsprop_rho": (t.optimizer == "rmsprop", optimizer),
             "eps": (t.optimizer in ("adam", "adamw", "rmsprop"), optimizer),
             "final_lr_fraction": (t.schedule == "linear", schedule), "step_size": (t.schedule == "step", schedule),
             "step_gamma": (t.schedule == "step", schedule), "crop_padding": ("crop" in t.augment, augment),
             "cutout_size": ("cutout" in t.augment, augment), "mixup_alpha": ("mixup" in t.augment, augment),
             "progressive_epochs": (t.progressive_size is not None, "no progressive_size")}
    default = TrainConfig()
    return [f"{key} (with {why})" for key, (read, why) in reads.items()
            if not read and getattr(t, key) != getattr(default, key)]


def typed_option(name: str, kind: str, value: Any, source: str) -> Any:
    """A recipe value as its field's type (`kind`, e.g. "float | None"), or a one-line error naming it."""
    optional, base = kind.endswith(" | None"), kind.removesuffix(" | None")
    if value is None and optional:
        return None
    number = is_number(value)  # numpy scalars too
    if base == "float":
        # Finite: an infinite warm-up or lr passes validate()'s range checks, then trains at lr 0 or diverges.
        expected = "a finite number"
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value, number = float(value), True
            except ValueError:
                pass
        if number and math.isfinite(value):
            return float(value)
    elif base == "int":
        expected = "a whole number"
        if number and float(value).is_integer():  # not NaN or inf, which int() cannot take
            return int(value)
    elif base == "bool":
        expected = "true or false"
        if isinstance(value, bool):
            return value
    elif base == "str":
        expected = "a string"
        if isinstance(value, str | os.PathLike):  # a pathlib.Path from the Python API: dataset, data_dir
            return os.fspath(value)
    elif base == "list[str]":
        expected = "a list of names"
        if isinstance(value, str):  # "crop,flip" (or "none") as on the command line
            names = [a for a in value.split(",") if a]
            if "none" in names and len(names) > 1:
                raise ImgclfError(f"{source}: option {name} is {value!r}, but none means no {name}: give it alone, "
                                  "or only the others")
            value = [] if names == ["none"] else names
        elif isinstance(value, tuple):  # ("crop", "flip") from Python
            value = list(value)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
    else:
        return value
    raise ImgclfError(f"{source}: option {name} is {value!r}, which is not {expected}"
                      f"{' (or null)' if optional else ''}; fix its value")


# ---- recipes -----------------------------------------------------------------------------------------

def recipe_dir() -> Path:
    return Path(str(resources.files("imgclf") / "recipes"))


def list_shipped(folder: Path) -> list[tuple[str, str]]:
    """(name, description) of every shipped YAML file in folder (recipes, search spaces)."""
    return [(path.stem, (yaml.safe_load(path.read_text()) or {}).get("description", ""))
            for path in sorted(folder.glob("*.yaml"))]


def list_recipes() -> list[tuple[str, str]]:
    return list_shipped(recipe_dir())


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML where a mapping that names a key twice is an error, not its last value (a second `data:` section
    silently replaced the first)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys may be given again
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"found the key {key!r} twice",
                                                        key_node.start_mark)
            if isinstance(key, Hashable):
                seen.add(key)
        return super().construct_mapping(node, deep)


def read_shipped_or_file(name_or_path: str | Path, folder: Path, kind: str) -> tuple[Path, Any]:
    """(path, parsed YAML) of a shipped file by name (e.g. a recipe in `folder`) or of a YAML path."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = folder / f"{name_or_path}.yaml"
        if not path.exists():
            names = sorted(p.stem for p in folder.glob("*.yaml"))
            raise ImgclfError(f"unknown {kind} '{name_or_path}'{did_you_mean(name_or_path, names)}; choose one of: "
                              f"{', '.join(names)} (or give a YAML path)")
    if path.is_dir() and (path / "config.yaml").exists():
        path = path / "config.yaml"
    elif path.is_dir():
        best = " (a study's is its best.yaml)" if (path / "best.yaml").exists() else ""
        run = ", or a run folder (its config.yaml)" if kind == "recipe" else ""
        raise ImgclfError(f"{kind} {path} is a folder, not a YAML file{best}; give the file{run}")
    try:
        return path, yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except FileNotFoundError:
        shipped = f" (the shipped {kind} is {path.stem}, without .yaml)" if (folder / path.name).exists() else ""
        raise ImgclfError(f"{kind} file {path} does not exist; check the path{shipped}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)  # PyYAML's: where it stopped, counted from 0
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = f": {e.problem}" if getattr(e, "problem", None) else f" ({type(e).__name__})"
        raise ImgclfError(f"{kind} {path} is not valid YAML{where}{problem}; fix or replace the file") from None


def _read_recipe(name_or_path: str | Path, seen: tuple[Path, ...] = ()) -> tuple[Path, dict[str, Any]]:
    """(path, sections) of a recipe file, with those of the recipe its `base:` names underneath."""
    path, raw = read_shipped_or_file(name_or_path, recipe_dir(), "recipe")
    if not isinstance(raw, dict):
        raise ImgclfError(f"recipe {path} must be a YAML mapping with data/model/train sections")
    if "base" in raw and path.resolve() in seen:
        raise ImgclfError(f"recipe {path} is its own base (through base: {raw['base']}); break the cycle")
    weights = (raw.get("model") or {}).get("weights") if isinstance(raw.get("model"), dict) else None
    if isinstance(weights, str) and weights != "imagenet" and not Path(weights).expanduser().is_absolute():
        # as base: is, from the file
        raw = {**raw, "model": {**raw["model"], "weights": str((path.parent / weights).resolve())}}
    return path, over_base(raw, path.parent, (*seen, path.resolve()))


def over_base(raw: dict[str, Any], folder: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe mapping's own data/model/train options laid one by one over those of the recipe its `base:`
    names: a bare name is a shipped recipe, anything with a suffix or a folder a path from `folder`."""
    if "base" not in raw:
        return raw
    base = str(raw["base"])
    if Path(base).suffix or Path(base).name != base:
        base = folder / base
    _, merged = _read_recipe(base, seen)
    # Only the base's sections carry over: its name (recipe:) and description are not this recipe's.
    merged = {key: dict(value) if isinstance(value, dict) else value for key, value in merged.items()
              if key in ("data", "model", "train")}
    for key, value in raw.items():
        if key == "base" or (value is None and key in merged):  # `train:` with every line commented out
            continue
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            if key == "model" and value.get("name", merged[key].get("name")) != merged[key].get("name"):
                merged[key] = {}  # another model: the base's model options do not apply to it
            merged[key].update(value)
        else:
            merged[key] = value
    return merged


def load_recipe(name_or_path: str | Path) -> RunConfig:
    """A shipped recipe by name, or a YAML file (a recipe, a run's config.yaml or a tuning best.yaml)."""
    if not isinstance(name_or_path, str | os.PathLike):
        raise ImgclfError(f"a recipe is a shipped recipe's name (see `imgclf recipes`) or a YAML file's path, not "
                          f"{name_or_path!r}")
    path, raw = _read_recipe(name_or_path)
    config = RunConfig.from_dict(raw, source=f"recipe {path.name if path.parent == recipe_dir() else path}")
    config.recipe = config.recipe or (path.stem if path.parent == recipe_dir() else str(path))
    return config


class _Default:
    """`--set KEY=null`: the setting's default, where a None override means "not given"."""

    def __repr__(self) -> str:
        return "null"


DEFAULT = _Default()


def parse_settings(settings: list[str]) -> dict[str, Any]:
    """make_config() overrides from KEY=VALUE strings, values in YAML: `lr=0.5`, `train.lr=0.5`,
    `augment=[crop,flip]`, `model.widths=[32,64,128]` (a model option)."""
    overrides: dict[str, Any] = {}
    for setting in settings:
        key, equals, value = setting.partition("=")
        if not equals or not key.strip():
            raise ImgclfError(f"setting '{setting}' is not KEY=VALUE; write e.g. --set lr=0.1 or "
                              "--set model.widths=[32,64]")
        if not value.strip():  # YAML would read it as null: a forgotten value would quietly mean the default
            raise ImgclfError(f"setting '{setting}' has no value; give one, or {key.strip()}=null for the default")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ImgclfError(f"setting '{setting}': its value is not valid YAML; quote it, e.g. "
                              "--set 'KEY=[1, 2]'") from None
        parsed, key = DEFAULT if parsed is None else parsed, key.strip()
        if key == "model.name":  # options belong to one model, so a new model starts from its own defaults
            raise ImgclfError("a model is chosen with --model NAME (train) or the search space's base (tune), "
                              "not --set model.name")
        if key.startswith("model."):
            overrides.setdefault("model_options", {})[key.removeprefix("model.")] = parsed
        else:
            name = key.rpartition(".")[2]
            path = override_path(name)  # only recipe settings: never train()'s own arguments (out, quiet, resume)
            if "." in key and key != path:  # data.lr would set train.lr
                raise ImgclfError(f"setting '{setting}': {name} is {path}, not {key}; write {path}={value.strip()} "
                                  f"or {name}={value.strip()}")
            overrides[name] = parsed
    return overrides


def setting_text(value: Any) -> str:
    """A setting's value as --set and YAML write it, short: null, true, 0.00316, [8,16]."""
    if value is None or isinstance(value, bool):
        return yaml.safe_dump(value).split("\n")[0]
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return "[" + ",".join(setting_text(x) for x in value) + "]"
    return str(value)


def describe_settings(values: dict[str, Any]) -> str:
    """`lr=0.00316 model.filters=[8,16]`: settings in one short line."""
    return " ".join(f"{k}={setting_text(v)}" for k, v in values.items())


def make_config(recipe: str | Path | None = None, model: str | None = None, **overrides: Any) -> RunConfig:
    """Build a RunConfig from an optional recipe, then apply flat overrides.

    Override names are the fields of DataConfig and TrainConfig (e.g. dataset=, epochs=, lr=);
    None means "not given", DEFAULT (`--set lr=null`) the field's default. `model` replaces the recipe's model
    and its options (naming the recipe's own model keeps them). `model_options` merges into the model's options
    (DEFAULT drops one: the model's default).
    """
    config = load_recipe(recipe) if recipe is not None and recipe != "" else RunConfig()
    if model and model != config.model.name:  # the recipe's own model, named again, keeps its options
        config.model = ModelConfig(name=model)
    return apply_overrides(config, **overrides)


def flat_settings(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as {"train.lr": 0.1, ...}; a search space's `params` go one level deep (a changed spec is
    named by its parameter)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if key == "params" and isinstance(value, dict):
            flat.update({f"{prefix}params.{name}": spec for name, spec in value.items()})
        elif isinstance(value, dict):
            flat.update(flat_settings(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def differing_settings(old: dict[str, Any], new: dict[str, Any], limit: int = 4) -> str:
    """'train.epochs 1 there, 2 here; ...': where two nested configs differ, for an error refusing to mix them."""
    old, new = flat_settings(old), flat_settings(new)
    keys = [k for k in dict.fromkeys([*old, *new]) if old.get(k, ...) != new.get(k, ...)]
    def text(flat: dict[str, Any], key: str) -> str:  # in full, as YAML writes it: rounding could hide the change
        return yaml.safe_dump(flat[key], default_flow_style=True, sort_keys=False).split("\n")[0] if key in flat \
            else "unset"
    shown = [f"{k} {text(old, k)} there, {text(new, k)} here" for k in keys[:limit]]
    return "; ".join(shown + [f"{len(keys) - limit} more"] * (len(keys) > limit))


def override_path(key: str) -> str:
    """The config path (data.subset, train.lr) of a flat override name; unknown names are refused."""
    for section, kind in (("data", DataConfig), ("train", TrainConfig)):
        if key in {f.name for f in dataclasses.fields(kind)}:
            return f"{section}.{key}"
    valid = sorted(f.name for kind in (DataConfig, TrainConfig) for f in dataclasses.fields(kind))
    raise ImgclfError(f"unknown option '{key}'{did_you_mean(key, valid)}; valid options: {', '.join(valid)}; if it is "
                      f"the model's own option, give model_options={{'{key}': ...}} (Python) or --set model.{key}=... "
                      "(command line)")


def apply_overrides(config: RunConfig, **overrides: Any) -> RunConfig:
    """`config` with flat overrides (see make_config) written in, checked and typed; changes it in place."""
    model_options = overrides.pop("model_options", None) or {}
    if not isinstance(model_options, dict):
        raise ImgclfError(f"model_options is a dict of the model's options, e.g. {{'widths': [64, 128, 256]}}, "
                          f"not {model_options!r}")
    for key, value in model_options.items():
        if value is DEFAULT:
            from imgclf.models import check_model_options  # models imports this module

            check_model_options(config.model.name, {key: value})  # a misspelt reset would do nothing unsaid
            config.model.options.pop(key, None)
        else:
            config.model.options[key] = value
    for key, value in overrides.items():
        if value is None:
            continue
        section = getattr(config, override_path(key).split(".")[0])
        spec = next(f for f in dataclasses.fields(section) if f.name == key)
        if value is DEFAULT:
            value = spec.default_factory() if spec.default is dataclasses.MISSING else spec.default
        setattr(section, key, typed_option(key, spec.type, value, "settings"))
    config.validate()
    return config
