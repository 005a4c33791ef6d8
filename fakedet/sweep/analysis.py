"""After the trials: how transfer relates to intrinsic performance, and where to stop training.

Pure functions over a long table of evaluation points (one row per trajectory and point, with
columns `trajectory`, `epoch`, `step` and metrics named `<set>/<metric>`), so that the same code serves
a finished sweep, `sweeps/run.py cutoff` on an old one, notebooks and tests.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

CORRELATION_METHODS = {"pearson": stats.pearsonr, "spearman": stats.spearmanr, "kendall": stats.kendalltau}


def correlations(frame: pd.DataFrame, intrinsic: Sequence[str], transfer: Sequence[str]) -> pd.DataFrame:
    """Pearson, Spearman and Kendall between every intrinsic and transfer metric over the rows of `frame`.

    One row per (intrinsic, transfer, method) with the statistic, its two-sided p-value and n (rows
    where both values are finite). Fewer than three points or a constant column give NaN.
    """
    rows = []
    for x_name, y_name in itertools.product(intrinsic, transfer):
        if x_name not in frame or y_name not in frame:
            continue
        pair = frame[[x_name, y_name]].astype(float).replace([np.inf, -np.inf], np.nan).dropna()
        x, y = pair[x_name].to_numpy(), pair[y_name].to_numpy()
        for method, fn in CORRELATION_METHODS.items():
            if len(pair) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
                stat, p = math.nan, math.nan
            else:
                res = fn(x, y)
                stat, p = float(res.statistic), float(res.pvalue)
            rows.append({"intrinsic": x_name, "transfer": y_name, "method": method, "statistic": stat, "p_value": p, "n": len(pair)})
    return pd.DataFrame(rows, columns=["intrinsic", "transfer", "method", "statistic", "p_value", "n"])


def correlation_metrics(table: pd.DataFrame, scope: str) -> dict[str, float]:
    """The correlation table as MLflow metric names: `corr/<scope>/<method>/<intrinsic>_vs_<transfer>` (+ `_p`)."""
    out = {}
    for row in table.itertuples():
        name = f"corr/{scope}/{row.method}/{_slug(row.intrinsic)}_vs_{_slug(row.transfer)}"
        if not math.isnan(row.statistic):
            out[name] = row.statistic
            out[name + "_p"] = row.p_value
    if len(table):
        out[f"corr/{scope}/n"] = float(table["n"].max())
    return out


def _slug(metric: str) -> str:
    return metric.replace("/", "_")


def within_trajectory_correlations(points: pd.DataFrame, intrinsic: Sequence[str], transfer: Sequence[str]) -> pd.DataFrame:
    """`correlations` computed separately over each trajectory's evaluation points."""
    parts = []
    for trajectory, group in points.groupby("trajectory", sort=False):
        table = correlations(group, intrinsic, transfer)
        table.insert(0, "trajectory", trajectory)
        parts.append(table)
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def _pick(values: pd.Series, maximise: bool) -> int:
    """Position of the best finite value; ties go to the earliest point (the cheaper cutoff)."""
    v = values.astype(float).to_numpy()
    if not np.isfinite(v).any():
        return -1
    v = np.where(np.isfinite(v), v, -np.inf if maximise else np.inf)
    return int(np.argmax(v) if maximise else np.argmin(v))


def _maximise(metric: str) -> bool:
    return not metric.endswith("/loss")


def patience_stop(values: Sequence[float], patience: int, maximise: bool = False) -> int:
    """Early stopping on a validation curve: stop after `patience` points without improvement and keep
    the best point seen (restore-best-weights semantics). Returns its position."""
    best, best_at, waited = None, -1, 0
    for i, v in enumerate(values):
        if v is None or not math.isfinite(v):
            waited += 1
        elif best is None or (v > best if maximise else v < best):
            best, best_at, waited = v, i, 0
        else:
            waited += 1
        if waited >= patience and best_at >= 0:
            break
    return best_at


