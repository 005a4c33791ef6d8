"""Where to stop training for transfer: the point each rule picks per trajectory, and each rule against
a baseline rule, paired by trajectory.

Pure functions over a `points` table (one row per (trajectory, evaluation point): `trajectory`, `epoch`,
`step`, the settings `srm`, `lr`, `seed`, ... and metrics named `<set>/<metric>`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from fakedet.analysis.summary import adjust, headline


def _maximise(metric: str) -> bool:
    return not metric.endswith("/loss")


def _best(values: np.ndarray, maximise: bool) -> int:
    """Position of the best finite value; ties go to the earliest point (the cheaper cutoff). -1 if none."""
    if not np.isfinite(values).any():
        return -1
    v = np.where(np.isfinite(values), values, -np.inf if maximise else np.inf)
    return int(np.argmax(v) if maximise else np.argmin(v))


def patience_stop(epochs: Sequence[float], values: Sequence[float], patience_epochs: float,
                  maximise: bool = False) -> tuple[int, int]:  # fmt: skip
    """Early stopping with patience counted in epochs (evaluation points are uneven: 20 in the first
    epoch, a few per decade after): stop at the first point where `epoch - best_epoch >= patience_epochs`
    without an improvement, and keep the best point (restore-best-weights). A NaN is no improvement.
    Returns (position kept, position stopped at); the last point if never stopped; (-1, -1) if no value."""
    best, best_at = None, -1
    for i, (e, v) in enumerate(zip(epochs, values)):
        if v is not None and math.isfinite(v) and (best is None or (v > best if maximise else v < best)):
            best, best_at = v, i
        elif best_at >= 0 and e - epochs[best_at] >= patience_epochs:
            return best_at, i
    return best_at, (len(values) - 1 if best_at >= 0 else -1)


def _split(metric: str) -> str:
    return metric.split("/", 1)[0]


GROUP_COLUMNS = ("srm", "attention", "augment", "augment_p", "lr", "seed", "train_on", "momentum", "batch_size")


def cutoff_table(
    points: pd.DataFrame,
    *,
    select_on: str = "agiri_val/auc",
    intrinsic_loss: str = "cifake_val/loss",
    intrinsic_acc: str = "cifake_val/acc",
    patience_epochs: float = 3.0,
    fixed_epochs: Sequence[float] = (1, 10, 50, 100),
    report: Sequence[str] = ("agiri_test/auc", "agiri_test/acc", "cifake_test/acc"),
) -> pd.DataFrame:
    """Per trajectory, the evaluation point each rule picks, and the `report` metrics at exactly that point.

    Rules: `transfer_val` (best `select_on`, a transfer-validation metric), `intrinsic_val_loss` and
    `intrinsic_val_acc` (best CIFAKE-validation loss / accuracy), `patience` (early stopping on
    `intrinsic_loss`, patience in epochs: `patience_stop`), `fixed_<E>` (epoch E, where evaluated) and
    `oracle_test` (best first `report` metric on its own test split: a reference, `usable` False).
    Ties go to the earliest point. A rule that finds no finite value in a trajectory picks nothing there.

    One row per (trajectory, rule): `epoch` and `step` picked, `stop_epoch` (how far the trajectory
    must be trained to apply the rule), `chosen_on`, `usable`, the trajectory's settings (srm, lr, seed,
    ... where present) and the report metrics.
    """
    for name in (select_on, intrinsic_loss, intrinsic_acc):
        if "test" in _split(name):
            raise ValueError(f"a cutoff is chosen on a validation split, never on a test split: {name!r} names one")
    needed = (select_on, intrinsic_loss, intrinsic_acc, *report)
    absent = [n for n in needed if n not in points]
    if absent:
        raise KeyError(f"cutoff analysis needs the metrics {absent}; the points have {sorted(c for c in points if '/' in c)}")
    settings = [c for c in GROUP_COLUMNS if c in points]
    rows = []
    for trajectory, group in points.groupby("trajectory", sort=False):
        group = group.sort_values("step").reset_index(drop=True)
        epochs = group["epoch"].astype(float).to_numpy()
        last = len(group) - 1
        col = lambda m: group[m].astype(float).to_numpy()  # noqa: E731
        kept, stopped = patience_stop(epochs.tolist(), col(intrinsic_loss).tolist(), patience_epochs)
        picks = {  # rule: (position picked, position the rule needs trained to, metric chosen on)
            "transfer_val": (_best(col(select_on), _maximise(select_on)), last, select_on),
            "intrinsic_val_loss": (_best(col(intrinsic_loss), False), last, intrinsic_loss),
            "intrinsic_val_acc": (_best(col(intrinsic_acc), True), last, intrinsic_acc),
            "patience": (kept, stopped, f"{intrinsic_loss}, patience {patience_epochs:g} epochs"),
        }
        for e in fixed_epochs:
            at = np.flatnonzero(np.isclose(epochs, float(e)))
            if len(at):
                picks[f"fixed_{e:g}"] = (int(at[0]), int(at[0]), "epoch")
        picks["oracle_test"] = (_best(col(report[0]), _maximise(report[0])), last, report[0])
        for rule, (i, stop, chosen_on) in picks.items():
            if i < 0:
                continue
            row = {"trajectory": trajectory, "rule": rule, "epoch": float(epochs[i]), "step": int(group["step"].iloc[i]),
                   "stop_epoch": float(epochs[stop]), "chosen_on": chosen_on, "usable": rule != "oracle_test"}  # fmt: skip
            row.update({c: group[c].iloc[0] for c in settings})
            row.update({m: float(group[m].iloc[i]) for m in report})
            rows.append(row)
    return pd.DataFrame(rows)


def _paired(cutoffs: pd.DataFrame, metric: str, rules: Sequence[str]) -> pd.DataFrame:
    """trajectory × rule table of `metric`, only trajectories where every one of `rules` picked a value."""
    wide = cutoffs.pivot_table(index="trajectory", columns="rule", values=metric, aggfunc="first", sort=False)
    missing = [r for r in rules if r not in wide]
    if missing:
        raise KeyError(f"no cutoff rule {missing} in the table (rules there: {list(wide.columns)})")
    return wide[list(rules)].dropna()


COMPARISON_COLUMNS = [
    "rule", "baseline", "metric", "n_trajectories", "mean_rule", "mean_baseline", "mean_diff", "ci_low", "ci_high",
    "confidence", "test", "df", "p_value", "p_adjusted", "adjustment", "role", "n_higher", "n_lower", "note",
]  # fmt: skip


def rule_comparison(
    cutoffs: pd.DataFrame,
    metric: str,
    *,
    baseline: str = "intrinsic_val_loss",
    rules: Sequence[str] | None = None,
    confidence: float = 0.95,
    strata: Sequence[str] | None = None,
    primary: str = "transfer_val",
) -> pd.DataFrame:
    """Each rule against `baseline`, paired on the same trajectories: per trajectory the difference
    d = rule − baseline of `metric` at the points the two rules picked, and their mean with a t
    interval and the one-sample t test of 'mean d = 0' over trajectories (df = n − 1): one model for
    both, so the interval excludes 0 exactly when p < 1 − confidence. Only trajectories where both
    rules picked a point count (`n_trajectories`). Needs the `cutoff_table` columns `trajectory`,
    `rule`, `metric` (and `strata`).

    strata: columns (e.g. ("srm", "lr")) whose combinations are the sweep's conditions: then the
    stratified t (the same mean, its variance from the pooled within-stratum variance, df = n − strata),
    exact when the differences are normal with one variance and condition-specific means. Without
    strata, condition-specific effects widen the interval (it covers more than its level); with strata,
    a condition of one trajectory adds no degrees of freedom, and with no condition of two there is no
    interval (the note says so). The method follows from the arguments only, never from the data.

    On simulated tables (tests/test_calibration.py) the 95% interval covered the true mean difference
    in 94-96% of tables at 6-54 trajectories, with 1-6 seeds per condition. Skewed differences (a rule
    that sometimes picks a much worse point) make a t interval of a mean of few values undercover on
    the side of the long tail.

    The `primary` rule's row has role `primary` (its p is also the Holm-adjusted one, a family of one),
    the other rules' rows are `exploratory` with Benjamini–Hochberg adjusted p-values. Identical
    differences give no interval and the note "all n differences equal".
    """
    available = list(dict.fromkeys(cutoffs["rule"]))
    rules = [r for r in (rules or available) if r != baseline]
    if strata:
        absent = [s for s in strata if s not in cutoffs]
        if absent:
            raise KeyError(f"strata {absent} are not columns of the cutoff table")
    out = []
    for rule in rules:
        wide = _paired(cutoffs, metric, [rule, baseline])
        diff = (wide[rule] - wide[baseline]).to_numpy(float)
        n = len(diff)
        row = {"rule": rule, "baseline": baseline, "metric": metric, "n_trajectories": n,
               "mean_rule": float(wide[rule].mean()) if n else math.nan,
               "mean_baseline": float(wide[baseline].mean()) if n else math.nan,
               "mean_diff": float(diff.mean()) if n else math.nan, "ci_low": math.nan, "ci_high": math.nan,
               "confidence": confidence, "test": "", "df": math.nan, "p_value": math.nan,
               "role": "primary" if rule == primary else "exploratory",
               "n_higher": int((diff > 0).sum()), "n_lower": int((diff < 0).sum()), "note": ""}  # fmt: skip
        out.append(row)
        if n < 2:
            row["note"] = "fewer than 2 trajectories where both rules picked a point"
            continue
        if np.ptp(diff) == 0:
            row["note"] = f"all {n} differences equal ({diff[0]:+.4f}): no interval"
            continue
        codes = None
        if strata:
            labels = cutoffs.drop_duplicates("trajectory").set_index("trajectory").loc[wide.index, list(strata)]
            codes = pd.MultiIndex.from_frame(labels.astype(str)).factorize()[0]
            row["test"] = f"stratified t ({' × '.join(strata)})"
        else:
            row["test"] = "t over trajectories"
        _, lo, hi, p, df = (float(v) for v in paired_t(diff, codes, confidence=confidence))
        row.update(df=df, ci_low=lo, ci_high=hi, p_value=p)
        if not math.isfinite(lo):
            h = len(np.unique(codes))
            row["note"] = (f"{h} strata for {n} trajectories: no within-stratum variance, no interval" if n - h < 1
                           else "no variation within strata: no interval")  # fmt: skip
    return adjust(pd.DataFrame(out, columns=COMPARISON_COLUMNS))


def paired_t(diff: np.ndarray, codes: np.ndarray | None = None, *, confidence: float = 0.95):
    """Mean of paired differences (axis -1) with its t interval and t test p (one model): over
    trajectories (df = n − 1), or stratified by `codes` (one condition number per trajectory, the same
    for every row): pooled within-stratum variance, df = n − strata. Vectorised over leading axes.
    Returns (mean, low, high, p, df); NaN interval and p where the variance is 0 or df < 1."""
    d = np.asarray(diff, float)
    n = d.shape[-1]
    mean = d.mean(axis=-1)
    if codes is None:
        df = n - 1
        var = d.var(axis=-1, ddof=1) if n > 1 else np.full(mean.shape, np.nan)
    else:
        onehot = (np.asarray(codes)[:, None] == np.unique(codes)[None, :]).astype(float)  # n × H
        means = (d @ onehot) / onehot.sum(0)
        df = n - onehot.shape[1]
        ss = ((d - means @ onehot.T) ** 2).sum(axis=-1)
        var = ss / df if df >= 1 else np.full(mean.shape, np.nan)
    with np.errstate(all="ignore"):
        se = np.sqrt(var / n)
        ok = np.isfinite(se) & (se > 1e-15 * np.maximum(1.0, np.abs(mean)))
        q = stats.t.ppf(0.5 + confidence / 2, max(df, 1))
        lo = np.where(ok, mean - q * se, np.nan)
        hi = np.where(ok, mean + q * se, np.nan)
        p = np.where(ok, 2 * stats.t.sf(np.abs(mean) / np.where(ok, se, 1), max(df, 1)), np.nan)
    return mean, lo, hi, p, np.full(mean.shape, float(df) if df >= 1 else np.nan)


def comparison_headline(row: pd.Series | dict) -> str:
    """One line for a `rule_comparison` row: the paired mean difference with its interval and t test."""
    r = dict(row)
    r["statistic"] = r["mean_diff"]
    r["label"] = f"cutoff: {r['rule']} − {r['baseline']} on {r['metric']} (mean paired difference)"
    return headline(r)


def cutoff_summary(cutoffs: pd.DataFrame, report: Sequence[str], rules: Sequence[str] | None = None) -> pd.DataFrame:
    """Per rule: `n`, and mean and std of the picked epoch, the stop epoch and each report metric,
    all over the SAME trajectories: those where every rule of `rules` picked a point.

    rules: by default every rule that picked a point on every trajectory (a `fixed_<E>` beyond some
    trajectory's length is then left out rather than shrinking everyone's set).
    """
    if cutoffs.empty:
        return pd.DataFrame(columns=["rule", "usable", "n"])
    valid = cutoffs.dropna(subset=list(report))
    n_all = cutoffs["trajectory"].nunique()
    counts = valid.groupby("rule", sort=False)["trajectory"].nunique()
    if rules is None:
        rules = [r for r, c in counts.items() if c == n_all]
    absent = [r for r in rules if r not in counts]
    if absent:
        raise KeyError(f"no cutoff rule {absent} in the table (rules there: {list(counts.index)})")
    picked = valid[valid["rule"].isin(rules)].groupby("trajectory", sort=False)["rule"].nunique()
    common = picked.index[picked == len(set(rules))]
    sel = valid[valid["trajectory"].isin(common) & valid["rule"].isin(rules)]
    agg = sel.groupby("rule", sort=False)[["epoch", "stop_epoch", *report]].agg(["mean", "std"])
    agg.columns = [f"{m}_{s}" for m, s in agg.columns]
    agg.insert(0, "n", sel.groupby("rule", sort=False).size())
    agg.insert(0, "usable", sel.groupby("rule", sort=False)["usable"].first())
    return agg.reindex(rules).reset_index()
