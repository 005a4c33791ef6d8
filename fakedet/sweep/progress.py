"""The sweep's progress line: trials done of total, share of optimizer steps, elapsed time, ETA."""

from __future__ import annotations

import math
import time

from ray.tune import Callback

from fakedet.console import say
from fakedet.sweep.refusals import Stopping
from fakedet.sweep.spec import TrialSpec, resolve_trial


def fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "estimating"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress(Callback):
    """One line at most every `every_s` seconds; a line for each retry and each trial that fails for good."""

    def __init__(self, total_trials: int, template: TrialSpec | None = None, every_s: float = 10.0) -> None:
        self.total_trials, self.template, self.every_s = total_trials, template, every_s
        self._reset()

    def _reset(self) -> None:
        self.started = time.time()
        self.last_print = 0.0
        self.fraction: dict[str, float] = {}
        self.done: set[str] = set()
        self.failed: set[str] = set()
        self.labels: dict[str, str] = {}  # trial id -> its spec's label, resolved from the trial's config once

    def __getstate__(self):
        return {"total_trials": self.total_trials, "template": self.template, "every_s": self.every_s}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()

    def _label(self, trial) -> str:
        if trial.trial_id not in self.labels:
            self.labels[trial.trial_id] = resolve_trial(trial.config, self.template).label
        return self.labels[trial.trial_id]

    def _line(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self.last_print < self.every_s:
            return
        self.last_print = now
        frac = sum(self.fraction.values()) / max(self.total_trials, 1)
        elapsed = now - self.started
        # a rate from under 2% of the work is mostly start-up cost: no ETA yet
        eta = elapsed * (1 - frac) / frac if frac > 0.02 else math.inf
        say(f"[progress] trials {len(self.done)}/{self.total_trials} done"
            + (f", {len(self.failed)} failed" if self.failed else "")
            + f" | {100 * frac:5.1f}% of steps | elapsed {fmt_duration(elapsed)} | ETA {fmt_duration(eta)}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        total = result.get("total_steps") or 0
        if total:
            self.fraction[trial.trial_id] = min(1.0, result["step"] / total)
        self._line()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done.add(trial.trial_id)
        self.fraction[trial.trial_id] = 1.0
        self._line(force=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.failed.add(trial.trial_id)
        self.fraction[trial.trial_id] = 1.0
        say(f"[error] trial {trial.trial_id} ({self._label(trial)}) failed for good; its log: {trial.local_path}")
        self._line(force=True)

    def on_trial_recover(self, iteration, trials, trial, **info):
        if Stopping.refusal is not None:  # a fault a retry cannot remove: the sweep stops instead (`execute.FatalStop`)
            return
        say(f"[retry] trial {trial.trial_id} ({self._label(trial)}) crashed; retrying from its last checkpoint")
