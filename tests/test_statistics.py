"""Known answers for the analysis (fakedet.analysis): tables built so that the truth is known."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from fakedet.analysis import (
    cells_summary,
    comparison_headline,
    correlate,
    correlation_table,
    cutoff_summary,
    cutoff_table,
    headline,
    patience_stop,
    primary_rows,
    rule_comparison,
    variance_decomposition,
)
from fakedet.analysis.resampling import Clusters
from fakedet.analysis.simulate import Design, simulate_curves, to_tables

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


def row(table, scope, method="pearson", epochs="all", estimand="correlation", x=X, y=Y) -> pd.Series:
    sel = table[(table["scope"] == scope) & (table["method"] == method) & (table["intrinsic"] == x)
                & (table["transfer"] == y) & (table["epochs"] == epochs) & (table["estimand"] == estimand)]  # fmt: skip
    assert len(sel) == 1, (scope, method, epochs, table["scope"].unique())
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


def test_monotone_relation_gives_one_with_a_tight_interval_and_a_small_p():
    x = np.linspace(0.5, 0.95, 36).reshape(12, 3)
    table = correlation_table(cells_table(x, x**3), None, [X], [Y], n_boot=200, seed=0)
    for epochs in ("10", "all"):
        for method in ("spearman", "kendall"):
            r = row(table, "across_models", method, epochs)
            assert r["statistic"] == pytest.approx(1.0) and r["ci_low"] > 0.99 and r["p_value"] < 1e-6
        r = row(table, "across_models", "pearson", epochs)
        assert r["statistic"] > 0.98 and r["ci_low"] > 0.9 and r["test"] == "Fisher z"
    r = row(table, "across_models", "pearson", "all")
    assert (r["n_models"], r["n_trajectories"], r["role"]) == (36, 12, "primary")
    pooled = row(table, "pooled")
    assert (pooled["n_models"], pooled["n_trajectories"], pooled["role"]) == (36, 12, "descriptive")
    assert math.isnan(pooled["p_value"]) and "no test" in pooled["note"]  # a description: an interval, no p


@pytest.mark.slow  # repeated tables through correlation_table; tests/test_calibration.py checks the same vectorised, in seconds
def test_independent_noise_interval_covers_zero_and_agrees_with_its_p():
    rng = np.random.default_rng(2)
    covered, small_p = 0, 0
    for rep in range(40):  # bars 34 and 6: P(fewer covered) = P(more significant) = 0.3% at the 95% level
        x, y = rng.normal(size=(20, 1)), rng.normal(size=(20, 1))
        r = row(correlation_table(cells_table(x, y, epochs=(10,)), None, [X], [Y], methods=("pearson",), n_boot=0),
                "across_models", epochs="10")
        excludes = not (r["ci_low"] <= 0 <= r["ci_high"])
        assert excludes == (r["p_value"] < 0.05)  # one model: interval and test cannot disagree
        covered += not excludes
        small_p += r["p_value"] < 0.05
    assert covered >= 34 and small_p <= 6, (covered, small_p)


def test_nested_cells_count_as_one_model_per_trajectory():
    """9 trajectories × 3 nested cells that are nearly copies of one another: 27 cells carry the
    information of 9 models, and the combined row says n = 9 (a Fisher interval with n = 27 would be
    far narrower)."""
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(9, 1)), rng.normal(size=(9, 1))
    x, y = a + 0.1 * rng.normal(size=(9, 3)), b + 0.1 * rng.normal(size=(9, 3))
    r = row(correlation_table(cells_table(x, y), None, [X], [Y], methods=("pearson",), n_boot=0), "across_models")
    assert (r["n_models"], r["n_trajectories"]) == (27, 9)
    assert r["ci_high"] - r["ci_low"] > 1.0


@pytest.mark.slow  # repeated tables through correlation_table; tests/test_calibration.py checks the same vectorised, in seconds
def test_a_shared_trend_is_not_a_relation_between_models_nor_a_faster_lr():
    """Both metrics rise with training; the largest lr learns ten times faster (both metrics), nothing
    else links them: the pooled correlation is high (a description), the within-condition question
    finds nothing beyond chance, and the across-models question at equal length sees the lr."""
    design = Design(n_srm=3, lrs=(1e-3, 1e-2), seeds=3)
    sim = simulate_curves(np.random.default_rng(4), 20, design, trend="lr", transfer="rise", a_y=0.2)
    significant_seeds, significant_models = 0, 0
    for rep in range(20):
        points, cells = to_tables(sim, rep, design, X, Y)
        table = correlation_table(cells, points, [X], [Y], methods=("pearson",), n_boot=0)
        assert row(table, "pooled")["statistic"] > 0.6
        seeds = row(table, "across_seeds")
        assert seeds["restricted_to"] == "within srm × lr" and seeds["n_trajectories"] == 18
        significant_seeds += seeds["p_value"] < 0.05
        significant_models += row(table, "across_models", epochs="1")["p_value"] < 0.05
    assert significant_seeds <= 3 and significant_models >= 15, (significant_seeds, significant_models)


def test_along_training_shows_a_rise_then_fall_that_a_correlation_hides():
    """Transfer peaks near epoch 1 and falls while intrinsic keeps rising (the planted stand-in's shape):
    the change from 1 to 10 epochs is negative and the peaks are apart, the mean within-trajectory
    correlation cannot say which way."""
    design = Design(n_srm=2, lrs=(1e-2,), seeds=6)
    sim = simulate_curves(np.random.default_rng(5), 1, design, transfer="rise_fall", a_y=0.1)
    points, cells = to_tables(sim, 0, design, X, Y)
    table = correlation_table(cells, points, [X], [Y], methods=("spearman",), n_boot=0)
    change = row(table, "along_training", "", "1→10", "transfer_change")
    assert change["ci_high"] < 0 and change["role"] == "primary" and change["n_trajectories"] == 12
    assert row(table, "along_training", "", "1→10", "intrinsic_change")["ci_low"] > 0
    lag = row(table, "along_training", "", "all", "peak_lag")
    assert lag["ci_high"] < -0.5  # transfer's best epoch at least ~3× earlier than intrinsic's


def points_table(n_traj: int, curve, rng, epochs=DENSE, **settings) -> pd.DataFrame:
    rows = []
    for t in range(n_traj):
        for step, e in enumerate(epochs):
            rows.append({"trajectory": f"t{t}", "epoch": float(e), "step": step + 1, "seed": t, **settings,
                         **curve(float(e), t, rng)})  # fmt: skip
    return pd.DataFrame(rows)


def test_within_trajectory_correlation_and_trained_restriction():
    rng = np.random.default_rng(5)
    x = np.linspace(0.5, 0.9, 27).reshape(9, 3)
    cells = cells_table(x, -x)
    cells["cifake_val/auc"] = np.tile([0.5, 0.8, 0.9], 9)  # the first cell of each trajectory: on the plateau
    cells.loc[cells["cell_epochs"] == 1, X] = 0.5
    points = points_table(9, lambda e, t, r: {X: math.log(e) + r.normal(0, 0.1), Y: -math.log(e) + r.normal(0, 0.1),
                                              "cifake_val/auc": 0.5 if e < 1 else 0.9}, rng)  # fmt: skip
    table = correlation_table(cells, points, [X], [Y], methods=("pearson", "spearman"), n_boot=200,
                              trained_threshold=0.7)  # fmt: skip
    w = row(table, "along_training", "pearson", "all", "within_correlation")
    assert -1 < w["ci_low"] <= w["statistic"] <= w["ci_high"] < 0  # averaged on Fisher's z: inside (-1, 1)
    assert w["statistic"] < -0.95 and (w["n_trajectories"], w["n_models"]) == (9, 9 * len(DENSE))
    assert w["test"] == "one-sample t" and w["p_value"] < 0.05 and w["role"] == "exploratory"
    trained = row(table, "pooled|trained")
    assert (trained["n_models"], trained["n_trajectories"]) == (18, 9) and trained["restricted_to"] == "cifake_val/auc >= 0.7"
    flat = row(table, "across_models", epochs="1")  # accuracy 0.5 everywhere: no correlation, and it says why
    assert math.isnan(flat["statistic"]) and "constant" in flat["note"]


def test_headlines_one_per_question_with_interval_test_and_n():
    design = Design(n_srm=3, lrs=(1e-3, 1e-2), seeds=2)
    points, cells = to_tables(simulate_curves(np.random.default_rng(6), 1, design, rho=0.5), 0, design, X, Y)
    table = correlation_table(cells, points, [X], [Y], n_boot=100)
    primary = primary_rows(table)
    assert list(primary["scope"]) == ["along_training", "across_models", "across_seeds"]
    assert (primary["adjustment"] == "Holm over 3 primary rows").all()
    assert (table.loc[table["role"] == "exploratory", "adjustment"].str.startswith("BH over")).all()
    lines = [headline(r) for r in primary.to_dict("records")]
    assert re.fullmatch(r"along training: change in agiri_test/acc from epoch 1 to 10 \(mean over trajectories\): "
                        r"[+-]\d\.\d{3} \[95% CI [+-]\d\.\d{3}, [+-]\d\.\d{3}\], one-sample t p [=<] [\d.]+; "
                        r"Holm-adjusted [=<] [\d.]+, n = 12 trajectories", lines[0]), lines[0]  # fmt: skip
    assert lines[1].startswith("across models at equal length: Pearson r(cifake_test/acc, agiri_test/acc), standing "
                               "averaged over lengths: ") and "Fisher z p" in lines[1]
    assert lines[2].startswith("across seeds within a condition: Pearson r") and lines[2].endswith("n = 12 trajectories")


@pytest.mark.slow  # repeated tables through correlation_table; tests/test_calibration.py checks the same vectorised, in seconds
def test_table_rows_never_show_an_interval_and_a_p_that_disagree():
    """On null tables (a common trend, condition effects on intrinsic only), every row with a p:
    the interval excludes 0 exactly when p < 0.05."""
    design = Design(n_srm=3, lrs=(1e-3, 1e-2), seeds=2)
    sim = simulate_curves(np.random.default_rng(7), 10, design, condition_x=0.05)
    for rep in range(10):
        points, cells = to_tables(sim, rep, design, X, Y)
        t = correlation_table(cells, points, [X], [Y], n_boot=0)
        t = t[np.isfinite(t["p_value"].astype(float))]
        excludes = (t["ci_low"] > 0) | (t["ci_high"] < 0)
        assert (excludes == (t["p_value"] < 0.05)).all(), t[excludes != (t["p_value"] < 0.05)].to_string()


def test_pooled_bootstrap_groups_unequal_resamples_bit_identically():
    """Trajectories of unequal length (a missing cell): the resamples stacked by size give exactly what
    one correlation per resample gives."""
    rng = np.random.default_rng(8)
    cells = cells_table(rng.normal(size=(7, 3)), rng.normal(size=(7, 3)))
    cells = cells.drop(index=[2, 5]).reset_index(drop=True)  # two trajectories lack their 50-epoch cell
    data = Clusters(cells, X, Y, "cell_epochs")
    picks = rng.integers(0, 7, size=(300, 7))
    rows = data.rows(picks)
    assert isinstance(rows, list)
    for method in ("pearson", "spearman", "kendall"):
        one_by_one = np.array([correlate(data.x[r], data.y[r], method) for r in rows])
        np.testing.assert_array_equal(data.many(rows, method), one_by_one)


def test_vectorised_resamples_equal_the_one_at_a_time_reference_bit_for_bit():
    """Blocks of 1, 2 and 3 cells (cells missing at random): `correlations` (one flat layout, one call per
    resample size) gives exactly what one `correlate` call per resample gives, and what `many(rows)` gives."""
    rng = np.random.default_rng(11)
    cells = cells_table(rng.normal(size=(9, 3)), np.round(rng.normal(size=(9, 3)), 1))  # ties for the ranks
    cells = cells.drop(index=[0, 1, 5, 10, 14, 22]).reset_index(drop=True)
    data = Clusters(cells, X, Y, "cell_epochs")
    assert sorted({len(b) for b in data.blocks}) == [1, 2, 3]
    picks = rng.integers(0, len(data.blocks), size=(500, len(data.blocks)))
    rows = data.rows(picks)
    for method in ("pearson", "spearman", "kendall"):
        one_by_one = np.array([correlate(data.x[r], data.y[r], method) for r in rows])
        fast = data.correlations(picks, method)
        np.testing.assert_array_equal(fast, one_by_one)
        np.testing.assert_array_equal(fast, data.many(rows, method))


def test_pooled_intervals_unchanged_by_the_vectorised_resamples(monkeypatch):
    """The whole table, with unequal blocks in `pooled|trained`: the intervals are equal (==) to those
    of the one-resample-at-a-time reference."""
    rng = np.random.default_rng(12)
    cells = cells_table(rng.normal(size=(8, 3)), rng.normal(size=(8, 3)))
    cells["cifake_val/auc"] = rng.uniform(0.5, 1.0, len(cells))
    kw = dict(trained_threshold=0.7, n_boot=200, seed=3)
    per_trajectory = cells[cells["cifake_val/auc"] >= 0.7].groupby("trajectory").size()
    assert per_trajectory.nunique() > 1  # unequal blocks: the vectorised path is the one exercised
    fast = correlation_table(cells, None, [X], [Y], **kw)
    monkeypatch.setattr(Clusters, "correlations", lambda self, picks, method: self.many(self.rows(picks), method))
    reference = correlation_table(cells, None, [X], [Y], **kw)
    trained = fast["scope"] == "pooled|trained"
    assert trained.sum() == 3 and np.isfinite(fast.loc[trained, "ci_low"].astype(float)).all()
    pd.testing.assert_frame_equal(fast, reference, check_exact=True)


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
    for strata, test, df in ((None, "t over trajectories", 11), (("srm", "lr"), "stratified t (srm × lr)", 8)):
        cmp = rule_comparison(cut, "agiri_test/auc", rules=("transfer_val", "patience"), strata=strata).set_index("rule")
        r = cmp.loc["transfer_val"]
        assert r["n_trajectories"] == 12 and r["ci_low"] > 0.02 and r["n_higher"] == 12
        assert (r["test"], r["df"], r["role"]) == (test, df, "primary") and 0 < r["p_value"] < 0.01
        assert r["mean_diff"] == pytest.approx(r["mean_rule"] - r["mean_baseline"])
        # patience keeps the best loss point: the same as the baseline here, and it says so
        assert cmp.loc["patience", "role"] == "exploratory" and cmp.loc["patience", "note"].startswith("all 12 differences equal")
    line = comparison_headline(cmp.reset_index().iloc[0])
    assert line.startswith("cutoff: transfer_val − intrinsic_val_loss on agiri_test/auc (mean paired difference): +0.")
    assert "stratified t (srm × lr) p < 0.001" in line and line.endswith("n = 12 trajectories")


@pytest.mark.slow  # repeated tables through correlation_table; tests/test_calibration.py checks the same vectorised, in seconds
def test_rule_comparison_finds_nothing_on_null_curves():
    """Transfer flat (noise only): picking its validation maximum gains nothing on test. The t interval
    covers at its level (tests/test_calibration.py): 40 repeats, bars 34 and 5 (P(fewer) < 3% each)."""
    rng = np.random.default_rng(10)
    covered, significant, diffs = 0, 0, []
    for rep in range(40):
        cut = cutoff_table(points_table(12, flat, rng), report=("agiri_test/auc",))
        r = rule_comparison(cut, "agiri_test/auc", rules=("transfer_val",)).iloc[0]
        assert r["test"] == "t over trajectories" and r["n_trajectories"] == 12
        covered += r["ci_low"] <= 0 <= r["ci_high"]
        significant += r["p_value"] < 0.05
        diffs.append(r["mean_diff"])
    assert covered >= 34 and significant <= 5, (covered, significant)
    assert abs(np.mean(diffs)) < 0.004


def test_rule_comparison_says_when_it_cannot_and_never_switches_method():
    rng = np.random.default_rng(12)
    points = pd.concat([points_table(1, flat, rng, srm=s, lr=1e-3).assign(trajectory=s) for s in ("a", "b", "c")])
    cut = cutoff_table(points, report=("agiri_test/auc",))
    same = cut.copy()
    same.loc[same["rule"] == "transfer_val", "agiri_test/auc"] = same.loc[same["rule"] == "intrinsic_val_loss", "agiri_test/auc"].to_numpy()
    r = rule_comparison(same, "agiri_test/auc", rules=("transfer_val",)).iloc[0]
    assert r["note"].startswith("all 3 differences equal") and math.isnan(r["ci_low"]) and math.isnan(r["p_value"])
    # one trajectory per stratum: the stratified t has no degrees of freedom and says so, no fallback
    r = rule_comparison(cut, "agiri_test/auc", rules=("transfer_val",), strata=("srm",)).iloc[0]
    assert r["test"] == "stratified t (srm)" and math.isnan(r["ci_low"]) and "no within-stratum variance" in r["note"]


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


def test_holm_and_bh_equal_statsmodels_multipletests():
    from scipy.stats import false_discovery_control
    from statsmodels.stats.multitest import multipletests

    from fakedet.analysis.summary import holm

    rng = np.random.default_rng(21)
    for m in (1, 2, 3, 7, 40):
        for p in (rng.uniform(size=m), rng.uniform(size=m) ** 4, np.round(rng.uniform(size=m), 1)):  # ties too
            np.testing.assert_allclose(holm(p), multipletests(p, method="holm")[1], rtol=0, atol=1e-15)
            np.testing.assert_allclose(false_discovery_control(p), multipletests(p, method="fdr_bh")[1], rtol=0, atol=1e-15)
