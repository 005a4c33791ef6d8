"""What a person reads in the terminal: every line of every table a sweep's analysis prints fits 120
columns, what is constant is said once, long notes once (checked on constructed result tables); Ray's own
lines replaced by fakedet's. All in-process."""

from __future__ import annotations

import logging
import os

import numpy as np
import pandas as pd
import pytest

from fakedet import analysis, report
from fakedet.console import WIDTH, table, wrap
from fakedet.sweep.study import Study

EPOCHS = (0.05, 0.1, 0.25, 0.5, 0.75, 1, 2, 3, 6, 10, 18, 32, 50)  # the stand-in main job's points
METRICS = ("cifake_test/acc", "cifake_test/f1", "cifake_test/auc", "cifake_val/acc", "cifake_val/loss",
           "cifake_val/auc", "cifar100_test/real_recall", "agiri_test/acc", "agiri_test/f1", "agiri_test/auc", "agiri_val/auc")  # fmt: skip


def sweep_tables(srm=("none", "pool1", "pool2"), lrs=(1e-3, 1e-2), seeds=2, cells=(1, 10, 50), seed=0):
    """(points, cells) of a made-up sweep: every trajectory's metrics rise with noise, at EPOCHS."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in srm:
        for lr in lrs:
            for k in range(seeds):
                trajectory = f"{s} lr={lr:g} seed={11 + k}"
                level = rng.normal(0, 0.02)
                for step, e in enumerate(e for e in EPOCHS if e <= max(cells)):
                    progress = 1 - np.exp(-e / 3)
                    row = {"trajectory": trajectory, "srm": s, "lr": lr, "seed": 11 + k, "momentum": 0.9, "batch_size": 32,
                           "epoch": float(e), "step": step}  # fmt: skip
                    for m in METRICS:
                        value = 0.5 + 0.4 * progress + level + rng.normal(0, 0.02)
                        row[m] = 1.5 - value if m.endswith("/loss") else value
                    rows.append(row)
    points = pd.DataFrame(rows)
    cells_table = points[points["epoch"].isin([float(c) for c in cells])].rename(columns={"epoch": "cell_epochs"})
    return points, cells_table.reset_index(drop=True)


def printed(points: pd.DataFrame, cells: pd.DataFrame) -> str:
    """Every table `report.analyse_sweep` prints, computed as it computes them (the study's settings)."""
    study = Study.load("ablation")
    opts, cut, primary = study.statistics, study.cutoff, study.statistics.primary
    intrinsic, transfer = list(study.metrics.intrinsic), list(study.metrics.transfer)
    shown = [c for c in report.SUMMARY_COLUMNS if c in cells]
    epochs = sorted(cells["cell_epochs"].unique())
    summary = analysis.cells_summary(cells, list(dict.fromkeys([*report.SUMMARY_COLUMNS, *intrinsic, *transfer, *cut.report])))
    corr = analysis.correlation_table(cells, points, intrinsic, transfer, primary_along=primary.along_training,
                                      primary_method=primary.correlation, change_between=(epochs[0], epochs[-1]),
                                      n_boot=50, seed=0, confidence=opts.confidence,
                                      trained_threshold=opts.trained_threshold, trained_metric=opts.trained_metric)
    factors = [f for f in ("srm", "cell_epochs", "lr", "seed") if f in cells]
    variance = pd.concat([analysis.variance_decomposition(cells, m, factors).assign(metric=m) for m in transfer],
                         ignore_index=True)
    cutoffs = analysis.cutoff_table(points, select_on=cut.select_on, intrinsic_loss=cut.intrinsic_loss,
                                    intrinsic_acc=cut.intrinsic_acc, patience_epochs=cut.patience_epochs,
                                    fixed_epochs=epochs, report=cut.report)
    comparison = analysis.rule_comparison(cutoffs, cut.report[0], confidence=opts.confidence, primary=primary.rule)
    headlines = [wrap(f"headline: {analysis.headline(r)}") for r in analysis.primary_rows(corr).to_dict("records")]
    first = comparison[comparison["role"] == "primary"].iloc[0]
    return "\n".join([
        report.cells_text(summary, shown, len(cells), cells["trajectory"].nunique()), *headlines,
        report.exploratory_text(corr), report.variance_text(variance),
        report.cutoff_text(analysis.cutoff_summary(cutoffs, cut.report), cut.select_on),
        wrap(f"headline: {analysis.comparison_headline(first)}"), report.comparison_text(comparison, cut.report[0]),
    ])  # fmt: skip


@pytest.mark.parametrize("grid", [
    {},  # the stand-in main job's grid: 3 placements x 2 rates x 2 seeds, cells at 1, 10, 50 epochs
    {"srm": ("none", "pool1"), "lrs": (1e-2,), "seeds": 1, "cells": (1, 2)},  # two trajectories: most rows not computable
    {"srm": ("none", "pool1", "pool2"), "lrs": (1e-4, 1e-3, 1e-2), "seeds": 3, "cells": (1, 10, 50)},  # the full grid
], ids=["standin", "two-trajectories", "full"])  # fmt: skip
def test_every_printed_line_fits_120_columns(grid):
    out = printed(*sweep_tables(**grid))
    wide = [line for line in out.splitlines() if len(line) > WIDTH]
    assert not wide, "\n".join(f"{len(line)}: {line}" for line in wide)
    assert "Empty DataFrame" not in out and "NaN" not in out
    for what in ("cells: mean ± std", "headline: along training", "exploratory:", "share of each transfer metric",
                 "cutoffs: mean ± std", "headline: cutoff", "rules against intrinsic_val_loss"):  # fmt: skip
        assert what in out, what


def test_a_constant_column_is_said_once_above_its_rows():
    points, cells = sweep_tables(srm=("none", "pool1"), lrs=(1e-2,), seeds=3, cells=(1, 2))
    summary = analysis.cells_summary(cells, ["agiri_test/acc"])
    text = report.cells_text(summary, ["agiri_test/acc"], len(cells), 6)
    lines = text.splitlines()
    assert "every row: lr = 0.01; n_seeds = 3" in lines
    header = next(line for line in lines if line.startswith("srm"))
    assert header.split() == ["srm", "epochs", "agiri_test/acc"]  # lr and n_seeds are not columns
    assert sum(line.startswith(("none", "pool1")) for line in lines) == 4


def test_a_variance_table_without_a_share_says_why_in_one_line():
    points, cells = sweep_tables(srm=("none",), lrs=(1e-2, 1e-3), seeds=1, cells=(1,))  # 2 cells, 2 parameters
    variance = analysis.variance_decomposition(cells, "agiri_test/acc", ["srm", "lr"]).assign(metric="agiri_test/acc")
    text = report.variance_text(variance)
    assert text.strip().splitlines()[-1].endswith("no residual left: add seeds or cells)") and "not computable" in text
    assert "Empty DataFrame" not in text and all(len(line) <= WIDTH for line in text.splitlines())


def test_long_notes_become_marks_said_once_below():
    frame = pd.DataFrame({"rule": ["a", "b", "c", "d"], "mean": [0.5, 0.25, np.nan, 1.0],
                          "note": ["all 6 differences equal (+0.0000): no interval"] * 2 + ["", "fewer than 2 trajectories"]})
    frame["n"] = 6
    text = table(frame, "title", keys=["rule"], width=60)
    lines = text.splitlines()
    assert lines[:2] == ["title", "every row: n = 6"]
    rows = {line.split()[0]: line.split() for line in lines[3:7]}
    assert rows["a"][-1] == rows["b"][-1] == "[1]" and rows["d"][-1] == "[2]" and rows["c"] == ["c", "-"]
    assert lines[7:] == ["[1] all 6 differences equal (+0.0000): no interval", "[2] fewer than 2 trajectories"]


def test_columns_that_do_not_fit_continue_in_blocks_that_repeat_the_keys():
    frame = pd.DataFrame({"rule": ["transfer_val", "patience"], **{f"agiri_test/metric_{i}": [0.1 * i, 0.25 + 0.01 * i] for i in range(12)}})
    text = table(frame, keys=["rule"])
    blocks = text.split("\n\n")
    assert len(blocks) >= 2 and all(len(line) <= WIDTH for line in text.splitlines())
    assert all(b.splitlines()[0].startswith("rule") and b.splitlines()[1].startswith("transfer_val") for b in blocks)
    shown = [c for b in blocks for c in b.splitlines()[0].split()[1:]]
    assert shown == [f"agiri_test/metric_{i}" for i in range(12)]  # every column once, in order


def test_wrap_keeps_urls_whole_and_indents_continuations():
    url = "http://127.0.0.1:5000/#/compare-runs?runs=" + "x" * 150
    assert wrap(f"compare: {url}") == f"compare:\n  {url}"
    folded = wrap("headline: " + "word " * 40)
    assert all(len(line) <= WIDTH for line in folded.splitlines()) and folded.splitlines()[1].startswith("  word")


# ---- Ray's own lines ----------------------------------------------------------------------------
def record(logger: str, msg: str, level: int = logging.WARNING) -> logging.LogRecord:
    return logging.makeLogRecord({"name": logger, "msg": msg, "levelno": level, "levelname": logging.getLevelName(level)})


def test_ray_noise_is_replaced_and_real_warnings_pass():
    from fakedet.sweep.execute import RayNoise

    said: list[str] = []
    noise = RayNoise(said.append)
    auth, tune = "ray._private.authentication.authentication_token_setup", "ray.tune.tune"
    assert not noise.filter(record(auth, "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=..."))
    assert noise.filter(record(auth, "Token authentication is disabled for this Ray cluster. Anyone with network access ..."))
    # a trial that failed for good, no interrupt: Tune's error stays
    assert noise.filter(record(tune, "Trials did not complete: [run_trial_00000]", logging.ERROR))
    assert noise.filter(record("ray.tune.analysis.experiment_analysis", "Failed to fetch metrics for 1 trial(s): ..."))
    assert not said
    # Ctrl-C: one line of fakedet's, then Ray's restore hint and its lists of unfinished trials are dropped
    assert not noise.filter(record(tune, "Stop signal received (e.g. via SIGINT/Ctrl+C), ending Ray Tune run. ..."))
    assert said == ["[interrupt] stopping: the running trials save their state once more (Ctrl-C again: stop at once)"]
    assert not noise.filter(record(tune, 'Experiment has been interrupted, but the most recent state was saved.\n'
                                         'Resume experiment with: Tuner.restore(path="/x", trainable=...)'))
    assert not noise.filter(record(tune, "Trials did not complete: [run_trial_00001]", logging.ERROR))
    assert not noise.filter(record("ray.tune.analysis.experiment_analysis",
                                   "Failed to fetch metrics for 1 trial(s):\n- run_trial_00001: FileNotFoundError(...)"))
    assert noise.filter(record(tune, "Trial run_trial_00000 errored after 3 iterations"))  # anything else passes


def test_quiet_ray_keeps_the_users_choice_and_installs_one_filter(monkeypatch):
    from fakedet.sweep.execute import RayNoise, quiet_ray

    monkeypatch.delenv("RAY_AIR_NEW_OUTPUT", raising=False)
    quiet_ray()
    quiet_ray()
    assert os.environ["RAY_AIR_NEW_OUTPUT"] == "0"
    for name in RayNoise.LOGGERS:
        assert sum(isinstance(f, RayNoise) for f in logging.getLogger(name).filters) == 1, name
    monkeypatch.setenv("RAY_AIR_NEW_OUTPUT", "1")
    quiet_ray()
    assert os.environ["RAY_AIR_NEW_OUTPUT"] == "1"
