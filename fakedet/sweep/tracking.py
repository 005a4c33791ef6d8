"""MLflow: where a sweep's runs go, one parent run per sweep and one child run per cell.

All logging happens on the driver, in a Ray Tune callback fed by the trials' reports. The tracking
store therefore has one writer (SQLite needs no locking games) and workers need no credentials for it.
Writes go through `TrackingWriter`, a queue drained by one background thread that retries with backoff
through an outage of the tracking server, so Ray's event loop never waits on MLflow. Runs are found
again by tags on `--resume`, and a metric point is logged only past the last step already stored, so an
interrupted and resumed sweep holds each point once.
"""

from __future__ import annotations

import json
import os
import pickle
import queue
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from filelock import FileLock
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray.tune import Callback, Checkpoint

from fakedet.sweep.spec import CELL_ARTIFACTS, Cell, TrialSpec, fmt_epochs, resolve_trial
from fakedet.sweep.tags import TAG_CELL, TAG_KIND, TAG_NODE, TAG_PARENT, TAG_STATUS, TAG_SWEEP, TAG_TRAJECTORY, TAG_TRIAL

# What the run table, compare view and parallel-coordinates chart show: the same names on every cell,
# nothing that is constant or a raw count (counts are in the confusion-matrix artifacts).
LABELLED_METRICS = ("acc", "f1", "f1_macro", "auc", "ap", "precision_real", "recall_real", "precision_fake", "recall_fake", "loss")
REAL_ONLY_METRICS = ("real_recall", "loss", "real_recall_coarse_min", "real_recall_coarse_max", "real_recall_fine_min", "real_recall_fine_max")
# `mlflow ui`'s default address: where the printed links point for a local SQLite store
LOCAL_UI = "http://127.0.0.1:5000"


def default_tracking_uri() -> str:
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


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
        return f"mlflow ui --backend-store-uri {uri} --port {LOCAL_UI.rsplit(':', 1)[1]}"
    return f"open {uri} in a browser"


def ui_base(uri: str) -> str:
    """The web UI that shows this store: the server itself, or a local `mlflow ui` for SQLite."""
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else LOCAL_UI


def runs_link(uri: str, experiment_id: str) -> str:
    """The experiment's runs table (MLflow 3 opens on its GenAI home; this is the table of the cells)."""
    return f"{ui_base(uri)}/#/experiments/{experiment_id}/runs"


def compare_link(uri: str, experiment_id: str, run_ids: list[str]) -> str:
    """MLflow's side-by-side comparison of the given runs."""
    runs = urllib.parse.quote(json.dumps(list(run_ids), separators=(",", ":")))
    experiments = urllib.parse.quote(json.dumps([experiment_id], separators=(",", ":")))
    return f"{ui_base(uri)}/#/compare-runs?runs={runs}&experiments={experiments}"


def store_lock(uri: str) -> FileLock | None:
    """A lock around creating a SQLite store: two sweeps starting at once in one folder otherwise race
    on MLflow's schema migration (`table ... already exists`)."""
    if not uri.startswith("sqlite:///"):
        return None
    return FileLock(uri[len("sqlite:///"):] + ".lock")


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
        lock = store_lock(uri)
        if lock is not None:
            with lock:  # the first client to touch a new SQLite file creates its schema
                MlflowClient(uri).search_experiments(max_results=1)
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
            client.log_batch(parent_run_id, params=params_of(params))
        else:
            client.update_run(parent_run_id, status="RUNNING")
        return cls(uri, experiment_id, parent_run_id, sweep_name)

    def client(self) -> MlflowClient:
        return MlflowClient(self.uri)

    def cell_runs(self) -> list:
        return self.client().search_runs([self.experiment_id], filter_string=f"tags.`{TAG_PARENT}` = '{self.parent_run_id}'",
                                         max_results=50000)


def params_of(values: dict[str, Any]) -> list[Param]:
    # MLflow params are strings of at most 6000 characters
    return [Param(k, (v if isinstance(v, str) else json.dumps(v))[:6000]) for k, v in values.items()]


# ---------------------------------------------------------------------------------------------------
# writes that survive an outage of the tracking server
# ---------------------------------------------------------------------------------------------------
class TrackingUnavailable(RuntimeError):
    """The tracking store stayed unreachable for longer than the writer's outage budget."""


