"""The MLflow tracking store of a sweep: its URI checked before any training, the links the sweep prints,
and `SweepTracking`, the experiment and parent run every cell's run hangs under. Needs neither Ray nor
the writer, so the views and command lines read a store through this alone."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock
from mlflow.entities import Param
from mlflow.tracking import MlflowClient

from fakedet.sweep.tags import TAG_KIND, TAG_PARENT, TAG_SWEEP

# `mlflow ui`'s default address: where the printed links point for a local SQLite store
LOCAL_UI = "http://127.0.0.1:5000"


def default_tracking_uri() -> str:
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


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


def sweep_filter(sweep_name: str) -> str:
    """The MLflow search filter that selects one sweep's runs (its parent and its cells): every run a sweep
    creates carries its name in the `fakedet.sweep` tag."""
    return f"tags.`{TAG_SWEEP}` = '{sweep_name}'"


# MLflow 3 opens its GenAI view unless told the experiment is model training
MODEL_TRAINING = {"workflowType": "machine_learning"}


def runs_link(uri: str, experiment_id: str, sweep_name: str | None = None) -> str:
    """The experiment's runs table, filtered to one sweep's runs when `sweep_name` is given (an experiment
    holds every sweep of a study), in the model-training view."""
    query = {"searchFilter": sweep_filter(sweep_name), **MODEL_TRAINING} if sweep_name is not None else MODEL_TRAINING
    return f"{ui_base(uri)}/#/experiments/{experiment_id}/runs?{urllib.parse.urlencode(query, quote_via=urllib.parse.quote)}"


def run_link(uri: str, experiment_id: str, run_id: str, artifact: str | None = None) -> str:
    """One run's page in the model-training view; with `artifact` (a path in the run's artifacts, e.g.
    `report.html`), its artifacts tab opened on that file, which MLflow shows (an HTML page rendered)."""
    page = f"{ui_base(uri)}/#/experiments/{experiment_id}/runs/{run_id}"
    page += f"/artifacts/{urllib.parse.quote(artifact)}" if artifact else ""
    return f"{page}?{urllib.parse.urlencode(MODEL_TRAINING)}"


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


def ensure_experiment(client: MlflowClient, uri: str, experiment: str) -> str:
    """The id of experiment `experiment`, created where it does not exist yet."""
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        return exp.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:///"):
        # Absolute, so that every process (Ray workers change directory) writes to the same place.
        artifact_location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    try:
        return client.create_experiment(experiment, artifact_location=artifact_location)
    except Exception:  # two sweeps starting at once: the other one created it first
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise
        return exp.experiment_id


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
        experiment_id = ensure_experiment(client, uri, experiment)
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
