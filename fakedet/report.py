"""A finished sweep's analysis: printed, and logged to its MLflow parent run by this one owner; and the
sweep's report page.

Read back from MLflow (`fakedet.results`), so the same code serves the end of a sweep and
`sweeps/run.py cutoff` on an old one. The first analysis, at the sweep's end, gives the parent run its
correlation and cutoff tables under `analysis/`, the study's tables and figures under `figures/`
(`fakedet.figures.VIEWS`), `report.html`, and the headline figures as metrics. A later one never
rewrites those: it writes the same files under `analysis/v<N>/` (`fakedet.results.AnalysisVersion`)
with its own `run_record.json` naming the study and options it used, and logs no metrics.
"""

from __future__ import annotations

import base64
import html
import json
import math
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.entities import Metric

from fakedet.console import say, table as text_table, wrap
from fakedet import analysis
from fakedet.analysis import roles
from fakedet.figures import VIEWS, explain_metric, log_figures
from fakedet.results import SweepResults, next_analysis, no_progress_bar, points_from_mlflow
from fakedet.sweep.spec import plain_number
from fakedet.sweep.study import Study
from fakedet.sweep.store import SweepTracking, run_link, runs_link

SUMMARY_COLUMNS = ("cifake_test/acc", "cifake_test/f1", "cifake_test/auc", "cifar100_test/real_recall",
                   "agiri_test/acc", "agiri_test/f1", "agiri_test/auc")


def _fmt(v: Any) -> str:
    return f"{v:.4f}"


@dataclass(frozen=True)
class AnalysisOrigin:
    """Why an analysis ran and with which study: written into its `run_record.json`."""

    command: str = "the sweep's end"
    """What started it: the sweep's end, or `sweeps/run.py cutoff ...`."""
    study_from: str = "the study the sweep ran"
    """Where its study was read (the sweep file, a --study file, ...)."""
    study_changes: tuple[str, ...] = ()
    """How that study differs from the one the sweep recorded (one line per setting); empty: the same."""


