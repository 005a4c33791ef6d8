"""The study's views (fakedet.figures) and the sweep loader (fakedet.results) against the shared smoke sweep.

Every number a view shows is checked against what MLflow holds for the runs themselves: the cells'
metrics, their metric histories and their artifacts, read here directly through the MLflow client.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.slow  # reads the shared smoke sweep (about two minutes to make)


SMOKE_GRID = {("none", 1.0), ("none", 2.0), ("pool1", 1.0), ("pool1", 2.0)}
SMOKE_SEEDS = (11, 12, 13)  # the smoke preset's 3 seeds (sweeps/ablation.toml)
SMOKE_TRAJECTORIES = {f"{srm} lr=0.01 seed={seed}" for srm in ("none", "pool1") for seed in SMOKE_SEEDS}
N_CELLS = len(SMOKE_GRID) * len(SMOKE_SEEDS)


def store(ws) -> str:
    return ws.tracking_uri


@pytest.fixture(scope="module")
def smoke(workspace, smoke_sweep):
    """(SweepResults, client, parent run, child runs by run id) of the shared smoke sweep."""
    from fakedet.results import load_sweep

    c, parent, children = workspace.runs("smoke1")
    return load_sweep(store(workspace), "smoke1"), c, parent, {r.info.run_id: r for r in children}


def download_csv(client, run_id: str, name: str, **kw) -> pd.DataFrame:
    with tempfile.TemporaryDirectory() as d:
        return pd.read_csv(client.download_artifacts(run_id, name, d), **kw)


# ---- results: finding and loading sweeps --------------------------------------------------------
def test_load_sweep_reads_the_named_sweep(smoke):
    results, c, parent, children = smoke
    assert results.parent_run_id == parent.info.run_id and results.name == "smoke1"
    assert len(results.cells) == N_CELLS and set(results.cells["run_id"]) == set(children)
    assert {(r.srm, r.cell_epochs) for r in results.cells.itertuples()} == SMOKE_GRID
    # points: the 2-epoch trajectories' histories, at 0.5, 1 and 2 epochs
    assert results.points["trajectory"].nunique() == len(SMOKE_TRAJECTORIES)
    assert sorted(results.points["epoch"].round(3).unique()) == [0.5, 1.0, 2.0]


def test_list_sweeps_and_load_by_parent_id(workspace, smoke):
    from fakedet.results import list_sweeps, load_sweep

    results, c, parent, children = smoke
    sweeps = list_sweeps(store(workspace))
    assert list(sweeps.columns) == ["name", "kind", "parent_run_id", "experiment_id", "status", "start_time", "cells"]
    row = sweeps[sweeps["name"] == "smoke1"].iloc[0]
    assert (row.parent_run_id, row.status, row.cells, row.kind) == (parent.info.run_id, "FINISHED", N_CELLS, "ablation")
    assert sweeps["start_time"].is_monotonic_decreasing
    assert load_sweep(store(workspace), parent.info.run_id).parent_run_id == parent.info.run_id


def test_unknown_sweep_errors_clearly(workspace, smoke, tmp_path):
    from fakedet.results import SweepNotFoundError, load_sweep

    with pytest.raises(SweepNotFoundError, match=r"no sweep named 'no-such-sweep'.*smoke1"):
        load_sweep(store(workspace), "no-such-sweep")
    missing = tmp_path / "typo.db"
    with pytest.raises(FileNotFoundError, match="no MLflow database"):
        load_sweep(f"sqlite:///{missing}")
    assert not missing.exists()  # MLflow would have created an empty store there


def test_latest_sweep_is_the_most_recently_started(tmp_path):
    """Without a name, load_sweep takes the sweep that started last (a store of bare parent runs)."""
    from mlflow.tracking import MlflowClient

    from fakedet.results import SweepNotFoundError, list_sweeps, load_sweep

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    exp = c.create_experiment("e", artifact_location=(tmp_path / "art").as_uri())
    with pytest.raises(SweepNotFoundError, match="no sweeps"):
        load_sweep(uri)
    # created out of order: start time, not creation order, decides
    for name, start in (("newer", 2_000_000), ("older", 1_000_000)):
        run = c.create_run(exp, run_name=name, start_time=start, tags={"fakedet.kind": "sweep", "fakedet.sweep": name})
        c.set_terminated(run.info.run_id, "FINISHED")
    assert load_sweep(uri).name == "newer"
    assert load_sweep(uri, "older").name == "older"
    assert list(list_sweeps(uri)["name"]) == ["newer", "older"]
    with pytest.raises(SweepNotFoundError, match="newer, older"):
        load_sweep(uri, "newest")


def test_artifact_table_reads_a_cells_csv(smoke):
    results, c, parent, children = smoke
    run_id = next(iter(children))
    table = results.artifact_table(run_id, "cifake_test_thresholds.csv")
    pd.testing.assert_frame_equal(table, download_csv(c, run_id, "cifake_test_thresholds.csv"))
    with pytest.raises(FileNotFoundError, match="no_such.csv"):
        results.artifact_table(run_id, "no_such.csv")


# ---- tables 2-4 ---------------------------------------------------------------------------------
LABELLED = ("acc", "f1", "precision_real", "recall_real", "precision_fake", "recall_fake", "f1_macro", "auc", "loss")


@pytest.mark.parametrize("view, dataset", [("table2", "cifake_test"), ("table4", "agiri_test")])
def test_tables_2_and_4_are_the_cells_final_metrics(smoke, view, dataset):
    from fakedet import figures

    results, c, parent, children = smoke
    table = getattr(figures, view)(results)
    assert len(table) == N_CELLS
    assert list(table.columns[:4]) == ["srm", "epochs", "lr", "seed"]
    assert {(r.srm, r.epochs) for r in table.itertuples()} == SMOKE_GRID
    for row in table.to_dict("records"):
        run = children[row["run_id"]]
        assert float(run.data.params["epochs"]) == row["epochs"] and run.data.params["srm"] == row["srm"]
        assert float(run.data.params["lr"]) == row["lr"] and int(run.data.params["seed"]) == row["seed"]
        for metric in LABELLED:
            assert row[metric] == pytest.approx(run.data.metrics[f"{dataset}/{metric}"], abs=1e-12), metric
        # the study's "ø" rows
        assert row["precision_macro"] == pytest.approx((row["precision_real"] + row["precision_fake"]) / 2)
        assert row["recall_macro"] == pytest.approx((row["recall_real"] + row["recall_fake"]) / 2)


def test_table2_training_loss_first_and_last(smoke):
    from fakedet import figures

    results, c, parent, children = smoke
    for row in figures.table2(results).to_dict("records"):
        history = sorted(c.get_metric_history(row["run_id"], "train/loss"), key=lambda m: m.step)
        assert row["train_loss_first"] == pytest.approx(history[0].value)
        assert row["train_loss_last"] == pytest.approx(history[-1].value)
        assert row["train_loss_last"] == pytest.approx(children[row["run_id"]].data.metrics["train/loss"])


def test_table3_best_and_worst_classes_agree_with_the_run_metrics(smoke):
    from fakedet import figures

    results, c, parent, children = smoke
    table = figures.table3(results)
    assert len(table) == 2 * N_CELLS
    assert list(table.columns) == ["srm", "epochs", "lr", "seed", "real_recall", "rank", "coarse_recall", "coarse_class",
                                   "fine_recall", "fine_class", "run_id"]
    for run_id, rows in table.groupby("run_id"):
        m = children[run_id].data.metrics
        assert list(rows["rank"]) == ["max", "min"]
        best, worst = rows.iloc[0], rows.iloc[1]
        assert best["real_recall"] == pytest.approx(m["cifar100_test/real_recall"])
        for level in ("coarse", "fine"):
            assert best[f"{level}_recall"] == pytest.approx(m[f"cifar100_test/real_recall_{level}_max"])
            assert worst[f"{level}_recall"] == pytest.approx(m[f"cifar100_test/real_recall_{level}_min"])
        # and the class names are those of the per-class recall artifact
        fine = download_csv(c, run_id, "cifar100_test_recall_fine.csv").set_index("class")["real_recall"]
        assert fine[best["fine_class"]] == pytest.approx(best["fine_recall"])
        assert fine[worst["fine_class"]] == pytest.approx(worst["fine_recall"])


# ---- figures ------------------------------------------------------------------------------------
def lines_by_label(ax) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {line.get_label(): (np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)) for line in ax.get_lines()}


def test_figure4_is_the_first_epoch_of_each_trajectory(smoke):
    from matplotlib.figure import Figure

    from fakedet import figures

    results, c, parent, children = smoke
    fig = figures.figure4(results)
    assert isinstance(fig, Figure)
    axes = fig.get_axes()
    assert [ax.get_title() for ax in axes] == ["cifake_val/acc", "cifake_val/loss", "train/loss"]
    longest = {r.data.tags["fakedet.trajectory"]: r for r in children.values() if float(r.data.params["epochs"]) == 2}
    for ax in axes:
        lines = lines_by_label(ax)
        assert set(lines) == SMOKE_TRAJECTORIES  # trajectories named `srm lr seed`
        for label, (x, y) in lines.items():
            run = longest[label]
            history = sorted(c.get_metric_history(run.info.run_id, ax.get_title()), key=lambda m: m.step)
            epochs = sorted(c.get_metric_history(run.info.run_id, "epoch"), key=lambda m: m.step)
            expected = [(e.value, h.value) for e, h in zip(epochs, history) if e.value <= 1]
            assert list(x) == pytest.approx([e for e, _ in expected]) and list(y) == pytest.approx([v for _, v in expected])
    fig.savefig(Path(tempfile.mkdtemp()) / "f4.png")  # renders without a display


def test_figure5_default_cells_and_curves(smoke):
    from fakedet import figures

    results, c, parent, children = smoke
    picked = figures.figure5_cells(results)
    # the study's base, SRM and mini models: per placement the longest cell, and the 1-epoch base cell
    assert [(r.srm, r.cell_epochs) for r in picked.itertuples()] == [("none", 2.0), ("pool1", 2.0), ("none", 1.0)]
    fig = figures.figure5(results, "cifake_test")
    panels = [ax for ax in fig.get_axes() if ax.get_visible() and ax.axison]
    assert len(panels) == 3
    for ax, cell in zip(panels, picked.itertuples()):
        assert ax.get_title() == f"srm={cell.srm}, {cell.cell_epochs:g} epochs, lr={cell.lr:g}"
        expected = download_csv(c, cell.run_id, "cifake_test_thresholds.csv")
        lines = lines_by_label(ax)
        x, y = lines["accuracy"]
        np.testing.assert_allclose(x, expected["threshold"])
        np.testing.assert_allclose(y, expected["acc"])
        np.testing.assert_allclose(lines["recall FAKE"][1], expected["recall_fake"])
    one = figures.figure5(results, "agiri_test", cells=[picked.run_id.iloc[0]])
    assert len([ax for ax in one.get_axes() if ax.axison]) == 1
    with pytest.raises(FileNotFoundError, match="cifar100_test_thresholds.csv"):
        figures.figure5(results, "cifar100_test")  # real-only: no threshold curves


def test_transfer_scatter_has_one_marker_per_cell(smoke):
    import matplotlib.pyplot as plt

    from fakedet import figures

    results, c, parent, children = smoke
    before = plt.get_fignums()
    fig = figures.transfer_scatter(results)
    assert fig.canvas.manager is None and plt.get_fignums() == before  # a bare Figure: no double display, no leak
    ax = fig.get_axes()[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("cifake_test/acc", "agiri_test/auc")
    assert f"{N_CELLS} cells of {len(SMOKE_TRAJECTORIES)} trajectories" in ax.get_title()
    shown = sorted(tuple(p) for coll in ax.collections for p in np.asarray(coll.get_offsets(), float))
    expected = sorted((r.data.metrics["cifake_test/acc"], r.data.metrics["agiri_test/auc"]) for r in children.values())
    # one (x, y) marker per cell; compared as an n x 2 array (pytest.approx refuses nested sequences since pytest 9)
    assert len(shown) == len(expected)
    np.testing.assert_allclose(np.asarray(shown, float), np.asarray(expected, float), rtol=1e-6, atol=1e-12)
    with pytest.raises(KeyError, match="no_such/metric"):
        figures.transfer_scatter(results, y="no_such/metric")


def test_cutoff_curves_and_analysis_tables(smoke):
    from fakedet import figures
    from fakedet import analysis

    results, c, parent, children = smoke
    fig = figures.cutoff_curves(results)
    assert [ax.get_title() for ax in fig.get_axes()] == figures.cutoff_metrics(results)
    # legends name trajectories as people do, not by Ray trial ids
    assert sorted(t.get_text() for t in fig.get_axes()[-1].get_legend().get_texts()) == sorted(SMOKE_TRAJECTORIES)
    assert figures.cutoff_metrics(results) == ["agiri_test/auc", "agiri_val/auc", "cifake_test/acc", "cifake_val/loss"]
    corr = figures.correlation_table(results)
    assert {"pearson", "spearman", "kendall"} == set(corr["method"].dropna())  # along-training changes have none
    assert {"along_training", "across_models", "across_seeds", "pooled"} <= set(corr["scope"])
    pooled = figures.correlation_table(results, "spearman", "pooled")
    assert (pooled["n_models"] == N_CELLS).all() and (pooled["n_trajectories"] == len(SMOKE_TRAJECTORIES)).all()
    # the logged table is what the analysis computes from the cells the views show (same seed: same resamples)
    again = analysis.correlation_table(results.finished_cells(), results.points, ["cifake_test/acc"], ["agiri_test/auc"],
                                       methods=("spearman",), n_boot=1000, seed=0, trained_threshold=0.75)
    mine = again[again["scope"] == "pooled"].iloc[0]
    logged = pooled[(pooled.intrinsic == "cifake_test/acc") & (pooled.transfer == "agiri_test/auc")].iloc[0]
    assert logged["statistic"] == pytest.approx(mine["statistic"], nan_ok=True)
    summary = figures.cutoff_summary(results)
    assert {"transfer_val", "intrinsic_val_loss", "fixed_1", "fixed_2"} <= set(summary["rule"])
    fixed_1 = summary.set_index("rule").loc["fixed_1"]
    one_epoch = [r.data.metrics["cifake_test/acc"] for r in children.values() if float(r.data.params["epochs"]) == 1]
    assert fixed_1["cifake_test/acc_mean"] == pytest.approx(np.mean(one_epoch))
    seeds = figures.cells_summary(results)
    assert (seeds["n_seeds"] == len(SMOKE_SEEDS)).all() and len(seeds) == len(SMOKE_GRID)
    assert set(figures.cutoff_comparison(results)["rule"]) >= {"transfer_val"}


# ---- logged to the parent run -------------------------------------------------------------------
def test_log_figures_puts_every_view_on_the_parent_run(smoke):
    from fakedet import figures

    results, c, parent, children = smoke
    logged = figures.log_figures(results, c, parent.info.run_id)
    expected = {f"figures/{name}" for name in figures.VIEWS}
    assert set(logged) == expected  # and no figures/errors.txt
    assert {a.path for a in c.list_artifacts(parent.info.run_id, "figures")} == expected
    with tempfile.TemporaryDirectory() as d:
        folder = Path(c.download_artifacts(parent.info.run_id, "figures", d))
        for name in figures.VIEWS:
            data = (folder / name).read_bytes()
            if name.endswith(".png"):
                assert data.startswith(b"\x89PNG") and len(data) > 5000, name
        table2 = pd.read_csv(folder / "table2_cifake_test.csv")
        pd.testing.assert_frame_equal(table2, figures.table2(results), check_dtype=False)
        assert len(pd.read_csv(folder / "table3_cifar100_best_worst.csv")) == 2 * N_CELLS


def test_log_figures_reports_a_failing_view_and_logs_the_rest(smoke, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from fakedet import figures

    results = smoke[0]
    target = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")  # a scratch store: the shared one stays as the sweep left it
    run = target.create_run(target.create_experiment("scratch", artifact_location=(tmp_path / "art").as_uri()))

    def broken(_):
        raise KeyError("agiri_test/auc")

    monkeypatch.setattr(figures, "VIEWS", {"table2_cifake_test.csv": figures.table2, "broken.png": broken})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logged = figures.log_figures(results, target, run.info.run_id)
    assert logged == ["figures/table2_cifake_test.csv", "figures/errors.txt"]
    assert any("broken.png" in str(w.message) for w in caught)
    with tempfile.TemporaryDirectory() as d:
        text = Path(target.download_artifacts(run.info.run_id, "figures/errors.txt", d)).read_text()
    assert "broken.png: KeyError" in text and "agiri_test/auc" in text
