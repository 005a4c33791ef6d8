"""Run a planned sweep on Ray Tune: data prepared once, the parent run opened, trials scheduled and
logged to MLflow by the driver, until every cell has ended or the sweep is interrupted."""

from __future__ import annotations

import json
import logging
import os
import signal
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import optuna
import ray
import sqlalchemy
from ray import tune
from ray.tune import Callback

from fakedet.config import default_cache_root
from fakedet.console import say, wrap
from fakedet.data import cache_hash, load_splits, resolve_data
from fakedet.data.training import set_name, training_set, with_training_sets
from fakedet.provenance import run_record
from fakedet.sweep.hpo import Objectives, StudySearch, scheduler_for
from fakedet.sweep.plan import SweepPlan, trial_resources
from fakedet.sweep.progress import Progress
from fakedet.sweep.record import tune_state_saved, write_sweep_file
from fakedet.sweep.refusals import UNKNOWN_DEVICE, Exit, Refused, Stopping, disk_full, fatal_in
from fakedet.sweep.request import RequestError, SweepRequest
from fakedet.sweep.spec import FaultInjection
from fakedet.sweep.study import Budget
from fakedet.sweep.tags import TAG_KIND
from fakedet.sweep.store import SweepTracking, compare_link, runs_link
from fakedet.sweep.tracking import MlflowCellCallback
from fakedet.sweep.trainable import run_trial
from fakedet.sweep.preflight import answering_quickly
from fakedet.sweep.trust import TAG_STATE_DIGEST, record_state
from fakedet.sweep.writer import TrackingUnavailable, first_line, writer_for
from fakedet.train import rounding_note


@dataclass
class SweepOutcome:
    plan: SweepPlan
    tracking: SweepTracking
    record: dict[str, Any]
    cache: Path
    data_hash: str
    ended_cells: int
    failed_trials: int
    tracking_error: str | None = None
    tracking_status: int | None = None
    """the HTTP status of the store's refusal that stopped the sweep (401, 403), None for an outage"""

    @property
    def complete(self) -> bool:
        return self.tracking_error is None and self.ended_cells >= self.plan.cell_count


def prepare_data(plan: SweepPlan, request: SweepRequest) -> tuple[Path, str, dict]:
    size, variant = plan.study.data.size, plan.study.data.variant
    options = plan.study.data.prepare_options(plan.study.train_ons())
    cache = resolve_data(request.data, request.cache_root or default_cache_root(), size=size, variant=variant, options=options)
    data_hash = cache_hash(cache)
    splits = with_training_sets(load_splits(cache), plan.study.train_ons(), seed=options.seed)
    say(wrap(f"data: {request.data} ({f'{size}, {variant}' if request.data == 'synthetic' else cache}), cache {data_hash}; "
             + ", ".join(f"{k} {len(v)}" for k, v in splits.items())))
    return cache, data_hash, splits


