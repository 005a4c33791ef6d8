"""Study files: one TOML file per study in `sweeps/` holding its space, budget and metrics.

A study expands into *cells* (one model configuration each: what the MLflow UI compares) and groups
them into *trajectories* (one Ray trial each): cells that differ only in their epoch count share one
training run with a constant learning rate, read off at each cell's epoch.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fakedet.config import TrainConfig, dense_eval_points
from fakedet.models import PLACEMENTS

SWEEPS_DIR = Path(__file__).resolve().parents[2] / "sweeps"


class StudyError(ValueError):
    """A study file or command-line override that cannot run; raised before any training starts."""


@dataclass(frozen=True)
class Cell:
    """One ablation cell: a training config read off at `config.epochs`."""

    config: TrainConfig

    @property
    def key(self) -> str:
        """Stable id of the cell's config (what `--resume` matches MLflow runs on)."""
        d = self.config.to_dict()
        for k in ("eval_at", "eval_batch_size", "device"):
            d.pop(k)
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def name(self) -> str:
        c = self.config
        return f"srm={c.srm} ep={c.epochs:g} lr={c.lr:g} seed={c.seed}"


@dataclass(frozen=True)
class Trajectory:
    """One Ray trial: train to the longest cell's epochs, evaluating at every cell's epoch and the dense points."""

    config: TrainConfig
    cells: tuple[Cell, ...]

    @property
    def name(self) -> str:
        c = self.config
        return f"srm={c.srm} lr={c.lr:g} seed={c.seed} ->{c.epochs:g}ep"


@dataclass
class Study:
    name: str
    kind: str  # "ablation" or "hpo"
    space: dict[str, Any]
    fixed: dict[str, Any] = field(default_factory=dict)
    budget: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    cutoff: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    """Data options: `size` of the stand-in (tiny, small, default) when `--data synthetic`."""
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str = ""

    # ---- loading -------------------------------------------------------------------------------
    @classmethod
    def load(cls, path_or_name: str | Path) -> "Study":
        path = Path(path_or_name)
        if not path.suffix and not path.exists():
            path = SWEEPS_DIR / f"{path_or_name}.toml"
        if not path.is_file():
            raise StudyError(f"study file {path} not found (studies live in {SWEEPS_DIR}: "
                             f"{', '.join(p.stem for p in sorted(SWEEPS_DIR.glob('*.toml')))})")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise StudyError(f"{path}: not valid TOML: {e}") from None
        known = {"name", "kind", "space", "fixed", "budget", "metrics", "cutoff", "data", "presets"}
        unknown = set(raw) - known
        if unknown:
            raise StudyError(f"{path}: unknown sections {sorted(unknown)} (known: {sorted(known)})")
        if raw.get("kind") not in ("ablation", "hpo"):
            raise StudyError(f"{path}: kind must be 'ablation' or 'hpo', got {raw.get('kind')!r}")
        return cls(
            name=raw.get("name", path.stem), kind=raw["kind"], space=raw.get("space", {}), fixed=raw.get("fixed", {}),
            budget=raw.get("budget", {}), metrics=raw.get("metrics", {}), cutoff=raw.get("cutoff", {}),
            data=raw.get("data", {}), presets=raw.get("presets", {}), source=str(path),
        )

    def with_preset(self, preset: str) -> "Study":
        """The study with a `[presets.<name>]` table merged over it (section by section)."""
        if preset not in self.presets:
            raise StudyError(f"study {self.name!r} has no preset {preset!r} (has: {', '.join(self.presets) or 'none'})")
        merged = copy.deepcopy(self)
        for section, values in self.presets[preset].items():
            if not isinstance(values, dict) or not hasattr(merged, section):
                raise StudyError(f"preset {preset!r}: {section!r} is not a section of the study")
            getattr(merged, section).update(values)
        return merged

    # ---- ablation grid -------------------------------------------------------------------------
    def cells(self) -> list[Cell]:
        if self.kind != "ablation":
            raise StudyError(f"study {self.name!r} is a {self.kind} study, not an ablation grid")
        srms = _as_list(self.space.get("srm", ["none", "pool1", "pool2"]))
        epochs = _as_list(self.space.get("epochs", [1, 10, 50, 100]))
        lrs = _as_list(self.space.get("lr", [1e-4, 1e-3, 1e-2]))
        seeds = self.seed_list()
        errors = []
        bad_srm = [s for s in srms if s not in PLACEMENTS]
        if bad_srm:
            errors.append(f"unknown SRM placement(s) {bad_srm} (known: {', '.join(PLACEMENTS)})")
        bad_ep = [e for e in epochs if isinstance(e, bool) or not isinstance(e, int) or e <= 0]
        if bad_ep:
            errors.append(f"epochs must be positive integers, got {bad_ep}")
        bad_lr = [lr for lr in lrs if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0 or not math.isfinite(lr)]
        if bad_lr:
            errors.append(f"learning rates must be > 0, got {bad_lr}")
        if errors:
            raise StudyError("; ".join(errors))
        cells = []
        for srm in srms:
            for lr in lrs:
                for seed in seeds:
                    for ep in sorted(set(epochs)):
                        cells.append(Cell(self.train_config(srm=srm, lr=float(lr), seed=seed, epochs=ep)))
        return cells

    def seed_list(self) -> list[int]:
        seeds = self.space.get("seeds", 1)
        if isinstance(seeds, int) and not isinstance(seeds, bool):
            if seeds < 1:
                raise StudyError(f"seeds must be at least 1, got {seeds}")
            base = int(self.fixed.get("seed", TrainConfig.seed))
            return [base + i for i in range(seeds)]
        return [int(s) for s in _as_list(seeds)]

    def train_config(self, **overrides: Any) -> TrainConfig:
        values = {**self.fixed, **overrides}
        try:
            return TrainConfig(**values)
        except (TypeError, ValueError) as e:
            raise StudyError(f"study {self.name!r}: {e}") from None

    def trajectories(self) -> list[Trajectory]:
        """Cells grouped so that no epoch is trained twice."""
        groups: dict[str, list[Cell]] = {}
        for cell in self.cells():
            d = cell.config.to_dict()
            d.pop("epochs")
            groups.setdefault(json.dumps(d, sort_keys=True), []).append(cell)
        extra = [float(e) for e in self.budget.get("eval_at", [])]
        trajectories = []
        for cells in groups.values():
            longest = max(c.config.epochs for c in cells)
            points = set(extra) | {float(c.config.epochs) for c in cells}
            if self.budget.get("dense_points", True):
                points |= set(dense_eval_points(longest))
            beyond = sorted(p for p in points if p > longest or p <= 0)
            if beyond:
                raise StudyError(f"evaluation points {beyond} lie outside (0, {longest:g}] epochs")
            cfg = self.train_config(**{**cells[0].config.to_dict(), "epochs": longest, "eval_at": tuple(sorted(points))})
            trajectories.append(Trajectory(cfg, tuple(sorted(cells, key=lambda c: c.config.epochs))))
        return trajectories


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]
