"""The benchmark scripts run end to end on tiny offline data and print the rows RESULTS.md would get."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from imgclf.cli import main
from imgclf.config import list_recipes

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_script(name: str, *args) -> str:
    done = subprocess.run([sys.executable, str(BENCHMARKS / name), *map(str, args)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def table_rows(output: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in output.splitlines()
            if line.startswith("| ")]


@pytest.mark.parametrize("args, split, runs", [((), "test", 2), (("--val-split", "0.2"), "val", 1)])
def test_time_to_accuracy_row(args, split, runs):
    out = run_script("time_to_accuracy.py", "--model", "mlp", "--dataset", "digits", "--epochs", "1",
                     "--runs", runs, "--no-save", *args)
    assert [f"seed {seed}:" in out for seed in range(3)] == [True] * runs + [False] * (3 - runs)
    assert "s (training " in out and "s, evaluation " in out  # where each run's wall time went
    [row] = table_rows(out)
    assert row[:3] == ["mlp (1 epochs)", "digits", split]
    assert f"(n={runs})" in row[3] and float(row[4]) > 0  # accuracy mean ± std, wall seconds
    assert "matmul" in row[8] and "TFLOP/s" in row[8]
    assert row[-1].startswith("`python benchmarks/time_to_accuracy.py --model mlp")


def test_time_to_accuracy_bad_input_is_one_line():
    done = subprocess.run([sys.executable, str(BENCHMARKS / "time_to_accuracy.py"), "--recipe", "no-such-recipe"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1


def test_throughput_rows():
    out = run_script("time_to_accuracy.py", "--throughput", "--models", "mlp,lenet", "--precisions", "fp32",
                     "--batch-size", "16", "--min-steps", "1", "--min-seconds", "0", "--no-save")
    rows = table_rows(out)
    assert [(r[0], r[2]) for r in rows] == [("mlp", "fp32"), ("lenet", "fp32")]
    assert all(float(r[3].replace(",", "")) > 0 and float(r[4].replace(",", "")) > 0 for r in rows)


def test_rows_are_appended_under_their_table(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("time_to_accuracy", BENCHMARKS / "time_to_accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = tmp_path / "RESULTS.md"
    results.write_text("# Measured results\n\n## Other\n\n| a |\n|---|\n| 1 |\n\nprose after\n")
    monkeypatch.setattr(module, "RESULTS", results)
    header = "## Speed\n\nWhat it measures.\n\n| x |\n|---|"
    module.append_results(header, "| first |")
    module.append_results(header, "| second |")
    module.append_results("## Other\n\n| a |\n|---|", "| 2 |")
    assert results.read_text() == ("# Measured results\n\n## Other\n\n| a |\n|---|\n| 1 |\n| 2 |\n\nprose after\n"
                                   "\n## Speed\n\nWhat it measures.\n\n| x |\n|---|\n| first |\n| second |\n")


def test_fastnet_step():
    out = run_script("fastnet_step.py", "--batch-size", "8", "--widths", "8,16,16", "--steps", "1",
                     "--precision", "fp32")
    assert "fastnet 8,16,16 at 32x32x3, batch 8, fp32" in out and "nesterov" in out and "ms a step" in out
    out = run_script("fastnet_step.py", "--batch-size", "8", "--widths", "8,16,16", "--steps", "1",
                     "--precision", "fp32", "--optimizer", "muon")
    assert "muon" in out and "ms a step" in out


def test_conv_backward_table():
    rows = table_rows(run_script("conv_backward.py", "--batch-size", "2", "--widths", "8,16", "--shape", "8x8x1",
                                 "--seconds", "0"))
    assert [row[0] for row in rows[1:]] == ["8->8 at 7x7", "8->8 at 3x3", "8->16 at 3x3", "16->16 at 1x1", "total"]
    assert all(float(cell) >= 0 for row in rows[1:] for cell in row[1:5]) and float(rows[-1][1]) > 0


def test_tta_views_table(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--dataset", "digits", "--model", "mlp", "--epochs", "1", "--val-split", "0.2",
                 "--augment", "crop,flip", "--out", str(run)]) == 0
    rows = table_rows(run_script("tta_views.py", run))
    assert rows[0][0] == "view set"
    views = {row[0]: float(row[1]) for row in rows[2:]}
    assert "5x5 shifts (tta_shift: 2) x flip (50 views)" in views
    assert all(0 <= v <= 100 for v in views.values())


def test_readme_table_script_names_shipped_recipes(tmp_path):
    """DRY_RUN lists the runs; each recipe it times exists, and the CIFAR-10 rows need the folder given."""
    def commands(*args):
        done = subprocess.run(["bash", str(BENCHMARKS / "readme_table.sh"), *args], capture_output=True, text=True,
                              timeout=60, env={**os.environ, "DRY_RUN": "1"})
        assert done.returncode == 0, done.stderr
        return [line.split()[3:] for line in done.stdout.splitlines() if line.startswith("+ python ")]

    without_cifar, with_cifar = commands(str(tmp_path / "missing")), commands(str(tmp_path))
    recipes = [args[args.index("--recipe") + 1] for args in with_cifar if "--recipe" in args]
    assert recipes == ["mnist-fast", "fashion-fast", "cifar10-fast", "cifar10-long"]
    assert set(recipes) <= {name for name, _ in list_recipes()}
    assert len(without_cifar) == len(with_cifar) - 2 and all(str(tmp_path) in " ".join(a) for a in with_cifar[3:])


def test_bn_recalibration_table(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--dataset", "digits", "--model", "fastnet", "--epochs", "1", "--val-split", "0.2",
                 "--out", str(run)]) == 0
    rows = table_rows(run_script("bn_recalibration.py", run))
    assert [row[0] for row in rows[2:]] == ["as trained", "re-estimated on the training images",
                                            "re-estimated on the training images, half flipped"]
    assert all(0 <= float(row[1]) <= 100 for row in rows[2:])
