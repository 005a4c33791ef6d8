"""The study's results views, as functions of a sweep read back from MLflow (`fakedet.results.load_sweep`).

Tables 2-4 and figures 4-5 of the reference study (Suchardt, "Real or really fake?"), plus the
sweep's own views: transfer against intrinsic performance, and metrics against training length.
Every function is pure: it returns a DataFrame or a matplotlib Figure (Agg, never shown), so the
notebooks in `notebooks/`, the MLflow UI (through `log_figures`) and the tests all see the same views.
Nothing here trains or re-scores a model: every number is a logged metric or a logged artifact.
"""

from __future__ import annotations

import json
import math
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure  # a bare Figure renders with Agg and touches no global pyplot state

from fakedet.metrics import THRESHOLD_CURVES
from fakedet.results import SweepResults
from fakedet.sweep.study import Cutoff

CELL_COLUMNS = ("srm", "epochs", "lr", "seed")
# Table 2's and 4's columns: the study's Acc., F1, per-class precision/recall and their mean (its "ø"
# rows), plus AUC and the test-set BCE, which the study does not print.
LABELLED_COLUMNS = ("acc", "f1", "precision_real", "recall_real", "precision_fake", "recall_fake",
                    "precision_macro", "recall_macro", "f1_macro", "auc", "loss")
FIGURE4_METRICS = ("cifake_val/acc", "cifake_val/loss", "train/loss")


# ---------------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------------
def _cell_frame(results: SweepResults) -> pd.DataFrame:
    """Finished cells with the study's identifying columns first (an HPO sweep adds what it varied)."""
    cells = results.finished_cells()
    keys = pd.DataFrame({"srm": cells.get("srm"), "epochs": cells.get("cell_epochs"), "lr": cells.get("lr"),
                         "seed": cells.get("seed")}, index=cells.index)
    for extra in ("momentum", "batch_size"):
        if extra in cells and cells[extra].nunique(dropna=True) > 1:
            keys[extra] = cells[extra]
    return keys


def labelled_table(results: SweepResults, dataset: str) -> pd.DataFrame:
    """One row per finished cell: its final metrics on a labelled set (`<dataset>/<metric>`).

    `precision_macro` / `recall_macro` are the means of the two classes' values (the study's "ø" rows;
    not logged as metrics). A metric the sweep did not log is NaN."""
    cells = results.finished_cells()
    table = _cell_frame(results)
    for metric in LABELLED_COLUMNS:
        table[metric] = cells.get(f"{dataset}/{metric}", pd.Series(math.nan, index=cells.index)).astype(float)
    table["precision_macro"] = (table["precision_real"] + table["precision_fake"]) / 2
    table["recall_macro"] = (table["recall_real"] + table["recall_fake"]) / 2
    table["run_id"] = cells.get("run_id")
    return table.reset_index(drop=True)


def table2(results: SweepResults) -> pd.DataFrame:
    """The study's table 2: CIFAKE test metrics per cell, with the mean batch training loss at the
    trajectory's first evaluation point and at the cell's epoch count (the study's "Loss first/last";
    it printed epoch totals)."""
    table = labelled_table(results, "cifake_test")
    cells = results.finished_cells()
    first = {}
    if "train/loss" in results.points:
        for trajectory, group in results.points.groupby("trajectory", sort=False):
            first[trajectory] = float(group.sort_values("step")["train/loss"].iloc[0])
    at = table.columns.get_loc("run_id")
    table.insert(at, "train_loss_first", cells["trajectory"].map(first).astype(float).to_numpy())
    table.insert(at + 1, "train_loss_last", cells.get("train/loss", pd.Series(math.nan, index=cells.index)).astype(float).to_numpy())
    return table


def table4(results: SweepResults) -> pd.DataFrame:
    """The study's table 4: AGIRI test metrics per cell."""
    return labelled_table(results, "agiri_test")


