import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from fakedet.sweep import analysis


def known_curves() -> pd.DataFrame:
    """Two trajectories with curves whose cutoffs can be read off by eye.

    t1: transfer-validation AUC peaks at epoch 1 (index 2), CIFAKE-validation loss is lowest at
    epoch 10 (index 4) and accuracy highest at epoch 20 (index 5); loss stops improving after epoch 10.
    t2: everything improves monotonically, so every rule picks the last point.
    """
    epochs = [0.25, 0.5, 1, 2, 10, 20, 50]
    t1 = pd.DataFrame({
        "trajectory": "t1", "epoch": epochs, "step": [int(e * 100) for e in epochs],
        "agiri_val/auc": [0.55, 0.60, 0.66, 0.62, 0.58, 0.57, 0.56],
        "agiri_test/auc": [0.54, 0.59, 0.64, 0.63, 0.57, 0.56, 0.55],
        "agiri_test/acc": [0.52, 0.55, 0.60, 0.58, 0.54, 0.53, 0.52],
        "cifake_val/loss": [0.69, 0.50, 0.40, 0.30, 0.25, 0.26, 0.27],
        "cifake_val/acc": [0.55, 0.75, 0.80, 0.86, 0.89, 0.90, 0.895],
        "cifake_test/acc": [0.55, 0.74, 0.80, 0.85, 0.88, 0.90, 0.89],
    })
    t2 = t1.copy()
    t2["trajectory"] = "t2"
    for col, inc in (("agiri_val/auc", 1), ("agiri_test/auc", 1), ("agiri_test/acc", 1), ("cifake_val/loss", -1),
                     ("cifake_val/acc", 1), ("cifake_test/acc", 1)):
        t2[col] = np.linspace(0.5, 0.8, len(epochs))[::inc]
    return pd.concat([t1, t2], ignore_index=True)


def test_cutoff_rules_on_known_curves():
    table = analysis.cutoff_table(known_curves(), patience=2, fixed_epochs=(1, 10, 50))
    t1 = table[table.trajectory == "t1"].set_index("rule")
    assert t1.loc["transfer_val", "epoch"] == 1 and t1.loc["transfer_val", "agiri_test/auc"] == 0.64
    assert t1.loc["intrinsic_val_loss", "epoch"] == 10 and t1.loc["intrinsic_val_loss", "agiri_test/auc"] == 0.57
    assert t1.loc["intrinsic_val_acc", "epoch"] == 20
    assert t1.loc["patience_2", "epoch"] == 10  # loss worsens at 20 and 50: stop, keep the best (epoch 10)
    assert t1.loc["fixed_50", "agiri_test/acc"] == 0.52
    assert t1.loc["oracle_test", "epoch"] == 1
    assert t1.loc["transfer_val", "chosen_on"] == "agiri_val/auc"
    t2 = table[table.trajectory == "t2"].set_index("rule")
    assert (t2.loc[["transfer_val", "intrinsic_val_loss", "intrinsic_val_acc", "patience_2"], "epoch"] == 50).all()
    summary = analysis.cutoff_summary(table, ["agiri_test/auc", "agiri_test/acc", "cifake_test/acc"]).set_index("rule")
    assert summary.loc["transfer_val", "epoch_mean"] == pytest.approx((1 + 50) / 2)
    metrics = analysis.cutoff_metrics(summary.reset_index(), ["agiri_test/auc"])
    assert metrics["cutoff/transfer_val/agiri_test_auc"] == pytest.approx((0.64 + 0.8) / 2)


def test_cutoff_never_selects_on_a_test_split_unless_asked_as_oracle():
    curves = known_curves()
    curves["agiri_test/auc"] = curves["agiri_test/auc"][::-1].to_numpy()  # test disagrees with validation
    t1 = analysis.cutoff_table(curves).query("trajectory == 't1'").set_index("rule")
    assert t1.loc["transfer_val", "epoch"] == 1  # still chosen on agiri_val/auc
    assert t1.loc["oracle_test", "epoch"] != 1


def test_cutoff_missing_metric_is_a_clear_error():
    with pytest.raises(KeyError, match="agiri_val/f1"):
        analysis.cutoff_table(known_curves(), select_on="agiri_val/f1")


def test_patience_ties_and_never_stopping():
    assert analysis.patience_stop([3, 2, 2, 2, 1], patience=2) == 1  # equal is no improvement: stops before the 1
    assert analysis.patience_stop([3, 2, 2, 2, 1], patience=3) == 4
    assert analysis.patience_stop([3, 2, 1, 0.5], patience=2) == 3
    assert analysis.patience_stop([0.1, 0.2, 0.3], patience=1, maximise=True) == 2


def test_correlations_match_scipy_and_count_n():
    rng = np.random.default_rng(0)
    x = rng.normal(size=30)
    frame = pd.DataFrame({"i": x, "t": -2 * x + rng.normal(scale=0.5, size=30)})
    frame.loc[3, "t"] = math.nan
    table = analysis.correlations(frame, ["i"], ["t"]).set_index("method")
    ok = frame.dropna()
    assert table.loc["pearson", "statistic"] == pytest.approx(stats.pearsonr(ok.i, ok.t).statistic)
    assert table.loc["spearman", "p_value"] == pytest.approx(stats.spearmanr(ok.i, ok.t).pvalue)
    assert table.loc["kendall", "statistic"] < -0.5
    assert (table["n"] == 29).all()
    metrics = analysis.correlation_metrics(table.reset_index(), "cells")
    assert metrics["corr/cells/spearman/i_vs_t"] == table.loc["spearman", "statistic"]
    assert metrics["corr/cells/n"] == 29


def test_correlations_of_too_few_or_constant_points_are_nan():
    table = analysis.correlations(pd.DataFrame({"i": [1.0, 2.0], "t": [3.0, 4.0]}), ["i"], ["t"])
    assert table["statistic"].isna().all()
    table = analysis.correlations(pd.DataFrame({"i": [1.0, 2.0, 3.0], "t": [1.0, 1.0, 1.0]}), ["i"], ["t"])
    assert table["statistic"].isna().all()
    assert analysis.correlation_metrics(table, "cells") == {"corr/cells/n": 3.0}
