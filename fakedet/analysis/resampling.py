"""The inference engines the analysis tables share: row-wise correlations, Fisher-z and t intervals with
the test they invert, and the cluster bootstrap (whole trajectories) for descriptive pooled correlations.

Every interval here comes with the p-value of the SAME model and null, so that an interval excluding 0
and p < 1 − confidence always go together (`fisher_z`, `t_mean`), or with no p-value at all
(`Clusters.ci`: a descriptive interval).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
from scipy import stats

METHODS = ("pearson", "spearman", "kendall")
SYMBOLS = {"pearson": "r", "spearman": "ρ", "kendall": "τ"}

# variance of atanh(statistic) under independence is c / (n - d): Pearson (Fisher 1921) c = 1, d = 3;
# Spearman c = 1.06, d = 3 and Kendall c = 0.437, d = 4 (Fieller, Hartley & Pearson 1957, Biometrika 44)
FISHER = {"pearson": (1.0, 3), "spearman": (1.06, 3), "kendall": (0.437, 4)}


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


def fisher_z(r, n, method: str, *, covariates=0, confidence: float = 0.95):
    """Interval and two-sided p of a correlation from ONE normal model of atanh(r): se = sqrt(c / (n − d −
    covariates)) (`FISHER`; `covariates`: variables partialled out, e.g. condition means removed). The
    interval excludes 0 exactly when p < 1 − confidence. Vectorised over r and n. Returns (low, high, p);
    NaN where n − d − covariates < 1. On independent normal data its p held 4.8-5.2% at n = 12 and 27
    with 0-8 covariates (20,000 repeats each), Spearman's 4.3-4.8%."""
    c, d = FISHER[method]
    r = np.asarray(r, float)
    dof = np.asarray(n, float) - d - np.asarray(covariates, float)
    with np.errstate(all="ignore"):
        se = np.where(dof >= 1, np.sqrt(c / np.where(dof >= 1, dof, 1)), np.nan)
        z = np.arctanh(np.clip(r, -1 + 1e-15, 1 - 1e-15))
        q = stats.norm.ppf(0.5 + confidence / 2)
        lo, hi = np.tanh(z - q * se), np.tanh(z + q * se)
        p = 2 * stats.norm.sf(np.abs(z) / se)
    return lo, hi, p


def t_mean(values: np.ndarray, *, confidence: float = 0.95, axis: int = -1):
    """Mean of independent values with its t interval and the one-sample t test of 'mean = 0' (the
    same model: the interval excludes 0 exactly when p < 1 − confidence). NaN values are left out.
    Vectorised along `axis`. Returns (mean, low, high, p, n, sd). Where every value is equal (sd = 0)
    the interval and p are NaN: callers say "all n values equal" instead of a zero-width interval."""
    v = np.asarray(values, float)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        n = np.isfinite(v).sum(axis=axis)
        mean = np.nanmean(v, axis=axis)
        sd = np.nanstd(v, axis=axis, ddof=1)
        se = sd / np.sqrt(n)
        ok = (n >= 2) & (sd > 0)
        dof = np.where(ok, n - 1, 1)
        q = stats.t.ppf(0.5 + confidence / 2, dof)
        lo = np.where(ok, mean - q * se, np.nan)
        hi = np.where(ok, mean + q * se, np.nan)
        p = np.where(ok, 2 * stats.t.sf(np.abs(mean / np.where(ok, se, 1)), dof), np.nan)
    return mean, lo, hi, p, n, sd


