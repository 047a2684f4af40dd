"""Hyper-parameter tuning on Optuna: YAML search spaces, samplers, pruners, resumable studies shared by workers.

A study lives in a storage: by default the journal file DIR/study.log (appends under a file lock, so several
local worker processes share it safely), or PostgreSQL (`storage="postgresql://..."`), so that the same
command started on many machines joins one study. Each trial trains runs into DIR/trials/<trial>-<execution>/
and is scored by validation accuracy (never the test split); the first execution reports every epoch's
accuracy so a pruner can stop a bad trial early. `trials` is the total the study should reach: re-running
resumes it. The results are DIR/trials.csv, DIR/best.yaml (a recipe), DIR/figures/ and DIR/report.html.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import datetime
import errno
import functools
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import socket
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
import torch
from optuna.trial import TrialState
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from imgclf.config import (
    PRUNERS,
    SAMPLERS,
    RunConfig,
    apply_overrides,
    describe_settings,
    differing_settings,
    override_path,
)
from imgclf.data import DATASETS, Dataset, canonical_data_dir, canonical_dataset, load_config_dataset
from imgclf.device import usable_cpus, visible_gpus
from imgclf.distributed import end_with_parent
from imgclf.errors import (
    ImgclfError,
    disk_full,
    is_number,
    is_whole,
    one_line,
    one_line_warning,
    quieter_loggers,
    unexpected,
)
from imgclf.models import check_model_options
from imgclf.runs import atomic_write, folder_lock, natural_key, output_folder, written_together
from imgclf.spaces import Space, grid_points, load_space, searched_paths, suggest, trial_config

DEFAULT_TRIALS = 20  # without --trials; a grid runs all its points
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)  # what --trials counts: failed trials are retried on a re-run
HEARTBEAT_SECONDS = 60  # database storages: a trial whose worker is silent for 2 heartbeats is failed

console = Console(highlight=False, soft_wrap=True)


# ---- storage, samplers, pruners ------------------------------------------------------------------------

def _open_journal(path: Path) -> optuna.storages.JournalStorage:
    # Absolute: Optuna's lock is a symlink to the journal, and a relative target resolves from the link's own
    # folder, to nothing; Optuna then never breaks a lock left by a killed worker, and every later tune waits.
    path = path.absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    stale = path.with_name(path.name + ".lock")
    if stale.is_symlink() and not stale.exists():  # the dangling lock of a worker killed before this fix: never broken
        stale.unlink(missing_ok=True)  # (a live lock reaches the journal, which Optuna makes before locking it)
    lock = optuna.storages.journal.JournalFileSymlinkLock(str(path))  # the lock every append takes
    if path.is_file():
        lock.acquire()  # a worker may be appending right now
        try:
            data = path.read_bytes()
            # Any other file (notes, a run's model.json given to --storage by mistake) would be cut at its last
            # newline below and then appended to: refuse it untouched.
            if data and not _looks_like_journal(data):
                raise ImgclfError(f"study journal {path} is damaged or not a journal (it does not start with an "
                                  "Optuna record); nothing was changed: give --storage a new file, or restore it "
                                  "from a backup")
            _drop_half_written_record(path, data)
        finally:
            lock.release()
    try:
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path), lock_obj=lock))
    except ValueError as e:  # json.JSONDecodeError included: a line changed by hand or by a disk fault
        raise ImgclfError(f"study journal {path} is damaged ({type(e).__name__}: {e}); restore it from a backup, "
                          "or tune into a new --out") from None


def _looks_like_journal(data: bytes) -> bool:
    """Optuna writes one JSON object with an "op_code" a line; a first line without its newline is a record
    cut short by a kill (not valid JSON), or a complete record that lacks only the newline."""
    first, newline, _ = data.partition(b"\n")
    try:
        record = json.loads(first)
    except ValueError:
        return not newline and first.startswith(b'{"')
    return isinstance(record, dict) and "op_code" in record


def _drop_half_written_record(path: Path, data: bytes) -> None:
    """A worker killed in the middle of an append leaves a last line without its newline. Optuna skips it, but
    the next append would be glued to it and make the whole journal unreadable; the record never completed,
    so cut it off."""
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(keep)
        warnings.warn(f"{path} ended in a half-written record (a worker killed while writing?); dropped its "
                      f"{len(data) - keep} bytes", stacklevel=2)


def open_storage(url_or_path: str | Path) -> optuna.storages.BaseStorage:
    """A database URL (postgresql://, sqlite:///, mysql://) or the path of a journal file."""
    url = str(url_or_path)
    if "://" not in url:
        if Path(url).is_dir():
            raise ImgclfError(f"storage {url} is a folder; give a journal file in it, e.g. {Path(url) / 'study.log'}")
        return _open_journal(Path(url))
    shown = _shown(url)
    # The driver that imgclf[postgres] installs (SQLAlchemy >= 2.1 would look for psycopg 3); postgres:// is libpq's.
    url = re.sub(r"^postgres(ql)?://", "postgresql+psycopg2://", url)
    if url.split("://")[0].split("+")[0] not in ("postgresql", "sqlite", "mysql"):
        raise ImgclfError(f"storage '{shown}' is not supported; use postgresql://USER:PASSWORD@HOST/DB, "
                          "sqlite:///FILE.db or a journal file path")
    try:
        for attempt in range(5):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats
                    return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True},
                                                      heartbeat_interval=HEARTBEAT_SECONDS,
                                                      grace_period=2 * HEARTBEAT_SECONDS)
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
                if attempt == 4:
                    raise
                time.sleep(0.5 + attempt)  # machines starting together race to create the tables: the loser retries
    except ImportError:
        raise ImgclfError(f"storage '{shown}' needs a database driver that is not installed; for PostgreSQL: "
                          "pip install psycopg2-binary (or the imgclf[postgres] extra)") from None
    except Exception as e:  # SQLAlchemy's errors: a bad URL, no server, wrong password, no such database
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ImgclfError(f"cannot open storage '{shown}': {reason}; check the URL, that the server runs and "
                          "the database exists") from None


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    # grid: every point is enqueued once and each waiting trial goes to exactly one worker (see plan_trials),
    # so the sampler only draws if the queue is empty, which the trial budget prevents.
    return optuna.samplers.RandomSampler(seed=seed)


