"""The Ray Tune callback that logs a sweep's cells to MLflow, one child run per cell under the sweep's
parent run (`store.SweepTracking`).

All logging happens on the driver, fed by the trials' reports. The tracking store therefore has one
writer (SQLite needs no locking games) and workers need no credentials for it. Writes go through
`writer.TrackingWriter`, so an outage of the tracking server is waited out without holding up Ray's
event loop. Runs are found again by tags on `--resume`, and a metric point is logged only past the last
step already stored, so an interrupted and resumed sweep holds each point once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient
from ray.tune import Callback, Checkpoint

from fakedet.explain import METRICS as EXPLAIN_METRICS
from fakedet.sweep.spec import CELL_ARTIFACTS, TRIAL_KEY, TRIAL_KEY_RESULT, Cell, TrialSpec, fmt_epochs, resolve_trial
from fakedet.sweep.store import SweepTracking, params_of
from fakedet.sweep.tags import TAG_CELL, TAG_KIND, TAG_NODE, TAG_PARENT, TAG_STATUS, TAG_SWEEP, TAG_TRAJECTORY, TAG_TRIAL
from fakedet.sweep.writer import TrackingWriter, writer_for

# What the run table, compare view and parallel-coordinates chart show: the same names on every cell,
# nothing that is constant or a raw count (counts are in the confusion-matrix artifacts).
LABELLED_METRICS = ("acc", "f1", "f1_macro", "auc", "ap", "precision_real", "recall_real", "precision_fake", "recall_fake", "loss")
REAL_ONLY_METRICS = ("real_recall", "loss", "real_recall_coarse_min", "real_recall_coarse_max", "real_recall_fine_min", "real_recall_fine_max")


def is_logged_metric(name: str) -> bool:
    if name == "epoch":
        return True
    if name.startswith("best/"):  # HPO: the objective's best value so far and its epoch
        return True
    if "/" not in name:
        return False
    dataset, metric = name.split("/", 1)
    if dataset == "train":
        return metric == "loss"
    return metric in LABELLED_METRICS or metric in REAL_ONLY_METRICS or metric in EXPLAIN_METRICS


@dataclass
class _CellRun:
    cell: Cell
    run_id: str | None = None  # filled by the writer when the run is created
    last_step: int = -1
    finished: bool = False
    node_id: str | None = None


@dataclass
class _TrialRuns:
    spec: TrialSpec
    runs: list[list[_CellRun]] = field(default_factory=list)  # per trajectory, its cells' runs


class MlflowCellCallback(Callback):
    """Ray Tune callback logging each trial's cells as child runs of the sweep's parent run.

    It pickles with the Tuner state (without its writer or run cache) and reconnects lazily after
    `Tuner.restore`, finding the cells' runs again by their tags. Each trial's spec is resolved from its
    config once, on the trial's first event (again once after a restore), and kept with its runs.
    """

    def __init__(self, tracking: SweepTracking, template: TrialSpec | None, run_params: dict[str, Any],
                 run_tags: dict[str, str], outage_s: float = 600.0) -> None:
        self.tracking = tracking
        self.template = template
        self.run_params = run_params
        self.run_tags = run_tags
        self.outage_s = outage_s
        self._trials: dict[str, _TrialRuns] = {}
        self._planned: dict[str, _CellRun] = {}  # cell key -> run this process created before Ray started
        self._writer: TrackingWriter | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_trials": {}, "_planned": {}, "_writer": None}

    @property
    def writer(self) -> TrackingWriter:
        if self._writer is None:
            self._writer = writer_for(self.tracking.uri, self.outage_s)
        return self._writer

    # -- runs -------------------------------------------------------------------------------------
    def trial_runs(self, trial_id: str, spec: TrialSpec) -> _TrialRuns:
        """The cells' runs of a trial: found again by their key, or created (through the writer)."""
        if trial_id in self._trials:
            return self._trials[trial_id]
        entry = _TrialRuns(spec)
        for trajectory in spec.trajectories:
            runs = []
            for cell in trajectory.cells:
                if cell.key in self._planned:  # created here, nothing logged yet: no need to ask the store
                    run = self._planned.pop(cell.key)
                    self.writer.submit(lambda client, run=run: (client.set_tag(run.run_id, TAG_TRIAL, trial_id),
                                                                client.update_run(run.run_id, status="RUNNING")))
                    runs.append(run)
                    continue
                run = _CellRun(cell)
                found = self.writer.read(lambda client, cell=cell: client.search_runs(
                    [self.tracking.experiment_id],
                    filter_string=f"tags.`{TAG_CELL}` = '{cell.key}' and tags.`{TAG_PARENT}` = '{self.tracking.parent_run_id}'",
                    max_results=1))
                if found:
                    run.run_id = found[0].info.run_id
                    if TAG_TRIAL not in found[0].data.tags or found[0].info.status == "SCHEDULED":
                        self.writer.submit(lambda client, run=run: (client.set_tag(run.run_id, TAG_TRIAL, trial_id),
                                                                    client.update_run(run.run_id, status="RUNNING")))
                    history = self.writer.read(lambda client, run=run: client.get_metric_history(run.run_id, "train/loss"))
                    run.last_step = max((m.step for m in history), default=-1)
                    run.finished = found[0].info.status == "FINISHED"
                else:
                    self.writer.submit(self._create(run, trajectory.label, trial_id))
                runs.append(run)
            entry.runs.append(runs)
        self._trials[trial_id] = entry
        return entry

    def _create(self, run: _CellRun, trajectory_label: str, trial_id: str | None) -> Callable[[MlflowClient], None]:
        def create(client: MlflowClient) -> None:
            if run.run_id is not None:
                return
            tags = {TAG_PARENT: self.tracking.parent_run_id, TAG_SWEEP: self.tracking.sweep_name, TAG_KIND: "cell",
                    TAG_CELL: run.cell.key, TAG_TRAJECTORY: trajectory_label, **self.run_tags}
            if trial_id is not None:
                tags[TAG_TRIAL] = trial_id
            created = client.create_run(self.tracking.experiment_id, run_name=run.cell.name, tags=tags)
            run.run_id = created.info.run_id
            client.log_batch(run.run_id, params=params_of({**run.cell.params(), **self.run_params}))
            if trial_id is None:  # planned before Ray starts: shown as scheduled until its trial starts
                client.update_run(run.run_id, status="SCHEDULED")

        return create

    def plan_runs(self, specs: list[TrialSpec]) -> list[str]:
        """Create every cell's run up front (a grid sweep knows them all), so the MLflow UI lists the whole
        sweep from its start and a compare link can be given at once. Returns the run ids."""
        runs = []
        for spec in specs:
            for trajectory in spec.trajectories:
                for cell in trajectory.cells:
                    run = _CellRun(cell)
                    self.writer.submit(self._create(run, trajectory.label, None))
                    runs.append(run)
                    self._planned[cell.key] = run
        self.writer.flush()
        self.writer.check()
        return [r.run_id for r in runs]

    def replay_stored(self, experiment_dir: Path, trials: Sequence[TrialSpec] = ()) -> int:
        """Log what the trials of an earlier run of this sweep reported but MLflow never received (an
        outage that outlasted the writer, a killed driver): their results and checkpoints as Ray stored
        them. Points and cells already logged are skipped, as for any replay. Only JSON is read: a
        trial's spec is found by the `trial_key` its results carry among the grid's `trials`, or (HPO)
        rebuilt from the sampled values in the results' `config`; Ray's `params.pkl` is never
        unpickled. Returns the trials read."""
        by_key = {t.key: t for t in trials}
        count = 0
        for trial_dir in sorted(Path(experiment_dir).glob("trial_*")):
            results = trial_dir / "result.json"
            if not results.is_file():
                continue
            lines = []
            for line in results.read_text().splitlines():
                try:
                    lines.append(json.loads(line))
                except ValueError:
                    break  # a line cut short by a killed driver: what follows it was never complete
            if not lines:
                continue
            config = self._replayed_config(lines[0], by_key)
            if config is None:
                continue
            trial = SimpleNamespace(trial_id=lines[0]["trial_id"], config=config)
            for result in lines:
                self.on_trial_result(0, [], trial, result)
                name = result.get("checkpoint_dir_name")
                if name and (trial_dir / name).is_dir():
                    self.on_checkpoint(0, [], trial, Checkpoint.from_directory(str(trial_dir / name)))
            count += 1
        return count

    def _replayed_config(self, result: dict[str, Any], by_key: dict[str, TrialSpec]) -> dict[str, Any] | None:
        if self.template is None:  # a grid: the spec named by the result's key (results before keys: not replayable)
            spec = by_key.get(result.get(TRIAL_KEY_RESULT))
            return None if spec is None else {TRIAL_KEY: spec}
        config = result.get("config")
        return dict(config) if isinstance(config, dict) else None

    def _runs_of(self, trial) -> _TrialRuns:
        # the spec is resolved from the trial's config once per trial id, not on every report
        if trial.trial_id in self._trials:
            return self._trials[trial.trial_id]
        return self.trial_runs(trial.trial_id, resolve_trial(trial.config, self.template))

    # -- Tune callback hooks ----------------------------------------------------------------------
    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._runs_of(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        epoch, step = float(result["epoch"]), int(result["step"])
        node_id = result.get("node_id")
        timestamp = int(time.time() * 1000)
        metrics = [Metric(k, float(v), timestamp, step) for k, v in result.items()
                   if is_logged_metric(k) and isinstance(v, (int, float)) and not isinstance(v, bool)]
        for run in self._runs_of(trial).runs[int(result.get("trajectory", 0))]:
            if run.finished or epoch > run.cell.epochs + 1e-9 or step <= run.last_step:
                continue
            tags = [RunTag(TAG_NODE, node_id)] if node_id and node_id != run.node_id else []
            self.writer.submit(lambda client, run=run, tags=tags: client.log_batch(run.run_id, metrics=metrics, tags=tags))
            run.last_step, run.node_id = step, node_id or run.node_id
        if result.get("diverged"):
            self._end_diverged(self._runs_of(trial).runs[int(result.get("trajectory", 0))], epoch)

    def _end_diverged(self, runs: list[_CellRun], epoch: float) -> None:
        """A trajectory whose training went non-finite: its cells not yet finished end as diverged (a
        result, not a crash: no retry), keeping every point measured before."""
        for run in runs:
            if not run.finished:
                run.finished = True
                self.writer.submit(lambda client, run=run: (
                    client.log_batch(run.run_id, tags=[RunTag(TAG_STATUS, "diverged"), RunTag("fakedet.diverged_at_epoch", fmt_epochs(epoch))]),
                    client.set_terminated(run.run_id, "FAILED")))

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info) -> None:
        entry = self._runs_of(trial)
        with checkpoint.as_directory() as d:
            root = Path(d) / CELL_ARTIFACTS
            done = {p.relative_to(root).as_posix() for p in root.glob("*/*")} if root.is_dir() else set()
        for index, runs in enumerate(entry.runs):
            for run in runs:
                folder = f"{index}/{fmt_epochs(run.cell.epochs)}"
                if not run.finished and folder in done:
                    run.finished = True
                    self.writer.submit(self._finish(run, checkpoint, folder))

    @staticmethod
    def _finish(run: _CellRun, checkpoint, folder: str) -> Callable[[MlflowClient], None]:
        def finish(client: MlflowClient) -> None:
            # the checkpoint stays in Ray's storage: read when the store is reachable, not when reported
            with checkpoint.as_directory() as d:
                client.log_artifacts(run.run_id, str(Path(d) / CELL_ARTIFACTS / folder))
            client.set_terminated(run.run_id, "FINISHED")

        return finish

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        # a trial that completes with cells still open was stopped by the scheduler (ASHA) before their epochs:
        # pruned, as Optuna records it (`hpo.StudySearch`); MLflow has no such status, KILLED is its "ended
        # from outside", the tag says why, and the run is renamed by the epochs it trained
        epoch = (getattr(trial, "last_result", None) or {}).get("epoch")
        for runs in self._runs_of(trial).runs:
            for run in runs:
                if not run.finished:
                    run.finished = True
                    self.writer.submit(self._prune(run, float(epoch) if isinstance(epoch, (int, float)) else None))

    @staticmethod
    def _prune(run: _CellRun, epoch: float | None) -> Callable[[MlflowClient], None]:
        def prune(client: MlflowClient) -> None:
            tags = [RunTag(TAG_STATUS, "pruned"), RunTag("fakedet.ended_before_epochs", "true")]
            if epoch is not None:
                name = Cell(replace(run.cell.config, epochs=epoch)).name + f" (pruned of {fmt_epochs(run.cell.epochs)})"
                tags += [RunTag("fakedet.epochs_trained", fmt_epochs(epoch)), RunTag("mlflow.runName", name)]
            client.log_batch(run.run_id, tags=tags)
            client.set_terminated(run.run_id, "KILLED")

        return prune

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._close_open_cells(trial, "FAILED")

    def _close_open_cells(self, trial, status: str) -> None:
        for runs in self._runs_of(trial).runs:
            for run in runs:
                if not run.finished:
                    run.finished = True
                    self.writer.submit(lambda client, run=run: (client.set_tag(run.run_id, "fakedet.ended_before_epochs", "true"),
                                                                client.set_terminated(run.run_id, status)))
