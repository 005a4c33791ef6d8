"""Run a study on Ray Tune: validate everything, prepare data once, schedule trials, analyse, log.

`ablation` runs a grid of cells grouped into shared trajectories; `hpo` runs Optuna TPE through Ray
Tune's OptunaSearch with ASHA stopping; `cutoff` re-reads a finished sweep from MLflow and picks
training-length cutoffs. All three log to MLflow under one parent run per sweep.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any


from fakedet.figures import log_figures
from fakedet.results import SweepResults, points_from_mlflow
from fakedet.sweep.study import Study, StudyError
from fakedet.sweep.tracking import (
    TAG_KIND, TAG_SWEEP, MlflowCellCallback, SweepTracking, check_tracking_uri,
    default_tracking_uri, mlflow_ui_command,
)

SWEEP_FILE = "fakedet_sweep.json"
SUMMARY_COLUMNS = ("cifake_test/acc", "cifake_test/f1", "cifake_test/auc", "cifar100_test/real_recall", "agiri_test/acc", "agiri_test/f1", "agiri_test/auc")


def say(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------------
# progress
# ---------------------------------------------------------------------------------------------------
def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "estimating"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def make_progress_callback(total_trials: int, every_s: float = 10.0):
    from ray.tune import Callback

    class Progress(Callback):
        """One line at most every `every_s` seconds: trials done of total, share of steps, elapsed, ETA."""

        def __init__(self) -> None:
            self.started = time.time()
            self.last_print = 0.0
            self.fraction: dict[str, float] = {}
            self.done: set[str] = set()
            self.failed: set[str] = set()

        def __getstate__(self):
            return {}

        def __setstate__(self, state):
            self.__init__()

        def _line(self, force: bool = False) -> None:
            now = time.time()
            if not force and now - self.last_print < every_s:
                return
            self.last_print = now
            frac = sum(self.fraction.values()) / max(total_trials, 1)
            elapsed = now - self.started
            # a rate from under 2% of the work is mostly start-up cost: no ETA yet
            eta = elapsed * (1 - frac) / frac if frac > 0.02 else math.inf
            say(f"[progress] trials {len(self.done)}/{total_trials} done"
                + (f", {len(self.failed)} failed" if self.failed else "")
                + f" | {100 * frac:5.1f}% of steps | elapsed {_fmt_duration(elapsed)} | ETA {_fmt_duration(eta)}")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            total = result.get("total_steps") or 0
            if total:
                self.fraction[trial.trial_id] = min(1.0, result["step"] / total)
            self._line()

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done.add(trial.trial_id)
            self.fraction[trial.trial_id] = 1.0
            self._line(force=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.failed.add(trial.trial_id)
            self.fraction[trial.trial_id] = 1.0
            say(f"[error] trial {trial.trial_id} ({_trial_label(trial.config)}) failed for good; its log: {trial.local_path}")
            self._line(force=True)

        def on_trial_recover(self, iteration, trials, trial, **info):
            say(f"[retry] trial {trial.trial_id} ({_trial_label(trial.config)}) crashed; retrying from its last checkpoint")

    return Progress()


def _trial_label(config: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in config.items())


# ---------------------------------------------------------------------------------------------------
# set-up shared by ablation and hpo
# ---------------------------------------------------------------------------------------------------
@dataclass
class SweepPlan:
    kind: str
    study: Study
    name: str
    param_space: dict[str, Any]
    base: dict[str, Any]
    total_trials: int
    cell_count: int


def build_plan(kind: str, args) -> SweepPlan:
    """Everything that can be wrong with the request is found here, before data or Ray are touched."""
    study = Study.load(args.study or kind)
    if study.kind != kind:
        raise StudyError(f"{study.source} is a {study.kind} study; run it with `sweeps/run.py {study.kind}`")
    preset = "smoke" if args.smoke else ("standin" if args.data == "synthetic" and "standin" in study.presets else None)
    if preset:
        study = study.with_preset(preset)
    for axis in ("srm", "epochs", "lr"):
        value = getattr(args, axis, None)
        if value is not None:
            study.space[axis] = value
    if getattr(args, "seeds", None) is not None:
        study.space["seeds"] = args.seeds
    if getattr(args, "eval_at", None) is not None:
        study.budget["eval_at"] = list(args.eval_at)
    name = args.name or f"{study.name}-{datetime.now():%Y%m%d-%H%M%S}"
    if kind == "ablation":
        trajectories = study.trajectories()
        first = trajectories[0].config
        axes = {"srm": sorted({t.config.srm for t in trajectories}, key=list(study.space["srm"]).index),
                "lr": sorted({t.config.lr for t in trajectories}),
                "seed": sorted({t.config.seed for t in trajectories})}
        from ray import tune

        param_space = {k: tune.grid_search(v) for k, v in axes.items()}
        base = {"train": first.to_dict(), "cell_epochs": [c.config.epochs for c in trajectories[0].cells]}
        return SweepPlan(kind, study, name, param_space, base, len(trajectories), len(trajectories) * len(trajectories[0].cells))
    return _hpo_plan(study, name, args)


def _hpo_plan(study: Study, name: str, args) -> SweepPlan:
    from ray import tune

    from fakedet.config import TrainConfig, dense_eval_points

    epochs = study.budget.get("epochs", 10)
    if not (isinstance(epochs, int) and epochs > 0):
        raise StudyError(f"hpo budget.epochs must be a positive integer, got {epochs!r}")
    samplers = {"loguniform": tune.loguniform, "uniform": tune.uniform, "choice": tune.choice, "randint": tune.randint}
    space = {}
    for key, spec in study.space.items():
        if key not in TrainConfig.__dataclass_fields__:
            raise StudyError(f"hpo space: {key!r} is not a training config field")
        if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in samplers):
            raise StudyError(f"hpo space: {key} must be one of {{loguniform|uniform|randint = [lo, hi]}} or {{choice = [...]}}, got {spec!r}")
        (how, values), = spec.items()
        if how == "choice":
            if key == "srm":
                from fakedet.models import PLACEMENTS

                bad = [v for v in values if v not in PLACEMENTS]
                if bad:
                    raise StudyError(f"hpo space: unknown SRM placement(s) {bad} (known: {', '.join(PLACEMENTS)})")
            space[key] = tune.choice(list(values))
        else:
            lo, hi = values
            if key == "lr" and lo <= 0:
                raise StudyError(f"hpo space: lr must be > 0, got a lower bound of {lo}")
            space[key] = samplers[how](lo, hi)
    points = set(float(e) for e in study.budget.get("eval_at", [])) | set(dense_eval_points(epochs, per_first_epoch=(0.25, 0.5)))
    base_cfg = study.train_config(epochs=epochs, eval_at=tuple(sorted(points)))
    base = {"train": base_cfg.to_dict(), "cell_epochs": [float(epochs)]}
    samples = int(study.budget.get("num_samples", 20))
    if samples < 1:
        raise StudyError(f"hpo budget.num_samples must be at least 1, got {samples}")
    objective = args.objective or study.metrics.get("objective", "agiri_val/auc")
    if "/" not in objective:
        raise StudyError(f"objective must be a metric named <set>/<metric>, e.g. agiri_val/auc; got {objective!r}")
    if objective.split("/")[0].endswith("_test"):
        raise StudyError(f"objective {objective!r} is on a test split; choose a validation split (cifake_val or agiri_val)")
    study.metrics["objective"] = objective
    return SweepPlan("hpo", study, name, space, base, samples, samples)


def _init_ray(args) -> None:
    import ray

    logging.getLogger("ray.tune").setLevel(logging.WARNING)
    if args.address:
        ray.init(address=args.address, log_to_driver=args.verbose)
    else:
        # "local": always a fresh single-machine instance, never a stale cluster found in /tmp/ray
        kwargs = {"address": "local", "include_dashboard": False, "log_to_driver": args.verbose}
        if args.num_cpus:
            kwargs["num_cpus"] = args.num_cpus
        if args.ray_temp_dir:
            kwargs["_temp_dir"] = str(Path(args.ray_temp_dir).resolve())
        ray.init(**kwargs)


def _resources(study: Study, args) -> dict[str, float]:
    import ray

    cpus = float(args.cpus_per_trial or study.budget.get("cpus_per_trial", 1))
    if args.gpus_per_trial is not None:
        # asked for explicitly: honoured even when no GPU is up yet (an autoscaling cluster adds GPU workers)
        gpus = args.gpus_per_trial
    else:
        gpus = float(study.budget.get("gpus_per_trial", 0.25)) if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    return {"cpu": cpus, "gpu": gpus} if gpus > 0 else {"cpu": cpus}


# ---------------------------------------------------------------------------------------------------
# ablation and hpo
# ---------------------------------------------------------------------------------------------------
def run_study(kind: str, args) -> int:
    from ray import tune

    from fakedet.config import default_cache_root
    from fakedet.data import cache_hash, load_splits, resolve_data
    from fakedet.provenance import run_record
    from fakedet.sweep.trainable import run_trajectory

    storage = _storage_root(args.storage_path)
    meta = None
    if args.resume:
        meta, name = _load_sweep_meta(storage, args.resume, kind)
        args.name = name
        for k in ("data", "smoke", "study"):
            setattr(args, k, meta["args"][k])
        for k in ("srm", "epochs", "lr", "seeds", "eval_at", "objective"):
            if k in meta["args"]:
                setattr(args, k, meta["args"][k])
    plan = build_plan(kind, args)
    uri = meta["tracking_uri"] if meta else (args.tracking_uri or default_tracking_uri())
    check_tracking_uri(uri)
    if meta:
        from mlflow.tracking import MlflowClient

        if MlflowClient(uri).get_run(meta["parent_run_id"]).info.status == "FINISHED":
            say(f"sweep {plan.name} has already finished; nothing to resume "
                f"(to analyse it again: python sweeps/run.py cutoff --sweep {plan.name} --tracking-uri {uri})")
            return 0
    experiment = meta["experiment"] if meta else (args.experiment or plan.study.name)
    say(f"MLflow tracking: {uri} (experiment {experiment!r})")
    say(f"  view it with: {mlflow_ui_command(uri)}")
    say(f"sweep {plan.name}: {plan.total_trials} trials, {plan.cell_count} cells, study {plan.study.source}")

    size = plan.study.data.get("size", "default")
    cache = resolve_data(args.data, args.cache_root or default_cache_root(), size=size)
    data_hash = cache_hash(cache)
    splits = load_splits(cache)
    say(f"data: {args.data} ({size if args.data == 'synthetic' else cache}), cache {data_hash}; "
        + ", ".join(f"{k} {len(v)}" for k, v in splits.items()))

    _init_ray(args)
    import ray

    resources = _resources(plan.study, args)
    say(f"ray: {ray.cluster_resources().get('CPU', 0):g} CPUs, {ray.cluster_resources().get('GPU', 0):g} GPUs; "
        f"each trial asks for {resources}; results under {storage}/{plan.name}")

    record = run_record()
    run_params = {"data": args.data, "data_hash": data_hash, "code_version": record["code_version"], "sweep": plan.name}
    if meta:
        tracking = SweepTracking.open(uri, experiment, plan.name, {}, {}, parent_run_id=meta["parent_run_id"])
    else:
        sweep_params = {"kind": kind, "study": plan.study.source, "data": args.data, "data_hash": data_hash,
                        "code_version": record["code_version"], "trials": plan.total_trials, "cells": plan.cell_count}
        tracking = SweepTracking.open(uri, experiment, plan.name, sweep_params, {"fakedet.study": plan.study.name})
        _write_sweep_meta(storage, plan, tracking, args, cache, data_hash, record)
    base = dict(plan.base)
    if args.crash_once_after_step:
        base["crash_once"] = {"after_step": args.crash_once_after_step, "marker": f"{storage}/{plan.name}/crash_once.marker"}
    trainable = tune.with_resources(tune.with_parameters(run_trajectory, splits=splits, base=base), resources)

    logger = MlflowCellCallback(tracking, base, run_params, {"fakedet.study": plan.study.name})
    progress = make_progress_callback(plan.total_trials)
    path = f"{storage}/{plan.name}"
    if meta:
        say(f"resuming {path}")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   param_space=plan.param_space)
    else:
        tuner = tune.Tuner(trainable, param_space=plan.param_space, tune_config=_tune_config(plan, args),
                           run_config=_run_config(plan, storage, [logger, progress]))
    results = tuner.fit()

    errors = [r for r in results if r.error is not None]
    ended = _ended_cells(tracking)
    if ended < plan.cell_count:
        say(f"\nsweep interrupted ({ended}/{plan.cell_count} cells ended). Resume with:\n"
            f"  python sweeps/run.py {kind} --resume {plan.name}" + (f" --storage-path {args.storage_path}" if args.storage_path else ""))
        return 130
    status = analyse_sweep(tracking, plan.study, kind, plan.base["cell_epochs"], record, cache, data_hash)
    if errors:
        say(f"{len(errors)} trial(s) failed; their cells are marked FAILED in MLflow")
    tracking.client().set_terminated(tracking.parent_run_id, "FAILED" if errors else "FINISHED")
    return 1 if errors or status else 0


def _ended_cells(tracking: SweepTracking) -> int:
    """Cells whose MLflow run has ended (finished, stopped early by the scheduler, or failed for good)."""
    runs = tracking.client().search_runs([tracking.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{tracking.parent_run_id}'",
                                         max_results=50000)
    return sum(r.info.status in ("FINISHED", "KILLED", "FAILED") for r in runs if r.data.tags.get(TAG_KIND) == "cell")


def _tune_config(plan: SweepPlan, args):
    from ray import tune

    if plan.kind == "ablation":
        return tune.TuneConfig(num_samples=1, max_concurrent_trials=args.max_concurrent or None,
                               trial_dirname_creator=_trial_dirname)
    import optuna
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    study = plan.study
    objective = study.metrics["objective"]
    mode = study.metrics.get("mode") or ("min" if objective.endswith("/loss") else "max")
    storage_url = args.optuna_storage or f"sqlite:///{Path.cwd() / 'optuna.db'}"
    searcher = OptunaSearch(storage=optuna.storages.RDBStorage(storage_url), study_name=plan.name,
                            seed=int(study.budget.get("seed", 0)))
    say(f"optuna study {plan.name!r} in {storage_url} (optuna-dashboard {storage_url})")
    scheduler = ASHAScheduler(time_attr="epoch", max_t=float(plan.base["cell_epochs"][-1]),
                              grace_period=float(study.budget.get("grace_period", 1)),
                              reduction_factor=float(study.budget.get("reduction_factor", 3)))
    return tune.TuneConfig(metric=objective, mode=mode, search_alg=searcher, scheduler=scheduler,
                           num_samples=plan.total_trials,
                           max_concurrent_trials=args.max_concurrent or int(study.budget.get("max_concurrent", 2)),
                           trial_dirname_creator=_trial_dirname)


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def _run_config(plan: SweepPlan, storage, callbacks):
    from ray import tune

    return tune.RunConfig(
        name=plan.name,
        storage_path=str(storage),
        callbacks=callbacks,
        verbose=0,
        failure_config=tune.FailureConfig(max_failures=int(plan.study.budget.get("max_failures", 2))),
        # every evaluation point's checkpoint is kept: a few hundred kB each, and any point can be
        # reloaded later (a cutoff's model); a num_to_keep limit also forces an experiment snapshot per checkpoint
        checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
    )


def _storage_root(storage_path: str | None) -> str:
    """Ray Tune's storage: an absolute local folder (default ./ray_results) or a URI (s3://, gs://, ...)."""
    if storage_path and "://" in storage_path:
        return storage_path.rstrip("/")
    return str(Path(storage_path or Path.cwd() / "ray_results").resolve())