def best_worst(results: SweepResults, run_id: str, dataset: str = "cifar100_test") -> pd.DataFrame:
    """A cell's `<dataset>_best_worst.csv` artifact with a `rank` column (max, min) and flat column
    names (`coarse_recall`, `coarse_class`, `fine_recall`, `fine_class`)."""
    raw = results.artifact_table(run_id, f"{dataset}_best_worst.csv", header=[0, 1])
    if "Unnamed" in str(raw.columns[0][0]):  # written with its max/min index
        raw = raw.set_index(raw.columns[0])
    raw.columns = [f"{level}_{what}" for level, what in raw.columns]
    # fakedet.metrics.best_worst_classes orders the rows max, min; the sweep writes them without the index
    raw.insert(0, "rank", ["max", "min"][: len(raw)])
    return raw.reset_index(drop=True)


def table3(results: SweepResults, dataset: str = "cifar100_test") -> pd.DataFrame:
    """The study's table 3: per finished cell, the share of CIFAR-100 test images predicted REAL (its
    "Acc.") and the best (max) and worst (min) coarse and fine content classes by real recall."""
    cells = results.finished_cells()
    keys = _cell_frame(results)
    parts = []
    for i, cell in cells.iterrows():
        part = best_worst(results, cell["run_id"], dataset)
        for j, column in enumerate(keys.columns):
            part.insert(j, column, keys.at[i, column])
        part.insert(len(keys.columns), "real_recall", float(cell.get(f"{dataset}/real_recall", math.nan)))
        part["run_id"] = cell["run_id"]
        parts.append(part)
    if not parts:
        return pd.DataFrame(columns=[*keys.columns, "real_recall", "rank", "coarse_recall", "coarse_class",
                                     "fine_recall", "fine_class", "run_id"])
    return pd.concat(parts, ignore_index=True)


def correlation_table(results: SweepResults, method: str | None = None, scope: str | None = None) -> pd.DataFrame:
    """Transfer against intrinsic correlations as the sweep's analysis logged them (the parent run's
    `analysis/correlations.csv`, `fakedet.analysis.correlation_table`): per question (`scope`:
    along_training, across_models, across_seeds, pooled), the estimate with its interval, the test of
    the same null with its p and adjusted p, n, unit and role. `method`: pearson, spearman or kendall."""
    table = _analysis_artifact(results, "correlations.csv")
    if method is not None:
        table = table[table["method"] == method]
    if scope is not None:
        table = table[table["scope"] == scope]
    return table.reset_index(drop=True)


def cells_summary(results: SweepResults) -> pd.DataFrame:
    """Each cell condition (srm, epochs, lr): `n_seeds` and every metric's mean and std over the seeds
    (the parent run's `analysis/cells_summary.csv`)."""
    return _analysis_artifact(results, "cells_summary.csv")


def variance_table(results: SweepResults) -> pd.DataFrame:
    """Each transfer metric's variance across cells split over the grid's factors (eta squared of a
    main-effects ANOVA; the parent run's `analysis/variance.csv`)."""
    return _analysis_artifact(results, "variance.csv")


def cutoff_summary(results: SweepResults) -> pd.DataFrame:
    """Each cutoff rule's chosen epoch and test metrics, mean and std over the same trajectories (the
    parent run's `analysis/cutoff_summary.csv`)."""
    return _analysis_artifact(results, "cutoff_summary.csv")


def cutoff_comparison(results: SweepResults) -> pd.DataFrame:
    """Each rule against early stopping on the intrinsic validation loss, paired by trajectory: the mean
    difference with its t interval and t test (the parent run's `analysis/cutoff_comparison.csv`)."""
    return _analysis_artifact(results, "cutoff_comparison.csv")


def _analysis_artifact(results: SweepResults, name: str) -> pd.DataFrame:
    try:
        return results.artifact_table(results.parent_run_id, results.analysis_file(name))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}. The sweep's analysis has not been logged; run "
                                f"`python sweeps/run.py cutoff --sweep {results.name}` to create it") from None


