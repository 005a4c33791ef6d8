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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure  # a bare Figure renders with Agg and touches no global pyplot state
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, NullFormatter

from fakedet.analysis import roles
from fakedet.config import TrainConfig
from fakedet.metrics import THRESHOLD_CURVES, draw_threshold_curves, threshold_counts
from fakedet.models import PLACEMENTS
from fakedet.results import SweepResults, no_progress_bar
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
    for extra in ("attention", "augment", "augment_p", "train_on", "momentum", "batch_size"):
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
# one look for every figure
# ---------------------------------------------------------------------------------------------------
# Okabe & Ito's colour-blind-safe palette ("Color Universal Design", 2008), handed out in the order of
# the placement registry: a placement has the same colour in every figure of every sweep. The base
# model ("none") gets the dark grey, the study's SRM model ("pool1") the blue.
PALETTE = ("#555555", "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442")
PLACEMENT_COLOURS: dict[str, str] = dict(zip(PLACEMENTS, PALETTE))
UNKNOWN_PLACEMENT_COLOUR = "#000000"  # a placement an older sweep used and the registry no longer has
# A learning rate's line style by its rank among the sweep's rates, smallest first. An HPO sweep samples
# more rates than styles can tell apart: there every line is solid.
LR_DASHES = ("-", "--", ":", "-.")
# A cell's marker in the transfer scatter, by the rank of its epoch count among the sweep's.
EPOCH_MARKERS = ("o", "s", "D", "^", "v", "P", "X", "h")
# Where each cutoff rule (fakedet.analysis.cutoff_table) stopped, on the cutoff curves; the fixed_<E>
# rules are the cells' own lengths and need no marker.
RULE_MARKERS = {"transfer_val": "*", "intrinsic_val_loss": "v", "intrinsic_val_acc": "^", "patience": "s",
                "oracle_test": "X"}
LEGEND_PT = 9  # legends and tick labels at least this size: readable at the 110 dpi the PNGs are saved at
BAND_ALPHA = 0.18
# Round epoch counts for log axes: ticks read "0.1, 1, 10, 50", never "6×10⁻¹"
EPOCH_TICKS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
MAX_EPOCH_TICKS = 7
# The grid factors that make a condition; seeds are its replicates.
CONDITION_COLUMNS = ("srm", "attention", "augment", "augment_p", "lr", "train_on", "momentum", "batch_size")
# What each metric measures, for axis labels (the unit of the y axis)
METRIC_UNITS = {"acc": "accuracy, fraction correct", "auc": "ROC AUC", "ap": "average precision", "f1": "F1 of REAL",
                "f1_macro": "macro F1", "loss": "BCE, nats per image", "real_recall": "fraction predicted REAL"}


def placement_colour(srm: str) -> str:
    """The colour of an SRM placement in every figure (`PLACEMENT_COLOURS`)."""
    return PLACEMENT_COLOURS.get(srm, UNKNOWN_PLACEMENT_COLOUR)


def _placement_order(srm: str) -> tuple[int, str]:
    names = list(PLACEMENTS)
    return (names.index(srm) if srm in names else len(names), srm)


def plural(n: float, unit: str, units: str | None = None) -> str:
    """`1 seed`, `2 seeds`, `0.5 epochs`: a count with its unit, singular only for exactly one."""
    return f"{n:g} {unit}" if n == 1 else f"{n:g} {units or unit + 's'}"


def count_range(counts: Sequence[int], unit: str) -> str:
    """`n = 2 seeds`, or `n = 1–2 seeds` where the counts differ."""
    counts = [int(c) for c in counts]
    if not counts:
        return f"n = 0 {unit}s"
    lo, hi = min(counts), max(counts)
    return f"n = {plural(lo, unit)}" if lo == hi else f"n = {lo}–{hi} {unit}s"


def metric_label(metric: str) -> str:
    """`agiri_test/auc (ROC AUC)`: a metric's name with what its values are."""
    what = metric.split("/", 1)[-1]
    if metric == "train/loss":
        return "train/loss (mean batch BCE since the previous point, nats)"
    for key in (what, what.split("_", 1)[0]):
        if key in METRIC_UNITS:
            return f"{metric} ({METRIC_UNITS[key]})"
    return metric


