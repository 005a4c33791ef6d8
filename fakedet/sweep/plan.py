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
    bundle_by_seed: bool = False
    """bundles hold one seed each, so that they step as one wide network (`auto` on CPUs; recorded too)"""

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
    """Trajectories per trial: the study's (or --bundle's) number, or for `auto` on GPUs as many as the grid
    holds up to `max_bundle`. `auto` without GPUs is `cpu_wide_bundle`'s choice, not this one's: 1 here."""
    if kind != "ablation":
        return 1
    if budget.bundle == "auto":
        return min(budget.max_bundle, trajectories) if resources.get("gpu", 0) > 0 else 1
    return budget.bundle


def wide_config(cfg) -> bool:
    """Whether a config's network is one `fakedet.bundle.wide_supported` knows (the tutorial CNN with SRM or
    nothing in its slots), read off the config; tests/test_plan.py checks the two agree."""
    return cfg.arch == "cifar_cnn" and (cfg.srm == "none" or cfg.attention == "srm")


CPU_WIDE_MIN = 4
"""The smallest wide bundle `auto` makes on CPUs. Wide bundles trained 1.35-1.46x the images per CPU-second
of the models one after another at K = 4 and 8 on this project's 2-core machine, but only 1.03-1.25x at
K = 2 and 3 (benchmarks/bench_steppers.py, medians of 5 repeats, two runs), and the main job bundled in
pairs took as long as unbundled end to end (benchmarks/bench_sweep.py: 526 s against 520 s, one run each)."""


def cpu_wide_bundle(trajectories: list[Trajectory], budget: Budget, slots: float) -> int:
    """`auto`'s bundle size where trials get no GPU: trajectories that share a seed (so every batch) and a
    wide-capable network step as one wide network (`fakedet.bundle.WideStepper`); the vmap bundle, 0.6-0.8x
    on a CPU, is never chosen. The largest size from `CPU_WIDE_MIN` up to `max_bundle` that still leaves at
    least `slots` trials (trials Ray can run at once), so bundling never idles a CPU; 1 if none does."""
    if budget.bundle != "auto":
        return 1
    largest = max((len(ts) for ts in _groups(trajectories, by_seed=True).values()), default=1)
    for k in range(min(budget.max_bundle, largest), CPU_WIDE_MIN - 1, -1):
        if len(bundled(trajectories, k, by_seed=True)) >= slots:
            return k
    return 1


def _groups(trajectories: list[Trajectory], by_seed: bool) -> dict[tuple, list[Trajectory]]:
    groups: dict[tuple, list[Trajectory]] = {}
    for i, t in enumerate(trajectories):
        if not by_seed:
            key = bundle_key(t.config)
        elif wide_config(t.config):
            key = (*bundle_key(t.config), t.config.seed)
        else:  # a network the wide form does not know trains alone (vmap does not pay on a CPU)
            key = ("alone", i)
        groups.setdefault(key, []).append(t)
    return groups


def bundled(trajectories: list[Trajectory], k: int, by_seed: bool = False) -> tuple[TrialSpec, ...]:
    """Trials of up to `k` trajectories: those that can share one fused step (same `bundle_key`, and with
    `by_seed` the same seed and a wide-capable network) are chunked together; with k = 1, one trial per
    trajectory in the grid's order."""
    if k == 1:
        return tuple(TrialSpec((t,)) for t in trajectories)
    return tuple(TrialSpec(tuple(ts[i:i + k])) for ts in _groups(trajectories, by_seed).values() for i in range(0, len(ts), k))


def sweep_name(request: SweepRequest, study: Study) -> str:
    return request.name or default_name(study)


def build_plan(request: SweepRequest, study: Study, name: str, resources: Callable[[Budget], dict[str, float]],
               bundle: int | None = None, by_seed: bool = False, capacity: Callable[[], float] | None = None) -> SweepPlan:
    """The sweep's final trials. The grid is expanded and checked first; only then is `resources(budget)`
    asked what each trial gets (it may start Ray), which decides the bundle size (`bundle`, `by_seed`: what a
    resumed sweep recorded). `capacity()`: the cluster's CPUs, asked only for `auto` without GPUs."""
    if isinstance(study.spec, HpoFile):
        if study.budget.bundle not in ("auto", 1):
            raise StudyError(f"{study.source}: [budget] bundle: HPO trials train one sampled configuration each; use 1 or auto")
        space = {key: SAMPLERS[s.kind](*(getattr(s, s.kind),) if s.kind == "choice" else getattr(s, s.kind))
                 for key, s in study.spec.space.items()}
        template = study.hpo_template()
        return SweepPlan(request.kind, study, name, (), template, space, study.spec.budget.num_samples, resources(study.budget))
    trajectories = study.trajectories()
    per_trial = resources(study.budget)
    if bundle is None and request.kind == "ablation" and study.budget.bundle == "auto" and per_trial.get("gpu", 0) <= 0 \
            and capacity is not None:
        slots = capacity() // per_trial.get("cpu", 1.0)
        if request.max_concurrent:
            slots = min(slots, request.max_concurrent)
        k = cpu_wide_bundle(trajectories, study.budget, max(slots, 1))
        by_seed = k > 1
    else:
        k = bundle or bundle_size(request.kind, study.budget, len(trajectories), per_trial)
    trials = tuple(replace(t, explain=study.budget.explain) for t in bundled(trajectories, k, by_seed))
    return SweepPlan(request.kind, study, name, trials, None, {TRIAL_KEY: tune.grid_search(list(trials))}, len(trials), per_trial, k,
                     by_seed and k > 1)