class RayNoise(logging.Filter):
    """Ray's lines that fakedet says in its own words, or that say nothing to act on (Ray 2.60):

    - `ray/_private/authentication/authentication_token_setup.py`: "Token authentication is enabled for
      this Ray cluster" on every new local instance; token authentication is what Ray does by default
      and stays on. Its warning that authentication is *disabled* (joining a cluster without a token)
      still passes;
    - `ray/tune/tune.py`, `ray/tune/analysis/experiment_analysis.py`: on Ctrl-C the stop warning becomes
      one `[interrupt]` line; the `Tuner.restore(...)` hint, the list of unfinished trials and the
      warnings about trials without results (FileNotFoundError: trials that never started) are dropped:
      the sweep then says how many cells ended and its `--resume` command. Outside an interrupt every
      warning and error of Tune passes; "Failed to restore the run state" with its traceback, once
      fakedet has said which file is damaged and what Tune does instead (`damaged_run_state`);
    - `ray/tune/execution/tune_controller.py`, `experiment_state.py`: the traceback of a trial's fatal
      fault and of the experiment state that a full disk could not save, said by `FatalStop` in one line."""

    LOGGERS = ("ray._private.authentication.authentication_token_setup", "ray.tune.tune",
               "ray.tune.analysis.experiment_analysis", "ray.tune.execution.tune_controller",
               "ray.tune.execution.experiment_state")  # fmt: skip

    restart_said = False
    """fakedet has said why Tune cannot restore its run state (`damaged_run_state`): Tune's traceback is dropped"""

    def __init__(self, say_line: Callable[[str], None] = say) -> None:
        super().__init__()
        self.say_line = say_line
        self.interrupted = False

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if msg.startswith(("Trial task failed", "Saving experiment state")) and record.exc_info:
            # a fatal fault's traceback (a full disk, a checkpoint that does not load): FatalStop says it in one line
            text = "".join(traceback.format_exception(*record.exc_info))
            return fatal_refusal(text) is None
        if msg.startswith("Token authentication is enabled for this Ray cluster"):
            return False
        if msg.startswith(("Failed to restore the run state", "Restarting experiment")) and RayNoise.restart_said:
            return False
        if msg.startswith("Stop signal received"):
            self.interrupted = True
            fatal = Stopping.refusal
            self.say_line(f"[stop] {fatal}: the running trials save their state once more" if fatal else
                          "[interrupt] stopping: the running trials save their state once more (Ctrl-C again: stop at once)")
            return False
        if msg.startswith("Experiment has been interrupted"):
            return False
        return not (self.interrupted and msg.startswith(("Trials did not complete", "Failed to fetch metrics")))

    def install(self) -> "RayNoise":
        for name in self.LOGGERS:
            logger = logging.getLogger(name)
            for old in [f for f in logger.filters if isinstance(f, RayNoise)]:
                logger.removeFilter(old)
            logger.addFilter(self)
        return self


class FatalStop(Callback):
    """A trial's fault that a retry cannot remove stops the sweep, resumably, instead of being retried as a
    crash (Ray's FailureConfig retries every trial error alike, up to `max_failures`): a full disk (ENOSPC
    while the trial writes its checkpoint) or a checkpoint that does not load (`FatalTrialError` in the
    trainable). Ray gives the driver a trial's error as text (the trial's `error.txt`); its mark
    (`refusals.FATAL_MARK`) is looked for there, or the ENOSPC text. The stop is Tune's own interrupt
    (SIGUSR1, which Tune handles as Ctrl-C): every trial keeps its state and its status, so `--resume`
    continues them; the failure is not counted against the trial's retries."""

    def __getstate__(self) -> dict:  # pickled with the Tuner's state: nothing to keep
        return {}

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        if self._check(trial):
            trial.run_metadata.num_failures -= 1  # not the trial's fault: no retry spent

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._check(trial)

    def _check(self, trial) -> bool:
        refusal = fatal_refusal(last_failure(trial.error_file), getattr(trial, "path", None))
        if refusal is None:
            return False
        if Stopping.refusal is None:
            Stopping.refusal = refusal
            if callable(signal.getsignal(signal.SIGUSR1)):  # Tune's handler (it installs one in the main thread)
                signal.raise_signal(signal.SIGUSR1)
            else:
                raise refusal
        return True


def last_failure(error_file: str | None) -> str:
    """The text of a trial's last failure in its `error.txt` (Ray appends each as "Failure # N ...")."""
    if not error_file:
        return ""
    try:
        text = Path(error_file).read_text(errors="replace")
    except OSError:
        return ""
    return text[text.rfind("Failure # "):]


def fatal_refusal(text: str, trial_path: str | None = None) -> Refused | None:
    """The refusal a trial's error text says: its fatal mark, or no space left on a device (the file the OS
    named; else the trial's folder in Ray's storage, where it was saving its checkpoint)."""
    marked = fatal_in(text)
    if marked is not None:
        return marked
    where = disk_full(RuntimeError(text))
    if where is None:
        return None
    if where == UNKNOWN_DEVICE and trial_path:
        where = f"the device of {trial_path} (or the temp folder)"
    return Refused(f"no space left on {where} while a trial saved its checkpoint; free space there, then --resume "
                   f"(every trial continues from its last evaluation point)", Exit.DISK_FULL)


