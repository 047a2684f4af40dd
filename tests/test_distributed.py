"""Distributed training: two CPU processes with gloo on 127.0.0.1, started by torchrun."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from imgclf.train import train

WORKER = Path(__file__).with_name("distributed_worker.py")
# Two ranks average their half-batch gradients; one process takes the mean over the whole batch. The sums are
# the same up to float32 rounding in another order, which grows a little over the steps: 3 epochs stay below this.
TOLERANCE = 1e-4


def torchrun(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *map(str, args)], capture_output=True, text=True, timeout=timeout)


def test_two_ranks_train_like_one_process_with_the_same_global_batch(tmp_path):
    job = torchrun(WORKER, tmp_path / "ddp", 3)
    assert job.returncode == 0, job.stderr[-2000:]
    rank0, rank1 = (torch.load(tmp_path / f"ddp-rank{r}.pt") for r in (0, 1))
    for name in rank0:  # every parameter and buffer is the same on both ranks
        assert torch.allclose(rank0[name], rank1[name], rtol=0, atol=1e-6), name

    single = train(dataset="digits", model="cnn", out=tmp_path / "single", quiet=True, optimizer="sgd", lr=0.05,
                   batch_size=64, precision="fp32", augment=[], epochs=3)
    for name, value in single.model.state_dict().items():
        assert torch.allclose(rank0[name], value, rtol=0, atol=TOLERANCE), name

    # rank 0 alone wrote one run folder, which records the world size
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["backend"] == "gloo" and summary["epochs_run"] == 3
    assert abs(summary["final"]["val_acc"] - single.summary["final"]["val_acc"]) < 0.01
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "ddp-rank0.pt", "ddp-rank1.pt", "single"]


def test_each_rank_draws_its_own_dropout_masks(tmp_path):
    script = tmp_path / "rng.py"  # the global stream as each epoch ends (train gives the caller its own back)
    script.write_text("import importlib, os, sys, torch\nfrom imgclf.train import train\n"
                      "module, states = importlib.import_module('imgclf.train'), []\n"
                      "real = module.train_one_epoch\n"
                      "def recorded(*args, **kwargs):\n"
                      "    metrics = real(*args, **kwargs)\n    states.append(torch.get_rng_state())\n"
                      "    return metrics\n"
                      "module.train_one_epoch = recorded\n"
                      "train(dataset='digits', model='mlp', model_options={'dropout': 0.5}, epochs=2, quiet=True, "
                      "precision='fp32', out=sys.argv[1])\n"
                      "torch.save(states, f'{sys.argv[1]}-rng{os.environ[\"RANK\"]}.pt')\n")
    job = torchrun(script, tmp_path / "ddp")
    assert job.returncode == 0, job.stderr[-2000:]
    rank0, rank1 = (torch.load(tmp_path / f"ddp-rng{r}.pt") for r in (0, 1))
    # Both ranks start from one seed: one stream would give image i of each rank's half the same mask.
    assert len(rank0) == 2 and not any(torch.equal(a, b) for a, b in zip(rank0, rank1, strict=True))


def test_two_ranks_stop_the_whitening_bias_and_share_batch_norm_statistics_with_lookahead(tmp_path):
    # Lookahead keeps a slow copy of the batch-norm statistics too, which each rank would otherwise pull
    # towards its own; 2 epochs take it through an end-of-epoch sync and the final copy into the net.
    changes = {"model": "fastnet", "model_options": {"widths": [16, 32, 32]}, "optimizer": "nesterov", "lr": 0.2,
               "whiten_bias_epochs": 0, "lookahead": True}
    job = torchrun(WORKER, tmp_path / "ddp", 2, json.dumps(changes))
    assert job.returncode == 0, job.stderr[-2000:]
    rank0, rank1 = (torch.load(tmp_path / f"ddp-rank{r}.pt") for r in (0, 1))
    assert torch.equal(rank0["whiten.bias"], torch.zeros_like(rank0["whiten.bias"]))  # as init_from_data left it
    for name in rank0:  # the weights stayed in step, and rank 0's batch-norm statistics reached rank 1
        assert torch.allclose(rank0[name], rank1[name], rtol=0, atol=1e-6), name


def _at_rank_start(folder: Path, code: str) -> dict[str, str]:
    """An environment in which every Python process (so every rank) first runs `code` (after `import os`)."""
    (folder / "sitecustomize.py").write_text("import os\n" + code)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}


def test_nproc_shortcut_and_an_uneven_batch(tmp_path):
    out = tmp_path / "run"
    common = ["train", "--dataset", "digits", "--model", "cnn", "--batch-size", "64", "--out", out, "--nproc", "2"]
    first = subprocess.run([sys.executable, "-m", "imgclf", *map(str, common), "--epochs", "1"],
                           capture_output=True, text=True, timeout=240)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "2 processes (gloo)" in first.stdout
    # Rank 0 starts late, so rank 1 meets the error first: torchrun must not stop rank 0 before it says it.
    late = _at_rank_start(tmp_path, "if os.environ.get('RANK') == '0':\n    import time\n    time.sleep(3)\n")
    odd = subprocess.run([sys.executable, "-m", "imgclf", *map(str, common), "--epochs", "1", "--batch-size", "63",
                          "--out", tmp_path / "odd"], capture_output=True, text=True, timeout=240, env=late)
    assert odd.returncode == 1
    assert odd.stderr.strip().splitlines() == [
        "imgclf: error: batch size 63 does not split evenly over 2 processes; use a multiple of 2 "
        "(the batch size is the global batch)"]


def test_an_error_of_one_rank_alone_is_said_by_that_rank(tmp_path):
    # As on a machine without the dataset: rank 1 alone cannot load it, while rank 0 waits for it to join in.
    missing = _at_rank_start(tmp_path, (
        "if os.environ.get('RANK') == '1':\n"
        "    import imgclf.data\n"
        "    from imgclf.errors import ImgclfError\n"
        "    def load_dataset(*args, **kwargs):\n"
        "        raise ImgclfError('digits: not on this machine')\n"
        "    imgclf.data.load_dataset = load_dataset\n"))
    job = subprocess.run([sys.executable, "-m", "imgclf", "train", "--dataset", "digits", "--model", "cnn", "--epochs",
                          "1", "--out", str(tmp_path / "run"), "--nproc", "2"],
                         capture_output=True, text=True, timeout=240, env=missing)
    assert job.returncode == 1
    assert "imgclf: error: rank 1: digits: not on this machine" in job.stderr.splitlines(), job.stderr
    assert "Traceback" not in job.stderr


def test_ranks_on_machines_without_the_run_folder_resume_and_reuse_it(tmp_path):
    # As on a second machine: rank 1 runs in an empty folder, where the relative --out names no run folder.
    elsewhere, site = tmp_path / "elsewhere", tmp_path / "site"
    elsewhere.mkdir(), site.mkdir()
    env = _at_rank_start(site, f"if os.environ.get('RANK') == '1':\n    os.chdir({str(elsewhere)!r})\n")
    command = [sys.executable, "-m", "imgclf", "train", "--dataset", "digits", "--model", "cnn", "--epochs", "2",
               "--out", "run", "--nproc", "2"]

    def run(*args):
        return subprocess.run(list(args), cwd=tmp_path, capture_output=True, text=True, timeout=240, env=env)

    first = run(*command)
    assert first.returncode == 0, first.stderr[-2000:]
    (tmp_path / "run" / "summary.json").unlink()  # as if killed while saving the model: resumable
    resumed = run(sys.executable, "-m", "imgclf", "train", "--resume", "--out", "run", "--nproc", "2")
    assert resumed.returncode == 0 and "resuming" in resumed.stdout, resumed.stderr[-2000:]
    again = run(*command)
    assert again.returncode == 0 and "reusing its model" in again.stdout, again.stderr[-2000:]
    assert (tmp_path / "run" / "summary.json").exists() and not any(elsewhere.iterdir())


def _rank_pids(rank: int) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if f"RANK={rank}".encode() in environ and b"IMGCLF_TEST_KILL=1" in environ:
            pids.append(int(proc.name))
    return pids


def test_a_killed_rank_ends_the_job_with_an_error_not_a_hang_and_resume_finishes_it(tmp_path):
    out = tmp_path / "run"
    job = subprocess.Popen([sys.executable, "-m", "imgclf", "train", "--dataset", "digits", "--model", "cnn",
                            "--epochs", "30", "--out", str(out), "--nproc", "2"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "IMGCLF_TEST_KILL": "1"})
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.2)
    victims = _rank_pids(1)
    assert victims, "rank 1 was not found"
    os.kill(victims[0], signal.SIGKILL)
    killed = time.time()
    _, stderr = job.communicate(timeout=120)
    assert time.time() - killed < 60
    assert job.returncode == 1
    assert "rank 1 ended with status -9 (SIGKILL)" in stderr
    assert "Traceback" not in stderr
    assert not (out / "summary.json").exists()

    resumed = subprocess.run([sys.executable, "-m", "imgclf", "train", "--resume", "--out", str(out), "--nproc", "2"],
                             capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming" in resumed.stdout
    epochs = [line.split(",")[0] for line in (out / "metrics.csv").read_text().splitlines()[1:]]
    assert epochs == [str(e) for e in range(1, 31)]
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2


def test_a_run_in_use_is_refused_and_killing_the_launcher_ends_its_ranks(tmp_path):
    out = tmp_path / "run"
    job = subprocess.Popen([sys.executable, "-m", "imgclf", "train", "--dataset", "digits", "--model", "cnn",
                            "--epochs", "30", "--out", str(out), "--nproc", "2"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env={**os.environ, "IMGCLF_TEST_KILL": "1"})
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.2)
    second = subprocess.run([sys.executable, "-m", "imgclf", "train", "--resume", "--out", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 1 and "is in use by another imgclf process" in second.stderr, second.stderr
    assert _rank_pids(0) and _rank_pids(1)
    job.send_signal(signal.SIGKILL)  # no handler runs: the ranks must end by themselves
    job.wait(timeout=30)
    deadline = time.time() + 30
    while (_rank_pids(0) or _rank_pids(1)) and time.time() < deadline:
        time.sleep(0.2)
    assert not _rank_pids(0) and not _rank_pids(1)
    usage = subprocess.run([sys.executable, "-m", "imgclf", "train", "--resume", "--out", str(out), "--lr", "0.1",
                            "--nproc", "2"], capture_output=True, text=True, timeout=240)
    assert usage.returncode == 2 and len(usage.stderr.strip().splitlines()) == 1, usage.stderr


def test_a_killed_rank_is_named_even_when_its_peer_ended_first(monkeypatch):
    """The agent may record rank 0's "lost contact" exit (status 1) before rank 1's SIGKILL that caused it."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from imgclf import distributed
    from imgclf.errors import ImgclfError

    def launcher(rank1_status):
        def both_failed(*args):
            peer, rank1 = (ProcessFailure(local_rank=r, pid=r + 1, exitcode=code, error_file="/nonexistent")
                           for r, code in ((0, 1), (1, rank1_status)))
            rank1.timestamp = peer.timestamp + 1
            raise ChildFailedError("imgclf", {0: peer, 1: rank1})
        return lambda config, entrypoint: both_failed

    monkeypatch.setattr("torch.distributed.launcher.api.elastic_launch", launcher(-9))
    with pytest.raises(ImgclfError, match=r"rank 1 ended with status -9 \(SIGKILL\)"):
        distributed.launch(2, ["train"])
    # SIGTERM is torchrun stopping the rest after rank 0 said its error: nothing more to say.
    monkeypatch.setattr("torch.distributed.launcher.api.elastic_launch", launcher(-15))
    with pytest.raises(SystemExit):
        distributed.launch(2, ["train"])