def analyse_sweep(tracking: SweepTracking, study: Study, cell_epochs, record: dict[str, Any],
                  origin: AnalysisOrigin = AnalysisOrigin()) -> int:
    """Cells over seeds, correlations with intervals, which factor matters, cutoffs: printed, and logged
    to the sweep's parent run as a new analysis (`next_analysis`: the first at the top, each later one
    under `analysis/v<N>/`), with its report page. 0 when done. Every figure names its unit and n
    (fakedet/analysis/)."""
    client = tracking.client()
    points, cells = points_from_mlflow(client, tracking.experiment_id, tracking.parent_run_id)
    if points.empty:
        say("no evaluation points were logged; nothing to analyse")
        return 1
    version = next_analysis(client, tracking.parent_run_id)
    results = SweepResults(client.get_run(tracking.parent_run_id), cells, points, client, analysis=version)
    record = {**record, "study": study.sections(), "analysis": _analysis_entry(results, study, origin)}
    finished = results.finished_cells()
    # roles (`intrinsic_test/acc`) resolved from the training sets the sweep's cells trained on: set names
    # where they all give one, else a column per role (fakedet.analysis.roles)
    train_ons = roles.train_ons_of(cells)
    named = lambda m: roles.concrete(m, train_ons)  # noqa: E731
    intrinsic, transfer = [named(m) for m in study.metrics.intrinsic], [named(m) for m in study.metrics.transfer]
    opts, raw_cut = study.statistics, study.cutoff
    cut = raw_cut.model_copy(update={"select_on": named(raw_cut.select_on), "intrinsic_loss": named(raw_cut.intrinsic_loss),
                                     "intrinsic_acc": named(raw_cut.intrinsic_acc), "report": [named(m) for m in raw_cut.report]})
    trained_metric = named(opts.trained_metric)
    every_name = [*intrinsic, *transfer, cut.select_on, cut.intrinsic_loss, cut.intrinsic_acc, *cut.report, trained_metric]
    matrix_cells, matrix_points = finished, points  # with train_on, for the transfer matrix
    finished, points, cells = (_one_training_set(roles.with_role_columns(f, every_name), train_ons) for f in (finished, points, cells))
    shown_metrics = [c for c in SUMMARY_COLUMNS if c in finished]
    condition = (*analysis.summary.CONDITION, "train_on") if "train_on" in finished else analysis.summary.CONDITION

    # 1. each cell condition over its seeds
    summary = analysis.cells_summary(finished, list(dict.fromkeys([*SUMMARY_COLUMNS, *intrinsic, *transfer, *cut.report])), by=condition)
    n_traj = finished["trajectory"].nunique()
    say(cells_text(summary, shown_metrics, len(finished), n_traj))
    pruned = cells[cells["status"] == "KILLED"] if "status" in cells else cells.iloc[0:0]
    if len(pruned):  # stopped by the scheduler (ASHA) before their epochs: not models of the table's lengths
        say(wrap(f"({len(pruned)} more {'model was' if len(pruned) == 1 else 'models were'} stopped early by ASHA (pruned) "
                 f"and left out: {len(cells)} models in {cells['trajectory'].nunique()} trajectories in all)"))
    diverged = cells[cells["diverged"].astype(bool)] if "diverged" in cells else cells.iloc[0:0]
    if len(diverged):
        say(wrap(f"\ndiverged (training went non-finite; ended, not retried): {diverged['trajectory'].nunique()} "
                 f"trajectories, {len(diverged)} cells: " + ", ".join(sorted(diverged["trajectory"].unique()))))

    if finished.empty:
        say("no cell finished: nothing to correlate or cut off")
        _log_analysis(results, {"cells": cells, "points": points}, record)
        _log_report(results, tracking.uri)
        _say_written(results, tracking.uri)
        return 0

    # 2. does transfer move with intrinsic skill: one pre-registered answer per question, the rest exploratory
    primary = opts.primary
    corr = analysis.correlation_table(finished, points, intrinsic, transfer, primary_along=primary.along_training,
                                      primary_method=primary.correlation, change_between=primary.change_between,
                                      n_boot=opts.n_boot, seed=opts.seed, confidence=opts.confidence,
                                      trained_threshold=opts.trained_threshold, trained_metric=trained_metric)
    metrics: dict[str, float] = {"headline/n_models": float(len(finished)), "headline/n_trajectories": float(n_traj)}
    headlines = analysis.primary_rows(corr)
    say("\nheadlines (pre-registered in [statistics.primary]; unit: trajectory; p Holm-adjusted over these):")
    for row in headlines.to_dict("records"):
        say(wrap(f"headline: {analysis.headline(row)}"))
        metrics.update(_headline_metrics(row["scope"], row))
    say(exploratory_text(corr))

    # 3. which factor matters
    factors = [f for f in ("srm", "attention", "augment", "augment_p", "cell_epochs", "lr", "train_on", "seed", "momentum", "batch_size")
               if f in finished]
    variance = pd.concat([analysis.variance_decomposition(finished, m, factors).assign(metric=m)
                          for m in transfer if m in finished], ignore_index=True) if len(finished) else pd.DataFrame()
    if study.kind == "hpo":
        say(wrap("\nwhich factor matters: an HPO sweep's sampled values are not a grid (no ANOVA shares); "
                 "see the parameter importances (fANOVA) of the HPO answer below"))
    elif len(variance):
        say(variance_text(variance))
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
    say(cutoff_text(cut_summary, cut.select_on))
    first = comparison[comparison["role"] == "primary"]
    if len(first):
        say(wrap(f"\nheadline: {analysis.comparison_headline(first.iloc[0])}"))
        metrics.update(_headline_metrics("cutoff", {**first.iloc[0].to_dict(), "statistic": first.iloc[0]["mean_diff"]}))
    say(comparison_text(comparison, cut.report[0]))
    for row in cut_summary.to_dict("records"):
        for key in ("epoch", *cut.report):
            if f"{key}_mean" in row:
                metrics[f"cutoff/{row['rule']}/{key.replace('/', '_')}"] = row[f"{key}_mean"]
    for row in comparison.to_dict("records"):
        base = f"cutoff_vs_intrinsic_val_loss/{row['rule']}"
        metrics.update({f"{base}/mean_diff": row.get("mean_diff"), f"{base}/ci_low": row.get("ci_low"),
                        f"{base}/ci_high": row.get("ci_high"), f"{base}/p_adjusted": row.get("p_adjusted")})

    # 5. every training set against every test set, at each cell length and at each rule's chosen point
    matrix = analysis.transfer_matrix(matrix_cells, matrix_points, cutoffs, confidence=opts.confidence)
    say(transfer_matrix_text(matrix))

    tables = {"cells": finished, "points": points, "cells_summary": summary, "correlations": corr, "variance": variance,
              "cutoffs": cutoffs, "cutoff_summary": cut_summary, "cutoff_comparison": comparison, "transfer_matrix": matrix}
    metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    _log_analysis(results, {**tables, "metrics": pd.DataFrame({"metric": list(metrics), "value": list(metrics.values())})},
                  record)
    log_figures(results, client, tracking.parent_run_id, artifact_path=version.figures)
    if version.number == 1:  # the sweep's own answer; a re-analysis keeps its numbers in its metrics.csv
        _log_new_metrics(client, tracking.parent_run_id, metrics)
    _log_report(results, tracking.uri)
    _say_written(results, tracking.uri)
    return 0


