"""HPO on Ray Tune with Optuna: the searcher that tells Optuna what ASHA did, and the sweep's answer.

`StudySearch` is Ray's `OptunaSearch` with three things it lacks (Ray 2.60): the study names its
objectives (`Study.set_metric_names`, the axis labels optuna-dashboard shows), a trial that ASHA
stopped before its planned epochs is told to Optuna as PRUNED (Ray tells every trial that reported
its metric COMPLETE: `OptunaSearch.on_trial_complete` marks PRUNED only a trial that never reported
one), and each Optuna trial carries the Ray trial id and the epochs it trained, which join it to its
MLflow run.

The answer (`hpo_answer`) is read from the Optuna study at the end of the sweep: the best trial's
configuration, value and epoch, the top-k table, fANOVA parameter importances with the trial count
they rest on, or (several objectives) the Pareto front; printed, and logged to the sweep's parent run
(params `best/*`, artifacts under `hpo/`).
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
from matplotlib.ticker import MaxNLocator
from matplotlib.figure import Figure  # a bare Figure renders with Agg and touches no global pyplot state
from mlflow.entities import Param
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from fakedet.console import say
from fakedet.sweep.study import HpoBudget, Metrics

# Optuna user attributes of each trial (what the MLflow side and the answer read back)
ATTR_RAY_TRIAL = "ray_trial_id"  # = the cell run's `fakedet.trial` tag
ATTR_EPOCHS_TRAINED = "epochs_trained"
ATTR_BEST_EPOCH = "best_epoch"  # single objective: where the best value so far was measured
ATTR_DIVERGED = "diverged"

TOP_K = 5
# fANOVA's forest needs three finished trials to compare more than one split; below, the answer says so
MIN_TRIALS_FOR_IMPORTANCE = 3
# Bootstrap resamples of the trials for the importances' interval, each one fANOVA fit of 16 trees:
# ~0.35 s a fit on a busy 2-core machine, so 50 keep the answer under half a minute.
IMPORTANCE_BOOT = 50
IMPORTANCE_TREES = 16
_EPS = 1e-9


@dataclass(frozen=True)
class Objectives:
    """What Optuna optimises: the Tune result keys it reads, their modes, and the names the study shows.

    One objective: its best value so far (`best/<metric>`, monotone in training time, so ASHA's rungs
    and TPE compare trials at different lengths on the same quantity). Several: each metric at the
    trial's last evaluation point, so each point of the Pareto front is one model (best-so-far values
    of two metrics would come from different epochs)."""

    keys: tuple[str, ...]
    modes: tuple[str, ...]

    @classmethod
    def of(cls, metrics: Metrics) -> "Objectives":
        if metrics.multi_objective:
            return cls(metrics.objectives, metrics.modes)
        return cls((f"best/{metrics.objective}",), metrics.modes)

    @property
    def multi(self) -> bool:
        return len(self.keys) > 1


def _finite(values: list[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


class StudySearch(OptunaSearch):
    """`OptunaSearch` whose study names its objectives and records pruned, failed and diverged trials as such.

    `planned_epochs`: every trial's length; a trial that ends before it, not diverged and not failed,
    was stopped by the scheduler (ASHA) and is told PRUNED, its value the last one it reported (Optuna's
    rule for a pruned trial). A trial whose objective is not finite is told FAIL (Optuna refuses NaN).
    """

    def __init__(self, objectives: Objectives, planned_epochs: float, **kwargs: Any) -> None:
        self._objectives = objectives
        self._planned_epochs = float(planned_epochs)
        if objectives.multi:
            kwargs.update(metric=list(objectives.keys), mode=list(objectives.modes))
        super().__init__(**kwargs)

    def _setup_study(self, mode) -> None:
        super()._setup_study(mode)
        with warnings.catch_warnings():  # experimental since Optuna 3.2, unchanged through 5.0
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self._ot_study.set_metric_names(list(self._objectives.keys))

    def suggest(self, trial_id: str) -> dict | None:
        params = super().suggest(trial_id)
        self._ot_trials[trial_id].set_user_attr(ATTR_RAY_TRIAL, trial_id)
        return params

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials or not result:
            # a trial removed before it reported: Ray's own handling (PRUNED, or FAIL on error)
            return super().on_trial_complete(trial_id, result=result, error=error)
        ot_trial = self._ot_trials[trial_id]
        epoch = result.get("epoch")
        diverged = bool(result.get("diverged"))
        if isinstance(epoch, (int, float)):
            ot_trial.set_user_attr(ATTR_EPOCHS_TRAINED, float(epoch))
        if diverged:
            ot_trial.set_user_attr(ATTR_DIVERGED, True)
        if not self._objectives.multi:
            best_epoch = result.get(f"{self._objectives.keys[0]}/epoch")
            if _finite([best_epoch]):
                ot_trial.set_user_attr(ATTR_BEST_EPOCH, float(best_epoch))
        values = [result.get(k) for k in self._objectives.keys]
        stopped_early = isinstance(epoch, (int, float)) and epoch < self._planned_epochs - _EPS and not diverged
        if error or not _finite(values):
            self._ot_study.tell(ot_trial, state=TrialState.FAIL)
        elif stopped_early and not self._objectives.multi:
            # the value Optuna keeps for a pruned trial is its last intermediate one: report the last result,
            # which Ray sends only here (a result that stops a trial does not reach on_trial_result)
            step = int(result["training_iteration"])
            ot_trial.report(float(values[0]), step)
            self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
        else:
            self._ot_study.tell(ot_trial, values if self._objectives.multi else values[0], state=TrialState.COMPLETE)
        self._completed_trials.add(trial_id)


def scheduler_for(objectives: Objectives, budget: HpoBudget, max_epochs: float) -> TrialScheduler:
    """ASHA on the one objective; several objectives run every trial to its length (FIFO): Ray's
    schedulers take one metric, and a rung ranked on one objective would cut the front on the other
    (Optuna itself prunes only single-objective studies)."""
    if objectives.multi:
        return FIFOScheduler()
    # its metric and mode come from the TuneConfig (Tune refuses them twice)
    return ASHAScheduler(time_attr="epoch", max_t=float(max_epochs), grace_period=float(budget.grace_period), reduction_factor=float(budget.reduction_factor))


# ---------------------------------------------------------------------------------------------------
# the answer, read from the Optuna study
# ---------------------------------------------------------------------------------------------------
STATE_NAMES = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
               TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}


def metric_names(study: optuna.Study) -> list[str]:
    return study.metric_names or [f"objective {i}" for i in range(len(study.directions))]


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """One row per trial, ranked: complete trials by their value (best first), then pruned, failed and
    unfinished ones. Columns: rank, trial (Optuna's number), state, one per objective, epoch (where
    the best value was measured, single objective), trained (epochs), the sampled parameters, ray_trial."""
    names = metric_names(study)
    params = sorted({p for t in study.trials for p in t.params})
    rows = []
    for t in study.trials:
        values = t.values if t.values is not None else [math.nan] * len(names)
        row = {"trial": t.number, "state": STATE_NAMES.get(t.state, t.state.name.lower()),
               **dict(zip(names, values)),
               "epoch": t.user_attrs.get(ATTR_BEST_EPOCH, math.nan),
               "trained": t.user_attrs.get(ATTR_EPOCHS_TRAINED, math.nan),
               **{p: t.params.get(p) for p in params}, "ray_trial": t.user_attrs.get(ATTR_RAY_TRIAL, "")}
        rows.append(row)
    table = pd.DataFrame(rows, columns=["trial", "state", *names, "epoch", "trained", *params, "ray_trial"])
    order = {"complete": 0, "pruned": 1, "failed": 2}
    sign = -1.0 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else 1.0
    table = table.assign(_state=table["state"].map(lambda s: order.get(s, 3)),
                         _value=sign * pd.to_numeric(table[names[0]], errors="coerce").fillna(-sign * np.inf) * 1.0)
    table = table.sort_values(["_state", "_value", "trial"], kind="stable").drop(columns=["_state", "_value"])
    table.insert(0, "rank", range(1, len(table) + 1))
    return table.reset_index(drop=True)


@dataclass(frozen=True)
class BestTrial:
    number: int
    metric: str
    value: float
    epoch: float | None
    trained: float | None
    params: dict[str, Any]
    ray_trial: str | None


def best_trial(study: optuna.Study) -> BestTrial | None:
    """The best complete trial of a single-objective study (None when none completed)."""
    if len(study.directions) != 1 or not any(t.state == TrialState.COMPLETE for t in study.trials):
        return None
    t = study.best_trial
    return BestTrial(t.number, metric_names(study)[0], float(t.value), t.user_attrs.get(ATTR_BEST_EPOCH),
                     t.user_attrs.get(ATTR_EPOCHS_TRAINED), dict(t.params), t.user_attrs.get(ATTR_RAY_TRIAL))


@dataclass(frozen=True)
class Importances:
    """fANOVA importances (normalised to sum 1) of the sampled parameters for one objective, with a
    bootstrap interval; `table` empty and `reason` set when there are too few complete trials."""

    metric: str
    n_trials: int
    table: pd.DataFrame  # param, importance, ci_low, ci_high, n_boot
    reason: str = ""

    def line(self) -> str:
        if self.reason:
            return f"parameter importances for {self.metric}: {self.reason}"
        shown = ", ".join(f"{r.param} {r.importance:.2f} [{r.ci_low:.2f}, {r.ci_high:.2f}]" for r in self.table.itertuples())
        return (f"parameter importances for {self.metric} (fANOVA, share of the objective's variance; n = {self.n_trials} "
                f"complete trials, pruned ones left out; 95% interval over {int(self.table['n_boot'].iloc[0])} bootstrap "
                f"resamples of the trials, a stability check: TPE's trials are not independent draws): {shown}")


def importances(study: optuna.Study, objective: int = 0, n_boot: int = IMPORTANCE_BOOT, seed: int = 0,
                confidence: float = 0.95) -> Importances:
    """fANOVA (`optuna.importance.FanovaImportanceEvaluator`) over the complete trials with a finite value,
    with a percentile interval over bootstrap resamples of those trials."""
    metric = metric_names(study)[objective]
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if _finite([t.values[objective]])]
    params = sorted(set.intersection(*(set(t.params) for t in complete))) if complete else []
    varied = [p for p in params if len({repr(t.params[p]) for t in complete}) > 1]
    empty = pd.DataFrame(columns=["param", "importance", "ci_low", "ci_high", "n_boot"])
    if len(complete) < MIN_TRIALS_FOR_IMPORTANCE:
        return Importances(metric, len(complete), empty,
                           f"not computed: {len(complete)} complete trial(s), fANOVA needs at least {MIN_TRIALS_FOR_IMPORTANCE}")
    if not varied:
        return Importances(metric, len(complete), empty, f"not computed: no parameter varies over the {len(complete)} complete trials")
    with _quiet_optuna():
        point = _fanova(complete, study.directions, varied, objective, seed, 64)  # the estimate: Optuna's default forest
        rng = np.random.default_rng(seed)
        boots = []
        for b in range(n_boot):
            sample = [complete[i] for i in rng.integers(0, len(complete), len(complete))]
            if len({t.number for t in sample}) < 2:
                continue  # one trial repeated: nothing to split on
            try:
                boots.append(_fanova(sample, study.directions, varied, objective, seed + 1 + b, IMPORTANCE_TREES))
            except (ValueError, RuntimeError):  # a resample in which no parameter varies
                continue
    alpha = (1 - confidence) / 2
    rows = []
    for p in sorted(point, key=point.get, reverse=True):
        draws = np.array([bt.get(p, 0.0) for bt in boots]) if boots else np.array([math.nan])
        rows.append({"param": p, "importance": float(point[p]), "ci_low": float(np.nanquantile(draws, alpha)),
                     "ci_high": float(np.nanquantile(draws, 1 - alpha)), "n_boot": len(boots)})
    return Importances(metric, len(complete), pd.DataFrame(rows))


def _fanova(trials: list, directions: list, params: list[str], objective: int, seed: int, n_trees: int) -> dict[str, float]:
    """One fANOVA fit on copies of `trials` (a bootstrap sample repeats some) in a new in-memory study."""
    sub = optuna.create_study(directions=directions)
    sub.add_trials([optuna.trial.create_trial(params=t.params, distributions=t.distributions, values=t.values) for t in trials])
    evaluator = optuna.importance.FanovaImportanceEvaluator(n_trees=n_trees, seed=seed)
    return optuna.importance.get_param_importances(sub, evaluator=evaluator, params=params, target=lambda t: t.values[objective])


@contextlib.contextmanager
def _quiet_optuna():
    """No "A new study created in memory" line per resample."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(verbosity)


