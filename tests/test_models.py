"""The model registry: every net trains, saves, reloads and runs in bf16; bad options fail in one line."""

import functools
import io
import json

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from safetensors.torch import load_file, save_file
from torch import nn

from imgclf.errors import ImgclfError
from imgclf.models import (
    MODELS,
    _Im2colWeightGradConv,
    count_params,
    create_model,
    list_models,
    register_model,
    summarize,
)

ALL_MODELS = sorted(MODELS)


def images(n: int = 2, channels: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(0))


def assert_finite_grads(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"


@pytest.fixture(autouse=True)
def seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_and_backward(name):
    model = create_model(name, num_classes=7)
    logits = model(images(4))
    assert logits.shape == (4, 7)
    nn.functional.cross_entropy(logits, torch.arange(4)).backward()
    assert_finite_grads(model)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_mnist_shaped_input(name):
    try:
        model = create_model(name, in_channels=1, image_size=28)
    except ImgclfError as e:
        # A net may refuse an input too small for its pools, but only with the clear spatial-size error.
        assert "feature map" in str(e)
        pytest.skip(str(e))
    assert model(images(2, 1, 28)).shape == (2, 10)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_safetensors_round_trip_rebuilds_from_spec(name, tmp_path):
    model = create_model(name, num_classes=5)
    with torch.no_grad():
        model(images(4))  # move the batch-norm running stats away from their initial values
    save_file(model.state_dict(), tmp_path / "model.safetensors")

    spec = json.loads(json.dumps(model.spec))  # the spec must survive a trip through model.json
    fresh = create_model(
        spec["name"], spec["num_classes"], spec["in_channels"], spec["image_size"], **spec["options"]
    )
    fresh.load_state_dict(load_file(tmp_path / "model.safetensors"))
    assert fresh.spec == spec
    model.eval()
    fresh.eval()
    x = images(2)
    assert torch.equal(model(x), fresh(x))


@pytest.mark.parametrize("name", ALL_MODELS)
def test_bf16_autocast_channels_last(name):
    model = create_model(name).to(memory_format=torch.channels_last)
    x = images(4).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    assert logits.shape == (4, 10)
    assert torch.isfinite(logits).all()
    nn.functional.cross_entropy(logits.float(), torch.arange(4)).backward()
    assert_finite_grads(model)


def test_list_models_is_sorted_with_one_line_descriptions():
    models = list_models()
    assert [name for name, _ in models] == ALL_MODELS
    assert {"mlp", "cnn", "lenet", "vgg", "resnet18"} <= set(ALL_MODELS)
    assert all(description and "\n" not in description for _, description in models)


def test_registered_builder_options_are_validated_from_its_signature(monkeypatch):
    monkeypatch.setitem(MODELS, "tiny", MODELS["mlp"])  # keep the registry clean after the test

    @register_model("tiny", "a linear classifier")
    def tiny(num_classes: int, in_channels: int, image_size: int, bias: bool = True) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size**2, num_classes, bias=bias))

    assert ("tiny", "a linear classifier") in list_models()
    assert create_model("tiny", bias=False).spec["options"] == {"bias": False}
    with pytest.raises(ImgclfError, match="unknown option 'hidden' for model tiny; valid options: bias"):
        create_model("tiny", hidden=[8])


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("foo", {}, "unknown model 'foo'; choose one of: cnn, fastnet, lenet, mlp, resnet18, vgg"),
        ("cnn", {"filterz": [8]},
         r"unknown option 'filterz' for model cnn \(did you mean 'filters'\?\); valid options: filters, kernel"),
        ("cnn", {"filters": [8, 16], "kernel_size": [3, 3, 3]}, "kernel_size has 3 values but filters has 2"),
        ("cnn", {"filters": [8, 16], "dropout": [0.1]}, "dropout has 1 values but filters has 2"),
        ("cnn", {"padding": "full"}, "padding must be one of same, valid"),
        ("cnn", {"filters": 32}, "filters must be a list of integers"),
        ("cnn", {"dense_dropout": 1.5}, r"dense_dropout must be a dropout rate in \[0, 1\)"),
        ("cnn", {"dense": [8, 8], "dense_dropout": [0.1]}, "dense_dropout has 1 values but dense has 2 dense layers"),
        ("cnn", {"filters": [8] * 6}, "max-pool 2 after conv layer 6 gets a 1x1 feature map"),
        (
            "cnn",
            {"filters": [8] * 4, "padding": "valid"},
            r"conv layer 4 \(3x3, padding 'valid'\) gets a 2x2",
        ),
        ("lenet", {"filters": [6, 16, 32]}, "model lenet: max-pool 2 after conv layer 3"),
        ("vgg", {"layout": "vgg12"}, "layout must be one of vgg11, vgg13, vgg16, vgg19"),
        ("vgg", {"layout": ["M", 64]}, "list of conv filters and 'M'"),
        ("vgg", {"weights": "/nonexistent.safetensors"}, "weights file '/nonexistent.safetensors' not found"),
        ("resnet18", {"width": 0}, "option width takes integers >= 1; got 0"),
        ("cnn", {"kernel_size": "3"}, "option kernel_size takes integers >= 1; got '3'"),
        ("cnn", {"global_pool": "false"}, "option global_pool must be true or false; got 'false'"),
    ],
)
def test_bad_options_raise_one_line_errors(name, options, message):
    with pytest.raises(ImgclfError, match=message) as info:
        create_model(name, **options)
    assert "\n" not in str(info.value)


