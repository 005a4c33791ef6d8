"""The study's views (fakedet.figures) and the sweep loader (fakedet.results), in-process and fast.

The store they read is written by the sweep's own code without Ray: `MlflowCellCallback` is fed the
reports and checkpoints a trial sends (`run_trial`'s shapes), each cell's artifacts come from the
trainable's `write_cell_artifacts` and the analysis from `fakedet.report.analyse_sweep`, which also logs
every view. Only the scores are made up: per evaluation point, logits whose separation grows with
training, so that every metric is computed by `fakedet.metrics` from them. The grid is two placements
× two learning rates × two seeds, trained to 4 epochs with the dense evaluation points: enough to have
replicates, line styles and cutoff rules that disagree.

Every number a view shows is checked against what MLflow holds for the runs themselves, read here
directly through the MLflow client. One slow test runs the views on a real smoke sweep.
"""

from __future__ import annotations

import math
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_hex
from mlflow.tracking import MlflowClient

from fakedet import figures
from fakedet.arrays import ImageSet
from fakedet.results import SweepResults, list_sweeps, load_sweep
from fakedet.sweep.study import Study
from fakedet.sweep.trainable import SWEEP_EVAL_SETS
from fakedet.train import EvalRecord, score

from sweep_store import replay_sweep

SWEEP = "views1"
PLACEMENTS = ("none", "pool1")
LRS = (1e-3, 1e-2)
CELL_EPOCHS = (1.0, 4.0)
GRID = {(s, e) for s in PLACEMENTS for e in CELL_EPOCHS}
POINTS = [0.1, 0.5, 1.0, 2.0, 4.0]  # the smoke preset's 0.5, the cells, and two more for a log axis
STEPS_PER_EPOCH = 20
SET_SIZE = 60
EVAL_SETS = tuple(s for s in SWEEP_EVAL_SETS if s != "cifar100_test_jpeg")  # no view reads the JPEG copy


# ---- the store: a sweep as its callback and analysis write it ------------------------------------
def eval_sets() -> dict[str, ImageSet]:
    """The sweep's evaluation sets, with balanced labels (CIFAR-100: all REAL, 10 fine and 5 coarse classes)."""
    images = np.zeros((SET_SIZE, 32, 32, 3), np.uint8)  # never looked at: the scores are made up
    labels = (np.arange(SET_SIZE) % 2).astype(np.uint8)
    sets = {}
    for name in EVAL_SETS:
        if name.startswith("cifar100"):
            fine = np.arange(SET_SIZE) % 10
            sets[name] = ImageSet(images, np.ones(SET_SIZE, np.uint8), name=name, fine=fine, coarse=fine // 2,
                                  fine_names=tuple(f"fine{i}" for i in range(10)), coarse_names=tuple(f"coarse{i}" for i in range(5)))
        else:
            sets[name] = ImageSet(images, labels, name=name)
    return sets


def made_up_logits(name: str, image_set: ImageSet, srm: str, lr: float, seed: int, epoch: float) -> np.ndarray:
    """Scores a model of that condition might give at `epoch`: CIFAKE separation rises with training (faster
    at the larger rate); AGIRI's peaks near an epoch of the larger rate, then falls; seeds differ by noise."""
    progress = epoch * lr / 1e-2
    rng = np.random.default_rng([seed, int(lr * 1e5), PLACEMENTS.index(srm), round(epoch * 100), EVAL_SETS.index(name)])
    if name.startswith("cifake"):
        skill = 3 * (1 - math.exp(-2 * progress))
    else:
        skill = 2.5 * progress * math.exp(1 - progress) + (0.3 if srm == "pool1" else 0.0)
    sign = 2.0 * image_set.labels - 1 if not image_set.real_only else np.ones(len(image_set))
    return (sign * skill / 2 + rng.normal(0, 1, len(image_set)) - (0.3 if image_set.real_only else 0)).astype(np.float32)