def draw(trial: optuna.Trial, sampler: str, space: Space) -> dict[str, Any]:
    """The trial's values, drawn by a sampler seeded by its number, which the storage gives to one trial only:
    commands started at the same moment on one study (two machines) draw different points, a re-run draws new
    ones, and the same history draws the same points again. The samplers keep nothing between trials."""
    trial.study.sampler = make_sampler(sampler, trial.number)
    return suggest(trial, space)


def make_pruner(name: str, epochs: int) -> optuna.pruners.BasePruner:
    if name == "median":
        return optuna.pruners.MedianPruner()
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs)
    return optuna.pruners.NopPruner()


# ---- workers -------------------------------------------------------------------------------------------

@dataclass
class Job:
    """What a worker process needs to run trials of a study (picklable, for spawned processes)."""

    storage: str
    study: str
    space: Space
    base: RunConfig
    sampler: str
    pruner: str
    trials: int  # the total the study should reach
    executions: int
    out: Path
    timeout: float | None
    threads: int
    quiet: bool


class NotRun(Exception):
    """A trial another worker made redundant (the study was full, or its grid point was taken)."""


def run_worker(job: Job, n_trials: int, dataset: Dataset | None = None, tag: str = "") -> None:
    """Run up to n_trials trials of the study here (fewer if the study reaches job.trials or time runs out)."""
    torch.set_num_threads(job.threads)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # each trial gets one line of ours instead
    data = dataset or load_config_dataset(job.base)
    # Its sampler is a placeholder: draw seeds one for each trial.
    study = optuna.load_study(study_name=job.study, storage=open_storage(job.storage), sampler=make_sampler(
        job.sampler, 0), pruner=make_pruner(job.pruner, job.base.train.epochs))
    worker = f"{socket.gethostname()}:{os.getpid()}"

    def objective(trial: optuna.Trial) -> float:
        from imgclf.train import train

        trial.set_user_attr("worker", worker)
        values = draw(trial, job.sampler, job.space)
        trial.set_user_attr("values", values)
        reason = _redundant(trial, job)
        if reason:
            trial.set_user_attr("fail_reason", reason)
            trial.study.stop()
            raise NotRun(reason)
        scores = []
        try:
            config = trial_config(job.base, job.space, values)
            config.train.threads = job.threads
            trial.set_user_attr("config", config.to_dict())
            for execution in range(job.executions):
                run = copy.deepcopy(config)
                run.train.seed += execution
                run_dir = job.out / "trials" / f"{trial.number}-{execution}"
                fresh = not run_dir.exists()  # else train refuses it, and its files are not this trial's
                try:
                    result = train(run, out=run_dir, dataset=data, quiet=True,
                                   on_epoch=_pruning_hook(trial, run.train.epochs) if execution == 0 else None)
                finally:  # only for resuming, and trials never resume: pruned and failed ones neither
                    if fresh:
                        with contextlib.suppress(OSError):
                            (run_dir / "checkpoint.pt").unlink(missing_ok=True)
                key = "best_val_acc" if run.train.early_stopping else None  # early stopping keeps its best epoch
                scores.append(result.summary[key] if key else result.history[-1]["val_acc"])
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("fail_reason", "interrupted (Ctrl-C) while it ran")
            raise
        except Exception as e:  # an invalid option, divergence, out of memory: this trial fails, the study goes on
            trial.set_user_attr("fail_reason", str(e) if isinstance(e, ImgclfError) else f"{type(e).__name__}: {e}")
            raise
        return sum(scores) / len(scores)

    def announce(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if job.quiet:
            return
        seconds = trial.duration.total_seconds() if trial.duration else 0
        if trial.state == TrialState.COMPLETE:
            console.print(f"{tag}trial {trial.number}: val acc [bold]{trial.value:.2%}[/] in {seconds:.0f}s  "
                          f"{escape(describe_settings(trial.user_attrs.get('values', trial.params)))}")
        elif trial.state == TrialState.PRUNED:
            step = trial.last_step
            console.print(f"{tag}trial {trial.number}: pruned after epoch {step} "
                          f"(val acc {trial.intermediate_values.get(step, float('nan')):.2%})")
        elif not _not_run(trial):
            console.print(f"{tag}trial {trial.number}: [red]failed[/]: {escape(one_line(_fail_reason(trial)))}")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.optimize(objective, n_trials=n_trials, timeout=job.timeout, catch=(Exception,), callbacks=[
            optuna.study.MaxTrialsCallback(job.trials, states=(*COUNTED, TrialState.RUNNING)), announce])


def _pruning_hook(trial: optuna.Trial, epochs: int):
    def report(row: dict[str, float]) -> None:
        epoch = int(row["epoch"])
        trial.report(row["val_acc"], epoch)
        if epoch < epochs and trial.should_prune():  # pruning after the last epoch would save nothing
            raise optuna.TrialPruned(f"val acc {row['val_acc']:.2%} after epoch {epoch}")
    return report


def _redundant(trial: optuna.Trial, job: Job) -> str | None:
    """Why this trial must not run: workers on other machines plan on their own, so two can ask at once."""
    earlier = [t for t in trial.study.get_trials(deepcopy=False, states=(*COUNTED, TrialState.RUNNING))
               if t.number < trial.number]
    if len(earlier) >= job.trials:
        return f"not run: the study already had its {job.trials} trials when this worker asked"
    if job.sampler == "grid" and any(t.params == trial.params for t in earlier):
        return "not run: another worker took this grid point"
    return None


def _worker_process(job: Job, n_trials: int, tag: str, parent: int | None = None) -> None:
    if parent is not None:  # a killed `imgclf tune` leaves no workers training on
        end_with_parent(parent)
    warnings.showwarning = one_line_warning  # a new process: as the CLI says them
    try:
        run_worker(job, n_trials, tag=tag)
    except ImgclfError as e:
        print(f"imgclf: error: {tag}{one_line(e)}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except Exception as e:  # one line, as the CLI says it: not multiprocessing's traceback of the worker
        if os.environ.get("IMGCLF_DEBUG"):
            raise
        print(f"imgclf: {unexpected(_as_disk_full(job, e)).replace(': ', f': {tag}', 1)}", file=sys.stderr,
              flush=True)
        raise SystemExit(1) from None


def _as_disk_full(job: Job, e: Exception) -> Exception:
    """Optuna's journal fails on a full disk with an AssertionError ("Should not reach"): say it as a full disk."""
    journal = "://" not in job.storage and Path(job.storage).parent
    return OSError(errno.ENOSPC, "No space left on device", job.storage) if journal and disk_full(journal) else e


def fail_lost_trials(study: optuna.Study) -> int:
    """Fail RUNNING trials whose worker died (killed, out of memory, machine reset), so they stop holding a place.

    Database storages do this by heartbeat; a journal file has none, so a trial whose worker process on this
    machine is gone, or that never said which worker runs it within a minute, is failed here.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # by heartbeat; a no-op on a journal file
    lost = 0
    host, now = socket.gethostname(), datetime.datetime.now()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker")
        if worker is None:
            gone = trial.datetime_start is not None and (now - trial.datetime_start).total_seconds() > 60
        else:
            worker_host, pid = worker.rsplit(":", 1)
            gone = worker_host == host and not _process_exists(int(pid))
        if gone:
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            lost += 1
    return lost


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


# ---- the study -------------------------------------------------------------------------------------------

@dataclass
class TuneResult:
    out: Path
    study: str
    storage: str
    counts: dict[str, int]  # trials per state: COMPLETE, PRUNED, FAIL, RUNNING, WAITING; SKIPPED: placeholders of a
    # worker that asked when the study had its trials (not failures)
    best_value: float | None
    best_values: dict[str, Any] | None  # the best trial's sampled values
    best_recipe: Path | None


def _keeps_process_state(run):
    """A study sets torch's threads and Optuna's log level for its trials; its caller (a notebook) keeps its own."""
    @functools.wraps(run)
    def kept(*args, **kwargs):
        threads, verbosity = torch.get_num_threads(), optuna.logging.get_verbosity()
        try:
            return run(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
            optuna.logging.set_verbosity(verbosity)
    return kept


@_keeps_process_state
def tune(dataset: str, space: str | Path = "cnn-small", *, sampler: str = "tpe", pruner: str = "median",
         trials: int | None = None, timeout: float | None = None, epochs: int | None = None, executions: int = 1,
         subset: int | None = None, workers: int = 1, storage: str | None = None, study: str | None = None,
         out: str | Path = "tune", data_dir: str | None = None, val_split: float | None = None,
         settings: dict[str, Any] | None = None, quiet: bool = False) -> TuneResult:
    """Run (or resume, or join) a study until it holds `trials` completed or pruned trials; write its report.

    `trials` is the total: a re-run adds only the missing ones (failed trials do not count, so a re-run runs new
    trials in their place; a grid its failed points). `workers` processes run here, each with cores // workers
    torch threads. `settings` fixes recipe settings the space does not search, as make_config overrides:
    {"augment": ["crop"], "model_options": {...}}.
    """
    if not isinstance(dataset, str | os.PathLike):  # each worker process loads its own copy
        raise ImgclfError(f"tune takes a dataset name or image folder (each worker loads its own), not a "
                          f"{type(dataset).__name__}")
    if sampler not in SAMPLERS:
        raise ImgclfError(f"unknown sampler '{sampler}'; choose one of {', '.join(SAMPLERS)}")
    if pruner not in PRUNERS:
        raise ImgclfError(f"unknown pruner '{pruner}'; choose one of {', '.join(PRUNERS)}")
    for label, value in (("trials", trials), ("epochs", epochs), ("executions per trial", executions),
                         ("workers", workers), ("subset", subset)):
        if (value is not None or label in ("executions per trial", "workers")) and not is_whole(value):
            raise ImgclfError(f"{label} must be a positive whole number, got {value!r}")
    for label, value, kind in (("space", space, "a name or a YAML path"), ("study", study, "a name"),
                               ("storage", storage, "a journal file path or a database URL")):
        if value is not None and not isinstance(value, str | os.PathLike if label != "study" else str):
            raise ImgclfError(f"{label} is {kind}, not {value!r}")
    storage = None if storage is None else os.fspath(storage)
    if settings is not None and not isinstance(settings, dict):
        raise ImgclfError(f"settings is a mapping such as {{'lr': 0.1}}, not {settings!r}")
    # not `<= 0`: NaN passes that and would mean no limit at all
    if timeout is not None and (not is_number(timeout) or not timeout > 0):
        raise ImgclfError(f"timeout must be a positive number, got {timeout!r}")
    # numpy's numbers as Python's: they go into the study's JSON records
    trials, epochs, executions, workers, subset = (v if v is None else int(v)
                                                   for v in (trials, epochs, executions, workers, subset))
    timeout = timeout if timeout is None else float(timeout)
    say = (lambda *a: None) if quiet else console.print
    space_obj = load_space(space)
    base = RunConfig.from_dict(space_obj.base, source=f"search space {space_obj.name}: base")
    dataset = canonical_dataset(dataset)  # a folder by its absolute path: `odd`, `./odd/` and /abs/odd are one
    base.data.dataset, base.data.data_dir = dataset, data_dir or base.data.data_dir
    base.data.subset = subset or base.data.subset
    if epochs and "train.epochs" in searched_paths(space_obj):
        raise ImgclfError(f"--epochs {epochs} would be overwritten: space {space_obj.name} searches train.epochs; "
                          "drop --epochs")
    base.train.epochs = epochs or base.train.epochs
    if val_split is not None and (not is_number(val_split) or not 0 < val_split < 1):
        raise ImgclfError(f"val split {val_split!r} must be a fraction between 0 and 1, e.g. 0.1")
    base.data.val_split = val_split or base.data.val_split
    apply_overrides(base, **_fixed_settings(settings or {}, space_obj))
    if "model.name" not in searched_paths(space_obj):  # else each trial's model checks its options
        check_model_options(base.model.name, base.model.options)
    if base.data.val_split <= 0:
        raise ImgclfError("tuning scores trials on the validation split; pass --val-split 0.1 or give the space's "
                          "base a data.val_split > 0")
    grid = grid_points(space_obj) if sampler == "grid" else None
    out = output_folder(out, "the study", base.data.dataset)
    if (out / "config.yaml").exists():  # the study's figures/ and report.html would go over the run's own
        raise ImgclfError(f"--out {out} holds a training run; give the study a folder of its own, e.g. tune/NAME")
    given_storage = storage
    journal = out / "study.log"
    storage = absolute_storage(storage) if storage else str(journal)
    # The default journal is named relative to --out, wherever --out is reached from.
    claimed = "study.log" if storage in (str(journal), str(journal.resolve())) else storage
    if study is not None and not study.strip():  # not quietly the default study, which may be another's
        raise ImgclfError("--study is empty; give the study a name, or leave --study out for DATASET-SPACE")
    if given_storage is not None and not given_storage.strip():  # not quietly the default journal
        raise ImgclfError("--storage is empty; give a journal file or database URL, or leave --storage out for "
                          "OUT/study.log")
    study_name = study or f"{Path(dataset).name}-{space_obj.name}"
    data = load_config_dataset(base)
    data.check_trainable()  # here too: before the study holds --out for data that cannot train

    write_claim = _check_claim(out, study_name, claimed, given_storage)  # before a storage is made for nothing
    storage_obj = open_storage(storage)  # next: a storage that does not open must not claim --out for its study
    write_claim()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study_obj = optuna.create_study(study_name=study_name, storage=storage_obj, direction="maximize",
                                    load_if_exists=True)
    identity, what = dataset_identity(dataset, data), base.what()
    what["data"]["dataset"] = identity  # not this machine's path: another machine's copy joins the study
    setup = {"dataset": identity, "space": space_obj.name, "params": space_obj.params, "base": what,
             "executions": executions}
    _check_same_setup(study_obj, setup, storage, older_form={**setup, "dataset": dataset, "base": base.what()})
    lost = fail_lost_trials(study_obj)
    if lost:
        say(f"{lost} trial(s) of a stopped worker marked failed; "
            + ("their grid points will be run again" if grid is not None else "new trials take their place"))
    target = trials or (len(grid) if grid is not None else DEFAULT_TRIALS)
    if grid is not None and target > len(grid):
        say(f"the grid has {len(grid)} points, so the study holds at most {len(grid)} trials, not {target}")
        target = len(grid)
    n_trials = plan_trials(study_obj, target, grid)
    counts = _counts(study_obj.get_trials(deepcopy=False))
    ended_before = counts["COMPLETE"] + counts["PRUNED"] + counts["FAIL"]
    say(f"study [bold]{escape(study_name)}[/] ({escape(_shown(storage))}): "
        f"{counts['COMPLETE'] + counts['PRUNED']} of {target} trials done, {counts['RUNNING']} running elsewhere; "
        f"running {n_trials} more on {escape(data.name)} "
        f"({len(data.train):,} train / {len(data.val):,} val images), space {space_obj.name}, sampler {sampler}, "
        f"pruner {pruner}")

    failed_workers = []
    if n_trials > 0:
        processes = min(workers, n_trials)
        cores = usable_cpus()
        if processes > cores:  # each still gets a thread: the trials share the cores and all run slower
            warnings.warn(f"--workers {processes} is more than this machine's {cores} CPUs; each trial gets one "
                          f"thread and they share the CPUs (use --workers {cores} or fewer)", stacklevel=2)
        job = Job(storage, study_name, space_obj, base, sampler, pruner, target, executions, out, timeout,
                  max(1, cores // processes), quiet)
        try:
            if processes == 1:
                run_worker(job, n_trials, data)
            else:
                failed_workers = _run_processes(job, n_trials, processes)
                fail_lost_trials(study_obj)  # a worker that died left its trial running
        except AssertionError as e:
            raise _as_disk_full(job, e) from None
        except KeyboardInterrupt:  # what finished is in the study: show it before stopping
            fail_lost_trials(study_obj)
            write_outputs(study_obj, out, storage, quiet, data=(dataset, base.data.data_dir))
            raise
    after = _counts(study_obj.get_trials(deepcopy=False))
    ended = after["COMPLETE"] + after["PRUNED"] + after["FAIL"]  # this command's, and any that another machine ended
    if timeout is not None and n_trials > 0 and ended - ended_before < n_trials:  # then the clock stopped it
        say(f"--timeout {timeout:g} s ended this command; the study has {after['COMPLETE'] + after['PRUNED']} of its "
            f"{target} trials done: re-run the same command to add the rest")
    result = write_outputs(study_obj, out, storage, quiet, data=(dataset, base.data.data_dir))
    # Not when the study's trials were all taken by other commands (placeholders) or still run elsewhere.
    if n_trials > 0 and result.counts["FAIL"] and not result.counts["COMPLETE"] + result.counts["PRUNED"]:
        reasons = [t.user_attrs.get("fail_reason") for t in study_obj.get_trials(deepcopy=False, states=(
            TrialState.FAIL,)) if t.user_attrs.get("fail_reason") and not _not_run(t)]
        raise ImgclfError(f"no trial of study '{study_name}' finished ({result.counts['FAIL']} failed"
                          f"{', e.g. ' + reasons[-1] if reasons else ''}); see {out / 'trials.csv'}, fix the "
                          "problem and re-run")
    if failed_workers:
        raise ImgclfError(f"worker(s) {failed_workers} stopped early (killed, or the error above); finished trials "
                          "are kept: fix the problem and re-run the same command to add the missing trials")
    return result


def _fixed_settings(settings: dict[str, Any], space: Space) -> dict[str, Any]:
    """Settings that fix what neither tune's own options nor the space's parameters decide."""
    own = {"dataset": "--dataset", "data_dir": "--data-dir", "subset": "--subset", "val_split": "--val-split",
           "epochs": "--epochs", "threads": "--workers (each worker gets cores / workers threads)"}
    if not isinstance(settings.get("model_options", {}), dict):
        raise ImgclfError(f"model_options is a mapping of the model's options, not {settings['model_options']!r}")
    for key in settings:
        if key in own:
            raise ImgclfError(f"{key} is an option of tune itself: pass {own[key]} instead of --set {key}=...")
    paths = {override_path(key) for key in settings if key != "model_options"}
    paths |= {f"model.{key}" for key in settings.get("model_options") or {}}
    searched = sorted(paths & searched_paths(space))
    if searched:
        verb = "is" if len(searched) == 1 else "are"
        raise ImgclfError(f"{', '.join(searched)} {verb} searched by space {space.name}, so a fixed value would be "
                          "overwritten; drop the --set, or copy the space's YAML and fix it there")
    return dict(settings)


def plan_trials(study: optuna.Study, target: int, grid: list[dict[str, Any]] | None) -> int:
    """How many trials this command runs: up to the target, less what is done or running elsewhere.

    For a grid, enqueue the points not yet done, running or queued (as many as are needed): the storage hands
    each waiting trial to exactly one worker, which GridSampler alone does not guarantee with parallel workers.
    """
    trials = study.get_trials(deepcopy=False)
    n = target - sum(t.state in (*COUNTED, TrialState.RUNNING) for t in trials)
    if grid is None or n <= 0:
        return max(n, 0)
    taken = [t.system_attrs.get("fixed_params", t.params) for t in trials if t.state != TrialState.FAIL]
    waiting = sum(t.state == TrialState.WAITING for t in trials)
    for point in [p for p in grid if p not in taken][:max(0, n - waiting)]:
        study.enqueue_trial(point)
        waiting += 1
    return min(n, waiting)


def _run_processes(job: Job, n_trials: int, processes: int) -> list[int]:
    """Run the trials in worker processes; returns the numbers of the workers that failed."""
    # spawn, not fork: a forked copy of a process that already ran torch can deadlock in its thread pools
    context = multiprocessing.get_context("spawn")
    shares = [n_trials // processes + (i < n_trials % processes) for i in range(processes)]
    workers = [context.Process(target=_worker_process, args=(job, share, f"worker {i + 1}: ", os.getpid()))
               for i, share in enumerate(shares)]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        for w, gpu in zip(workers, worker_gpus(job.base.train.device, processes), strict=True):
            if gpu is not None:  # in the environment it starts with: set before anything there can start CUDA
                os.environ["CUDA_VISIBLE_DEVICES"] = gpu
            w.start()
    finally:
        if visible is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible
    try:
        for w in workers:
            w.join()
    except KeyboardInterrupt:  # the workers got the Ctrl-C too: let them finish failing their trials
        for w in workers:
            w.join(timeout=30)
        raise
    return [i + 1 for i, w in enumerate(workers) if w.exitcode != 0]


def worker_gpus(device: str, processes: int) -> list[str | None]:
    """The GPU of each worker process (its CUDA_VISIBLE_DEVICES), in turn: else each would put its trials on the
    first GPU. None each for trials on the CPU (--device cpu) or on a machine without a GPU."""
    gpus = visible_gpus() if device in ("auto", "cuda") else []
    if not gpus:
        return [None] * processes
    if processes > len(gpus):
        warnings.warn(f"--workers {processes} share {len(gpus)} GPU(s): trials on the same GPU share its memory "
                      f"and time (use --workers {len(gpus)} to give each its own)", stacklevel=4)
    return [gpus[i % len(gpus)] for i in range(processes)]


def _check_claim(out: Path, study: str, storage: str, as_given: str | None) -> Callable[[], None]:
    """One study per output folder: its trial runs (trials/N-K), trials.csv, report and best.yaml are that
    study's, so a second study there would overwrite them and fail on the first one's trial folders.
    `storage` is "study.log" for the journal inside `out`, else absolute; a study claimed before imgclf made
    storages absolute holds them as given. Returns what claims `out` for the study (a no-op if it is claimed)."""
    marker, claim = out / "study.json", {"study": study, "storage": _shown(storage)}
    try:
        held = json.loads(marker.read_text())
        if not isinstance(held, dict):
            raise ValueError("not an object")
    except FileNotFoundError:
        held = None
    except (OSError, ValueError):
        raise ImgclfError(f"{marker} is damaged (not the JSON imgclf writes); restore it, or delete it if {out} "
                          f"holds study '{study}'") from None
    if held is None:
        def write() -> None:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write(marker, json.dumps(claim))
        return write
    if held.get("study") == study and held.get("storage") not in (claim["storage"], as_given and _shown(as_given)):
        fix = "leave out --storage" if held.get("storage") == "study.log" else f"give --storage {held.get('storage')}"
        raise ImgclfError(f"{out} holds study '{study}' in {held.get('storage')}, not in {claim['storage']}; to go "
                          f"on with it, {fix} (or give this study its own --out)")
    if held.get("study") != study:
        raise ImgclfError(f"{out} holds study '{held.get('study')}' in {held.get('storage')}; give study '{study}' "
                          f"({claim['storage']}) its own --out")
    return lambda: None


def absolute_storage(storage: str) -> str:
    """A journal path or SQLite URL made absolute: a relative one names another file from another folder."""
    if "://" not in storage and re.match(r"[A-Za-z][\w+.-]+:/", storage):  # else a journal named sqlite:/x.db
        raise ImgclfError(f"storage '{storage}' looks like a database URL short of a slash; write e.g. "
                          "sqlite:///FILE.db or postgresql://USER:PASSWORD@HOST/DB")
    if "://" not in storage:
        return str(Path(storage).expanduser().resolve())
    prefix = "sqlite:///"
    path, query = storage.removeprefix(prefix).partition("?")[::2]
    if not storage.startswith(prefix) or path.startswith("/") or path in ("", ":memory:"):
        return storage
    return prefix + str(Path(path).expanduser().resolve()) + ("?" + query if query else "")


def dataset_identity(dataset: str, data: Dataset) -> str:
    """What a study's trials are scored on, alike on every machine: a dataset's name, or an image folder's name
    and a digest of its decoded images and labels (the same images at another path join; changed images do not)."""
    if dataset in DATASETS:
        return dataset
    digest = hashlib.sha256(json.dumps(data.class_names).encode())
    for split in data.splits().values():
        split.hash_into(digest)
    return f"folder {Path(dataset).name}, sha256 {digest.hexdigest()[:16]}"


def _check_same_setup(study: optuna.Study, setup: dict[str, Any], storage: str,
                      older_form: dict[str, Any] | None = None) -> None:
    """A study's trials compare only under one dataset, space and training setup: refuse to mix them.

    A study begun before folders had identities (which named a folder by its path) takes the new form."""
    setup, older = json.loads(json.dumps([setup, older_form]))  # as the storage gives them back
    stored = study.user_attrs.get("imgclf")
    if stored is None or stored == older:
        study.set_user_attr("imgclf", setup)
    elif stored != setup:
        raise ImgclfError(f"study '{study.study_name}' in {_shown(storage)} was run with other settings "
                          f"({differing_settings(stored, setup)}); dataset, space, epochs, subset, executions and "
                          "base recipe must match: use another --study and --out, or the original settings")


def _not_run(trial: optuna.trial.FrozenTrial) -> bool:
    """A placeholder, not a failure: its worker asked for a trial the study no longer needed (see _redundant)."""
    return trial.state == TrialState.FAIL and trial.user_attrs.get("fail_reason", "").startswith("not run")


def _state(trial: optuna.trial.FrozenTrial) -> str:
    return "SKIPPED" if _not_run(trial) else trial.state.name


def _counts(trials: list[optuna.trial.FrozenTrial]) -> dict[str, int]:
    counts = {state.name: 0 for state in TrialState} | {"SKIPPED": 0}
    for t in trials:
        counts[_state(t)] += 1
    return counts


def _shown(storage: str) -> str:
    """The storage URL without its password, for messages."""
    return re.sub(r"://([^:/@]*):[^@]*@", r"://\1:***@", storage)


def _fail_reason(trial: optuna.trial.FrozenTrial) -> str:
    if trial.state != TrialState.FAIL:
        return ""
    return trial.user_attrs.get("fail_reason", "its worker stopped while running it (killed, or the machine was lost)")


# ---- outputs ---------------------------------------------------------------------------------------------

def write_outputs(study: optuna.Study, out: Path, storage: str, quiet: bool = False,
                  data: tuple[str, str | None] | None = None) -> TuneResult:
    """trials.csv, best.yaml, figures/ and report.html in `out`, and a table of the best trials.

    `data`: (dataset, data_dir) as this machine has them, for best.yaml (the best trial may have run elsewhere).
    """
    out.mkdir(parents=True, exist_ok=True)
    # Two commands on one study that end together: the later one reads the study once the earlier one has
    # written, so outputs of an older state of the study never replace newer ones.
    with folder_lock(out):
        result, best_trials = _write_outputs(study, out, storage, data)
    if not quiet:  # the lock released first: a terminal that stops reading must not hold up other commands
        _print_outputs(result, best_trials)
    return result


def _write_outputs(study: optuna.Study, out: Path, storage: str, data: tuple[str, str | None] | None
                   ) -> tuple[TuneResult, list[optuna.trial.FrozenTrial]]:
    trials = study.get_trials(deepcopy=False)
    ranked = sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: -t.value)
    best = ranked[0] if ranked else None
    best_recipe = None
    if best is not None:
        config = RunConfig.from_dict(best.user_attrs["config"], source=f"trial {best.number}")
        config.train.threads = None
        if data is not None:
            config.data.dataset, config.data.data_dir = data
        # Absolute, as a run's config.yaml has them: best.yaml is meant to be trained from any folder.
        config.data.dataset = canonical_dataset(config.data.dataset)
        config.data.data_dir = canonical_data_dir(config.data.data_dir)
        config.description = (f"tuned by imgclf tune: study {study.study_name}, trial {best.number}, "
                              f"val acc {best.value:.4f}")
        best_recipe = out / "best.yaml"
    counts = _counts(trials)  # the trials of the table and best.yaml, not a later look at the study
    with written_together(out) as scratch:
        atomic_write(scratch / "trials.csv", trials_csv(trials))
        if best is not None:
            atomic_write(scratch / "best.yaml", "# The best trial's complete run: imgclf train --recipe best.yaml "
                                                "--out RUN\n# (it trained on data.subset images for train.epochs "
                                                "epochs: change them to train the winner longer)\n" + config.to_yaml())
        figures = plot_study(study, scratch / "figures")
        atomic_write(scratch / "report.html", _report_html(study, storage, counts, ranked[:10], trials, figures,
                                                           scratch / "figures"))
    return TuneResult(out, study.study_name, storage, counts, best.value if best else None,
                      best.user_attrs.get("values") if best else None, best_recipe), ranked[:10]


def _print_outputs(result: TuneResult, best_trials: list[optuna.trial.FrozenTrial]) -> None:
    table = Table("trial", "val acc", "seconds", "parameters", title=f"best trials of {escape(result.study)}")
    table.columns[-1].overflow = "fold"
    for t in best_trials:
        table.add_row(str(t.number), f"{t.value:.2%}", f"{t.duration.total_seconds():.0f}",
                      escape(describe_settings(t.user_attrs.get("values", t.params))))
    console.print(table)
    counts, out, best_recipe = result.counts, result.out, result.best_recipe
    console.print(f"{counts['COMPLETE']} complete, {counts['PRUNED']} pruned, {counts['FAIL']} failed"
                  + (f", {counts['RUNNING']} running elsewhere (re-run this command once they finish to "
                     "bring these files up to date)" if counts["RUNNING"] else "")
                  + f": wrote {out / 'trials.csv'}, {out / 'report.html'}"
                  + (f", {best_recipe} (imgclf train --recipe {best_recipe})" if best_recipe else ""))


def trials_csv(trials: list[optuna.trial.FrozenTrial]) -> str:
    """One row per trial: number, state, value, duration, every parameter, the worker and why it failed."""
    names = sorted({name for t in trials for name in t.params}, key=natural_key)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["number", "state", "value", "duration_s", "datetime_start", *names, "worker", "fail_reason"])
    for t in trials:
        writer.writerow([t.number, _state(t), "" if t.value is None else t.value,
                         "" if t.duration is None else round(t.duration.total_seconds(), 2),
                         t.datetime_start.isoformat(timespec="seconds") if t.datetime_start else "",
                         *[t.params.get(n, "") for n in names], t.user_attrs.get("worker", ""), _fail_reason(t)])
    return buffer.getvalue()


PLOTS = {
    "history": ("Optimisation history", "plot_optimization_history"),
    "parallel_coordinates": ("Parallel coordinates", "plot_parallel_coordinate"),
    "importances": ("Parameter importances", "plot_param_importances"),
    "slice": ("Slice plots", "plot_slice"),
}


def plot_study(study: optuna.Study, folder: Path) -> dict[str, str]:
    """Optuna's matplotlib figures of the study; returns {name: title} of those drawn (some need 2+ trials)."""
    import matplotlib
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as vis

    from imgclf.report import save_figure

    drawn, opened = {}, set(plt.get_fignums())  # a notebook's own figures stay open
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    # matplotlib.category logs "strings that look like numbers" for each int choice. Optuna's plots switch
    # matplotlib to its ggplot style: a notebook's own style comes back afterwards.
    try:
        with quieter_loggers(logging.WARNING, "matplotlib.category"), matplotlib.rc_context():
            for name, (title, function) in PLOTS.items():
                if len(complete) < (2 if name == "importances" else 1):
                    continue
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                    try:
                        axes = getattr(vis, function)(study)
                    except (ValueError, RuntimeError, ZeroDivisionError):  # e.g. importances of a fixed parameter
                        continue
                figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
                if name == "slice":
                    figure.set_size_inches(min(max(6, 3.2 * len(figure.axes)), 24), 4)
                    for ax in figure.axes:  # log-scale and category ticks run into each other at 3 inches
                        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
                else:
                    figure.set_size_inches(9, 5)
                if name == "history":  # Optuna's "Objective Value" and half-trial ticks
                    axes.set_ylabel("validation accuracy")
                    axes.xaxis.get_major_locator().set_params(integer=True)
                save_figure(figure, folder / f"{name}.png")
                drawn[name] = title
    finally:
        for number in set(plt.get_fignums()) - opened:  # Optuna draws with pyplot, which keeps figures until closed
            plt.close(number)
    return drawn


def _report_html(study: optuna.Study, storage: str, counts: dict[str, int], ranked: list, trials: list,
                 figures: dict[str, str], figure_dir: Path) -> str:
    import html

    from imgclf.report import embedded_png, html_page, html_table

    e = html.escape
    setup = study.user_attrs.get("imgclf", {})
    facts = [["study", study.study_name], ["storage", _shown(storage)], ["dataset", setup.get("dataset")],
             ["search space", setup.get("space")], ["epochs", setup.get("base", {}).get("train", {}).get("epochs")],
             ["subset", setup.get("base", {}).get("data", {}).get("subset")],
             ["executions per trial", setup.get("executions")],
             ["trials", ", ".join(f"{n} {state.lower()}" for state, n in counts.items() if n)]]
    best = [[t.number, f"{t.value:.2%}", round(t.duration.total_seconds()),
             describe_settings(t.user_attrs.get("values", t.params))] for t in ranked]
    failed = [[t.number, _fail_reason(t)] for t in trials if t.state == TrialState.FAIL and not _not_run(t)]
    few = counts.get("COMPLETE", 0) < 20  # importances of a handful of trials are mostly noise
    images = "".join(f"<h2>{e(title)}</h2>" + (f"<p class=sub>from {counts.get('COMPLETE', 0)} complete trials: a "
                     "rough guide, not a measurement</p>" if name == "importances" and few else "")
                     + embedded_png(figure_dir / f"{name}.png", title) for name, title in figures.items())
    body = f"""
<h1>Tuning: {e(study.study_name)}</h1>
<p class=sub>objective: validation accuracy &middot; all trials in trials.csv &middot; the best as a recipe in
best.yaml</p>
{html_table(None, facts)}
<h2>Best trials</h2>
{html_table(["trial", "val acc", "seconds", "parameters"], best) if best else "<p>No completed trial yet.</p>"}
{images}
{"<h2>Failed trials</h2>" + html_table(["trial", "reason"], failed) if failed else ""}
"""
    return html_page(f"imgclf tuning: {study.study_name}", body)