class Clusters:
    """Paired values in blocks (one block per trajectory), with the cluster-bootstrap distribution of a
    correlation over the pooled values: whole trajectories are drawn, with all their values."""

    def __init__(self, frame: pd.DataFrame, x: str, y: str, order: str | None):
        frame = frame.sort_values(["trajectory", order] if order else ["trajectory"], kind="stable")
        self.x = frame[x].to_numpy(float)
        self.y = frame[y].to_numpy(float)
        codes, self.trajectories = pd.factorize(frame["trajectory"], sort=False)
        self.blocks = [np.flatnonzero(codes == i) for i in range(len(self.trajectories))]
        # the blocks laid end to end, with each one's length and first position there (`correlations`)
        self._lengths = np.array([len(b) for b in self.blocks])
        self._order = np.concatenate(self.blocks) if self.blocks else np.zeros(0, int)
        self._first = np.cumsum(self._lengths) - self._lengths
        equal = len(self.blocks) and (self._lengths == self._lengths[0]).all()
        self._rectangle = np.stack(self.blocks) if equal else None

    def rows(self, picks: np.ndarray) -> list[np.ndarray] | np.ndarray:
        """Row indices of each resample's blocks (picks: B × k block numbers); rectangular if possible.
        With `many`, the one-resample-at-a-time reference that `correlations` must equal bit for bit."""
        sizes = np.array([len(b) for b in self.blocks])
        if (sizes == sizes[0]).all():
            return np.stack(self.blocks)[picks].reshape(len(picks), -1)
        return [np.concatenate([self.blocks[j] for j in p]) for p in picks]

    def many(self, rows, method: str) -> np.ndarray:
        """The correlation of each resample of `rows`; those of one size are stacked and correlated in one
        call (bit-identical to one call per resample: each row's reductions see the same values in the
        same order)."""
        if isinstance(rows, np.ndarray):
            return correlate(self.x[rows], self.y[rows], method)
        sizes = np.array([len(r) for r in rows])
        out = np.empty(len(rows))
        for size in np.unique(sizes):
            at = np.flatnonzero(sizes == size)
            idx = np.stack([rows[i] for i in at])
            out[at] = correlate(self.x[idx], self.y[idx], method)
        return out

    def correlations(self, picks: np.ndarray, method: str) -> np.ndarray:
        """The correlation of each resample (picks: B × k block numbers) without a Python loop over
        resamples: every resample's row indices are laid out in one flat array (its blocks in pick
        order, as `rows` concatenates them), then the resamples of one total size are gathered as one
        rectangle and correlated in one call. Equal to `many(rows(picks))` bit for bit (tests); on the
        main job's unequal blocks 1.5-2.2× less CPU time than `many(rows(picks))` and 14-17× less than one
        `correlate` call per resample (benchmarks/bench_statistics.py)."""
        picks = np.asarray(picks)
        if self._rectangle is not None:  # equal blocks: every resample the same size, one gather
            idx = self._rectangle[picks].reshape(len(picks), -1)
            return correlate(self.x[idx], self.y[idx], method)
        lengths = self._lengths[picks]  # B × k
        totals = lengths.sum(axis=1)
        # pick (b, i) contributes block j = picks[b, i], i.e. _order[_first[j] : _first[j] + _lengths[j]],
        # placed right after the picks before it; resample b is then one contiguous run of totals[b] rows
        flat_len = lengths.ravel()
        pick_start = np.cumsum(flat_len) - flat_len  # where each pick's rows start in the flat array
        within = np.arange(flat_len.sum()) - np.repeat(pick_start, flat_len)
        flat = self._order[np.repeat(self._first[picks.ravel()], flat_len) + within]
        resample_start = np.cumsum(totals) - totals
        out = np.empty(len(picks))
        for size in np.unique(totals):
            at = np.flatnonzero(totals == size)
            idx = flat[resample_start[at, None] + np.arange(size)]
            out[at] = correlate(self.x[idx], self.y[idx], method)
        return out

    def ci(self, method: str, n_boot: int, rng: np.random.Generator, confidence: float) -> tuple[float, float, str]:
        """Cluster bootstrap interval: the correlation over the values of k trajectories drawn with
        replacement (scipy.stats.bootstrap over trajectory numbers, BCa: its jackknife, too, leaves out
        one whole trajectory at a time)."""

        def statistic(picks: np.ndarray, axis: int = -1) -> np.ndarray:
            flat = picks.reshape(-1, picks.shape[-1])
            return self.correlations(flat, method).reshape(picks.shape[:-1])

        return bootstrap_ci((np.arange(len(self.blocks)),), statistic, n_boot, rng, confidence)


def bootstrap_ci(data: tuple, statistic: Callable, n_boot: int, rng: np.random.Generator,
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


def check_methods(methods: Sequence[str]) -> None:
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown correlation method {m!r}; choose from {', '.join(METHODS)}")