def record_at(trajectory, step: int, sets: dict[str, ImageSet]) -> EvalRecord:
    cfg = trajectory.config
    epoch = step / STEPS_PER_EPOCH
    logits = {name: made_up_logits(name, s, cfg.srm, cfg.lr, cfg.seed, epoch) for name, s in sets.items()}
    metrics = {name: score(sets[name], value) for name, value in logits.items()}
    metrics["train"] = {"loss": 0.1 + 0.6 * math.exp(-epoch * cfg.lr / 1e-2) + 0.01 * (cfg.seed - 11)}
    return EvalRecord(epoch=epoch, step=step, metrics=metrics, elapsed_s=0.01 * step, logits=logits)


def write_store(root: Path) -> tuple[str, Study]:
    """(tracking URI, study) of one small ablation sweep under `root`, analysed, with every view logged."""
    study = Study.load("ablation", preset="smoke", overrides={
        "space": {"srm": list(PLACEMENTS), "lr": list(LRS), "seeds": 2, "epochs": [int(e) for e in CELL_EPOCHS]},
        "budget": {"eval_at": [0.1, 0.5, 2]}, "statistics": {"primary": {"change_between": list(CELL_EPOCHS)}, "n_boot": 200}})
    sets = eval_sets()
    uri = replay_sweep(root, "ablation", SWEEP, study, {"kind": "ablation", "cutoff_select_on": study.cutoff.select_on,
                                   "cutoff_report": list(study.cutoff.report)}, sets,
                       lambda trajectory, step: record_at(trajectory, step, sets), STEPS_PER_EPOCH, list(CELL_EPOCHS))
    return uri, study


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("views"))