@dataclass(frozen=True)
class Look:
    """How every figure of one sweep draws a condition: colour by SRM placement (`placement_colour`, the
    same in every sweep), line style by learning rate (its rank among this sweep's rates)."""

    lrs: tuple[float, ...]

    @classmethod
    def of(cls, results: SweepResults) -> "Look":
        values = [float(v) for frame in (results.cells, results.points) if "lr" in frame for v in frame["lr"].dropna()]
        return cls(tuple(sorted(set(values))))

    @property
    def styled_lrs(self) -> bool:
        return 1 < len(self.lrs) <= len(LR_DASHES)

    def dash(self, lr: float) -> str:
        if not self.styled_lrs:
            return "-"
        return LR_DASHES[int(np.argmin(np.abs(np.log10(self.lrs) - math.log10(float(lr)))))]

    def legend_groups(self, placements: Sequence[str], band: str | None = None) -> list[tuple[str, list]]:
        """The figure legend's groups of proxy artists: one entry per placement (colour), per learning rate
        (line style), and what the band is."""
        groups = [("placement", [Line2D([], [], color=placement_colour(s), linewidth=2.5, label=s)
                                 for s in sorted(set(placements), key=_placement_order)])]
        if self.styled_lrs:
            groups.append(("learning rate", [Line2D([], [], color="black", linestyle=self.dash(lr), linewidth=1.5, label=f"{lr:g}")
                                             for lr in self.lrs]))
        elif len(self.lrs) == 1:
            groups.append(("learning rate", [Line2D([], [], color="black", linewidth=1.5, label=f"{self.lrs[0]:g} (every line)")]))
        else:
            groups.append(("learning rate", [Line2D([], [], color="black", linewidth=1.5, label=f"{len(self.lrs)} rates: all solid")]))
        if band:
            groups.append(("band", [Patch(color="grey", alpha=BAND_ALPHA * 2, label=band)]))
        return groups


def _figure_legend(fig: Figure, groups: list[tuple[str, list]]) -> None:
    """One legend for the whole figure, below the panels (never over the data): a column per group,
    its heading in bold on top."""
    rows = 1 + max(len(items) for _, items in groups)
    handles, labels, headings = [], [], []
    for title, items in groups:
        headings.append(len(handles))
        column = [Line2D([], [], linestyle="none")] + list(items)
        column += [Line2D([], [], linestyle="none")] * (rows - len(column))
        handles += column
        labels += [title] + [h.get_label() for h in items] + [""] * (rows - 1 - len(items))
    legend = fig.legend(handles, labels, loc="outside lower center", ncol=len(groups), fontsize=LEGEND_PT, frameon=False,
                        handlelength=2.4, columnspacing=2.0)
    for i in headings:
        legend.get_texts()[i].set_fontweight("bold")


def epoch_axis(ax, epochs: Sequence[float]) -> None:
    """A log epoch axis with round, plainly written ticks (0.1, 1, 10, 50), the longest length always among them."""
    epochs = np.asarray([e for e in epochs if e > 0], float)
    ax.set_xscale("log")
    ax.set_xlabel("epochs trained (log scale)")
    if not len(epochs):
        return
    lo, hi = float(epochs.min()), float(epochs.max())
    # within the axis' margin below: a first point at 0.107 epochs (6 steps of 56) still gets its 0.1
    ticks = [t for t in EPOCH_TICKS if lo / 1.25 <= t <= hi * (1 + 1e-9)]
    if len(ticks) > MAX_EPOCH_TICKS:
        ticks = [t for t in ticks if math.log10(t).is_integer()]
    ticks = sorted(set(ticks) | {hi})
    ax.set_xticks(ticks)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(lo / 1.25, hi * 1.25)


# ---------------------------------------------------------------------------------------------------
# curves over seeds
# ---------------------------------------------------------------------------------------------------
@dataclass
class Curve:
    """One condition's metric along training: the mean over its seeds at each evaluation point, their
    standard deviation (NaN where one seed) and how many seeds were there (a diverged one ends early)."""

    label: str
    srm: str
    lr: float
    epoch: np.ndarray
    mean: np.ndarray
    sd: np.ndarray
    n: np.ndarray
    trajectories: tuple[str, ...]


def _condition_columns(frame: pd.DataFrame) -> tuple[list[str], list[str]]:
    """(the condition columns present, those of them beyond srm and lr that vary and so go into labels)."""
    present = [c for c in CONDITION_COLUMNS if c in frame]
    varying = [c for c in present if c not in ("srm", "lr") and frame[c].nunique(dropna=True) > 1]
    return present, varying


def _condition_label(row: pd.Series, varying: Sequence[str]) -> str:
    short = {"attention": "att", "augment": "aug", "augment_p": "p", "momentum": "m", "batch_size": "bs", "train_on": "train"}
    shown = lambda v: v if isinstance(v, str) else f"{v:g}"  # noqa: E731
    return f"{row['srm']} lr={float(row['lr']):g}" + "".join(f" {short[c]}={shown(row[c])}" for c in varying)


