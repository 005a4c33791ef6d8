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
from fakedet import analysis
from fakedet.figures import log_figures
from fakedet.results import SweepResults, points_from_mlflow
from fakedet.sweep.spec import plain_number
from fakedet.sweep.study import Study
from fakedet.sweep.store import SweepTracking

SUMMARY_COLUMNS = ("cifake_test/acc", "cifake_test/f1", "cifake_test/auc", "cifar100_test/real_recall",
                   "agiri_test/acc", "agiri_test/f1", "agiri_test/auc")


def _fmt(v: Any) -> str:
    return f"{v:.4f}"


def analyse_sweep(tracking: SweepTracking, study: Study, cell_epochs, record: dict[str, Any]) -> int:
    """Cells over seeds, correlations with intervals, which factor matters, cutoffs: printed, and logged
    to the sweep's parent run. 0 when done. Every figure names its unit and n (fakedet/analysis/)."""
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
    summary = analysis.cells_summary(finished, list(dict.fromkeys([*SUMMARY_COLUMNS, *intrinsic, *transfer, *cut.report])))
    table = summary[["srm", "cell_epochs", "lr", "n_seeds"]].copy()
    table["cell_epochs"] = table["cell_epochs"].map(plain_number)
    for m in shown_metrics:
        table[m] = [_mean_std(a, b) for a, b in zip(summary[f"{m}_mean"], summary[f"{m}_std"])]
    n_traj = finished["trajectory"].nunique()
    say(f"\ncells: mean ± std over seeds (unit: model; n_seeds per row; {len(finished)} models in {n_traj} trajectories):")
    say(table.rename(columns={"cell_epochs": "epochs"}).to_string(index=False))
    pruned = cells[cells["status"] == "KILLED"] if "status" in cells else cells.iloc[0:0]
    if len(pruned):  # stopped by the scheduler (ASHA) before their epochs: not models of the table's lengths
        say(f"({len(pruned)} more {'model was' if len(pruned) == 1 else 'models were'} stopped early by ASHA (pruned) "
            f"and left out: {len(cells)} models in {cells['trajectory'].nunique()} trajectories in all)")
    diverged = cells[cells["diverged"].astype(bool)] if "diverged" in cells else cells.iloc[0:0]
    if len(diverged):
        say(f"\ndiverged (training went non-finite; ended, not retried): {diverged['trajectory'].nunique()} trajectories, "
            f"{len(diverged)} cells: " + ", ".join(sorted(diverged["trajectory"].unique())))

    if finished.empty:
        say("no cell finished: nothing to correlate or cut off")
        _log_analysis(results, {"cells": cells, "points": points}, {**record, "study": study.sections()})
        return 0

    # 2. does transfer move with intrinsic skill: one pre-registered answer per question, the rest exploratory
    primary = opts.primary
    corr = analysis.correlation_table(finished, points, intrinsic, transfer, primary_along=primary.along_training,
                                      primary_method=primary.correlation, change_between=primary.change_between,
                                      n_boot=opts.n_boot, seed=opts.seed, confidence=opts.confidence,
                                      trained_threshold=opts.trained_threshold, trained_metric=opts.trained_metric)
    metrics: dict[str, float] = {"headline/n_models": float(len(finished)), "headline/n_trajectories": float(n_traj)}
    headlines = analysis.primary_rows(corr)
    say("\nheadlines (pre-registered in [statistics.primary]; unit: trajectory; p Holm-adjusted over these):")
    for row in headlines.to_dict("records"):
        say(f"headline: {analysis.headline(row)}")
        metrics.update(_headline_metrics(row["scope"], row))
    say(_exploratory(corr))

    # 3. which factor matters
    factors = [f for f in ("srm", "cell_epochs", "lr", "seed", "momentum", "batch_size") if f in finished]
    variance = pd.concat([analysis.variance_decomposition(finished, m, factors).assign(metric=m)
                          for m in transfer if m in finished], ignore_index=True) if len(finished) else pd.DataFrame()
    shares = variance.pivot_table(index="metric", columns="factor", values="eta_sq", sort=False) if len(variance) else variance
    if study.kind == "hpo":
        say("\nwhich factor matters: an HPO sweep's sampled values are not a grid (no ANOVA shares); "
            "see the parameter importances (fANOVA) of the HPO answer below")
    elif shares.empty:
        notes = variance["note"].replace("", pd.NA).dropna() if "note" in variance else pd.Series(dtype=str)
        say("\nshare of each transfer metric's variance across cells: "
            + (notes.iloc[0] if len(notes) else "not computable (no finished cell has a transfer metric)"))
    else:
        say("\nshare of each transfer metric's variance across cells (eta squared, main-effects ANOVA; a description of "
            "this grid, no p-values: cells of a trajectory are nested):")
        say(shares.to_string(float_format=lambda v: f"{v:.3f}"))
        for row in variance.dropna(subset=["eta_sq"]).itertuples():
            metrics[f"variance/{row.metric.replace('/', '_')}/{row.factor}"] = float(row.eta_sq)

    # 4. cutoffs: each rule's pick per trajectory, compared on the same trajectories
    cutoffs = analysis.cutoff_table(points, select_on=cut.select_on, intrinsic_loss=cut.intrinsic_loss,
                                    intrinsic_acc=cut.intrinsic_acc, patience_epochs=cut.patience_epochs,
                                    fixed_epochs=cell_epochs, report=cut.report)
    cut_summary = analysis.cutoff_summary(cutoffs, cut.report)
    comparison = analysis.rule_comparison(cutoffs, cut.report[0], baseline="intrinsic_val_loss",
                                          confidence=opts.confidence, strata=opts.cutoff_strata or None,
                                          primary=primary.rule)
    say(f"\ncutoffs: mean and std over the same {int(cut_summary['n'].max()) if len(cut_summary) else 0} trajectories "
        f"(unit: trajectory; transfer_val is chosen on {cut.select_on}, never on a test split; oracle_test is a reference, not a rule):")
    say(cut_summary.to_string(index=False, float_format=_fmt))
    first = comparison[comparison["role"] == "primary"]
    if len(first):
        say(f"\nheadline: {analysis.comparison_headline(first.iloc[0])}")
        metrics.update(_headline_metrics("cutoff", {**first.iloc[0].to_dict(), "statistic": first.iloc[0]["mean_diff"]}))
    say(_comparison_table(comparison, cut.report[0]))
    for row in cut_summary.to_dict("records"):
        for key in ("epoch", *cut.report):
            if f"{key}_mean" in row:
                metrics[f"cutoff/{row['rule']}/{key.replace('/', '_')}"] = row[f"{key}_mean"]
    for row in comparison.to_dict("records"):
        base = f"cutoff_vs_intrinsic_val_loss/{row['rule']}"
        metrics.update({f"{base}/mean_diff": row.get("mean_diff"), f"{base}/ci_low": row.get("ci_low"),
                        f"{base}/ci_high": row.get("ci_high"), f"{base}/p_adjusted": row.get("p_adjusted")})

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


