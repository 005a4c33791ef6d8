"""What one Ray trial trains: a typed `TrialSpec`, built once by the study and passed through Ray as is.

A *cell* is one model configuration (what the MLflow UI compares: one child run). A *trajectory* is one
training run with a constant learning rate, read off at each of its cells' epoch counts, so that no
epoch is trained twice. A *trial* trains one trajectory (a bundle of several, later, on a GPU).
The trainable, the tracking callback and the progress line all read the same `TrialSpec`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fakedet.config import TrainConfig

# Where a trial's checkpoint holds the artifacts of the cells that end at its step (one folder per cell's epochs)
CELL_ARTIFACTS = "cell_artifacts"
# Fields that change how a run is executed or scored, never what it learns: left out of a cell's identity.
RUNTIME_FIELDS = ("eval_at", "eval_batch_size", "device", "deterministic", "cuda_graph")
# Fields added after sweeps were first recorded: at their defaults (the study's) they are left out of a
# cell's key, so that the cells of a sweep recorded before them keep their keys and resume.
LATER_FIELDS = ("attention", "augment", "augment_p", "augment_sigma", "augment_quality", "train_on")


def fmt_epochs(epochs: float) -> str:
    """Epoch counts as people write them: 10, not 10.0; 0.25 stays 0.25."""
    return f"{epochs:g}"


def plain_number(value: Any) -> Any:
    """An integral float as an int (MLflow params, tables): `epochs` 50.0 shows as 50."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


@dataclass(frozen=True)
class Cell:
    """One cell: a trajectory's config read off at `config.epochs`."""

    config: TrainConfig

    @property
    def epochs(self) -> float:
        return float(self.config.epochs)

    @property
    def key(self) -> str:
        """Stable id of the cell's config: what `--resume` matches MLflow runs on."""
        defaults = TrainConfig().to_dict()
        d = {k: v for k, v in self.config.to_dict().items()
             if k not in RUNTIME_FIELDS and not (k in LATER_FIELDS and v == defaults[k])}
        d["epochs"] = float(d["epochs"])  # 10 and 10.0 are one cell
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def name(self) -> str:
        c = self.config
        return f"srm={c.srm}{_departures(c)} ep={fmt_epochs(c.epochs)} lr={c.lr:g} seed={c.seed}" + _train_on_suffix(c)

    def params(self) -> dict[str, Any]:
        """The cell's MLflow params, with integral numbers as integers."""
        d = self.config.to_dict()
        return {k: plain_number(float(d[k]) if k == "epochs" else d[k]) for k in CELL_PARAMS}


CELL_PARAMS = ("arch", "srm", "attention", "augment", "augment_p", "augment_sigma", "augment_quality", "epochs", "lr",
               "seed", "train_on", "momentum", "batch_size", "shuffle")


def _departures(c: TrainConfig) -> str:
    """The attention module and augmentation in a name where they are not the study's: ` att=se`,
    ` aug=blur_jpeg p=0.5` (names of the study's cells are unchanged)."""
    out = f" att={c.attention}" if c.attention != TrainConfig.attention and c.srm != "none" else ""
    if c.augment != TrainConfig.augment:
        out += f" aug={c.augment} p={c.augment_p:g}"
    return out


def _train_on_suffix(config: TrainConfig) -> str:
    """` train=agiri` for a model trained on another set than the study's CIFAKE; nothing for CIFAKE, so
    the study's names stay as they were."""
    return "" if config.train_on == TrainConfig.train_on else f" train={config.train_on}"


