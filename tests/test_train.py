import dataclasses
import importlib
import math
import re
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

import imgclf
import imgclf.device as device_module
from imgclf import distributed, evaluate, train
from imgclf.config import TrainConfig, load_recipe
from imgclf.data import Split, load_dataset
from imgclf.device import memory_format, prediction_precision, resolve_precision, slow_precision
from imgclf.errors import ImgclfError
from imgclf.evaluate import predict_logits, tta_views
from imgclf.models import create_model
from imgclf.optim import hidden_matrices, lr_factor, orthogonalize
from imgclf.runs import load_model, read_metrics

FAST = dict(dataset="digits", model="cnn", batch_size=64, lr=3e-3, quiet=True)


def stop_in_epoch(monkeypatch, epoch: int) -> None:
    """Ctrl-C as training's `epoch`-th epoch (counted in this process) starts; monkeypatch.undo() ends it."""
    train_module = importlib.import_module("imgclf.train")  # the module, not the function imgclf.train
    real_epoch, calls = train_module.train_one_epoch, []

    def interrupted_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == epoch:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", interrupted_epoch)


def test_training_learns_digits(tmp_path):
    result = train(epochs=6, out=tmp_path / "run", **FAST)
    for name in ("config.yaml", "metrics.csv", "model.safetensors", "model.json", "checkpoint.pt", "summary.json"):
        assert (result.run_dir / name).exists(), name
    rows = read_metrics(result.run_dir / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[-1]["val_acc"] > 0.9
    metrics = evaluate(result.run_dir)
    assert metrics["accuracy"] > 0.9
    assert sum(map(sum, metrics["confusion_matrix"])) == metrics["num_images"] == 360


def test_train_leaves_the_callers_thread_count_as_it_was(tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(epochs=1, threads=2, out=tmp_path / "run", **FAST)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_identical_rerun_reuses_the_model(tmp_path):
    first = train(epochs=1, out=tmp_path / "run", **FAST)
    before = (first.run_dir / "model.safetensors").stat().st_mtime_ns
    again = train(epochs=1, out=tmp_path / "run", **FAST)
    assert again.reused and (first.run_dir / "model.safetensors").stat().st_mtime_ns == before
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(again.model(x), first.model(x))  # the net in memory, as the first call gave it
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    load_model(first.run_dir)  # builds a randomly initialised net first: the caller's stream must not move
    assert torch.equal(torch.rand(3), expected)
    with pytest.raises(ImgclfError, match="not a bare torch module"):
        evaluate(first.model)


def test_a_different_run_into_the_same_folder_is_refused(tmp_path):
    train(epochs=1, out=tmp_path / "run", **FAST)
    config_before = (tmp_path / "run" / "config.yaml").read_text()
    with pytest.raises(ImgclfError, match=r"different finished run \(train.epochs 1 there, 2 here\); choose another "
                       "--out; nothing") as refused:
        train(epochs=2, out=tmp_path / "run", **FAST)
    assert "--resume" not in str(refused.value)  # a finished run has nothing to continue
    assert (tmp_path / "run" / "config.yaml").read_text() == config_before


def test_a_run_stopped_before_its_first_checkpoint_gives_way_to_a_new_one(tmp_path):
    run = tmp_path / "run"
    train(epochs=1, out=run, **FAST)
    for name in ("checkpoint.pt", "summary.json"):  # as left by a crash in epoch 1
        (run / name).unlink()
    result = train(epochs=2, out=run, **FAST)  # another configuration: nothing to lose, so no refusal
    assert not result.reused and len(result.history) == 2


def test_out_naming_a_file_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ImgclfError, match="is a file, not a folder"):
        train(epochs=1, out=tmp_path / "notes.txt", **FAST)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_an_image_folder_is_recorded_by_its_absolute_path(tmp_path, monkeypatch, write_shapes):
    write_shapes(tmp_path / "shapes", 20)
    monkeypatch.chdir(tmp_path)
    result = train(dataset="shapes", model="mlp", epochs=1, batch_size=8, quiet=True, out="run", data_dir="cache")
    monkeypatch.chdir(tmp_path / "run")  # elsewhere, "shapes" and "cache" mean nothing
    assert evaluate(tmp_path / "run")["dataset"] == str(tmp_path / "shapes") == result.summary["dataset"]
    assert not (tmp_path / "run" / "cache").exists()  # the folder cache was found where training wrote it


def test_the_tta_hint_names_the_val_split_of_a_dataset_without_a_test_split(tmp_path, write_shapes, capsys):
    write_shapes(tmp_path / "shapes" / "train")  # a train/ folder only: no test split to evaluate by default
    options = dict(model="mlp", epochs=1, batch_size=8, augment="flip", tta=True, val_split=0.25)
    train(dataset=str(tmp_path / "shapes"), data_dir=str(tmp_path / "cache"), out=tmp_path / "folder", **options)
    assert f"`imgclf evaluate {tmp_path / 'folder'} --split val` adds" in capsys.readouterr().out
    train(dataset="digits", out=tmp_path / "digits", **options)
    assert f"`imgclf evaluate {tmp_path / 'digits'}` adds" in capsys.readouterr().out


@pytest.mark.parametrize("extra", [{}, {"lookahead": True, "ema": 0.9}], ids=["plain", "lookahead-ema"])
def test_resume_continues_without_repeating_epochs(tmp_path, monkeypatch, extra):
    options = dict(FAST, epochs=3, augment="crop,flip", model_options={"dropout": 0.2}, **extra)
    straight = train(out=tmp_path / "straight", **options)

    stop_in_epoch(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train(out=tmp_path / "resumed", **options)
    assert [r["epoch"] for r in read_metrics(tmp_path / "resumed" / "metrics.csv")] == [1, 2]
    monkeypatch.undo()

    before = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)["seconds"]
    (tmp_path / "resumed" / "model.onnx").write_bytes(b"exported after epoch 2")
    resumed = train(out=tmp_path / "resumed", resume=True, quiet=True)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    assert not (tmp_path / "resumed" / "model.onnx").exists()  # it would pass for the finished model
    assert resumed.summary["seconds"] > before > 0  # the whole training, not only the last process's
    a = safetensors.torch.load_file(straight.run_dir / "model.safetensors")
    b = safetensors.torch.load_file(resumed.run_dir / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)


def test_a_run_stopped_before_its_first_checkpoint_starts_over(tmp_path, monkeypatch):
    train_module = importlib.import_module("imgclf.train")

    def interrupted_epoch(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train_one_epoch", interrupted_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(epochs=1, out=tmp_path / "run", **FAST)
    monkeypatch.undo()
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    assert train(out=tmp_path / "run", resume=True, quiet=True).summary["epochs_run"] == 1  # with --resume
    with pytest.raises(KeyboardInterrupt):
        monkeypatch.setattr(train_module, "train_one_epoch", interrupted_epoch)
        train(epochs=1, out=tmp_path / "again", **FAST)
    monkeypatch.undo()
    assert train(epochs=1, out=tmp_path / "again", **FAST).summary["epochs_run"] == 1  # or without


def test_divergence_stops_with_a_clear_error_and_keeps_the_checkpoint(tmp_path):
    with pytest.raises(ImgclfError, match="diverged"):
        train(epochs=3, out=tmp_path / "run", **dict(FAST, lr=1e12, optimizer="sgd"))
    assert (tmp_path / "run" / "config.yaml").exists()


def test_weights_the_last_step_left_not_finite_are_not_saved(tmp_path, monkeypatch):
    train_module = importlib.import_module("imgclf.train")
    real_epoch = train_module.train_one_epoch

    def last_step_diverges(learner, *args, **kwargs):  # its loss, read before the step, was finite
        row = real_epoch(learner, *args, **kwargs)
        next(learner.net.parameters()).data.fill_(float("nan"))
        return row

    monkeypatch.setattr(train_module, "train_one_epoch", last_step_diverges)
    with pytest.raises(ImgclfError, match=r"diverged \(weights are not finite\) in epoch 1; nothing was saved"):
        train(epochs=1, out=tmp_path / "run", **FAST)
    assert not (tmp_path / "run" / "model.safetensors").exists()


@pytest.mark.parametrize("optimizer", ["sgd", "nesterov", "muon", "adam", "adamw", "rmsprop"])
def test_every_optimizer_trains(tmp_path, optimizer):
    lr = 0.05 if optimizer in ("sgd", "nesterov", "muon") else 1e-3
    result = train(epochs=1, out=tmp_path / "run", **dict(FAST, optimizer=optimizer, lr=lr))
    assert result.history[0]["train_loss"] > 0


def test_newton_schulz_brings_every_singular_value_near_one():
    matrix = torch.randn(64, 200) @ torch.diag(torch.logspace(-2, 1, 200))  # badly conditioned
    for m in (matrix, matrix.T):
        singular_values = torch.linalg.svdvals(orthogonalize(m, steps=5))
        assert singular_values.min() > 0.5 and singular_values.max() < 1.3


def test_muon_steps_hidden_weights_at_a_fixed_norm_and_the_classifier_with_sgd(tmp_path):
    result = train(epochs=3, out=tmp_path / "run", muon_lr=0.05, muon_momentum=0.6,
                   **dict(FAST, optimizer="muon", lr=0.05, momentum=0.9))
    assert result.summary["final"]["val_acc"] > 0.8
    hidden = hidden_matrices(result.model)
    layers = [m for m in result.model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    assert len(hidden) == len(layers) - 1
    for weight in hidden:  # renormalised before each step, then moved by lr x an orthogonal matrix
        assert weight.norm().item() == pytest.approx(len(weight) ** 0.5, rel=0.05)
    assert all(layers[-1].weight is not w for w in hidden)


def test_ema_early_stopping_schedule_label_smoothing(tmp_path):
    result = train(epochs=4, out=tmp_path / "run", ema=0.9, early_stopping=1, schedule="cosine",
                   warmup_epochs=1, label_smoothing=0.1, augment="crop,cutout", weight_decay=5e-4, **FAST)
    assert 1 <= len(result.history) <= 4
    assert evaluate(result.run_dir, split="val")["accuracy"] > 0.5


def test_early_stopping_without_a_val_split_is_a_one_line_error(tmp_path):
    with pytest.raises(ImgclfError, match="early stopping watches the val accuracy"):
        train(out=tmp_path / "run", epochs=2, early_stopping=1, val_split=0.0, **FAST)


def test_a_single_class_is_a_one_line_error(tmp_path):
    from PIL import Image

    (tmp_path / "f" / "only").mkdir(parents=True)
    for i in range(3):
        Image.new("L", (8, 8), 40 * i).save(tmp_path / "f" / "only" / f"{i}.png")
    with pytest.raises(ImgclfError, match="has 1 class; a classifier needs 2 or more"):
        train(out=tmp_path / "run", epochs=1, **{**FAST, "dataset": str(tmp_path / "f"), "model": "mlp",
                                                 "val_split": 0.0})


def test_lr_schedules():
    steps = 10
    cosine = TrainConfig(epochs=4, schedule="cosine", warmup_epochs=1)
    factors = [lr_factor(cosine, s, steps) for s in range(40)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert max(factors) <= 1.0 and factors[-1] < 0.01
    step = TrainConfig(epochs=30, schedule="step", step_size=10, step_gamma=0.1)
    assert lr_factor(step, 0, steps) == 1 and lr_factor(step, 100, steps) == pytest.approx(0.1)
    onecycle = TrainConfig(epochs=4, schedule="onecycle")
    factors = [lr_factor(onecycle, s, steps) for s in range(40)]
    assert factors.index(max(factors)) == 9 and factors[10] == 1 and factors[-1] < 0.05


def test_the_peak_lr_is_reached_and_never_passed_whatever_the_step_count():
    short_warmup = TrainConfig(epochs=2, schedule="linear", warmup_epochs=0.25)  # 2.5 steps of 10
    assert [round(lr_factor(short_warmup, s, 10), 3) for s in range(4)] == [0.4, 0.8, 1.0, 0.971]
    one_step = TrainConfig(epochs=2, schedule="linear", warmup_epochs=0.5)  # 1 step per epoch: half a step
    assert lr_factor(one_step, 0, 1) == 1
    for epochs in (1, 2):  # onecycle in 1 or 2 steps in all still reaches its peak
        assert max(lr_factor(TrainConfig(epochs=epochs, schedule="onecycle"), s, 1) for s in range(epochs)) == 1
    step = TrainConfig(epochs=6, schedule="step", warmup_epochs=2, step_size=2)  # decay counts after warm-up
    assert [lr_factor(step, s, 2) for s in range(4, 12)] == pytest.approx([1, 1, 1, 1, 0.1, 0.1, 0.1, 0.1])


def test_optimizer_settings_reach_the_optimizer(tmp_path):
    from imgclf.optim import build_optimizer

    net = create_model("mlp", in_channels=1, image_size=8)
    adam = build_optimizer(net, TrainConfig(optimizer="adamw", adam_beta1=0.8, adam_beta2=0.99, eps=1e-7), "fp32")
    assert adam.defaults["betas"] == (0.8, 0.99) and adam.defaults["eps"] == 1e-7
    rmsprop = build_optimizer(net, TrainConfig(optimizer="rmsprop"), "fp32")
    assert rmsprop.defaults["alpha"] == 0.9 and rmsprop.defaults["eps"] == 1e-8  # Keras' rho, torch's eps
    # Nesterov without momentum is plain SGD (torch refuses the pair); clipping keeps a huge lr finite.
    result = train(epochs=1, out=tmp_path / "run", grad_clip=0.1, **dict(FAST, optimizer="nesterov", momentum=0.0))
    assert result.history[0]["train_loss"] > 0
    with pytest.raises(ImgclfError, match="grad_clip -1.0; use a positive gradient norm"):
        train(epochs=1, out=tmp_path / "bad", grad_clip=-1, **FAST)


def test_mixup_blends_pairs_of_the_batch_and_replays_from_its_seed(tmp_path):
    from imgclf.loader import mixup

    images = torch.arange(8.0).view(8, 1, 1, 1)
    blend, partner, weight = mixup(images, 0.2, torch.Generator().manual_seed(0))
    assert 0 <= weight <= 1 and sorted(partner.tolist()) == list(range(8))
    assert torch.allclose(blend, weight * images + (1 - weight) * images[partner])
    again = mixup(images, 0.2, torch.Generator().manual_seed(0))
    assert again[2] == weight and torch.equal(again[1], partner)
    result = train(epochs=2, out=tmp_path / "run", augment="crop,mixup", mixup_alpha=0.4, **FAST)
    assert result.summary["final"]["val_acc"] > 0.5


def test_a_batch_of_one_with_batch_norm_is_a_one_line_error(tmp_path):
    with pytest.raises(ImgclfError, match="batches of 1 image: batch norm needs 2 or more; use a larger --batch-size"):
        train(epochs=1, out=tmp_path / "run", model_options={"batch_norm": True}, **dict(FAST, batch_size=1))


def test_auto_precision_is_bf16_only_where_the_cpu_has_fast_bf16(monkeypatch):
    device = torch.device("cpu")
    monkeypatch.setattr(device_module, "cpu_has_fast_bf16", lambda: True)
    assert resolve_precision("auto", device) == "bf16"
    monkeypatch.setattr(device_module, "cpu_has_fast_bf16", lambda: False)
    assert resolve_precision("auto", device) == "fp32"
    assert resolve_precision("fp32", device) == "fp32"
    with pytest.raises(ImgclfError, match="fp16"):
        resolve_precision("fp16", device)


@pytest.mark.parametrize("native_bf16", [True, False])
def test_a_gpu_without_bf16_units_trains_in_fp16_and_predicts_a_bf16_run_in_fp32(monkeypatch, native_bf16):
    """T4 and V100 emulate bf16, and fp16 overflows where bf16 does not: read without a GPU, by the CUDA check."""
    gpu = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native_bf16)
    assert resolve_precision("auto", gpu) == ("bf16" if native_bf16 else "fp16")
    assert prediction_precision("bf16", gpu) == ("bf16" if native_bf16 else "fp32")
    assert prediction_precision("fp16", gpu) == "fp16"
    assert (slow_precision("bf16", gpu) is None) == native_bf16
    assert slow_precision("fp16", gpu) is None


def test_a_rank_whose_share_of_a_tiny_val_split_is_empty_still_validates():
    class FirstOfThreeRanks(distributed.Context):  # its sums are its own: no process group in a unit test
        def sum(self, *values):
            return [torch.as_tensor(v).double() for v in values]

    data = load_dataset("digits", val_split=0.1)
    data = dataclasses.replace(data, val=Split(data.val.images[:2], data.val.labels[:2]))  # rank 0 of 3 gets none
    net = create_model("cnn", num_classes=10, in_channels=1, image_size=8)
    row = importlib.import_module("imgclf.train").validate(net, data, "fp32", FirstOfThreeRanks(rank=0, world_size=3))
    assert math.isnan(row["val_acc"]) and math.isnan(row["val_loss"])  # 0 / 0 alone; the other ranks' sums fill it


def test_fast_training_options(tmp_path):
    """The speed-record tricks: whitening init from data, altflip, lookahead, linear decay, bias lr scale."""
    result = train(epochs=3, out=tmp_path / "run", **dict(
        FAST, model="fastnet", model_options={"widths": [16, 32, 32]}, optimizer="nesterov", lr=0.2,
        schedule="linear", warmup_epochs=1, final_lr_fraction=0.1, bias_lr_scale=2, lookahead=True,
        augment="crop,altflip", label_smoothing=0.2, batch_size=32, tta_shift=1, tta_margin=0.6))
    assert result.history[-1]["val_acc"] > 0.7
    whiten = result.model.whiten.weight  # frozen, so still the filters set from the data and their negatives
    assert torch.equal(whiten[: len(whiten) // 2], -whiten[len(whiten) // 2:])
    assert evaluate(result.run_dir, split="val", tta=True)["accuracy"] > 0.7
    assert evaluate(result.run_dir, split="val", tta=True, tta_margin=1.0)["accuracy"] > 0.7  # every view
    info = load_model(result.run_dir).info
    assert info["tta_shift"] == 1 and info["tta_margin"] == 0.6  # evaluate's TTA uses the recipe's views


def test_convnets_take_channels_last_where_it_was_measured_faster(monkeypatch):
    cnn, mlp = create_model("cnn"), create_model("mlp")
    for fast_bf16, fp32_layout in ((True, torch.contiguous_format), (False, torch.channels_last)):
        monkeypatch.setattr(device_module, "cpu_has_fast_bf16", lambda fast=fast_bf16: fast)
        assert memory_format(cnn, "bf16") == torch.channels_last
        assert memory_format(cnn, "fp32") == fp32_layout
        assert memory_format(mlp, "bf16") == memory_format(mlp, "fp32") == torch.contiguous_format


def test_bf16_prediction_puts_the_net_in_channels_last():
    net = create_model("fastnet", num_classes=10, in_channels=3, image_size=16, widths=[8, 16, 16]).eval()
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    expected = predict_logits(net, images, (0.5,) * 3, (0.25,) * 3, precision="fp32")
    logits = predict_logits(net, images, (0.5,) * 3, (0.25,) * 3, precision="bf16")
    assert net.blocks[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)  # a loaded net is not
    assert torch.allclose(logits, expected, atol=0.1 * expected.abs().max().item())


def test_tta_views_are_the_training_shifts_and_flips():
    images = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8)
    airbench = list(tta_views(images, ["crop", "altflip"]))
    assert len(airbench) == 6 and torch.equal(airbench[0], images) and torch.equal(airbench[1], images.flip(3))
    grid = list(tta_views(images, ["crop", "flip"], shift=2))
    assert len(grid) == 50  # 5 x 5 shifts, each also flipped
    assert torch.equal(grid[0], images)  # the centre first
    assert torch.equal(grid[2][..., 2:, 2:], images[..., :-2, :-2])  # shifted down-right by 2 pixels
    assert len({tuple(v.flatten().tolist()) for v in grid}) == 50
    assert len(list(tta_views(images, ["crop"], shift=1))) == 9 and len(list(tta_views(images, ["flip"]))) == 2
    with pytest.raises(ImgclfError, match="smaller shift"):
        list(tta_views(images, ["crop"], shift=8))
    net = create_model("fastnet", num_classes=10, in_channels=1, image_size=12, widths=[8, 8, 8]).train()
    with pytest.raises(ImgclfError, match="smaller shift"):
        predict_logits(net, torch.zeros(2, 1, 12, 12, dtype=torch.uint8), (0.5,), (0.25,), tta_augment=["crop"],
                       tta_shift=12)
    assert net.training  # a refused prediction leaves a training net in training mode
    with pytest.raises(ImgclfError, match="tta_shift"):
        train(epochs=1, tta_shift=0, **FAST)


def test_tta_margin_gives_the_other_views_to_unsure_images_only():
    net = create_model("fastnet", num_classes=10, in_channels=1, image_size=12, widths=[8, 8, 8]).eval()
    images = torch.randint(0, 256, (64, 1, 12, 12), dtype=torch.uint8)
    views = {"tta_augment": ["crop", "flip"], "tta_shift": 1}
    every_view = predict_logits(net, images, (0.5,), (0.25,), **views)
    centre_and_flip = predict_logits(net, images, (0.5,), (0.25,), tta_augment=["flip"])
    probs = centre_and_flip.softmax(1).topk(2, dim=1).values
    margins = probs[:, 0] - probs[:, 1]
    unsure = margins < margins.median()
    gated = predict_logits(net, images, (0.5,), (0.25,), tta_margin=margins.median().item(), **views)
    assert torch.allclose(gated[unsure], every_view[unsure], atol=1e-5)
    assert torch.allclose(gated[~unsure], centre_and_flip[~unsure], atol=1e-5)
    assert torch.allclose(predict_logits(net, images, (0.5,), (0.25,), tta_margin=1.0, **views), every_view, atol=1e-5)
    with pytest.raises(ImgclfError, match="tta_margin"):
        train(epochs=1, tta_margin=0, **FAST)


def test_whiten_bias_trains_only_in_its_first_epochs(tmp_path):
    options = dict(FAST, model="fastnet", model_options={"widths": [16, 32, 32]}, optimizer="nesterov", lr=0.2,
                   batch_size=32, epochs=2)
    frozen = train(out=tmp_path / "frozen", whiten_bias_epochs=0, **options).model
    trained = train(out=tmp_path / "trained", whiten_bias_epochs=2, **options).model
    assert torch.equal(frozen.whiten.bias, torch.zeros_like(frozen.whiten.bias))  # as init_from_data left it
    assert trained.whiten.bias.abs().sum() > 0
    assert frozen.whiten.bias.requires_grad  # frozen only while training: the returned net trains as built
    with pytest.raises(ImgclfError, match="whiten_bias_epochs -1"):
        train(out=tmp_path / "bad", whiten_bias_epochs=-1, **options)
    with pytest.raises(ImgclfError, match="whiten_bias_epochs is for nets with a patch-whitening layer"):
        train(out=tmp_path / "no-whitening", **{**options, "model": "mlp", "model_options": {}}, whiten_bias_epochs=1)


def test_progressive_resizing_trains_early_epochs_on_smaller_windows(tmp_path):
    result = train(epochs=2, out=tmp_path / "run", progressive_size=5, progressive_epochs=1,
                   **dict(FAST, model="fastnet", model_options={"widths": [16, 32, 32]}, optimizer="nesterov",
                          lr=0.2, batch_size=32))
    assert result.summary["final"]["val_acc"] > 0.5
    with pytest.raises(ImgclfError, match="cannot take 5x5 inputs"):  # flatten + dense needs its trained size
        train(epochs=1, out=tmp_path / "mlp", progressive_size=5, progressive_epochs=1, **dict(FAST, model="mlp"))
    with pytest.raises(ImgclfError, match="must be smaller than the images"):
        train(epochs=1, out=tmp_path / "big", progressive_size=8, progressive_epochs=1, **FAST)
    assert not (tmp_path / "mlp").exists() and not (tmp_path / "big").exists()


def test_fastnet_whitening_decorrelates_patches():
    net = create_model("fastnet", in_channels=3, image_size=16, widths=[8, 8, 8])
    images = torch.randn(64, 3, 16, 16) @ torch.randn(16, 16)  # correlated pixels
    net.init_from_data(images)
    out = net.whiten(images)[:, :12]  # the positive half: one channel per eigenvector
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12)
    covariance = torch.cov(flat.T)
    assert torch.allclose(covariance, torch.eye(12), atol=0.05)


def test_tensorboard_logging_or_a_clear_error(tmp_path):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ImgclfError, match="pip install"):
            train(epochs=1, out=tmp_path / "run", tensorboard=True, **FAST)
        assert not (tmp_path / "run").exists()  # nothing written: the same command without the flag just works
        return
    train(epochs=1, out=tmp_path / "run", tensorboard=True, **FAST)
    assert any((tmp_path / "run" / "tensorboard").iterdir())


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident size from /proc")
def test_freed_activation_memory_stays_with_the_process_for_reuse():
    # A freed 200 MB tensor normally goes straight back to the system (a fresh mmap every step, paid in page
    # faults); after keep_freed_memory the heap keeps it.
    script = ("import torch\nfrom imgclf.device import keep_freed_memory\n"
              "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * 4096 >> 20\n"
              "keep_freed_memory()\n"
              "before = rss(); x = torch.ones(50_000_000); del x\n"
              "print(rss() - before)")
    kept_mib = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                  check=True).stdout)
    assert kept_mib > 150


