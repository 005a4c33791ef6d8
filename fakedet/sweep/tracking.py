"""MLflow: where a sweep's runs go, one parent run per sweep and one child run per cell.

All logging happens on the driver, in a Ray Tune callback fed by the trials' reports. The tracking
store therefore has one writer (SQLite needs no locking games) and workers need no credentials for it.
Runs are found again by tags on `--resume`, and a metric point is logged only past the last step
already stored, so an interrupted and resumed sweep holds each point once.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.tune import Callback

from fakedet.config import TrainConfig

from fakedet.sweep.tags import TAG_CELL, TAG_KIND, TAG_NODE, TAG_PARENT, TAG_SWEEP, TAG_TRIAL  # noqa: F401 (re-exported)

# What the run table, compare view and parallel-coordinates chart show: the same names on every cell,
# nothing that is constant or a raw count (counts are in the confusion-matrix artifacts).
LABELLED_METRICS = ("acc", "f1", "f1_macro", "auc", "ap", "precision_real", "recall_real", "precision_fake", "recall_fake", "loss")
REAL_ONLY_METRICS = ("real_recall", "loss", "real_recall_coarse_min", "real_recall_coarse_max", "real_recall_fine_min", "real_recall_fine_max")
CELL_PARAMS = ("arch", "srm", "epochs", "lr", "seed", "momentum", "batch_size", "shuffle")


def default_tracking_uri() -> str:
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def is_logged_metric(name: str) -> bool:
    if name == "epoch":
        return True
    if "/" not in name:
        return False
    dataset, metric = name.split("/", 1)
    if dataset == "train":
        return metric == "loss"
    return metric in LABELLED_METRICS or metric in REAL_ONLY_METRICS


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, before any training, when the tracking store cannot be reached or written."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
                if r.status != 200:
                    raise ConnectionError(f"HTTP {r.status}")
        except (OSError, urllib.error.URLError, ConnectionError) as e:
            raise ConnectionError(f"MLflow tracking server {uri} is unreachable ({e}); start it or pass another --tracking-uri") from None
    elif uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
            raise ConnectionError(f"cannot write the MLflow database {path}: {path.parent} is not a writable folder")
    elif uri.startswith(("file:", "./", "/")) or "://" not in uri:
        raise ConnectionError(f"tracking URI {uri!r}: MLflow 3 refuses a plain file store; use sqlite:///PATH.db or a server URL")


def mlflow_ui_command(uri: str) -> str:
    if uri.startswith("sqlite:///"):
        return f"mlflow ui --backend-store-uri {uri}"
    return f"open {uri} in a browser"


@dataclass
class SweepTracking:
    """The tracking store, experiment and parent run of one sweep."""

    uri: str
    experiment_id: str
    parent_run_id: str
    sweep_name: str

    @classmethod
    def open(cls, uri: str, experiment: str, sweep_name: str, params: dict[str, Any], tags: dict[str, str],
             parent_run_id: str | None = None) -> "SweepTracking":
        """Create (or, with `parent_run_id`, reopen) the sweep's parent run."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            artifact_location = None
            if uri.startswith("sqlite:///"):
                # Absolute, so that every process (Ray workers change directory) writes to the same place.
                artifact_location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
            experiment_id = client.create_experiment(experiment, artifact_location=artifact_location)
        else:
            experiment_id = exp.experiment_id
        if parent_run_id is None:
            run = client.create_run(experiment_id, run_name=sweep_name, tags={TAG_SWEEP: sweep_name, TAG_KIND: "sweep", **tags})
            parent_run_id = run.info.run_id
            client.log_batch(parent_run_id, params=_params(params))
        else:
            client.update_run(parent_run_id, status="RUNNING")
        return cls(uri, experiment_id, parent_run_id, sweep_name)

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.uri)


def _params(values: dict[str, Any]):
    from mlflow.entities import Param

    # MLflow params are strings of at most 6000 characters
    return [Param(k, (v if isinstance(v, str) else json.dumps(v))[:6000]) for k, v in values.items()]


def cell_configs(trial_config: dict[str, Any], base: dict[str, Any]) -> list[TrainConfig]:
    from fakedet.sweep.trainable import cell_epochs, trajectory_config

    traj = trajectory_config(trial_config, base)
    return [TrainConfig.from_dict({**traj.to_dict(), "epochs": e, "eval_at": ()}) for e in cell_epochs(base)]


