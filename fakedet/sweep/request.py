"""What a sweep was asked to do: the command line's flags, parsed once into one frozen object that the
plan and the run read. Nothing below the command line sees argparse; nothing changes a request (a
resumed sweep's request is a new one, rebuilt from the sweep file)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

# the choices that shape a sweep's trials: recorded in the sweep file, replayed by --resume
SHAPING = ("data", "smoke", "study", "srm", "epochs", "lr", "seeds", "eval_at", "objective", "bundle")


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
