"""The model zoo: a registry of builders, and Keras-style parameter counts and summaries.

Every net takes a normalized float batch (N, C, H, W) and returns raw logits (N, num_classes).
Builders validate their options up front so a bad config fails with a one-line ImgclfError
instead of a shape error deep inside torch.
"""

import dataclasses
import functools
import inspect
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from rich.table import Table
from torch import nn

from imgclf import kernels
from imgclf.config import typed_option
from imgclf.errors import ImgclfError, did_you_mean, is_whole

Builder = Callable[..., nn.Module]


class ModelEntry(NamedTuple):
    builder: Builder
    description: str


MODELS: dict[str, ModelEntry] = {}

# Every builder takes these positionally; everything after them is a user option.
_SHAPE_ARGS = ("num_classes", "in_channels", "image_size")


def register_model(name: str, description: str) -> Callable[[Builder], Builder]:
    def decorator(builder: Builder) -> Builder:
        MODELS[name] = ModelEntry(builder, description)
        return builder

    return decorator


def list_models() -> list[tuple[str, str]]:
    return sorted((name, entry.description) for name, entry in MODELS.items())


def _option_defaults(builder: Builder) -> dict[str, Any]:
    params = inspect.signature(builder).parameters
    return {k: p.default for k, p in params.items() if k not in _SHAPE_ARGS}


def _jsonable(value: Any) -> Any:
    # Defaults are tuples (immutable); specs go through JSON/YAML, which only know lists.
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value


def check_model_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The model's option defaults, once `name` and every key of `options` are known to exist."""
    if not isinstance(name, str):
        raise ImgclfError(f"a model is named by a string such as 'cnn' (see `imgclf models`), not {name!r}")
    if name not in MODELS:
        raise ImgclfError(
            f"unknown model {name!r}{did_you_mean(name, MODELS)}; choose one of: {', '.join(sorted(MODELS))} "
            "(see `imgclf models`)"
        )
    defaults = _option_defaults(MODELS[name].builder)
    for key in options:
        if key not in defaults:
            raise ImgclfError(
                f"unknown option {key!r} for model {name}{did_you_mean(key, defaults)}; "
                f"valid options: {', '.join(defaults)}"
            )
    return defaults


def create_model(
    name: str, num_classes: int = 10, in_channels: int = 3, image_size: int = 32, **options: Any
) -> nn.Module:
    defaults = check_model_options(name, options)
    builder = MODELS[name].builder
    for arg, value in zip(_SHAPE_ARGS, (num_classes, in_channels, image_size), strict=True):
        if not is_whole(value):  # numpy's ints too
            raise ImgclfError(f"{arg} must be a positive integer, got {value!r}")
    try:
        model = builder(int(num_classes), int(in_channels), int(image_size), **options)
    except ImgclfError as e:
        raise ImgclfError(f"model {name}: {e}") from None
    except RuntimeError as e:
        wanted = re.search(r"can't allocate memory: you tried to allocate (\d+) bytes", str(e))  # torch's CPU allocator
        if wanted is None:
            raise
        gib = int(wanted[1]) / 2**30
        raise ImgclfError(f"model {name} with these options does not fit in memory (a tensor of {gib:,.1f} GiB); "
                          "choose smaller layers or a smaller image size") from None
    # The state dict carries any loaded weights, so a rebuild must not need the original file.
    resolved = {**defaults, **options, **({"weights": None} if "weights" in defaults else {})}
    model.spec = {
        "name": name,
        "num_classes": num_classes,
        "in_channels": in_channels,
        "image_size": image_size,
        "options": {k: _jsonable(v) for k, v in resolved.items()},
    }
    return model


# ---------------------------------------------------------------------------------------------------------
# Option checks shared by the builders


