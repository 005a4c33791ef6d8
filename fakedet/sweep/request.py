"""What a sweep was asked to do: the command line's flags, parsed once into one frozen object that the
plan and the run read. Nothing below the command line sees argparse; nothing changes a request (a
resumed sweep's request is a new one, rebuilt from the sweep file)."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

# the choices that shape a sweep's trials: recorded in the sweep file, replayed by --resume
SHAPING = ("data", "smoke", "study", "srm", "epochs", "lr", "seeds", "eval_at", "objective", "bundle")

# A sweep's name becomes a folder under the storage path and an MLflow run name: letters, digits and
# `._-`, starting with a letter or digit (so never `..`, `/`, `-flag` or a hidden folder), at most 100
# characters (a default name is about 40; Ray appends trial folders below it, and Linux limits a
# name to 255 bytes).
SWEEP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# An MLflow experiment name is never a path here, so `/` and spaces may stay (MLflow's own UI names
# experiments like `/Users/me/study`); printable ASCII, at most 200 characters, shown whole in the UI.
EXPERIMENT_NAME = re.compile(r"[A-Za-z0-9/][A-Za-z0-9 ._:/+-]{0,199}")

# The largest numbers a flag may take, each the most any one machine or Ray cluster can ever give:
# a trial runs on one node, and the largest single hosts have a few hundred cores and 8-16 GPUs.
MAX_CPUS = 1024
MAX_GPUS_PER_TRIAL = 16
MAX_CONCURRENT = 10_000      # trials at once: 25x a 100-GPU cluster running 4 trials per GPU
MAX_BUNDLE = 1024            # trajectories fused into one step: 16x the study's default `max_bundle` (64)
MAX_OUTAGE_S = 7 * 24 * 3600  # waiting longer than a week for a tracking server is a stuck sweep, not patience


class RequestError(ValueError):
    """A flag the sweep cannot run with; the message names the flag, the value and the allowed range."""


def check_name(flag: str, value: str, pattern: re.Pattern = SWEEP_NAME) -> str:
    """`value` if it is a safe name, else one line saying why (its first 60 characters shown, not the whole)."""
    if not pattern.fullmatch(value):
        shown = value if len(value) <= 60 else value[:60] + f"... ({len(value)} characters)"
        limit = 100 if pattern is SWEEP_NAME else 200
        allowed, first = ("letters, digits and ._-", "a letter or digit") if pattern is SWEEP_NAME else \
            ("letters, digits, spaces and ._:/+-", "a letter, digit or /")
        raise RequestError(f"{flag} {shown!r}: use {allowed}, starting with {first}, at most {limit} characters")
    return value


def _number_errors(flag: str, value: float | int | None, low: float, high: float, low_open: bool = False) -> list[str]:
    if value is None:
        return []
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return [f"{flag} {value!r}: expected a finite number"]
    if value < low or (low_open and value == low) or value > high:
        bracket = "(" if low_open else "["
        return [f"{flag} {value:g}: must be in {bracket}{low:g}, {high:g}]"]
    return []


@dataclass(frozen=True)
class SweepRequest:
    kind: str
    """ablation or hpo"""
    study: str | None = None
    """study file or name (None: sweeps/<kind>.toml)"""
    data: str = "synthetic"
    """synthetic (the built-in stand-in), kaggle, or a path"""
    smoke: bool = False
    """the study's smoke preset"""
    name: str | None = None
    """sweep name (None: <study>-<date>-<time>-<random>)"""
    srm: tuple[str, ...] | None = None
    epochs: tuple[int | float, ...] | None = None
    lr: tuple[int | float, ...] | None = None
    seeds: int | None = None
    eval_at: tuple[int | float, ...] | None = None
    """extra evaluation points, in epochs"""
    objective: str | tuple[str, ...] | None = None
    """HPO: the metric optimised (several: their Pareto front)"""
    bundle: int | str | None = None
    """trajectories per trial (auto, or a number); the sweep file holds the number chosen"""
    resume: str | None = None
    """the sweep continued (a name, or latest)"""
    adopt_study_file: bool = False
    """with resume: run today's study file instead of the recorded study"""
    trust_changed_state: bool = False
    """with resume: let Ray restore saved state that changed since the driver's last stop (`fakedet.sweep.trust`)"""
    allow_data_change: bool = False
    cache_root: str | None = None
    address: str | None = None
    """Ray cluster to join (None: a fresh local Ray)"""
    num_cpus: int | None = None
    ray_temp_dir: str | None = None
    storage_path: str | None = None
    tracking_uri: str | None = None
    experiment: str | None = None
    gpus_per_trial: float | None = None
    cpus_per_trial: float | None = None
    max_concurrent: int | None = None
    optuna_storage: str | None = None
    tracking_outage: float = 600.0
    """seconds an unreachable MLflow server is waited for"""
    verbose: bool = False
    crash_once_after_step: int | None = None
    """fault injection for tests"""
    kill_after_planning: bool = False
    """fault injection for tests: SIGKILL the driver once its cells' runs exist, before Tune saves any state"""

    def __post_init__(self) -> None:
        """Every number in range and every name safe, before anything is read or started: all the errors, in one line."""
        errors = []
        for flag, value, pattern in (("--name", self.name, SWEEP_NAME), ("--resume", self.resume, SWEEP_NAME),
                                     ("--experiment", self.experiment, EXPERIMENT_NAME)):
            if value is not None:
                try:
                    check_name(flag, value, pattern)
                except RequestError as e:
                    errors.append(str(e))
        errors += _number_errors("--cpus-per-trial", self.cpus_per_trial, 0, MAX_CPUS, low_open=True)
        errors += _number_errors("--gpus-per-trial", self.gpus_per_trial, 0, MAX_GPUS_PER_TRIAL)
        errors += _number_errors("--num-cpus", self.num_cpus, 1, MAX_CPUS)
        errors += _number_errors("--max-concurrent", self.max_concurrent, 1, MAX_CONCURRENT)
        errors += _number_errors("--tracking-outage", self.tracking_outage, 0, MAX_OUTAGE_S)
        errors += _number_errors("--crash-once-after-step", self.crash_once_after_step, 1, 2**62)
        if self.bundle != "auto":
            errors += _number_errors("--bundle", self.bundle, 1, MAX_BUNDLE)
        for flag, value in (("--max-concurrent", self.max_concurrent), ("--num-cpus", self.num_cpus), ("--bundle", self.bundle)):
            if isinstance(value, float):
                errors.append(f"{flag} {value:g}: expected a whole number")
        if not errors and self.cpus_per_trial and self.num_cpus and self.address is None and self.cpus_per_trial > self.num_cpus:
            errors.append(f"--cpus-per-trial {self.cpus_per_trial:g} is more than the local Ray's --num-cpus {self.num_cpus}: no trial could ever start")
        if errors:
            raise RequestError("; ".join(errors))

    @classmethod
    def from_flags(cls, flags: dict[str, Any]) -> "SweepRequest":
        """The request from parsed flags (`vars(namespace)`); flags a command lacks keep their defaults."""
        known = {f.name for f in fields(cls)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in flags.items() if k in known}
        return cls(**values)

    @property
    def study_path(self) -> str:
        return self.study or self.kind

    def overrides(self) -> dict[str, dict[str, Any]]:
        """The flags that change the study, as study-file deltas, checked by the same schema as the file."""
        space = {axis: _plain(getattr(self, axis)) for axis in ("srm", "epochs", "lr", "seeds") if getattr(self, axis) is not None}
        budget = {"eval_at": list(self.eval_at)} if self.eval_at is not None else {}
        if self.bundle is not None:
            budget["bundle"] = self.bundle
        metrics = {"objective": _plain(self.objective)} if self.objective else {}
        return {k: v for k, v in (("space", space), ("budget", budget), ("metrics", metrics)) if v}

    def recorded(self) -> dict[str, Any]:
        """The choices that shape the sweep, as plain data for the sweep file."""
        return {k: _plain(v) for k, v in asdict(self).items() if k in SHAPING}

    def resumed(self, name: str, recorded: dict[str, Any]) -> "SweepRequest":
        """This request continuing sweep `name`: its recorded choices replace today's flags."""
        known = {k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items() if k in SHAPING}
        return replace(self, name=name, **known)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