def _one_training_set(frame: pd.DataFrame, train_ons: list[str]) -> pd.DataFrame:
    """A table of one training set without its `train_on` column: the study's tables as they always were."""
    return frame.drop(columns="train_on") if len(train_ons) == 1 and "train_on" in frame else frame


def matrix_cell(row: dict | pd.Series) -> str:
    """One entry of the transfer matrix: `0.712 [0.650, 0.774] n=3` (no interval from one trajectory)."""
    if not math.isfinite(row["mean"]):
        return "-"
    return f"{row['mean']:.3f} {_ci(row['ci_low'], row['ci_high']).replace('+', '')} n={int(row['n_trajectories'])}".replace(" - ", " ")


def transfer_matrix_wide(matrix: pd.DataFrame) -> pd.DataFrame:
    """The transfer matrix as a grid: one row per (point, condition), one column per `<test set>/<metric>`."""
    if matrix.empty:
        return matrix
    keys = [c for c in matrix.columns if c not in ("at", "test_set", "metric", "mean", "sd", "ci_low", "ci_high",
                                                     "n_trajectories", "confidence", "unit", "method")]
    table = matrix.assign(column=matrix["test_set"] + "/" + matrix["metric"], text=[matrix_cell(r) for r in matrix.to_dict("records")])
    wide = table.pivot_table(index=["at", *keys], columns="column", values="text", aggfunc="first", sort=False)
    wide = wide.reindex(columns=list(dict.fromkeys(table["column"])))
    wide.columns.name = None
    return wide.reset_index()


def transfer_matrix_text(matrix: pd.DataFrame) -> str:
    """The transfer matrix printed: mean [t interval] n per training set and test set."""
    if matrix.empty:
        return "\nno transfer matrix: no finished cell"
    level = int(round(100 * float(matrix["confidence"].iloc[0])))
    return text_table(transfer_matrix_wide(matrix), f"\ntransfer matrix: every training set on every test set, mean over "
                      f"trajectories (seeds) [{level}% t interval] n; ROC AUC, CIFAR-100: share predicted REAL "
                      "(unit: trajectory):", keys=["at", "train_on"])


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


def _ci(low: float, high: float, digits: int = 3) -> str:
    return f"[{low:+.{digits}f}, {high:+.{digits}f}]" if math.isfinite(low) and math.isfinite(high) else "-"


# The printed tables: each fits console.WIDTH columns, says what is constant once above its rows and its
# long notes once below (fakedet.console.table); the full tables are the analysis/ artifacts.
def cells_text(summary: pd.DataFrame, metrics: list[str], n_models: int, n_trajectories: int) -> str:
    """The cells over seeds (`analysis.cells_summary`): one row per condition, `mean ± std` per metric."""
    table = summary[[c for c in ("srm", *analysis.summary.AXES, "cell_epochs", "lr", "train_on", "n_seeds") if c in summary]].copy()
    table["cell_epochs"] = table["cell_epochs"].map(plain_number)
    for m in metrics:
        table[m] = [_mean_std(a, b) for a, b in zip(summary[f"{m}_mean"], summary[f"{m}_std"])]
    return text_table(table.rename(columns={"cell_epochs": "epochs"}),
                      f"\ncells: mean ± std over seeds (unit: model; n_seeds per row; {n_models} models in "
                      f"{n_trajectories} trajectories):",
                      keys=[c for c in ("srm", *analysis.summary.AXES, "epochs", "lr", "train_on") if c in table or c == "epochs"])  # fmt: skip