# ---------------------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------------------
def _trajectory_labels(points: pd.DataFrame) -> dict[str, str]:
    """Each trajectory's name in legends: `pool1 lr=0.001 seed=11`, plus momentum and batch size where they vary."""
    extra = [(c, short) for c, short in (("momentum", "m"), ("batch_size", "bs")) if c in points and points[c].nunique(dropna=True) > 1]
    labels = {}
    for trajectory, group in points.groupby("trajectory", sort=False):
        row = group.iloc[0]
        label = f"{row['srm']} lr={float(row['lr']):g} seed={int(row['seed'])}"
        labels[trajectory] = label + "".join(f" {short}={row[c]:g}" for c, short in extra)
    return labels


def figure4(results: SweepResults, metrics: Sequence[str] = FIGURE4_METRICS, max_epoch: float = 1.0) -> Figure:
    """The study's figure 4: learning progress within the first epoch, one line per trajectory."""
    points = results.points
    early = points[points["epoch"].astype(float) <= max_epoch + 1e-9] if "epoch" in points else points.iloc[0:0]
    metrics = [m for m in metrics if m in points]
    fig = Figure(figsize=(4.2 * max(len(metrics), 1), 3.6), layout="constrained")
    axes = fig.subplots(1, max(len(metrics), 1), squeeze=False)[0]
    if early.empty or not metrics:
        axes[0].text(0.5, 0.5, f"no evaluation points within epoch {max_epoch:g}", ha="center", va="center")
        axes[0].set_axis_off()
        return fig
    labels = _trajectory_labels(points)
    for ax, metric in zip(axes, metrics):
        for trajectory, group in early.groupby("trajectory", sort=False):
            group = group.sort_values("step")
            ax.plot(group["epoch"], group[metric], marker=".", label=labels[trajectory], alpha=0.85)
        ax.set(xlabel="epoch", title=metric, xlim=(0, max_epoch * 1.02))
        ax.grid(alpha=0.3)
    if len(labels) <= 12:
        axes[-1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{results.name}: learning progress within the first " + ("epoch" if max_epoch == 1 else f"{max_epoch:g} epochs"))
    return fig


def figure5_cells(results: SweepResults, max_panels: int = 6) -> pd.DataFrame:
    """The cells figure 5 shows by default, as in the study: per SRM placement the longest-trained cell
    (the study's base and SRM models), and the shortest base cell (its 1-epoch "mini" model), each at the
    learning rate closest to the study's (TrainConfig's default) and the lowest seed."""
    from fakedet.config import TrainConfig

    cells = results.finished_cells()
    if cells.empty:
        return cells
    log_lr_off = (np.log10(cells["lr"].astype(float)) - math.log10(TrainConfig().lr)).abs()

    def pick(group: pd.DataFrame, longest: bool):
        at = group["cell_epochs"].max() if longest else group["cell_epochs"].min()
        group = group[group["cell_epochs"] == at]
        off = log_lr_off[group.index]
        group = group[np.isclose(off, off.min())]
        return group.sort_values("seed").index[0]

    picks = [pick(group, longest=True) for _, group in cells.groupby("srm", sort=False)]
    base = cells[cells["srm"] == "none"] if (cells["srm"] == "none").any() else cells
    mini = pick(base, longest=False)
    if mini not in picks:
        picks.append(mini)
    return cells.loc[picks[:max_panels]].reset_index(drop=True)


def figure5(results: SweepResults, dataset: str = "cifake_test", cells: pd.DataFrame | Sequence[str] | None = None,
            max_panels: int = 6) -> Figure:
    """The study's figure 5: metrics against the decision threshold, a panel per cell, from the cells'
    `<dataset>_thresholds.csv` artifacts. `cells`: rows of `results.cells` or run ids; default
    `figure5_cells`."""
    if cells is None:
        cells = figure5_cells(results, max_panels)
    elif not isinstance(cells, pd.DataFrame):
        ids = list(cells)
        cells = results.cells.set_index("run_id").loc[ids].reset_index()
    n = max(len(cells), 1)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(4.4 * ncols, 3.4 * nrows + 0.5), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True).reshape(-1)
    for ax in axes[len(cells):]:
        ax.set_axis_off()
    if len(cells) == 0:
        axes[0].text(0.5, 0.5, "no finished cells", ha="center", va="center")
        return fig
    for ax, (_, cell) in zip(axes, cells.iterrows()):
        table = results.artifact_table(cell["run_id"], f"{dataset}_thresholds.csv")
        for column, (label, line, colour) in THRESHOLD_CURVES.items():
            ax.plot(table["threshold"], table[column], line, color=colour, label=label, linewidth=1.3)
        ax.axvline(0.5, color="grey", linewidth=0.8, linestyle=":")
        ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="threshold (REAL iff p ≥ t)",
               title=f"srm={cell['srm']}, {cell['cell_epochs']:g} epochs, lr={cell['lr']:g}")
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=len(THRESHOLD_CURVES), fontsize="small")
    fig.suptitle(f"{results.name}: {dataset} metrics against the decision threshold")
    return fig


