"""The command line, as a user runs it: exit codes, one-line errors, JSON outputs."""

import importlib
import io
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import imgclf
from imgclf.cli import main
from imgclf.data import load_dataset
from imgclf.errors import one_line_warning, unexpected


def run_cli(*args, cwd=None):
    """Run `python -m imgclf` in a fresh process, as a user would."""
    return subprocess.run([sys.executable, "-m", "imgclf", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "digits-cnn"
    assert main(["train", "--dataset", "digits", "--model", "cnn", "--epochs", "5", "--batch-size", "64",
                 "--lr", "0.003", "--out", str(out)]) == 0
    return out


def test_train_evaluate_json(digits_run, capsys):
    assert main(["evaluate", str(digits_run), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert 0.85 < metrics["accuracy"] <= 1
    assert metrics["split"] == "test" and metrics["num_images"] == 360
    assert len(metrics["confusion_matrix"]) == 10 and len(metrics["per_class"]) == 10
    assert metrics["top5_accuracy"] >= metrics["accuracy"] and metrics["loss"] > 0


def test_evaluate_table_and_tta(digits_run, capsys):
    assert main(["evaluate", str(digits_run), "--split", "val", "--tta"]) == 0
    assert "accuracy" in capsys.readouterr().out


def test_predict_names_the_digit(digits_run, tmp_path, capsys):
    test = load_dataset("digits").test
    paths = []
    for i in range(5):
        path = tmp_path / f"digit{i}.png"
        Image.fromarray(test.images[i, 0].numpy()).resize((40, 40)).convert("RGB").save(path)
        paths.append(str(path))
    assert main(["predict", str(digits_run), *paths, "--json", "--top-k", "2"]) == 0
    results = json.loads(capsys.readouterr().out)
    predicted = [r["top"][0]["label"] for r in results]
    truth = [str(int(label)) for label in test.labels[:5]]
    assert sum(p == t for p, t in zip(predicted, truth, strict=True)) >= 4
    assert all(len(r["top"]) == 2 for r in results)


def test_predict_a_folder_predicts_each_image_below_it(digits_run, tmp_path, capsys):
    test = load_dataset("digits").test
    (tmp_path / "imgs" / "more").mkdir(parents=True)
    for i, name in enumerate(["b.png", "a.JPG", "more/c.bmp"]):
        Image.fromarray(test.images[i, 0].numpy()).convert("RGB").save(tmp_path / "imgs" / name)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    (tmp_path / "imgs" / "corrupt.png").write_bytes(b"\x89PNG not really")  # skipped, as training skips it
    whole = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(whole, "JPEG")
    (tmp_path / "imgs" / "cut.jpg").write_bytes(whole.getvalue()[:300])  # its header reads, its pixels do not
    Image.fromarray(np.zeros((8, 8), np.float32)).save(tmp_path / "imgs" / "float.tif")  # 32-bit pixels
    os.mkfifo(tmp_path / "imgs" / "pipe.png")  # opening it would wait for a writer: left out
    (tmp_path / "empty").mkdir()
    one = tmp_path / "one.png"
    Image.fromarray(test.images[3, 0].numpy()).save(one)
    assert main(["predict", str(digits_run), str(tmp_path / "imgs"), str(one), "--json"]) == 0
    out, err = capsys.readouterr()
    # one warning for every file of the folder that does not decode, whatever the reason
    assert err.count("skipped") == 1 and "skipped 3 unreadable image file(s), e.g. " in err
    assert "corrupt.png" in err and "float.tif" in err and "cut.jpg" in err
    names = [r["image"] for r in json.loads(out)]
    assert names == [str(tmp_path / "imgs" / n) for n in ("a.JPG", "b.png", "more/c.bmp")] + [str(one)]
    with pytest.warns(UserWarning, match="skipped 3 unreadable"):
        assert len(imgclf.predict(digits_run, tmp_path / "imgs")) == 3
    assert len(imgclf.predict(digits_run, str(one))) == 1
    assert main(["predict", str(digits_run), str(tmp_path / "empty")]) == 1
    assert "holds no readable image files" in capsys.readouterr().err
    assert main(["predict", str(digits_run), str(tmp_path / "imgs" / "cut.jpg")]) == 1  # named: must read
    assert "cut.jpg is not an image that can be read" in capsys.readouterr().err
    digits = load_dataset("digits").test.images
    for call, message in ((lambda: imgclf.predict(digits_run, []), "no images given"),
                          (lambda: imgclf.predict(digits_run, digits, tta="false"), "tta is True, False or None"),
                          (lambda: imgclf.predict(digits_run, digits, tta_margin="0.5"), "TTA margin '0.5'"),
                          (lambda: imgclf.predict(digits_run, digits, tta_margin=True), "TTA margin True"),
                          (lambda: imgclf.predict(5, digits), "give a run folder .* not 5")):
        with pytest.raises(imgclf.ImgclfError, match=message):
            call()
    assert imgclf.predict(digits_run, digits[:0]) == []


def test_set_reaches_any_setting_and_model_option(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--dataset", "digits", "--model", "cnn", "--epochs", "1", "--optimizer", "sgd",
                 "--set", "momentum=0.8", "--set", "model.filters=[8, 16]", "--set", "train.crop_padding=1",
                 "--out", str(out)]) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["model"]["filters"] == [8, 16] and config["train"]["momentum"] == 0.8
    assert config["train"]["crop_padding"] == 1
    for args, message in ((["--set", "lr"], "is not KEY=VALUE"), (["--set", "lr=[1"], "not valid YAML"),
                          (["--set", "lrr=1"], "(did you mean 'lr'?)"), (["--lr", "1", "--set", "lr=2"], "both"),
                          (["--model", "cnn", "--set", "model.filtrs=[8]"], "(did you mean 'filters'?)"),
                          (["--set", "out=elsewhere"], "unknown option 'out'"),
                          (["--set", "quiet=true"], "unknown option 'quiet'"),
                          (["--set", "model_options=1"], "unknown option 'model_options'"),
                          (["--set", "step_gamma=-1"], "invalid step_gamma -1.0"),
                          (["--image-size", "100000"], "use 1 to 1024 pixels"),
                          (["--augment", "crop", "--set", "crop_padding=8"], "crop_padding 8 is not smaller than")):
        assert main(["train", "--dataset", "digits", "--out", str(tmp_path / "no"), *args]) == 1 + (message == "both")
        assert message in capsys.readouterr().err
    assert not (tmp_path / "no").exists()


def test_summary_model_replaces_the_recipe_model_and_uses_its_image_size(tmp_path, capsys):
    recipe = tmp_path / "small.yaml"
    recipe.write_text("data: {dataset: mnist, image_size: 14}\nmodel: {name: cnn, filters: [8]}\n")
    assert main(["summary", "--recipe", str(recipe), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["input_shape"] == [1, 14, 14]
    assert main(["summary", "--recipe", "mnist-fast", "--model", "mlp", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "mlp"
    assert main(["summary", "--model", "cnn", "--set", "model.filters=[4]", "--set", "grayscale=true", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["input_shape"] == [1, 32, 32] and shown["layers"][0]["output_shape"][0] == 4
    assert main(["summary", "--model", "mlp", "--set", "dataset=fashion-mnist", "--json"]) == 0  # as --dataset
    assert json.loads(capsys.readouterr().out)["input_shape"] == [1, 28, 28]
    assert main(["summary", "--model", "mlp", "--dataset", "mnist", "--set", "dataset=fashion-mnist"]) == 2
    assert "dataset given both as a flag and in --set; give each setting once" in capsys.readouterr().err
    for size in ("0", "5000"):  # as train checks it (0 was ignored, 5000 an internal error)
        assert main(["summary", "--model", "mlp", "--image-size", size]) == 1
        assert f"invalid image size {size}; use 1 to 1024" in capsys.readouterr().err


def test_summary_json_of_a_reference_recipe(capsys):
    assert main(["summary", "--recipe", "ref-mnist-cnn", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["trainable_params"] == 128_266 and summary["total_params"] == 128_266


@pytest.mark.parametrize("command", [["models"], ["recipes"], ["datasets"], ["datasets", "digits"],
                                     ["summary", "--model", "resnet18"]])
def test_listing_commands(command, capsys):
    assert main(command) == 0
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("args, message", [
    (["train", "--dataset", "nosuchdata", "--model", "mlp"], "nosuchdata"),
    (["train", "--dataset", "digits", "--model", "nosuchmodel"], "unknown model"),
    (["train", "--recipe", "nosuchrecipe"], "unknown recipe"),
    (["train", "--dataset", "digits", "--augment", "rotate"], "invalid augment 'rotate'; choose from crop"),
    (["train", "--dataset", "digits", "--val-split", "1.5"], "val split"),
    (["train", "--resume"], "--out"),
    (["train", "--resume", "--out", "run", "--epochs", "5", "--lr", "0.1"],
     "--resume continues the run with its own settings, so --epochs, --lr would be ignored"),
    (["train", "--dataset", "digits", "--threads", "0"], "invalid threads 0"),
    (["train", "--dataset", "digits", "--warmup-epochs", "inf"], "option warmup_epochs is inf, which is not a finite"),
    (["evaluate", "."], "holds no trained model"),
    (["evaluate", "no/such/run"], "not a run folder"),
    (["datasets", "show"], "needs a dataset"),
    (["datasets", "--out", "x"], "to draw it: imgclf datasets show NAME"),
    (["datasets", "--val-split", "0.2"], "--val-split and --image-size describe one dataset"),
    (["evaluate", "run", "--tta", "--no-tta"], "--tta and --no-tta contradict each other; give one"),
    (["predict", "run", "x.png", "--no-tta", "--tta"], "--tta and --no-tta contradict each other; give one"),
    (["datasets", "--image-size", "8"], "--val-split and --image-size describe one dataset"),
    (["datasets", "show", "digits", "--out", "/proc/nope"], "/proc/nope: No such file or directory; check the path"),
])
def test_bad_input_gets_one_line_and_status_1_or_2_for_options_that_do_not_go_together(args, message, tmp_path):
    result = run_cli(*args, cwd=tmp_path)
    usage = args[1] == "--resume" or args in (["datasets", "show"], ["datasets", "--out", "x"],
                                              ["datasets", "--val-split", "0.2"], ["datasets", "--image-size", "8"],
                                              ["evaluate", "run", "--tta", "--no-tta"],
                                              ["predict", "run", "x.png", "--no-tta", "--tta"])
    assert result.returncode == (2 if usage else 1), result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr


def test_predict_refuses_a_non_image(digits_run, tmp_path):
    junk = tmp_path / "notes.png"
    junk.write_text("this is not an image")
    result = run_cli("predict", digits_run, junk)
    assert result.returncode == 1 and "not an image" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_predict_writes_names_a_terminal_cannot_show(digits_run, tmp_path):
    Image.new("L", (8, 8)).save(tmp_path / "zoë.png")
    result = subprocess.run([sys.executable, "-m", "imgclf", "predict", str(digits_run), str(tmp_path / "zoë.png")],
                            capture_output=True, env=os.environ | {"PYTHONIOENCODING": "ascii"}, timeout=300)
    assert result.returncode == 0 and b"zo\\xeb.png" in result.stdout and not result.stderr


def test_a_tta_margin_outside_0_to_1_is_refused(digits_run, tmp_path):
    Image.new("L", (8, 8)).save(tmp_path / "x.png")
    for command in (["evaluate", digits_run], ["predict", digits_run, tmp_path / "x.png"]):
        result = run_cli(*command, "--tta", "--tta-margin", "1.5")
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1 and "TTA margin 1.5: use a probability in (0, 1]" in lines[0]


def test_corrupt_weights_are_refused_and_nothing_is_written(digits_run, tmp_path):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(digits_run, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    result = run_cli("evaluate", broken)
    assert result.returncode == 1 and "model.safetensors" in result.stderr
    assert (broken / "model.safetensors").read_bytes() == b"\x00" * 64


def test_usage_errors_exit_2(tmp_path):
    assert run_cli("train", "--optimizer", "nosuch", cwd=tmp_path).returncode == 2
    assert run_cli("nosuchcommand", cwd=tmp_path).returncode == 2


@pytest.mark.parametrize("args, message", [
    (["models", "cnn"], "imgclf models: error: unrecognized arguments: cnn"),  # the command's usage, not imgclf's
    (["train", "--dataset", "digits", "--out", ""], "imgclf train: error: argument --out: empty; give a path"),
    (["compare", "run", "--out", " "], "argument --out: empty"),
    (["predict", "no/such/run", ""], "argument images: empty; give a path (an unset shell variable?)"),
    (["compare", "", "--out", "x"], "argument runs: empty; give a path (an unset shell variable?)"),
    (["train", "--epochs", "1.5"], "imgclf train: error: argument --epochs: invalid int value: '1.5' (see imgclf "
                                   "train --help)"),
    (["tune", "--sampler", "bayes"], "--sampler: invalid choice: 'bayes' (choose from 'random', 'grid', 'tpe')"),
    (["tune", "--pruner", "asha"], "argument --pruner: invalid choice: 'asha'"),
])
def test_stray_and_empty_arguments_are_usage_errors_of_their_command(args, message, capsys):
    with pytest.raises(SystemExit) as exited:
        main(args)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and message in err and len(err.strip().splitlines()) == 1  # no usage block


def test_train_goes_on_quietly_when_its_output_pipe_closes(tmp_path):
    out = tmp_path / "run"
    job = subprocess.Popen([sys.executable, "-m", "imgclf", "train", "--dataset", "digits", "--model", "mlp",
                            "--epochs", "3", "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           cwd=tmp_path)
    job.stdout.readline()  # as `| head -1` does: read one line, then stop reading
    job.stdout.close()
    assert job.wait(timeout=300) == 0, job.stderr.read()
    assert (out / "summary.json").exists() and not job.stderr.read()


def test_flags_that_change_nothing_are_said(tmp_path, capsys):
    for split in ("train", "val"):
        for label in "ab":
            (tmp_path / "f" / split / label).mkdir(parents=True)
            for i in range(4):
                Image.new("L", (8, 8), 60 * i + (100 if label == "b" else 0)).save(tmp_path / "f" / split / label
                                                                                   / f"{i}.png")
    assert main(["train", "--dataset", str(tmp_path / "f"), "--model", "mlp", "--epochs", "1", "--val-split", "0.3",
                 "--threads", "999", "--out", str(tmp_path / "run"), "--data-dir", str(tmp_path / "cache")]) == 0
    err = capsys.readouterr().err
    assert "has its own val/ folder, which is the validation split: --val-split is ignored" in err
    (tmp_path / "f" / "val").rename(tmp_path / "f" / "Valid")  # any of its names, and in `datasets` too
    assert main(["datasets", str(tmp_path / "f"), "--val-split", "0.3", "--data-dir", str(tmp_path / "cache")]) == 0
    assert "has its own Valid/ folder, which is the validation split" in capsys.readouterr().err
    assert "--threads 999 is more than the " in err and "; using " in err
    assert torch.get_num_threads() <= os.cpu_count()  # not 999 for the rest of this process


def test_image_folder_end_to_end(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("test", 10)):
        for label, colour in (("red", (220, 20, 20)), ("blue", (20, 20, 220))):
            folder = tmp_path / "shapes" / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(np.array(colour) + rng.normal(0, 30, (12, 12, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    out = tmp_path / "run"
    assert main(["train", "--dataset", str(tmp_path / "shapes"), "--model", "mlp", "--epochs", "5",
                 "--lr", "0.01", "--out", str(out), "--data-dir", str(tmp_path / "cache")]) == 0
    said = capsys.readouterr()
    assert "54 train / 6 val / 20 test images" in said.out + said.err  # the start line counts every split
    assert main(["evaluate", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] >= 0.9
    assert main(["evaluate", str(out), "--split", "val"]) == 0
    Image.new("RGB", (12, 12), "red").save(tmp_path / "shapes" / "train" / "red" / "new.png")
    capsys.readouterr()
    assert main(["evaluate", str(out), "--split", "val"]) == 1  # a new image moves others into the val split
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not the one this run held out" in err[0], err
    for args in (["datasets", "show", str(tmp_path / "shapes"), "--out", str(tmp_path / "shapes" / "pictures")],
                 ["train", "--dataset", str(tmp_path / "shapes"), "--out", str(tmp_path / "shapes" / "run")],
                 ["compare", str(out), "--out", str(tmp_path / "shapes" / "train" / "cmp")],
                 ["export", str(out), "--out", str(tmp_path / "shapes" / "onnx" / "m.onnx")],
                 ["datasets", str(tmp_path / "shapes"), "--data-dir", str(tmp_path / "shapes")]):
        assert main(args) == 1  # what they write would be read as a class of images
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "inside the dataset folder" in err[0], err
    assert not (tmp_path / "shapes" / "train" / "cmp").exists() and not (tmp_path / "shapes" / "onnx").exists()
    assert main(["datasets", str(tmp_path / "shapes"), "--data-dir", str(tmp_path / "shapes" / ".cache")]) == 0


def test_evaluate_on_another_dataset_with_matching_class_names(digits_run, tmp_path, capsys):
    test = load_dataset("digits").test
    for i in range(100):  # the digits test images as a user's folder: test/<class>/<n>.png
        folder = tmp_path / "mydigits" / "test" / str(int(test.labels[i]))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(test.images[i, 0].numpy()).save(folder / f"{i}.png")
    assert main(["evaluate", str(digits_run), "--dataset", str(tmp_path / "mydigits"), "--json",
                 "--data-dir", str(tmp_path / "cache")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["num_images"] == 100 and metrics["accuracy"] > 0.8
    # Class folders only (no test/): every image is scored, not the fifth a training run would hold out.
    (tmp_path / "mydigits" / "test").rename(tmp_path / "flat")
    assert main(["evaluate", str(digits_run), "--dataset", str(tmp_path / "flat"), "--json",
                 "--data-dir", str(tmp_path / "cache")]) == 0
    assert json.loads(capsys.readouterr().out)["num_images"] == 100


def test_naming_the_runs_own_dataset_keeps_its_validation_split(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--dataset", "digits", "--model", "mlp", "--epochs", "1", "--val-split", "0.2",
                 "--seed", "3", "--out", str(out)]) == 0
    capsys.readouterr()
    for named in ([], ["--dataset", "digits"]):
        assert main(["evaluate", str(out), "--split", "val", "--json", *named]) == 0
        assert json.loads(capsys.readouterr().out)["num_images"] == 288  # 20% of digits' 1,437 training images


@pytest.mark.parametrize("args, message", [
    (["train", "--dataset", "digits", "--seed", "-5"], "invalid seed -5"),
    (["train", "--dataset", "digits", "--out", "notes.txt"], "is a file, not a folder"),
    (["compare", "no/such/run", "--out", "notes.txt"], "is a file, not a folder"),
    (["datasets", "show", "digits", "--out", "notes.txt"], "is a file, not a folder"),
    (["export", "no/such/run"], "not a run folder"),
    (["serve", "no/such/run"], "not a run folder"),
    (["predict", "no/such/run", "x.png", "--top-k", "0"], "top-k 0: ask for 1 or more"),
    (["train", "--dataset", "digits", "--augment", "cutout", "--set", "cutout_size=8"], "cutout_size 8 is not smaller"),
    (["train", "--dataset", "digits", "--set", "lr="], "setting 'lr=' has no value; give one, or lr=null"),
    (["train", "--dataset", "digits", "--set", "data.lr=1"], "lr is train.lr, not data.lr; write train.lr=1 or lr=1"),
    (["train", "--dataset", "digits", "--set", "train.data.epochs=1"], "epochs is train.epochs, not train.data"),
])
def test_bad_input_in_process(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_summary_refuses_a_one_class_folder_as_train_does(tmp_path, capsys):
    (tmp_path / "one" / "a").mkdir(parents=True)
    for i in range(3):
        Image.new("L", (8, 8), 60 * i).save(tmp_path / "one" / "a" / f"{i}.png")
    assert main(["summary", "--model", "mlp", "--dataset", str(tmp_path / "one"),
                 "--data-dir", str(tmp_path / "cache")]) == 1
    assert (tmp_path / "cache").is_dir()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has 1 class; a classifier needs 2 or more" in err[0], err


def test_warnings_are_one_line(tmp_path, capsys):
    for i in range(6):
        (tmp_path / "f" / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8), 40 * i).save(tmp_path / "f" / "ab"[i % 2] / f"{i}.png")
    (tmp_path / "f" / "a" / "notes.png").write_text("not an image")
    assert main(["datasets", str(tmp_path / "f"), "--data-dir", str(tmp_path / "cache")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("imgclf: warning: ") and "skipped 1 file(s) that are not" in err[0]


@pytest.mark.parametrize("edit, message", [
    ({"mean": [0.1, 0.2]}, "(ValueError: mean and std are not 1 finite numbers each, std above 0)"),
    ({"std": [0.0]}, "mean and std are not 1 finite numbers each, std above 0"),
    ({"mean": ["a"]}, "mean and std are not 1 finite numbers each"),
    ({"input_shape": [3, 8, 8]}, "class names or input shape do not match the architecture"),
    ({"split": {"seed": 0, "shuffle": True}}, "split is not a mapping of val_split, grayscale, seed"),
    ({"weights": "nan"}, "holds weights that are not finite (training diverged); train into another --out (or delete"),
])
def test_a_hand_edited_or_diverged_model_is_a_one_line_error(digits_run, tmp_path, capsys, edit, message):
    import shutil

    import safetensors.torch
    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    edit = dict(edit)  # the parametrized dict stays as it was for a rerun
    if edit.pop("weights", None):
        state = safetensors.torch.load_file(run / "model.safetensors")
        next(iter(state.values())).fill_(float("nan"))
        safetensors.torch.save_file(state, run / "model.safetensors")
    (run / "model.json").write_text(json.dumps({**json.loads((run / "model.json").read_text()), **edit}))
    Image.new("L", (8, 8)).save(tmp_path / "x.png")
    for args in (["predict", str(run), str(tmp_path / "x.png")], ["evaluate", str(run)], ["export", str(run)]):
        assert main(args) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0]


@pytest.mark.parametrize("name, content, command, message", [
    ("model.json", "[1, 2]", "predict", "model.json is not an imgclf model description"),
    ("model.json", '{"format": "imgclf-model", "architecture": "cnn"}', "predict", "not an imgclf model description"),
    ("summary.json", "{broken", "compare", "summary.json is damaged"),
    ("summary.json", '{"seconds": "12"}', "compare", "summary.json is damaged (seconds is '12', not a number)"),
    ("summary.json", '{"trainable_params": "many"}', "report", "damaged (trainable_params is 'many', not a number)"),
    ("metrics.csv", "epoch,val_acc\n1,0.5,extra\n", "report", "metrics.csv is damaged"),
    ("metrics.csv", "a,b\n1,2\n", "report", "metrics.csv is damaged"),
    ("metrics.csv", "epoch,val_acc\n1\n", "report", "metrics.csv is damaged"),
    ("config.yaml", "[unclosed", "compare", "config.yaml is damaged"),
    ("summary.json", None, "report", "has not finished; continue it with"),
])
def test_a_damaged_run_file_is_a_one_line_error(digits_run, tmp_path, capsys, name, content, command, message):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    if content is None:
        (run / name).unlink()
    else:
        (run / name).write_text(content)
    image = tmp_path / "x.png"
    Image.new("L", (8, 8)).save(image)
    args = {"predict": ["predict", str(run), str(image)], "report": ["report", str(run)],
            "compare": ["compare", str(run), "--out", str(tmp_path / "cmp")]}[command]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_evaluate_and_predict_warn_of_an_unfinished_run(digits_run, tmp_path, capsys):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    (run / "summary.json").unlink()  # as a run stopped after an epoch leaves it
    image = tmp_path / "x.png"
    Image.new("L", (8, 8)).save(image)
    for args in (["evaluate", str(run)], ["predict", str(run), str(image)]):
        assert main(args) == 0
        assert "has not finished training: this is the model of its last finished epoch" in capsys.readouterr().err


def test_tta_of_a_run_without_crops_or_flips_is_not_claimed(tmp_path, capsys):
    out = tmp_path / "plain"
    assert main(["train", "--dataset", "digits", "--model", "mlp", "--epochs", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out), "--tta"]) == 0
    printed = capsys.readouterr()
    assert "TTA has no views to average" in printed.err and "with TTA" not in printed.out
    image = tmp_path / "x.png"
    Image.new("L", (8, 8)).save(image)
    for args in (["predict", str(out), str(image), "--tta"], ["export", str(out), "--tta"]):
        assert main(args) == 0
        assert capsys.readouterr().err.count("TTA has no views to average") == 1
    assert main(["train", "--dataset", "digits", "--model", "mlp", "--epochs", "1", "--out", str(out), "--report"]) == 0
    assert "reusing its model" in capsys.readouterr().out and (out / "report.html").exists()


def test_tta_can_be_turned_on_and_off(tmp_path, capsys):
    run = tmp_path / "flipped"
    assert main(["train", "--dataset", "digits", "--model", "mlp", "--epochs", "1", "--augment", "flip",
                 "--out", str(run)]) == 0
    capsys.readouterr()
    for flag, expected in (("--tta", True), ("--no-tta", False)):
        assert main(["evaluate", str(run), flag, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["tta"] is expected


def test_every_api_name_is_a_function_even_after_its_module_is_imported():
    importlib.import_module("imgclf.tune")
    importlib.import_module("imgclf.report")
    for name in imgclf.__all__:
        if name != "__version__":
            assert callable(getattr(imgclf, name)) and not isinstance(getattr(imgclf, name), types.ModuleType), name
    assert imgclf.tune.__module__ == "imgclf.tune" and imgclf.compare_runs.__module__ == "imgclf.report"


@pytest.mark.parametrize("rank, said", [("0", "imgclf: interrupted\n"), ("1", "")])
def test_ctrl_c_is_said_once_across_ranks(monkeypatch, capsys, rank, said):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr(importlib.import_module("imgclf.train"), "train", interrupted)
    assert main(["train", "--dataset", "digits", "--model", "mlp"]) == 130
    assert capsys.readouterr().err == said


def test_a_line_break_in_a_name_stays_inside_one_line(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "no\nrun")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no\\nrun" in err
    with pytest.raises(SystemExit):  # argparse's own errors
        main(["evaluate", "run", "extra\narg"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "extra\\narg" in err
    one_line_warning("skipped a\nb.png", UserWarning, "x.py", 1)
    assert capsys.readouterr().err == "imgclf: warning: skipped a\\nb.png\n"
    assert unexpected(ValueError("two\nlines")).count("\n") == 0