@pytest.mark.parametrize("n", [0, 1, 5, 10, 101])
@pytest.mark.parametrize("ranks", [1, 2, 3, 8])
def test_val_shards_cover_every_image_once(n, ranks):
    from imgclf.distributed import Context

    parts = [list(range(n))[Context(rank, ranks).shard(n)] for rank in range(ranks)]
    assert sum(parts, []) == list(range(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_more_processes_than_gpus_is_said_in_one_line(monkeypatch):
    from imgclf import distributed
    from imgclf.errors import ImgclfError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.delenv(distributed.LAUNCHER_PID, raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ImgclfError, match=r"2 processes on this machine but 1 GPU\(s\): one process per GPU; use "
                                          r"--nproc 1"):
        distributed.setup("cuda")


def test_ranks_split_the_cores_where_the_system_has_no_cpu_affinity(monkeypatch):
    from imgclf import distributed

    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # macOS, Windows
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert distributed.threads_per_rank(distributed.Context(0, 2, 2, "gloo")) == 2


def test_rank_0s_error_while_reading_for_all_reaches_every_rank():
    """Else the other ranks would wait in the broadcast, until the 300 s timeout if rank 0's caller went on."""
    from imgclf import distributed
    from imgclf.errors import ImgclfError

    class Rank(distributed.Context):  # rank 0's broadcast, recorded, and what the other ranks receive
        sent: list = []

        def broadcast(self, obj):
            self.sent.append(obj)
            return obj if self.is_main else self.sent[0]

    def unreadable():
        raise PermissionError("checkpoint.pt: permission denied")

    with pytest.raises(PermissionError):
        Rank(rank=0, world_size=2).from_main(unreadable)
    with pytest.raises(ImgclfError, match=r"^rank 0 failed \(PermissionError: checkpoint.pt: permission denied\)$"):
        Rank(rank=1, world_size=2).from_main(unreadable)  # not called there
    Rank.sent.clear()
    assert Rank(rank=0, world_size=2).from_main(lambda: {"epoch": 3}) == {"epoch": 3}
    assert Rank(rank=1, world_size=2).from_main(unreadable) == {"epoch": 3}


@pytest.mark.parametrize("value", ["abc", "-5", "0", "inf", "nan"])
def test_a_bad_timeout_setting_is_said_in_one_line(monkeypatch, value):
    from imgclf import distributed
    from imgclf.errors import ImgclfError

    monkeypatch.setenv("IMGCLF_DIST_TIMEOUT", value)
    with pytest.raises(ImgclfError, match=f"IMGCLF_DIST_TIMEOUT='{value}' is not a number of seconds above 0"):
        distributed.timeout_seconds()
    monkeypatch.setenv("IMGCLF_DIST_TIMEOUT", "600")
    assert distributed.timeout_seconds() == 600