def quiet_ray() -> None:
    """What Ray prints that fakedet replaces (Ray 2.60): the experiment box, "View detailed results here"
    and the TensorBoard hint of Tune's new output engine, which prints them even at `verbose=0` (the
    older engine, `RAY_AIR_NEW_OUTPUT=0`, prints nothing at verbose 0; fakedet's `[progress]` line and
    its own `ray:` line say what matters; a value the user set is kept); Tune's info lines; `RayNoise`."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    logging.getLogger("ray.tune").setLevel(logging.WARNING)
    RayNoise().install()


def init_ray(request: SweepRequest) -> None:
    quiet_ray()
    # ray.init installs its C++ failure handler for SIGTERM in the driver (it logs "*** SIGTERM received ***"
    # and aborts: exit -6, no resume line); the command line's own handler (Ctrl-C's path) is put back after it
    on_sigterm = signal.getsignal(signal.SIGTERM)
    try:
        _init_ray(request)
    finally:
        if callable(on_sigterm):
            signal.signal(signal.SIGTERM, on_sigterm)


def _init_ray(request: SweepRequest) -> None:
    if request.address:
        ray.init(address=request.address, log_to_driver=request.verbose, logging_level=logging.WARNING)
    else:
        # "local": always a fresh single-machine instance, never a stale cluster found in /tmp/ray;
        # logging_level: not its "Started a local Ray instance." (fakedet's `ray:` line follows)
        kwargs = {"address": "local", "include_dashboard": False, "log_to_driver": request.verbose,
                  "logging_level": logging.WARNING}
        if request.num_cpus:
            kwargs["num_cpus"] = request.num_cpus
        if request.ray_temp_dir:
            kwargs["_temp_dir"] = str(Path(request.ray_temp_dir).resolve())
        ray.init(**kwargs)


def ray_resources(request: SweepRequest) -> Callable[[Budget], dict[str, float]]:
    """What the plan asks for each trial's resources: Ray started, then the cluster's GPUs looked at."""
    def resources(budget: Budget) -> dict[str, float]:
        init_ray(request)
        per_trial = trial_resources(budget, request, ray.cluster_resources().get("GPU", 0))
        if not request.address:  # a local Ray never grows: a trial asking more than it has would wait forever
            check_satisfiable(per_trial, ray.cluster_resources())
        return per_trial
    return resources


def ray_cpus() -> float:
    """The CPUs of the Ray that `ray_resources` started or joined."""
    return float(ray.cluster_resources().get("CPU", 0))


def check_satisfiable(per_trial: dict[str, float], cluster: dict[str, float]) -> None:
    """Refuse a trial that asks a fixed-size (local) Ray for more CPUs or GPUs than it has."""
    for key, ray_key, flag in (("cpu", "CPU", "--cpus-per-trial"), ("gpu", "GPU", "--gpus-per-trial")):
        asked, have = per_trial.get(key, 0.0), cluster.get(ray_key, 0.0)
        if asked > have:
            raise RequestError(f"each trial asks for {asked:g} {ray_key}s but the local Ray has {have:g}: no trial could "
                               f"ever start; lower {flag} (or the study's [budget] {key}s_per_trial)")


def reuse_workers() -> bool:
    """Whether a trial runs in a Ray worker process an earlier trial of the sweep ran in (Ray Tune's
    `reuse_actors`; a function trainable is reset between trials, `FunctionTrainable.reset_config`), so
    that a worker's start and its imports (about 4 CPU-seconds) are paid once per worker, not per trial.
    A worker whose trial crashed is never reused: the retry starts a new one from the checkpoint.
    `FAKEDET_REUSE_WORKERS=0` starts a new worker per trial (benchmarks/bench_sweep.py --fresh-workers)."""
    return os.environ.get("FAKEDET_REUSE_WORKERS", "1") != "0"


def tune_config(plan: SweepPlan, request: SweepRequest) -> tune.TuneConfig:
    if plan.kind == "ablation":
        return tune.TuneConfig(num_samples=1, max_concurrent_trials=request.max_concurrent or None,
                               trial_dirname_creator=_trial_dirname, reuse_actors=reuse_workers())
    budget, metrics = plan.study.budget, plan.study.metrics
    storage_url = optuna_storage_url(request)
    objectives = Objectives.of(metrics)
    searcher = StudySearch(objectives, plan.cell_epochs[-1], storage=optuna.storages.RDBStorage(storage_url),
                           study_name=plan.name, seed=budget.seed)
    say(f"optuna study {plan.name!r} in {storage_url} (view it with: optuna-dashboard {storage_url})")
    if objectives.multi:
        say(f"objectives {', '.join(objectives.keys)} ({', '.join(objectives.modes)}), each at a trial's last point; "
            "no ASHA: every trial runs its full length (Ray's schedulers rank on one metric)")
        # the searcher holds the metrics and modes (lists); Tune's own metric is single, so it stays unset
        return tune.TuneConfig(search_alg=searcher, scheduler=scheduler_for(objectives, budget, plan.cell_epochs[-1]),
                               num_samples=plan.total_trials, max_concurrent_trials=request.max_concurrent or budget.max_concurrent,
                               trial_dirname_creator=_trial_dirname, reuse_actors=reuse_workers())
    return tune.TuneConfig(metric=objectives.keys[0], mode=objectives.modes[0], search_alg=searcher,
                           scheduler=scheduler_for(objectives, budget, plan.cell_epochs[-1]),
                           num_samples=plan.total_trials, max_concurrent_trials=request.max_concurrent or budget.max_concurrent,
                           trial_dirname_creator=_trial_dirname, reuse_actors=reuse_workers())


def optuna_storage_url(request: SweepRequest) -> str:
    return request.optuna_storage or f"sqlite:///{Path.cwd() / 'optuna.db'}"


def hidden_password(url: str) -> str:
    return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def run_config(plan: SweepPlan, storage: str, callbacks: list) -> tune.RunConfig:
    return tune.RunConfig(
        name=plan.name,
        storage_path=storage,
        callbacks=callbacks,
        verbose=0,
        failure_config=tune.FailureConfig(max_failures=plan.study.budget.max_failures),
        # every evaluation point's checkpoint is kept: a few hundred kB each, and any point can be
        # reloaded later (a cutoff's model); a num_to_keep limit also forces an experiment snapshot per checkpoint
        checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
    )


def ended_cells(tracking: SweepTracking) -> int:
    """Cells whose MLflow run has ended (finished, stopped early by the scheduler, or failed for good)."""
    return sum(r.info.status in ("FINISHED", "KILLED", "FAILED") for r in tracking.cell_runs() if r.data.tags.get(TAG_KIND) == "cell")


def run_sweep(plan: SweepPlan, request: SweepRequest, storage: str, tracking_uri: str, experiment: str,
              meta: dict | None) -> SweepOutcome:
    """Prepare data, open (or reopen) the parent run, run every trial of the planned (bundled) sweep on the
    Ray the plan started; returns what ended."""
    outage_s = request.tracking_outage
    cache, data_hash, splits = prepare_data(plan, request)
    # the first moment the training set's size is known: a batch larger than it could only fail in every trial
    smallest = min(plan.study.train_ons(), key=lambda t: len(splits[set_name(t)]))
    plan.study.check_training_set(len(splits[set_name(smallest)]), f"{set_name(smallest)} of --data {request.data} (cache {data_hash})")
    if meta and meta.get("data_hash") not in (None, data_hash) and not request.allow_data_change:
        raise ValueError(f"--resume: the data changed since sweep {plan.name} started (cache {meta['data_hash']} then, "
                         f"{data_hash} now); its cells would mix two datasets. Pass --allow-data-change to resume anyway")
    # said once per batch size (the HPO template's: a sampled batch size rounds its own way)
    first = {t.config.batch_size: t.config for spec in (plan.trials or (plan.template,)) for t in spec.trajectories}
    for cfg in first.values():
        note = rounding_note(cfg, len(training_set(splits, cfg)))
        if note:
            say(note)
    resources = plan.resources
    if plan.bundle > 1:
        form = "one seed each, one wide network's step" if plan.bundle_by_seed else "one fused step each"
        say(f"bundles: up to {plan.bundle} trajectories per trial, {form} ({plan.total_trials} trials)")
    say(f"ray: {ray.cluster_resources().get('CPU', 0):g} CPUs, {ray.cluster_resources().get('GPU', 0):g} GPUs; "
        f"each trial asks for {resources}; results under {storage}/{plan.name}")

    record = run_record()
    run_params = {"data": request.data, "data_hash": data_hash, "code_version": record["code_version"], "sweep": plan.name}
    if meta:
        tracking = SweepTracking.open(tracking_uri, experiment, plan.name, {}, {}, parent_run_id=meta["parent_run_id"])
    else:
        sweep_params = {"kind": plan.kind, "study": plan.study.source, "preset": plan.study.preset or "", "data": request.data,
                        "data_hash": data_hash, "code_version": record["code_version"], "trials": plan.total_trials,
                        "cells": plan.cell_count,
                        # what the views need to redraw the cutoff analysis without the study file
                        "cutoff_select_on": plan.study.cutoff.select_on, "cutoff_report": list(plan.study.cutoff.report)}
        if plan.kind == "hpo":  # where the answer is read back from (a password in the URL is not logged)
            sweep_params.update({"optuna_study": plan.name, "optuna_storage": hidden_password(optuna_storage_url(request)),
                                 "objective": ",".join(plan.study.metrics.objectives)})
        tracking = SweepTracking.open(tracking_uri, experiment, plan.name, sweep_params, {"fakedet.study": plan.study.name})
        write_sweep_file(storage, plan.name, {
            "kind": plan.kind, "name": plan.name, "tracking_uri": tracking.uri, "experiment_id": tracking.experiment_id,
            "experiment": experiment, "parent_run_id": tracking.parent_run_id,
            # the request and the resolved study: --resume and cutoff run these, not today's study file
            "request": request.recorded(), "bundle_size": plan.bundle,
            "bundle_by_seed": plan.bundle_by_seed, "study": plan.study.sections(),
            "study_source": plan.study.source, "cache": str(cache), "data_hash": data_hash, **record})
    if request.crash_once_after_step:
        plan = plan.with_faults(FaultInjection(request.crash_once_after_step, f"{storage}/{plan.name}/crash_once.marker"))
    trainable = tune.with_resources(tune.with_parameters(run_trial, splits=splits, template=plan.template), resources)

    logger = MlflowCellCallback(tracking, plan.template, run_params, {"fakedet.study": plan.study.name}, outage_s=outage_s)
    say(f"MLflow runs: {runs_link(tracking.uri, tracking.experiment_id, plan.name)}")
    if plan.trials and not meta:
        planned = logger.plan_runs(list(plan.trials))
        say(f"MLflow compare: {compare_link(tracking.uri, tracking.experiment_id, planned)}")
    if request.kill_after_planning:  # a driver killed while it planned: the sweep file and cells exist, Tune's state not
        os.kill(os.getpid(), signal.SIGKILL)
    # FatalStop first: it decides, before the others are told, that a failed trial is not retried
    callbacks = [FatalStop(), logger, Progress(plan.total_trials, plan.template)]
    path = f"{storage}/{plan.name}"
    restore = meta is not None and tune_state_saved(storage, plan.name)
    if meta:
        if "://" not in storage:  # what earlier runs of the sweep measured but could not log (local storage)
            replayed = logger.replay_stored(Path(path), plan.trials)
            say(f"resuming {path} (stored results of {replayed} trials checked against MLflow)")
        else:
            say(f"resuming {path}")
    if restore:
        damaged = damaged_run_state(Path(path)) if "://" not in storage else []
        RayNoise.restart_said = bool(damaged)
        if damaged:
            say(f"Tune's run state {', '.join(p.name for p in damaged)} in {path} is truncated (the disk filled, or the "
                f"driver was killed, while Tune wrote it): Tune restarts the sweep's unfinished trials from their "
                f"beginning; what MLflow holds stays, each point logged once")
        tuner = restore_tuner(path, trainable, plan.param_space)
    else:
        if meta:  # stopped while planning, before Tune saved anything: nothing ran, the recorded plan starts afresh
            say(f"{path} holds no Tune state yet (the first run stopped before its trials started): starting them "
                f"afresh from the recorded plan; cells already created in MLflow are reused")
        tuner = tune.Tuner(trainable, param_space=plan.param_space, tune_config=tune_config(plan, request),
                           run_config=run_config(plan, storage, callbacks))
    tracking_error, tracking_status = None, None
    Stopping.refusal = None
    try:
        results = tuner.fit()
        failed = sum(r.error is not None for r in results)
    except KeyboardInterrupt:  # a second Ctrl-C (or SIGTERM): Tune stops at once
        close_parent(tracking, "KILLED")
        raise
    except Exception as e:  # noqa: BLE001 - a tracking outage surfaces from inside Tune's callback
        cause = _tracking_cause(e)
        if Stopping.refusal is not None:  # what the stop left behind (a truncated error.pkl on a full disk) fails next
            close_parent(tracking, "KILLED")
            raise Stopping.refusal from None
        if cause is not None:
            tracking_error, tracking_status, failed = str(cause), cause.status, 0
        else:
            close_parent(tracking, "KILLED")
            if isinstance(e, Refused):
                raise
            where = disk_full(e)
            if where is None:
                raise
            raise Refused(f"no space left on {where} (the sweep's results under {storage}); free space there, then "
                          f"--resume", Exit.DISK_FULL) from None
    finally:
        remember_state(tracking, Path(path), storage)
    if Stopping.refusal is not None:
        close_parent(tracking, "KILLED")
        raise Stopping.refusal
    writer = writer_for(tracking.uri, outage_s)
    if tracking_error is None and not writer.flush(timeout=outage_s):
        try:
            writer.check()  # the writer's own reason, when it gave up
            tracking_error = f"{writer.pending()} tracking writes could not be applied"
        except TrackingUnavailable as e:
            tracking_error, tracking_status = str(e), e.status
    ended = 0 if tracking_error else ended_cells(tracking)
    return SweepOutcome(plan, tracking, record, cache, data_hash, ended, failed, tracking_error, tracking_status)


def damaged_run_state(experiment_dir: Path) -> list[Path]:
    """Tune's latest run-state file (`experiment_state-<date>.json`, the one Tune restores; written in place,
    not atomically) when it does not parse: read as JSON only, nothing unpickled."""
    damaged = []
    for p in sorted(experiment_dir.glob("experiment_state-*.json"))[-1:]:
        try:
            json.loads(p.read_text())
        except (OSError, ValueError):
            damaged.append(p)
    return damaged


def restore_tuner(path: str, trainable, param_space: dict) -> tune.Tuner:
    """Tune's saved state restored, or one line naming the file that does not load (a truncated `tuner.pkl`
    after a full disk or a kill mid-write) and what to do."""
    try:
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                  param_space=param_space)
    except Exception as e:  # noqa: BLE001 - UnpicklingError, EOFError, a JSON error: all one line
        raise Refused(f"Ray could not restore the saved state in {path} ({type(e).__name__}: {first_line(e)}); "
                      f"tuner.pkl or experiment_state-*.json is truncated or damaged: restore the folder from a backup, "
                      f"or start the sweep again under a new --name", Exit.CORRUPT_STATE) from None


def close_parent(tracking: SweepTracking, status: str) -> None:
    """End the parent run as `status` (KILLED: stopped from outside; `--resume` reopens it), asking once."""
    try:
        with answering_quickly():
            tracking.client().set_terminated(tracking.parent_run_id, status)
    except Exception as e:  # noqa: BLE001 - the store is away: the sweep's own line says what to do
        say(f"could not mark the parent run {tracking.parent_run_id} {status} ({first_line(e)})")


def remember_state(tracking: SweepTracking, experiment_dir: Path, storage: str) -> None:
    """Record the digest of Ray's saved state as this driver leaves it, in the parent run, where the next
    `--resume` compares it before letting Ray unpickle the state (`fakedet.sweep.trust`)."""
    if "://" in storage:
        return
    try:
        recorded = record_state(experiment_dir)
        if recorded is None:
            return
        with answering_quickly():
            tracking.client().set_tag(tracking.parent_run_id, TAG_STATE_DIGEST, recorded[0])
    except Exception as e:  # noqa: BLE001 - the sweep's own outcome is reported; this only costs a flag on resume
        say(f"could not record the digest of {experiment_dir}'s saved state ({first_line(e)}); "
            f"the resume will ask for --trust-changed-state")


def _tracking_cause(e: BaseException) -> TrackingUnavailable | None:
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, TrackingUnavailable):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None