def test_a_net_too_large_for_memory_is_one_line(monkeypatch):
    real = MODELS["mlp"].builder

    @functools.wraps(real)  # the same options
    def out_of_memory(*args, **kwargs):  # as torch's CPU allocator says it (asking for it would hit overcommit)
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 12288000000000 bytes. Error code 12")

    monkeypatch.setitem(MODELS, "mlp", MODELS["mlp"]._replace(builder=out_of_memory))
    with pytest.raises(ImgclfError, match=r"^model mlp with these options does not fit in memory \(a tensor of "
                                          r"11,444.1 GiB\); choose smaller layers or a smaller image size$"):
        create_model("mlp", hidden=[10**9])


def test_dense_dropout_per_dense_layer():
    net = create_model("cnn", in_channels=1, image_size=8, filters=[4], dense=[8, 8], dense_dropout=[0.0, 0.3])
    assert not hasattr(net, "dense1_drop") and net.dense2_drop.p == 0.3


def test_too_many_pools_suggests_the_fix():
    with pytest.raises(ImgclfError, match=r"\(--image-size\), or fewer max-pools or padding: same \(the model's"):
        create_model("cnn", in_channels=1, image_size=28, filters=[8] * 5, kernel_size=1, padding="valid")
    with pytest.raises(ImgclfError, match=r"use larger images \(--image-size\), or fewer max-pools \(the model's"):
        create_model("cnn", in_channels=1, image_size=28, filters=[8, 8, 8, 8, 8])


def test_count_params_uses_keras_semantics_for_batch_norm():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    # Keras: BN has 4C params, the 2C moving mean/var non-trainable; num_batches_tracked is not a param.
    assert count_params(net) == (3 * 9 * 8 + 8 + 2 * 8, 3 * 9 * 8 + 8 + 4 * 8)
    net[0].requires_grad_(False)
    assert count_params(net) == (16, 256)


def test_summarize_small_cnn():
    model = create_model(
        "cnn", in_channels=1, image_size=28, filters=[4, 8], batch_norm=[True, False], dense=[16], dropout=0.1
    )
    model.train()
    summary = summarize(model, (1, 28, 28))

    rows = {row.name: row for row in summary.rows}
    names = ("conv1", "conv1_pool", "conv2_pool", "flatten", "dense1", "logits")
    shapes = [(4, 28, 28), (4, 14, 14), (8, 7, 7), (8 * 7 * 7,), (16,), (10,)]
    assert [rows[n].output_shape for n in names] == shapes
    assert (rows["conv1"].kind, rows["conv1"].params) == ("Conv2d", 1 * 9 * 4 + 4)
    assert (rows["conv1_bn"].kind, rows["conv1_bn"].params) == ("BatchNorm2d", 4 * 4)
    trainable = 40 + 8 + (4 * 9 * 8 + 8) + (392 * 16 + 16) + (16 * 10 + 10)
    assert (summary.trainable_params, summary.total_params, summary.non_trainable_params) == (
        trainable,
        trainable + 8,
        8,
    )
    assert sum(row.params for row in summary.rows) == summary.total_params
    assert all(m.training for m in model.modules()), "summarize must restore the training mode"

    as_dict = json.loads(json.dumps(summary.to_dict()))
    first = {"name": "conv1", "kind": "Conv2d", "output_shape": [4, 28, 28], "params": 40}
    assert as_dict["layers"][0] == first
    console = Console(file=io.StringIO(), width=120)
    console.print(summary.table())
    text = console.file.getvalue()
    assert "conv1_pool (MaxPool2d)" in text and "(N, 4, 14, 14)" in text
    assert "Non-trainable params" in text and f"{summary.total_params:,}" in text


def test_vgg_frozen_features_keep_batch_norm_stats_and_weights_fixed():
    model = create_model("vgg", layout=[8, "M", 16, "M"], freeze_features=True, dense=[8], dropout=0.1)
    model.train()
    assert model.training and not model.features.training
    before = {k: v.clone() for k, v in model.features.state_dict().items()}

    nn.functional.cross_entropy(model(images(4)), torch.arange(4)).backward()

    after = model.features.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None and not p.requires_grad for p in model.features.parameters())
    head = [p for n, p in model.named_parameters() if not n.startswith("features.")]
    assert all(p.grad is not None for p in head)
    assert count_params(model)[0] == sum(p.numel() for p in head)