def condition_curves(points: pd.DataFrame, metric: str) -> list[Curve]:
    """`metric` along training per condition (placement, learning rate, and momentum or batch size where
    they vary), aggregated over its seeds, in placement-registry then learning-rate order."""
    if metric not in points or points.empty:
        return []
    present, varying = _condition_columns(points)
    curves = []
    for _, group in points.dropna(subset=[metric]).groupby(present, sort=False, dropna=False):
        first = group.iloc[0]
        # seeds of a condition share their schedule, so their points share steps
        per = group.groupby("step", sort=True).agg(epoch=("epoch", "mean"), mean=(metric, "mean"), sd=(metric, "std"),
                                                   n=(metric, "count"))
        curves.append(Curve(_condition_label(first, varying), str(first["srm"]), float(first["lr"]), per["epoch"].to_numpy(float),
                            per["mean"].to_numpy(float), per["sd"].to_numpy(float), per["n"].to_numpy(int),
                            tuple(dict.fromkeys(group["trajectory"]))))
    return sorted(curves, key=lambda c: (_placement_order(c.srm), c.lr, c.label))


def _draw_curve(ax, curve: Curve, look: Look, marker: str = "o") -> None:
    colour = placement_colour(curve.srm)
    ax.plot(curve.epoch, curve.mean, look.dash(curve.lr), color=colour, label=curve.label, linewidth=1.6,
            marker=marker, markersize=2.5 if marker == "o" else 4)
    spread = curve.n >= 2
    if spread.any():
        ax.fill_between(curve.epoch, curve.mean - curve.sd, curve.mean + curve.sd, where=spread, color=colour,
                        alpha=BAND_ALPHA, linewidth=0)


def _seed_counts(curves: Sequence[Curve]) -> list[int]:
    return [int(n) for c in curves for n in c.n]


def _band_text(curves: Sequence[Curve]) -> str | None:
    return "±1 SD over seeds" if any((c.n >= 2).any() for c in curves) else None


def _replicates_note(curves: Sequence[Curve]) -> str:
    """What a line and its band are, with n: `lines: mean over n = 2 seeds; band: ±1 SD`."""
    n = count_range(_seed_counts(curves), "seed")
    if max(_seed_counts(curves), default=0) < 2:
        return f"lines: one trajectory each ({n} per condition, no band)"
    return f"lines: mean over {n} per condition; band: ±1 SD over seeds (unit: trajectory)"


def _panel_grid(n: int, ncols: int, width: float, height: float, legend_height: float = 1.3, **kw) -> tuple[Figure, np.ndarray]:
    """`n` panels of width × height inches in rows of `ncols`, room for a title above and a legend below."""
    ncols = max(1, min(n, ncols))
    nrows = max(1, math.ceil(n / ncols))
    fig = Figure(figsize=(max(width * ncols, 7.0), height * nrows + 0.7 + legend_height), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw).reshape(-1)
    for ax in axes[n:]:
        ax.set_axis_off()
    return fig, axes


def _style_axes(ax) -> None:
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=LEGEND_PT)
    if ax.get_subplotspec() is not None and not ax.get_subplotspec().is_first_col() and ax.get_shared_y_axes().get_siblings(ax)[1:]:
        ax.set_ylabel("")  # a shared y axis is named once, on the left


# ---------------------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------------------
def figure4(results: SweepResults, metrics: Sequence[str] = FIGURE4_METRICS, max_epoch: float = 1.0) -> Figure:
    """The study's figure 4: learning progress within the first epoch, a line per condition (mean over
    its seeds, ±1 SD band), coloured by placement, styled by learning rate."""
    points = results.points
    early = points[points["epoch"].astype(float) <= max_epoch + 1e-9] if "epoch" in points else points.iloc[0:0]
    metrics = [m for m in metrics if m in points]
    fig, axes = _panel_grid(max(len(metrics), 1), 3, 4.0, 3.3)
    span = "the first epoch" if max_epoch == 1 else f"the first {plural(max_epoch, 'epoch')}"
    if early.empty or not metrics:
        axes[0].text(0.5, 0.5, f"no evaluation points within {span}", ha="center", va="center")
        axes[0].set_axis_off()
        return fig
    look = Look.of(results)
    curves = {m: condition_curves(early, m) for m in metrics}
    for ax, metric in zip(axes, metrics):
        for curve in curves[metric]:
            _draw_curve(ax, curve, look)
        ax.set(xlabel="epochs trained", title=metric, ylabel=metric_label(metric).split(" (", 1)[-1].rstrip(")"),
               xlim=(0, max_epoch * 1.02))
        _style_axes(ax)
    every = [c for cs in curves.values() for c in cs]
    _figure_legend(fig, look.legend_groups([c.srm for c in every], _band_text(every)))
    fig.suptitle(f"{results.name}: learning progress within {span}\n{_replicates_note(every)}", fontsize=11)
    return fig