def cell_key(cfg: TrainConfig) -> str:
    from fakedet.sweep.study import Cell

    return Cell(cfg).key


def cell_name(cfg: TrainConfig) -> str:
    from fakedet.sweep.study import Cell

    return Cell(cfg).name


@dataclass
class _CellRun:
    run_id: str
    epochs: float
    last_step: int
    finished: bool
    node_id: str | None = None


class MlflowCellCallback(Callback):
    """Ray Tune callback logging each trial's cells as child runs of the sweep's parent run.

    It pickles with the Tuner state (without its client or run cache) and reconnects lazily after
    `Tuner.restore`, finding the cells' runs again by their tags.
    """

    def __init__(self, tracking: SweepTracking, base: dict[str, Any], run_params: dict[str, Any], run_tags: dict[str, str]) -> None:
        self.tracking = tracking
        self.base = base
        self.run_params = run_params
        self.run_tags = run_tags
        self._runs: dict[str, list[_CellRun]] = {}
        self._client = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_runs": {}, "_client": None}

    @property
    def client(self):
        if self._client is None:
            self._client = self.tracking.client()
        return self._client

    # -- runs -------------------------------------------------------------------------------------
    def cell_runs(self, trial) -> list[_CellRun]:
        if trial.trial_id in self._runs:
            return self._runs[trial.trial_id]
        runs = []
        for cfg in cell_configs(trial.config, self.base):
            key = cell_key(cfg)
            found = self.client.search_runs(
                [self.tracking.experiment_id],
                filter_string=f"tags.`{TAG_CELL}` = '{key}' and tags.`{TAG_PARENT}` = '{self.tracking.parent_run_id}'",
                max_results=1,
            )
            if found:
                run = found[0]
                history = self.client.get_metric_history(run.info.run_id, "train/loss")
                last = max((m.step for m in history), default=-1)
                runs.append(_CellRun(run.info.run_id, cfg.epochs, last, run.info.status == "FINISHED"))
                continue
            run = self.client.create_run(
                self.tracking.experiment_id,
                run_name=cell_name(cfg),
                tags={TAG_PARENT: self.tracking.parent_run_id, TAG_SWEEP: self.tracking.sweep_name, TAG_KIND: "cell",
                      TAG_CELL: key, TAG_TRIAL: trial.trial_id, **self.run_tags},
            )
            params = {k: v for k, v in cfg.to_dict().items() if k in CELL_PARAMS}
            self.client.log_batch(run.info.run_id, params=_params({**params, **self.run_params}))
            runs.append(_CellRun(run.info.run_id, cfg.epochs, -1, False))
        self._runs[trial.trial_id] = runs
        return runs

    # -- Tune callback hooks ----------------------------------------------------------------------
    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.cell_runs(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        from mlflow.entities import Metric, RunTag

        epoch, step = float(result["epoch"]), int(result["step"])
        node_id = result.get("node_id")
        timestamp = int(time.time() * 1000)
        metrics = [Metric(k, float(v), timestamp, step) for k, v in result.items()
                   if is_logged_metric(k) and isinstance(v, (int, float))]
        for run in self.cell_runs(trial):
            if run.finished or epoch > run.epochs + 1e-9 or step <= run.last_step:
                continue
            tags = [RunTag(TAG_NODE, node_id)] if node_id and node_id != run.node_id else []
            self.client.log_batch(run.run_id, metrics=metrics, tags=tags)
            run.last_step, run.node_id = step, node_id or run.node_id

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info) -> None:
        from fakedet.sweep.trainable import CELL_ARTIFACTS

        runs = [r for r in self.cell_runs(trial) if not r.finished]
        if not runs:
            return
        with checkpoint.as_directory() as d:
            root = Path(d) / CELL_ARTIFACTS
            if not root.is_dir():
                return
            for run in runs:
                folder = root / f"{run.epochs:g}"
                if folder.is_dir():
                    self.client.log_artifacts(run.run_id, str(folder))
                    self.client.set_terminated(run.run_id, "FINISHED")
                    run.finished = True

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        # a trial that completes with cells still open was stopped by the scheduler (ASHA) before their epochs
        self._close_open_cells(trial, "KILLED")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._close_open_cells(trial, "FAILED")

    def _close_open_cells(self, trial, status: str) -> None:
        for run in self.cell_runs(trial):
            if not run.finished:
                self.client.set_tag(run.run_id, "fakedet.ended_before_epochs", "true")
                self.client.set_terminated(run.run_id, status)
                run.finished = True
