"""Tuning: samplers, pruners, grids shared by workers, resuming, failures, outputs, and a study in PostgreSQL.

Everything runs on scikit-learn's 8x8 digits (offline, a second per trial), in small spaces written here.
"""

import csv
import glob
import importlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState
from PIL import Image

from imgclf.cli import main
from imgclf.config import RunConfig
from imgclf.errors import ImgclfError
from imgclf.models import count_params, create_model
from imgclf.report import write_report
from imgclf.spaces import grid_points, list_spaces, load_space, suggest, trial_config
from imgclf.tune import open_storage, tune, worker_gpus

TINY_BASE = {"model": {"name": "cnn", "filters": [8], "dense": [16]}, "train": {"epochs": 1, "batch_size": 64}}


def write_space(tmp_path, params, base=None, name="space"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"base": base or TINY_BASE, "params": params}, sort_keys=False))
    return str(path)


def load(out, study=None):
    return optuna.load_study(study_name=study or "digits-space", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(Path(out) / "study.log"))))


def states(study):
    return [t.state for t in study.get_trials(deepcopy=False)]


def cli(*args):
    """`imgclf ...` in its own process, as a user (or another machine) runs it."""
    return subprocess.Popen([sys.executable, "-m", "imgclf", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


# ---- spaces ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [n for n, _ in list_spaces()])
def test_shipped_spaces_sample_valid_models(name):
    space = load_space(name)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    base = RunConfig.from_dict(space.base)
    for _ in range(5):
        values = suggest(study.ask(), space)
        config = trial_config(base, space, values)
        net = create_model(config.model.name, num_classes=10, in_channels=1, image_size=28, **config.model.options)
        assert count_params(net)[0] > 0
    assert space.description


def test_per_layer_parameters_follow_the_sampled_layer_count():
    space = load_space("cnn-keras")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(10):
        trial = study.ask()
        values = suggest(trial, space)
        conv, dense = values["conv_layers"], values["dense_layers"]
        assert len(values["model.filters"]) == len(values["model.dropout"]) == len(values["model.pool"]) == conv + 1
        assert values["model.pool"] == [2] + [0] * conv and values["model.dropout"][0] == 0.0
        assert len(values["model.dense"]) == len(values["model.dense_dropout"]) == dense
        assert f"model.filters[{conv}]" in trial.params and f"model.filters[{conv + 1}]" not in trial.params


def test_hparams_grid_is_the_full_grid_and_l1l2_sets_both_penalties():
    space = load_space("hparams-grid")
    points = grid_points(space)
    assert len(points) == 3 * 2 * 2 * 3 * 2 * 2
    values = suggest(optuna.trial.FixedTrial(points[-1]), space)
    config = trial_config(RunConfig.from_dict(space.base), space, values)
    assert config.train.l1 == config.train.weight_decay == 0.01
    assert config.model.options["filters"] == [64] and config.model.options["pool"] == 4


def test_a_space_can_start_from_a_recipe_by_name_path_or_under_its_own_options(tmp_path):
    params = {"train.lr": {"type": "float", "low": 0.1, "high": 1.0}}
    (tmp_path / "mine.yaml").write_text("base: mnist-fast\ntrain: {epochs: 2}\n")
    by_name = RunConfig.from_dict(load_space(write_space(tmp_path, params, base="mnist-fast", name="a")).base)
    by_path = RunConfig.from_dict(load_space(write_space(tmp_path, params, base="mine.yaml", name="b")).base)
    under = RunConfig.from_dict(load_space(write_space(tmp_path, params, name="c", base={
        "base": "mnist-fast", "train": {"batch_size": 128}})).base)
    assert by_name.model.name == by_path.model.name == under.model.name == "fastnet"
    assert (by_name.train.epochs, by_path.train.epochs, under.train.epochs) == (5, 2, 5)
    assert (by_name.train.batch_size, under.train.batch_size) == (256, 128)
    with pytest.raises(ImgclfError, match="base must be a recipe name or path, or a mapping"):
        load_space(write_space(tmp_path, params, base=[1, 2], name="d"))
    with pytest.raises(ImgclfError, match="unknown recipe 'nosuchrecipe'"):
        load_space(write_space(tmp_path, params, base="nosuchrecipe", name="e"))
    with pytest.raises(ImgclfError, match="pass --val-split 0.1 or give the space's base"):  # fast recipes: none
        tune("digits", write_space(tmp_path, params, base="mnist-fast", name="f"), trials=1, out=tmp_path / "t")
    with pytest.raises(ImgclfError, match="val split 1.5 must be a fraction"):
        tune("digits", write_space(tmp_path, params, base="mnist-fast", name="f"), val_split=1.5, out=tmp_path / "t")


# ---- studies ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler, pruner", [("random", "none"), ("tpe", "hyperband")])
def test_each_sampler_runs_the_shipped_quick_space(sampler, pruner, tmp_path):
    result = tune("digits", "cnn-small", sampler=sampler, pruner=pruner, trials=2, epochs=1, out=tmp_path, quiet=True)
    assert result.counts["COMPLETE"] + result.counts["PRUNED"] == 2 and result.counts["FAIL"] == 0
    assert 0.3 < result.best_value <= 1


def test_the_readme_space_example_runs(tmp_path):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    space = tmp_path / "space.yaml"
    space.write_text(readme.split("The format:\n\n```yaml\n")[1].split("```")[0])
    result = tune("digits", space, sampler="random", pruner="none", trials=3, epochs=1, out=tmp_path / "t",
                  quiet=True)
    assert result.counts["COMPLETE"] == 3 and result.counts["FAIL"] == 0


def test_set_fixes_a_setting_of_every_trial_and_of_the_best_recipe(tmp_path, capsys):
    space = write_space(tmp_path, {"train.lr": {"type": "float", "low": 0.001, "high": 0.01}})
    out = tmp_path / "t"
    assert main(["tune", "--dataset", "digits", "--space", space, "--sampler", "random", "--trials", "1",
                 "--set", "label_smoothing=0.1", "--set", "model.dense=[8]", "--out", str(out)]) == 0
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["train"]["label_smoothing"] == 0.1 and best["model"]["dense"] == [8]
    capsys.readouterr()
    assert main(["tune", "--dataset", "digits", "--space", space, "--trials", "1", "--out", str(out)]) == 1
    assert ("was run with other settings (base.model.dense [8] there, [16] here; base.train.label_smoothing 0.1 "
            "there, 0.0 here)") in capsys.readouterr().err


def test_grid_covers_each_point_exactly_once_with_two_workers(tmp_path, monkeypatch):
    space = write_space(tmp_path, {"model.filters": [{"type": "categorical", "choices": [4, 8]}],
                                   "train.lr": {"type": "categorical", "choices": [0.001, 0.003, 0.01]}})
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)  # one CPU: 2 workers share it
    with pytest.warns(UserWarning, match="--workers 2 is more than this machine's 1 CPUs"):
        result = tune("digits", space, sampler="grid", pruner="none", workers=2, out=tmp_path / "out", quiet=True)
    trials = load(tmp_path / "out").get_trials(deepcopy=False)
    assert result.counts["COMPLETE"] == 6 and len(trials) == 6
    seen = sorted((t.params["model.filters[0]"], t.params["train.lr"]) for t in trials)
    assert seen == sorted((f, lr) for f in (4, 8) for lr in (0.001, 0.003, 0.01))
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both workers took grid points


def test_median_pruner_stops_a_clearly_worse_trial(tmp_path):
    # A grid runs in order: 5 good trials (the pruner's startup trials), then 5 with an lr too small to learn.
    space = write_space(tmp_path, {"train.lr": {"type": "categorical", "choices": [0.01, 1e-7]},
                                   "model.dense": [{"type": "categorical", "choices": [16, 24, 32, 40, 48]}]},
                        base={**TINY_BASE, "train": {"epochs": 2, "batch_size": 256}})
    tune("digits", space, sampler="grid", pruner="median", out=tmp_path / "out", quiet=True)
    trials = load(tmp_path / "out").get_trials(deepcopy=False)
    assert [t.state for t in trials if t.params["train.lr"] == 0.01] == [TrialState.COMPLETE] * 5
    bad = [t for t in trials if t.params["train.lr"] == 1e-7]
    assert [t.state for t in bad] == [TrialState.PRUNED] * 5 and all(t.last_step == 1 for t in bad)
    assert not list((tmp_path / "out" / "trials").glob("*/checkpoint.pt"))  # pruned trials never resume either
    pruned = tmp_path / "out" / "trials" / f"{bad[0].number}-0"
    with pytest.raises(ImgclfError, match="has not finished; it stopped and kept no checkpoint to resume from; train "
                                          "it again"):
        write_report(pruned)


def test_failing_trials_are_recorded_with_their_reason_and_the_study_goes_on(tmp_path):
    # lr 1e6 with SGD diverges (NaN loss); pool 16 does not fit an 8x8 image (an invalid option).
    space = write_space(tmp_path, {"train.lr": {"type": "categorical", "choices": [1e6, 0.01]},
                                   "model.pool": {"type": "categorical", "choices": [16, 2]}},
                        base={**TINY_BASE, "train": {"epochs": 1, "optimizer": "sgd"}})
    result = tune("digits", space, sampler="grid", pruner="none", out=tmp_path / "out", quiet=True)
    assert result.counts["COMPLETE"] == 1 and result.counts["FAIL"] == 3
    rows = list(csv.DictReader((tmp_path / "out" / "trials.csv").open()))
    reasons = {(float(r["train.lr"]), int(r["model.pool"])): r["fail_reason"] for r in rows}
    assert "training diverged (loss is nan)" in reasons[(1e6, 2)]
    assert "max-pool 16" in reasons[(1e6, 16)] and "max-pool 16" in reasons[(0.01, 16)]
    assert reasons[(0.01, 2)] == "" and [r["state"] for r in rows].count("COMPLETE") == 1


def test_a_study_whose_trials_all_fail_is_an_error_with_the_reason(tmp_path, capsys):
    space = write_space(tmp_path, {"model.pool": {"type": "categorical", "choices": [16]}})
    assert main(["tune", "--dataset", "digits", "--space", space, "--sampler", "grid", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("imgclf: error: no trial of study 'digits-space' finished (1 failed, e.g. ")
    assert "max-pool 16" in err and len(err.splitlines()) == 1
    assert (tmp_path / "trials.csv").exists() and not (tmp_path / "best.yaml").exists()


def test_resume_adds_exactly_the_missing_trials_and_writes_a_recipe_that_trains(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["tune", "--dataset", "digits", "--space", "cnn-small", "--sampler", "random", "--epochs", "1",
            "--workers", "2", "--out", str(out)]
    assert main([*args, "--trials", "2"]) == 0
    assert main([*args, "--trials", "3"]) == 0
    study = load(out, "digits-cnn-small")
    assert states(study) == [TrialState.COMPLETE] * 3
    assert "best trials" in capsys.readouterr().out

    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert [r["number"] for r in rows] == ["0", "1", "2"] and {"train.lr", "model.filters[0]"} <= set(rows[0])
    assert {p.name for p in (out / "figures").iterdir()} == {"history.png", "parallel_coordinates.png",
                                                             "importances.png", "slice.png"}
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and "Best trials" in page and "figures/" not in page
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["train"]["lr"] == study.best_trial.params["train.lr"] and best["train"]["threads"] is None
    assert main(["train", "--recipe", str(out / "best.yaml"), "--out", str(tmp_path / "best")]) == 0
    assert (tmp_path / "best" / "model.safetensors").exists()

    assert main([*args, "--trials", "3", "--epochs", "2"]) == 1  # another setup is refused, nothing is run
    assert "base.train.epochs" in capsys.readouterr().err and len(load(out, "digits-cnn-small").trials) == 3


def test_best_recipe_of_an_image_folder_trains_from_any_folder(tmp_path, monkeypatch, write_shapes):
    write_shapes(tmp_path / "shapes")
    monkeypatch.chdir(tmp_path)
    space = write_space(tmp_path, {"train.lr": {"type": "float", "low": 0.01, "high": 0.1}},
                        base={"model": {"name": "mlp"}, "train": {"epochs": 1, "batch_size": 8}})
    tune("shapes", space, trials=1, out="study", data_dir="cache", val_split=0.25, quiet=True)
    best = yaml.safe_load((tmp_path / "study" / "best.yaml").read_text())
    assert best["data"]["dataset"] == str(tmp_path / "shapes") and best["data"]["data_dir"] == str(tmp_path / "cache")
    monkeypatch.chdir(tmp_path / "study")  # elsewhere, "shapes" and "cache" mean nothing
    assert main(["train", "--recipe", "best.yaml", "--out", str(tmp_path / "best")]) == 0
    monkeypatch.chdir(tmp_path)
    result = tune("./shapes/", space, trials=2, out="study", data_dir="cache", val_split=0.25, quiet=True)
    assert result.counts["COMPLETE"] == 2  # the same folder, typed another way, resumes the study


def test_a_copy_of_an_image_folder_at_another_path_joins_its_study(tmp_path, write_shapes):
    # Two machines with the same images at different paths share one study; changed images are another dataset.
    from PIL import Image

    for copy in "ab":
        write_shapes(tmp_path / copy / "shapes")
    space = write_space(tmp_path, {"train.lr": {"type": "float", "low": 0.01, "high": 0.1}},
                        base={"model": {"name": "mlp"}, "train": {"epochs": 1, "batch_size": 8}})
    common = {"storage": str(tmp_path / "shared.log"), "data_dir": str(tmp_path / "cache"), "val_split": 0.25,
              "quiet": True}
    tune(str(tmp_path / "a" / "shapes"), space, trials=1, out=tmp_path / "out-a", **common)
    study = optuna.load_study(study_name="shapes-space", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(common["storage"])))
    setup = study.user_attrs["imgclf"]
    assert setup["dataset"].startswith("folder shapes, sha256 ") and str(tmp_path) not in str(setup)
    assert tune(str(tmp_path / "b" / "shapes"), space, trials=2, out=tmp_path / "out-b",
                **common).counts["COMPLETE"] == 2
    best = yaml.safe_load((tmp_path / "out-b" / "best.yaml").read_text())
    assert best["data"]["dataset"] == str(tmp_path / "b" / "shapes")  # this machine's path, wherever it ran

    # A study begun when a folder was named by its path takes the new form when that path resumes it.
    older = {**setup, "dataset": str(tmp_path / "b" / "shapes")}
    older["base"] = {**setup["base"], "data": {**setup["base"]["data"], "dataset": older["dataset"]}}
    study.set_user_attr("imgclf", older)
    assert tune(str(tmp_path / "b" / "shapes"), space, trials=3, out=tmp_path / "out-b",
                **common).counts["COMPLETE"] == 3
    assert optuna.load_study(study_name="shapes-space", storage=study._storage).user_attrs["imgclf"] == setup

    Image.new("L", (8, 8), 77).save(tmp_path / "b" / "shapes" / "a" / "0.png")
    with pytest.raises(ImgclfError, match=r"was run with other settings \(dataset folder shapes, sha256 \w+ there, "
                       r"folder shapes, sha256 \w+ here; base.data.dataset"):
        tune(str(tmp_path / "b" / "shapes"), space, trials=4, out=tmp_path / "out-b", **common)


def test_an_out_folder_holds_one_study(tmp_path, capsys, monkeypatch):
    space = write_space(tmp_path, {"train.lr": {"type": "float", "low": 0.01, "high": 0.1}})
    tune("digits", space, trials=1, out=tmp_path / "out", quiet=True)
    for args in (["--study", "other"], ["--storage", f"sqlite:///{tmp_path / 'db.sqlite'}"]):
        assert main(["tune", "--dataset", "digits", "--space", space, "--trials", "1", "--out", str(tmp_path / "out"),
                     *args]) == 1
        assert "holds study 'digits-space'" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out" / "trials").iterdir()) == ["0-0"]
    monkeypatch.chdir(tmp_path / "out")  # the same folder, reached from inside it
    assert tune("digits", space, trials=2, out=".", quiet=True).counts["COMPLETE"] == 2
    (tmp_path / "listed").mkdir()
    (tmp_path / "listed" / "study.json").write_text("[1]")  # JSON, but not the object imgclf writes
    with pytest.raises(ImgclfError, match="study.json is damaged"):
        tune("digits", space, trials=1, out=tmp_path / "listed", quiet=True)


def test_outputs_are_written_under_the_study_folder_lock_and_markup_in_a_name_is_text(tmp_path, monkeypatch, capsys):
    from imgclf.runs import in_use

    tune_module = importlib.import_module("imgclf.tune")  # imgclf.tune is also the function

    write = tune_module._write_outputs

    def checked(study, out, *args):  # a second command ending now waits, then reads the newer study
        assert in_use(out)
        return write(study, out, *args)

    monkeypatch.setattr(tune_module, "_write_outputs", checked)
    space = write_space(tmp_path, {"train.lr": {"type": "float", "low": 0.01, "high": 0.1}})
    assert main(["tune", "--dataset", "digits", "--space", space, "--trials", "1", "--study", "oops[/]", "--out",
                 str(tmp_path / "out")]) == 0
    assert "best trials of oops[/]" in capsys.readouterr().out


def test_executions_per_trial_average_seeds(tmp_path):
    space = write_space(tmp_path, {"train.lr": {"type": "categorical", "choices": [0.01]}})
    result = tune("digits", space, sampler="grid", pruner="none", executions=2, out=tmp_path / "out", quiet=True)
    scores = [float(next(csv.DictReader((tmp_path / "out" / "trials" / f"0-{k}" / "metrics.csv").open()))["val_acc"])
              for k in (0, 1)]
    assert scores[0] != scores[1] and result.best_value == pytest.approx(sum(scores) / 2)


def test_a_killed_worker_loses_only_its_running_trial(tmp_path):
    # A grid runs in order: a 1-epoch trial, then a 20-epoch one, killed (kill -9) while it runs (6 epochs could
    # finish between two polls on a fast machine).
    space = write_space(tmp_path, {"train.epochs": {"type": "categorical", "choices": [1, 20]}})
    args = ["tune", "--dataset", "digits", "--space", space, "--sampler", "grid", "--pruner", "none",
            "--out", tmp_path / "out"]
    process = cli(*args)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if (tmp_path / "out" / "study.log").exists() and load(tmp_path / "out").get_trials(
                deepcopy=False, states=(TrialState.RUNNING,)) and states(load(tmp_path / "out"))[0].is_finished():
            break
        time.sleep(0.5)
    assert process.poll() is None, "tune finished before the second trial could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert states(load(tmp_path / "out")) == [TrialState.COMPLETE, TrialState.RUNNING]  # the dead worker's trial

    # The re-run fails the orphan (it does not hold a place for ever) and runs its grid point again.
    assert main([*map(str, args)]) == 0
    study = load(tmp_path / "out")
    assert states(study) == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert [t.params["train.epochs"] for t in study.trials] == [1, 20, 20]
    rows = list(csv.DictReader((tmp_path / "out" / "trials.csv").open()))
    assert "worker stopped" in rows[1]["fail_reason"]


@pytest.mark.parametrize("args, message", [
    (["--space", "nosuchspace"], "unknown search space 'nosuchspace'"),
    (["--space", "BAD_YAML"], "is not valid YAML"),
    (["--space", "BAD_PATH"], "'train.lrr' is not a config path"),
    (["--sampler", "grid"], "grid search needs categorical parameters, but conv_layers is int"),
    (["--storage", "redis://localhost/0"], "storage 'redis://localhost/0' is not supported"),
    (["--storage", "postgresql://me:secret@127.0.0.1:1/db"], "cannot open storage 'postgresql://me:***@127.0.0.1:1/db'"),
    (["--trials", "0"], "trials must be a positive whole number, got 0"),
    (["--timeout", "nan"], "timeout must be a positive number, got nan"),
    (["--study", " "], "--study is empty"),
    (["--storage", ""], "--storage is empty; give a journal file or database URL"),
    (["--set", "train.lr=0.1"], "train.lr is searched by space cnn-small"),
    (["--set", "epochs=3"], "pass --epochs instead"),
    (["--set", "model.filtrs=[8]"], "(did you mean 'filters'?)"),
    (["--set", "model.name=mlp"], "not --set model.name"),
    (["--out", "NOTES"], "is a file, not a folder"),
    (["--storage", "RUN"], "is a folder; give a journal file in it"),
    (["--storage", "sqlite:/x.db"], "looks like a database URL short of a slash; write e.g. sqlite:///FILE.db"),
    (["--out", "RUN"], "holds a training run; give the study a folder of its own"),
    (["--dataset", "ONE_CLASS", "--data-dir", "CACHE"], "has 1 class; a classifier needs 2 or more"),
])
def test_bad_input_is_one_line(args, message, tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("params: [unclosed")
    (tmp_path / "badpath.yaml").write_text("params: {train.lrr: {type: float, low: 0.1, high: 1}}")
    (tmp_path / "notes.txt").write_text("mine")
    for i in range(4):
        (tmp_path / "one" / "a").mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8), 60 * i).save(tmp_path / "one" / "a" / f"{i}.png")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("model: {name: mlp}")
    args = [{"BAD_YAML": str(tmp_path / "bad.yaml"), "BAD_PATH": str(tmp_path / "badpath.yaml"),
             "NOTES": str(tmp_path / "notes.txt"), "RUN": str(tmp_path / "run"),
             "ONE_CLASS": str(tmp_path / "one"), "CACHE": str(tmp_path / "cache")}.get(a, a) for a in args]
    assert main(["tune", "--dataset", "digits", "--out", str(tmp_path / "out"), *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "secret" not in err[0], err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.yaml"]
    assert not (tmp_path / "out" / "study.json").exists()  # --out is not held for a study that never began


# ---- a study shared between machines, in a real PostgreSQL server ----------------------------------------

def _server_binary(name):
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


@pytest.fixture(scope="module")
def postgres_url():
    initdb, pg_ctl = _server_binary("initdb"), _server_binary("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: install Debian's postgresql "
                    "(apt-get install postgresql, as .ci/run does) to run the shared-study test")
    folder = Path(tempfile.mkdtemp(prefix="imgclf-pg-"))
    as_postgres = []
    if os.geteuid() == 0:  # the server refuses to run as root
        user = pwd.getpwnam("postgres")
        os.chown(folder, user.pw_uid, user.pw_gid)
        as_postgres = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = folder / "data"
    subprocess.run([*as_postgres, initdb, "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True)
    subprocess.run([*as_postgres, pg_ctl, "-D", data, "-l", folder / "server.log", "-w", "-t", "60", "-o",
                    f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True)
    yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    subprocess.run([*as_postgres, pg_ctl, "-D", data, "-m", "immediate", "stop"], capture_output=True)
    shutil.rmtree(folder, ignore_errors=True)


def test_two_machines_share_one_study_in_postgresql(postgres_url, tmp_path):
    space = write_space(tmp_path, {"train.lr": {"type": "float", "low": 0.001, "high": 0.01, "log": True}},
                        base={**TINY_BASE, "train": {"epochs": 2}})
    # The same command on two "machines" (each with its own output folder) joins one study of 4 trials.
    machines = [cli("tune", "--dataset", "digits", "--space", space, "--sampler", "tpe", "--pruner", "none",
                    "--trials", "4", "--storage", postgres_url, "--study", "shared", "--out", tmp_path / name)
                for name in ("a", "b")]
    outputs = [m.communicate(timeout=300) for m in machines]
    assert [m.returncode for m in machines] == [0, 0], outputs
    study = optuna.load_study(study_name="shared", storage=postgres_url.replace("://", "+psycopg2://", 1))
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    assert len(done) == 4
    assert len({t.user_attrs["worker"] for t in done}) == 2  # both machines ran trials
    assert all(t.user_attrs.get("fail_reason", "").startswith("not run") for t in study.trials if t not in done)
    for name in ("a", "b"):
        assert (tmp_path / name / "best.yaml").exists() and (tmp_path / name / "trials.csv").exists()


def test_a_half_written_journal_record_is_dropped_and_a_damaged_journal_is_a_one_line_error(tmp_path):
    space = write_space(tmp_path, {"train.lr": {"type": "categorical", "choices": [0.001, 0.003, 0.01]}})
    tune("digits", space, sampler="grid", pruner="none", trials=1, out=tmp_path / "out", quiet=True)
    journal = tmp_path / "out" / "study.log"
    complete = journal.read_bytes()
    journal.write_bytes(complete + b'{"op_code": 4, "worker_id": "killed mid-wri')  # a worker killed mid-append
    with pytest.warns(UserWarning, match="half-written record"):
        result = tune("digits", space, sampler="grid", pruner="none", trials=2, out=tmp_path / "out", quiet=True)
    assert len(load(tmp_path / "out", result.study).trials) == 2 and journal.read_bytes().startswith(complete)
    journal.write_bytes(b"this line is not json\n" + complete)
    with pytest.raises(ImgclfError, match="study journal .* is damaged"):
        tune("digits", space, sampler="grid", pruner="none", trials=3, out=tmp_path / "out", quiet=True)


def test_a_lock_left_by_a_killed_worker_can_be_broken_under_a_relative_out(tmp_path, monkeypatch):
    # Optuna breaks a lock held too long by its target's age: a link resolving to nothing made tune wait forever.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(optuna.storages.journal.JournalFileSymlinkLock, "release", lambda self: None)  # killed
    open_storage("tune/study.log").create_new_study([optuna.study.StudyDirection.MAXIMIZE], "s")
    assert os.path.islink("tune/study.log.lock")
    assert os.stat("tune/study.log.lock").st_size > 0  # the link reaches the journal
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    os.remove("tune/study.log.lock")
    os.symlink("tune/study.log", "tune/study.log.lock")  # dangling: as a worker killed before this fix left it
    open_storage("tune/study.log").create_new_study([optuna.study.StudyDirection.MAXIMIZE], "t")  # not a hang
    assert not os.path.lexists("tune/study.log.lock")


@pytest.mark.parametrize("text", ["mine\nno newline at the end",  # was cut at its last newline, then appended to
                                  '{"name": "a compact JSON file"}',  # was cut to nothing
                                  '{"name": "JSON lines"}\n{"name": "no newline at the end"}',
                                  '"op_code"\n'])
def test_a_file_that_is_not_a_journal_is_refused_untouched(tmp_path, capsys, text):
    notes = tmp_path / "notes.txt"
    notes.write_text(text)
    assert main(["tune", "--dataset", "digits", "--storage", str(notes), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is damaged or not a journal" in err[0], err
    assert notes.read_text() == text


def test_a_journal_whose_first_record_was_cut_short_is_started_again(tmp_path):
    space = write_space(tmp_path, {"train.lr": {"type": "categorical", "choices": [0.001, 0.003]}})
    journal = tmp_path / "out" / "study.log"
    journal.parent.mkdir()
    journal.write_bytes(b'{"op_code": 0, "worker_id": "killed mid-wri')
    with pytest.warns(UserWarning, match="half-written record"):
        result = tune("digits", space, sampler="grid", pruner="none", trials=1, out=tmp_path / "out", quiet=True)
    assert len(load(tmp_path / "out", result.study).trials) == 1


@pytest.mark.parametrize("params, message", [
    ({"data.subset": {"type": "categorical", "choices": [300, 400]}}, "data.subset cannot be searched"),
    ({"a": {"type": "categorical", "choices": [0.01, 0.02], "set": ["train.lr"]},
      "train.lr": {"type": "float", "low": 0.001, "high": 0.1}}, "parameters a and train.lr both set train.lr"),
    ({"train.epochs": {"type": "categorical", "choices": ["one", "two"]}}, "option epochs is 'one', which is not"),
    ({"train.lr": {"type": "float", "low": 0.001, "high": 0.1, "step": 0}}, "step must be a number above 0"),
    ({"train.lr": {"type": "float", "low": float("nan"), "high": 0.1}}, "float needs numbers low <= high"),
    ({"train.lr": {"type": "float", "low": 0.001, "high": float("inf")}}, "float needs numbers low <= high"),
    ({"train.lr": [0.1, 0.2]}, "lr takes one value, and a list's parts are joined into one list; to search values, "
                               "write {type: categorical, choices: [0.1, 0.2]}"),
    ({"train.lr": [0.1, {"type": "float", "low": 0.01, "high": 0.2}]},
     "parameter train.lr: lr takes one value, and a list's parts are joined into one list; to search values, write "
     "{type: categorical, choices: [...]}"),
    ({"train.augment": ["crop", {"type": "categorical", "choices": ["flip", 3]}]}, "option augment is"),
    ({"train.augment": ["crop", {"type": "categorical", "choices": ["flip", "rotate"]}]},
     "unknown augment 'rotate'; choose from crop, flip"),
    ({"train.optimizer": {"type": "categorical", "choices": ["adam", "sgdd"]}}, "unknown optimizer 'sgdd'; choose"),
    ({"train.epochs": {"type": "float", "low": 1, "high": 5}}, "epochs takes whole numbers, but type float draws"),
    ({1: 2}, "parameter 1 is not a config path; name it like train.lr"),
    ({"model.dense": [{"type": "categorical", "choices": [16, 16, 32]}]},
     "choice 16 is listed twice; list each choice once"),  # a grid stopped the command at the copy
    ({"train.threads": {"type": "categorical", "choices": [1, 2]}}, "threads cannot be searched; tune gives each"),
    ({"model.name": {"type": "categorical", "choices": ["mlp", "nosuchmodel"]}}, "unknown model 'nosuchmodel'"),
    ({"train.lr": {"type": "float", "low": 0.001, "high": 0.1, "log": "no"}}, "log is true or false, not 'no'"),
])
def test_a_space_whose_values_would_be_ignored_or_fail_every_trial_is_refused(params, message, tmp_path):
    with pytest.raises(ImgclfError, match=re.escape(message)):
        load_space(write_space(tmp_path, params))


def test_a_bound_in_scientific_notation_is_a_number(tmp_path):
    path = tmp_path / "sci.yaml"
    path.write_text("base: {model: {name: mlp}}\n"
                    "params:\n  train.lr: {type: float, low: 1e-4, high: 1e-2, log: true}\n")
    assert load_space(path).params["train.lr"]["low"] == 1e-4  # YAML 1.1 read "1e-4" as a string


def test_tune_options_that_a_searched_parameter_would_overwrite_are_refused(tmp_path):
    space = write_space(tmp_path, {"train.epochs": {"type": "int", "low": 1, "high": 2}})
    with pytest.raises(ImgclfError, match="--epochs 1 would be overwritten: space space searches train.epochs"):
        tune("digits", space, trials=1, epochs=1, out=tmp_path / "out", quiet=True)


def test_a_relative_storage_is_the_file_it_named_when_the_study_began(tmp_path, monkeypatch):
    space = write_space(tmp_path, {"train.lr": {"type": "float", "low": 0.01, "high": 0.1}})
    monkeypatch.chdir(tmp_path)
    tune("digits", space, trials=1, storage="sqlite:///x.db", out="out", quiet=True)
    assert json.loads((tmp_path / "out" / "study.json").read_text())["storage"] == f"sqlite:///{tmp_path / 'x.db'}"
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")  # the same words name another file from here
    with pytest.raises(ImgclfError, match=f"in sqlite:///{tmp_path / 'x.db'}, not in sqlite:///{tmp_path / 'sub'}"):
        tune("digits", space, trials=2, storage="sqlite:///x.db", out="../out", quiet=True)
    assert not (tmp_path / "sub" / "x.db").exists()  # nor is an empty storage left there
    assert tune("digits", space, trials=2, storage=f"sqlite:///{tmp_path / 'x.db'}", out="../out",
                quiet=True).counts["COMPLETE"] == 2
    with pytest.raises(ImgclfError, match=r"is a tuning study, not a run: its report is \.\./out/report\.html"):
        write_report("../out")


def test_the_api_names_an_unknown_sampler_or_pruner(tmp_path):
    with pytest.raises(ImgclfError, match="unknown sampler 'bayes'; choose one of random, grid, tpe"):
        tune("digits", sampler="bayes", out=tmp_path / "out")
    with pytest.raises(ImgclfError, match="unknown pruner 'asha'"):
        tune("digits", pruner="asha", out=tmp_path / "out")
    with pytest.raises(ImgclfError, match="trials must be a positive whole number, got 1.5"):
        tune("digits", trials=1.5, out=tmp_path / "out")
    for wrong, message in ((dict(executions=None), "executions per trial must be a positive whole number, got None"),
                           (dict(space=5), "space is a name or a YAML path, not 5"),
                           (dict(study=5), "study is a name, not 5"),
                           (dict(storage=5), "storage is a journal file path or a database URL, not 5"),
                           (dict(settings="lr=1"), "settings is a mapping such as {'lr': 0.1}, not 'lr=1'"),
                           (dict(settings={"model_options": 5}), "model_options is a mapping of the model's options"),
                           (dict(settings={"threads": 1}), "threads is an option of tune itself: pass --workers")):
        with pytest.raises(ImgclfError, match=re.escape(message)):
            tune("digits", out=tmp_path / "out", **wrong)
    assert not (tmp_path / "out" / "study.json").exists()  # refused before the study was claimed
    # numpy's numbers, as a notebook's sweep gives them
    result = tune("digits", pruner="none", trials=np.int64(1), epochs=np.int64(1), timeout=np.float32(600),
                  out=tmp_path / "numpy", quiet=True)
    assert result.counts["COMPLETE"] == 1


def test_a_timeout_that_ends_the_search_early_says_so(tmp_path, capsys):
    result = tune("digits", pruner="none", trials=3, epochs=1, timeout=1e-3, out=tmp_path / "out")
    assert result.counts["COMPLETE"] == 1  # optuna looks at the clock after each trial
    assert ("--timeout 0.001 s ended this command; the study has 1 of its 3 trials done: re-run the same command"
            in capsys.readouterr().out)


def test_a_worker_process_says_any_failure_in_one_line(monkeypatch, capsys):
    tune_module = importlib.import_module("imgclf.tune")  # the module, not the function imgclf.tune

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(tune_module, "run_worker", broken)
    job = tune_module.Job("sqlite:///x.db", "study", None, None, "random", "none", 1, 1, Path("out"), None, 1, True)
    with pytest.raises(SystemExit) as exited:
        tune_module._worker_process(job, 1, "worker 1: ")
    err = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 1 and err == [
        "imgclf: internal error: worker 1: RuntimeError: boom (rerun with IMGCLF_DEBUG=1 for the traceback and "
        "please report it)"]


def test_a_full_disk_under_the_journal_is_said_as_one(monkeypatch, tmp_path):
    tune_module = importlib.import_module("imgclf.tune")

    def journal_full(*args, **kwargs):
        raise AssertionError("Should not reach")  # what Optuna's journal raises when its write fails

    monkeypatch.setattr(tune_module, "run_worker", journal_full)
    monkeypatch.setattr(tune_module, "disk_full", lambda folder: True)
    with pytest.raises(OSError, match="No space left on device") as e:
        tune("digits", space="cnn-small", trials=1, epochs=1, out=tmp_path / "out", quiet=True)
    assert e.value.filename.endswith("study.log")


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_commands_starting_together_draw_different_points(tmp_path, sampler):
    tune_module = importlib.import_module("imgclf.tune")
    space = load_space(write_space(tmp_path, {"train.lr": {"type": "float", "low": 1e-4, "high": 1.0, "log": True},
                                              "model.filters": [{"type": "int", "low": 4, "high": 64}]}))
    storage = f"sqlite:///{tmp_path / 's.db'}"
    optuna.create_study(study_name="s", storage=storage, direction="maximize")
    # Two machines: each loads the study with a sampler of its own, and both ask before either has a value.
    first, second = (optuna.load_study(study_name="s", storage=storage, sampler=tune_module.make_sampler(sampler, 0))
                     for _ in range(2))
    values = tune_module.draw(first.ask(), sampler, space)
    assert tune_module.draw(second.ask(), sampler, space) != values
    again = optuna.create_study(storage=f"sqlite:///{tmp_path / 't.db'}", direction="maximize")
    assert tune_module.draw(again.ask(), sampler, space) == values  # the same history draws the same point


def test_a_command_finding_the_study_taken_by_another_neither_fails_nor_counts_failures(tmp_path, monkeypatch):
    tune_module = importlib.import_module("imgclf.tune")
    storage = f"sqlite:///{tmp_path / 's.db'}"
    space = write_space(tmp_path, {"train.lr": {"type": "categorical", "choices": [0.01, 0.02]}})
    other = optuna.create_study(study_name="s", storage=storage, direction="maximize").ask()
    other.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")  # another command's trial, running
    # That command planned its trial at the same moment as this one, so this one plans one too.
    monkeypatch.setattr(tune_module, "plan_trials", lambda study, target, grid: 1)
    result = tune("digits", space, trials=1, storage=storage, study="s", out=tmp_path / "out", quiet=True)
    assert result.counts["FAIL"] == 0 and result.counts["SKIPPED"] == 1 and result.counts["RUNNING"] == 1
    rows = list(csv.DictReader((tmp_path / "out" / "trials.csv").open()))
    assert [r["state"] for r in rows] == ["RUNNING", "SKIPPED"] and rows[1]["fail_reason"].startswith("not run")
    assert "Failed trials" not in (tmp_path / "out" / "report.html").read_text()


def test_ctrl_c_still_writes_the_study_so_far(tmp_path, monkeypatch):
    tune_module = importlib.import_module("imgclf.tune")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tune_module, "run_worker", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tune("digits", write_space(tmp_path, {"train.lr": {"type": "categorical", "choices": [0.01]}}), trials=1,
             out=tmp_path / "out", quiet=True)
    assert (tmp_path / "out" / "trials.csv").exists() and (tmp_path / "out" / "report.html").exists()


def test_a_notebook_keeps_its_matplotlib_style(tmp_path):
    import matplotlib

    before = dict(matplotlib.rcParams)
    space = write_space(tmp_path, {"train.lr": {"type": "categorical", "choices": [0.01, 0.02]}})
    tune("digits", space, sampler="grid", pruner="none", out=tmp_path / "out", quiet=True)
    assert (tmp_path / "out" / "figures" / "history.png").exists()
    assert {k: v for k, v in matplotlib.rcParams.items() if before.get(k) != v} == {}  # Optuna's ggplot undone


def test_workers_take_the_visible_gpus_in_turn(monkeypatch):
    """Read without a GPU, through torch's count: else every worker would put its trials on the first GPU."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert worker_gpus("auto", 2) == worker_gpus("cuda", 2) == ["3", "5"]
    with pytest.warns(UserWarning, match="--workers 3 share 2 GPU"):
        assert worker_gpus("auto", 3) == ["3", "5", "3"]
    assert worker_gpus("cpu", 2) == worker_gpus("cuda:1", 2) == [None, None]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert worker_gpus("auto", 2) == ["0", "1"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert worker_gpus("auto", 2) == [None, None]


def test_each_worker_starts_with_its_gpu_and_tune_keeps_its_own(monkeypatch):
    started = []

    class Process:  # records the environment each worker would start with
        exitcode = 0

        def __init__(self, target, args):
            pass

        def start(self):
            started.append(os.environ.get("CUDA_VISIBLE_DEVICES"))

        def join(self, timeout=None):
            pass

    tune_module = importlib.import_module("imgclf.tune")
    monkeypatch.setattr(tune_module.multiprocessing, "get_context", lambda method: SimpleNamespace(Process=Process))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert tune_module._run_processes(SimpleNamespace(base=RunConfig()), 4, 2) == []
    assert started == ["3", "5"] and os.environ["CUDA_VISIBLE_DEVICES"] == "3,5"
