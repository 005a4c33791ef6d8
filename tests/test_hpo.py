"""HPO: the searcher that tells Optuna what ASHA did, the answer read from an Optuna study, the pruned
cell in MLflow, multi-objective studies; in-process on constructed studies and a real SQLite store,
and the smoke sweep once as a user runs it."""

from __future__ import annotations

import math
import subprocess
import tempfile
from types import SimpleNamespace

import numpy as np
import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState
from ray import tune

from fakedet.sweep import hpo
from fakedet.sweep.hpo import Objectives, StudySearch, best_trial, hpo_answer, importances, pareto_front, trials_table
from fakedet.sweep.study import Study, StudyError
from fakedet.sweep.store import SweepTracking
from fakedet.sweep.tracking import MlflowCellCallback

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # set_metric_names: experimental since Optuna 3.2

DISTRIBUTIONS = {"lr": FloatDistribution(1e-4, 1e-1, log=True), "momentum": FloatDistribution(0.5, 0.99),
                 "srm": CategoricalDistribution(["none", "pool1", "pool2", "both"])}


def sampled(rng) -> dict:
    return {"lr": float(10 ** rng.uniform(-4, -1)), "momentum": float(rng.uniform(0.5, 0.99)),
            "srm": str(rng.choice(["none", "pool1", "pool2", "both"]))}


def study_where_lr_matters(n: int, seed: int = 0, pruned: int = 0, failed: int = 0) -> optuna.Study:
    """A study whose value is log10(lr) plus a little noise: lr is the parameter that matters."""
    rng = np.random.default_rng(seed)
    study = optuna.create_study(direction="maximize", study_name="planted")
    study.set_metric_names(["best/agiri_val/auc"])
    for i in range(n + pruned + failed):
        p = sampled(rng)
        attrs = {hpo.ATTR_RAY_TRIAL: f"r{i}", hpo.ATTR_EPOCHS_TRAINED: 10.0, hpo.ATTR_BEST_EPOCH: float(1 + i % 10)}
        if i < n:
            value, state = 0.8 + 0.1 * math.log10(p["lr"]) + rng.normal(0, 0.005), TrialState.COMPLETE
        elif i < n + pruned:
            value, state = 0.3, TrialState.PRUNED
            attrs[hpo.ATTR_EPOCHS_TRAINED] = 1.0
        else:
            value, state = None, TrialState.FAIL
        study.add_trial(optuna.trial.create_trial(params=p, distributions=DISTRIBUTIONS, value=value, state=state,
                                                  user_attrs=attrs, intermediate_values={1: 0.3} if state == TrialState.PRUNED else None))
    return study


def test_the_table_ranks_complete_trials_first_and_the_best_is_optunas():
    study = study_where_lr_matters(6, pruned=2, failed=1)
    table = trials_table(study)
    assert list(table["state"]) == ["complete"] * 6 + ["pruned"] * 2 + ["failed"]
    values = list(table["best/agiri_val/auc"].iloc[:6])
    assert values == sorted(values, reverse=True)
    best = best_trial(study)
    assert best.number == study.best_trial.number == table["trial"].iloc[0]
    assert best.value == pytest.approx(study.best_value) and best.params == study.best_params
    assert best.epoch == study.best_trial.user_attrs[hpo.ATTR_BEST_EPOCH]


def test_importances_find_the_parameter_that_matters_and_state_their_n():
    imp = importances(study_where_lr_matters(16, pruned=3), n_boot=10)
    assert imp.n_trials == 16  # the pruned trials are left out
    assert imp.table["param"].iloc[0] == "lr" and imp.table["importance"].iloc[0] > 0.5
    assert imp.table["importance"].sum() == pytest.approx(1.0)
    assert (imp.table["ci_low"] <= imp.table["ci_high"]).all() and (imp.table["n_boot"] > 0).all()
    assert "n = 16 complete trials" in imp.line()


def test_too_few_trials_for_importances_is_one_line_not_a_failure():
    imp = importances(study_where_lr_matters(2, pruned=1))
    assert imp.table.empty and imp.line().count("\n") == 0
    assert "2 complete trial(s), fANOVA needs at least 3" in imp.line()