def figure5_cells(results: SweepResults, max_panels: int = 6) -> pd.DataFrame:
    """The cells figure 5 shows by default, as in the study: per SRM placement the longest-trained cell
    (the study's base and SRM models), and the shortest base cell (its 1-epoch "mini" model), each at the
    learning rate closest to the study's (TrainConfig's default) and the lowest seed."""
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
    fig, axes = _panel_grid(max(len(cells), 1), 3, 4.2, 3.3, legend_height=0.3, sharey=True)
    if len(cells) == 0:
        axes[0].text(0.5, 0.5, "no finished cells", ha="center", va="center")
        axes[0].set_axis_off()
        return fig
    sizes = set()
    for ax, (_, cell) in zip(axes, cells.iterrows()):
        table = results.artifact_table(cell["run_id"], f"{dataset}_thresholds.csv")
        draw_threshold_curves(ax, table)
        n_real, n_fake = threshold_counts(table)
        sizes.add((n_real, n_fake))
        ax.set_title(f"srm={cell['srm']}, {plural(float(cell['cell_epochs']), 'epoch')}, lr={cell['lr']:g}, seed {int(cell['seed'])}",
                     color=placement_colour(cell["srm"]), fontsize=10)
        _style_axes(ax)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=len(THRESHOLD_CURVES), fontsize=LEGEND_PT,
               frameon=False)
    size = "; ".join(f"{r + f} images ({r} REAL, {f} FAKE)" for r, f in sorted(sizes))
    fig.suptitle(f"{results.name}: {dataset} metrics against the decision threshold\n"
                 f"one model per panel, n = {size}; no interval (one model on one test set)", fontsize=11)
    return fig


def transfer_scatter(results: SweepResults, x: str = "cifake_test/acc", y: str = "agiri_test/auc") -> Figure:
    """Transfer (`y`) against intrinsic (`x`) performance, one marker per finished cell (colour: placement,
    shape: epochs); the cells of one trajectory are joined by a faint line (style: learning rate), as they
    are one model read at several lengths, not independent models."""
    cells = results.finished_cells()
    for name in (x, y):
        if name not in cells:
            raise KeyError(f"the sweep's cells have no metric {name!r}")
    look = Look.of(results)
    lengths = sorted(cells["cell_epochs"].astype(float).unique())
    marker = {e: EPOCH_MARKERS[i % len(EPOCH_MARKERS)] for i, e in enumerate(lengths)}
    fig = Figure(figsize=(7.2, 6.4), layout="constrained")
    ax = fig.subplots()
    for trajectory, traj in cells.groupby("trajectory", sort=False):
        traj = traj.sort_values("cell_epochs")
        ax.plot(traj[x], traj[y], look.dash(traj["lr"].iloc[0]), color=placement_colour(traj["srm"].iloc[0]), alpha=0.4,
                linewidth=1, zorder=1)
    for (srm, epochs), group in sorted(cells.groupby(["srm", "cell_epochs"], sort=False), key=lambda kv: (_placement_order(kv[0][0]), kv[0][1])):
        ax.scatter(group[x], group[y], s=42, marker=marker[float(epochs)], color=placement_colour(srm), edgecolor="black",
                   linewidth=0.5, alpha=0.9, zorder=2, label=f"{srm}, {plural(float(epochs), 'epoch')}")
    _style_axes(ax)
    ax.set(xlabel=metric_label(x), ylabel=metric_label(y))
    groups = look.legend_groups(cells["srm"].tolist())
    groups.append(("epochs trained", [Line2D([], [], linestyle="none", marker=marker[e], color="grey", markeredgecolor="black",
                                             label=plural(e, "epoch")) for e in lengths]))
    _figure_legend(fig, groups)
    n_traj = cells["trajectory"].nunique()
    fig.suptitle(f"{results.name}: {y} against {x}\nn = {plural(len(cells), 'model')} (cells) of {plural(n_traj, 'trajectory', 'trajectories')}; "
                 "one point per model, no interval;\nlines join one trajectory's cells (one model read at several lengths, not independent)",
                 fontsize=10)
    return fig


