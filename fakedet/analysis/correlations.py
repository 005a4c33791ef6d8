"""Does transfer move with intrinsic skill? Three questions, each with its own estimand, unit and test.

Pure functions over the two tables a sweep yields (`fakedet.results.points_from_mlflow`), or any table
with the same columns:

- `points`: one row per (trajectory, evaluation point): `trajectory`, `epoch`, the trajectory's
  settings (`srm`, `lr`, `seed`, ...) and metrics named `<set>/<metric>`;
- `cells`: one row per cell, a trajectory read at one length: `trajectory`, `cell_epochs`, the
  settings and the metrics.

The unit of independence is the trajectory (one model trained once): its cells and evaluation points
are the same model read at several lengths. The questions (README, "Statistics"):

- `along_training`: as one model trains, does transfer move with intrinsic skill? Per trajectory, the
  change in transfer between two named lengths (`transfer_change`; the study's contrast: its 1-epoch
  model transferred better than its 10-epoch one), the lag between the epochs of best transfer and of
  best intrinsic skill (`peak_lag`, log10 epochs) and the correlation over its points
  (`within_correlation`: ≈ +1 whenever both rise with training, so it measures the shared trend and
  cannot show a rise-then-fall); each summarised as a mean over trajectories with a t interval and the
  one-sample t test (n = trajectories).
- `across_models`: at one length, do the models with more intrinsic skill transfer better? The
  correlation across trajectories of the cells at each length; combined over lengths by a rule fixed
  here: each model's standing (z-score of the value, or of its rank for Spearman/Kendall, among the
  models at that length) averaged over the lengths it reached, then correlated across trajectories.
- `across_seeds`: the same with each condition's (srm × lr × ...) mean removed at every length, so
  that "a larger lr makes both faster" does not count; n is the trajectories in conditions with 2+
  seeds and the condition means are partialled out (covariates = conditions − 1).
- `pooled`: all cells together, a cluster-bootstrap interval over whole trajectories and no p-value:
  it mixes lengths, so it contains the common training trend; a description, not a test.

Correlation rows carry a Fisher-z interval and the Fisher-z p of the same normal model
(`resampling.fisher_z`), mean rows a t interval and the t test: an interval excludes 0 exactly when
p < 1 − confidence. One row per question is `primary` (chosen before the sweep, `[statistics.primary]`);
Holm adjusts the primary rows, Benjamini–Hochberg the `exploratory` ones (`summary.adjust`).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from fakedet.analysis.resampling import FISHER, METHODS, Clusters, check_methods, correlate, fisher_z, t_mean
from fakedet.analysis.summary import adjust

SETTINGS = ("srm", "attention", "augment", "augment_p", "lr", "train_on", "momentum", "batch_size")  # what makes a condition; seeds replicate it
ALONG = ("transfer_change", "peak_lag", "within_correlation")

COLUMNS = [
    "scope", "estimand", "method", "epochs", "intrinsic", "transfer", "statistic", "ci_low", "ci_high", "confidence",
    "test", "p_value", "p_adjusted", "adjustment", "n_trajectories", "n_models", "unit", "role", "restricted_to",
    "note",
]  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# array cores: (..., trajectories, lengths) arrays, NaN where a cell is missing; vectorised over the
# leading axes so that simulations (fakedet.analysis.simulate) run thousands of tables at once
# ---------------------------------------------------------------------------------------------------
def standing(values: np.ndarray, method: str) -> np.ndarray:
    """Each model's standing among the models at its length (axis -2: trajectories): the z-score of its
    value (Pearson) or of its rank (Spearman, Kendall); NaN stays NaN."""
    v = np.asarray(values, float)
    if method != "pearson":
        v = stats.rankdata(v, axis=-2, nan_policy="omit")
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN length or trajectory: NaN, as meant
        return (v - np.nanmean(v, axis=-2, keepdims=True)) / np.nanstd(v, axis=-2, ddof=1, keepdims=True)


def within_conditions(values: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """values minus their condition's mean at each length (codes: one condition number per trajectory);
    NaN where the condition has fewer than 2 values at that length (nothing within it to compare)."""
    v = np.asarray(values, float)
    onehot = (np.asarray(codes)[:, None] == np.unique(codes)[None, :]).astype(float)  # T × C
    finite = np.isfinite(v)
    sums = np.einsum("...tl,tc->...cl", np.where(finite, v, 0.0), onehot)
    counts = np.einsum("...tl,tc->...cl", finite.astype(float), onehot)
    with np.errstate(all="ignore"):
        # a condition with no value at a length has no mean there: 0, not NaN, which the product with the
        # other conditions' zeros would spread to every trajectory (a training set without transfer metrics)
        means = np.einsum("...cl,tc->...tl", np.where(counts > 0, sums / counts, 0.0), onehot)
    enough = np.einsum("...cl,tc->...tl", (counts >= 2).astype(float), onehot) > 0
    return np.where(finite & enough, v - means, np.nan)


def combined(x: np.ndarray, y: np.ndarray, method: str, codes: np.ndarray | None = None):
    """The pre-registered rule over lengths: each trajectory's standing averaged over the lengths where
    both metrics are present (within its condition when `codes`). Returns (sx, sy) (..., T)."""
    both = np.isfinite(x) & np.isfinite(y)
    x, y = np.where(both, x, np.nan), np.where(both, y, np.nan)
    if codes is not None:
        x, y = within_conditions(x, codes), within_conditions(y, codes)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN length or trajectory: NaN, as meant
        return np.nanmean(standing(x, method), axis=-1), np.nanmean(standing(y, method), axis=-1)


def across(x: np.ndarray, y: np.ndarray, method: str, codes: np.ndarray | None = None, confidence: float = 0.95):
    """Correlation across trajectories (axis -1) of x and y (..., T) with its Fisher-z interval and p;
    `codes`: condition numbers, whose means x and y have had removed (partialled out). Rows with NaN
    use their finite pairs. Returns (r, low, high, p, n, covariates)."""
    x2, y2 = np.atleast_2d(x), np.atleast_2d(y)
    finite = np.isfinite(x2) & np.isfinite(y2)
    n = finite.sum(-1)
    if finite.all():
        r = np.where(n >= 3, correlate(x2, y2, method), np.nan)  # two points always correlate ±1
    else:
        r = np.array([correlate(a[f], b[f], method) if f.sum() >= 3 else math.nan for a, b, f in zip(x2, y2, finite)])
    if codes is None:
        k = np.zeros(len(x2))
    else:  # conditions with 2+ trajectories here, each costs one degree of freedom beyond the intercept
        k = np.array([max(0, int((np.unique(codes[f], return_counts=True)[1] >= 2).sum()) - 1) for f in finite])
    lo, hi, p = fisher_z(r, n, method, covariates=k, confidence=confidence)
    out = r, lo, hi, p, n, k
    return tuple(np.asarray(a)[0] for a in out) if np.ndim(x) == 1 else out


def change(values: np.ndarray, epochs: np.ndarray, start: float, end: float) -> np.ndarray:
    """values (..., T, points) at epoch `end` minus at epoch `start` (NaN if either is not evaluated)."""
    at = lambda e: np.flatnonzero(np.isclose(epochs, e))  # noqa: E731
    a, b = at(start), at(end)
    if not len(a) or not len(b):
        return np.full(values.shape[:-1], np.nan)
    return values[..., b[0]] - values[..., a[0]]


def peak_epoch(values: np.ndarray, epochs: np.ndarray, maximise: bool) -> np.ndarray:
    """The epoch of each trajectory's best finite value (axis -1; ties: the earliest); NaN if none."""
    v = np.where(np.isfinite(values), values if maximise else -values, -np.inf)
    best = np.argmax(v, axis=-1)
    return np.where(np.isfinite(values).any(-1), np.asarray(epochs, float)[best], np.nan)