class TrackingWriter:
    """One background thread applying tracking writes in order, retrying each through an outage.

    A write that fails (server down, connection refused, HTTP 5xx) is retried with exponential backoff
    (`backoff_s` doubling up to `max_backoff_s`) until it succeeds or the store has been unreachable for
    `outage_s` seconds; then the writer fails for good and `check()` raises `TrackingUnavailable`.
    Nothing is dropped: what was queued is replayed by `--resume`, which logs only what is missing.
    """

    def __init__(self, uri: str, outage_s: float = 600.0, backoff_s: float = 1.0, max_backoff_s: float = 30.0,
                 say: Callable[[str], None] = print) -> None:
        self.uri, self.outage_s, self.backoff_s, self.max_backoff_s, self.say = uri, outage_s, backoff_s, max_backoff_s, say
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._client: MlflowClient | None = None
        self._thread = threading.Thread(target=self._drain, name="fakedet-tracking-writer", daemon=True)
        self._thread.start()

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.uri)
        return self._client

    def submit(self, write: Callable[[MlflowClient], Any]) -> None:
        """Queue a write; raises TrackingUnavailable once the writer has given up."""
        self.check()
        self._queue.put(write)

    def check(self) -> None:
        if self._error is not None:
            why = f"was unreachable for over {self.outage_s:g} s" if _transient(self._error) else "refused a write"
            raise TrackingUnavailable(f"the MLflow tracking store {self.uri} {why} "
                                      f"({type(self._error).__name__}: {_first_line(self._error)})")

    def pending(self) -> int:
        return self._queue.unfinished_tasks

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued write is applied (True) or the writer failed / the timeout passed (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._queue.unfinished_tasks and self._error is None:
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return self._error is None

    def _drain(self) -> None:
        while True:
            write = self._queue.get()
            try:
                if self._error is None:
                    self._apply(write)
            finally:
                self._queue.task_done()

    def _apply(self, write: Callable[[MlflowClient], Any]) -> None:
        down_since, wait = None, self.backoff_s
        while True:
            try:
                write(self.client)
                if down_since is not None:
                    self.say(f"[tracking] {self.uri} is back after {time.monotonic() - down_since:.0f} s; "
                             f"{self._queue.unfinished_tasks - 1} queued writes follow")
                return
            except Exception as e:  # noqa: BLE001 - any failure of the store is retried, then reported once
                if not _transient(e):  # the store refused what we asked: retrying would not help
                    self._error = e
                    return
                now = time.monotonic()
                if down_since is None:
                    down_since = now
                    self.say(f"[tracking] {self.uri} unreachable ({_first_line(e)}); training goes on, writes are queued "
                             f"and retried for up to {self.outage_s:g} s")
                if now - down_since > self.outage_s:
                    self._error = e
                    return
                time.sleep(wait)
                wait = min(wait * 2, self.max_backoff_s)
                self._client = None  # a fresh client: a new connection pool after the server's restart


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _transient(e: BaseException) -> bool:
    """Failures of reaching the store, not of what we asked: worth a retry."""
    if isinstance(e, (ConnectionError, TimeoutError, OSError)):
        return True
    if isinstance(e, MlflowException):
        code = getattr(e, "error_code", "")
        text = str(e)
        # the REST client's own retries ran out (connection refused, 5xx), or the server is restarting
        return code in ("TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR", "ENDPOINT_NOT_FOUND") or "Max retries" in text \
            or "Connection" in text or "API request" in text
    return "requests" in type(e).__module__ or "urllib3" in type(e).__module__


# ---------------------------------------------------------------------------------------------------
# the Ray Tune callback
# ---------------------------------------------------------------------------------------------------
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
    `Tuner.restore`, finding the cells' runs again by their tags.
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
        client = self.writer.client
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
                found = _retrying(lambda: client.search_runs(
                    [self.tracking.experiment_id],
                    filter_string=f"tags.`{TAG_CELL}` = '{cell.key}' and tags.`{TAG_PARENT}` = '{self.tracking.parent_run_id}'",
                    max_results=1), self.outage_s)
                if found:
                    run.run_id = found[0].info.run_id
                    if TAG_TRIAL not in found[0].data.tags or found[0].info.status == "SCHEDULED":
                        self.writer.submit(lambda client, run=run: (client.set_tag(run.run_id, TAG_TRIAL, trial_id),
                                                                    client.update_run(run.run_id, status="RUNNING")))
                    history = _retrying(lambda: client.get_metric_history(run.run_id, "train/loss"), self.outage_s)
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

    def replay_stored(self, experiment_dir: Path) -> int:
        """Log what the trials of an earlier run of this sweep reported but MLflow never received (an
        outage that outlasted the writer, a killed driver): their results and checkpoints as Ray stored
        them. Points and cells already logged are skipped, as for any replay. Returns the trials read."""
        count = 0
        for trial_dir in sorted(Path(experiment_dir).glob("trial_*")):
            params, results = trial_dir / "params.pkl", trial_dir / "result.json"
            if not (params.is_file() and results.is_file()):
                continue
            with params.open("rb") as f:
                config = pickle.load(f)
            lines = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
            if not lines:
                continue
            trial = SimpleNamespace(trial_id=lines[0]["trial_id"], config=config)
            for result in lines:
                self.on_trial_result(0, [], trial, result)
                name = result.get("checkpoint_dir_name")
                if name and (trial_dir / name).is_dir():
                    self.on_checkpoint(0, [], trial, Checkpoint.from_directory(str(trial_dir / name)))
            count += 1
        return count

    def _runs_of(self, trial) -> _TrialRuns:
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
        # a trial that completes with cells still open was stopped by the scheduler (ASHA) before their epochs
        self._close_open_cells(trial, "KILLED")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._close_open_cells(trial, "FAILED")

    def _close_open_cells(self, trial, status: str) -> None:
        for runs in self._runs_of(trial).runs:
            for run in runs:
                if not run.finished:
                    run.finished = True
                    self.writer.submit(lambda client, run=run: (client.set_tag(run.run_id, "fakedet.ended_before_epochs", "true"),
                                                                client.set_terminated(run.run_id, status)))



_WRITERS: dict[str, TrackingWriter] = {}


def writer_for(uri: str, outage_s: float = 600.0) -> TrackingWriter:
    """The driver's one writer per store: `Tuner.restore` unpickles its own callback, and the driver
    must still be able to wait for that callback's writes."""
    if uri not in _WRITERS:
        _WRITERS[uri] = TrackingWriter(uri, outage_s=outage_s)
    return _WRITERS[uri]


def _retrying(read: Callable[[], Any], outage_s: float) -> Any:
    """A read the callback needs at once (finding a resumed cell's run), retried through a short outage."""
    deadline, wait = time.monotonic() + outage_s, 1.0
    while True:
        try:
            return read()
        except Exception as e:  # noqa: BLE001
            if not _transient(e) or time.monotonic() > deadline:
                raise TrackingUnavailable(f"the MLflow tracking store is unreachable ({_first_line(e)})") from None
            time.sleep(wait)
            wait = min(2 * wait, 30.0)