def _check_choice(option: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ImgclfError(f"option {option} must be one of {', '.join(choices)}; got {value!r}")
    return value


def _check_int(option: str, value: Any, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ImgclfError(f"option {option} takes integers >= {minimum}; got {value!r}")
    return value


def _check_ints(option: str, values: Any, minimum: int = 1) -> list[int]:
    if not isinstance(values, list | tuple):
        raise ImgclfError(f"option {option} must be a list of integers, e.g. [32, 64]; got {values!r}")
    return [_check_int(option, v, minimum) for v in values]


def _check_bool(option: str, value: Any) -> bool:
    # bool("false") is True, so a string from a command line must not slip through.
    if not isinstance(value, bool):
        raise ImgclfError(f"option {option} must be true or false; got {value!r}")
    return value


def _number(option: str, value: Any, expected: str) -> float:
    """A finite number read as a recipe's train options are (YAML 1.1 leaves 1e-1, without a dot, a string)."""
    try:
        return typed_option(option, "float", value, "model")
    except ImgclfError:
        raise ImgclfError(f"option {option} must be {expected}; got {value!r}") from None


def _check_dropout(option: str, value: Any) -> float:
    value = _number(option, value, "a dropout rate in [0, 1)")
    if not 0 <= value < 1:
        raise ImgclfError(f"option {option} must be a dropout rate in [0, 1); got {value!r}")
    return value


def _per_layer(option: str, value: Any, n: int, layers: str = "filters", kind: str = "conv") -> list[Any]:
    """Broadcast a scalar to every layer, or check a list has one value per layer (of `layers`)."""
    if not isinstance(value, list | tuple):
        return [value] * n
    if len(value) != n:
        raise ImgclfError(
            f"option {option} has {len(value)} values but {layers} has {n} {kind} layers; "
            f"give one value per {kind} layer or a single value for all"
        )
    return list(value)


# ---------------------------------------------------------------------------------------------------------
# Building blocks

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "elu": nn.ELU}

Layers = list[tuple[str, nn.Module]]


def _conv_stack(
    in_channels: int,
    image_size: int,
    filters: list[int],
    kernel_size: list[int],
    padding: str,
    batch_norm: list[bool],
    pool: list[int],
    dropout: list[float],
    activation: str,
    bn_first: bool = False,
) -> tuple[Layers, int, int]:
    """Named conv layers (Keras-style names) plus the output channels and spatial size."""
    layers: Layers = []
    channels, size = in_channels, image_size
    for i, (out, k, bn, p, drop) in enumerate(
        zip(filters, kernel_size, batch_norm, pool, dropout, strict=True), start=1
    ):
        name = f"conv{i}"
        if padding == "valid":
            if size - k + 1 < 1:
                raise ImgclfError(
                    f"conv layer {i} ({k}x{k}, padding 'valid') gets a {size}x{size} feature map and would "
                    f"shrink it below 1x1; use padding: same, a smaller kernel_size or fewer pools"
                )
            size = size - k + 1
        elif k % 2 == 0:
            # torch's padding="same" warns on even kernels; pad explicitly, the extra row/column at the
            # bottom/right as Keras does.
            layers.append((f"{name}_pad", nn.ZeroPad2d(((k - 1) // 2, k // 2, (k - 1) // 2, k // 2))))
        same = padding == "same" and k % 2 == 1
        layers.append((name, nn.Conv2d(channels, out, k, padding=k // 2 if same else 0)))
        act = (f"{name}_act", _ACTIVATIONS[activation]())
        norm = [(f"{name}_bn", nn.BatchNorm2d(out))] if bn else []
        layers += [*norm, act] if bn_first else [act, *norm]
        if p > 1:
            if size // p < 1:
                raise ImgclfError(
                    f"max-pool {p} after conv layer {i} gets a {size}x{size} feature map and would shrink it "
                    f"to 0x0; use larger images (--image-size), or fewer max-pools"
                    f"{' or padding: same' if padding == 'valid' else ''} (the model's options)"
                )
            layers.append((f"{name}_pool", nn.MaxPool2d(p)))
            size //= p
        if drop > 0:
            layers.append((f"{name}_drop", nn.Dropout(drop)))
        channels = out
    return layers, channels, size


def _dense_stack(
    in_features: int, dense: list[int], num_classes: int, batch_norm: bool, dropout: list[float], activation: str
) -> Layers:
    layers: Layers = []
    for i, (units, drop) in enumerate(zip(dense, dropout, strict=True), start=1):
        layers += [
            (f"dense{i}", nn.Linear(in_features, units)),
            (f"dense{i}_act", _ACTIVATIONS[activation]()),
        ]
        if batch_norm:
            layers.append((f"dense{i}_bn", nn.BatchNorm1d(units)))
        if drop > 0:
            layers.append((f"dense{i}_drop", nn.Dropout(drop)))
        in_features = units
    layers.append(("logits", nn.Linear(in_features, num_classes)))
    return layers


def _flatten_or_pool(global_pool: bool) -> Layers:
    if global_pool:
        return [("global_pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten())]
    return [("flatten", nn.Flatten())]


# ---------------------------------------------------------------------------------------------------------
# Models


@register_model("mlp", "multi-layer perceptron: flatten, hidden dense layers with dropout, logits")
def mlp(
    num_classes: int,
    in_channels: int,
    image_size: int,
    hidden: tuple[int, ...] | list[int] = (512, 512),
    dropout: float = 0.2,
    batch_norm: bool = False,
    activation: str = "relu",
) -> nn.Module:
    hidden = _check_ints("hidden", hidden)
    dropout = _check_dropout("dropout", dropout)
    activation = _check_choice("activation", activation, tuple(_ACTIVATIONS))
    in_features = in_channels * image_size * image_size
    batch_norm = _check_bool("batch_norm", batch_norm)
    layers = _dense_stack(in_features, hidden, num_classes, batch_norm, [dropout] * len(hidden), activation)
    return nn.Sequential(OrderedDict([("flatten", nn.Flatten()), *layers]))


@register_model("cnn", "configurable Keras-style conv stack (conv-act-BN-pool-dropout blocks, dense head)")
def cnn(
    num_classes: int,
    in_channels: int,
    image_size: int,
    filters: tuple[int, ...] | list[int] = (32, 64, 128),
    kernel_size: int | list[int] = 3,
    padding: str = "same",
    batch_norm: bool | list[bool] = False,
    pool: int | list[int] = 2,
    dropout: float | list[float] = 0.0,
    dense: tuple[int, ...] | list[int] = (128,),
    dense_batch_norm: bool = False,
    dense_dropout: float | list[float] = 0.0,
    global_pool: bool = False,
    activation: str = "relu",
) -> nn.Module:
    filters = _check_ints("filters", filters)
    n = len(filters)
    kernel_size = [_check_int("kernel_size", k) for k in _per_layer("kernel_size", kernel_size, n)]
    pool = [_check_int("pool", p, minimum=0) for p in _per_layer("pool", pool, n)]
    dropout = [_check_dropout("dropout", d) for d in _per_layer("dropout", dropout, n)]
    batch_norm = [_check_bool("batch_norm", b) for b in _per_layer("batch_norm", batch_norm, n)]
    padding = _check_choice("padding", padding, ("same", "valid"))
    activation = _check_choice("activation", activation, tuple(_ACTIVATIONS))
    dense = _check_ints("dense", dense)
    dense_dropout = [_check_dropout("dense_dropout", d)
                     for d in _per_layer("dense_dropout", dense_dropout, len(dense), "dense", "dense")]
    dense_batch_norm = _check_bool("dense_batch_norm", dense_batch_norm)
    global_pool = _check_bool("global_pool", global_pool)

    convs, channels, size = _conv_stack(
        in_channels, image_size, filters, kernel_size, padding, batch_norm, pool, dropout, activation
    )
    in_features = channels if global_pool else channels * size * size
    head = _dense_stack(in_features, dense, num_classes, dense_batch_norm, dense_dropout, activation)
    return nn.Sequential(OrderedDict([*convs, *_flatten_or_pool(global_pool), *head]))


# LeNet-5 is just a cnn with other defaults, so every cnn option still applies.
lenet = register_model("lenet", "LeNet-5: conv6 5x5, pool, conv16 5x5, pool, dense 120-84 (a cnn preset)")(
    functools.partial(cnn, filters=(6, 16), kernel_size=5, padding="valid", dense=(120, 84))
)


_VGG_LAYOUTS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", *[512, 512, 512, 512, "M"] * 2],
}


class VGG(nn.Sequential):
    """A conv base (`features`) followed by a head; the base can be frozen for transfer learning."""

    def __init__(self, features: nn.Sequential, head: Layers, freeze_features: bool) -> None:
        super().__init__(OrderedDict([("features", features), *head]))
        self.freeze_features = freeze_features
        if freeze_features:
            features.requires_grad_(False)
        self.train()

    def train(self, mode: bool = True) -> "VGG":
        super().train(mode)
        if self.freeze_features:
            # Keras trainable=False semantics: a frozen base keeps its BN running stats fixed.
            self.features.eval()
        return self


def imagenet_weights(model: str, options: dict[str, Any], data_dir: str | None = None) -> Path:
    """The ImageNet weights file (torchvision's) of the vgg or resnet18 these options build, downloaded on first
    use into data_dir's weights/ folder."""
    from imgclf.data import pretrained_file

    if model == "resnet18":
        if options.get("width", 64) != 64:
            raise ImgclfError(f"weights: imagenet is for resnet18 of width 64, not {options['width']!r}; drop "
                              "width, or weights")
        return pretrained_file("resnet18", data_dir)
    if model != "vgg":
        raise ImgclfError(f"weights: imagenet is for vgg and resnet18, not {model}")
    defaults = _option_defaults(vgg)
    layout, batch_norm = options.get("layout", defaults["layout"]), options.get("batch_norm", defaults["batch_norm"])
    if not isinstance(layout, str) or layout not in _VGG_LAYOUTS:
        raise ImgclfError(f"weights: imagenet is for the layouts {', '.join(_VGG_LAYOUTS)}, not {layout!r}; give a "
                          "weights file for a layout of your own")
    return pretrained_file(f"{layout}{'_bn' if batch_norm is True else ''}", data_dir)


def on_input_channels(filters: torch.Tensor, channels: int) -> torch.Tensor:
    """First-layer filters of RGB weights for gray images: their sum sees a gray pixel as the RGB pixel of that
    value. Other shapes pass unchanged (a mismatch is then said by the shape check)."""
    return filters.sum(1, keepdim=True) if channels == 1 and filters.shape[1] == 3 else filters


def _read_weights(path: str, model: str) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: a .safetensors file (a run's model.safetensors) or torchvision's .pth."""
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise ImgclfError(f"weights file {path!r} not found; give the path to a .safetensors file or a torchvision "
                          f"{model} .pth, or weights: imagenet")
    try:  # weights_only: tensors, no code runs
        return torch.load(path, map_location="cpu", weights_only=True) if path.endswith(".pth") else load_file(path)
    except Exception as e:  # pickle, zip, safetensors and torch's own errors: one message for a file that is not this
        raise ImgclfError(f"cannot read weights file {path!r} ({type(e).__name__}: {e}); it must be a .safetensors "
                          f"file or a torchvision {model} .pth") from None


def _from_torchvision(state: dict[str, torch.Tensor], features: nn.Module, path: str) -> dict[str, torch.Tensor]:
    """A torchvision VGG's features.N tensors, in order, under our names (the same layers in the same order: conv,
    then batch norm). A 1-channel input sums the first filters' RGB weights."""
    theirs = [t for key, t in state.items() if key.startswith("features.")]
    ours = features.state_dict()
    if len(theirs) != len(ours):
        raise ImgclfError(f"weights file {path!r} holds {len(theirs)} conv-base tensors, the model {len(ours)}; "
                          "check layout and batch_norm")
    loaded = dict(zip(ours, theirs, strict=True))
    first = next(iter(ours))
    loaded[first] = on_input_channels(loaded[first], ours[first].shape[1])
    return loaded


def _load_features(features: nn.Module, path: str) -> None:
    loaded = _read_weights(path, "VGG")
    if path.endswith(".pth"):
        loaded = _from_torchvision(loaded, features, path)
    if any(key.startswith("features.") for key in loaded):  # a whole vgg's weights (a run's model.safetensors)
        loaded = {key.removeprefix("features."): t for key, t in loaded.items() if key.startswith("features.")}
    expected = features.state_dict()
    missing = sorted(expected.keys() - loaded.keys())
    unexpected = sorted(loaded.keys() - expected.keys())
    if missing or unexpected:
        raise ImgclfError(
            f"weights file {path!r} does not match the {len(expected)}-tensor conv base: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}; check layout and batch_norm"
        )
    for key, tensor in expected.items():
        if loaded[key].shape != tensor.shape:
            raise ImgclfError(
                f"weights file {path!r}: {key} has shape {tuple(loaded[key].shape)} but the model expects "
                f"{tuple(tensor.shape)}; check layout and in_channels"
            )
    features.load_state_dict(loaded, strict=True)


@register_model("vgg", "VGG-11/13/16/19 or a custom layout, batch norm, freezable conv base for transfer")
def vgg(
    num_classes: int,
    in_channels: int,
    image_size: int,
    layout: str | list[int | str] = "vgg11",
    batch_norm: bool = True,
    dense: tuple[int, ...] | list[int] = (),
    dropout: float = 0.0,
    global_pool: bool = True,
    freeze_features: bool = False,
    weights: str | None = None,
) -> nn.Module:
    layout_name = layout
    if isinstance(layout, str):
        layout = _VGG_LAYOUTS[_check_choice("layout", layout, tuple(_VGG_LAYOUTS))]
    if (
        not isinstance(layout, list | tuple)
        or not layout
        or layout[0] == "M"
        or any(a == b == "M" for a, b in zip(layout, layout[1:], strict=False))
        or not all(v == "M" or (isinstance(v, int) and not isinstance(v, bool) and v > 0) for v in layout)
    ):
        raise ImgclfError(
            f"option layout must be one of {', '.join(_VGG_LAYOUTS)} or a list of conv filters and 'M' "
            f"(max-pool) starting with a conv, with no two 'M' in a row; got {layout!r}"
        )
    filters = [v for v in layout if v != "M"]
    pools = [2 if nxt == "M" else 0 for v, nxt in zip(layout, [*layout[1:], None], strict=True) if v != "M"]
    dense = _check_ints("dense", dense)
    dropout = _check_dropout("dropout", dropout)
    batch_norm = _check_bool("batch_norm", batch_norm)
    global_pool = _check_bool("global_pool", global_pool)
    freeze_features = _check_bool("freeze_features", freeze_features)
    n = len(filters)

    # BN before the activation, as in the original VGG-BN, so converted pretrained weights behave.
    convs, channels, size = _conv_stack(
        in_channels,
        image_size,
        filters,
        [3] * n,
        "same",
        [batch_norm] * n,
        pools,
        [0.0] * n,
        "relu",
        bn_first=True,
    )
    features = nn.Sequential(OrderedDict(convs))
    if weights == "imagenet":
        weights = imagenet_weights("vgg", {"layout": layout_name, "batch_norm": batch_norm})
    if weights is not None:
        _load_features(features, str(weights))
    in_features = channels if global_pool else channels * size * size
    # Dropout goes before every linear layer (Keras transfer heads put it right after the pooling).
    head = _dense_stack(in_features, dense, num_classes, False, [dropout] * len(dense), "relu")
    if dropout > 0:
        head.insert(0, ("dropout", nn.Dropout(dropout)))
    return VGG(features, [*_flatten_or_pool(global_pool), *head], freeze_features)


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.shortcut is None else self.shortcut(x)))


def _load_resnet(net: nn.Module, path: str) -> None:
    """All but the classifier from a torchvision ResNet-18 .pth (ImageNet's) or a resnet18 run's safetensors. The
    CIFAR stem (3x3) keeps its own init under ImageNet's weights (7x7 filters): only stem: imagenet takes them. A
    1-channel input sums the first filters' RGB weights."""
    state = _read_weights(path, "ResNet-18")
    renamed = {"conv1": "stem.conv", "bn1": "stem.bn"}  # torchvision's names of the stem
    loaded = {renamed.get(k.split(".")[0], k.split(".")[0]) + k[k.index("."):].replace("downsample", "shortcut"): t
              for k, t in state.items() if "." in k and not k.startswith("fc.")}
    ours = {k: t for k, t in net.state_dict().items() if not k.startswith("fc.")}
    theirs, mine = loaded.get("stem.conv.weight"), ours["stem.conv.weight"]
    if theirs is not None and theirs.shape[-1] != mine.shape[-1]:  # ImageNet's 7x7 stem, our 3x3 one: its own init
        loaded = {k: t for k, t in loaded.items() if not k.startswith("stem.")}
        ours = {k: t for k, t in ours.items() if not k.startswith("stem.")}
    elif theirs is not None:
        loaded["stem.conv.weight"] = on_input_channels(theirs, mine.shape[1])
    if ours.keys() != loaded.keys() or any(loaded[k].shape != t.shape for k, t in ours.items()):
        wrong = sorted(ours.keys() ^ loaded.keys()) or [k for k, t in ours.items() if loaded[k].shape != t.shape]
        raise ImgclfError(f"weights file {path!r} does not fit this resnet18 (e.g. {wrong[0]}); check width and stem")
    net.load_state_dict(loaded, strict=False)


@register_model("resnet18", "ResNet-18: CIFAR variant (3x3 stem, no stem max-pool; ~11.2M params) or ImageNet's")
def resnet18(num_classes: int, in_channels: int, image_size: int, width: int = 64, stem: str = "cifar",
             weights: str | None = None) -> nn.Module:
    width = _check_int("width", width)
    stem = _check_choice("stem", stem, ("cifar", "imagenet"))
    widths = [width, 2 * width, 4 * width, 8 * width]
    if stem == "cifar":  # full resolution into layer1: 32x32 images keep their detail
        stem_layers = [("conv", nn.Conv2d(in_channels, width, 3, padding=1, bias=False)),
                       ("bn", nn.BatchNorm2d(width)), ("relu", nn.ReLU())]
    else:  # torchvision's: a quarter of the resolution into layer1, for larger images and ImageNet's weights
        stem_layers = [("conv", nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)),
                       ("bn", nn.BatchNorm2d(width)), ("relu", nn.ReLU()), ("pool", nn.MaxPool2d(3, 2, padding=1))]
    layers: Layers = [("stem", nn.Sequential(OrderedDict(stem_layers)))]
    channels = width
    for i, w in enumerate(widths, start=1):
        stride = 1 if i == 1 else 2
        layers.append((f"layer{i}", nn.Sequential(BasicBlock(channels, w, stride), BasicBlock(w, w, 1))))
        channels = w
    layers += [*_flatten_or_pool(True), ("fc", nn.Linear(channels, num_classes))]
    net = nn.Sequential(OrderedDict(layers))
    if weights == "imagenet":
        weights = imagenet_weights("resnet18", {"width": width})
    if weights is not None:
        _load_resnet(net, str(weights))
    return net


# ---------------------------------------------------------------------------------------------------------
# Parameter counts and summaries


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total), Keras-style: total also counts batch-norm running mean/var as non-trainable."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    params = sum(p.numel() for p in model.parameters())
    bn_stats = sum(
        b.numel()
        for name, b in model.named_buffers()
        if name.rsplit(".", 1)[-1] in ("running_mean", "running_var")
    )
    return trainable, params + bn_stats


class LayerRow(NamedTuple):
    name: str
    kind: str
    output_shape: tuple[int, ...]  # without the batch dimension
    params: int  # Keras-style: includes batch-norm running stats


@dataclass
class ModelSummary:
    rows: list[LayerRow]
    trainable_params: int
    total_params: int
    non_trainable_params: int
    input_shape: tuple[int, int, int]  # channels, height, width
    num_classes: int | None = None  # what model_summary fills in: the classes and dataset it was built for
    model: str | None = None
    dataset: str | None = None

    def table(self) -> Table:
        table = Table(show_footer=True)
        table.add_column("Layer (type)", footer="Total params\nTrainable params\nNon-trainable params")
        table.add_column("Output shape")
        table.add_column(
            "Param #",
            justify="right",
            footer=f"{self.total_params:,}\n{self.trainable_params:,}\n{self.non_trainable_params:,}",
        )
        for row in self.rows:
            shape = "(" + ", ".join(["N", *map(str, row.output_shape)]) + ")"
            table.add_row(f"{row.name} ({row.kind})", shape, f"{row.params:,}")
        return table

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "dataset": self.dataset, "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "non_trainable_params": self.non_trainable_params,
            "layers": [{**row._asdict(), "output_shape": list(row.output_shape)} for row in self.rows],
        }


def summarize(model: nn.Module, input_shape: tuple[int, int, int]) -> ModelSummary:
    """Trace one zero image through the model and record every leaf module's output shape, in call order."""
    rows: list[LayerRow] = []

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        shape = tuple(output.shape[1:]) if isinstance(output, torch.Tensor) else ()
        rows.append(LayerRow(names[module], type(module).__name__, shape, count_params(module)[1]))

    names = {m: name for name, m in model.named_modules() if not any(m.children())}
    handles = [m.register_forward_hook(hook) for m in names]
    # Restore every module's own mode, not just the root's: a frozen base stays in eval inside a training net.
    modes = {m: m.training for m in model.modules()}
    param = next(model.parameters(), torch.zeros(()))
    x = torch.zeros(1, *input_shape, device=param.device, dtype=param.dtype)
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes.items():
            m.training = training
    trainable, total = count_params(model)
    return ModelSummary(rows, trainable, total, total - trainable, tuple(input_shape))


def model_summary(model: str | None = None, recipe: str | Path | None = None, dataset: str | None = None,
                  data_dir: str | None = None, **settings: Any) -> ModelSummary:
    """The Keras-style summary of the net `train` would build with these arguments (the model of the recipe, or
    `model`, for the dataset's images: the recipe's, else CIFAR-10's). `settings` are train's (image_size,
    grayscale, model_options, ...). No weights file is read or downloaded: shapes and counts only."""
    from imgclf.config import make_config
    from imgclf.data import dataset_info, image_folder, load_dataset

    if not recipe and not model:
        raise ImgclfError("give a model name or a recipe (see `imgclf models` and `imgclf recipes`)")
    given = {k: v for k, v in {"dataset": dataset, "data_dir": data_dir}.items() if v is not None}
    config = make_config(recipe=recipe, model=model, **given, **settings)  # each checked as train checks it
    dataset = config.data.dataset if recipe or "dataset" in given else "cifar10"  # not the config's default
    grayscale, image_size = config.data.grayscale, config.data.image_size
    if image_folder(dataset):  # its shape is known once decoded (cached), which also reads its classes
        data = load_dataset(dataset, config.data.data_dir, val_split=0, grayscale=grayscale, image_size=image_size)
        data.check_trainable()  # not the summary of a model that train refuses
        channels, size, classes = data.in_channels, data.image_size, data.num_classes
    else:
        info = dataset_info(dataset)  # a named dataset's facts, or the one-line error for an unknown name
        channels, classes = 1 if grayscale else info.channels, info.num_classes
        size = image_size or info.image_size
    options = {k: v for k, v in config.model.options.items() if k != "weights"}
    net = create_model(config.model.name, num_classes=classes, in_channels=channels, image_size=size, **options)
    return dataclasses.replace(summarize(net, (channels, size, size)), num_classes=classes,
                               model=config.model.name, dataset=str(dataset))


# ---------------------------------------------------------------------------------------------------------
# fastnet: a CIFAR speed-record style net (after airbench and hlb-CIFAR10; our own code)


class ShiftOnlyBatchNorm(nn.BatchNorm2d):
    """Batch norm with a fixed scale of 1 (only the shift learns) and fast-moving running statistics.

    A frozen scale is enough in front of a GELU and saves a parameter group; a high momentum (torch's
    convention: the weight of the newest batch) lets the running statistics follow the fast-changing
    weights of a few-epoch run.
    """

    def __init__(self, channels: int, momentum: float) -> None:
        super().__init__(channels, momentum=momentum, eps=1e-12)
        self.weight.requires_grad_(False)


class _Im2colWeightGradConv(torch.autograd.Function):
    """A 3x3 'same' convolution whose weight gradient is one matrix product over an im2col copy of the input.

    On tiny images oneDNN's bf16 weight gradient runs far below the matmul rate (benchmarks/conv_backward.py:
    23 ms for fastnet's 256-channel 3x3 conv, batch 512, Sapphire Rapids); at 7x7 the copy costs as much as it
    saves. With MaxPool2x2, 6% of a fastnet step (benchmarks/fastnet_step.py --torch-layers).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return F.conv2d(x, weight, padding=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        x, weight = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(grad, x, weight, None, [1, 1], [1, 1], [1, 1], False,
                                                         [0, 0], 1, [True, False, False])[0]
        n, c, h, w = x.shape
        padded = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1)  # (n, h + 2, w + 2, c)
        sn, sh, sw, sc = padded.stride()
        # Row (i, y, x) holds the 3x3 neighbourhood of pixel (y, x) in (ky, kx, c) order: channels_last's order.
        cols = padded.as_strided((n, h, w, 3, 3, c), (sn, sh, sw, sh, sw, sc)).reshape(n * h * w, 9 * c)
        grad_rows = grad.permute(1, 0, 2, 3).reshape(len(weight), n * h * w)  # (out, pixels): the fast operand order
        grad_w = (grad_rows @ cols).view(len(weight), 3, 3, c).permute(0, 3, 1, 2)
        return grad_x, grad_w


class Conv3x3(nn.Conv2d):
    """3x3 'same' conv without bias that trains faster on small bf16 CPU images (see _Im2colWeightGradConv)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        small = x.shape[-1] * x.shape[-2] <= 16  # measured faster at 3x3 (fastnet's last conv), slower at 7x7
        if small and x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and torch.is_grad_enabled():
            dtype = torch.get_autocast_dtype("cpu")
            return _Im2colWeightGradConv.apply(x.to(dtype), self.weight.to(dtype))
        return super().forward(x)


class _UnpoolGradMaxPool(torch.autograd.Function):
    """2x2 max-pool whose backward scatters with max_unpool2d, which on the CPU skips the zero-filled pass that
    max-pool's own backward makes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y, indices = F.max_pool2d(x, 2, return_indices=True)
        ctx.save_for_backward(indices)
        ctx.input_size = x.shape[-2:]
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (indices,) = ctx.saved_tensors
        return F.max_unpool2d(grad.contiguous(memory_format=torch.channels_last), indices, 2,
                              output_size=ctx.input_size)


class MaxPool2x2(nn.MaxPool2d):
    """2x2 max-pool with the cheaper CPU backward of _UnpoolGradMaxPool (channels_last training only)."""

    def __init__(self) -> None:
        super().__init__(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.is_contiguous(memory_format=torch.channels_last) and torch.is_grad_enabled():
            return _UnpoolGradMaxPool.apply(x)
        return super().forward(x)


class _FastBlock(nn.Module):
    """conv3x3 -> max-pool 2 -> BN -> GELU, then (convs - 1) times conv3x3 -> BN -> GELU."""

    def __init__(self, in_channels: int, out_channels: int, pool: bool, bn_momentum: float, convs: int) -> None:
        super().__init__()
        self.conv1 = Conv3x3(in_channels, out_channels)
        self.pool = MaxPool2x2() if pool else nn.Identity()
        self.bn1 = ShiftOnlyBatchNorm(out_channels, bn_momentum)
        for i in range(2, convs + 1):  # conv2, bn2, conv3, ...: the names of the two-conv block's weights stay
            setattr(self, f"conv{i}", Conv3x3(out_channels, out_channels))
            setattr(self, f"bn{i}", ShiftOnlyBatchNorm(out_channels, bn_momentum))
        self.convs = convs
        self.act = nn.GELU()
        for i in range(1, convs + 1):
            # Identity (Dirac) init of the first filters: the block starts close to passing its input on.
            conv = getattr(self, f"conv{i}")
            nn.init.dirac_(conv.weight.data[:min(conv.in_channels, conv.out_channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._pool_bn_gelu(self.conv1(x), self.bn1, pool=not isinstance(self.pool, nn.Identity))
        for i in range(2, self.convs + 1):
            x = self._pool_bn_gelu(getattr(self, f"conv{i}")(x), getattr(self, f"bn{i}"), pool=False)
        return x

    def _pool_bn_gelu(self, x: torch.Tensor, bn: ShiftOnlyBatchNorm, pool: bool) -> torch.Tensor:
        fusable = not pool or type(self.pool) is MaxPool2x2  # not a pool swapped in (fastnet_step --torch-layers)
        if fusable and bn.training and kernels.usable(x) and not bn.weight.requires_grad:
            return kernels.pool_batch_norm_gelu(x, bn, pool)  # bf16 CPU training: one fused C kernel
        return self.act(bn(self.pool(x) if pool else x))


class FastNet(nn.Module):
    """Frozen patch-whitening conv, three conv blocks, max-pool, linear head with a fixed 1/9 scale."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int, widths: list[int],
                 whiten_kernel: int, logit_scale: float, bn_momentum: float, block_convs: int,
                 input_pad: int) -> None:
        super().__init__()
        k = whiten_kernel
        # Repeated edge pixels make a 28-pixel image 30 wide, so after the 2x2 whitening (29) the second and
        # last blocks run at 14x14 and 7x7 instead of 13x13 and 6x6: the pools' rounding loses no edge row.
        self.input_pad = input_pad
        image_size += 2 * input_pad
        self.whiten = nn.Conv2d(in_channels, 2 * in_channels * k * k, k, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)  # set from the data by init_from_data, then frozen
        self.act = nn.GELU()
        channels, size, blocks = self.whiten.out_channels, image_size - k + 1, []
        for width in widths:
            blocks.append(_FastBlock(channels, width, pool=size >= 2, bn_momentum=bn_momentum, convs=block_convs))
            channels, size = width, size // 2 if size >= 2 else size
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(channels, num_classes, bias=False)
        self.logit_scale = logit_scale

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Whitening filters from the eigenvectors of the covariance of the training images' patches.

        Each eigenvector, scaled by 1/sqrt(eigenvalue), appears with both signs so the GELU keeps both halves.
        """
        k = self.whiten.kernel_size[0]
        patches = self._pad(images.float()).unfold(2, k, 1).unfold(3, k, 1)  # (N, C, H', W', k, k)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, images.shape[1] * k * k)  # rows in (C, k, k) order
        patches = patches - patches.mean(0)
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance.double())
        filters = (eigenvectors.T / torch.sqrt(eigenvalues.clamp_min(0) + eps)[:, None]).float()
        filters = filters.reshape(-1, images.shape[1], k, k)
        self.whiten.weight.copy_(torch.cat([filters, -filters]))
        self.whiten.bias.zero_()

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        p = self.input_pad
        return F.pad(x, (p, p, p, p), mode="replicate") if p else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.act(self.whiten(self._pad(x))))
        return self.head(self.pool(x).flatten(1)) * self.logit_scale


@register_model("fastnet", "CIFAR speed-record style net: frozen patch whitening, 3 GELU conv blocks, scaled head")
def fastnet(
    num_classes: int,
    in_channels: int,
    image_size: int,
    widths: tuple[int, ...] | list[int] = (64, 256, 256),
    whiten_kernel: int = 2,
    logit_scale: float = 1 / 9,
    bn_momentum: float = 0.6,
    block_convs: int = 2,
    input_pad: int = 0,
) -> nn.Module:
    widths = _check_ints("widths", widths)
    input_pad = _check_int("input_pad", input_pad, minimum=0)
    whiten_kernel = _check_int("whiten_kernel", whiten_kernel)
    if whiten_kernel >= image_size + 2 * input_pad:  # the whitening conv sees the padded image
        raise ImgclfError(f"option whiten_kernel {whiten_kernel} must be smaller than the image "
                          f"({image_size} + 2 x input_pad {input_pad})")
    bn_momentum = _number("bn_momentum", bn_momentum, "in (0, 1], the weight of each new batch")
    if not 0 < bn_momentum <= 1:
        raise ImgclfError(f"option bn_momentum must be in (0, 1], the weight of each new batch; got {bn_momentum}")
    logit_scale = _number("logit_scale", logit_scale, "a positive number (fastnet's is 1/9)")
    if logit_scale <= 0:  # 0 gives every class the same logit: nothing trains
        raise ImgclfError(f"option logit_scale must be a positive number (fastnet's is 1/9); got {logit_scale}")
    return FastNet(num_classes, in_channels, image_size, widths, whiten_kernel, logit_scale,
                   bn_momentum, _check_int("block_convs", block_convs), input_pad)