def peak_lag(x: np.ndarray, y: np.ndarray, epochs: np.ndarray, maximise_x: bool = True, maximise_y: bool = True):
    """log10(epoch of best y) − log10(epoch of best x) per trajectory (epochs > 0 only): negative when
    transfer peaks before intrinsic skill does."""
    keep = np.asarray(epochs, float) > 0
    e = np.asarray(epochs, float)[keep]
    both = np.isfinite(x[..., keep]) & np.isfinite(y[..., keep])
    px = peak_epoch(np.where(both, x[..., keep], np.nan), e, maximise_x)
    py = peak_epoch(np.where(both, y[..., keep], np.nan), e, maximise_y)
    return np.log10(py) - np.log10(px)


def within_correlation(x: np.ndarray, y: np.ndarray, method: str) -> np.ndarray:
    """Each trajectory's correlation over its evaluation points (axis -1; NaN with fewer than 3)."""
    shape = x.shape[:-1]
    x2, y2 = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    finite = np.isfinite(x2) & np.isfinite(y2)
    if finite.all():
        return correlate(x2, y2, method).reshape(shape)
    out = [correlate(a[f], b[f], method) if f.sum() >= 3 else math.nan for a, b, f in zip(x2, y2, finite)]
    return np.asarray(out, float).reshape(shape)


