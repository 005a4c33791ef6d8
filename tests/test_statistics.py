"""Known answers for the sweep statistics: tables built so that the truth is known."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from fakedet.sweep.statistics import (
    correlate,
    correlation_table,
    cells_summary,
    cutoff_summary,
    cutoff_table,
    headline,
    patience_stop,
    rule_comparison,
    variance_decomposition,
)

X, Y = "cifake_test/acc", "agiri_test/acc"
DENSE = (0.05, 0.1, 0.25, 0.5, 0.75, 1, 2, 3, 6, 10, 18, 32, 50)


def cells_table(x: np.ndarray, y: np.ndarray, epochs=(1, 10, 50)) -> pd.DataFrame:
    """Cells of len(x) trajectories × len(epochs) nested cells; x, y: trajectories × epochs."""
    rows = []
    for t in range(x.shape[0]):
        for j, e in enumerate(epochs):
            rows.append({"trajectory": f"t{t}", "srm": "none", "lr": 1e-3, "seed": t, "cell_epochs": float(e),
                         X: x[t, j], Y: y[t, j]})  # fmt: skip
    return pd.DataFrame(rows)


def row(table, scope, method="pearson", x=X, y=Y) -> pd.Series:
    sel = table[(table["scope"] == scope) & (table["method"] == method) & (table["intrinsic"] == x) & (table["transfer"] == y)]
    assert len(sel) == 1, (scope, method, table["scope"].unique())
    return sel.iloc[0]


# ---------------------------------------------------------------------------------------------------
def test_cells_summary_means_stds_and_seed_counts():
    cells = pd.DataFrame({
        "srm": ["none"] * 3 + ["pool1"], "cell_epochs": [10.0] * 4, "lr": [1e-3] * 4, "seed": [11, 12, 13, 11],
        X: [0.8, 0.9, 1.0, 0.7], Y: [0.5, np.nan, 0.7, 0.6],
    })  # fmt: skip
    out = cells_summary(cells, [X, Y, "not/there"]).set_index("srm")
    assert out.loc["none", "n_seeds"] == 3 and out.loc["pool1", "n_seeds"] == 1
    assert out.loc["none", f"{X}_mean"] == pytest.approx(0.9)
    assert out.loc["none", f"{X}_std"] == pytest.approx(0.1)  # ddof 1
    assert out.loc["none", f"{Y}_mean"] == pytest.approx(0.6)  # NaN skipped
    assert math.isnan(out.loc["pool1", f"{X}_std"])  # one seed: no spread
    assert "not/there_mean" not in out


def test_rowwise_correlations_are_scipys():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(5, 12)), rng.normal(size=(5, 12))
    x[:, :4] = x[:, [0]]  # ties
    for method, fn in (("pearson", stats.pearsonr), ("spearman", stats.spearmanr), ("kendall", stats.kendalltau)):
        got = correlate(x, y, method)
        assert got == pytest.approx([fn(a, b).statistic for a, b in zip(x, y)])
    assert math.isnan(correlate(np.ones(5), np.arange(5.0), "spearman"))


def test_monotone_relation_gives_one_with_a_tight_interval_and_a_p_that_is_not_zero():
    x = np.linspace(0.5, 0.95, 36).reshape(12, 3)
    table = correlation_table(cells_table(x, x**3), None, [X], [Y], n_boot=200, n_perm=199, seed=0)
    for scope in ("epochs=10", "cells"):
        for method in ("spearman", "kendall"):
            r = row(table, scope, method)
            assert r["statistic"] == pytest.approx(1.0) and r["ci_low"] == pytest.approx(1.0)
        r = row(table, scope, "pearson")
        assert r["statistic"] > 0.98 and r["ci_low"] > 0.95
        # never 0: the observed pairing counts among the permutations
        assert r["p_value"] == pytest.approx(2 / 200) and r["p_value_resolution"] == pytest.approx(1 / 200)
    r = row(table, "cells")
    assert (r["n_models"], r["n_trajectories"]) == (36, 12) and r["resampled"].startswith("trajectories")
    assert (row(table, "epochs=1")["n_models"], row(table, "epochs=1")["n_trajectories"]) == (12, 12)


def test_independent_noise_interval_covers_zero_in_most_repeats():
    rng = np.random.default_rng(2)
    covered, small_p = 0, 0
    for rep in range(100):
        x, y = rng.normal(size=(20, 1)), rng.normal(size=(20, 1))
        r = row(correlation_table(cells_table(x, y, epochs=(10,)), None, [X], [Y], methods=("pearson",),
                                  n_boot=200, n_perm=200, seed=rep), "epochs=10")  # fmt: skip
        covered += r["ci_low"] <= 0 <= r["ci_high"]
        small_p += r["p_value"] < 0.05
    assert covered >= 85, covered
    assert small_p <= 12, small_p


def test_nested_cells_do_not_pass_for_independent_models():
    """9 trajectories × 3 nested cells that are nearly copies of one another, no relation between the
    trajectories' intrinsic and transfer levels: 27 cells carry the information of 9 models. The
    trajectory bootstrap says so (wide, covers 0); a bootstrap over cells would be far narrower."""
    rng = np.random.default_rng(3)
    widths, naive_widths, covered, naive_covered, small_p = [], [], 0, 0, 0
    for rep in range(40):
        a, b = rng.normal(size=(9, 1)), rng.normal(size=(9, 1))
        x, y = a + 0.1 * rng.normal(size=(9, 3)), b + 0.1 * rng.normal(size=(9, 3))
        r = row(correlation_table(cells_table(x, y), None, [X], [Y], methods=("pearson",), n_boot=200, n_perm=200,
                                  seed=rep), "cells")  # fmt: skip
        assert (r["n_models"], r["n_trajectories"]) == (27, 9)
        widths.append(r["ci_high"] - r["ci_low"])
        covered += r["ci_low"] <= 0 <= r["ci_high"]
        small_p += r["p_value"] < 0.05
        # what treating the 27 cells as independent would say
        naive = stats.bootstrap((x.ravel(), y.ravel()), lambda u, v, axis: stats.pearsonr(u, v, axis=axis).statistic,
                                paired=True, n_resamples=200, rng=rep).confidence_interval
        naive_widths.append(naive.high - naive.low)
        naive_covered += naive.low <= 0 <= naive.high
    assert np.mean(widths) > 1.0 and np.mean(widths) > 1.4 * np.mean(naive_widths), (np.mean(widths), np.mean(naive_widths))
    assert covered >= 34 and naive_covered < covered, (covered, naive_covered)  # 34 of 40 = 85%
    assert small_p <= 6, small_p


def test_a_shared_trend_over_epochs_is_not_a_relation_between_trajectories():
    """Both metrics rise with training, the trajectories' levels are unrelated: the pooled correlation is
    high, but permuting whole trajectories (epoch by epoch) keeps the trend and finds nothing."""
    rng = np.random.default_rng(4)
    significant = 0
    for rep in range(20):
        trend = np.array([0.0, 1.0, 2.0])
        x = trend + 0.4 * rng.normal(size=(9, 1)) + 0.05 * rng.normal(size=(9, 3))
        y = trend + 0.4 * rng.normal(size=(9, 1)) + 0.05 * rng.normal(size=(9, 3))
        r = row(correlation_table(cells_table(x, y), None, [X], [Y], methods=("spearman",), n_boot=100, n_perm=200,
                                  seed=rep), "cells", "spearman")  # fmt: skip
        assert r["statistic"] > 0.6
        significant += r["p_value"] < 0.05
    assert significant <= 3, significant


def points_table(n_traj: int, curve, rng, epochs=DENSE, **settings) -> pd.DataFrame:
    rows = []
    for t in range(n_traj):
        for step, e in enumerate(epochs):
            rows.append({"trajectory": f"t{t}", "epoch": float(e), "step": step + 1, "seed": t, **settings,
                         **curve(float(e), t, rng)})  # fmt: skip
    return pd.DataFrame(rows)


def test_within_trajectory_scope_and_trained_restriction():
    rng = np.random.default_rng(5)
    x = np.linspace(0.5, 0.9, 27).reshape(9, 3)
    cells = cells_table(x, -x)
    cells["cifake_val/auc"] = np.tile([0.5, 0.8, 0.9], 9)  # the first cell of each trajectory: on the plateau
    cells.loc[cells["cell_epochs"] == 1, X] = 0.5
    points = points_table(9, lambda e, t, r: {X: math.log(e) + r.normal(0, 0.1), Y: -math.log(e) + r.normal(0, 0.1),
                                              "cifake_val/auc": 0.5 if e < 1 else 0.9}, rng)  # fmt: skip
    table = correlation_table(cells, points, [X], [Y], methods=("pearson", "spearman"), n_boot=200, n_perm=600,
                              trained_threshold=0.7)  # fmt: skip
    w = row(table, "within")
    assert w["statistic"] < -0.95 and w["ci_high"] < 0 and (w["n_trajectories"], w["n_models"]) == (9, 9 * len(DENSE))
    # 2**9 = 512 <= 600 sign flips: scipy enumerates them all; the observed one counts, so p > 0
    assert w["p_value"] == pytest.approx(2**-8) and w["p_value_resolution"] == pytest.approx(2**-9)
    trained = row(table, "cells|trained")
    assert (trained["n_models"], trained["n_trajectories"]) == (18, 9) and trained["restricted_to"] == "cifake_val/auc >= 0.7"
    assert row(table, "within|trained")["n_models"] == 9 * sum(e >= 1 for e in DENSE)
    assert "epochs=1|trained" not in set(table["scope"])  # no trained cell at 1 epoch
    flat = row(table, "epochs=1")  # accuracy 0.5 everywhere: no correlation, and it says why
    assert math.isnan(flat["statistic"]) and "constant" in flat["note"]


def test_headline_names_scope_estimate_interval_and_n():
    rng = np.random.default_rng(6)
    a = rng.normal(size=(9, 1))
    x = a + 0.3 * rng.normal(size=(9, 3))
    table = correlation_table(cells_table(x, a + 0.3 * rng.normal(size=(9, 3))), None, [X], [Y], n_boot=200, n_perm=999)
    line = headline(table, X, Y)
    assert re.fullmatch(
        r"Spearman ρ\(cifake_test/acc, agiri_test/acc\), cells pooled, trajectory bootstrap: [+-]\d\.\d\d "
        r"\[95% CI [+-]\d\.\d\d, [+-]\d\.\d\d\], n = 27 models in 9 trajectories, "
        r"permutation p = [\d.e-]+ \(resolution 1/1000\)",
        line,
    ), line
    assert "cells at 10 epochs, model bootstrap" in headline(table, X, Y, method="kendall", scope="epochs=10")
    with pytest.raises(KeyError, match="scopes there"):
        headline(table, X, Y, scope="within")


def test_one_row_per_cell_is_required():
    cells = cells_table(np.zeros((3, 2)), np.zeros((3, 2)), epochs=(1, 1))
    with pytest.raises(ValueError, match="one row per cell"):
        correlation_table(cells, None, [X], [Y])


# ---------------------------------------------------------------------------------------------------
def grid(seeds=2):
    return pd.DataFrame([{"srm": s, "cell_epochs": float(e), "lr": lr, "seed": seed, "batch_size": 32}
                         for s in ("none", "pool1", "pool2") for e in (1, 10, 50) for lr in (1e-4, 1e-3, 1e-2)
                         for seed in range(seeds)])  # fmt: skip


def test_variance_decomposition_recovers_a_planted_factor():
    rng = np.random.default_rng(7)
    cells = grid()
    cells[Y] = cells["srm"].map({"none": 0.5, "pool1": 0.6, "pool2": 0.7}) + rng.normal(0, 0.01, len(cells))
    out = variance_decomposition(cells, Y, factors=("srm", "cell_epochs", "lr", "seed", "batch_size")).set_index("factor")
    assert out.loc["srm", "eta_sq"] > 0.95
    assert out.loc[["cell_epochs", "lr", "seed"], "eta_sq"].max() < 0.02
    assert out.loc["srm", "df"] == 2 and out.loc["srm", "levels"] == 3
    assert out.loc["batch_size", "note"] == "one level: dropped" and math.isnan(out.loc["batch_size", "eta_sq"])
    assert out.loc[["srm", "cell_epochs", "lr", "seed", "Residual"], "eta_sq"].sum() == pytest.approx(1.0)  # balanced


def test_variance_decomposition_says_when_it_cannot():
    cells = grid(seeds=1).iloc[:4]  # none at 1 epoch, 3 rates... and one more: 4 rows
    cells = cells.assign(**{Y: [0.1, 0.2, 0.3, 0.4]})
    out = variance_decomposition(cells, Y, factors=("srm", "cell_epochs", "lr")).set_index("factor")
    assert out.loc["srm", "note"] == "one level: dropped"
    for factor in ("cell_epochs", "lr", "Residual"):  # 1 + 1 + 2 parameters for 4 cells: no residual
        assert out.loc[factor, "note"].startswith("not computable: 4 cells with a finite agiri_test/acc for 4 parameters")
    assert out["eta_sq"].isna().all()


# ---------------------------------------------------------------------------------------------------
def test_patience_is_counted_in_epochs_not_points():
    epochs = list(DENSE)
    loss = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.45, 0.5, 0.41, 0.3, 0.2, 0.1]  # best at 2, then no better until 18
    kept, stopped = patience_stop(epochs, loss, patience_epochs=3)
    assert (epochs[kept], epochs[stopped]) == (2, 6)  # 6 - 2 >= 3; at 3 only 1 epoch had passed
    assert patience_stop(epochs, loss, patience_epochs=100) == (len(epochs) - 1, len(epochs) - 1)  # never stops
    assert patience_stop([1, 2], [math.nan, math.nan], 1) == (-1, -1)


def peaked(e: float, t: int, rng) -> dict:
    """Transfer peaks at epoch 3 and falls, intrinsic loss keeps falling: the planted early-peak answer."""
    transfer = 0.8 - 0.08 * math.log10(e / 3) ** 2
    loss = 0.7 - 0.2 * math.log10(e * 20) + rng.normal(0, 0.005)
    return {"agiri_val/auc": transfer + rng.normal(0, 0.01), "agiri_test/auc": transfer + rng.normal(0, 0.01),
            "cifake_val/loss": loss, "cifake_val/acc": 1 - loss + rng.normal(0, 0.005),
            "cifake_test/acc": 1 - loss + rng.normal(0, 0.005)}  # fmt: skip


def flat(e: float, t: int, rng) -> dict:
    d = peaked(e, t, rng)
    d["agiri_val/auc"], d["agiri_test/auc"] = 0.7 + rng.normal(0, 0.02), 0.7 + rng.normal(0, 0.02)
    return d


def test_cutoff_table_picks_points_and_reports_exactly_there():
    rng = np.random.default_rng(8)
    points = points_table(4, peaked, rng, srm="none", lr=1e-3)
    cut = cutoff_table(points, fixed_epochs=(1, 10, 100), report=("agiri_test/auc", "cifake_test/acc"))
    assert set(cut["rule"]) == {"transfer_val", "intrinsic_val_loss", "intrinsic_val_acc", "patience", "fixed_1",
                                "fixed_10", "oracle_test"}  # no fixed_100: not evaluated  # fmt: skip
    merged = cut.merge(points, on=["trajectory", "step"], suffixes=("", "_at"))
    for m in ("agiri_test/auc", "cifake_test/acc"):
        assert (merged[m] == merged[f"{m}_at"]).all()
    by = cut.set_index(["trajectory", "rule"])
    assert by.loc[("t0", "intrinsic_val_loss"), "epoch"] == 50 and by.loc[("t0", "fixed_10"), "epoch"] == 10
    assert 1 <= by.loc[("t0", "transfer_val"), "epoch"] <= 10
    assert not by.loc[("t0", "oracle_test"), "usable"] and by.loc[("t0", "patience"), "usable"]
    assert by.loc[("t0", "patience"), "stop_epoch"] == 50 and by.loc[("t0", "fixed_1"), "stop_epoch"] == 1
    assert (cut["srm"] == "none").all() and "seed" in cut


def test_cutoffs_are_never_chosen_on_a_test_split():
    points = points_table(2, peaked, np.random.default_rng(0))
    with pytest.raises(ValueError, match="never on a test split: 'agiri_test/auc'"):
        cutoff_table(points, select_on="agiri_test/auc", report=("cifake_test/acc",))


def test_rule_comparison_recovers_an_early_transfer_peak():
    rng = np.random.default_rng(9)
    conditions = [("none", 1e-3), ("none", 1e-2), ("pool1", 1e-3), ("pool1", 1e-2)]  # × 3 seeds each
    points = pd.concat([points_table(3, peaked, rng, srm=s, lr=lr).assign(trajectory=lambda f, s=s, lr=lr: f"{s}-{lr}-" + f["trajectory"])
                        for s, lr in conditions])  # fmt: skip
    cut = cutoff_table(points, report=("agiri_test/auc", "cifake_test/acc"))
    cmp = rule_comparison(cut, "agiri_test/auc", rules=("transfer_val", "patience"), n_boot=500, seed=0,
                          strata=("srm", "lr")).set_index("rule")  # fmt: skip
    r = cmp.loc["transfer_val"]
    assert r["n_trajectories"] == 12 and r["ci_low"] > 0.02 and r["n_higher"] == 12
    assert 0 < r["p_value"] < 0.01 and r["p_value_resolution"] == pytest.approx(1 / 1001)  # 2**12 flips > 1000: drawn
    assert r["resampled"].startswith("trajectories within srm × lr strata")
    assert r["mean_diff"] == pytest.approx(r["mean_rule"] - r["mean_baseline"])


def test_rule_comparison_finds_nothing_on_null_curves():
    """Transfer flat (noise only): picking its validation maximum gains nothing on test. A bootstrap
    interval of a mean over 12 trajectories covers in ~87-89% of repeats (simulated; statistics.py),
    the sign-flip p is exact: so the bars are 30 of 40 and 5 of 40."""
    rng = np.random.default_rng(10)
    covered, significant, diffs = 0, 0, []
    for rep in range(40):
        cut = cutoff_table(points_table(12, flat, rng), report=("agiri_test/auc",))
        r = rule_comparison(cut, "agiri_test/auc", rules=("transfer_val",), n_boot=300, n_perm=300, seed=rep).iloc[0]
        assert r["resampled"] == "trajectories" and r["n_trajectories"] == 12
        covered += r["ci_low"] <= 0 <= r["ci_high"]
        significant += r["p_value"] < 0.05
        diffs.append(r["mean_diff"])
    assert covered >= 30 and significant <= 5, (covered, significant)
    assert abs(np.mean(diffs)) < 0.004


def test_cutoff_summary_uses_the_same_trajectories_for_every_rule():
    rng = np.random.default_rng(11)
    points = points_table(5, peaked, rng)
    points.loc[points["trajectory"] == "t4", "agiri_val/auc"] = np.nan  # transfer_val picks nothing in t4
    short = points_table(1, peaked, rng, epochs=DENSE[:-3]).assign(trajectory="short")  # no fixed_50 there
    cut = cutoff_table(pd.concat([points, short]), fixed_epochs=(1, 50), report=("agiri_test/auc",))
    summary = cutoff_summary(cut, ["agiri_test/auc"]).set_index("rule")
    assert "fixed_50" not in summary.index and "transfer_val" not in summary.index  # not on every trajectory
    assert (summary["n"] == 6).all()
    summary = cutoff_summary(cut, ["agiri_test/auc"], rules=["transfer_val", "intrinsic_val_loss", "fixed_50"])
    assert (summary["n"] == 4).all() and list(summary["rule"]) == ["transfer_val", "intrinsic_val_loss", "fixed_50"]
    inter = cut[cut["trajectory"].isin(["t0", "t1", "t2", "t3"]) & (cut["rule"] == "intrinsic_val_loss")]["agiri_test/auc"]
    assert summary.set_index("rule").loc["intrinsic_val_loss", "agiri_test/auc_mean"] == pytest.approx(inter.mean())
