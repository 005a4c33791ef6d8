"""Statistics of a sweep's results that respect how they were measured: seeds, nesting, uncertainty.

Pure functions over the two tables a sweep yields (`fakedet.results.points_from_mlflow`):

- `points`: one row per (trajectory, evaluation point): `trajectory`, `epoch`, `step`, the
  trajectory's settings (`srm`, `lr`, `seed`, ...) and metrics named `<set>/<metric>`;
- `cells`: one row per cell, a trajectory read at one epoch count `cell_epochs`.

The unit of independence is the trajectory: the cells of one trajectory are the SAME model read at
different lengths (nested), and its evaluation points likewise. Trajectories that differ only in
seed are independent replicates of one (srm, lr) condition. So every interval here resamples whole
trajectories (or models that are one per trajectory), every permutation test permutes whole
trajectories, and every row says its n and its unit. Permutation p-values are never 0: with B
permutations, a one-sided p is (k + 1) / (B + 1) (Phipson & Smyth 2010; scipy.stats.permutation_test
does the same), and the two-sided p is twice the smaller one-sided p, so the table also carries
`p_value_resolution` = 1 / (B + 1), the step of that grid (or 1 / the number of distinct
permutations, when scipy enumerates them all).

Intervals are BCa bootstrap intervals (Efron 1987) from `scipy.stats.bootstrap`: on null data its
percentile intervals for a correlation covered 0 in 92% (9 pairs) and 91% (20 pairs) of 300 repeats,
BCa in 95% and 93%. To resample whole trajectories, the "observations" handed to scipy are
trajectory numbers and the statistic pools their cells, so BCa's jackknife, too, leaves out one
whole trajectory at a time. Where BCa is undefined (a degenerate bootstrap distribution: every
resample gives ρ = 1) or some resamples have no correlation at all (constant values, e.g. models on
the all-FAKE plateau at 50% accuracy), the percentile interval of the defined resamples is given
instead, and `note` says so.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.formula.api import ols
from statsmodels.stats.anova import anova_lm

METHODS = ("pearson", "spearman", "kendall")
SYMBOLS = {"pearson": "r", "spearman": "ρ", "kendall": "τ"}
CONDITION = ("srm", "cell_epochs", "lr")  # one cell condition; seeds replicate it

CORRELATION_COLUMNS = [
    "scope", "intrinsic", "transfer", "method", "statistic", "ci_low", "ci_high", "confidence", "p_value",
    "p_value_resolution", "n_models", "n_trajectories", "unit", "resampled", "restricted_to", "note",
]  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# 1. seeds: mean, std and n per cell condition
# ---------------------------------------------------------------------------------------------------
def cells_summary(cells: pd.DataFrame, metrics: Sequence[str], by: Sequence[str] = CONDITION) -> pd.DataFrame:
    """One row per cell condition (`by`, default srm × cell_epochs × lr) with `n_seeds` and, for every
    metric, `<metric>_mean` and `<metric>_std` over the seeds (std with ddof 1: NaN when n_seeds == 1).

    Pass the cells to count (e.g. FINISHED ones only). A metric missing from the table is left out;
    NaN values of a metric are skipped in its mean and std.
    """
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


# ---------------------------------------------------------------------------------------------------
# 2. correlations on independent units
# ---------------------------------------------------------------------------------------------------
def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson's r of each row pair: the statistic of `scipy.stats.pearsonr(x, y, axis=1)` without its
    p-value, whose beta survival function took ~40% of a bootstrap's time (tests compare the two)."""
    xm = x - x.mean(axis=1, keepdims=True)
    ym = y - y.mean(axis=1, keepdims=True)
    r = (xm * ym).sum(axis=1) / np.sqrt((xm * xm).sum(axis=1) * (ym * ym).sum(axis=1))
    return np.clip(r, -1.0, 1.0)


