"""Reports: a run's figures and HTML page, comparisons of runs, dataset pictures, and the CLI for them."""

import base64
import csv
import importlib
import os
import shutil
import subprocess
import time

import numpy as np
import pytest
import torch
from PIL import Image

import imgclf
from imgclf.cli import main
from imgclf.errors import ImgclfError
from imgclf.evaluate import classification_metrics
from imgclf.report import (
    compare_runs,
    config_differences,
    example_grids,
    most_confused_pairs,
    plot_accuracy_bars,
    plot_accuracy_vs_time,
    plot_examples,
    plot_per_class,
    write_report,
)

FIGURES = ["curves", "confusion", "correct", "wrong", "top_losses", "per_class"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    imgclf.train(dataset="digits", model="mlp", epochs=2, out=root / "mlp", quiet=True)
    imgclf.train(dataset="digits", model="cnn", epochs=2, out=root / "cnn", quiet=True)
    return root / "mlp", root / "cnn"


def assert_png(path, min_side=200):
    assert path.exists(), path
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert min(image.size) >= min_side, (path, image.size)
        pixels = np.asarray(image.convert("L"), dtype=np.float32)
    assert pixels.std() > 5, f"{path} looks blank"


def test_write_report(runs):
    page = write_report(runs[0])
    assert page == runs[0] / "report.html"
    for name in FIGURES:
        assert_png(runs[0] / "figures" / f"{name}.png")
    text = page.read_text()
    for name in FIGURES:  # each figure inside the page, which is then one self-contained file
        data = base64.b64encode((runs[0] / "figures" / f"{name}.png").read_bytes()).decode()
        assert f"src='data:image/png;base64,{data}'" in text
    assert "src='figures/" not in text
    accuracy = imgclf.evaluate(runs[0])["accuracy"]
    assert f"{accuracy:.2%}" in text
    assert "test split, 360 images" in text and "name: mlp" in text  # the config.yaml, in full
    assert not list(runs[0].glob(".*.tmp")), "a temporary file was left behind"


def test_report_renders_in_chromium(runs, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium) so the HTML is not rendered")
    page = write_report(runs[1])
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1280,2000",
                    page.resolve().as_uri()], capture_output=True, timeout=60)
    assert_png(shot, min_side=1000)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert (pixels < 128).mean() > 0.01, "the screenshot has almost no dark pixels: figures or text missing"