# ---------------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------------
def _maximise(metric: str) -> bool:
    return not metric.endswith("/loss")


def _row(**values) -> dict:
    row = dict.fromkeys(COLUMNS, "")
    row.update(statistic=math.nan, ci_low=math.nan, ci_high=math.nan, p_value=math.nan, p_adjusted=math.nan,
               n_trajectories=0, n_models=0)  # fmt: skip
    row.update(values)
    return row


def _mean_row(values: np.ndarray, confidence: float, *, fisher: bool = False, **labels) -> dict:
    """A t interval and t test over trajectories. `fisher`: the values are correlations, averaged on
    Fisher's z scale and transformed back, so the interval stays inside (−1, 1); the test (mean z = 0)
    and the interval still answer the same question (tanh is monotone and tanh(0) = 0)."""
    if fisher:
        # |r| = 1 (a monotone trajectory under Spearman or Kendall) is clipped to a finite z
        values = np.arctanh(np.clip(np.asarray(values, float), -0.999, 0.999))
    mean, lo, hi, p, n, sd = (float(v) for v in t_mean(values, confidence=confidence))
    if fisher:
        mean, lo, hi = (math.tanh(v) if math.isfinite(v) else v for v in (mean, lo, hi))
    note = labels.pop("note", "")
    if n >= 2 and sd == 0:
        note = "; ".join(filter(None, [note, f"all {int(n)} values equal"]))
    elif n < 2:
        note = "; ".join(filter(None, [note, "fewer than 2 trajectories"]))
    return _row(statistic=mean if n else math.nan, ci_low=lo, ci_high=hi, confidence=confidence,
                test="one-sample t" if math.isfinite(p) else "", p_value=p, n_trajectories=int(n),
                unit="trajectory", note=note, **labels)  # fmt: skip


def _conditions(frame: pd.DataFrame, index: pd.Index) -> tuple[np.ndarray, list[str]]:
    """Condition number per trajectory (over the settings that vary) and those settings' names."""
    cols = [c for c in SETTINGS if c in frame and frame[c].nunique(dropna=False) > 1]
    per = frame.drop_duplicates("trajectory").set_index("trajectory").reindex(index)
    if not cols:
        return np.zeros(len(index), int), []
    return pd.MultiIndex.from_frame(per[cols].astype(str)).factorize()[0], cols


def along_training_rows(points: pd.DataFrame, x: str, y: str, *, change_between: Sequence[float] = (1, 10),
                        methods: Sequence[str] = ("spearman",), confidence: float = 0.95) -> list[dict]:  # fmt: skip
    """The `along_training` rows of one (intrinsic x, transfer y) pair; see the module docstring."""
    grid = points.pivot_table(index="trajectory", columns="epoch", values=[x, y], aggfunc="first", sort=True)
    epochs = np.array(sorted(points["epoch"].astype(float).unique()))
    X = grid[x].reindex(columns=epochs).to_numpy(float)
    Y = grid[y].reindex(columns=epochs).to_numpy(float)
    start, end = change_between
    span = f"{start:g}→{end:g}"
    base = dict(scope="along_training", intrinsic=x, transfer=y)
    n_points = int((np.isfinite(X) & np.isfinite(Y)).sum())
    rows = [
        _mean_row(change(Y, epochs, start, end), confidence, **base, estimand="transfer_change", epochs=span,
                  n_models=0, note=f"{y}(epoch {end:g}) − {y}(epoch {start:g}) per trajectory"),
        _mean_row(change(X, epochs, start, end), confidence, **base, estimand="intrinsic_change", epochs=span,
                  note=f"{x}(epoch {end:g}) − {x}(epoch {start:g}) per trajectory: did intrinsic skill move?"),
        _mean_row(peak_lag(X, Y, epochs, _maximise(x), _maximise(y)), confidence, **base, estimand="peak_lag",
                  epochs="all", n_models=n_points,
                  note="log10 epochs; < 0: transfer peaks before intrinsic skill"),
    ]  # fmt: skip
    for method in methods:
        rows.append(_mean_row(within_correlation(X, Y, method), confidence, fisher=True, **base,
                              estimand="within_correlation", method=method, epochs="all", n_models=n_points,
                              note="averaged on Fisher's z scale; ≈ +1 whenever both rise with training: "
                                   "measures the shared trend"))  # fmt: skip
    return rows