def test_the_api_takes_what_a_notebook_gives_it_and_leaves_its_matplotlib_alone(tmp_path):
    import matplotlib

    from imgclf import compare_runs, load_dataset, predict, write_report
    from imgclf.config import make_config

    backend, weight = matplotlib.get_backend(), matplotlib.rcParams["axes.titleweight"]
    config = make_config(dataset="digits", model="mlp", epochs=2, lr=3e-3)
    result = train(config, epochs=1, out=tmp_path / "run", quiet=True)  # options beside a config change it
    assert result.summary["epochs_run"] == 1 and not result.model.training
    assert evaluate(result)["num_images"] == 360 and load_model(result).class_names[0] == "0"  # stands for its folder
    for options, message in (({"model": "cnn"}, "not both"), ({"learning_rate": 5}, "unknown option 'learning_rate'")):
        with pytest.raises(ImgclfError, match=message):
            train(config, out=tmp_path / "other", **options)
    data = load_dataset("digits")
    with pytest.raises(ImgclfError, match="val_split, subset would be ignored: the Dataset passed is already loaded"):
        train(dataset=data, model="mlp", subset=50, val_split=0.5, out=tmp_path / "other")
    with pytest.raises(ImgclfError, match=r"images are a torch.float32 tensor .* give uint8 pixels"):
        predict(result, data.test.images[:3].float() / 255)
    assert len(compare_runs(str(result.run_dir), tmp_path / "compare")) == 1  # one folder, not its letters
    write_report(result)
    assert (matplotlib.get_backend(), matplotlib.rcParams["axes.titleweight"]) == (backend, weight)


