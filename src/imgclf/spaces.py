"""Search spaces for tuning: YAML files of parameters, checked on load, sampled per trial, and written into runs.

A space names the run every trial starts from (`base:`, a partial recipe) and the parameters that change it
(`params:`); see `Space` for the spec format and `imgclf/spaces/*.yaml` for the shipped ones.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import itertools
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import optuna

from imgclf.config import (
    RunConfig,
    TrainConfig,
    list_shipped,
    name_problem,
    over_base,
    read_shipped_or_file,
    typed_option,
)
from imgclf.errors import ImgclfError, is_finite_number
from imgclf.models import MODELS, check_model_options

SPEC_KEYS = {"type", "low", "high", "step", "log", "choices", "value", "per_layer", "set"}
TRAIN_TYPES = {f.name: f.type for f in dataclasses.fields(TrainConfig)}  # what a train.X value must be


@dataclass
class Space:
    """A search space: the run every trial starts from, and the parameters that change it.

    `params` maps a name to a spec. A name with a dot is a config path (model.filters, train.lr); one without
    is a helper that others refer to (the number of conv layers). A spec is a fixed value; a mapping with
    `type: int|float|categorical` (low/high/step/log, or choices); `{value: V}`; any of these with
    `per_layer: HELPER` (a list, one value per layer, up to the sampled number of layers); or a list of specs
    concatenated into one list. `set: [paths]` sends a value to several config paths.
    """

    name: str
    description: str
    base: dict[str, Any]  # a partial recipe: data / model / train sections
    params: dict[str, Any]


def space_dir() -> Path:
    return Path(str(resources.files("imgclf") / "spaces"))


def list_spaces() -> list[tuple[str, str]]:
    return list_shipped(space_dir())


def load_space(name_or_path: str | Path) -> Space:
    """A shipped space by name (see `list_spaces()`) or a YAML file."""
    path, raw = read_shipped_or_file(name_or_path, space_dir(), "search space")
    source = f"search space {path.name}"
    if not isinstance(raw, dict) or not isinstance(raw.get("params"), dict) or not raw["params"]:
        raise ImgclfError(f"{source} must be a YAML mapping with a non-empty `params:` mapping (and optional "
                          "`base:` and `description:`); see README, Tuning")
    unknown = set(raw) - {"description", "base", "params"}
    if unknown:
        raise ImgclfError(f"{source}: unknown key(s) {sorted(unknown)}; use description, base, params")
    base = raw.get("base") or {}
    if isinstance(base, str):  # a recipe, by name or path, as a recipe's own base:
        base = {"base": base}
    if not isinstance(base, dict):
        raise ImgclfError(f"{source}: base must be a recipe name or path, or a mapping of data/model/train "
                          "options (which may name a recipe under its own base:)")
    space = Space(path.stem, raw.get("description") or "", over_base(base, path.parent), raw["params"])
    base = RunConfig.from_dict(space.base, source=f"{source}: base")
    written: dict[str, str] = {}
    for name, spec in space.params.items():
        if not isinstance(name, str):
            raise ImgclfError(f"{source}: parameter {name!r} is not a config path; name it like train.lr or "
                              "model.filters")
        _check_param(source, space, name, spec, base.model.name)
        for path in param_paths(name, spec):
            if path in written:  # the later value would win, and the trial's record would show both
                raise ImgclfError(f"{source}: parameters {written[path]} and {name} both set {path}; keep one")
            written[path] = name
    return space


def _check_param(source: str, space: Space, name: str, spec: Any, model: str) -> None:
    where = f"{source}: parameter {name}"
    earlier = list(space.params)[:list(space.params).index(name)]
    for part in spec if isinstance(spec, list) else [spec]:
        if not isinstance(part, dict):
            continue  # a fixed value
        unknown = set(part) - SPEC_KEYS
        if unknown:
            raise ImgclfError(f"{where}: unknown key(s) {sorted(unknown)}; use {', '.join(sorted(SPEC_KEYS))}")
        layers = part.get("per_layer")
        if layers is not None and (layers not in earlier or not _is_int(space.params[layers])):
            raise ImgclfError(f"{where}: per_layer must name an int parameter defined above it; got {layers!r}")
        if "value" in part:
            continue
        kind = part.get("type")
        if "log" in part and not isinstance(part["log"], bool):  # log: "no" would read as true
            raise ImgclfError(f"{where}: log is true or false, not {part['log']!r}")
        if kind in ("int", "float"):
            for key in ("low", "high", "step"):  # YAML 1.1 reads 1e-4 (no dot) as a string: a number, as in recipes
                if kind == "float" and isinstance(part.get(key), str):
                    part[key] = typed_option(key, "float", part[key], where)
            low, high = part.get("low"), part.get("high")
            if not all(map(is_finite_number, (low, high))) or low > high:
                raise ImgclfError(f"{where}: {kind} needs numbers low <= high, e.g. {{type: {kind}, low: 1, high: 5}}")
            if kind == "int" and not (isinstance(low, int) and isinstance(high, int)):
                raise ImgclfError(f"{where}: int needs integer low and high; use type: float for fractions")
            if part.get("log") and (low <= 0 or part.get("step") is not None):
                raise ImgclfError(f"{where}: log scale needs low > 0 and no step")
            if part.get("step") is not None and not (is_finite_number(part["step"]) and part["step"] > 0):
                raise ImgclfError(f"{where}: step must be a number above 0, got {part['step']!r}")
        elif kind == "categorical":
            choices = part.get("choices")
            if not isinstance(choices, list) or not choices or not all(
                    c is None or isinstance(c, bool | int | float | str) for c in choices):
                raise ImgclfError(f"{where}: categorical needs `choices:` a list of numbers, strings or booleans "
                                  "(for a list-valued option, use a list of specs or per_layer)")
            # by type too: 1 and true are two choices
            if repeated := next((c for i, c in enumerate(choices) if (type(c), c) in
                                 [(type(d), d) for d in choices[:i]]), None):
                # a grid would run the point once and stop the command at its copy
                raise ImgclfError(f"{where}: choice {repeated!r} is listed twice; list each choice once")
        else:
            raise ImgclfError(f"{where}: type {kind!r}; use int, float or categorical (or value: V for a fixed one)")
    for path in param_paths(name, spec):
        section, _, key = str(path).partition(".")
        if section == "data":  # trials train on the data the study loaded once: a sampled value would be ignored
            raise ImgclfError(f"{where}: {path} cannot be searched, as every trial trains on the same data; set it "
                              "in the space's base, or with tune's --subset, --val-split or --dataset")
        valid = set(TRAIN_TYPES) if section == "train" else None
        if section == "model":
            valid = {"name"} | set(inspect.signature(MODELS[model].builder).parameters) if model in MODELS else {key}
        if valid is None or key not in valid:
            raise ImgclfError(f"{where}: '{path}' is not a config path; use train.X (see `imgclf train --help`) "
                              f"or model.X with an option of model {model} (see README, Models)")
        if path == "train.threads":
            raise ImgclfError(f"{where}: threads cannot be searched; tune gives each of its --workers cores / workers "
                              "threads")
        if path == "model.name":
            for value in _values_of(spec):
                try:
                    check_model_options(value, {})  # the one text of an unknown model, with "did you mean"
                except ImgclfError as e:
                    raise ImgclfError(f"{where}: {e}") from None
        if section == "train":
            _check_train_values(key, spec, where)


def _check_train_values(key: str, spec: Any, where: str) -> None:
    """Every value a trial may draw for train.KEY is one a recipe could give it: else each such trial fails."""
    kind, parts = TRAIN_TYPES[key], spec if isinstance(spec, list) else [spec]
    if kind.removesuffix(" | None") == "int" and any(isinstance(p, dict) and p.get("type") == "float" for p in parts):
        raise ImgclfError(f"{where}: {key} takes whole numbers, but type float draws fractions; use type: int")
    if isinstance(spec, list) and not kind.startswith("list"):  # lr: [0.1, 1], a list for a one-value setting
        shown = "[...]" if any(isinstance(p, dict) for p in spec) else spec
        raise ImgclfError(f"{where}: {key} takes one value, and a list's parts are joined into one list; to search "
                          f"values, write {{type: categorical, choices: {shown}}}")
    # A list setting's parts are joined into one value; any other spec gives one of its values.
    values = [_values_of(spec)] if isinstance(spec, list) else _values(spec)
    for value in values:
        if problem := name_problem(key, typed_option(key, kind, value, where)):
            raise ImgclfError(f"{where}: unknown {problem}")


def _values(part: Any) -> list[Any]:
    """The values a checked spec may give, as far as their types go: a fixed value, its value:, its choices or its
    bounds."""
    if not isinstance(part, dict):
        return [part]
    if "value" in part:
        return [part["value"]]
    return part["choices"] if part["type"] == "categorical" else [part["low"], part["high"]]


def _values_of(spec: Any) -> list[Any]:
    """Every value a spec, or a list of them, may give."""
    return [v for part in (spec if isinstance(spec, list) else [spec]) for v in _values(part)]


def _is_int(spec: Any) -> bool:
    """A spec that gives a layer count: an int parameter or a fixed int."""
    value = spec.get("value") if isinstance(spec, dict) else spec
    is_int = isinstance(value, int) and not isinstance(value, bool)
    return is_int or isinstance(spec, dict) and spec.get("type") == "int" and "per_layer" not in spec


def suggest(trial: optuna.trial.BaseTrial, space: Space) -> dict[str, Any]:
    """Sample every parameter of the space for a trial (or rebuild them from an optuna.trial.FixedTrial)."""
    values: dict[str, Any] = {}
    for name, spec in space.params.items():
        if isinstance(spec, list):  # parts concatenated into one list; items named name[0], name[1], ...
            items: list[Any] = []
            for part in spec:
                items += _suggest_items(trial, name, part, values, len(items))
            values[name] = items
        elif isinstance(spec, dict) and "per_layer" in spec:
            values[name] = _suggest_items(trial, name, spec, values, 0)
        else:
            values[name] = _suggest_one(trial, name, spec)
    return values


def _suggest_items(trial, name: str, spec: Any, values: dict[str, Any], start: int) -> list[Any]:
    layers = spec.get("per_layer") if isinstance(spec, dict) else None
    count = values[layers] if layers else 1
    return [_suggest_one(trial, f"{name}[{start + i}]", spec) for i in range(count)]


def _suggest_one(trial, name: str, spec: Any) -> Any:
    if not isinstance(spec, dict):
        return spec
    if "value" in spec:
        return spec["value"]
    if spec["type"] == "int":
        return trial.suggest_int(name, spec["low"], spec["high"], step=spec.get("step") or 1, log=bool(spec.get("log")))
    if spec["type"] == "float":
        return trial.suggest_float(name, spec["low"], spec["high"], step=spec.get("step"), log=bool(spec.get("log")))
    return trial.suggest_categorical(name, spec["choices"])


def grid_points(space: Space) -> list[dict[str, Any]]:
    """Every combination of the categorical choices, as Optuna params (grid search needs categorical only)."""
    axes: dict[str, list[Any]] = {}
    for name, spec in space.params.items():
        parts = spec if isinstance(spec, list) else [spec]
        for i, part in enumerate(parts):
            if not isinstance(part, dict) or "value" in part:
                continue
            if part.get("type") != "categorical" or "per_layer" in part:
                raise ImgclfError(f"grid search needs categorical parameters, but {name} is "
                                  f"{'per-layer' if 'per_layer' in part else part.get('type')}; give it "
                                  "`type: categorical, choices: [...]` or use --sampler random or tpe")
            axes[f"{name}[{i}]" if isinstance(spec, list) else name] = part["choices"]
    return [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*axes.values())]


def param_paths(name: str, spec: Any) -> list[str]:
    """The config paths a parameter writes: its `set:` list, its own dotted name, or none (a helper)."""
    paths = spec["set"] if isinstance(spec, dict) and "set" in spec else [name] if "." in name else []
    return paths if isinstance(paths, list) else [paths]


def searched_paths(space: Space) -> set[str]:
    return {path for name, spec in space.params.items() for path in param_paths(name, spec)}


def trial_config(base: RunConfig, space: Space, values: dict[str, Any]) -> RunConfig:
    """The base run with the sampled values written into their config paths."""
    config = copy.deepcopy(base)
    for name, value in values.items():
        for path in param_paths(name, space.params[name]):
            section, key = path.split(".", 1)
            if section == "model" and key == "name":
                config.model.name = value
            elif section == "model":
                config.model.options[key] = value
            else:  # a sampled float for an int setting fails here, in one line, as a recipe's would
                setattr(config.train, key, typed_option(key, TRAIN_TYPES[key], value, f"trial parameter {name}"))
    config.validate("trial config")
    return config
