"""A sweep's plan: the study file with its preset and command-line overrides, checked, and expanded into
the `TrialSpec`s Ray will run. Everything that can be wrong with a request is found here, before data,
Ray or MLflow are touched."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from ray import tune

from fakedet.bundle import bundle_key
from fakedet.sweep.spec import TRIAL_KEY, FaultInjection, Trajectory, TrialSpec
from fakedet.sweep.study import HpoFile, Study, StudyError

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

    def bundled(self, k: int) -> "SweepPlan":
        """The grid's trajectories in trials of up to `k`: those that can share one fused step (`fakedet.bundle.bundle_key`) are chunked together."""
        if not self.trials or k == 1:
            return self
        groups: dict[tuple, list[Trajectory]] = {}
        for spec in self.trials:
            for t in spec.trajectories:
                groups.setdefault(bundle_key(t.config), []).append(t)
        faults = self.trials[0].faults
        trials = tuple(TrialSpec(tuple(ts[i:i + k]), faults=faults) for ts in groups.values() for i in range(0, len(ts), k))
        return replace(self, trials=trials, param_space={TRIAL_KEY: tune.grid_search(list(trials))}, total_trials=len(trials))

    def with_faults(self, faults: FaultInjection) -> "SweepPlan":
        """Every trial with the same fault injection (tests of retry-from-checkpoint)."""
        trials = tuple(replace(t, faults=faults) for t in self.trials)
        template = replace(self.template, faults=faults) if self.template else None
        space = {TRIAL_KEY: tune.grid_search(list(trials))} if trials else self.param_space
        return replace(self, trials=trials, template=template, param_space=space)


def overrides_from(args) -> dict[str, dict[str, Any]]:
    """Command-line flags as study-file deltas, checked by the same schema as the file."""
    space = {axis: getattr(args, axis) for axis in ("srm", "epochs", "lr", "seeds") if getattr(args, axis, None) is not None}
    budget = {"eval_at": list(args.eval_at)} if getattr(args, "eval_at", None) is not None else {}
    if getattr(args, "bundle", None) is not None:
        budget["bundle"] = args.bundle
    metrics = {"objective": args.objective} if getattr(args, "objective", None) else {}
    return {k: v for k, v in (("space", space), ("budget", budget), ("metrics", metrics)) if v}


def choose_preset(study_path: str, smoke: bool, data: str) -> str | None:
    """`--smoke` takes the smoke preset; the built-in stand-in takes `standin` where the study has one."""
    if smoke:
        return "smoke"
    return "standin" if data == "synthetic" and "standin" in Study.load(study_path).presets else None


def default_name(study: Study) -> str:
    # a short random suffix: two sweeps started in the same second get their own folders and parent runs
    return f"{study.name}-{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def build_plan(kind: str, args) -> SweepPlan:
    path = args.study or kind
    study = Study.load(path, preset=choose_preset(path, args.smoke, args.data), overrides=overrides_from(args) or None)
    if study.kind != kind:
        raise StudyError(f"{study.source} is a {study.kind} study; run it with `sweeps/run.py {study.kind}`")
    name = args.name or default_name(study)
    if isinstance(study.spec, HpoFile):
        if study.budget.bundle not in ("auto", 1):
            raise StudyError(f"{study.source}: [budget] bundle: HPO trials train one sampled configuration each; use 1 or auto")
        space = {key: SAMPLERS[s.kind](*(getattr(s, s.kind),) if s.kind == "choice" else getattr(s, s.kind))
                 for key, s in study.spec.space.items()}
        samples = study.spec.budget.num_samples
        return SweepPlan(kind, study, name, (), study.hpo_template(), space, samples)
    trials = tuple(study.trials())
    return SweepPlan(kind, study, name, trials, None, {TRIAL_KEY: tune.grid_search(list(trials))}, len(trials))