def test_a_dataset_object_with_other_images_is_not_reused(tmp_path):
    from imgclf import load_dataset

    train(dataset=load_dataset("digits", subset=100), model="mlp", epochs=1, out=tmp_path / "run", quiet=True)
    with pytest.raises(ImgclfError, match="trained on other images than the Dataset passed"):  # another 100
        train(dataset=load_dataset("digits", subset=100, seed=1), model="mlp", epochs=1, out=tmp_path / "run",
              quiet=True)
    with pytest.raises(ImgclfError, match="already holds a different finished run"):  # loaded otherwise
        train(dataset=load_dataset("digits"), model="mlp", epochs=1, out=tmp_path / "run", quiet=True)


def test_a_changed_image_folder_is_trained_again_not_reused(tmp_path, write_shapes, monkeypatch):
    monkeypatch.setenv("IMGCLF_DATA", str(tmp_path / "cache"))
    folder = write_shapes(tmp_path / "shapes", n=40)
    options = dict(dataset=str(folder), model="mlp", epochs=1, val_split=0.25, out=tmp_path / "run", quiet=True)
    first = train(**options)
    assert train(**options).reused  # unchanged: the model is reused
    write_shapes(tmp_path / "shapes", n=60)  # 20 more images
    with pytest.raises(ImgclfError, match=r"shapes changed \(images added, removed or rewritten\) since .*run was "
                                          "trained on it; choose another --out"):
        train(**options)
    assert train(**{**options, "out": tmp_path / "new"}).summary["train_images"] != first.summary["train_images"]