def transfer_scatter(results: SweepResults, x: str = "cifake_test/acc", y: str = "agiri_test/auc") -> Figure:
    """Transfer (`y`) against intrinsic (`x`) performance, one marker per finished cell (colour: placement,
    size: epochs); the cells of one trajectory are joined by a faint line, as they are one model read
    at several lengths, not independent models."""
    cells = results.finished_cells()
    for name in (x, y):
        if name not in cells:
            raise KeyError(f"the sweep's cells have no metric {name!r}")
    fig = Figure(figsize=(6.4, 4.8), layout="constrained")
    ax = fig.subplots()
    for srm, group in cells.groupby("srm", sort=False):
        sizes = 20 + 12 * np.log10(group["cell_epochs"].astype(float).clip(lower=0.01) * 10)
        dots = ax.scatter(group[x], group[y], s=sizes, label=f"srm={srm}", alpha=0.8)
        for _, traj in group.groupby("trajectory", sort=False):
            traj = traj.sort_values("cell_epochs")
            ax.plot(traj[x], traj[y], color=dots.get_facecolor()[0], alpha=0.25, linewidth=0.8)
    n_traj = cells["trajectory"].nunique()
    ax.set(xlabel=x, ylabel=y, title=f"{y} vs {x}: {len(cells)} cells of {n_traj} trajectories")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def seed_spread(results: SweepResults, metric: str = "agiri_test/auc") -> Figure:
    """A metric against epochs per cell condition: the mean over seeds with a ±1 std bar (n seeds in the
    legend), a panel per placement, a line per learning rate."""
    cells = results.finished_cells()
    if metric not in cells:
        raise KeyError(f"the sweep's cells have no metric {metric!r}")
    panels = list(dict.fromkeys(cells["srm"]))
    fig = Figure(figsize=(4.2 * max(len(panels), 1), 3.6), layout="constrained")
    axes = fig.subplots(1, max(len(panels), 1), squeeze=False, sharey=True)[0]
    for ax, srm in zip(axes, panels):
        for lr, group in cells[cells["srm"] == srm].groupby("lr"):
            stats_ = group.groupby("cell_epochs")[metric].agg(["mean", "std", "count"]).reset_index()
            ax.errorbar(stats_["cell_epochs"], stats_["mean"], yerr=stats_["std"].fillna(0), marker="o", capsize=3,
                        label=f"lr={lr:g} (n={int(stats_['count'].min())}–{int(stats_['count'].max())} seeds)")
        ax.set_xscale("log")
        ax.set(xlabel="epochs", title=f"srm={srm}", ylabel=metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{results.name}: {metric}, mean ± std over seeds")
    return fig


def cutoff_metrics(results: SweepResults) -> list[str]:
    """The metrics the cutoff view plots: the first reported metric and the selection metric the sweep
    recorded (parent-run params `cutoff_report`, `cutoff_select_on`), then CIFAKE test accuracy and
    validation loss."""
    params = results.parent.data.params
    defaults = Cutoff()
    report = json.loads(params["cutoff_report"]) if "cutoff_report" in params else defaults.report
    return [report[0], params.get("cutoff_select_on", defaults.select_on), "cifake_test/acc", defaults.intrinsic_loss]


def cutoff_curves(results: SweepResults, metrics: Sequence[str] | None = None) -> Figure:
    """Transfer and intrinsic metrics against training length (log scale), one line per trajectory,
    named `srm lr seed`."""
    points = results.points
    metrics = [m for m in (metrics or cutoff_metrics(results)) if m in points]
    if not metrics:
        raise KeyError("none of the cutoff metrics were logged at the sweep's evaluation points")
    labels = _trajectory_labels(points)
    fig = Figure(figsize=(4.2 * len(metrics), 3.8), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        for trajectory, group in points.groupby("trajectory", sort=False):
            group = group.sort_values("step")
            ax.plot(group["epoch"], group[metric], marker=".", label=labels[trajectory], alpha=0.8)
        ax.set_xscale("log")
        ax.set(xlabel="epoch", title=metric)
        ax.grid(alpha=0.3)
    if len(labels) <= 16:
        axes[-1].legend(fontsize=6, loc="best")
    fig.suptitle(f"{results.name}: metrics against training length")
    return fig


# ---------------------------------------------------------------------------------------------------
# all views, logged to the parent run
# ---------------------------------------------------------------------------------------------------
# file name under figures/ -> view; a new view is one line here
VIEWS: dict[str, Callable[[SweepResults], pd.DataFrame | Figure]] = {
    "table2_cifake_test.csv": table2,
    "table3_cifar100_best_worst.csv": table3,
    "table4_agiri_test.csv": table4,
    "figure4_first_epoch.png": figure4,
    "figure5_thresholds_cifake_test.png": lambda r: figure5(r, "cifake_test"),
    "figure5_thresholds_agiri_test.png": lambda r: figure5(r, "agiri_test"),
    "transfer_scatter_cifake_test_acc_vs_agiri_test_auc.png": transfer_scatter,
    "cutoff_curves.png": cutoff_curves,
    "seed_spread_agiri_test_auc.png": seed_spread,
}


def log_figures(results: SweepResults, client, parent_run_id: str, artifact_path: str = "figures") -> list[str]:
    """Log every view in VIEWS (tables as CSV, figures as PNG) to the run under `artifact_path`, so the
    MLflow UI shows them without a notebook. A view that fails is skipped with a warning and named in
    `<artifact_path>/errors.txt` (the sweep's end must not fail on a plot). Returns the paths logged."""
    logged, errors = [], []
    with tempfile.TemporaryDirectory(prefix="fakedet-figures-") as d:
        d = Path(d)
        for name, view in VIEWS.items():
            try:
                out = view(results)
                if isinstance(out, pd.DataFrame):
                    out.to_csv(d / name, index=False)
                else:
                    out.savefig(d / name, dpi=110, bbox_inches="tight")
            except Exception as e:  # noqa: BLE001 - reported, not hidden
                errors.append(f"{name}: {type(e).__name__}: {e}")
                warnings.warn(f"view {name} not logged: {type(e).__name__}: {e}", stacklevel=2)
                continue
            logged.append(f"{artifact_path}/{name}")
        if errors:
            (d / "errors.txt").write_text("\n".join(errors) + "\n")
            logged.append(f"{artifact_path}/errors.txt")
        client.log_artifacts(parent_run_id, str(d), artifact_path=artifact_path)
    return logged


__all__ = [
    "table2", "table3", "table4", "labelled_table", "best_worst", "correlation_table", "cells_summary", "variance_table",
    "cutoff_summary", "cutoff_comparison", "seed_spread",
    "figure4", "figure5", "figure5_cells", "transfer_scatter", "cutoff_curves", "cutoff_metrics", "log_figures", "VIEWS",
]