def pareto_front(study: optuna.Study) -> pd.DataFrame:
    """The non-dominated complete trials of a multi-objective study (`Study.best_trials`), in the
    trials table's columns, ordered along the first objective."""
    front = {t.number for t in study.best_trials}
    table = trials_table(study)
    table = table[table["trial"].isin(front)].drop(columns=["rank", "epoch"])
    return table.sort_values(metric_names(study)[0], kind="stable").reset_index(drop=True)


# ---------------------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------------------
def history_figure(table: pd.DataFrame, metric: str, maximize: bool, imp: Importances) -> Figure:
    """Left: each trial's objective in the order Optuna proposed it (complete filled, pruned hollow), the
    best complete value so far as a step line. Right: the parameter importances with their interval."""
    fig = Figure(figsize=(11, 4.2))
    ax, bx = fig.subplots(1, 2, width_ratios=[1.6, 1])
    done = table[table["state"] == "complete"].sort_values("trial")
    pruned = table[table["state"] == "pruned"]
    ax.plot(done["trial"], done[metric], "o", color="tab:blue", label=f"complete (n = {len(done)})")
    if len(pruned):
        ax.plot(pruned["trial"], pruned[metric], "o", mfc="none", color="tab:orange",
                label=f"pruned by ASHA (n = {len(pruned)}; value when stopped)")
    if len(done):
        running = done[metric].cummax() if maximize else done[metric].cummin()
        # carried on to the last trial: later pruned or failed trials did not change it
        xs, ys = [*done["trial"], table["trial"].max()], [*running, running.iloc[-1]]
        ax.step(xs, ys, where="post", color="tab:blue", alpha=0.6, label="best complete so far")
    if len(done):
        top = done.loc[done[metric].idxmax() if maximize else done[metric].idxmin()]
        ax.plot([top["trial"]], [top[metric]], "*", ms=14, color="tab:red", label=f"best: trial #{int(top['trial'])}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial (Optuna's order)")
    ax.set_ylabel(f"{metric} (AUC)" if metric.endswith("/auc") else metric)
    ax.set_title(f"{metric}: one value per trial (one seed each: no interval), n = {len(table)} trials", fontsize=9)
    ax.legend(fontsize=8)
    if imp.reason:
        bx.text(0.5, 0.5, imp.reason, ha="center", va="center", wrap=True, fontsize=9, transform=bx.transAxes)
        bx.set_axis_off()
    else:
        t = imp.table.iloc[::-1]
        err = np.vstack([t["importance"] - t["ci_low"], t["ci_high"] - t["importance"]]).clip(min=0)
        bx.barh(t["param"], t["importance"], xerr=err, color="tab:gray", capsize=3)
        bx.set_xlabel("fANOVA importance (share of variance)")
        bx.set_xlim(0, 1)
        bx.set_title(f"n = {imp.n_trials} complete trials; 95% bootstrap interval ({int(t['n_boot'].iloc[0])} resamples)", fontsize=9)
    fig.tight_layout()
    return fig