def _kendall_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall's τ-b of each row pair: (concordant − discordant pairs) / sqrt(pairs untied in x × pairs
    untied in y), the statistic of `scipy.stats.kendalltau` (tests compare the two). Its row-wise mode
    loops in Python and computes an exact p-value per row: 90% of a correlation table's time."""
    i, j = np.triu_indices(x.shape[1], 1)
    out = np.empty(len(x))
    rows = max(1, 2_000_000 // max(len(i), 1))  # ~16 MB of pair signs at a time
    for lo in range(0, len(x), rows):
        sx = np.sign(x[lo : lo + rows, i] - x[lo : lo + rows, j])
        sy = np.sign(y[lo : lo + rows, i] - y[lo : lo + rows, j])
        out[lo : lo + rows] = (sx * sy).sum(1) / np.sqrt(np.abs(sx).sum(1) * np.abs(sy).sum(1))
    return out


def correlate(x: np.ndarray, y: np.ndarray, method: str) -> np.ndarray:
    """Row-wise correlation of x and y (1-D, or 2-D with one sample per row): NaN where a row is
    constant. Spearman's ρ is Pearson's r of the average ranks, as `scipy.stats.spearmanr` computes it
    (spearmanr has no row-wise mode); Kendall's τ is τ-b, as `scipy.stats.kendalltau`."""
    if method not in METHODS:
        raise ValueError(f"unknown correlation method {method!r}; choose from {', '.join(METHODS)}")
    x2, y2 = np.atleast_2d(np.asarray(x, float)), np.atleast_2d(np.asarray(y, float))
    flat = (np.ptp(x2, axis=1) == 0) | (np.ptp(y2, axis=1) == 0)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # constant rows: handled below
        if method == "pearson":
            r = _pearson_rows(x2, y2)
        elif method == "spearman":
            r = _pearson_rows(stats.rankdata(x2, axis=1), stats.rankdata(y2, axis=1))
        else:
            r = _kendall_rows(x2, y2)
    r = np.where(flat, np.nan, np.asarray(r, float))
    return r if np.ndim(x) == 2 else r[0]


class _Clusters:
    """Paired values in blocks (one block per trajectory, rows ordered by `order` within a block),
    with cluster-bootstrap and block-permutation distributions of a correlation."""

    def __init__(self, frame: pd.DataFrame, x: str, y: str, order: str | None):
        frame = frame.sort_values(["trajectory", order] if order else ["trajectory"], kind="stable")
        self.x = frame[x].to_numpy(float)
        self.y = frame[y].to_numpy(float)
        codes, self.trajectories = pd.factorize(frame["trajectory"], sort=False)
        self.blocks = [np.flatnonzero(codes == i) for i in range(len(self.trajectories))]
        # trajectories whose blocks can swap: the same positions (cell epochs) in the same order
        keys = frame[order].to_numpy() if order else np.zeros(len(frame))
        strata: dict[tuple, list[int]] = {}
        for i, block in enumerate(self.blocks):
            strata.setdefault(tuple(keys[block]), []).append(i)
        self.strata = [np.array(m) for m in strata.values()]

    def _rows(self, picks: np.ndarray) -> list[np.ndarray] | np.ndarray:
        """Row indices of each resample's blocks (picks: B × k block numbers); rectangular if possible."""
        sizes = np.array([len(b) for b in self.blocks])
        if (sizes == sizes[0]).all():
            return np.stack(self.blocks)[picks].reshape(len(picks), -1)
        return [np.concatenate([self.blocks[j] for j in p]) for p in picks]

    def _many(self, xi, yi, method: str) -> np.ndarray:
        if isinstance(xi, np.ndarray) and isinstance(yi, np.ndarray):
            return correlate(self.x[xi], self.y[yi], method)
        return np.array([correlate(self.x[a], self.y[b], method) for a, b in zip(xi, yi)])

    def ci(self, method: str, n_boot: int, rng: np.random.Generator, confidence: float) -> tuple[float, float, str]:
        """Cluster bootstrap interval: the correlation over the cells of k trajectories drawn with
        replacement (scipy.stats.bootstrap over trajectory numbers, BCa)."""

        def statistic(picks: np.ndarray, axis: int = -1) -> np.ndarray:
            flat = picks.reshape(-1, picks.shape[-1])
            rows = self._rows(flat)
            return self._many(rows, rows, method).reshape(picks.shape[:-1])

        return _scipy_ci((np.arange(len(self.blocks)),), statistic, n_boot, rng, confidence)

    def permutation(self, method: str, n_perm: int, rng: np.random.Generator) -> np.ndarray:
        """The correlation when each trajectory's y-block is paired with the x-block of another
        trajectory of its stratum (same cell epochs), position by position, n_perm times."""
        k = len(self.blocks)
        partner = np.tile(np.arange(k), (n_perm, 1))
        for members in self.strata:
            partner[:, members] = rng.permuted(np.tile(members, (n_perm, 1)), axis=1)
        own = self._rows(np.tile(np.arange(k), (n_perm, 1)))
        return self._many(own, self._rows(partner), method)

    def distinct_pairings(self) -> int:
        return math.prod(math.factorial(len(m)) for m in self.strata)


def _scipy_ci(data: tuple, statistic: Callable, n_boot: int, rng: np.random.Generator,
              confidence: float) -> tuple[float, float, str]:  # fmt: skip
    """BCa interval from scipy.stats.bootstrap; where BCa is undefined, the percentile interval of the
    resamples whose statistic is defined (at least half of them), with a note saying so."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's DegenerateDataWarning: handled below
        res = stats.bootstrap(data, statistic, n_resamples=n_boot, confidence_level=confidence, method="BCa",
                              vectorized=True, rng=rng)  # fmt: skip
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if math.isfinite(lo) and math.isfinite(hi):
        return lo, hi, ""
    dist = np.asarray(res.bootstrap_distribution, float)
    valid = dist[np.isfinite(dist)]
    undefined = f"{len(dist) - len(valid)} of {len(dist)} resamples undefined (constant values)"
    if len(valid) < 0.5 * len(dist):
        return math.nan, math.nan, f"{undefined}: no interval"
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(valid, [alpha, 1 - alpha])
    left_out = f"; {undefined}, left out" if len(valid) < len(dist) else ""
    return float(lo), float(hi), "percentile interval (BCa undefined here)" + left_out


def _perm_p(observed: float, null: np.ndarray) -> tuple[float, float]:
    """Two-sided permutation p-value, as scipy.stats.permutation_test computes it for a randomized test:
    each one-sided p is (k + 1) / (B + 1), with a relative tolerance for ties; the two-sided p is twice
    the smaller, at most 1. Returns (p, 1 / (B + 1))."""
    null = null[np.isfinite(null)]
    if not math.isfinite(observed) or not len(null):
        return math.nan, math.nan
    gamma = abs(observed) * 1e-12  # scipy's guard against round-off between equal statistics
    b = len(null)
    greater = (np.count_nonzero(null >= observed - gamma) + 1) / (b + 1)
    less = (np.count_nonzero(null <= observed + gamma) + 1) / (b + 1)
    return float(min(1.0, 2 * min(greater, less))), 1 / (b + 1)


def _pair_frame(frame: pd.DataFrame, x: str, y: str, extra: Sequence[str]) -> pd.DataFrame:
    pair = frame[["trajectory", *extra, x, y]].copy()
    pair[[x, y]] = pair[[x, y]].astype(float).replace([np.inf, -np.inf], np.nan)
    return pair.dropna(subset=[x, y])


def _row(scope, x, y, method, confidence, restricted, **values) -> dict:
    row = {"scope": scope, "intrinsic": x, "transfer": y, "method": method, "statistic": math.nan,
           "ci_low": math.nan, "ci_high": math.nan, "confidence": confidence, "p_value": math.nan,
           "p_value_resolution": math.nan, "n_models": 0, "n_trajectories": 0, "unit": "", "resampled": "",
           "restricted_to": restricted, "note": ""}  # fmt: skip
    row.update(values)
    return row


def _clustered_rows(pair, x, y, scope, order, methods, n_boot, n_perm, rng, confidence, restricted) -> list[dict]:
    """Correlation over `pair` (cells): bootstrap over trajectories, permutation of trajectory blocks."""
    nested = order is not None
    unit = "cell (nested in its trajectory)" if nested else "model (one per trajectory)"
    resampled = "trajectories, with all their cells" if nested else "models"
    counts = dict(n_models=len(pair), n_trajectories=int(pair["trajectory"].nunique()), unit=unit, resampled=resampled)
    if counts["n_trajectories"] < 3:
        return [_row(scope, x, y, m, confidence, restricted, **counts, note="fewer than 3 trajectories") for m in methods]
    data = _Clusters(pair, x, y, order)
    rows = []
    for method in methods:
        r = float(correlate(data.x, data.y, method))
        if not math.isfinite(r):
            rows.append(_row(scope, x, y, method, confidence, restricted, **counts, note="constant values: no correlation"))
            continue
        lo, hi, note = data.ci(method, n_boot, rng, confidence)
        p, resolution = _perm_p(r, data.permutation(method, n_perm, rng))
        distinct = data.distinct_pairings()
        if distinct <= n_perm:  # few trajectories: drawn permutations repeat, the p cannot be finer
            resolution = 1 / distinct
            note = "; ".join(filter(None, [note, f"only {distinct} distinct pairings of trajectories"]))
        rows.append(_row(scope, x, y, method, confidence, restricted, **counts, statistic=r, ci_low=lo, ci_high=hi,
                         p_value=p, p_value_resolution=resolution, note=note))  # fmt: skip
    return rows


def _mean_ci(samples: Sequence[np.ndarray], n_boot: int, rng: np.random.Generator, confidence: float) -> tuple[float, float]:
    """Bootstrap interval of the mean of independent values; several samples (strata) are resampled
    each within itself, and the statistic is the mean of all values together."""
    values = np.concatenate(samples)
    if len(values) < 2:
        return math.nan, math.nan
    if np.ptp(values) == 0:
        return float(values[0]), float(values[0])
    lo, hi, _ = _scipy_ci(tuple(samples), _pooled_mean, n_boot, rng, confidence)
    return lo, hi


def _sign_flip_p(values: np.ndarray, n_perm: int, rng: np.random.Generator) -> tuple[float, float]:
    """Two-sided p of 'mean = 0' by flipping the signs of independent values (scipy.stats.permutation_test;
    exact when 2**n <= n_perm). Returns (p, resolution)."""
    if len(values) < 2 or not np.any(values):
        return math.nan, math.nan
    res = stats.permutation_test((values,), np.mean, permutation_type="samples", n_resamples=n_perm, rng=rng)
    exact = 2 ** len(values) <= n_perm
    return float(res.pvalue), (2.0 ** -len(values) if exact else 1 / (n_perm + 1))


def _within_rows(points, x, y, scope, methods, n_boot, n_perm, rng, confidence, restricted) -> list[dict]:
    """Each trajectory's correlation over its evaluation points; their mean across trajectories, with a
    bootstrap interval over trajectories and a sign-flip p (trajectories as the independent units)."""
    pair = _pair_frame(points, x, y, ["epoch"])
    groups = [g for _, g in pair.groupby("trajectory", sort=False) if len(g) >= 3]
    rows = []
    for method in methods:
        per = np.array([float(correlate(g[x].to_numpy(), g[y].to_numpy(), method)) for g in groups])
        used = [g for g, r in zip(groups, per) if math.isfinite(r)]
        per = per[np.isfinite(per)]
        base = dict(n_models=int(sum(len(g) for g in used)), n_trajectories=len(per),
                    unit="evaluation point (nested in its trajectory)", resampled="trajectories")  # fmt: skip
        if len(per) < 2:
            rows.append(_row(scope, x, y, method, confidence, restricted, **base,
                             note="fewer than 2 trajectories with 3 or more non-constant points"))  # fmt: skip
            continue
        lo, hi = _mean_ci([per], n_boot, rng, confidence)
        p, resolution = _sign_flip_p(per, n_perm, rng)
        rows.append(_row(scope, x, y, method, confidence, restricted, **base, statistic=float(per.mean()),
                         ci_low=lo, ci_high=hi, p_value=p, p_value_resolution=resolution,
                         note="statistic: mean over trajectories of the within-trajectory correlation"))  # fmt: skip
    return rows


def _one_per_trajectory(cells: pd.DataFrame) -> None:
    dup = cells.duplicated(["trajectory", "cell_epochs"], keep=False)
    if dup.any():
        first = cells[dup].iloc[0]
        raise ValueError(
            f"cells hold {int(dup.sum())} rows that repeat a (trajectory, cell_epochs), e.g. trajectory "
            f"{first['trajectory']!r} at {first['cell_epochs']:g} epochs; pass one row per cell (e.g. FINISHED cells only)"
        )


def correlation_table(
    cells: pd.DataFrame,
    points: pd.DataFrame | None,
    intrinsic: Sequence[str],
    transfer: Sequence[str],
    *,
    methods: Sequence[str] = METHODS,
    n_boot: int = 1000,
    n_perm: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    trained_threshold: float | None = None,
    trained_metric: str = "cifake_val/auc",
) -> pd.DataFrame:
    """Correlations between every intrinsic and every transfer metric, each with an interval, a
    permutation p-value, n and its unit, in these scopes:

    - `epochs=<E>`: the cells at one epoch count, one independent model per trajectory; bootstrap
      over those models, permutation of their pairing.
    - `cells`: all cells pooled; the interval resamples whole trajectories (cluster bootstrap) and the
      p-value permutes whole trajectories: trajectory i's transfer values are paired with trajectory
      j's intrinsic values, epoch count by epoch count, among trajectories with the same cell epochs.
      The common trend over epochs is kept in every permutation, so a pooled correlation that only
      says "both improve with training" is not significant.
    - `within`: each trajectory's correlation over its own evaluation points (`points`), averaged over
      trajectories; bootstrap over trajectories, sign-flip p over trajectories.
    - with `trained_threshold`, the same scopes restricted to cells (and points) whose
      `trained_metric` is at least the threshold (`scope` gets `|trained`), so that models still on
      the all-FAKE plateau do not drive the answer.

    Pass one row per (trajectory, cell_epochs) (e.g. FINISHED cells only). A metric absent from the
    cells is skipped. NaN results say why in `note` (fewer than 3 trajectories, constant values).
    One seed fixes every resample, so the table is reproducible.
    """
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown correlation method {m!r}; choose from {', '.join(METHODS)}")
    _one_per_trajectory(cells)
    rng = np.random.default_rng(seed)
    variants: list[tuple[str, pd.DataFrame, pd.DataFrame | None, str]] = [("", cells, points, "")]
    if trained_threshold is not None:
        if trained_metric not in cells:
            raise KeyError(f"trained_threshold needs the metric {trained_metric!r} in the cells")
        keep = lambda f: f[f[trained_metric].astype(float) >= trained_threshold]  # noqa: E731
        pts = keep(points) if points is not None and trained_metric in points else None
        variants.append(("|trained", keep(cells), pts, f"{trained_metric} >= {trained_threshold:g}"))
    rows: list[dict] = []
    for x, y in itertools.product(intrinsic, transfer):
        if x not in cells or y not in cells:
            continue
        for suffix, c, p, restricted in variants:
            pair = _pair_frame(c, x, y, ["cell_epochs"])
            for e in sorted(pair["cell_epochs"].unique()):
                rows += _clustered_rows(pair[pair["cell_epochs"] == e], x, y, f"epochs={e:g}{suffix}", None, methods,
                                        n_boot, n_perm, rng, confidence, restricted)  # fmt: skip
            rows += _clustered_rows(pair, x, y, f"cells{suffix}", "cell_epochs", methods, n_boot, n_perm, rng,
                                    confidence, restricted)  # fmt: skip
            if p is not None and x in p and y in p:
                rows += _within_rows(p, x, y, f"within{suffix}", methods, n_boot, n_perm, rng, confidence, restricted)
    return pd.DataFrame(rows, columns=CORRELATION_COLUMNS)


_SCOPE_WORDS = {
    "cells": "cells pooled, trajectory bootstrap",
    "within": "within trajectories (mean over trajectories), trajectory bootstrap",
}


def headline(table: pd.DataFrame, intrinsic: str, transfer: str, *, method: str = "spearman", scope: str = "cells") -> str:
    """One line naming the scope, the estimate, its interval, n and the permutation p, e.g.
    `Spearman ρ(cifake_test/acc, agiri_test/acc), cells pooled, trajectory bootstrap: +0.81 [95% CI
    +0.55, +0.93], n = 27 models in 9 trajectories, permutation p = 0.004 (resolution 1/1001)`."""
    sel = table[(table["intrinsic"] == intrinsic) & (table["transfer"] == transfer) & (table["method"] == method)
                & (table["scope"] == scope)]  # fmt: skip
    if sel.empty:
        have = sorted(table.loc[(table["intrinsic"] == intrinsic) & (table["transfer"] == transfer), "scope"].unique())
        raise KeyError(f"no {method} row for {intrinsic} vs {transfer} in scope {scope!r} (scopes there: {have})")
    r = sel.iloc[0]
    base, _, restricted = scope.partition("|")
    where = _SCOPE_WORDS.get(base) or f"cells at {base.split('=')[1]} epochs, model bootstrap"
    if restricted:
        where += f", only {r['restricted_to']}"
    name = f"{method.capitalize()} {SYMBOLS[method]}({intrinsic}, {transfer}), {where}"
    units = "points" if base == "within" else "models"
    n = f"n = {int(r['n_models'])} {units} in {int(r['n_trajectories'])} trajectories"
    if not math.isfinite(r["statistic"]):
        return f"{name}: not computable ({r['note']}), {n}"
    ci = f"[{r['confidence']:.0%} CI {r['ci_low']:+.2f}, {r['ci_high']:+.2f}]"
    p = ""
    if math.isfinite(r["p_value"]):
        p = f", permutation p = {r['p_value']:.3g} (resolution 1/{round(1 / r['p_value_resolution'])})"
    return f"{name}: {r['statistic']:+.2f} {ci}, {n}{p}"


# ---------------------------------------------------------------------------------------------------
# 3. which factor matters
# ---------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------
# 4. where to stop training
# ---------------------------------------------------------------------------------------------------
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


GROUP_COLUMNS = ("srm", "lr", "seed", "momentum", "batch_size")


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


def rule_comparison(
    cutoffs: pd.DataFrame,
    metric: str,
    *,
    baseline: str = "intrinsic_val_loss",
    rules: Sequence[str] | None = None,
    n_boot: int = 1000,
    n_perm: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    strata: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Each rule against `baseline`, paired on the same trajectories: per trajectory the difference
    (rule − baseline) of `metric` at the points the two rules picked; the mean difference with a
    BCa bootstrap interval over trajectories (`scipy.stats.bootstrap`) and a sign-flip
    permutation p (`scipy.stats.permutation_test`). Only trajectories where both rules picked a point
    count (`n_trajectories`). With few trajectories the interval is a little narrow: on null curves
    (tests/test_statistics.py) it covered 0 in 85-89% of repeats at 10-12 trajectories (a BCa
    interval of a mean of 10 normal values: 89% of 400; a t interval: 93%); the sign-flip p holds
    its level, so read both.

    strata: columns of `cutoffs` (e.g. ("srm", "lr")) within which trajectories (seeds) are
    resampled, keeping the sweep's design in every resample; strata of a single trajectory cannot
    be resampled, so then the whole set is resampled (the `resampled` column says which).
    """
    available = list(dict.fromkeys(cutoffs["rule"]))
    rules = [r for r in (rules or available) if r != baseline]
    rng = np.random.default_rng(seed)
    out = []
    for rule in rules:
        wide = _paired(cutoffs, metric, [rule, baseline])
        diff = (wide[rule] - wide[baseline]).to_numpy(float)
        row = {"rule": rule, "baseline": baseline, "metric": metric, "n_trajectories": len(diff),
               "mean_rule": float(wide[rule].mean()) if len(diff) else math.nan,
               "mean_baseline": float(wide[baseline].mean()) if len(diff) else math.nan,
               "mean_diff": float(diff.mean()) if len(diff) else math.nan, "ci_low": math.nan, "ci_high": math.nan,
               "confidence": confidence, "p_value": math.nan, "p_value_resolution": math.nan,
               "n_higher": int((diff > 0).sum()), "n_lower": int((diff < 0).sum()), "resampled": "", "note": ""}  # fmt: skip
        if len(diff) < 2:
            row["note"] = "fewer than 2 trajectories where both rules picked a point"
            out.append(row)
            continue
        groups = None
        if strata:
            absent = [s for s in strata if s not in cutoffs]
            if absent:
                raise KeyError(f"strata {absent} are not columns of the cutoff table")
            labels = cutoffs.drop_duplicates("trajectory").set_index("trajectory").loc[wide.index, list(strata)]
            groups = [diff[idx] for idx in labels.groupby(list(strata), sort=True).indices.values()]
        if groups and all(len(g) >= 2 for g in groups) and len(groups) > 1:
            row["ci_low"], row["ci_high"] = _mean_ci(groups, n_boot, rng, confidence)
            row["resampled"] = f"trajectories within {' × '.join(strata)} strata ({len(groups)} strata of 2+)"
        else:
            row["ci_low"], row["ci_high"] = _mean_ci([diff], n_boot, rng, confidence)
            row["resampled"] = "trajectories"
            if groups:
                row["note"] = f"some {' × '.join(strata)} stratum has one trajectory: resampled trajectories as one set"
        row["p_value"], row["p_value_resolution"] = _sign_flip_p(diff, n_perm, rng)
        out.append(row)
    return pd.DataFrame(out)


def _pooled_mean(*samples: np.ndarray, axis: int = -1) -> np.ndarray:
    """Mean over all strata's values together (each stratum weighted by its size), for scipy.stats.bootstrap."""
    total = sum(np.sum(s, axis=axis) for s in samples)
    return total / sum(s.shape[axis] for s in samples)


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