def exploratory_text(corr: pd.DataFrame) -> str:
    """The exploratory rows of the first (intrinsic, transfer) pair of `analysis.correlation_table`."""
    if corr.empty:
        return "\nno intrinsic and transfer metric pair in the cells: no correlation"
    x, y = corr["intrinsic"].iloc[0], corr["transfer"].iloc[0]
    sel = corr[(corr["intrinsic"] == x) & (corr["transfer"] == y) & (corr["role"] != "primary")]
    table = pd.DataFrame({
        "question": sel["scope"], "estimand": sel["estimand"], "method": sel["method"], "epochs": sel["epochs"],
        "estimate": sel["statistic"].map(lambda v: f"{v:+.3f}" if math.isfinite(v) else "-"),
        f"{corr['confidence'].iloc[0]:.0%} CI": [_ci(a, b) for a, b in zip(sel["ci_low"], sel["ci_high"])],
        "test": sel["test"].replace("", "none"), "p": sel["p_value"].map(_p), "p_BH": sel["p_adjusted"].map(_p),
        "n": sel["n_trajectories"], "note": sel["note"],
    })  # fmt: skip
    pairs = corr[["intrinsic", "transfer"]].drop_duplicates()
    return text_table(table, f"\nexploratory: {x} (intrinsic) vs {y} (transfer); unit: trajectory; p_BH: "
                      f"Benjamini–Hochberg over all {int((corr['role'] == 'exploratory').sum())} exploratory rows of "
                      f"{len(pairs)} metric pairs (analysis/correlations.csv); pooled: descriptive, includes the "
                      f"training trend, no test", keys=["question", "estimand", "method", "epochs"])  # fmt: skip


def variance_text(variance: pd.DataFrame) -> str:
    """Each factor's eta squared per metric (`analysis.variance_decomposition` rows with a `metric`)."""
    title = ("\nshare of each transfer metric's variance across cells (eta squared, main-effects ANOVA; a description "
             "of this grid, no p-values: cells of a trajectory are nested)")
    if not variance["eta_sq"].astype(float).notna().any():
        return wrap(f"{title}: not computable ({'; '.join(dict.fromkeys(n for n in variance['note'] if n))})")
    shares = variance.pivot_table(index="metric", columns="factor", values="eta_sq", sort=False, dropna=False)
    shares.columns.name = None
    single = [f for f in shares.columns if variance.loc[variance["factor"] == f, "note"].eq("one level: dropped").all()]
    title += (f"; one level here, not in the model: {', '.join(single)}" if single else "") + ":"
    return text_table(shares.drop(columns=single).reset_index(), title, keys=["metric"], floats="{:.3f}".format)


def cutoff_text(cut_summary: pd.DataFrame, select_on: str) -> str:
    """Each cutoff rule's picked epoch, stop epoch and report metrics as `mean ± std` (`analysis.cutoff_summary`)."""
    n = int(cut_summary["n"].max()) if len(cut_summary) else 0
    title = (f"\ncutoffs: mean ± std over the same {n} trajectories (unit: trajectory; transfer_val is chosen on "
             f"{select_on}, never on a test split; oracle_test is a reference, not a rule):")
    table = cut_summary[[c for c in ("rule", "usable", "n") if c in cut_summary]].copy()
    for key in [c.removesuffix("_mean") for c in cut_summary if c.endswith("_mean")]:
        table[key] = [_mean_std(a, b) for a, b in zip(cut_summary[f"{key}_mean"], cut_summary[f"{key}_std"])]
    return text_table(table, title, keys=["rule"])