def seed_spread(results: SweepResults, metric: str = "agiri_test/auc") -> Figure:
    """A metric against epochs per cell condition: the mean over seeds with a ±1 SD bar, a panel per
    placement (in its colour), a line per learning rate (its style; n seeds in the legend)."""
    cells = results.finished_cells()
    if metric not in cells:
        raise KeyError(f"the sweep's cells have no metric {metric!r}")
    look = Look.of(results)
    panels = sorted(dict.fromkeys(cells["srm"]), key=_placement_order)
    fig, axes = _panel_grid(max(len(panels), 1), 3, 3.8, 3.3, legend_height=0.9, sharey=True)
    counts, seeds_per_lr = [], {}
    for ax, srm in zip(axes, panels):
        for lr, group in cells[cells["srm"] == srm].groupby("lr"):
            stats_ = group.groupby("cell_epochs")[metric].agg(["mean", "std", "count"]).reset_index()
            counts += stats_["count"].astype(int).tolist()
            seeds_per_lr.setdefault(float(lr), []).extend(stats_["count"].astype(int))
            ax.errorbar(stats_["cell_epochs"], stats_["mean"], yerr=stats_["std"].fillna(0), fmt=look.dash(lr), marker="o",
                        color=placement_colour(srm), capsize=3, label=f"lr={lr:g}")
        epoch_axis(ax, cells["cell_epochs"].astype(float))
        ax.set_title(f"srm={srm}", color=placement_colour(srm))
        ax.set_ylabel(metric_label(metric))
        _style_axes(ax)
    groups = look.legend_groups(panels)
    groups[1] = ("learning rate", [Line2D([], [], color="black", linestyle=look.dash(lr), marker="o", label=f"{lr:g} ({count_range(n, 'seed')})")
                                   for lr, n in sorted(seeds_per_lr.items())])
    _figure_legend(fig, groups)
    n = count_range(counts, "seed")
    bars = "bars: ±1 SD over seeds (unit: model)" if max(counts, default=0) >= 2 else "one seed per condition: no bar"
    fig.suptitle(f"{results.name}: {metric} by training length\nmean over {n} per point; {bars}", fontsize=11)
    return fig


def cutoff_metrics(results: SweepResults) -> list[str]:
    """The metrics the cutoff view plots: the first reported metric and the selection metric the sweep
    recorded (parent-run params `cutoff_report`, `cutoff_select_on`; the transfer rule's `chosen_on` in the
    analysis read, where a re-analysis changed it), then CIFAKE test accuracy and
    validation loss."""
    params = results.parent.data.params
    defaults = Cutoff()
    report = json.loads(params["cutoff_report"]) if "cutoff_report" in params else defaults.report
    select_on = params.get("cutoff_select_on", defaults.select_on)
    # a re-analysis may select on another metric than the sweep recorded: the analysis read says which
    chosen = cutoff_choices(results)
    if "chosen_on" in chosen and (chosen["rule"] == "transfer_val").any():
        select_on = str(chosen.loc[chosen["rule"] == "transfer_val", "chosen_on"].iloc[0])
    loss = params.get("cutoff_intrinsic_loss", defaults.intrinsic_loss)
    train_ons = roles.train_ons_of(results.cells)
    return [roles.concrete(m, train_ons) for m in (report[0], select_on, "intrinsic_test/acc", loss)]


def cutoff_choices(results: SweepResults) -> pd.DataFrame:
    """Each trajectory's point chosen by each cutoff rule, as the sweep's analysis logged it
    (`analysis/cutoffs.csv`); empty where the analysis has not been logged."""
    try:
        return _analysis_artifact(results, "cutoffs.csv")
    except FileNotFoundError:
        return pd.DataFrame(columns=["trajectory", "rule", "epoch", "step", "chosen_on"])


def _rule_size(rule: str) -> float:
    return 11 if rule == "transfer_val" else 7  # the study's question is the transfer rule: its star stands out


