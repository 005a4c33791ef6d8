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

from fakedet.console import say
from fakedet.figures import log_figures
from fakedet.results import SweepResults, points_from_mlflow
from fakedet.sweep import statistics
from fakedet.sweep.spec import plain_number
from fakedet.sweep.study import Study
from fakedet.sweep.store import SweepTracking

SUMMARY_COLUMNS = ("cifake_test/acc", "cifake_test/f1", "cifake_test/auc", "cifar100_test/real_recall",
                   "agiri_test/acc", "agiri_test/f1", "agiri_test/auc")


def _fmt(v: Any) -> str:
    return f"{v:.4f}"


def analyse_sweep(tracking: SweepTracking, study: Study, cell_epochs, record: dict[str, Any]) -> int:
    """Cells over seeds, correlations with intervals, which factor matters, cutoffs: printed, and logged
    to the sweep's parent run. 0 when done. Every figure names its unit and n (fakedet/sweep/statistics.py)."""
    client = tracking.client()
    points, cells = points_from_mlflow(client, tracking.experiment_id, tracking.parent_run_id)
    if points.empty:
        say("no evaluation points were logged; nothing to analyse")
        return 1
    results = SweepResults(client.get_run(tracking.parent_run_id), cells, points, client)
    finished = results.finished_cells()
    intrinsic, transfer = list(study.metrics.intrinsic), list(study.metrics.transfer)
    opts, cut = study.statistics, study.cutoff
    shown_metrics = [c for c in SUMMARY_COLUMNS if c in finished]

    # 1. each cell condition over its seeds
    summary = statistics.cells_summary(finished, list(dict.fromkeys([*SUMMARY_COLUMNS, *intrinsic, *transfer, *cut.report])))
    table = summary[["srm", "cell_epochs", "lr", "n_seeds"]].copy()
    table["cell_epochs"] = table["cell_epochs"].map(plain_number)
    for m in shown_metrics:
        table[m] = [_mean_std(a, b) for a, b in zip(summary[f"{m}_mean"], summary[f"{m}_std"])]
    n_traj = finished["trajectory"].nunique()
    say(f"\ncells: mean ± std over seeds (unit: model; n_seeds per row; {len(finished)} models in {n_traj} trajectories):")
    say(table.rename(columns={"cell_epochs": "epochs"}).to_string(index=False))
    diverged = cells[cells["diverged"].astype(bool)] if "diverged" in cells else cells.iloc[0:0]
    if len(diverged):
        say(f"\ndiverged (training went non-finite; ended, not retried): {diverged['trajectory'].nunique()} trajectories, "
            f"{len(diverged)} cells: " + ", ".join(sorted(diverged["trajectory"].unique())))

    if finished.empty:
        say("no cell finished: nothing to correlate or cut off")
        _log_analysis(results, {"cells": cells, "points": points}, {**record, "study": study.sections()})
        return 0

    # 2. transfer against intrinsic, on independent units
    corr = statistics.correlation_table(finished, points, intrinsic, transfer, n_boot=opts.n_boot, n_perm=opts.n_perm,
                                        seed=opts.seed, confidence=opts.confidence, trained_threshold=opts.trained_threshold,
                                        trained_metric=opts.trained_metric)
    metrics: dict[str, float] = {}
    say("")
    for scope in ("cells", "cells|trained"):
        if (corr["scope"] == scope).any():
            say(f"headline: {statistics.headline(corr, intrinsic[0], transfer[0], scope=scope)}")
    metrics.update(_headline_metrics(corr, intrinsic[0], transfer[0]))

    # 3. which factor matters
    factors = [f for f in ("srm", "cell_epochs", "lr", "seed", "momentum", "batch_size") if f in finished]
    variance = pd.concat([statistics.variance_decomposition(finished, m, factors).assign(metric=m)
                          for m in transfer if m in finished], ignore_index=True) if len(finished) else pd.DataFrame()
    if len(variance):
        shares = variance.pivot_table(index="metric", columns="factor", values="eta_sq", sort=False)
        say("\nshare of each transfer metric's variance across cells (eta squared, main-effects ANOVA; a description of "
            "this grid, no p-values: cells of a trajectory are nested):")
        say(shares.to_string(float_format=lambda v: f"{v:.3f}"))
        for row in variance.dropna(subset=["eta_sq"]).itertuples():
            metrics[f"variance/{row.metric.replace('/', '_')}/{row.factor}"] = float(row.eta_sq)

    # 4. cutoffs: each rule's pick per trajectory, compared on the same trajectories
    cutoffs = statistics.cutoff_table(points, select_on=cut.select_on, intrinsic_loss=cut.intrinsic_loss,
                                      intrinsic_acc=cut.intrinsic_acc, patience_epochs=cut.patience_epochs,
                                      fixed_epochs=cell_epochs, report=cut.report)
    cut_summary = statistics.cutoff_summary(cutoffs, cut.report)
    strata = [c for c in ("srm", "lr") if c in cutoffs]
    comparison = statistics.rule_comparison(cutoffs, cut.report[0], baseline="intrinsic_val_loss", n_boot=opts.n_boot,
                                            n_perm=opts.n_perm, seed=opts.seed, confidence=opts.confidence, strata=strata)
    say(f"\ncutoffs: mean and std over the same {int(cut_summary['n'].max()) if len(cut_summary) else 0} trajectories "
        f"(unit: trajectory; transfer_val is chosen on {cut.select_on}, never on a test split; oracle_test is a reference, not a rule):")
    say(cut_summary.to_string(index=False, float_format=_fmt))
    say(f"\nrules against intrinsic_val_loss on {cut.report[0]}, paired by trajectory:")
    say(comparison.to_string(index=False, float_format=_fmt))
    for row in cut_summary.to_dict("records"):
        for key in ("epoch", *cut.report):
            if f"{key}_mean" in row:
                metrics[f"cutoff/{row['rule']}/{key.replace('/', '_')}"] = row[f"{key}_mean"]
    for row in comparison.to_dict("records"):
        base = f"cutoff_vs_intrinsic_val_loss/{row['rule']}"
        metrics.update({f"{base}/mean_diff": row.get("mean_diff"), f"{base}/ci_low": row.get("ci_low"),
                        f"{base}/ci_high": row.get("ci_high")})

    tables = {"cells": finished, "points": points, "cells_summary": summary, "correlations": corr, "variance": variance,
              "cutoffs": cutoffs, "cutoff_summary": cut_summary, "cutoff_comparison": comparison}
    _log_analysis(results, tables, {**record, "study": study.sections()})
    log_figures(results, client, tracking.parent_run_id)
    _log_new_metrics(client, tracking.parent_run_id, {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    return 0


def _mean_std(mean: float, std: float) -> str:
    if not math.isfinite(mean):
        return "-"
    return f"{mean:.3f}" + (f" ± {std:.3f}" if math.isfinite(std) else "")


def _headline_metrics(corr: pd.DataFrame, x: str, y: str) -> dict[str, float]:
    """The headline (Spearman, cells pooled, trajectory bootstrap) as parent-run metrics; the full table is an artifact."""
    rows = corr[(corr["scope"] == "cells") & (corr["method"] == "spearman") & (corr["intrinsic"] == x) & (corr["transfer"] == y)]
    if rows.empty:
        return {}
    r = rows.iloc[0]
    return {f"headline/{k}": float(r[k]) for k in ("statistic", "ci_low", "ci_high", "p_value", "n_models", "n_trajectories")}


def _log_analysis(results: SweepResults, tables: dict[str, pd.DataFrame], run_record: dict[str, Any]) -> None:
    client, run_id = results.client, results.parent_run_id
    with tempfile.TemporaryDirectory(prefix="fakedet-analysis-") as d:
        d = Path(d)
        for name, table in tables.items():
            table.to_csv(d / f"{name}.csv", index=False)
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