def test_api_arguments_of_the_wrong_type_are_one_line_errors(tmp_path):
    import numpy as np

    from imgclf import create_model, load_dataset, load_model, predict

    run = train(dataset="digits", model="mlp", epochs=1, out=tmp_path / "run", quiet=True)
    for call, message in (
            (lambda: train(dataset="digits", model="mlp", out=5), "out is the run folder, a path"),
            (lambda: train(dataset="digits", model="mlp", model_options=[8]), "model_options is a dict"),
            (lambda: predict(run, load_dataset("digits").test.images[:2], top_k="3"), "top-k '3'"),
            (lambda: load_model(run, device="gpu"), "unknown device 'gpu'; use one of auto, cpu, cuda"),
            (lambda: load_dataset("digits", val_split="0.1"), "val_split must be a number in"),
            (lambda: load_dataset("digits", subset="50"), "invalid subset '50'"),
            (lambda: load_dataset("digits", image_size=8.5), "invalid image size 8.5")):
        with pytest.raises(ImgclfError, match=message):
            call()
    assert create_model("mlp", num_classes=np.int64(10), image_size=np.int32(8), in_channels=1)


def test_settings_the_configuration_never_reads_are_warned_of(tmp_path):
    with pytest.warns(UserWarning, match=r"momentum \(with optimizer adam\), step_size \(with schedule constant\): "
                                         "not used by this configuration"):
        train(dataset="digits", model="mlp", epochs=1, optimizer="adam", momentum=0.5, step_size=3,
              out=tmp_path / "run", quiet=True)