def comparison_text(comparison: pd.DataFrame, metric: str) -> str:
    """Each rule against the baseline rule, paired by trajectory (`analysis.rule_comparison`)."""
    if comparison.empty:
        return "no rule to compare"
    test = "; ".join(comparison["test"].replace("", pd.NA).dropna().unique()) or "none"
    baseline = comparison["baseline"].iloc[0]
    table = pd.DataFrame({
        "rule": comparison["rule"], "role": comparison["role"], "n": comparison["n_trajectories"],
        "mean_rule": comparison["mean_rule"], "mean_baseline": comparison["mean_baseline"],
        "mean_diff": comparison["mean_diff"].map(lambda v: f"{v:+.4f}" if math.isfinite(v) else "-"),
        f"{comparison['confidence'].iloc[0]:.0%} CI": [_ci(a, b, 4) for a, b in zip(comparison["ci_low"], comparison["ci_high"])],
        "p": comparison["p_value"].map(_p), "p_adjusted": comparison["p_adjusted"].map(_p),
        "n_higher": comparison["n_higher"], "n_lower": comparison["n_lower"], "note": comparison["note"],
    })  # fmt: skip
    return text_table(table, f"rules against {baseline} on {metric}, paired by trajectory (unit: trajectory; test: "
                      f"{test}; p_adjusted: the primary rule's own p, BH over the exploratory rules):",
                      keys=["rule"], floats="{:.4f}".format)  # fmt: skip


def _log_analysis(results: SweepResults, tables: dict[str, pd.DataFrame], run_record: dict[str, Any]) -> None:
    client, run_id = results.client, results.parent_run_id
    with tempfile.TemporaryDirectory(prefix="fakedet-analysis-") as d:
        d = Path(d)
        for name, table in tables.items():
            table.to_csv(d / f"{name}.csv", index=False)
        (d / "run_record.json").write_text(json.dumps(run_record, indent=1, default=str))
        client.log_artifacts(run_id, str(d), artifact_path=results.analysis.tables)


def _log_new_metrics(client, run_id: str, metrics: dict[str, float]) -> None:
    """A re-analysis (`cutoff`, or a resumed finished sweep) adds only values that changed: no duplicate points."""
    now = int(time.time() * 1000)
    logged = client.get_run(run_id).data.metrics
    items = [Metric(k, float(v), now, 0) for k, v in metrics.items()
             if v is not None and math.isfinite(v) and not (k in logged and math.isclose(logged[k], v, rel_tol=0, abs_tol=1e-12))]
    for i in range(0, len(items), 500):  # MLflow takes at most 1000 metrics per batch
        client.log_batch(run_id, metrics=items[i:i + 500])


# ---------------------------------------------------------------------------------------------------
# where an analysis went, and the sweep's report page
# ---------------------------------------------------------------------------------------------------
def _analysis_entry(results: SweepResults, study: Study, origin: AnalysisOrigin) -> dict[str, Any]:
    """The `analysis` entry of an analysis's run_record.json: which one it is, what started it, the study
    and options it ran with, where its files are."""
    version = results.analysis
    return {"version": version.name, "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "sweep": results.name, "parent_run_id": results.parent_run_id, "command": origin.command,
            "study_source": study.source, "study_from": origin.study_from,
            "study_changes": list(origin.study_changes), "tables": version.tables, "figures": version.figures, "report": version.report,
            "reads": "the cell runs' final metrics and metric histories in MLflow; nothing is trained again"}


def _log_report(results: SweepResults, tracking_uri: str) -> None:
    """The analysis's report page, built from what was just logged (the same path `fakedet report` reads).
    A page that fails is said and skipped, as a view is: the analysis itself is logged already."""
    try:
        page = render_report(results, tracking_uri)
    except Exception as e:  # noqa: BLE001 - reported, not hidden
        say(f"report page not written ({type(e).__name__}: {e}); write it later with "
            f"`fakedet report --sweep {results.name} --analysis {results.analysis.name}`")
        return
    results.client.log_text(results.parent_run_id, page, results.analysis.report)


def _say_written(results: SweepResults, tracking_uri: str) -> None:
    """What this analysis wrote and where: its folders, file by file, and its report's MLflow link."""
    version, client, run_id = results.analysis, results.client, results.parent_run_id
    tables = [a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(run_id, version.tables) if not a.is_dir]
    figures = [a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(run_id, version.figures) if not a.is_dir]
    if version.number == 1:
        say(f"\nanalysis {version.name} (the sweep's own) logged to parent run {run_id}:")
    else:
        say(f"\nanalysis {version.name} logged to parent run {run_id}, beside the earlier ones "
            f"(what the sweep recorded under analysis/ and figures/ is unchanged):")
    say(f"  {version.tables}/: {', '.join(tables)}")
    say(f"  {version.figures}/: {', '.join(figures) or 'none'}")
    say(f"  report: {run_link(tracking_uri, results.parent.info.experiment_id, run_id, version.report)}")