@pytest.fixture(scope="module")
def sweep(store):
    """(SweepResults, client, parent run, child runs by run id)."""
    uri, _ = store
    results = load_sweep(uri, SWEEP)
    client = MlflowClient(uri)
    children = client.search_runs([results.parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{results.parent_run_id}'")
    return results, client, results.parent, {r.info.run_id: r for r in children}


def one_seed(results: SweepResults) -> SweepResults:
    """The same sweep with only its first seed: no replicates."""
    return SweepResults(results.parent, results.cells[results.cells["seed"] == 11], results.points[results.points["seed"] == 11],
                        results.client)


def download_csv(client, run_id: str, name: str, **kw) -> pd.DataFrame:
    with tempfile.TemporaryDirectory() as d:
        return pd.read_csv(client.download_artifacts(run_id, name, d), **kw)


def history(client, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def longest_runs(children: dict) -> dict[str, str]:
    """trajectory label -> run id of its longest cell (whose history is the trajectory's points)."""
    runs = {}
    for run in children.values():
        label = run.data.tags["fakedet.trajectory"]
        if float(run.data.params["epochs"]) == max(CELL_EPOCHS):
            runs[label] = run.info.run_id
    return runs


def condition_of(label: str) -> str:
    """`pool1 lr=0.01 seed=11` -> `pool1 lr=0.01`."""
    return label.rsplit(" seed=", 1)[0]


def data_lines(ax) -> dict[str, object]:
    return {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_") and line.get_gid() is None}


# ---- results: finding and loading sweeps --------------------------------------------------------
def test_load_sweep_reads_the_named_sweep(sweep):
    results, c, parent, children = sweep
    assert results.parent_run_id == parent.info.run_id and results.name == SWEEP
    assert len(results.cells) == 16 and set(results.cells["run_id"]) == set(children)
    assert {(r.srm, r.cell_epochs) for r in results.cells.itertuples()} == GRID
    # points: the 4-epoch trajectories' histories
    assert results.points["trajectory"].nunique() == 8
    assert sorted(results.points["epoch"].round(3).unique()) == POINTS


def test_list_sweeps_and_load_by_parent_id(store, sweep):
    uri, _ = store
    results, c, parent, children = sweep
    sweeps = list_sweeps(uri)
    assert list(sweeps.columns) == ["name", "kind", "parent_run_id", "experiment_id", "status", "start_time", "cells"]
    row = sweeps[sweeps["name"] == SWEEP].iloc[0]
    assert (row.parent_run_id, row.cells, row.kind) == (parent.info.run_id, 16, "ablation")
    assert load_sweep(uri, parent.info.run_id).parent_run_id == parent.info.run_id


def test_unknown_sweep_errors_clearly(store, tmp_path):
    from fakedet.results import SweepNotFoundError

    uri, _ = store
    with pytest.raises(SweepNotFoundError, match=rf"no sweep named 'no-such-sweep'.*{SWEEP}"):
        load_sweep(uri, "no-such-sweep")
    missing = tmp_path / "typo.db"
    with pytest.raises(FileNotFoundError, match="no MLflow database"):
        load_sweep(f"sqlite:///{missing}")
    assert not missing.exists()  # MLflow would have created an empty store there


def test_latest_sweep_is_the_most_recently_started(tmp_path):
    """Without a name, load_sweep takes the sweep that started last (a store of bare parent runs)."""
    from fakedet.results import SweepNotFoundError

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


def test_artifact_table_reads_a_cells_csv(sweep):
    results, c, parent, children = sweep
    run_id = next(iter(children))
    table = results.artifact_table(run_id, "cifake_test_thresholds.csv")
    pd.testing.assert_frame_equal(table, download_csv(c, run_id, "cifake_test_thresholds.csv"))
    with pytest.raises(FileNotFoundError, match="no_such.csv"):
        results.artifact_table(run_id, "no_such.csv")


# ---- tables 2-4 ---------------------------------------------------------------------------------
LABELLED = ("acc", "f1", "precision_real", "recall_real", "precision_fake", "recall_fake", "f1_macro", "auc", "loss")


@pytest.mark.parametrize("view, dataset", [("table2", "cifake_test"), ("table4", "agiri_test")])
def test_tables_2_and_4_are_the_cells_final_metrics(sweep, view, dataset):
    results, c, parent, children = sweep
    table = getattr(figures, view)(results)
    assert len(table) == 16
    assert list(table.columns[:4]) == ["srm", "epochs", "lr", "seed"]
    assert {(r.srm, r.epochs) for r in table.itertuples()} == GRID
    for row in table.to_dict("records"):
        run = children[row["run_id"]]
        assert float(run.data.params["epochs"]) == row["epochs"] and run.data.params["srm"] == row["srm"]
        assert float(run.data.params["lr"]) == row["lr"] and int(run.data.params["seed"]) == row["seed"]
        for metric in LABELLED:
            assert row[metric] == pytest.approx(run.data.metrics[f"{dataset}/{metric}"], abs=1e-12), metric
        # the study's "ø" rows
        assert row["precision_macro"] == pytest.approx((row["precision_real"] + row["precision_fake"]) / 2)
        assert row["recall_macro"] == pytest.approx((row["recall_real"] + row["recall_fake"]) / 2)


def test_table2_training_loss_first_and_last(sweep):
    results, c, parent, children = sweep
    for row in figures.table2(results).to_dict("records"):
        losses = history(c, row["run_id"], "train/loss")
        assert row["train_loss_first"] == pytest.approx(losses[min(losses)])
        assert row["train_loss_last"] == pytest.approx(losses[max(losses)])
        assert row["train_loss_last"] == pytest.approx(children[row["run_id"]].data.metrics["train/loss"])


def test_table3_best_and_worst_classes_agree_with_the_run_metrics(sweep):
    results, c, parent, children = sweep
    table = figures.table3(results)
    assert len(table) == 32
    assert list(table.columns) == ["srm", "epochs", "lr", "seed", "real_recall", "rank", "coarse_recall", "coarse_class",
                                   "fine_recall", "fine_class", "run_id"]
    for run_id, rows in list(table.groupby("run_id"))[:4]:
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


# ---- figures: what they show ---------------------------------------------------------------------
def test_figure4_lines_are_condition_means_over_seeds_in_the_first_epoch(sweep):
    from matplotlib.figure import Figure

    results, c, parent, children = sweep
    fig = figures.figure4(results)
    assert isinstance(fig, Figure)
    axes = [ax for ax in fig.get_axes() if ax.axison]
    assert [ax.get_title() for ax in axes] == ["cifake_val/acc", "cifake_val/loss", "train/loss"]
    runs = longest_runs(children)
    for ax in axes:
        lines = data_lines(ax)
        assert set(lines) == {f"{s} lr={lr:g}" for s in PLACEMENTS for lr in LRS}  # one line per condition, not per seed
        for label, line in lines.items():
            seeds = [history(c, run_id, ax.get_title()) for t, run_id in runs.items() if condition_of(t) == label]
            assert len(seeds) == 2
            steps = sorted(s for s in seeds[0] if s <= STEPS_PER_EPOCH)
            np.testing.assert_allclose(line.get_xdata(), np.array(steps) / STEPS_PER_EPOCH)
            np.testing.assert_allclose(line.get_ydata(), [np.mean([h[s] for h in seeds]) for s in steps])
        assert len(ax.collections) == 4  # a ±1 SD band per condition
    assert "mean over n = 2 seeds per condition" in fig._suptitle.get_text()
    fig.savefig(Path(tempfile.mkdtemp()) / "f4.png")  # renders without a display


def test_figure5_default_cells_and_curves(sweep):
    results, c, parent, children = sweep
    picked = figures.figure5_cells(results)
    # the study's base, SRM and mini models: per placement the longest cell, and the 1-epoch base cell
    assert [(r.srm, r.cell_epochs, r.lr, r.seed) for r in picked.itertuples()] == [("none", 4.0, 1e-3, 11), ("pool1", 4.0, 1e-3, 11),
                                                                                  ("none", 1.0, 1e-3, 11)]
    fig = figures.figure5(results, "cifake_test")
    panels = [ax for ax in fig.get_axes() if ax.axison]
    assert len(panels) == 3
    assert [ax.get_title() for ax in panels] == ["srm=none, 4 epochs, lr=0.001, seed 11", "srm=pool1, 4 epochs, lr=0.001, seed 11",
                                                 "srm=none, 1 epoch, lr=0.001, seed 11"]
    for ax, cell in zip(panels, picked.itertuples()):
        expected = download_csv(c, cell.run_id, "cifake_test_thresholds.csv")
        lines = {line.get_label(): line for line in ax.get_lines()}
        np.testing.assert_allclose(lines["accuracy"].get_xdata(), expected["threshold"])
        np.testing.assert_allclose(lines["accuracy"].get_ydata(), expected["acc"])
        np.testing.assert_allclose(lines["recall FAKE"].get_ydata(), expected["recall_fake"])
    assert f"n = {SET_SIZE} images (30 REAL, 30 FAKE)" in fig._suptitle.get_text()
    one = figures.figure5(results, "agiri_test", cells=[picked.run_id.iloc[0]])
    assert len([ax for ax in one.get_axes() if ax.axison]) == 1
    with pytest.raises(FileNotFoundError, match="cifar100_test_thresholds.csv"):
        figures.figure5(results, "cifar100_test")  # real-only: no threshold curves


def test_transfer_scatter_has_one_marker_per_cell_shaped_by_its_epochs(sweep):
    import matplotlib.pyplot as plt

    results, c, parent, children = sweep
    before = plt.get_fignums()
    fig = figures.transfer_scatter(results)
    assert fig.canvas.manager is None and plt.get_fignums() == before  # a bare Figure: no double display, no leak
    ax = fig.get_axes()[0]
    assert ax.get_xlabel().startswith("cifake_test/acc") and ax.get_ylabel().startswith("agiri_test/auc")
    assert "n = 16 models (cells) of 8 trajectories" in fig._suptitle.get_text()
    # one marker per cell, each group a placement at one length, in that placement's colour
    shown = {}
    for coll in ax.collections:
        srm, epochs = coll.get_label().split(", ")
        assert to_hex(coll.get_facecolor()[0]) == figures.placement_colour(srm).lower()
        shown[(srm, epochs)] = sorted(map(tuple, np.asarray(coll.get_offsets(), float)))
    assert set(shown) == {(s, figures.plural(e, "epoch")) for s, e in GRID}
    for (srm, epochs), xy in shown.items():
        expected = sorted((r.data.metrics["cifake_test/acc"], r.data.metrics["agiri_test/auc"]) for r in children.values()
                          if r.data.params["srm"] == srm and figures.plural(float(r.data.params["epochs"]), "epoch") == epochs)
        np.testing.assert_allclose(np.asarray(xy), np.asarray(expected), rtol=1e-6, atol=1e-12)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert {"1 epoch", "4 epochs"} <= set(legend)  # which marker is which length
    with pytest.raises(KeyError, match="no_such/metric"):
        figures.transfer_scatter(results, y="no_such/metric")


def test_seed_spread_states_its_seeds_in_singular_and_plural(sweep):
    results, c, parent, children = sweep
    fig = figures.seed_spread(results)
    ax = next(ax for ax in fig.get_axes() if ax.get_title() == "srm=pool1")
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert {"0.001 (n = 2 seeds)", "0.01 (n = 2 seeds)"} <= set(legend)
    cells = results.finished_cells()
    assert sorted(bars.get_label() for bars in ax.containers) == ["lr=0.001", "lr=0.01"]
    for bars in ax.containers:
        mine = cells[(cells.srm == "pool1") & np.isclose(cells.lr, float(bars.get_label()[3:]))].groupby("cell_epochs")["agiri_test/auc"]
        line = bars.lines[0]
        np.testing.assert_allclose(np.asarray(line.get_xdata(), float), list(CELL_EPOCHS))
        np.testing.assert_allclose(np.asarray(line.get_ydata(), float), mine.mean().to_numpy())
        assert line.get_color() == figures.placement_colour("pool1")
        (segments,) = bars.lines[2]
        np.testing.assert_allclose([seg[1, 1] - seg[0, 1] for seg in segments.get_segments()], 2 * mine.std().to_numpy())  # ±1 SD
    assert "±1 SD over seeds" in fig._suptitle.get_text()
    single = figures.seed_spread(one_seed(results))
    texts = [t.get_text() for t in single.legends[0].get_texts() if t.get_text().startswith("0.0")]
    assert texts == ["0.001 (n = 1 seed)", "0.01 (n = 1 seed)"]
    assert "no bar" in single._suptitle.get_text() and "1–1" not in single._suptitle.get_text()


def test_cutoff_curves_mark_where_each_rule_stopped_each_trajectory(sweep):
    results, c, parent, children = sweep
    fig = figures.cutoff_curves(results)
    axes = [ax for ax in fig.get_axes() if ax.axison]
    assert [ax.get_title() for ax in axes] == figures.cutoff_metrics(results)
    assert figures.cutoff_metrics(results) == ["agiri_test/auc", "agiri_val/auc", "cifake_test/acc", "cifake_val/loss"]
    choices = download_csv(c, parent.info.run_id, "analysis/cutoffs.csv")
    marked = choices[choices["rule"].isin(list(figures.RULE_MARKERS))]
    assert set(marked["rule"]) == set(figures.RULE_MARKERS)
    runs = longest_runs(children)
    for ax in axes:
        assert set(data_lines(ax)) == {f"{s} lr={lr:g}" for s in PLACEMENTS for lr in LRS}
        markers = {line.get_gid(): line for line in ax.get_lines() if line.get_gid()}
        assert len(markers) == len(marked)  # every rule in every trajectory
        for row in marked.itertuples():
            line = markers[f"cutoff/{row.rule}/{row.trajectory}"]
            assert line.get_marker() == figures.RULE_MARKERS[row.rule]
            # at the epoch the rule chose, on that trajectory's own value of the panel's metric
            assert line.get_xdata()[0] == pytest.approx(row.epoch)
            assert line.get_ydata()[0] == pytest.approx(history(c, runs[row.trajectory], ax.get_title())[row.step])
    legend = [t.get_text().split(":")[0] for t in fig.legends[0].get_texts()]
    assert {"cutoff rule stopped here", "transfer_val", "intrinsic_val_loss", "patience", "oracle_test (reference)"} <= set(legend)
    # the analysis's choice is what the rule says: transfer_val is the best agiri_val/auc of its trajectory
    for row in marked[marked["rule"] == "transfer_val"].itertuples():
        values = history(c, runs[row.trajectory], "agiri_val/auc")
        assert values[row.step] == max(values.values())


def test_cutoff_curves_without_an_analysis_say_so(sweep):
    results, c, parent, children = sweep
    bare = SweepResults(results.parent, results.cells, results.points, results.client)
    bare._tables[(results.parent_run_id, "analysis/cutoffs.csv", ())] = pd.DataFrame(columns=["trajectory", "rule", "epoch", "step", "chosen_on"])
    fig = figures.cutoff_curves(bare)
    assert not any(line.get_gid() for ax in fig.get_axes() for line in ax.get_lines())
    assert "rules not marked" in fig._suptitle.get_text()


# ---- figures: how they look ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def all_figures(sweep) -> dict[str, object]:
    """Every figure of VIEWS, drawn once."""
    drawn = {name: view(sweep[0]) for name, view in figures.VIEWS.items() if name.endswith(".png")}
    for fig in drawn.values():
        fig.draw_without_rendering()  # lays the figure out as savefig does
    return drawn


def test_a_placement_has_one_colour_and_a_rate_one_line_style_in_every_figure(sweep, all_figures):
    results = sweep[0]
    colours: dict[str, set] = {s: set() for s in PLACEMENTS}
    dashes: dict[float, set] = {lr: set() for lr in LRS}
    for name, fig in all_figures.items():
        if name.startswith("figure5"):
            continue  # curves are metrics there; the placement colours the panel title
        for ax in fig.get_axes():
            for line in ax.get_lines():
                label = line.get_label()
                for srm in PLACEMENTS:
                    for lr in LRS:
                        if label == f"{srm} lr={lr:g}" or (ax.get_title() == f"srm={srm}" and label.startswith(f"lr={lr:g} ")):
                            colours[srm].add(to_hex(line.get_color()))
                            dashes[lr].add(line.get_linestyle())
            for coll in ax.collections:
                if ", " in str(coll.get_label()):  # the scatter's markers
                    colours[coll.get_label().split(", ")[0]].add(to_hex(coll.get_facecolor()[0]))
    assert all(colours.values()) and all(dashes.values())
    assert {s: c for s, c in colours.items()} == {s: {figures.placement_colour(s).lower()} for s in PLACEMENTS}
    assert {lr: d for lr, d in dashes.items()} == {1e-3: {"-"}, 1e-2: {"--"}}
    # registry order: the same placement gets the same colour in any sweep, whatever it holds
    assert figures.placement_colour("pool1") == figures.PLACEMENT_COLOURS["pool1"] != figures.placement_colour("none")
    fig5 = figures.figure5(results)
    assert {ax.get_title().split(",")[0][4:]: to_hex(ax.title.get_color()) for ax in fig5.get_axes() if ax.axison} == \
        {s: figures.placement_colour(s).lower() for s in PLACEMENTS}


def test_legends_are_readable_and_off_the_data(all_figures):
    for name, fig in all_figures.items():
        renderer = fig._get_renderer()
        legends = list(fig.legends) + [ax.get_legend() for ax in fig.get_axes() if ax.get_legend()]
        if name == "transfer_matrix.png":  # a heatmap: its key is the colour bar, labelled with the unit
            assert any(ax.get_ylabel() or ax.get_xlabel() for ax in fig.get_axes()[1:]), name
            continue
        assert legends, name
        for legend in legends:
            assert min(t.get_fontsize() for t in legend.get_texts()) >= 8, name
        for legend in fig.legends:  # figure legends sit beside or below the panels, never over one
            box = legend.get_window_extent(renderer)
            for ax in fig.get_axes():
                if ax.axison:
                    assert not box.overlaps(ax.get_window_extent(renderer)), (name, ax.get_title())
        assert "n = " in fig._suptitle.get_text(), name  # every figure says how many of what it shows


def test_log_epoch_axes_read_as_plain_numbers(all_figures):
    from matplotlib.figure import Figure

    ax = all_figures["cutoff_curves.png"].get_axes()[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.1", "0.25", "0.5", "1", "2", "4"]
    assert all(t.get_text() == "" for t in ax.get_xticklabels(minor=True))
    ax = Figure().subplots()
    figures.epoch_axis(ax, [0.05, 0.5, 1, 3, 10, 18, 50])  # the main job's range: decades and its longest length
    ax.figure.draw_without_rendering()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.1", "1", "10", "50"]


def test_counts_are_singular_or_plural():
    assert figures.plural(1, "epoch") == "1 epoch" and figures.plural(4.0, "epoch") == "4 epochs"
    assert figures.plural(0.5, "epoch") == "0.5 epochs" and figures.plural(3, "trajectory", "trajectories") == "3 trajectories"
    assert figures.count_range([1, 1], "seed") == "n = 1 seed" and figures.count_range([2, 3, 2], "seed") == "n = 2–3 seeds"
    assert figures.metric_label("agiri_test/auc") == "agiri_test/auc (ROC AUC)"
    assert figures.metric_label("cifake_val/loss") == "cifake_val/loss (BCE, nats per image)"


def test_line_styles_follow_the_rate_rank_and_give_way_to_many_rates():
    look = figures.Look((1e-4, 1e-3, 1e-2))
    assert [look.dash(lr) for lr in (1e-4, 1e-3, 1e-2)] == ["-", "--", ":"]
    many = figures.Look(tuple(np.geomspace(1e-4, 1e-1, 7)))  # an HPO sweep's sampled rates
    assert {many.dash(lr) for lr in many.lrs} == {"-"}
    (_, rates) = many.legend_groups(["none"])[1]
    assert [h.get_label() for h in rates] == ["7 rates: all solid"]
    # placements in registry order, whatever order a sweep lists them in
    assert list(figures.PLACEMENT_COLOURS) == list(figures.PLACEMENTS)
    assert figures.placement_colour("no-longer-registered") == figures.UNKNOWN_PLACEMENT_COLOUR


def test_one_seed_gets_lines_without_bands(sweep):
    fig = figures.cutoff_curves(one_seed(sweep[0]))
    assert all(len(ax.collections) == 0 for ax in fig.get_axes())
    assert "one trajectory each (n = 1 seed per condition, no band)" in fig._suptitle.get_text()
    assert "band" not in [t.get_text() for t in fig.legends[0].get_texts()]


# ---- logged to the parent run -------------------------------------------------------------------
def test_the_analysis_logged_every_view_on_the_parent_run(sweep):
    results, c, parent, children = sweep
    expected = {f"figures/{name}" for name in figures.VIEWS}
    assert {a.path for a in c.list_artifacts(parent.info.run_id, "figures")} == expected  # and no figures/errors.txt
    with tempfile.TemporaryDirectory() as d:
        folder = Path(c.download_artifacts(parent.info.run_id, "figures", d))
        for name in figures.VIEWS:
            data = (folder / name).read_bytes()
            if name.endswith(".png"):
                assert data.startswith(b"\x89PNG") and len(data) > 5000, name
        table2 = pd.read_csv(folder / "table2_cifake_test.csv")
        pd.testing.assert_frame_equal(table2, figures.table2(results), check_dtype=False)
        assert len(pd.read_csv(folder / "table3_cifar100_best_worst.csv")) == 32


def test_log_figures_reports_a_failing_view_and_logs_the_rest(sweep, tmp_path, monkeypatch):
    results = sweep[0]
    target = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")  # a scratch store: the module's stays as the analysis left it
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


# ---- a real sweep -------------------------------------------------------------------------------
@pytest.mark.slow  # reads the shared smoke sweep (about two minutes to make)
def test_every_view_of_a_real_smoke_sweep(workspace, smoke_sweep):
    """The smoke sweep's end logged every view without an error, and the views agree with its runs."""
    c, parent, children = workspace.runs("smoke1")
    results = load_sweep(workspace.tracking_uri, "smoke1")
    assert {a.path for a in c.list_artifacts(parent.info.run_id, "figures")} == {f"figures/{n}" for n in figures.VIEWS}
    for name, view in figures.VIEWS.items():
        view(results)  # each renders from what a real sweep holds
    ax = figures.transfer_scatter(results).get_axes()[0]
    shown = sorted(tuple(p) for coll in ax.collections for p in np.asarray(coll.get_offsets(), float))
    expected = sorted((r.data.metrics["cifake_test/acc"], r.data.metrics["agiri_test/auc"]) for r in children)
    np.testing.assert_allclose(np.asarray(shown), np.asarray(expected), rtol=1e-6, atol=1e-12)
    fig = figures.cutoff_curves(results)
    assert any(line.get_gid() for line in fig.get_axes()[0].get_lines())  # the rules' choices marked