def cutoff_curves(results: SweepResults, metrics: Sequence[str] | None = None) -> Figure:
    """Transfer and intrinsic metrics against training length (log scale): a line per condition (mean
    over its seeds, ±1 SD band), and a marker where each cutoff rule stopped each trajectory
    (`cutoff_choices`), at that trajectory's own value."""
    wanted = list(metrics or cutoff_metrics(results))
    points = roles.with_role_columns(results.points, wanted)  # a role (several training sets): each trajectory's own set
    metrics = [m for m in wanted if m in points]
    if not metrics:
        raise KeyError("none of the cutoff metrics were logged at the sweep's evaluation points")
    look = Look.of(results)
    choices = cutoff_choices(results)
    choices = choices[choices["rule"].isin(list(RULE_MARKERS))]
    at = points.set_index(["trajectory", "step"])
    fig, axes = _panel_grid(len(metrics), 2, 4.6, 3.4)
    every = []
    for ax, metric in zip(axes, metrics):
        curves = condition_curves(points, metric)
        every += curves
        for curve in curves:
            _draw_curve(ax, curve, look)
        for row in choices.itertuples():
            key = (row.trajectory, int(row.step))
            if key not in at.index or not np.isfinite(at.at[key, metric]):
                continue
            srm = at.at[key, "srm"]
            ax.plot([row.epoch], [at.at[key, metric]], linestyle="none", marker=RULE_MARKERS[row.rule], markersize=_rule_size(row.rule),
                    color=placement_colour(srm), markeredgecolor="black", markeredgewidth=0.6, zorder=3,
                    gid=f"cutoff/{row.rule}/{row.trajectory}")
        epoch_axis(ax, points["epoch"].astype(float))
        ax.set(title=metric, ylabel=metric_label(metric).split(" (", 1)[-1].rstrip(")"))
        _style_axes(ax)
    groups = look.legend_groups([c.srm for c in every], _band_text(every))
    if len(choices):
        chosen_on = choices.drop_duplicates("rule").set_index("rule")["chosen_on"]
        groups.append(("cutoff rule stopped here", [
            Line2D([], [], linestyle="none", marker=RULE_MARKERS[r], color="white", markeredgecolor="black", markersize=_rule_size(r),
                   label=f"{r}" + (" (reference)" if r == "oracle_test" else "") + f": {chosen_on[r]}")
            for r in RULE_MARKERS if r in chosen_on.index]))
    _figure_legend(fig, groups)
    n_traj = points["trajectory"].nunique()
    markers = (f"markers: the point each rule chose in each trajectory (n = {plural(n_traj, 'trajectory', 'trajectories')}), "
               "at that trajectory's value"
               if len(choices) else "no cutoff analysis logged yet: rules not marked")
    fig.suptitle(f"{results.name}: metrics against training length\n{_replicates_note(every)}\n{markers}", fontsize=10)
    return fig


def transfer_matrix_table(results: SweepResults) -> pd.DataFrame:
    """Every training set against every test set (the parent run's `analysis/transfer_matrix.csv`,
    `fakedet.analysis.transfer_matrix`): per condition and point (`at`: `epochs=<E>`, or `rule=<rule>` for
    the point each cutoff rule chose), the mean over trajectories (seeds) with its t interval and n."""
    return _analysis_artifact(results, "transfer_matrix.csv")


def _matrix_order(at: str) -> tuple:
    kind, _, value = at.partition("=")
    return (0, float(value), "") if kind == "epochs" else (1, 0.0, value)


def _matrix_panel_title(at: str) -> str:
    """A transfer-matrix panel's title from its `at` key: `epochs=10` or `rule=transfer_val`."""
    kind, _, value = at.partition("=")
    if kind == "rule":
        return f"at the point chosen by {value}"
    if kind == "epochs":
        return f"after {value} epoch" + ("" if value == "1" else "s")
    return at.replace("=", " = ")


def transfer_matrix(results: SweepResults, rules: Sequence[str] = ("transfer_val", "intrinsic_val_loss")) -> Figure:
    """The transfer matrix as heatmaps: a panel per cell length and per cutoff rule in `rules` (at the point
    it chose in each trajectory); rows the training sets (and any other setting the sweep varies), columns
    the test sets; each cell the mean over trajectories with its t interval and n. Colour: the value, 0.5
    (chance for an AUC) white."""
    matrix = transfer_matrix_table(results)
    matrix = matrix[matrix["at"].str.startswith("epochs=") | matrix["at"].isin([f"rule={r}" for r in rules])]
    if matrix.empty:
        raise ValueError("the transfer matrix has no rows")
    keys = [c for c in matrix.columns if c not in ("at", "test_set", "metric", "mean", "sd", "ci_low", "ci_high",
                                                     "n_trajectories", "confidence", "unit", "method")]
    matrix = matrix.assign(row=matrix[keys].astype(str).agg(" ".join, axis=1), column=matrix["test_set"] + "\n" + matrix["metric"])
    rows, columns = list(dict.fromkeys(matrix["row"])), list(dict.fromkeys(matrix["column"]))
    panels = sorted(matrix["at"].unique(), key=_matrix_order)
    fig, axes = _panel_grid(len(panels), 2, 1.5 * len(columns) + 1.6, 0.75 * len(rows) + 1.4, legend_height=0.2)
    image = None
    for ax, at in zip(axes, panels):
        part = matrix[matrix["at"] == at].set_index(["row", "column"])
        grid = np.full((len(rows), len(columns)), np.nan)
        for i, r in enumerate(rows):
            for j, c in enumerate(columns):
                if (r, c) in part.index:
                    row = part.loc[(r, c)]
                    grid[i, j] = row["mean"]
                    ci = (f"\n[{row['ci_low']:.2f}, {row['ci_high']:.2f}]" if np.isfinite(row["ci_low"]) else "\nno interval")
                    # RdBu is dark at both ends: light text there, or the figures vanish into the colour
                    ink = "white" if abs(row["mean"] - 0.5) > 0.3 else "black"
                    ax.text(j, i, f"{row['mean']:.2f}{ci}\nn={int(row['n_trajectories'])}", ha="center", va="center", fontsize=8,
                            color=ink)
        for i in np.flatnonzero(np.isnan(grid).all(axis=1)):  # say why a row is empty, not only leave it blank
            why = (f"no {at[5:]} point: this training set has no such set to choose on" if at.startswith("rule=")
                   else "not trained this long")
            ax.text((len(columns) - 1) / 2, i, why, ha="center", va="center", fontsize=8, color="dimgrey")
        image = ax.imshow(grid, cmap="RdBu", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(columns)), columns, fontsize=8)
        ax.set_yticks(range(len(rows)), [f"train {r}" for r in rows], fontsize=LEGEND_PT)
        ax.set_title(_matrix_panel_title(at), fontsize=10)
    if image is not None:
        fig.colorbar(image, ax=list(axes[:len(panels)]), shrink=0.8, label="ROC AUC; CIFAR-100: share predicted REAL")
    level = int(round(100 * float(matrix["confidence"].iloc[0])))
    fig.suptitle(f"{results.name}: transfer matrix, training set × test set\nunit: ROC AUC (CIFAR-100, all real: share predicted "
                 f"REAL at 0.5); mean over trajectories (seeds) [{level}% t interval, df = n − 1], n per cell", fontsize=10)
    return fig