# the text columns of the analysis tables: a CSV round trip reads an empty one as NaN
_TEXT_COLUMNS = ("note", "adjustment", "test", "label", "epochs", "role", "scope", "estimand", "method", "rule", "baseline", "at",
                 "test_set", "unit", "train_on")


def analysis_table(results: SweepResults, name: str) -> pd.DataFrame | None:
    """One table of the analysis the results point at (`analysis_file`), with its text columns as
    logged ("" not NaN); None where this analysis has no such table."""
    try:
        table = results.artifact_table(results.parent_run_id, results.analysis_file(name))
    except FileNotFoundError:
        return None
    for column in _TEXT_COLUMNS:
        if column in table:
            table[column] = table[column].fillna("").astype(str)
    return table


def headlines(results: SweepResults) -> list[str]:
    """The analysis's answers, one line per pre-registered question ([statistics.primary]), as the sweep
    printed them: along training, across models, across seeds, and the cutoff rule against early stopping."""
    lines = []
    corr = analysis_table(results, "correlations.csv")
    if corr is not None and len(corr):
        lines += [analysis.headline(row) for row in analysis.primary_rows(corr).to_dict("records")]
    comparison = analysis_table(results, "cutoff_comparison.csv")
    if comparison is not None:
        first = comparison[comparison["role"] == "primary"]
        if len(first):
            lines.append(analysis.comparison_headline(first.iloc[0]))
    return lines


def cells_table(results: SweepResults) -> pd.DataFrame | None:
    """Each cell condition over its seeds as the sweep printed it: srm, epochs, lr, n_seeds, and `mean ± std`
    of the test metrics (from the analysis's cells_summary.csv)."""
    summary = analysis_table(results, "cells_summary.csv")
    if summary is None:
        return None
    table = summary[[c for c in ("srm", *analysis.summary.AXES, "cell_epochs", "lr", "train_on", "n_seeds") if c in summary]].copy()
    if "cell_epochs" in table:
        table["cell_epochs"] = table["cell_epochs"].map(plain_number)
    for m in SUMMARY_COLUMNS:
        if f"{m}_mean" in summary:
            table[m] = [_mean_std(a, b) for a, b in zip(summary[f"{m}_mean"], summary[f"{m}_std"])]
    return table.rename(columns={"cell_epochs": "epochs"})