def test_the_answer_is_printed_and_logged_to_the_parent_run(tmp_path, capsys):
    tracking = SweepTracking.open(f"sqlite:///{tmp_path / 'mlflow.db'}", "exp", "hpo1", {"kind": "hpo"}, {})
    client = MlflowClient(tracking.uri)
    study = study_where_lr_matters(8, pruned=2)
    hpo_answer(study, client, tracking.parent_run_id, n_boot=5)
    out = capsys.readouterr().out
    best = study.best_trial
    assert f"best trial: #{best.number}, best/agiri_val/auc = {best.value:.4f} at epoch {best.user_attrs['best_epoch']:g}" in out
    assert "parameter importances for best/agiri_val/auc (fANOVA" in out
    assert f"configuration: lr={best.params['lr']:.4g}, momentum={best.params['momentum']:.4g}, srm={best.params['srm']}" in out
    assert max(len(line) for line in out.splitlines()) <= 120
    params = client.get_run(tracking.parent_run_id).data.params
    assert params["best/trial"] == str(best.number) and params["best/srm"] == best.params["srm"]
    assert float(params["best/lr"]) == pytest.approx(best.params["lr"])
    assert params["best/objective"] == "best/agiri_val/auc" and float(params["best/value"]) == pytest.approx(best.value, rel=1e-5)
    names = {a.path for a in client.list_artifacts(tracking.parent_run_id, "hpo")}
    assert {"hpo/top.csv", "hpo/trials.csv", "hpo/importances.csv", "hpo/history.png"} <= names
    with tempfile.TemporaryDirectory() as d:
        top = pd.read_csv(client.download_artifacts(tracking.parent_run_id, "hpo/top.csv", d))
    assert list(top["trial"]) == list(trials_table(study)["trial"].head(hpo.TOP_K))
    # a second answer (a re-analysis) leaves the params written once as they were
    hpo_answer(study_where_lr_matters(8, seed=1), client, tracking.parent_run_id, n_boot=2)
    assert "left as they were" in capsys.readouterr().out
    assert client.get_run(tracking.parent_run_id).data.params["best/trial"] == str(best.number)


def dominated(a, b) -> bool:
    """b dominates a (both maximised)."""
    return all(y >= x for x, y in zip(a, b)) and any(y > x for x, y in zip(a, b))


def test_the_pareto_front_is_the_non_dominated_trials(tmp_path):
    rng = np.random.default_rng(3)
    study = optuna.create_study(directions=["maximize", "maximize"])
    study.set_metric_names(["cifake_val/auc", "agiri_val/auc"])
    for _ in range(25):
        study.add_trial(optuna.trial.create_trial(params=sampled(rng), distributions=DISTRIBUTIONS,
                                                  values=[float(v) for v in rng.uniform(0.5, 1.0, 2)]))
    values = {t.number: t.values for t in study.trials}
    expected = {n for n, v in values.items() if not any(dominated(v, w) for m, w in values.items() if m != n)}
    front = pareto_front(study)
    assert set(front["trial"]) == expected and list(front["cifake_val/auc"]) == sorted(front["cifake_val/auc"])
    tracking = SweepTracking.open(f"sqlite:///{tmp_path / 'mlflow.db'}", "exp", "mo", {"kind": "hpo"}, {})
    client = MlflowClient(tracking.uri)
    answer = hpo_answer(study, client, tracking.parent_run_id, n_boot=2)
    assert len(answer["importances"]) == 2  # one per objective
    names = {a.path for a in client.list_artifacts(tracking.parent_run_id, "hpo")}
    assert {"hpo/pareto.csv", "hpo/pareto.png", "hpo/trials.csv"} <= names
    assert client.get_run(tracking.parent_run_id).data.params["best/pareto_trials"] == ",".join(str(n) for n in front["trial"])


SPACE = {"lr": tune.loguniform(1e-4, 1e-1), "srm": tune.choice(["none", "pool1"])}


def searcher(objectives: Objectives, planned: float = 2.0) -> StudySearch:
    s = StudySearch(objectives, planned, seed=0)
    s.set_search_properties(None if objectives.multi else objectives.keys[0], None if objectives.multi else objectives.modes[0], SPACE)
    return s


