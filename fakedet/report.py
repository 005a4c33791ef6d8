"""A finished sweep's analysis: printed, and logged to its MLflow parent run by this one owner.

Read back from MLflow (`fakedet.results`), so the same code serves the end of a sweep and
`sweeps/run.py cutoff` on an old one. The parent run gets the correlation and cutoff tables under
`analysis/`, the study's tables and figures under `figures/` (`fakedet.figures.VIEWS`), and the
headline figures as metrics.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.entities import Metric

from fakedet.figures import log_figures
from fakedet.results import SweepResults, points_from_mlflow
from fakedet.sweep import analysis
from fakedet.sweep.spec import plain_number
from fakedet.sweep.study import Study
from fakedet.sweep.tracking import SweepTracking

SUMMARY_COLUMNS = ("cifake_test/acc", "cifake_test/f1", "cifake_test/auc", "cifar100_test/real_recall",
                   "agiri_test/acc", "agiri_test/f1", "agiri_test/auc")


def say(msg: str) -> None:
    print(msg, flush=True)


def _fmt(v: Any) -> str:
    return f"{v:.4f}"


def analyse_sweep(tracking: SweepTracking, study: Study, cell_epochs, record: dict[str, Any]) -> int:
    """Summary table, correlations and cutoffs: printed, and logged to the sweep's parent run. 0 when done."""
    client = tracking.client()
    points, cells = points_from_mlflow(client, tracking.experiment_id, tracking.parent_run_id)
    if points.empty:
        say("no evaluation points were logged; nothing to analyse")
        return 1
    results = SweepResults(client.get_run(tracking.parent_run_id), cells, points, client)
    finished = results.finished_cells()
    keys = ["srm", "lr", "momentum", "batch_size", "cell_epochs"] if study.kind == "hpo" else ["srm", "cell_epochs", "lr", "seed"]
    shown = finished[[*keys, *[c for c in SUMMARY_COLUMNS if c in finished]]].copy()
    shown["cell_epochs"] = shown["cell_epochs"].map(plain_number)
    say("\ncells (final values at each cell's epoch count):")
    say(shown.rename(columns={"cell_epochs": "epochs"}).to_string(index=False, float_format=_fmt))

    intrinsic, transfer = list(study.metrics.intrinsic), list(study.metrics.transfer)
    corr_cells = analysis.correlations(finished, intrinsic, transfer)
    corr_points = analysis.correlations(points, intrinsic, transfer)
    corr_within = analysis.within_trajectory_correlations(points, intrinsic, transfer)
    metrics = {**analysis.correlation_metrics(corr_cells, "cells"), **analysis.correlation_metrics(corr_points, "points")}

    cut = study.cutoff
    cutoffs = analysis.cutoff_table(points, select_on=cut.select_on, intrinsic_loss=cut.intrinsic_loss,
                                    intrinsic_acc=cut.intrinsic_acc, patience=cut.patience, fixed_epochs=cell_epochs,
                                    report=cut.report)
    summary = analysis.cutoff_summary(cutoffs, cut.report)
    metrics.update(analysis.cutoff_metrics(summary, cut.report))

    headline = corr_cells[(corr_cells.method == "spearman") & (corr_cells.intrinsic == intrinsic[0]) & (corr_cells.transfer == transfer[0])]
    if len(headline) and not math.isnan(headline.statistic.iloc[0]):
        h = headline.iloc[0]
        say(f"\nheadline: Spearman ρ({h.intrinsic}, {h.transfer}) across {h.n} cells = {h.statistic:+.3f} (p = {h.p_value:.3g})")
    say("\ncutoffs (mean over trajectories; transfer_val is chosen on AGIRI transfer-validation, never on a test split):")
    say(summary.to_string(index=False, float_format=_fmt))

    tables = {"cells": finished, "points": points, "correlations_cells": corr_cells, "correlations_points": corr_points,
              "correlations_within_trajectories": corr_within, "cutoffs": cutoffs, "cutoff_summary": summary}
    _log_analysis(results, tables, {**record, "study": study.sections()})
    log_figures(results, client, tracking.parent_run_id)
    _log_new_metrics(client, tracking.parent_run_id, metrics)
    return 0


def _log_analysis(results: SweepResults, tables: dict[str, pd.DataFrame], run_record: dict[str, Any]) -> None:
    client, run_id = results.client, results.parent_run_id
    with tempfile.TemporaryDirectory(prefix="fakedet-analysis-") as d:
        d = Path(d)
        for name, table in tables.items():
            table.to_csv(d / f"{name}.csv", index=False)
        (d / "correlations.txt").write_text(
            "Transfer vs intrinsic, across cells\n" + tables["correlations_cells"].to_string(index=False)
            + "\n\nAcross evaluation points (all trajectories pooled)\n" + tables["correlations_points"].to_string(index=False) + "\n")
        (d / "run_record.json").write_text(json.dumps(run_record, indent=1, default=str))
        client.log_artifacts(run_id, str(d), artifact_path="analysis")


def _log_new_metrics(client, run_id: str, metrics: dict[str, float]) -> None:
    """A re-analysis (`cutoff`, or a resumed finished sweep) adds only values that changed: no duplicate points."""
    now = int(time.time() * 1000)
    logged = client.get_run(run_id).data.metrics
    items = [Metric(k, float(v), now, 0) for k, v in metrics.items()
             if v is not None and math.isfinite(v) and not (k in logged and math.isclose(logged[k], v, rel_tol=0, abs_tol=1e-12))]
    for i in range(0, len(items), 500):  # MLflow takes at most 1000 metrics per batch
        client.log_batch(run_id, metrics=items[i:i + 500])