def test_train_gives_the_callers_random_stream_back(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train(dataset="digits", model="mlp", epochs=1, out=tmp_path / "run", quiet=True, seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_a_full_disk_is_said_in_one_line_naming_the_file_and_keeps_what_was_written(tmp_path, monkeypatch):
    import errno
    import os

    from imgclf.errors import unexpected
    from imgclf.runs import atomic_write, held_folder

    atomic_write(tmp_path / "kept.json", "old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as e:
        atomic_write(tmp_path / "kept.json", "new")
    assert e.value.filename == str(tmp_path / "kept.json") and (tmp_path / "kept.json").read_text() == "old"
    assert unexpected(e.value).startswith(f"error: {tmp_path / 'kept.json'}: no space left on the device; free")
    with pytest.raises(OSError):
        atomic_write(tmp_path / "new" / "deeper" / "model.onnx", "data")
    assert [p.name for p in tmp_path.iterdir()] == ["kept.json"]  # no temporary file nor folder left
    (tmp_path / ".checkpoint.pt.x1y2.tmp").write_bytes(b"half")  # as a kill during a write leaves it
    with held_folder(tmp_path, "busy"):
        assert [p.name for p in tmp_path.iterdir()] == ["kept.json"]
    monkeypatch.undo()
    old, fresh = tmp_path / ".kept.json.a1b2.tmp", tmp_path / ".kept.json.c3d4.tmp"  # a killed write, another going on
    old.write_text("half")
    fresh.write_text("half")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    atomic_write(tmp_path / "kept.json", "newer")  # a later write of the same file sweeps the old one only
    assert not old.exists() and fresh.exists() and (tmp_path / "kept.json").read_text() == "newer"


def test_odd_things_a_notebook_passes_get_one_line(tmp_path):
    from PIL import Image

    from imgclf import compare_runs, load_dataset, predict

    with pytest.raises(ImgclfError, match="train's first argument is a RunConfig, not 'mnist-fast'; for a recipe"):
        train("mnist-fast")
    with pytest.raises(ImgclfError, match="on_epoch must be a function"):
        train(dataset="digits", model="mlp", on_epoch="x", out=tmp_path / "no")
    run = train(out=tmp_path / "run", epochs=1, **FAST)
    with pytest.raises(ImgclfError, match="not a PIL.Image.Image"):
        predict(run, [Image.new("L", (8, 8))])
    assert len(predict(run, load_dataset("digits").test.images[:2].numpy())) == 2  # a numpy array as a tensor
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's multi-line warning about a read-only array
        assert len(predict(run, np.broadcast_to(load_dataset("digits").test.images[:1].numpy(), (3, 1, 8, 8)))) == 3
    with pytest.raises(ImgclfError, match="holds a training run; give the comparison a folder of its own"):
        compare_runs([run.run_dir], run.run_dir)
    with pytest.raises(ImgclfError, match="batch_size 0: give a whole number of images"):
        evaluate(run, batch_size=0)
    assert train(out=tmp_path / "tuple", epochs=1, augment=("crop", "flip"), **FAST).summary["epochs_run"] == 1


def test_an_early_stopped_run_killed_while_saving_resumes_without_more_epochs(tmp_path, monkeypatch):
    train_module = importlib.import_module("imgclf.train")
    scores = iter([0.9, 0.5, 0.4, 0.3])  # epoch 1 is the best: early stopping ends the run after epoch 2
    monkeypatch.setattr(train_module, "validate", lambda *args: {"val_loss": 1.0, "val_acc": next(scores)})
    run = train(epochs=4, early_stopping=1, out=tmp_path / "run", **FAST)
    monkeypatch.undo()
    (run.run_dir / "summary.json").unlink()  # as if killed after the last checkpoint, before the summary
    resumed = train(out=tmp_path / "run", resume=True, quiet=True)
    assert [r["epoch"] for r in resumed.history] == [1, 2] and resumed.summary["kept_epoch"] == 1


def test_a_run_folder_left_by_a_kill_before_any_checkpoint_starts_over_clean(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".config.yaml.x1y2.tmp").write_text("half")  # killed during the very first write
    train_module = importlib.import_module("imgclf.train")

    def interrupted_epoch(*args, **kwargs):
        raise KeyboardInterrupt

    first = train(epochs=1, out=out, **{**FAST, "model": "mlp"})
    assert not (out / ".config.yaml.x1y2.tmp").exists()
    (out / "checkpoint.pt").unlink()
    (out / "summary.json").unlink()  # stopped after its model was written, before its first checkpoint
    monkeypatch.setattr(train_module, "train_one_epoch", interrupted_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(epochs=1, out=out, **FAST)  # a cnn now: the mlp's model must not stay beside the cnn's config
    assert first.run_dir == out and not (out / "model.json").exists() and not (out / "metrics.csv").exists()


def test_ctrl_c_while_saving_the_trained_model_says_resume(tmp_path, monkeypatch, capsys):
    train_module = importlib.import_module("imgclf.train")
    real_write = train_module.atomic_write

    def interrupted_summary(path, data):
        if path.name == "summary.json":
            raise KeyboardInterrupt
        real_write(path, data)

    monkeypatch.setattr(train_module, "atomic_write", interrupted_summary)
    with pytest.raises(KeyboardInterrupt):
        train(epochs=2, out=tmp_path / "run", **{**FAST, "quiet": False})
    assert "interrupted while saving the trained model" in capsys.readouterr().out
    monkeypatch.undo()
    resumed = train(out=tmp_path / "run", resume=True, quiet=True)
    assert [r["epoch"] for r in resumed.history] == [1, 2] and (tmp_path / "run" / "summary.json").exists()


def test_the_tensorboard_folder_comes_after_config_yaml(tmp_path, monkeypatch):
    # A run killed between the two left a folder that --out then refused as "not a run folder".
    made = []

    class Writer:
        def __init__(self, folder):
            made.append((tmp_path / "run" / "config.yaml").exists())
            Path(folder).mkdir(parents=True)

        def add_scalar(self, *args):
            pass

        def flush(self):
            pass

    fake = type(sys)("torch.utils.tensorboard")
    fake.SummaryWriter = Writer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    train(epochs=2, out=tmp_path / "run", tensorboard=True, **FAST)
    assert made == [True]  # one writer, made once the folder is a run's


def test_resume_refuses_what_it_would_ignore_and_other_images(tmp_path, monkeypatch):
    data = load_dataset("digits", subset=600, val_split=0.2)
    stop_in_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train(dataset=data, model="mlp", epochs=2, out=tmp_path / "run", quiet=True)
    monkeypatch.undo()
    with pytest.raises(ImgclfError, match="so epochs, lr would be ignored; drop them"):
        train(out=tmp_path / "run", resume=True, epochs=5, lr=0.5)
    with pytest.raises(ImgclfError, match="so model, dataset would be ignored"):
        train(out=tmp_path / "run", resume=True, model="cnn", dataset="mnist")
    with pytest.raises(ImgclfError, match="a run started on other images than the Dataset passed"):
        train(out=tmp_path / "run", resume=True, dataset=load_dataset("digits", subset=200, val_split=0.5))
    resumed = train(out=tmp_path / "run", resume=True, dataset=data, threads=1, quiet=True)
    assert [r["epoch"] for r in resumed.history] == [1, 2]

    inverted = dataclasses.replace(data, train=Split(255 - data.train.images, data.train.labels))
    stop_in_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train(dataset=inverted, model="mlp", epochs=2, out=tmp_path / "inverted", quiet=True)
    monkeypatch.undo()
    with pytest.raises(ImgclfError, match=r"holds a run started on a Dataset object; resume it with that Dataset"):
        train(out=tmp_path / "inverted", resume=True, quiet=True)  # it went on with plain digits
    train(out=tmp_path / "inverted", resume=True, dataset=inverted, quiet=True)
    with pytest.warns(UserWarning, match="was trained on a Dataset object, whose images may differ from digits"):
        train(dataset="digits", subset=600, val_split=0.2, model="mlp", epochs=2, out=tmp_path / "inverted",
              quiet=True)  # the same settings, by name: reused, with a word
    with pytest.raises(ImgclfError, match="resume=True needs out"):
        train(resume=True)
    with pytest.raises(ImgclfError, match="not ''"):
        train(dataset="digits", model="mlp", epochs=1, quiet=True, out="")  # not a new folder named by the time


def test_resume_refuses_an_image_folder_that_changed_since_the_run_started(tmp_path, monkeypatch, write_shapes):
    folder = write_shapes(tmp_path / "shapes", 40)
    stop_in_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train(dataset=str(folder), model="mlp", epochs=2, val_split=0.2, out=tmp_path / "run", quiet=True)
    monkeypatch.undo()
    added = [folder / "a" / f"new{i}.png" for i in range(20)]
    for path in added:
        shutil.copy(folder / "a" / "0.png", path)
    with pytest.raises(ImgclfError, match="shapes changed .* since .*run started on it, so resuming would train"):
        train(out=tmp_path / "run", resume=True, quiet=True)
    for path in added:
        path.unlink()
    assert [r["epoch"] for r in train(out=tmp_path / "run", resume=True, quiet=True).history] == [1, 2]


def test_a_read_only_run_folder_is_refused_before_training(tmp_path, monkeypatch):
    import os

    run = train(epochs=1, out=tmp_path / "run", **FAST)
    (run.run_dir / "summary.json").unlink()  # a run left to resume
    real_access = os.access
    # as a user who is not root sees a run folder shared read-only (root may write anywhere)
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != run.run_dir and real_access(p, mode))
    monkeypatch.setattr(importlib.import_module("imgclf.train"), "train_one_epoch", pytest.fail)
    with pytest.raises(ImgclfError, match=r"run is read-only, so no checkpoint could be saved there; make it"):
        train(out=run.run_dir, resume=True, quiet=True)


def test_runs_without_out_in_a_loop_each_get_a_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda fmt: "20261207-080000")  # all within one second
    results = [train(epochs=1, model="mlp", dataset="digits", lr=lr, quiet=True) for lr in (0.1, 0.01)]
    assert [r.run_dir for r in results] == [Path("runs/digits-mlp-20261207-080000"),
                                            Path("runs/digits-mlp-20261207-080000-2")]
    assert not any(r.reused for r in results)


def test_a_string_where_a_flag_goes_is_refused(tmp_path):
    with pytest.raises(ImgclfError, match="report is True or False, not 'no'"):
        train(epochs=1, out=tmp_path / "run", report="no", **{**FAST, "quiet": True})
    assert not (tmp_path / "run").exists()


def test_a_lookahead_run_scores_the_weights_it_saves(tmp_path):
    run = train(epochs=2, out=tmp_path / "run", lookahead=True, **{**FAST, "lr": 0.05})
    saved = evaluate(run, split="val", tta=False)
    assert saved["accuracy"] == pytest.approx(run.history[-1]["val_acc"])
    assert saved["loss"] == pytest.approx(run.history[-1]["val_loss"], rel=1e-4)


def test_a_run_from_a_dataset_object_records_how_it_was_loaded(tmp_path):
    data = load_dataset("digits", subset=300, val_split=0.2)
    run = train(dataset=data, model="mlp", epochs=1, out=tmp_path / "run", quiet=True)
    recorded = load_recipe(tmp_path / "run").data
    assert (recorded.subset, recorded.val_split) == (300, 0.2)
    assert evaluate(run, split="val")["accuracy"] == pytest.approx(run.history[-1]["val_acc"])  # the same split
    # Split by seed 5, trained with seed 0 (as tune's second execution of a trial): model.json keeps the 5.
    other = train(dataset=load_dataset("digits", val_split=0.2, seed=5), model="mlp", epochs=1,
                  out=tmp_path / "other", quiet=True)
    assert evaluate(other, split="val")["accuracy"] == pytest.approx(other.history[-1]["val_acc"])
    data = load_dataset("digits", val_split=0.2)
    data.val = Split(data.val.images[1:], data.val.labels[1:])  # changed by hand: no load options rebuild it
    edited = train(dataset=data, model="mlp", epochs=1, out=tmp_path / "edited", quiet=True)
    with pytest.raises(ImgclfError, match=r"pass that object: evaluate\(run, dataset=data, split='val'\)"):
        evaluate(edited, split="val")


@pytest.mark.parametrize("call, said", [
    (lambda: create_model(["cnn"]), "a model is named by a string such as 'cnn'"),
    (lambda: evaluate("runs/x", 5), "dataset is a name, an image folder or a loaded Dataset, not 5"),
    (lambda: imgclf.compare_runs(["runs/x"], None), "the folder to write the comparison into is a path"),
    (lambda: imgclf.tune(load_dataset("digits")), "tune takes a dataset name or image folder"),
    (lambda: imgclf.tune("digits", val_split="0.2"), "val split '0.2' must be a fraction between 0 and 1"),
    (lambda: imgclf.tune("digits", timeout=True), "timeout must be a positive number, got True"),
    (lambda: load_dataset("digits", val_split=True), "val_split must be a number in"),
    (lambda: imgclf.tune("digits", out=5), "the folder to write the study into is a path such as 'out', not 5"),
    (lambda: evaluate("runs/x", device="gpu"), "unknown device 'gpu'; use one of"),
    (lambda: imgclf.predict("runs/x", "a.png", device="tpu"), "unknown device 'tpu'; use one of"),
    (lambda: evaluate("runs/x", device="auto:0"), "unknown device 'auto:0'; use one of auto, cpu, cuda (cuda:N"),
])
def test_api_arguments_of_the_wrong_type_are_named(call, said):
    with pytest.raises(ImgclfError, match=re.escape(said)):
        call()


def test_a_run_resumes_on_another_kind_of_device(tmp_path, monkeypatch):
    # A GPU's generator state (16 bytes) does not fit the CPU's: the shuffling is reseeded, not a crash.
    stop_in_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train(epochs=2, out=tmp_path / "run", lookahead=True, **FAST)
    monkeypatch.undo()
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    torch.save({**state, "generator": torch.zeros(16, dtype=torch.uint8)}, tmp_path / "run" / "checkpoint.pt")
    resumed = train(out=tmp_path / "run", resume=True, quiet=True)
    assert [r["epoch"] for r in resumed.history] == [1, 2]


def test_a_gpu_fp16_run_resumes_on_the_cpu_in_what_the_cpu_has(tmp_path, monkeypatch, capsys):
    stop_in_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train(epochs=2, out=tmp_path / "run", **{**FAST, "quiet": False})
    monkeypatch.undo()
    config = tmp_path / "run" / "config.yaml"
    config.write_text(config.read_text().replace("precision: auto", "precision: fp16"))  # as a GPU run writes it
    resumed = train(out=tmp_path / "run", resume=True, device="cpu")
    assert [r["epoch"] for r in resumed.history] == [1, 2]
    assert f"fp16 is for GPUs: this CPU goes on in {resolve_precision('auto', torch.device('cpu'))}" \
        in capsys.readouterr().out
    config.write_text("data: {dataset: digits}\n")  # cut short: the missing sections' defaults are not a run
    with pytest.raises(ImgclfError, match="its config.yaml is not a whole run's"):
        train(out=tmp_path / "run", resume=True)


def test_crop_that_shifts_nothing_or_less_than_tta_is_refused(tmp_path, monkeypatch):
    with pytest.raises(ImgclfError, match="crop_padding 0 makes augment crop shift nothing"):
        train(epochs=1, augment=["crop"], crop_padding=0, out=tmp_path / "a", **FAST)
    with pytest.raises(ImgclfError, match="tta_shift 3 would average views shifted further than crop_padding 1"):
        train(epochs=1, augment=["crop"], tta=True, tta_shift=3, out=tmp_path / "b", **FAST)  # 8x8: 1 pixel
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    stop_in_epoch(monkeypatch, 2)  # a run started before the check was made still resumes
    with pytest.raises(KeyboardInterrupt):
        train(epochs=2, augment=["crop"], tta=True, tta_shift=1, out=tmp_path / "c", **FAST)
    monkeypatch.undo()
    config = tmp_path / "c" / "config.yaml"
    config.write_text(config.read_text().replace("tta_shift: 1", "tta_shift: 3"))
    assert [r["epoch"] for r in train(out=tmp_path / "c", resume=True, quiet=True).history] == [1, 2]


def test_the_recipes_own_model_named_again_keeps_its_options():
    from imgclf.config import make_config

    assert make_config("ref-mnist-cnn", model="cnn").model == make_config("ref-mnist-cnn").model
    assert make_config("ref-mnist-cnn", model="mlp").model.options == {}


def test_a_loaded_model_rebuilds_its_own_validation_split(tmp_path):
    run = train(dataset="digits", model="mlp", epochs=1, out=tmp_path / "run", quiet=True, seed=3, val_split=0.25)
    model = imgclf.load_model(run.run_dir)  # carries no config.yaml: model.json records the split
    assert evaluate(model, split="val")["accuracy"] == pytest.approx(run.history[-1]["val_acc"])


def test_evaluate_warns_when_it_scores_images_the_model_trained_on(tmp_path, write_shapes, recwarn):
    write_shapes(tmp_path / "shapes", 20)  # class folders only: training carves a test split
    run = train(dataset=str(tmp_path / "shapes"), data_dir=str(tmp_path / "cache"), model="mlp", epochs=1,
                batch_size=8, val_split=0, quiet=True, out=tmp_path / "run")
    evaluate(run)  # its own test split: no image of it was trained on
    assert not [w for w in recwarn if "trained on" in str(w.message)]
    shutil.copytree(tmp_path / "shapes", tmp_path / "copy")
    trained = len(load_dataset(str(tmp_path / "shapes"), str(tmp_path / "cache"), val_split=0).train)
    with pytest.warns(UserWarning, match=rf"^{trained} of the 20 test images of .*copy are images this model trained"):
        evaluate(run, str(tmp_path / "copy"), data_dir=str(tmp_path / "cache"))


def test_a_damaged_record_of_the_training_images_skips_that_check_with_a_warning(tmp_path):
    run = train(dataset="digits", model="mlp", epochs=1, out=tmp_path / "run", quiet=True)
    assert imgclf.load_model(run.run_dir).train_fingerprints.shape == (len(load_dataset("digits").train),)
    (run.run_dir / "train_images.npy").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="train_images.npy is damaged .* delete it to go on without that check"):
        assert evaluate(run)["accuracy"] > 0.5
    np.save(run.run_dir / "train_images.npy", np.zeros((2, 2)))  # readable, but not the hashes
    model = imgclf.load_model(run.run_dir)  # read only when evaluate asks: predict, serve and export never do
    with pytest.warns(UserWarning, match=r"train_images.npy is damaged \(ValueError\)"):
        assert model.train_fingerprints is None  # the check is skipped
    (run.run_dir / "train_images.npy").unlink()  # a run saved before they were kept: no check, no warning
    assert imgclf.load_model(run.run_dir).train_fingerprints is None


def test_training_warns_of_held_out_images_that_are_also_training_images(tmp_path, write_shapes):
    write_shapes(tmp_path / "f" / "train", 20)
    from PIL import Image

    for i, gray in enumerate([100, 120, 140, 160]):  # grays no training image has
        (tmp_path / "f" / "test" / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8), gray).save(tmp_path / "f" / "test" / "ab"[i % 2] / f"{i}.png")
    shutil.copy(tmp_path / "f" / "train" / "a" / "10.png", tmp_path / "f" / "test" / "a" / "copy.png")
    with pytest.warns(UserWarning, match=r"^1 of the 5 test images of .*f are also training images"):
        train(dataset=str(tmp_path / "f"), data_dir=str(tmp_path / "cache"), model="mlp", epochs=1, batch_size=8,
              val_split=0, quiet=True, out=tmp_path / "run")