def pareto_figure(table: pd.DataFrame, front: pd.DataFrame, names: list[str]) -> Figure:
    """The first two objectives of every complete trial, the Pareto front joined and labelled by trial."""
    x, y = names[0], names[1]
    fig = Figure(figsize=(6.4, 5))
    ax = fig.subplots()
    done = table[table["state"] == "complete"]
    ax.plot(done[x], done[y], "o", color="tab:gray", alpha=0.6, label=f"complete trials (n = {len(done)})")
    ax.plot(front[x], front[y], "o-", color="tab:red", label=f"Pareto front (n = {len(front)})")
    for trial, vx, vy in zip(front["trial"], front[x], front[y]):
        ax.annotate(f"#{trial}", (vx, vy), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(f"{x} at the trial's last point")
    ax.set_ylabel(f"{y} at the trial's last point")
    ax.set_title("one model per trial (one seed each: no interval)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------------
# printed, and logged to the parent run
# ---------------------------------------------------------------------------------------------------
def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return "-" if not math.isfinite(v) else f"{v:.4g}"
    return str(v)


def _printable(table: pd.DataFrame) -> str:
    """A table within 120 columns (pandas wraps wider ones into blocks), numbers to 4 significant digits."""
    shown = table.drop(columns=["ray_trial"], errors="ignore")
    return shown.to_string(index=False, formatters={c: _fmt_value for c in shown.columns}, line_width=120)


def _say(text: str) -> None:
    """A sentence of the answer, wrapped to 120 columns."""
    for i, paragraph in enumerate(text.split("\n")):
        say(textwrap.fill(paragraph, width=120, subsequent_indent="  ") if paragraph else "")


def _state_counts(table: pd.DataFrame) -> str:
    counts = table["state"].value_counts()
    return ", ".join(f"{n} {s}" for s, n in counts.items())


def hpo_answer(study: optuna.Study, client: MlflowClient | None = None, parent_run_id: str | None = None,
               top_k: int = TOP_K, n_boot: int = IMPORTANCE_BOOT, seed: int = 0) -> dict[str, Any]:
    """Print the sweep's answer and log it to the parent run (when given). Returns what was logged:
    `params` (`best/*`), `tables` (name -> DataFrame) and `figures` (name -> Figure)."""
    table = trials_table(study)
    names = metric_names(study)
    multi = len(names) > 1
    _say(f"\nHPO answer: Optuna study {study.study_name!r}, {len(table)} trials ({_state_counts(table)})")
    params: dict[str, Any] = {}
    tables: dict[str, pd.DataFrame] = {"trials": table}
    figures: dict[str, Figure] = {}
    if multi:
        front = pareto_front(study)
        tables["pareto"] = front
        _say(f"Pareto front over {' and '.join(names)} (each at the trial's last point; "
            f"{', '.join(d.name.lower() for d in study.directions)}; {len(front)} of "
            f"{int((table['state'] == 'complete').sum())} complete trials; one seed each):")
        say(_printable(front) if len(front) else "no complete trial: no front")
        params["best/pareto_trials"] = ",".join(str(n) for n in front["trial"])
        if len(front):
            figures["pareto"] = pareto_figure(table, front, names)
        imps = [importances(study, i, n_boot=n_boot, seed=seed) for i in range(len(names))]
    else:
        best = best_trial(study)
        maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
        if best is None:
            _say(f"best trial: none completed ({_state_counts(table)})")
        else:
            where = f" at epoch {best.epoch:g}" if best.epoch is not None else ""
            trained = f" of {best.trained:g} trained" if best.trained is not None else ""
            config = ", ".join(f"{k}={_fmt_value(v)}" for k, v in best.params.items())
            _say(f"best trial: #{best.number}, {best.metric} = {best.value:.4f}{where}{trained}\nconfiguration: {config}")
            params.update({"best/trial": best.number, "best/objective": best.metric, "best/value": f"{best.value:.6g}",
                           "best/epoch": "" if best.epoch is None else f"{best.epoch:g}",
                           **{f"best/{k}": v for k, v in best.params.items()}})
        k = min(top_k, len(table))
        tables["top"] = table.head(k)
        _say(f"top {k} of {len(table)} trials (complete ones ranked by {names[0]}; epoch: where that value was measured; "
            f"trained: epochs the trial ran):")
        say(_printable(table.head(k)))
        imps = [importances(study, 0, n_boot=n_boot, seed=seed)]
        figures["history"] = history_figure(table, names[0], maximize, imps[0])
    for imp in imps:
        _say(imp.line())
        if not imp.table.empty:
            tables[f"importances_{imp.metric.replace('/', '_')}" if multi else "importances"] = imp.table
    if client is not None and parent_run_id is not None:
        _log(client, parent_run_id, params, tables, figures)
    return {"params": params, "tables": tables, "figures": figures, "importances": imps}


def _log(client: MlflowClient, run_id: str, params: dict[str, Any], tables: dict[str, pd.DataFrame],
         figures: dict[str, Figure]) -> None:
    """Params `best/*` (those already on the run, from an earlier answer, are left as they are: MLflow
    params are written once), and `hpo/<name>.csv` and `hpo/<name>.png`."""
    logged = client.get_run(run_id).data.params
    new = [Param(k, str(v)) for k, v in params.items() if k not in logged]
    changed = [k for k, v in params.items() if k in logged and logged[k] != str(v)]
    if new:
        client.log_batch(run_id, params=new)
    if changed:
        _say(f"the parent run already holds {', '.join(changed)} from an earlier answer; left as they were")
    with tempfile.TemporaryDirectory(prefix="fakedet-hpo-") as d:
        for name, table in tables.items():
            table.to_csv(Path(d) / f"{name}.csv", index=False)
        for name, fig in figures.items():
            fig.savefig(Path(d) / f"{name}.png", dpi=110, bbox_inches="tight")
        client.log_artifacts(run_id, d, artifact_path="hpo")
    _say(f"logged to the parent run {run_id}: params best/*, hpo/{{{','.join([*tables, *figures])}}}")


def answer_sweep(storage_url: str, study_name: str, client: MlflowClient, parent_run_id: str) -> None:
    """The answer of a finished HPO sweep, from its Optuna study; one line when the study cannot be read."""
    try:
        study = optuna.load_study(study_name=study_name, storage=storage_url)
    except (KeyError, ValueError, ImportError) as e:  # no such study there, or a storage URL that does not open
        _say(f"\nHPO answer: the Optuna study {study_name!r} cannot be read from {storage_url} ({type(e).__name__}: {e})")
        return
    hpo_answer(study, client, parent_run_id)