_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1250px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.8em; }
.meta { color: #555; } .note { color: #555; font-size: .92em; }
ul.headlines li { margin: .4em 0; font-size: 1.05em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .2em .5em; text-align: right; } th { background: #f3f3f3; }
td:first-child, th:first-child { text-align: left; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; border: 1px solid #eee; } figcaption { color: #555; }
pre { background: #f7f7f7; padding: .8em; overflow-x: auto; font-size: .85em; }
.scroll { overflow-x: auto; }
"""


def _html_table(table: pd.DataFrame | None, missing: str, keep: tuple[str, ...] = ("rule", "srm", "epochs", "lr")) -> str:
    """A table as HTML; a column with one value in every row (of two or more) is stated once above it
    instead of repeated (`keep`: the columns that name a row stay)."""
    if table is None:
        return f"<p class='note'>{html.escape(missing)}</p>"
    if table.empty:
        return "<p class='note'>no rows</p>"
    constant = [c for c in table.columns if len(table) > 1 and c not in keep and table[c].astype(str).nunique() == 1]
    stated = "; ".join(f"{c} = {_cell_text(table[c].iloc[0])}" for c in constant)
    return ((f"<p class='note'>in every row: {html.escape(stated)}</p>" if stated else "") + "<div class='scroll'>"
            + table.drop(columns=constant).to_html(index=False, na_rep="–", float_format=_fmt, border=0, escape=True) + "</div>")


def _cell_text(value: Any) -> str:
    if isinstance(value, float):
        return "–" if not math.isfinite(value) else _fmt(value)
    return str(value) if value != "" else "(empty)"


def _figures(results: SweepResults) -> list[tuple[str, bytes]]:
    """(name, PNG bytes) of every figure the analysis logged, in the order it logged them (`fakedet.figures.VIEWS`)."""
    client, run_id, folder = results.client, results.parent_run_id, results.analysis.figures
    names = [a.path for a in client.list_artifacts(run_id, folder) if not a.is_dir and a.path.endswith((".png", ".txt"))]
    if not names:
        return []
    order = {f"{folder}/{name}": i for i, name in enumerate(VIEWS)}
    out = []
    with tempfile.TemporaryDirectory(prefix="fakedet-report-") as d, no_progress_bar():
        for path in sorted(names, key=lambda p: order.get(p, len(order))):
            out.append((path, Path(client.download_artifacts(run_id, path, d)).read_bytes()))
    return out


def explain_table(results: SweepResults, dataset: str = "cifake_test") -> pd.DataFrame | None:
    """Per cell condition (placement, lr, epochs): the last-convolution Grad-CAM share the explain view plots
    (`fakedet.figures.explain_metric`) at the cell's end, mean and std over seeds (unit: model) and n; None
    where the sweep logged no shares."""
    metric = explain_metric(results, dataset)
    cells = results.finished_cells()
    if metric is None or metric not in cells:
        return None
    columns = [metric] + [f"{dataset}/{m}" for m in ("cam_bg_area", "cam_entropy") if f"{dataset}/{m}" in cells]
    rows = []
    for (srm, lr, epochs), group in cells.groupby(["srm", "lr", "cell_epochs"], sort=True):
        row = {"srm": srm, "lr": lr, "epochs": epochs, "n_seeds": int(group[metric].notna().sum())}
        for c in columns:
            row[c] = _mean_std(group[c].mean(), group[c].std())
        rows.append(row)
    return pd.DataFrame(rows)


def render_report(results: SweepResults, tracking_uri: str) -> str:
    """The sweep's report page for the analysis `results` points at: one self-contained HTML file (figures
    inline as base64 PNG, the style inline, nothing fetched): the headline per question, the cells over
    seeds, the cutoff summary and comparison, every figure, the exploratory correlations and the run record."""
    version, parent = results.analysis, results.parent
    finished = results.finished_cells()
    n_traj = finished["trajectory"].nunique() if len(finished) else 0
    experiment = parent.info.experiment_id
    record_text = ""
    try:
        with tempfile.TemporaryDirectory(prefix="fakedet-report-") as d, no_progress_bar():
            record_text = Path(results.client.download_artifacts(results.parent_run_id, results.analysis_file("run_record.json"), d)).read_text()
    except Exception:  # noqa: BLE001 - an analysis without a record still gets a page; said below
        pass
    record = json.loads(record_text) if record_text else {}
    entry = record.get("analysis", {})
    e = html.escape
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>fakedet sweep {e(results.name)}</title>"
             f"<style>{_STYLE}</style></head><body>",
             f"<h1>Sweep {e(results.name)}</h1>",
             f"<p class='meta'>{e(results.kind)} sweep, parent run <code>{e(results.parent_run_id)}</code>; study {e(str(parent.data.params.get('study', '?')))}"
             + (f" (preset {e(parent.data.params['preset'])})" if parent.data.params.get("preset") else "")
             + f"; {len(finished)} finished cells of {len(results.cells)} in {n_traj} trajectories; data "
             f"{e(str(parent.data.params.get('data', '?')))} (cache {e(str(parent.data.params.get('data_hash', '?')))})</p>",
             f"<p class='meta'>analysis {e(version.name)}"
             + (" (the sweep's own)" if version.number == 1 else f" (a re-analysis, files under {e(version.tables)}/)")
             + (f", written {e(entry['written_at'])} by {e(entry.get('command', '?'))}; study {e(entry.get('study_source', '?'))} "
                f"({e(entry.get('study_from', '?'))})" if entry.get("written_at") else "")
             + "</p>",
             f"<p class='meta'>MLflow: <a href='{e(runs_link(tracking_uri, experiment, results.name))}'>the sweep's runs</a> · "
             f"<a href='{e(run_link(tracking_uri, experiment, results.parent_run_id))}'>the parent run</a></p>"]
    if entry.get("study_changes"):
        parts.append("<p class='note'>this analysis's study differs from the one the sweep recorded:</p><ul>"
                     + "".join(f"<li><code>{e(c)}</code></li>" for c in entry["study_changes"]) + "</ul>")

    lines = headlines(results)
    parts.append("<h2 id='headlines'>Headlines</h2><p class='note'>one pre-registered answer per question "
                 "([statistics.primary]); unit: trajectory; p Holm-adjusted over these; every other row is exploratory</p>")
    parts.append("<ul class='headlines'>" + "".join(f"<li>{e(line)}</li>" for line in lines) + "</ul>" if lines
                 else "<p class='note'>no headline: this analysis has no correlation or cutoff table</p>")

    parts.append("<h2 id='cells'>Cells</h2><p class='note'>mean ± std over seeds (unit: model; n_seeds per row)</p>")
    parts.append(_html_table(cells_table(results), "this analysis has no cells_summary.csv"))

    parts.append("<h2 id='cutoffs'>Cutoffs</h2><p class='note'>each rule's chosen epoch and test metrics, mean and std "
                 "over the same trajectories (unit: trajectory); oracle_test is a reference, not a rule</p>")
    parts.append(_html_table(analysis_table(results, "cutoff_summary.csv"), "this analysis has no cutoff_summary.csv"))
    parts.append("<p class='note'>each rule against early stopping on the intrinsic validation loss, paired by trajectory</p>")
    parts.append(_html_table(analysis_table(results, "cutoff_comparison.csv"), "this analysis has no cutoff_comparison.csv"))

    parts.append("<h2 id='explain'>Where the detectors look</h2><p class='note'>last-convolution Grad-CAM on a fixed probe "
                 "set (16 REAL + 16 FAKE images of cifake_test, the same in every cell), at each cell's end: mean ± std over "
                 "seeds (unit: model); cam_bg_area is the share a map spread evenly would give. A Grad-CAM shows which "
                 "activations the logit's gradient weighs, not a causal mechanism; the stand-in's object masks say "
                 "nothing about real images. Maps: figures/explain_cifake_test.png and each cell's explain/ artifacts</p>")
    parts.append(_html_table(explain_table(results), "this sweep logged no Grad-CAM shares (budget.explain off, or an older sweep)"))
    parts.append("<h2 id='transfer'>Transfer matrix</h2><p class='note'>every training set on every test set: mean over "
                 "trajectories (seeds) [t interval over trajectories, df = n − 1] n, after each cell length and at the point "
                 "each cutoff rule chose; ROC AUC, CIFAR-100 (all real): share predicted REAL; unit: trajectory</p>")
    matrix = analysis_table(results, "transfer_matrix.csv")
    parts.append(_html_table(None if matrix is None else transfer_matrix_wide(matrix), "this analysis has no transfer_matrix.csv",
                             keep=("at", "train_on")))

    parts.append("<h2 id='figures'>Figures</h2>")
    figures = _figures(results)
    for path, data in figures:
        name = path.rsplit("/", 1)[-1]
        if name.endswith(".txt"):
            parts.append(f"<p class='note'>{e(name)}:</p><pre>{e(data.decode(errors='replace'))}</pre>")
        else:
            parts.append(f"<figure><img alt='{e(name)}' src='data:image/png;base64,{base64.b64encode(data).decode()}'>"
                         f"<figcaption>{e(path)}</figcaption></figure>")
    if not figures:
        parts.append(f"<p class='note'>no figures under {e(version.figures)}/</p>")

    corr = analysis_table(results, "correlations.csv")
    parts.append("<h2 id='correlations'>Correlations (all rows)</h2>")
    parts.append("<details><summary>every row of correlations.csv (exploratory rows: Benjamini–Hochberg)</summary>"
                 + _html_table(corr, "this analysis has no correlations.csv") + "</details>")
    parts.append("<h2 id='record'>Run record</h2>")
    parts.append(f"<details><summary>{e(results.analysis_file('run_record.json'))}: code, libraries, hardware, the study "
                 f"and options used</summary><pre>{e(json.dumps(record, indent=1)) if record else 'not logged'}</pre></details>")
    parts.append("</body></html>")
    return "\n".join(parts)
