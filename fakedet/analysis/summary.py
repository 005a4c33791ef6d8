"""Seeds per condition, multiplicity adjustment, and the headline lines the report prints."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy.stats import false_discovery_control

from fakedet.analysis.resampling import SYMBOLS

CONDITION = ("srm", "cell_epochs", "lr")  # one cell condition; seeds replicate it
# Training-config axes that make conditions where a sweep varies them (the attention module, the augmentation)
AXES = ("attention", "augment", "augment_p")


def condition(cells: pd.DataFrame) -> tuple[str, ...]:
    """The columns of one cell condition in `cells`: `CONDITION`, and each of `AXES` that varies there."""
    return (*CONDITION[:1], *[c for c in AXES if c in cells and cells[c].nunique(dropna=False) > 1], *CONDITION[1:])


def cells_summary(cells: pd.DataFrame, metrics: Sequence[str], by: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per cell condition (`by`, default `condition(cells)`: srm × cell_epochs × lr, and the attention
    module and augmentation where they vary) with `n_seeds` and, for every
    metric, `<metric>_mean` and `<metric>_std` over the seeds (std with ddof 1: NaN when n_seeds == 1).

    Needs the columns `by`, the metrics and (for `n_seeds`) `seed`. Pass the cells to count (e.g.
    FINISHED ones only). A metric missing from the table is left out; NaN values are skipped.
    """
    by = condition(cells) if by is None else by
    missing = [c for c in by if c not in cells]
    if missing:
        raise KeyError(f"cells_summary groups by {list(by)}; the cells lack {missing}")
    metrics = [m for m in metrics if m in cells]
    groups = cells.groupby(list(by), sort=True, dropna=False)
    out = groups.agg(n_seeds=("seed", "nunique") if "seed" in cells else (by[0], "size"))
    for m in metrics:
        values = groups[m].agg(["mean", "std"])
        out[f"{m}_mean"] = values["mean"]
        out[f"{m}_std"] = values["std"]
    return out.reset_index()


def adjust(table: pd.DataFrame) -> pd.DataFrame:
    """Fill `p_adjusted` and `adjustment` of a table with `role` and `p_value` columns: Holm over the
    `primary` rows (family-wise error over the pre-registered answers), Benjamini–Hochberg over the
    `exploratory` rows (false discovery rate over the rest, `scipy.stats.false_discovery_control`).
    Rows without a p-value (descriptive rows, or no test possible) keep NaN."""
    table = table.copy()
    table["p_adjusted"] = math.nan
    table["adjustment"] = ""
    for role, method, name in (("primary", holm, "Holm"), ("exploratory", false_discovery_control, "BH")):
        at = table.index[(table["role"] == role) & np.isfinite(table["p_value"].astype(float))]
        if len(at):
            table.loc[at, "p_adjusted"] = method(table.loc[at, "p_value"].astype(float).to_numpy())
            table.loc[at, "adjustment"] = f"{name} over {len(at)} {role} rows"
    return table


def holm(p: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (Holm 1979): the i-th smallest times (m - i + 1), made monotone
    and capped at 1. Written here because `statsmodels`' `multipletests(method="holm")` runs a full
    `gc.collect()` on every call, 0.2 s in a process holding torch and Ray (the sweep's driver);
    tests/test_statistics.py checks it equals statsmodels' values."""
    p = np.asarray(p, float)
    order = np.argsort(p, kind="stable")
    stepped = np.minimum(1.0, np.maximum.accumulate(p[order] * np.arange(len(p), 0, -1)))
    out = np.empty_like(stepped)
    out[order] = stepped
    return out


def _p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"= {p:.3f}"


QUESTIONS = {
    "along_training": "along training",
    "across_models": "across models at equal length",
    "across_seeds": "across seeds within a condition",
}


def headline(row: pd.Series | dict) -> str:
    """One line for one analysis row (a correlation-table or rule-comparison row): the question, the
    estimand, the estimate with its interval, the test of the same null with its p (and adjusted p),
    n and the unit; or why nothing could be computed."""
    r = dict(row)
    what = r.get("label") or describe(r)
    n = f"n = {int(r['n_trajectories'])} trajectories"
    if not math.isfinite(float(r["statistic"])):
        return f"{what}: not computable ({r['note']}), {n}"
    if not math.isfinite(float(r["ci_low"])):
        return f"{what}: {r['statistic']:+.3f}, {r['note'] or 'no interval'}; {n}"
    ci = f"[{r['confidence']:.0%} CI {r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"
    test = ""
    if math.isfinite(float(r["p_value"])):
        adj = f"; {r['adjustment'].split(' ')[0]}-adjusted {_p(r['p_adjusted'])}" if r.get("adjustment") else ""
        test = f", {r['test']} p {_p(r['p_value'])}{adj}"
    return f"{what}: {r['statistic']:+.3f} {ci}{test}, {n}"


def describe(r: dict) -> str:
    """The estimand of a correlation-table row in words."""
    question = QUESTIONS.get(r["scope"], r["scope"])
    x, y, est = r["intrinsic"], r["transfer"], r["estimand"]
    if est == "transfer_change":
        lo, hi = r["epochs"].split("→")
        return f"{question}: change in {y} from epoch {lo} to {hi} (mean over trajectories)"
    if est == "intrinsic_change":
        lo, hi = r["epochs"].split("→")
        return f"{question}: change in {x} from epoch {lo} to {hi} (mean over trajectories)"
    if est == "peak_lag":
        return f"{question}: log10 epoch of best {y} − of best {x} (mean over trajectories)"
    if est == "within_correlation":
        return f"{question}: {r['method'].capitalize()} {SYMBOLS[r['method']]}({x}, {y}) over each trajectory's points (mean)"
    at = "standing averaged over lengths" if r["epochs"] == "all" else f"cells at {r['epochs']} epochs"
    return f"{question}: {r['method'].capitalize()} {SYMBOLS[r['method']]}({x}, {y}), {at}"