def test_compare_runs(runs, tmp_path):
    rows = compare_runs(list(runs), tmp_path / "out")
    assert [r["model"] for r in rows] == ["mlp", "cnn"]
    assert all(r["dataset"] == "digits" and r["split"] == "test" and 0 < r["accuracy"] <= 1 for r in rows)
    assert rows[0]["params"] > 0 and rows[0]["epochs"] == 2 and rows[0]["minutes"] > 0
    with open(tmp_path / "out" / "compare.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 2
    assert_png(tmp_path / "out" / "accuracy.png")
    assert_png(tmp_path / "out" / "accuracy_vs_time.png")
    text = (tmp_path / "out" / "compare.html").read_text()
    assert "accuracy.png" in text and "accuracy_vs_time.png" in text


def test_a_kill_while_drawing_leaves_the_earlier_outputs_whole(runs, tmp_path, monkeypatch):
    """Ctrl-C (or a crash) after some figures are drawn: the page and figures of the last finished report or
    comparison stay as they were, none half new."""
    compare_runs(list(runs), tmp_path / "out")
    write_report(runs[0])
    before = {p: p.read_bytes() for folder in (tmp_path / "out", runs[0]) for p in folder.rglob("*")
              if p.is_file() and p.suffix in (".png", ".html", ".csv") and p.name != "metrics.csv"}
    assert len(before) == 4 + len(FIGURES) + 1

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("imgclf.report.plot_accuracy_vs_time", interrupted)  # after the csv and the bars
    monkeypatch.setattr("imgclf.report.plot_per_class", interrupted)  # after five of the six figures
    with pytest.raises(KeyboardInterrupt):
        compare_runs([runs[1]], tmp_path / "out")
    with pytest.raises(KeyboardInterrupt):
        write_report(runs[0], split="train")
    assert {p: p.read_bytes() for p in before} == before
    assert not list((tmp_path / "out").glob(".imgclf-scratch-*"))  # removed on the way out
    killed = tmp_path / "out" / ".imgclf-scratch-x"  # as a kill -9 leaves it
    (killed / "figures").mkdir(parents=True)
    os.utime(killed, (time.time() - 7200,) * 2)
    monkeypatch.undo()
    compare_runs([runs[1]], tmp_path / "out")
    assert not killed.exists()


def test_compare_names_the_settings_in_which_runs_differ(runs, tmp_path):
    assert [r["differs"] for r in compare_runs(list(runs), tmp_path / "out")] == ["", ""]  # options of two models
    cnn = {"data": {"dataset": "digits", "data_dir": "/a"}, "model": {"name": "cnn", "filters": [8]},
           "train": {"lr": 0.1, "seed": 0, "threads": 2}}
    wider = {"data": {"dataset": "digits", "data_dir": "/b"}, "model": {"name": "cnn", "filters": [16]},
             "train": {"lr": 0.1, "seed": 1, "threads": 1}}
    mlp = {"data": {"dataset": "mnist"}, "model": {"name": "mlp", "hidden": [64]}, "train": {"lr": 0.1, "seed": 1}}
    assert config_differences([cnn, wider, mlp]) == [{"model.filters": [8], "seed": 0},
                                                     {"model.filters": [16], "seed": 1}, {"seed": 1}]
    # A model's default given by name is no difference: runs compare as built (model.json), not as typed.
    imgclf.train(dataset="digits", model="cnn", epochs=2, out=tmp_path / "cnn", quiet=True,
                 model_options={"kernel_size": 3, "padding": "same", "pool": 2})
    assert [r["differs"] for r in compare_runs([runs[1], tmp_path / "cnn"], tmp_path / "out")] == ["", ""]


def test_compare_takes_a_folder_of_runs_and_prints_brackets(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # one table row per run
    imgclf.train(dataset="digits", model="mlp", epochs=1, augment=["crop"], out=tmp_path / "runs" / "b" / "crop",
                 quiet=True)
    shutil.copytree(runs[0], tmp_path / "runs" / "a [copy]")
    (tmp_path / "runs" / "stopped").mkdir()
    shutil.copy(runs[0] / "config.yaml", tmp_path / "runs" / "stopped")
    with pytest.warns(UserWarning, match="skipped 1 unfinished run"):
        rows = compare_runs([tmp_path / "runs", tmp_path / "runs" / "a [copy]"], tmp_path / "out")
    assert [r["run"] for r in rows] == ["a [copy]", "b/crop"]
    (tmp_path / "other").mkdir()
    shutil.copytree(runs[0], tmp_path / "other" / "crop")
    rows = compare_runs([tmp_path / "runs" / "b" / "crop", tmp_path / "other" / "crop", runs[0]], tmp_path / "out")
    assert [r["run"] for r in rows] == [str(tmp_path / "runs" / "b" / "crop"), str(tmp_path / "other" / "crop"), "mlp"]
    assert main(["compare", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "a [copy]" in out and "augment=[crop]" in out  # user text, not rich markup
    (tmp_path / "none").mkdir()
    with pytest.raises(ImgclfError, match="holds no finished runs"):
        compare_runs([tmp_path / "none"], tmp_path / "out")
    (tmp_path / "runs" / "a [copy]" / "model.safetensors").write_bytes(b"damaged")
    with pytest.warns(UserWarning, match=r"skipped .*a \[copy\]/model.safetensors"):  # one damaged run of many
        assert [r["run"] for r in compare_runs([tmp_path / "runs"], tmp_path / "out")] == ["b/crop"]
    with pytest.raises(ImgclfError, match="model.safetensors"):  # named on its own: its damage is the answer
        compare_runs([tmp_path / "runs" / "a [copy]"], tmp_path / "out")
    config = tmp_path / "runs" / "b" / "crop" / "config.yaml"
    config.write_text(config.read_text().replace("lr: ", "lr: x  # "))  # a hand edit
    with pytest.warns(UserWarning, match=r"skipped recipe .*b/crop/config.yaml: train: option lr is 'x'"):
        with pytest.raises(ImgclfError, match="none of the runs could be read"):
            compare_runs([tmp_path / "runs"], tmp_path / "out")
    for wrong in (5, [5]):
        with pytest.raises(ImgclfError, match="give run folders: a path or a list of paths, not"):
            compare_runs(wrong, tmp_path / "out")
    with pytest.raises(ImgclfError, match="give a run folder .*, not 5"):
        write_report(5)
    with pytest.raises(ImgclfError, match="a recipe is a shipped recipe's name .* not 5"):
        imgclf.train(recipe=5)


def test_a_run_with_nothing_held_out_is_skipped_by_compare_and_reported_on_train(runs, tmp_path, write_shapes,
                                                                                  capsys):
    write_shapes(tmp_path / "f" / "train")  # training images only, and none held out: nothing unseen to score
    imgclf.train(dataset=str(tmp_path / "f"), model="mlp", epochs=1, val_split=0, out=tmp_path / "runs" / "all",
                 data_dir=tmp_path / "cache", quiet=True)
    shutil.copytree(runs[0], tmp_path / "runs" / "mlp")
    fix = "no test images and this run held none out, so no image is left to score it on; train it again with " \
          "--val-split 0.1, or add a test/ folder"
    run = tmp_path / "runs" / "all"
    with pytest.raises(ImgclfError, match=fix):
        write_report(run)
    with pytest.warns(UserWarning, match="skipped .*" + fix):  # the other runs below the folder are still compared
        assert [r["run"] for r in compare_runs([tmp_path / "runs"], tmp_path / "out")] == ["mlp"]
    assert main(["report", str(run), "--split", "train"]) == 0  # as the error for --split val says
    assert "train split" in (run / "report.html").read_text()
    (tmp_path / "f").rename(tmp_path / "moved")
    assert main(["evaluate", str(run)]) == 1
    assert "the image folder this run was trained on, is gone; move it back (evaluate also takes its new place " \
           "as --dataset)" in capsys.readouterr().err
    with pytest.warns(UserWarning, match=r"skipped .*runs/all: .*the image folder this run was trained on, is gone"):
        compare_runs([tmp_path / "runs"], tmp_path / "out")  # which run, when its error does not say
    assert main(["evaluate", str(run), "--dataset", str(tmp_path / "moved"), "--split", "train"]) == 0


def test_not_a_run_is_refused(runs, tmp_path):
    with pytest.raises(ImgclfError, match="not a finished run"):
        write_report(tmp_path)
    with pytest.raises(ImgclfError, match=str(tmp_path / "nope")):
        compare_runs([runs[0], tmp_path / "nope"], tmp_path / "out")


def test_metrics_are_exact_fractions_and_ties_go_to_the_first_class_everywhere():
    from imgclf.evaluate import top_classes

    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [0.0, 0.0, 0.0, 5.0], [2.0, 1.0, 2.0, 0.0]])  # bf16 logits tie
    values, indices = top_classes(logits, 2)
    assert indices.tolist() == [[1, 2], [3, 0], [0, 2]] and values[:, 0].tolist() == [3.0, 5.0, 2.0]
    assert indices[:, 0].tolist() == logits.argmax(1).tolist()  # predict's first class is the one scored
    metrics = classification_metrics(logits, torch.tensor([1, 3, 2]), ["a", "b", "c", "d"])
    assert metrics["accuracy"] == 2 / 3  # as scikit-learn's, not float32's 0.6666666865


def test_most_confused_pairs():
    confusion = [[5, 2, 0], [3, 4, 1], [0, 3, 9]]
    names = ["a", "b", "c"]
    assert most_confused_pairs(confusion, names, k=2) == [("b", "a", 3), ("c", "b", 3)]
    assert most_confused_pairs(np.eye(3, dtype=int) * 4, names) == []


def test_plot_examples_rgb_and_empty(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 3, 16, 16), dtype=np.uint8)
    plot_examples(images, [0, 1, 0, 1, 1], [0, 0, 0, 1, 1], [0.9, 0.6, 0.8, 0.99, 0.5], ["cat", "dog"],
                  tmp_path / "rgb.png", "RGB")
    assert_png(tmp_path / "rgb.png", min_side=100)
    plot_examples(images[:0], [], [], [], ["cat", "dog"], tmp_path / "empty.png", "None wrong")
    assert (tmp_path / "empty.png").exists()


def test_cli(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["report", str(runs[1]), "--split", "val"]) == 0
    assert "report.html" in capsys.readouterr().out
    assert "val split" in (runs[1] / "report.html").read_text()
    assert main(["compare", str(runs[0]), str(runs[1]), "--device", "cpu"]) == 0
    assert "mlp" in capsys.readouterr().out and (tmp_path / "compare" / "compare.html").exists()
    with pytest.raises(SystemExit, match="2"):  # a usage error: not one of the choices
        main(["report", str(runs[1]), "--device", "tpu"])
    assert "invalid choice: 'tpu'" in capsys.readouterr().err
    with pytest.raises(ImgclfError, match="unknown device 'tpu'"):  # the API names it as load_model does
        compare_runs([runs[0]], tmp_path / "out", device="tpu")
    assert main(["datasets", "show", "digits"]) == 0
    assert "10 classes" in capsys.readouterr().out
    assert_png(tmp_path / "dataset-digits" / "samples.png")
    assert_png(tmp_path / "dataset-digits" / "distribution.png")
    assert main(["datasets", "digits"]) == 0  # the plain summary still works
    assert main(["datasets", "show"]) == 2  # a usage error
    assert main(["report", str(tmp_path)]) == 1
    assert "not a finished run" in capsys.readouterr().err


def test_train_report_flag_and_live_curves(tmp_path):
    from imgclf.cli import main

    out = tmp_path / "run"
    assert main(["train", "--dataset", "digits", "--model", "mlp", "--epochs", "1", "--out", str(out), "--report"]) == 0
    assert (out / "figures" / "curves.png").stat().st_size > 1000
    assert (out / "report.html").exists()
    assert oct((out / "report.html").stat().st_mode & 0o777) != oct(0o600)  # readable by a web server


def test_top_losses_are_mistakes_by_loss():
    logits = torch.tensor([[4.0, 0.0], [0.0, 4.0], [1.0, 0.0], [3.0, 0.0], [0.0, 0.5]])
    labels = torch.tensor([0, 0, 1, 1, 1])  # right, wrong (loss 4), wrong (1.3), wrong (3.0), right
    grids = example_grids(logits, labels)
    assert grids["top_losses"][1].tolist() == [1, 3, 2]  # only the mistakes, highest loss first
    assert sorted(grids["correct"][1].tolist()) == [0, 4]
    assert example_grids(logits[[0, 4]], labels[[0, 4]])["top_losses"][1].tolist() == []  # no mistakes: none


def test_a_class_the_split_lacks_has_no_f1_and_stays_out_of_the_mean(tmp_path):
    logits = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0], [5.0, 0, 0]])
    metrics = classification_metrics(logits, torch.tensor([0, 1, 1, 0]), ["a", "b", "c"])
    assert metrics["per_class"]["c"] == {"precision": 0.0, "recall": None, "f1": None, "support": 0}
    assert metrics["per_class"]["a"]["f1"] == 1.0
    assert_png(plot_per_class(metrics["per_class"], tmp_path / "f1.png"), min_side=100)