def test_a_run_still_training_is_named_in_use_not_sent_to_resume(tmp_path, monkeypatch):
    from imgclf.runs import folder_lock

    options = dict(FAST, epochs=3, out=tmp_path / "run")
    stop_in_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train(**options)
    monkeypatch.undo()
    with folder_lock(tmp_path / "run"):  # as the process training there holds it
        with pytest.raises(ImgclfError, match="is in use by another imgclf process"):
            train(**options)  # not "add --resume", which would then be refused as in use
        with pytest.warns(UserWarning, match=r"last finished epoch \(it is still training\)"):
            evaluate(tmp_path / "run", split="val")
    with pytest.raises(ImgclfError, match="add --resume"):
        train(**options)


def test_repeats_that_the_validation_split_carves_apart_are_counted(tmp_path, write_shapes):
    write_shapes(tmp_path / "f" / "train", 20)
    for i in range(8):  # one image, many times: the seeded val split puts some copies on each side
        shutil.copy(tmp_path / "f" / "train" / "a" / "0.png", tmp_path / "f" / "train" / "a" / f"copy{i}.png")
    with pytest.warns(UserWarning, match=r"^\d+ of the \d+ val images of .*f are also training images"):
        train(dataset=str(tmp_path / "f"), data_dir=str(tmp_path / "cache"), model="mlp", epochs=1, batch_size=8,
              val_split=0.5, quiet=True, out=tmp_path / "run")