def test_a_trial_asha_stopped_is_pruned_in_optuna_and_the_objective_is_named():
    s = searcher(Objectives(("best/agiri_val/auc",), ("max",)))
    study = s._ot_study
    assert study.metric_names == ["best/agiri_val/auc"]
    for tid in ("stopped", "full", "nan"):
        s.suggest(tid)
    s.on_trial_result("stopped", {"best/agiri_val/auc": 0.55, "training_iteration": 1})
    # the result that stops a trial reaches the searcher only here (Ray: on_trial_complete, not on_trial_result)
    s.on_trial_complete("stopped", {"epoch": 1.0, "best/agiri_val/auc": 0.6, "best/agiri_val/auc/epoch": 1.0, "training_iteration": 2})
    s.on_trial_complete("full", {"epoch": 2.0, "best/agiri_val/auc": 0.7, "best/agiri_val/auc/epoch": 1.5, "training_iteration": 4})
    s.on_trial_complete("nan", {"epoch": 2.0, "best/agiri_val/auc": math.nan, "training_iteration": 4})
    trials = {t.user_attrs[hpo.ATTR_RAY_TRIAL]: t for t in study.trials}
    assert trials["stopped"].state == TrialState.PRUNED and trials["stopped"].value == pytest.approx(0.6)
    assert trials["stopped"].user_attrs[hpo.ATTR_EPOCHS_TRAINED] == 1.0
    assert trials["full"].state == TrialState.COMPLETE and trials["full"].value == pytest.approx(0.7)
    assert trials["full"].user_attrs[hpo.ATTR_BEST_EPOCH] == 1.5
    assert trials["nan"].state == TrialState.FAIL


def test_a_diverged_trial_that_ended_early_is_complete_not_pruned():
    s = searcher(Objectives(("best/agiri_val/auc",), ("max",)))
    s.suggest("d")
    s.on_trial_complete("d", {"epoch": 0.5, "diverged": True, "best/agiri_val/auc": 0.52, "training_iteration": 2})
    t = s._ot_study.trials[0]
    assert t.state == TrialState.COMPLETE and t.user_attrs[hpo.ATTR_DIVERGED] is True


def test_a_multi_objective_search_reads_each_metric_at_the_last_point():
    objectives = Objectives.of(Study.load("hpo", overrides={"metrics": {"objective": ["cifake_val/auc", "agiri_val/auc"]}}).metrics)
    assert objectives.keys == ("cifake_val/auc", "agiri_val/auc") and objectives.multi
    s = searcher(objectives)
    assert s._ot_study.metric_names == ["cifake_val/auc", "agiri_val/auc"] and len(s._ot_study.directions) == 2
    s.suggest("a")
    s.on_trial_result("a", {"cifake_val/auc": 0.1, "agiri_val/auc": 0.1, "training_iteration": 1})  # no intermediate values
    s.on_trial_complete("a", {"epoch": 2.0, "cifake_val/auc": 0.9, "agiri_val/auc": 0.6, "training_iteration": 4})
    t = s._ot_study.trials[0]
    assert t.state == TrialState.COMPLETE and t.values == [0.9, 0.6] and t.intermediate_values == {}
    assert isinstance(hpo.scheduler_for(objectives, Study.load("hpo").budget, 2.0), tune.schedulers.FIFOScheduler)


@pytest.mark.parametrize("objective, mode, message", [
    (["agiri_val/auc"], None, "two or more different metrics"),
    (["agiri_val/auc", "agiri_val/auc"], None, "two or more different metrics"),
    (["cifake_val/auc", "agiri_test/auc"], None, "is on a test split"),
    (["cifake_val/auc", "agiri_val/auc"], ["max"], "1 modes for 2 objectives"),
])
def test_the_schema_refuses_a_bad_objective_list(objective, mode, message):
    metrics = {"objective": objective, **({"mode": mode} if mode else {})}
    with pytest.raises(StudyError, match=message):
        Study.load("hpo", overrides={"metrics": metrics})


def test_a_multi_objective_study_trains_without_a_best_so_far_value():
    study = Study.load("hpo", preset="smoke", overrides={"metrics": {"objective": ["cifake_val/loss", "agiri_val/auc"]}})
    assert study.metrics.modes == ("min", "max") and study.hpo_template().objective is None
    assert Study.load("hpo").hpo_template().objective.best_key == "best/agiri_val/auc"