def test_early_stopping_marks_the_epoch_it_kept(tmp_path, monkeypatch):
    train_module = importlib.import_module("imgclf.train")
    scores = iter([0.9, 0.5, 0.4, 0.3])  # epoch 1 is the best: the run stops after epoch 2

    def validate(*args):
        return {"val_loss": 1.0, "val_acc": next(scores)}

    monkeypatch.setattr(train_module, "validate", validate)
    run = imgclf.train(dataset="digits", model="mlp", epochs=4, early_stopping=1, out=tmp_path / "run", quiet=True)
    assert run.summary["epochs_run"] == 2 and run.summary["kept_epoch"] == 1
    monkeypatch.undo()
    assert "2 (early stopping kept the weights of epoch 1, the best val accuracy)" in write_report(
        run.run_dir).read_text()
    plain = imgclf.train(dataset="digits", model="mlp", epochs=1, out=tmp_path / "plain", quiet=True)
    assert plain.summary["kept_epoch"] == 1


def test_compare_bars_of_mixed_splits_and_long_names(tmp_path):
    rows = [{"run": f"a-rather-long-run-folder-name-{i}", "model": "cnn", "dataset": dataset, "split": split,
             "accuracy": accuracy, "minutes": 0.5 + i} for i, (dataset, split, accuracy) in enumerate(
                 [("digits", "test", 0.9), ("/data/my_folder", "val", 1.0), ("digits", "test", 0.8)])]
    assert_png(plot_accuracy_bars(rows, tmp_path / "bars.png"))
    assert_png(plot_accuracy_vs_time(rows, tmp_path / "time.png"))