def cutoff_table(
    points: pd.DataFrame,
    *,
    select_on: str = "agiri_val/auc",
    intrinsic_loss: str = "cifake_val/loss",
    intrinsic_acc: str = "cifake_val/acc",
    patience: int = 3,
    fixed_epochs: Sequence[float] = (1, 10, 50, 100),
    report: Sequence[str] = ("agiri_test/auc", "agiri_test/acc", "cifake_test/acc"),
) -> pd.DataFrame:
    """For each trajectory, the evaluation point each rule picks and the reported (test) metrics there.

    Rules: `transfer_val` (best `select_on`: a transfer-validation metric, never a test split),
    `intrinsic_val_loss` and `intrinsic_val_acc` (best CIFAKE-validation loss / accuracy),
    `patience` (early stopping on CIFAKE-validation loss), `fixed_<E>` (epoch E, where evaluated), and
    `oracle_test` (best value of the first reported metric on its own test split: an upper bound for
    reference, not a usable rule).
    """
    for name in (select_on, intrinsic_loss, intrinsic_acc, *report):
        if name not in points:
            raise KeyError(f"cutoff analysis needs the metric {name!r}; the sweep's points have {sorted(c for c in points if '/' in c)}")
    rows = []
    for trajectory, group in points.groupby("trajectory", sort=False):
        group = group.sort_values("step").reset_index(drop=True)
        picks = {
            "transfer_val": _pick(group[select_on], _maximise(select_on)),
            "intrinsic_val_loss": _pick(group[intrinsic_loss], False),
            "intrinsic_val_acc": _pick(group[intrinsic_acc], True),
            f"patience_{patience}": patience_stop(group[intrinsic_loss].astype(float).tolist(), patience, maximise=False),
        }
        for e in fixed_epochs:
            at = np.flatnonzero(np.isclose(group["epoch"].astype(float), float(e)))
            if len(at):
                picks[f"fixed_{e:g}"] = int(at[0])
        picks["oracle_test"] = _pick(group[report[0]], _maximise(report[0]))
        for rule, i in picks.items():
            if i < 0:
                continue
            row = {"trajectory": trajectory, "rule": rule, "epoch": float(group["epoch"].iloc[i]), "step": int(group["step"].iloc[i])}
            row.update({m: float(group[m].iloc[i]) for m in report})
            row["chosen_on"] = {"transfer_val": select_on, "intrinsic_val_loss": intrinsic_loss, "intrinsic_val_acc": intrinsic_acc,
                                f"patience_{patience}": intrinsic_loss, "oracle_test": report[0]}.get(rule, "epoch")
            rows.append(row)
    return pd.DataFrame(rows)


def cutoff_summary(table: pd.DataFrame, report: Sequence[str]) -> pd.DataFrame:
    """Mean and std over trajectories of each rule's chosen epoch and reported metrics."""
    if table.empty:
        return table
    agg = table.groupby("rule", sort=False)[["epoch", *report]].agg(["mean", "std"])
    agg.columns = [f"{m}_{s}" for m, s in agg.columns]
    agg.insert(0, "n", table.groupby("rule", sort=False).size())
    return agg.reset_index()


def cutoff_metrics(summary: pd.DataFrame, report: Sequence[str]) -> dict[str, float]:
    out = {}
    for row in summary.to_dict("records"):
        out[f"cutoff/{row['rule']}/epoch"] = row["epoch_mean"]
        for m in report:
            out[f"cutoff/{row['rule']}/{_slug(m)}"] = row[f"{m}_mean"]
    return {k: float(v) for k, v in out.items() if v is not None and not math.isnan(v)}


def final_cells(points: pd.DataFrame, cell_epochs: Sequence[float]) -> pd.DataFrame:
    """One row per cell: the trajectory's evaluation point at each cell's epoch count."""
    rows = []
    for e in cell_epochs:
        at = points[np.isclose(points["epoch"].astype(float), float(e))].copy()
        at["cell_epochs"] = float(e)
        rows.append(at)
    return pd.concat(rows, ignore_index=True) if rows else points.iloc[0:0]
