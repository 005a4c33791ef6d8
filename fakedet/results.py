"""A sweep's results, read back from MLflow into pandas: for the analysis, notebooks and plots."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from fakedet.config import TrainConfig
from fakedet.analysis.roles import DEFAULT_TRAIN_ON
from fakedet.sweep.tags import TAG_KIND, TAG_PARENT, TAG_STATUS, TAG_SWEEP, TAG_TRAJECTORY, TAG_TRIAL


def points_from_mlflow(client, experiment_id: str, parent_run_id: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(points, cells): every evaluation point of every trajectory, and every cell's final values.

    A trajectory's points are the metric history of its longest cell's run; `trajectory` names it
    `srm lr seed` (its cells' `fakedet.trajectory` tag). `train_on` is the cell's training set (a sweep
    from before it was recorded: `cifake`, the study's).
    """
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{TAG_PARENT}` = '{parent_run_id}'",
                              max_results=50000)
    cells, by_trajectory = [], {}
    for run in runs:
        if run.data.tags.get(TAG_KIND) != "cell":
            continue
        p = run.data.params
        tags = run.data.tags
        row = {"run_id": run.info.run_id, "run_name": run.info.run_name, "status": run.info.status,
               # the trajectory's label (older sweeps: its Ray trial id)
               "trajectory": tags.get(TAG_TRAJECTORY) or tags.get(TAG_TRIAL), "diverged": tags.get(TAG_STATUS) == "diverged", "srm": p.get("srm"), "lr": float(p.get("lr", "nan")),
               "seed": int(p.get("seed", -1)), "cell_epochs": float(p.get("epochs", "nan")),
               "momentum": float(p.get("momentum", "nan")), "batch_size": int(p.get("batch_size", -1)),
               # a sweep recorded before the attention and augmentation axes trained the study's
               "attention": p.get("attention", TrainConfig.attention), "augment": p.get("augment", TrainConfig.augment),
               "augment_p": float(p.get("augment_p", TrainConfig.augment_p)),
               # a sweep from before the training set was a param trained on CIFAKE, the study's
               "train_on": p.get("train_on", DEFAULT_TRAIN_ON), **run.data.metrics}
        cells.append(row)
        best = by_trajectory.get(row["trajectory"])
        if best is None or row["cell_epochs"] > best[1]["cell_epochs"]:
            by_trajectory[row["trajectory"]] = (run, row)
    frames = []
    for trajectory, (run, row) in by_trajectory.items():
        series = {}
        for key in run.data.metrics:
            for m in client.get_metric_history(run.info.run_id, key):
                series.setdefault(m.step, {})[key] = m.value
        frame = pd.DataFrame.from_dict(series, orient="index").rename_axis("step").reset_index().sort_values("step")
        for k in ("trajectory", "srm", "attention", "augment", "augment_p", "lr", "seed", "train_on", "momentum", "batch_size"):
            frame[k] = row[k]
        frames.append(frame)
    points = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return points, pd.DataFrame(cells)


# ---------------------------------------------------------------------------------------------------
# a sweep's analyses: the first where the sweep wrote it, every later one beside it
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AnalysisVersion:
    """Where one analysis of a sweep lies among its parent run's artifacts. The first (`v1`, written when
    the sweep ended) at the top: `analysis/`, `figures/`, `report.html`; each later one (`cutoff`, a
    re-analysis) under `analysis/v<N>/` with its own `figures/`, `report.html` and `run_record.json`, so
    that nothing a sweep recorded is ever rewritten."""

    number: int = 1

    @property
    def name(self) -> str:
        return f"v{self.number}"

    @property
    def tables(self) -> str:
        """The folder of its tables and run_record.json."""
        return "analysis" if self.number == 1 else f"analysis/v{self.number}"

    @property
    def figures(self) -> str:
        return "figures" if self.number == 1 else f"{self.tables}/figures"

    @property
    def report(self) -> str:
        return "report.html" if self.number == 1 else f"{self.tables}/report.html"

    @classmethod
    def parse(cls, text: str) -> "AnalysisVersion":
        """`v2`, `2` or `analysis/v2`; `v1`, `1` or `analysis`: the sweep's own analysis."""
        text = text.strip().rstrip("/")
        match = re.fullmatch(r"(?:analysis/)?v?(\d+)", text)
        if text != "analysis" and (not match or int(match.group(1)) < 1):
            raise ValueError(f"analysis version {text!r}: expected v1, v2, ... (`fakedet report --list` shows them)")
        return cls(int(match.group(1)) if match else 1)


_VERSION_FOLDER = re.compile(r"analysis/v(\d+)")


def analysis_versions(client, parent_run_id: str) -> list[AnalysisVersion]:
    """The analyses logged to a parent run, oldest first (v1 only where the sweep's own `analysis/run_record.json` exists)."""
    versions = []
    for item in client.list_artifacts(parent_run_id, "analysis"):
        if item.path == "analysis/run_record.json":
            versions.append(AnalysisVersion(1))
        elif item.is_dir and (match := _VERSION_FOLDER.fullmatch(item.path)):
            versions.append(AnalysisVersion(int(match.group(1))))
    return sorted(versions, key=lambda v: v.number)


def next_analysis(client, parent_run_id: str) -> AnalysisVersion:
    """Where a new analysis goes: v1 if the sweep has none yet, else one past the latest (never an existing one)."""
    versions = analysis_versions(client, parent_run_id)
    return AnalysisVersion(versions[-1].number + 1 if versions else 1)


# ---------------------------------------------------------------------------------------------------
# a whole sweep, for notebooks and figures
# ---------------------------------------------------------------------------------------------------
class SweepNotFoundError(LookupError):
    """No sweep of that name (or no sweep at all) in the tracking store."""


@dataclass
class SweepResults:
    """One sweep read back from MLflow: its parent run, its cells (one row per child run, final values)
    and its evaluation points (one row per trajectory and point). Built by `load_sweep`; the sweep
    runner builds one from the frames it already holds."""

    parent: Any  # mlflow.entities.Run of the sweep's parent run
    cells: pd.DataFrame
    points: pd.DataFrame
    client: Any  # mlflow.tracking.MlflowClient
    analysis: AnalysisVersion = AnalysisVersion(1)
    """The analysis whose tables the views read (`load_sweep`: the latest)."""
    _tables: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.parent.data.tags.get(TAG_SWEEP, self.parent.info.run_name)

    @property
    def parent_run_id(self) -> str:
        return self.parent.info.run_id

    @property
    def kind(self) -> str:
        return self.parent.data.params.get("kind", "ablation")

    def analysis_file(self, name: str) -> str:
        """The artifact path of one file of the analysis the views read (e.g. `cutoff_summary.csv`)."""
        return f"{self.analysis.tables}/{name}"

    def finished_cells(self) -> pd.DataFrame:
        """Cells whose run reached its epoch count (FINISHED), ordered as the runner's summary table."""
        if "status" not in self.cells:  # no cell runs at all
            return pd.DataFrame(columns=["run_id", "run_name", "status", "trajectory", "srm", "lr", "seed", "cell_epochs"])
        done = self.cells[self.cells["status"] == "FINISHED"]
        order = ["srm", "lr", *(["train_on"] if "train_on" in done else []), "seed", "cell_epochs"]
        return done.sort_values(order, kind="stable").reset_index(drop=True)

    def artifact_table(self, run_id: str, name: str, **read_csv: Any) -> pd.DataFrame:
        """A CSV artifact of a run (e.g. a cell's `cifake_test_thresholds.csv`, the parent's
        `analysis/cutoff_summary.csv`) as a DataFrame; keyword arguments go to `pandas.read_csv`.

        Each file is downloaded once per `SweepResults` (to a temporary folder, removed at once)."""
        key = (run_id, name, tuple(sorted((k, repr(v)) for k, v in read_csv.items())))
        if key not in self._tables:
            with tempfile.TemporaryDirectory(prefix="fakedet-artifact-") as d, no_progress_bar():
                try:
                    path = self.client.download_artifacts(run_id, name, d)
                except Exception as e:
                    available = [a.path for a in self.client.list_artifacts(run_id, str(Path(name).parent) if "/" in name else None)]
                    raise FileNotFoundError(f"run {run_id} has no artifact {name!r} (there: {', '.join(available) or 'none'})") from e
                self._tables[key] = pd.read_csv(path, **read_csv)
        return self._tables[key].copy()


@contextlib.contextmanager
def no_progress_bar():
    """MLflow draws a progress bar per download: noise in a notebook that reads dozens of small tables."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    if tracking_uri.startswith("sqlite:///"):
        # MLflow would silently create an empty database at a mistyped path
        path = Path(tracking_uri[len("sqlite:///"):])
        if not path.is_file():
            raise FileNotFoundError(f"no MLflow database at {path.resolve()} (tracking URI {tracking_uri})")
    return MlflowClient(tracking_uri)


def _sweep_runs(client) -> list:
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    return client.search_runs(experiments, filter_string=f"tags.`{TAG_KIND}` = 'sweep'", max_results=50000,
                              order_by=["attributes.start_time DESC"])


def list_sweeps(tracking_uri: str) -> pd.DataFrame:
    """Every sweep in the store, most recent first: name, kind, parent run id, experiment id, status,
    start time and number of cells (child runs)."""
    client = _client(tracking_uri)
    parents = _sweep_runs(client)
    counts: dict[str, int] = {}
    if parents:
        cells = client.search_runs(sorted({p.info.experiment_id for p in parents}), filter_string=f"tags.`{TAG_KIND}` = 'cell'",
                                   max_results=50000)
        for run in cells:
            parent = run.data.tags.get(TAG_PARENT)
            counts[parent] = counts.get(parent, 0) + 1
    rows = [{"name": p.data.tags.get(TAG_SWEEP, p.info.run_name), "kind": p.data.params.get("kind"),
             "parent_run_id": p.info.run_id, "experiment_id": p.info.experiment_id, "status": p.info.status,
             "start_time": pd.to_datetime(p.info.start_time, unit="ms"), "cells": counts.get(p.info.run_id, 0)}
            for p in parents]
    return pd.DataFrame(rows, columns=["name", "kind", "parent_run_id", "experiment_id", "status", "start_time", "cells"])


def load_sweep(tracking_uri: str, sweep: str | None = None, kind: str | None = None,
               analysis: AnalysisVersion | None = None) -> SweepResults:
    """A sweep's parent run, cells and points. `sweep`: its name (the most recent of that name) or its
    parent run id; None: the most recent sweep in the store (of `kind`, ablation or hpo, when given).
    `analysis`: the analysis the views read; None: the latest logged."""
    client = _client(tracking_uri)
    parents = _sweep_runs(client)
    if kind is not None and sweep is None:
        parents = [p for p in parents if p.data.params.get("kind", "ablation") == kind]
    if not parents:
        raise SweepNotFoundError(f"no {kind + ' ' if kind else ''}sweeps in {tracking_uri}")
    if sweep is None:
        parent = parents[0]
    else:
        matches = [p for p in parents if p.data.tags.get(TAG_SWEEP) == sweep or p.info.run_id == sweep]
        if not matches:
            names = ", ".join(dict.fromkeys(p.data.tags.get(TAG_SWEEP, p.info.run_name) for p in parents))
            raise SweepNotFoundError(f"no sweep named {sweep!r} in {tracking_uri}; the sweeps there (most recent first): {names}")
        parent = matches[0]
    versions = analysis_versions(client, parent.info.run_id)
    if analysis is None:
        analysis = versions[-1] if versions else AnalysisVersion(1)
    elif analysis not in versions:
        raise SweepNotFoundError(f"sweep {parent.data.tags.get(TAG_SWEEP, parent.info.run_name)!r} has no analysis "
                                 f"{analysis.name}; it has: {', '.join(v.name for v in versions) or 'none'}")
    points, cells = points_from_mlflow(client, parent.info.experiment_id, parent.info.run_id)
    return SweepResults(parent=parent, cells=cells, points=points, client=client, analysis=analysis)


STORE_FILE = "mlflow.db"


def find_tracking_uri(start: Path | str | None = None) -> str:
    """The tracking store a notebook or `fakedet report` reads when none is named: `FAKEDET_TRACKING_URI`,
    else `MLFLOW_TRACKING_URI`, else the `mlflow.db` in `start` (default: the working folder) or the
    nearest folder above it that holds one: a notebook's kernel starts in `notebooks/`, the sweeps
    write `mlflow.db` in the repository root. None found: the working folder's (reading it says so)."""
    for variable in ("FAKEDET_TRACKING_URI", "MLFLOW_TRACKING_URI"):
        if os.environ.get(variable):
            return os.environ[variable]
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / STORE_FILE).is_file():
            return f"sqlite:///{folder / STORE_FILE}"
    return f"sqlite:///{here / STORE_FILE}"