def _storage_fs(storage: str):
    """(pyarrow filesystem, path in it) for a local folder or a URI, as Ray Tune itself resolves storage."""
    import pyarrow.fs

    if "://" in storage:
        return pyarrow.fs.FileSystem.from_uri(storage)
    return pyarrow.fs.LocalFileSystem(), storage


def _write_sweep_meta(storage: str, plan: SweepPlan, tracking: SweepTracking, args, cache, data_hash, record) -> None:
    keep = ("data", "smoke", "study", "srm", "epochs", "lr", "seeds", "eval_at", "objective")
    meta = {
        "kind": plan.kind, "name": plan.name, "tracking_uri": tracking.uri, "experiment_id": tracking.experiment_id,
        "experiment": args.experiment or plan.study.name, "parent_run_id": tracking.parent_run_id,
        "args": {k: getattr(args, k, None) for k in keep}, "cache": str(cache), "data_hash": data_hash,
        "study": {"source": plan.study.source, "space": plan.study.space, "fixed": plan.study.fixed, "budget": plan.study.budget,
                  "metrics": plan.study.metrics, "cutoff": plan.study.cutoff, "data": plan.study.data},
        "base": plan.base, **record,
    }
    fs, root = _storage_fs(storage)
    fs.create_dir(f"{root}/{plan.name}", recursive=True)
    with fs.open_output_stream(f"{root}/{plan.name}/{SWEEP_FILE}") as f:
        f.write(json.dumps(meta, indent=1, default=str).encode())


