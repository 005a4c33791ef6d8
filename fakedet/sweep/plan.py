"""A sweep's plan: the study file with its preset and command-line overrides, checked, and expanded into
the `TrialSpec`s Ray will run. Everything that can be wrong with a request is found here, before data,
Ray or MLflow are touched; the trials are built once, bundled for the resources each trial gets."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Callable

from ray import tune

from fakedet.bundle import bundle_key
from fakedet.sweep.request import SweepRequest
from fakedet.sweep.spec import TRIAL_KEY, FaultInjection, Trajectory, TrialSpec
from fakedet.sweep.study import SECTIONS, Budget, HpoFile, Study, StudyError

SAMPLERS = {"loguniform": tune.loguniform, "uniform": tune.uniform, "choice": tune.choice, "randint": tune.randint}


@dataclass(frozen=True)
class SweepPlan:
    kind: str
    study: Study
    name: str
    trials: tuple[TrialSpec, ...]
    """Ablation: one spec per trial, known up front. HPO: empty; trials are `template` with sampled values."""
    template: TrialSpec | None
    param_space: dict[str, Any]
    total_trials: int
    resources: dict[str, float]
    """what each trial asks Ray for"""
    bundle: int = 1
    """trajectories per trial at most (ablation; recorded, so a resumed sweep rebuilds the same trials)"""

    @property
    def trajectory_count(self) -> int:
        return sum(len(t.trajectories) for t in self.trials) if self.trials else self.total_trials

    @property
    def cell_count(self) -> int:
        if self.trials:
            return sum(len(t.cells) for t in self.trials)
        return self.total_trials * len(self.template.cells)

    @property
    def cell_epochs(self) -> tuple[float, ...]:
        first = self.trials[0] if self.trials else self.template
        return first.trajectories[0].cell_epochs

    def with_faults(self, faults: FaultInjection) -> "SweepPlan":
        """Every trial with the same fault injection (tests of retry-from-checkpoint)."""
        trials = tuple(replace(t, faults=faults) for t in self.trials)
        template = replace(self.template, faults=faults) if self.template else None
        space = {TRIAL_KEY: tune.grid_search(list(trials))} if trials else self.param_space
        return replace(self, trials=trials, template=template, param_space=space)


def resolve_study(request: SweepRequest) -> Study:
    """The request's study file, read once: `--smoke` takes the smoke preset, the built-in stand-in takes
    `standin` where the study has one; the command line's flags are merged over it."""
    study = Study.load(request.study_path, preset="smoke" if request.smoke else None, overrides=request.overrides() or None,
                       preset_if_present="standin" if request.data == "synthetic" else None)
    if study.kind != request.kind:
        raise StudyError(f"{study.source} is a {study.kind} study; run it with `sweeps/run.py {study.kind}`")
    return study


def study_differences(recorded: Study, today: Study) -> list[str]:
    """`[section] key: recorded → today` for every resolved value that differs."""
    was, now = recorded.sections(), today.sections()
    lines = [f"{key}: {was.get(key)!r} → {now.get(key)!r}" for key in ("name", "kind", "preset") if was.get(key) != now.get(key)]
    for section in SECTIONS:
        a, b = was.get(section) or {}, now.get(section) or {}
        lines += [f"[{section}] {key}: {a.get(key, '(unset)')!r} → {b.get(key, '(unset)')!r}"
                  for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]
    return lines


def default_name(study: Study) -> str:
    # a short random suffix: two sweeps started in the same second get their own folders and parent runs
    return f"{study.name}-{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def trial_resources(budget: Budget, request: SweepRequest, cluster_gpus: float) -> dict[str, float]:
    """What each trial asks Ray for: the flags' CPUs and GPUs, else the study's, GPUs only where the cluster has some."""
    cpus = float(request.cpus_per_trial or budget.cpus_per_trial)
    if request.gpus_per_trial is not None:
        # asked for explicitly: honoured even when no GPU is up yet (an autoscaling cluster adds GPU workers)
        gpus = request.gpus_per_trial
    else:
        gpus = float(budget.gpus_per_trial) if cluster_gpus > 0 else 0.0
    return {"cpu": cpus, "gpu": gpus} if gpus > 0 else {"cpu": cpus}


def bundle_size(kind: str, budget: Budget, trajectories: int, resources: dict[str, float]) -> int:
    """Trajectories per trial: the study's (or --bundle's) number, or for `auto` 1 where trials get no
    GPU (on this project's 2-core CPU, vmap over 8 copies of the net ran at 0.76x training them one
    after another) and, where they do, as many as the grid holds up to `max_bundle`."""
    if kind != "ablation":
        return 1
    if budget.bundle == "auto":
        return min(budget.max_bundle, trajectories) if resources.get("gpu", 0) > 0 else 1
    return budget.bundle


def bundled(trajectories: list[Trajectory], k: int) -> tuple[TrialSpec, ...]:
    """Trials of up to `k` trajectories: those that can share one fused step (same `bundle_key`) are chunked
    together; with k = 1, one trial per trajectory in the grid's order."""
    if k == 1:
        return tuple(TrialSpec((t,)) for t in trajectories)
    groups: dict[tuple, list[Trajectory]] = {}
    for t in trajectories:
        groups.setdefault(bundle_key(t.config), []).append(t)
    return tuple(TrialSpec(tuple(ts[i:i + k])) for ts in groups.values() for i in range(0, len(ts), k))


def sweep_name(request: SweepRequest, study: Study) -> str:
    return request.name or default_name(study)


def build_plan(request: SweepRequest, study: Study, name: str, resources: Callable[[Budget], dict[str, float]],
               bundle: int | None = None) -> SweepPlan:
    """The sweep's final trials. The grid is expanded and checked first; only then is `resources(budget)`
    asked what each trial gets (it may start Ray), which decides the bundle size (`bundle`: the one a
    resumed sweep recorded)."""
    if isinstance(study.spec, HpoFile):
        if study.budget.bundle not in ("auto", 1):
            raise StudyError(f"{study.source}: [budget] bundle: HPO trials train one sampled configuration each; use 1 or auto")
        space = {key: SAMPLERS[s.kind](*(getattr(s, s.kind),) if s.kind == "choice" else getattr(s, s.kind))
                 for key, s in study.spec.space.items()}
        template = study.hpo_template()
        return SweepPlan(request.kind, study, name, (), template, space, study.spec.budget.num_samples, resources(study.budget))
    trajectories = study.trajectories()
    per_trial = resources(study.budget)
    k = bundle or bundle_size(request.kind, study.budget, len(trajectories), per_trial)
    trials = tuple(replace(t, explain=study.budget.explain) for t in bundled(trajectories, k))
    return SweepPlan(request.kind, study, name, trials, None, {TRIAL_KEY: tune.grid_search(list(trials))}, len(trials), per_trial, k)