def _headline_metrics(question: str, row: dict) -> dict[str, float]:
    """One question's primary answer as parent-run metrics `headline/<question>/<key>` (question:
    along_training, across_models, across_seeds, cutoff): the estimate, its interval, the p of the
    same test and its Holm-adjusted value, n trajectories; the full tables are artifacts."""
    keys = {"statistic": "statistic", "ci_low": "ci_low", "ci_high": "ci_high", "p_value": "p_value",
            "p_holm": "p_adjusted", "n_trajectories": "n_trajectories"}
    return {f"headline/{question}/{k}": float(row[v]) for k, v in keys.items()}


def _p(p: float) -> str:
    return "" if not math.isfinite(p) else ("<.001" if p < 0.001 else f"{p:.3f}")


def _exploratory(corr: pd.DataFrame) -> str:
    """The exploratory rows of the first pair, one line each (≤ 120 columns); what is constant above."""
    if corr.empty:
        return "\nno intrinsic and transfer metric pair in the cells: no correlation"
    x, y = corr["intrinsic"].iloc[0], corr["transfer"].iloc[0]
    sel = corr[(corr["intrinsic"] == x) & (corr["transfer"] == y) & (corr["role"] != "primary")]
    table = pd.DataFrame({
        "question": sel["scope"], "estimand": sel["estimand"], "method": sel["method"], "epochs": sel["epochs"],
        "estimate": sel["statistic"].map(lambda v: f"{v:+.3f}"),
        "95% CI": [f"[{a:+.3f}, {b:+.3f}]" if math.isfinite(a) else "-" for a, b in zip(sel["ci_low"], sel["ci_high"])],
        "test": sel["test"].replace("", "none"), "p": sel["p_value"].map(_p), "p_BH": sel["p_adjusted"].map(_p),
        "n": sel["n_trajectories"],
    })  # fmt: skip
    pairs = corr[["intrinsic", "transfer"]].drop_duplicates()
    return (f"\nexploratory: {x} (intrinsic) vs {y} (transfer); unit: trajectory; p_BH: Benjamini–Hochberg over "
            f"all {int((corr['role'] == 'exploratory').sum())} exploratory rows of {len(pairs)} metric pairs "
            f"(analysis/correlations.csv); pooled: descriptive, includes the training trend, no test\n"
            + table.to_string(index=False))  # fmt: skip


def _comparison_table(comparison: pd.DataFrame, metric: str) -> str:
    if comparison.empty:
        return "no rule to compare"
    test = "; ".join(comparison["test"].replace("", pd.NA).dropna().unique()) or "none"
    table = comparison[["rule", "role", "n_trajectories", "mean_rule", "mean_baseline", "mean_diff", "ci_low", "ci_high",
                        "p_value", "p_adjusted", "n_higher", "n_lower", "note"]].rename(columns={"n_trajectories": "n"})
    return (f"rules against intrinsic_val_loss on {metric}, paired by trajectory (unit: trajectory; test: {test}; "
            f"p_adjusted: the primary rule's own p, BH over the exploratory rules):\n"
            + table.to_string(index=False, float_format=_fmt))  # fmt: skip


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