def _load_sweep_meta(storage: str, name: str, kind: str) -> tuple[dict, str]:
    import pyarrow.fs

    fs, root = _storage_fs(storage)

    def read(path: str) -> dict:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())

    if name == "latest":
        infos = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
        metas = []
        for info in infos:
            path = f"{info.path}/{SWEEP_FILE}"
            if info.type == pyarrow.fs.FileType.Directory and fs.get_file_info(path).type == pyarrow.fs.FileType.File:
                meta = read(path)
                if meta.get("kind") == kind:
                    metas.append((fs.get_file_info(path).mtime, meta))
        if not metas:
            raise StudyError(f"--resume: no {kind} sweep found under {storage}")
        meta = max(metas, key=lambda m: m[0])[1]
    else:
        path = f"{root}/{name}/{SWEEP_FILE}"
        if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
            raise StudyError(f"--resume: no sweep {name!r} under {storage} (expected {path})")
        meta = read(path)
    if meta.get("kind") != kind:
        raise StudyError(f"--resume: sweep {meta.get('name')!r} is a {meta.get('kind')} sweep, not {kind}")
    return meta, meta["name"]


# ---------------------------------------------------------------------------------------------------
# analysis, logged to the parent run
# ---------------------------------------------------------------------------------------------------
def analyse_sweep(tracking: SweepTracking, study: Study, kind: str, cell_epochs, record, cache, data_hash) -> int:
    """Summary table, correlations and cutoffs: printed, and logged to the sweep's parent run."""
    from mlflow.entities import Metric

    from fakedet.sweep import analysis

    client = tracking.client()
    points, cells = points_from_mlflow(tracking.client(), tracking.experiment_id, tracking.parent_run_id)
    if points.empty:
        say("no evaluation points were logged; nothing to analyse")
        return 1
    finished = cells[cells["status"] == "FINISHED"].sort_values(["srm", "lr", "seed", "cell_epochs"])
    columns = ["srm", "cell_epochs", "lr", "seed", *[c for c in SUMMARY_COLUMNS if c in finished]]
    if kind == "hpo":
        columns = ["srm", "lr", "momentum", "batch_size", "cell_epochs", *[c for c in SUMMARY_COLUMNS if c in finished]]
    say("\ncells (final values at each cell's epoch count):")
    say(finished[columns].to_string(index=False, float_format=lambda v: f"{v:.4f}"))

    intrinsic = list(study.metrics.get("intrinsic", ["cifake_test/acc", "cifake_test/f1", "cifake_test/auc"]))
    transfer = list(study.metrics.get("transfer", ["agiri_test/acc", "agiri_test/f1", "agiri_test/auc", "cifar100_test/real_recall"]))
    corr_cells = analysis.correlations(finished, intrinsic, transfer)
    corr_points = analysis.correlations(points, intrinsic, transfer)
    corr_within = analysis.within_trajectory_correlations(points, intrinsic, transfer)
    metrics = {**analysis.correlation_metrics(corr_cells, "cells"), **analysis.correlation_metrics(corr_points, "points")}

    cut = study.cutoff
    report = list(cut.get("report", ["agiri_test/auc", "agiri_test/acc", "cifake_test/acc"]))
    cutoffs = analysis.cutoff_table(points, select_on=cut.get("select_on", "agiri_val/auc"),
                                    intrinsic_loss=cut.get("intrinsic_loss", "cifake_val/loss"),
                                    intrinsic_acc=cut.get("intrinsic_acc", "cifake_val/acc"),
                                    patience=int(cut.get("patience", 3)), fixed_epochs=cell_epochs, report=report)
    summary = analysis.cutoff_summary(cutoffs, report)
    metrics.update(analysis.cutoff_metrics(summary, report))

    headline = corr_cells[(corr_cells.method == "spearman") & (corr_cells.intrinsic == intrinsic[0]) & (corr_cells.transfer == transfer[0])]
    if len(headline) and not math.isnan(headline.statistic.iloc[0]):
        h = headline.iloc[0]
        say(f"\nheadline: Spearman ρ({h.intrinsic}, {h.transfer}) across {h.n} cells = {h.statistic:+.3f} (p = {h.p_value:.3g})")
    say("\ncutoffs (mean over trajectories; transfer_val is chosen on AGIRI transfer-validation, never on a test split):")
    say(summary.to_string(index=False, float_format=lambda v: f"{v:.4f}"))

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        finished.to_csv(d / "cells.csv", index=False)
        points.to_csv(d / "points.csv", index=False)
        for name, table in (("correlations_cells", corr_cells), ("correlations_points", corr_points),
                            ("correlations_within_trajectories", corr_within), ("cutoffs", cutoffs), ("cutoff_summary", summary)):
            table.to_csv(d / f"{name}.csv", index=False)
        (d / "correlations.txt").write_text(
            "Transfer vs intrinsic, across cells\n" + corr_cells.to_string(index=False)
            + "\n\nAcross evaluation points (all trajectories pooled)\n" + corr_points.to_string(index=False) + "\n"
        )
        (d / "run_record.json").write_text(json.dumps({**record, "cache": str(cache), "data_hash": data_hash,
                                                        "study": study.source}, indent=1, default=str))
        import matplotlib.pyplot as plt

        for x in intrinsic[:1]:
            for y in transfer:
                if x in finished and y in finished:
                    fig = analysis.scatter_plot(finished, x, y, f"{y} vs {x} ({len(finished)} cells)")
                    fig.savefig(d / f"scatter_{x.replace('/', '_')}_vs_{y.replace('/', '_')}.png", dpi=110, bbox_inches="tight")
                    plt.close(fig)
        fig = analysis.cutoff_plot(points, [report[0], cut.get("select_on", "agiri_val/auc"), "cifake_test/acc", "cifake_val/loss"],
                                   "transfer and intrinsic metrics against training length")
        fig.savefig(d / "cutoff_curves.png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        client.log_artifacts(tracking.parent_run_id, str(d), artifact_path="analysis")
    # the study's tables and figures, so the MLflow UI shows them without a notebook
    log_figures(SweepResults(client.get_run(tracking.parent_run_id), cells, points, client), client, tracking.parent_run_id)
    now = int(time.time() * 1000)
    # a re-analysis (`cutoff`, or a resumed finished sweep) adds only values that changed: no duplicate points
    logged = client.get_run(tracking.parent_run_id).data.metrics
    items = [Metric(k, float(v), now, 0) for k, v in metrics.items()
             if v is not None and math.isfinite(v) and not (k in logged and math.isclose(logged[k], v, rel_tol=0, abs_tol=1e-12))]
    for i in range(0, len(items), 500):  # MLflow takes at most 1000 metrics per batch
        client.log_batch(tracking.parent_run_id, metrics=items[i:i + 500])
    return 0


def run_cutoff(args) -> int:
    """Re-run the analysis of a finished sweep from what MLflow holds (the sweep's name or parent run id)."""
    from mlflow.tracking import MlflowClient

    from fakedet.provenance import run_record

    uri = args.tracking_uri or default_tracking_uri()
    check_tracking_uri(uri)
    client = MlflowClient(uri)
    if not args.sweep:
        raise StudyError("cutoff needs --sweep NAME (or a parent run id): the sweep whose trajectories to analyse")
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`{TAG_KIND}` = 'sweep' and tags.`{TAG_SWEEP}` = '{args.sweep}'", max_results=1)
    if not runs:
        try:
            runs = [client.get_run(args.sweep)]
        except Exception:
            raise StudyError(f"no sweep named {args.sweep!r} (nor a run with that id) in {uri}") from None
    parent = runs[0]
    tracking = SweepTracking(uri, parent.info.experiment_id, parent.info.run_id, parent.data.tags.get(TAG_SWEEP, args.sweep))
    kind = parent.data.params.get("kind", "ablation")
    study = Study.load(parent.data.params.get("study") or args.study or kind)
    points, cells = points_from_mlflow(tracking.client(), tracking.experiment_id, tracking.parent_run_id)
    epochs = sorted(cells["cell_epochs"].unique()) if len(cells) else []
    return analyse_sweep(tracking, study, kind, epochs, run_record(), "", parent.data.params.get("data_hash", ""))