def _across_rows(X, Y, codes, lengths, scope, x, y, methods, confidence) -> list[dict]:
    rows = []
    unit = "trajectory (one model per trajectory and length)"
    for method in methods:
        for j, e in enumerate(lengths):
            cx, cy = (X[:, j], Y[:, j]) if codes is None else (within_conditions(X[:, [j]], codes)[:, 0],
                                                               within_conditions(Y[:, [j]], codes)[:, 0])  # fmt: skip
            rows.append(_corr_row(cx, cy, method, codes, confidence, scope=scope, epochs=f"{e:g}", intrinsic=x,
                                  transfer=y, unit=unit))  # fmt: skip
        sx, sy = combined(X, Y, method, codes)
        rows.append(_corr_row(sx, sy, method, codes, confidence, scope=scope, epochs="all", intrinsic=x, transfer=y,
                              unit=unit, n_models=int((np.isfinite(X) & np.isfinite(Y)).sum()),
                              note=f"standing averaged over lengths {', '.join(f'{e:g}' for e in lengths)}"))  # fmt: skip
    return rows


def _corr_row(cx, cy, method, codes, confidence, **labels) -> dict:
    r, lo, hi, p, n, k = (float(v) for v in across(cx, cy, method, codes, confidence))
    notes = [labels.pop("note", "")]
    c, d = FISHER[method]
    if codes is not None:
        notes.append(f"{int(k) + 1 if n else 0} conditions' means removed")
    if not math.isfinite(r):
        notes.append("fewer than 3 trajectories or constant values" if n >= 3 or codes is None
                     else "fewer than 3 trajectories in conditions with 2+ seeds")  # fmt: skip
    elif not math.isfinite(lo):
        notes.append(f"n − {d} − covariates < 1: no interval")
    labels.setdefault("n_models", int(n))
    return _row(estimand="correlation", method=method, statistic=r, ci_low=lo, ci_high=hi, confidence=confidence,
                test="Fisher z" if math.isfinite(p) else "", p_value=p, n_trajectories=int(n),
                note="; ".join(filter(None, notes)), **labels)  # fmt: skip