@dataclass(frozen=True)
class Trajectory:
    """One training run: to the longest cell's epochs, evaluated at `config.eval_at` (every cell's epoch among them)."""

    config: TrainConfig
    cell_epochs: tuple[float, ...]

    def __post_init__(self) -> None:
        epochs = tuple(sorted(float(e) for e in self.cell_epochs))
        object.__setattr__(self, "cell_epochs", epochs)
        if not epochs:
            raise ValueError("a trajectory needs at least one cell")
        if abs(epochs[-1] - float(self.config.epochs)) > 1e-9:
            raise ValueError(f"a trajectory trains to its longest cell ({epochs[-1]:g} epochs), not {self.config.epochs:g}")
        missing = [e for e in epochs if not any(abs(e - p) < 1e-9 for p in self.config.eval_at) and e != epochs[-1]]
        if missing:
            raise ValueError(f"cell epochs {missing} are not evaluation points of the trajectory")

    @property
    def cells(self) -> tuple[Cell, ...]:
        return tuple(Cell(replace(self.config, epochs=_whole(e), eval_at=())) for e in self.cell_epochs)

    @property
    def label(self) -> str:
        """How plots and progress lines name the trajectory: `pool1 lr=0.001 seed=11`."""
        c = self.config
        label = f"{c.srm}{_departures(c)} lr={c.lr:g} seed={c.seed}" + _train_on_suffix(c)
        if c.momentum != TrainConfig.momentum:
            label += f" m={c.momentum:g}"
        if c.batch_size != TrainConfig.batch_size:
            label += f" bs={c.batch_size}"
        return label

    def with_values(self, values: dict[str, Any]) -> "Trajectory":
        """The same trajectory with some training-config fields replaced (an HPO trial's sampled values)."""
        return Trajectory(replace(self.config, **values), self.cell_epochs)


def _whole(epochs: float) -> float | int:
    return int(epochs) if float(epochs).is_integer() else float(epochs)


@dataclass(frozen=True)
class FaultInjection:
    """Kill the worker process once, after `after_step` optimizer steps (tests of retry-from-checkpoint).

    The marker file makes the crash happen once across retries, so the retried trial must continue
    from its checkpoint.
    """

    after_step: int
    marker: str

    def maybe_crash(self, step: int) -> None:
        if step < self.after_step:
            return
        marker = Path(self.marker)
        if marker.exists():
            return
        marker.write_text(str(step))
        os._exit(17)  # a hard worker death, as an OOM kill or a lost node would be


@dataclass(frozen=True)
class Objective:
    """What an HPO trial reports for Optuna and ASHA: the best value of `metric` so far (monotone in
    training time, so rungs and TPE compare like with like), and the epoch where it occurred."""

    metric: str
    mode: str  # "max" or "min"

    @property
    def best_key(self) -> str:
        return f"best/{self.metric}"

    @property
    def epoch_key(self) -> str:
        return f"best/{self.metric}/epoch"

    def better(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        return value > best if self.mode == "max" else value < best


@dataclass(frozen=True)
class TrialSpec:
    """Everything one Ray trial trains: its trajectories (one per model: several make a bundle that
    trains in one fused step, `fakedet.bundle`), the HPO objective it reports, fault injection."""

    trajectories: tuple[Trajectory, ...]
    faults: FaultInjection | None = None
    objective: Objective | None = None
    explain: bool = True
    """Grad-CAM shares at every point and maps at each cell's end (`fakedet.explain`; `budget.explain`)."""

    def __post_init__(self) -> None:
        if not self.trajectories:
            raise ValueError("a trial needs at least one trajectory")

    @property
    def cells(self) -> tuple[Cell, ...]:
        return tuple(c for t in self.trajectories for c in t.cells)

    @property
    def label(self) -> str:
        return " + ".join(t.label for t in self.trajectories)

    @property
    def key(self) -> str:
        """Stable id of the trial's cells: reported with every result, so that a replay of Ray's
        `result.json` finds the trial's spec again without unpickling Ray's `params.pkl`."""
        return hashlib.sha1(",".join(c.key for c in self.cells).encode()).hexdigest()[:16]

    def with_values(self, values: dict[str, Any]) -> "TrialSpec":
        """An HPO trial: the template's trajectory with the sampled training-config fields."""
        return replace(self, trajectories=tuple(t.with_values(values) for t in self.trajectories))


TRIAL_KEY = "trial"  # the param-space key under which a grid sweep passes each trial's TrialSpec
TRIAL_KEY_RESULT = "trial_key"  # the result field holding `TrialSpec.key`


def resolve_trial(config: dict[str, Any], template: TrialSpec | None) -> TrialSpec:
    """The TrialSpec of a Ray trial: the grid's spec as is, or (HPO) the template with the sampled values."""
    if TRIAL_KEY in config:
        return config[TRIAL_KEY]
    if template is None:
        raise ValueError("a sampled trial needs the study's template TrialSpec")
    return template.with_values(dict(config))
