"""The transfer matrix: every training set against every test set, over seeds.

Every model is scored on every test set at every evaluation point (fakedet.sweep.trainable), so the
table needs no new evaluation: per condition (the training set, and any other setting the sweep
varies), per test set, the trajectories' values at one point (a named length, or the point each cutoff
rule chose in each trajectory), then their mean, SD and a t interval over trajectories (df = n − 1).
The unit is the trajectory: trajectories of one condition differ only in seed, so n is the number of
seeds; the evaluation points of a trajectory are one model read at several lengths and are never
counted as replicates (one value per trajectory enters each row).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from fakedet.analysis.correlations import SETTINGS as CONDITION_SETTINGS
from fakedet.analysis.resampling import t_mean
from fakedet.analysis.roles import DEFAULT_TRAIN_ON

TEST_METRICS = ("cifake_test/auc", "agiri_test/auc", "cifar100_test/real_recall", "cifar100_test_jpeg/real_recall")
"""The matrix's columns: ROC AUC on each labelled test set; CIFAR-100 holds only real images, so there the
share predicted REAL (at threshold 0.5)."""
# what makes a condition (the correlations' settings: placement, module, augmentation, rate, ...), the training
# set first as the matrix's rows; seeds replicate it
SETTINGS = ("train_on", *[c for c in CONDITION_SETTINGS if c != "train_on"])
RULES = ("transfer_val", "intrinsic_val_loss", "intrinsic_val_acc", "patience")


def _conditions(frame: pd.DataFrame) -> list[str]:
    """train_on, and the other settings that vary."""
    return ["train_on", *[c for c in SETTINGS[1:] if c in frame and frame[c].nunique(dropna=True) > 1]]


def _rows(values: pd.DataFrame, at: str, metrics: Sequence[str], by: list[str], confidence: float) -> list[dict]:
    out = []
    for key, group in values.groupby(by, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        for metric in metrics:
            if metric not in group:
                continue
            v = group.drop_duplicates("trajectory")[metric].astype(float).to_numpy()
            mean, lo, hi, _, n, sd = t_mean(v, confidence=confidence)
            out.append({**dict(zip(by, key)), "at": at, "test_set": metric.split("/", 1)[0], "metric": metric.split("/", 1)[1],
                        "mean": float(mean) if n else np.nan, "sd": float(sd), "ci_low": float(lo), "ci_high": float(hi),
                        "n_trajectories": int(n), "confidence": confidence, "unit": "trajectory (seed)",
                        "method": "t interval over trajectories, df = n − 1" if n >= 2 else "one trajectory: no interval"})
    return out


def transfer_matrix(cells: pd.DataFrame, points: pd.DataFrame | None = None, cutoffs: pd.DataFrame | None = None, *,
                    metrics: Sequence[str] = TEST_METRICS, rules: Sequence[str] = RULES,
                    confidence: float = 0.95) -> pd.DataFrame:
    """One row per (condition, point, test set): mean, sd, ci_low, ci_high, n_trajectories, with `at` =
    `epochs=<E>` for every cell length E (from `cells`: trajectory, cell_epochs, train_on, the settings,
    the metrics) and `rule=<rule>` for each cutoff rule's chosen point (from `cutoffs`: trajectory, rule,
    step, as `cutoff_table` gives it, joined to `points` at that trajectory and step). A table without
    `train_on` trained on CIFAKE. Metrics not logged are left out."""
    def frame(table: pd.DataFrame) -> pd.DataFrame:
        table = table.copy()
        table["train_on"] = table["train_on"].fillna(DEFAULT_TRAIN_ON) if "train_on" in table else DEFAULT_TRAIN_ON
        return table

    cells = frame(cells)
    by = _conditions(cells)
    rows: list[dict] = []
    for epochs, group in cells.groupby("cell_epochs", sort=True):
        rows += _rows(group, f"epochs={float(epochs):g}", metrics, by, confidence)
    if points is not None and cutoffs is not None and len(cutoffs) and len(points):
        points = frame(points)
        at = points.drop_duplicates(["trajectory", "step"]).set_index(["trajectory", "step"])
        for rule in rules:
            chosen = cutoffs[cutoffs["rule"] == rule]
            if chosen.empty:
                continue
            keys = list(zip(chosen["trajectory"], chosen["step"].astype(int)))
            keys = [k for k in keys if k in at.index]
            picked = at.loc[keys].reset_index()
            rows += _rows(picked, f"rule={rule}", metrics, by, confidence)
    columns = [*by, "at", "test_set", "metric", "mean", "sd", "ci_low", "ci_high", "n_trajectories", "confidence", "unit", "method"]
    return pd.DataFrame(rows, columns=columns)