def _pooled_rows(pair, x, y, methods, n_boot, rng, confidence, restricted, scope) -> list[dict]:
    n_traj = int(pair["trajectory"].nunique())
    base = dict(scope=scope, estimand="correlation", epochs="all", intrinsic=x, transfer=y, confidence=confidence,
                n_models=len(pair), n_trajectories=n_traj, unit="cell (nested in its trajectory)", role="descriptive",
                restricted_to=restricted)  # fmt: skip
    what = "descriptive: pools lengths, so it includes the common training trend; no test"
    if n_traj < 3:
        return [_row(**base, method=m, note="fewer than 3 trajectories") for m in methods]
    data = Clusters(pair, x, y, "cell_epochs")
    rows = []
    for method in methods:
        r = float(correlate(data.x, data.y, method))
        if not math.isfinite(r):
            rows.append(_row(**base, method=method, note="constant values: no correlation"))
            continue
        lo, hi, note = data.ci(method, n_boot, rng, confidence) if n_boot else (math.nan, math.nan, "n_boot = 0")
        rows.append(_row(**base, method=method, statistic=r, ci_low=lo, ci_high=hi,
                         test="", note="; ".join(filter(None, [what, "trajectory bootstrap (BCa)", note]))))  # fmt: skip
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
    primary_along: str = "transfer_change",
    primary_method: str = "pearson",
    change_between: Sequence[float] = (1, 10),
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    trained_threshold: float | None = None,
    trained_metric: str = "cifake_val/auc",
) -> pd.DataFrame:
    """Every question's rows for every (intrinsic, transfer) pair: `along_training` (needs `points`:
    `trajectory`, `epoch`, the metrics), `across_models`, `across_seeds` (need `cells`: `trajectory`,
    `cell_epochs`, the metrics, and the settings `srm`, `lr`, ... that make a condition) and the
    descriptive `pooled` correlation; see the module docstring for each estimand.

    Columns: `scope` (the question), `estimand`, `method`, `epochs` ("1", "all", "1→10"), `intrinsic`,
    `transfer`, `statistic`, `ci_low`, `ci_high`, `confidence`, `test`, `p_value`, `p_adjusted`,
    `adjustment`, `n_trajectories`, `n_models` (cells or points used), `unit`, `role`, `restricted_to`,
    `note`.

    The primary row of each question (for the first intrinsic and first transfer metric): `along_training`
    by `primary_along` (one of `transfer_change`, `peak_lag`, `within_correlation`; the last with
    `primary_method`), `across_models` and `across_seeds` by `primary_method` over all lengths. Holm
    adjusts the primary p-values, Benjamini–Hochberg the exploratory ones. `n_boot` resamples whole
    trajectories for the pooled interval (0: none). With `trained_threshold`, a `pooled|trained` row
    keeps only cells whose `trained_metric` reaches it. Pass one row per (trajectory, cell_epochs).
    """
    check_methods([*methods, primary_method])
    if primary_along not in ALONG:
        raise ValueError(f"unknown along-training estimand {primary_along!r}; choose from {', '.join(ALONG)}")
    if primary_method not in methods:
        methods = [*methods, primary_method]
    _one_per_trajectory(cells)
    rng = np.random.default_rng(seed)
    rows: list[dict] = []
    lengths = sorted(cells["cell_epochs"].astype(float).unique())
    for x, y in itertools.product(intrinsic, transfer):
        if x not in cells or y not in cells:
            continue
        if points is not None and x in points and y in points:
            rows += along_training_rows(points, x, y, change_between=change_between, methods=methods,
                                        confidence=confidence)  # fmt: skip
        grid = cells.pivot_table(index="trajectory", columns="cell_epochs", values=[x, y], aggfunc="first", sort=False)
        X = grid[x].reindex(columns=lengths).to_numpy(float)
        Y = grid[y].reindex(columns=lengths).to_numpy(float)
        codes, varying = _conditions(cells, grid.index)
        rows += _across_rows(X, Y, None, lengths, "across_models", x, y, methods, confidence)
        seeds = _across_rows(X, Y, codes, lengths, "across_seeds", x, y, methods, confidence)
        for r in seeds:
            r["restricted_to"] = f"within {' × '.join(varying)}" if varying else "one condition: nothing removed"
        rows += seeds
        pair = cells[["trajectory", "cell_epochs", x, y]].copy()
        pair[[x, y]] = pair[[x, y]].astype(float).replace([np.inf, -np.inf], np.nan)
        pair = pair.dropna(subset=[x, y])
        rows += _pooled_rows(pair, x, y, methods, n_boot, rng, confidence, "", "pooled")
        if trained_threshold is not None:
            if trained_metric not in cells:
                raise KeyError(f"trained_threshold needs the metric {trained_metric!r} in the cells")
            kept = pair[cells.loc[pair.index, trained_metric].astype(float) >= trained_threshold]
            rows += _pooled_rows(kept, x, y, methods, n_boot, rng, confidence,
                                 f"{trained_metric} >= {trained_threshold:g}", "pooled|trained")  # fmt: skip
    table = pd.DataFrame(rows, columns=COLUMNS)
    if table.empty:
        return table
    table.loc[table["role"] == "", "role"] = "exploratory"
    first = (table["intrinsic"] == intrinsic[0]) & (table["transfer"] == transfer[0]) if intrinsic and transfer else False
    along = (table["scope"] == "along_training") & (table["estimand"] == primary_along)
    if primary_along == "within_correlation":
        along &= table["method"] == primary_method
    crossed = table["scope"].isin(["across_models", "across_seeds"]) & (table["epochs"] == "all") & (
        table["method"] == primary_method)  # fmt: skip
    table.loc[first & (along | crossed), "role"] = "primary"
    return adjust(table)


def primary_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The primary row of each question, in the order along_training, across_models, across_seeds."""
    order = {"along_training": 0, "across_models": 1, "across_seeds": 2}
    sel = table[table["role"] == "primary"]
    return sel.iloc[np.argsort(sel["scope"].map(order).to_numpy(), kind="stable")]
