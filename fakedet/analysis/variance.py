"""Which factor matters: each factor's share of a metric's variance across a sweep's cells."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from statsmodels.formula.api import ols
from statsmodels.stats.anova import anova_lm


def variance_decomposition(
    cells: pd.DataFrame, metric: str, factors: Sequence[str] = ("srm", "cell_epochs", "lr", "seed")
) -> pd.DataFrame:
    """Each factor's share of the metric's variance across cells: a main-effects ANOVA with every factor
    categorical (statsmodels OLS + anova_lm, type II sums of squares), reported as eta squared
    (SS_factor / SS_total) and partial eta squared (SS_factor / (SS_factor + SS_residual)).

    One row per factor and one for the residual, with `levels`, `df`, `sum_sq`, `eta_sq`,
    `partial_eta_sq` and a `note`. A factor with a single level is kept as a row with note "one
    level: dropped"; with fewer rows than the model has parameters, every row says why nothing was
    computed. The shares describe this sweep's design; no p-values are given, because the cells of
    a trajectory are nested (not independent), which an F test over cells would ignore.
    """
    columns = ["factor", "levels", "df", "sum_sq", "eta_sq", "partial_eta_sq", "note"]
    missing = [f for f in (metric, *factors) if f not in cells]
    if missing:
        raise KeyError(f"variance_decomposition needs the columns {missing}; the cells have {sorted(cells.columns)}")
    frame = cells[[metric, *factors]].copy()
    frame[metric] = frame[metric].astype(float).replace([np.inf, -np.inf], np.nan)
    frame = frame.dropna()
    levels = {f: int(frame[f].nunique()) for f in factors}
    used = [f for f in factors if levels[f] > 1]
    rows = {f: {"factor": f, "levels": levels[f], "df": math.nan, "sum_sq": math.nan, "eta_sq": math.nan,
                "partial_eta_sq": math.nan, "note": "" if f in used else "one level: dropped"} for f in factors}  # fmt: skip
    residual = {"factor": "Residual", "levels": math.nan, "df": math.nan, "sum_sq": math.nan, "eta_sq": math.nan,
                "partial_eta_sq": math.nan, "note": ""}  # fmt: skip
    n_params = 1 + sum(levels[f] - 1 for f in used)
    why = ""
    if not used:
        why = "no factor with two or more levels"
    elif len(frame) <= n_params:
        why = (f"not computable: {len(frame)} cells with a finite {metric} for {n_params} parameters "
               f"(main effects of {', '.join(used)}); no residual left: add seeds or cells")  # fmt: skip
    if why:
        for r in (*rows.values(), residual):
            r["note"] = r["note"] or why
        return pd.DataFrame([*rows.values(), residual], columns=columns)
    # formula terms need plain names: metric and factor names carry '/' and such
    data = pd.DataFrame({"y": frame[metric].to_numpy()})
    for i, f in enumerate(used):
        data[f"f{i}"] = frame[f].astype(str).to_numpy()
    model = ols("y ~ " + " + ".join(f"C(f{i})" for i in range(len(used))), data=data).fit()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a perfect fit divides 0 by 0 in F; F is not reported
        anova = anova_lm(model, typ=2)
    ss_total = float(((data["y"] - data["y"].mean()) ** 2).sum())
    ss_resid = float(anova.loc["Residual", "sum_sq"])
    for i, f in enumerate(used):
        ss = float(anova.loc[f"C(f{i})", "sum_sq"])
        rows[f].update(df=float(anova.loc[f"C(f{i})", "df"]), sum_sq=ss, eta_sq=ss / ss_total if ss_total else math.nan,
                       partial_eta_sq=ss / (ss + ss_resid) if ss + ss_resid else math.nan)  # fmt: skip
    residual.update(df=float(anova.loc["Residual", "df"]), sum_sq=ss_resid, eta_sq=ss_resid / ss_total if ss_total else math.nan)
    if ss_total == 0:
        residual["note"] = f"{metric} is constant over these cells"
    return pd.DataFrame([*rows.values(), residual], columns=columns)