# ---------------------------------------------------------------------------------------------------
# where the detectors look (fakedet.explain's maps and shares)
# ---------------------------------------------------------------------------------------------------
def explain_metric(results: SweepResults, dataset: str = "cifake_test") -> str | None:
    """The share the explain view plots: the Grad-CAM mass off the object on FAKE images where the set has
    object masks (the stand-in), else the mass in the central quarter (real data); None where the sweep
    logged no shares (`budget.explain` off, or a sweep from before them)."""
    for metric in ("cam_bg_share_fake", "cam_centre_share"):
        if f"{dataset}/{metric}" in results.points:
            return f"{dataset}/{metric}"
    return None


def _explain_arrays(results: SweepResults, run_id: str, dataset: str) -> dict[str, np.ndarray] | None:
    with tempfile.TemporaryDirectory(prefix="fakedet-explain-") as d, no_progress_bar():
        try:
            path = results.client.download_artifacts(run_id, f"explain/{dataset}.npz", d)
        except Exception:  # noqa: BLE001 - a cell without maps (explain off, diverged) is drawn empty
            return None
        with np.load(path) as z:
            return {k: z[k] for k in z.files}


def explain_view(results: SweepResults, dataset: str = "cifake_test", image: int | None = None) -> Figure:
    """Where the detectors look: one probe image's last-convolution Grad-CAM in a cell per placement (rows)
    and training length (columns), for the sweep's first learning rate and seed; and the share of the maps'
    mass (`explain_metric`) against epochs, a line per condition (mean over its seeds, ±1 SD band), with
    the share a map spread evenly would give (dotted). `image`: the row in the probe set (default: its
    first FAKE image whose map has mass in the first cell drawn)."""
    metric = explain_metric(results, dataset)
    cells = results.finished_cells()
    look = Look.of(results)
    # a row per condition but learning rate: placement, and the module, augmentation or training set where
    # the sweep varies them (else two modules at one placement would share a row and show one of them)
    _, varying = _condition_columns(cells)
    rows_by = ["srm"] + [c for c in varying if c != "lr"]
    conditions = sorted({tuple(r) for r in cells[rows_by].itertuples(index=False)}, key=lambda t: (_placement_order(t[0]), t[1:]))
    placements = [c[0] for c in conditions]
    lengths = sorted(cells["cell_epochs"].astype(float).unique())
    lr, seed = (sorted(cells["lr"].unique())[0], sorted(cells["seed"].unique())[0]) if len(cells) else (None, None)
    fig = Figure(figsize=(max(7.5, 1.5 * (len(lengths) + 1) + 4.5), max(4.2, 1.5 * len(placements) + 1.8)), layout="constrained")
    left, right = fig.subfigures(1, 2, width_ratios=[len(lengths) + 1, 4])
    grid = left.subplots(max(len(placements), 1), len(lengths) + 1, squeeze=False)
    shown = None
    for r, condition in enumerate(conditions):
        srm = condition[0]
        same = np.logical_and.reduce([cells[col] == value for col, value in zip(rows_by, condition)])
        for c, epochs in enumerate(lengths):
            ax = grid[r, c + 1]
            ax.set_xticks([]), ax.set_yticks([])
            row = cells[same & (cells["lr"] == lr) & (cells["seed"] == seed) & (cells["cell_epochs"] == epochs)]
            arrays = _explain_arrays(results, row["run_id"].iloc[0], dataset) if len(row) else None
            if r == 0:
                ax.set_title(plural(epochs, "epoch"), fontsize=LEGEND_PT)
            if arrays is None:
                ax.text(0.5, 0.5, "no map", ha="center", va="center", fontsize=7, transform=ax.transAxes)
                continue
            if image is None:  # the first FAKE image whose map has mass in the first cell drawn (else the first image)
                live = np.flatnonzero((arrays["labels"] == 0) & (arrays["cam/last_conv"].reshape(len(arrays["labels"]), -1).max(1) > 0))
                image = int(live[0]) if len(live) else 0
            k = image
            img, cam = arrays["images"][k], arrays["cam/last_conv"][k]
            ax.imshow(img)
            ax.imshow(cam / cam.max() if cam.max() > 0 else cam, cmap="jet", alpha=0.5, vmin=0, vmax=1)
            if "masks" in arrays:
                ax.contour(arrays["masks"][k].astype(float), levels=[127.5], colors="white", linewidths=0.8)
            shown = (k, img, int(arrays["labels"][k]), int(arrays["rows"][k]))
        # the module means nothing without a placement: the base model's row names none
        shown_by = [c for c in rows_by[1:] if not (srm == "none" and c == "attention")]
        grid[r, 0].set_ylabel("srm=" + _condition_label(pd.Series(dict(zip(rows_by, condition), lr=lr)), shown_by).replace(f" lr={lr:g}", ""), color=placement_colour(srm), fontsize=LEGEND_PT)
        grid[r, 0].set_xticks([]), grid[r, 0].set_yticks([])
    for r in range(len(placements)):
        if shown is not None:
            grid[r, 0].imshow(shown[1])
    if shown is not None:
        grid[0, 0].set_title("image", fontsize=LEGEND_PT)
    which = (f"probe image {shown[0]} ({'REAL' if shown[2] == 1 else 'FAKE'}),\nrow {shown[3]} of {dataset}" if shown is not None
             else "no maps logged")
    left.suptitle(f"last-conv Grad-CAM, lr={lr:g}, seed {seed};\n{which}; white: the object" if lr is not None else which, fontsize=8)
    ax = right.subplots()
    if metric is None:
        ax.text(0.5, 0.5, "no Grad-CAM shares logged\n(budget.explain off, or an older sweep)", ha="center", va="center",
                transform=ax.transAxes)
    curves = condition_curves(results.points, metric) if metric else []
    markers = "os^Dvx*"  # colour is the placement: where other settings vary, a marker tells their lines apart
    for i, curve in enumerate(curves):
        _draw_curve(ax, curve, look, markers[i % len(markers)] if len(rows_by) > 1 else "o")
    if len(rows_by) > 1 and curves:  # colour says placement only: name each line's module, augmentation, set
        ax.legend(fontsize=6, frameon=False, loc="best")
    even = f"{dataset}/cam_bg_area" if metric and "bg_share" in metric else None
    if even and even in results.points:
        ax.axhline(float(results.points[even].mean()), color="black", linestyle=":", linewidth=1)
    elif metric:
        ax.axhline(0.25, color="black", linestyle=":", linewidth=1)
    epoch_axis(ax, results.points["epoch"].astype(float))
    ax.set(title=metric or dataset, ylabel="share of the map's mass")
    _style_axes(ax)
    groups = look.legend_groups([c.srm for c in curves] or placements, _band_text(curves))
    groups.append(("dotted", [Line2D([], [], color="black", linestyle=":", label="a map spread evenly")]))
    _figure_legend(fig, groups)
    n_probe = "16 REAL + 16 FAKE probe images" if "cifar100" not in dataset else "32 probe images"
    replicates = _replicates_note(curves) if curves else "n = 0 trajectories with shares"
    fig.suptitle(f"{results.name}: where the detectors look on {dataset}\n{replicates};\neach point a mean over "
                 f"{n_probe} (the same in every cell); a Grad-CAM shows which activations\nthe logit's gradient weighs, not a cause",
                 fontsize=10)
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
    "explain_cifake_test.png": explain_view,
    "transfer_matrix.png": transfer_matrix,
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
                    # constrained layout already fits titles and the legends beside the panels:
                    # no second, "tight" draw (it doubles the cost of a sweep's end)
                    out.savefig(d / name, dpi=110)
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
    "cutoff_summary", "cutoff_comparison", "seed_spread", "explain_view", "explain_metric",
    "cutoff_summary", "cutoff_comparison", "seed_spread", "transfer_matrix", "transfer_matrix_table",
    "figure4", "figure5", "figure5_cells", "transfer_scatter", "cutoff_curves", "cutoff_metrics", "log_figures", "VIEWS",
]