def test_vgg_loads_conv_base_weights_strictly(tmp_path):
    source = create_model("vgg", layout=[8, "M", 16, "M"])
    path = tmp_path / "base.safetensors"
    save_file(source.features.state_dict(), path)

    model = create_model("vgg", layout=[8, "M", 16, "M"], num_classes=3, weights=str(path))
    expected = source.features.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.features.state_dict().items())
    assert model.spec["options"]["weights"] is None  # the state dict carries the weights from here on

    with pytest.raises(ImgclfError, match=r"conv1.weight has shape \(8, 3, 3, 3\) but the model expects"):
        create_model("vgg", layout=[8, "M", 16, "M"], in_channels=1, weights=str(path))
    with pytest.raises(ImgclfError, match="does not match the .* conv base: missing"):
        create_model("vgg", layout=[8, "M", 16, "M", 32], weights=str(path))


@pytest.mark.parametrize("height, width", [(3, 3), (7, 7), (2, 5)])
@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_im2col_conv_gradients_match_torchs_conv(height, width, memory_format):
    # fastnet's Conv3x3 uses this on images of 16 pixels and less; the sizes above it check the index arithmetic.
    conv = create_model("fastnet").blocks[2].conv2
    x = torch.randn(8, conv.in_channels, height, width).contiguous(memory_format=memory_format)
    grad_out = torch.randn(8, conv.out_channels, height, width)
    results = []
    for im2col in (True, False):
        x_in, weight = x.clone().requires_grad_(), conv.weight.detach().clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if im2col:
                out = _Im2colWeightGradConv.apply(x_in.bfloat16(), weight.bfloat16())
            else:
                out = F.conv2d(x_in, weight, padding=1)
        out.float().backward(grad_out)
        results.append((out.float(), x_in.grad, weight.grad))
    for ours, torchs in zip(*results, strict=True):
        assert torch.allclose(ours, torchs, rtol=0.02, atol=0.02 * torchs.abs().max().item())


def test_fastnet_last_conv_takes_the_im2col_path_only_when_training_in_bf16():
    conv = create_model("fastnet").blocks[2].conv2
    x = torch.randn(2, conv.in_channels, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "_Im2colWeightGradConv" in type(conv(x).grad_fn).__name__
        assert "_Im2colWeightGradConv" not in type(conv(torch.randn(2, conv.in_channels, 7, 7)).grad_fn).__name__
    assert "_Im2colWeightGradConv" not in type(conv(x).grad_fn).__name__  # fp32: torch's own conv


def test_fastnet_pool_gradient_equals_max_pools():
    pool = create_model("fastnet").blocks[0].pool
    x = torch.randn(4, 8, 7, 7).to(memory_format=torch.channels_last)  # odd: the last row and column are dropped
    grad_out = torch.randn(4, 8, 3, 3)
    grads = []
    for fn in (pool, nn.MaxPool2d(2)):
        x_in = x.clone().requires_grad_()
        fn(x_in).backward(grad_out)
        grads.append(x_in.grad)
    assert torch.equal(*grads)


def test_fastnet_block_convs_adds_identity_initialised_convs_that_train():
    two, three = (create_model("fastnet", widths=[8, 16, 16], block_convs=n) for n in (2, 3))
    assert set(two.state_dict()) < set(three.state_dict())  # a two-conv run's weights keep their names
    block = three.blocks[1]
    x = torch.randn(2, 16, 5, 5)
    assert torch.equal(F.conv2d(x, block.conv3.weight, padding=1), x)  # Dirac init: it starts as the identity
    F.cross_entropy(three(images(4)), torch.arange(4)).backward()
    assert_finite_grads(three)


def test_fastnet_input_pad_repeats_the_edge_so_a_28_pixel_image_gets_a_7x7_last_block():
    sizes = {}
    for pad in (0, 1):
        net = create_model("fastnet", in_channels=1, image_size=28, widths=[8, 16, 16], input_pad=pad)
        x = images(4, channels=1, size=28)
        net.init_from_data(x)
        seen = []
        net.blocks[2].register_forward_pre_hook(lambda _, args, seen=seen: seen.append(args[0].shape[-1]))
        net(x)
        sizes[pad] = seen[0]
    assert sizes == {0: 6, 1: 7}
    edge = torch.arange(4.0).reshape(1, 1, 2, 2)
    assert net._pad(edge)[0, 0].tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    with pytest.raises(ImgclfError, match="input_pad takes integers >= 0"):
        create_model("fastnet", input_pad=-1)
    with pytest.raises(ImgclfError, match="whiten_kernel 4 must be smaller than the image"):
        create_model("fastnet", in_channels=1, image_size=4, whiten_kernel=4, widths=[8, 8, 8])
    assert create_model("fastnet", in_channels=1, image_size=4, whiten_kernel=4, widths=[8, 8, 8], input_pad=1)


def test_model_summary_is_of_the_net_train_would_build():
    from imgclf.models import model_summary

    summary = model_summary("cnn", dataset="mnist", model_options={"filters": [4, 8]})
    net = create_model("cnn", num_classes=10, in_channels=1, image_size=28, filters=[4, 8])
    assert (summary.model, summary.dataset, summary.num_classes) == ("cnn", "mnist", 10)
    assert summary.input_shape == (1, 28, 28)
    assert summary.rows == summarize(net, (1, 28, 28)).rows
    assert model_summary(recipe="mnist-fast", image_size=32, grayscale=True).input_shape == (1, 32, 32)
    with pytest.raises(ImgclfError, match="give a model name or a recipe"):
        model_summary()