def test_a_pruned_cell_is_killed_tagged_and_named_by_the_epochs_it_trained(tmp_path):
    tracking = SweepTracking.open(f"sqlite:///{tmp_path / 'mlflow.db'}", "exp", "hpo1", {"kind": "hpo"}, {})
    template = Study.load("hpo", preset="smoke").hpo_template()
    cb = MlflowCellCallback(tracking, template, {}, {})
    config = {"lr": 0.01, "momentum": 0.9, "batch_size": 32, "srm": "pool1"}
    last = {"epoch": 1.0, "step": 56, "train/loss": 0.6, "best/agiri_val/auc": 0.6}
    trial = SimpleNamespace(trial_id="t1", config=config, last_result=last)
    cb.on_trial_start(0, [], trial)
    cb.on_trial_result(0, [], trial, last)
    cb.on_trial_complete(0, [], trial)
    assert cb.writer.flush(timeout=60)
    (run,) = tracking.cell_runs()
    assert run.info.status == "KILLED" and run.data.tags["fakedet.status"] == "pruned"
    assert run.data.tags["fakedet.epochs_trained"] == "1"
    assert run.info.run_name == "srm=pool1 ep=1 lr=0.01 seed=11 (pruned of 2)"


def test_the_stores_are_ignored_by_git(repo):
    stores = ["mlflow.db", "mlflow.db.lock", "optuna.db", "mlartifacts/x", "ray_results/x", "checkpoints/model.pt"]
    proc = subprocess.run(["git", "check-ignore", "--no-index", *stores], cwd=repo, capture_output=True, text=True)
    assert sorted(proc.stdout.split()) == sorted(stores), proc.stdout + proc.stderr


@pytest.mark.slow
def test_hpo_smoke(workspace, run):
    """`sweeps/run.py hpo --smoke` as a user runs it: the trials in Optuna and MLflow, and the answer at the end."""
    optuna_db = workspace.root / "optuna.db"
    # a fresh workspace generates the small stand-in first: minutes more on a busy 2-core machine
    proc = run(workspace.args("hpo1", "--optuna-storage", f"sqlite:///{optuna_db}", kind="hpo"), timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    study = optuna.load_study(study_name="hpo1", storage=f"sqlite:///{optuna_db}")
    assert len(study.trials) == 3 and study.metric_names == ["best/agiri_val/auc"]
    c, parent, children = workspace.runs("hpo1")
    assert len(children) == 3
    assert all("agiri_val/auc" in r.data.metrics for r in children)
    # Optuna and ASHA see the best value so far: monotone in training time, never below the latest value
    for r in children:
        best = [m.value for m in sorted(c.get_metric_history(r.info.run_id, "best/agiri_val/auc"), key=lambda m: m.step)]
        latest = [m.value for m in sorted(c.get_metric_history(r.info.run_id, "agiri_val/auc"), key=lambda m: m.step)]
        assert best == sorted(best) and best[-1] == pytest.approx(max(latest))
        assert r.data.metrics["best/agiri_val/auc/epoch"] > 0
    # a trial is pruned in Optuna exactly where its MLflow run is
    by_trial = {r.data.tags["fakedet.trial"]: r for r in children}
    for t in study.trials:
        run_ = by_trial[t.user_attrs[hpo.ATTR_RAY_TRIAL]]
        assert (t.state == TrialState.PRUNED) == (run_.data.tags.get("fakedet.status") == "pruned"), run_.info.run_name
        assert (t.state == TrialState.PRUNED) == (run_.info.status == "KILLED")
    # the answer: best configuration, its objective and epoch, the top table, the importances (or why not)
    answer = out[out.index("HPO answer"):]
    best = study.best_trial
    assert f"best trial: #{best.number}, best/agiri_val/auc = {best.value:.4f} at epoch" in answer
    assert "parameter importances for best/agiri_val/auc" in answer
    assert "Empty DataFrame" not in out
    assert f"sweep hpo1: 3 trials sampled by Optuna" in out
    assert parent.data.params["best/trial"] == str(best.number)
    assert {"hpo/top.csv", "hpo/history.png"} <= {a.path for a in c.list_artifacts(parent.info.run_id, "hpo")}
