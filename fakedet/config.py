"""Typed training configuration. Every default is the reference study's protocol (section 3.1)."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Any

from fakedet.models import ARCHITECTURES, PLACEMENTS

SHUFFLE_MODES = ("reference", "full")


@dataclass(frozen=True)
class TrainConfig:
    arch: str = "cifar_cnn"
    """Architecture name from `fakedet.models.ARCHITECTURES`: the PyTorch CIFAR tutorial net."""
    srm: str = "none"
    """SRM placement from `fakedet.models.PLACEMENTS`: none (the study's base model), pool1 (its SRM model), pool2, both."""
    epochs: float = 10
    """Training length in epochs; the study trained 10 (base, SRM), 1 (mini), and tried 50 and 100."""
    lr: float = 1e-3
    """SGD learning rate (the study's 0.001), constant: no schedule."""
    momentum: float = 0.9
    """SGD momentum (the study's 0.9)."""
    batch_size: int = 32
    """Images per step (the study's 32)."""
    shuffle: str = "reference"
    """`reference`: one seeded shuffle into fixed batches, then each epoch shuffles the batch order and the
    items inside each batch, as the study's loader did (a remainder smaller than a batch is dropped, as
    there). `full`: a fresh permutation of all items every epoch, last partial batch kept."""
    seed: int = 11
    """Seeds the initial weights and every shuffle. 11 is the seed of the study's one-time data shuffle."""
    eval_at: tuple[float, ...] = ()
    """Epochs (fractions allowed, e.g. 0.05, 0.25, 1, 10) at which every evaluation set is scored.
    The end of training is always an evaluation point."""
    eval_batch_size: int = 1024
    """Images per forward pass during evaluation; no effect on results."""
    device: str = "auto"
    """`auto` (CUDA when available, else CPU), `cpu`, `cuda` or `cuda:N`."""
    deterministic: bool = False
    """GPU only; CPU runs are bit-exact either way. False (fast, the default): cuDNN benchmarks its
    algorithms and keeps the fastest, some of which sum in a varying order, so two GPU runs of one
    config, and a resumed or prefix-shared run against an uninterrupted one, agree only to rounding.
    True: deterministic algorithms (`torch.use_deterministic_algorithms`, `cudnn.deterministic`,
    `CUBLAS_WORKSPACE_CONFIG=:4096:8`): GPU runs repeat bit for bit on the same GPU model and
    software, at the cost of the faster algorithms (README, "GPU", gives the measured cost)."""

    def __post_init__(self) -> None:
        # eval_at may arrive as a list (from JSON, argparse or Ray); keep the dataclass hashable.
        object.__setattr__(self, "eval_at", tuple(float(e) for e in self.eval_at))
        self.validate()

    def validate(self) -> None:
        errors = []
        if self.arch not in ARCHITECTURES:
            errors.append(f"arch {self.arch!r} is unknown (known: {', '.join(ARCHITECTURES)})")
        if self.srm not in PLACEMENTS:
            errors.append(f"srm placement {self.srm!r} is unknown (known: {', '.join(PLACEMENTS)})")
        if not (isinstance(self.epochs, (int, float)) and math.isfinite(self.epochs) and self.epochs > 0):
            errors.append(f"epochs must be a positive number, got {self.epochs!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            errors.append(f"lr must be > 0, got {self.lr!r}")
        if not (0 <= self.momentum < 1):
            errors.append(f"momentum must be in [0, 1), got {self.momentum!r}")
        if not (isinstance(self.batch_size, int) and self.batch_size > 0):
            errors.append(f"batch_size must be a positive integer, got {self.batch_size!r}")
        # numpy's seed sequences take non-negative integers, torch.manual_seed at most 64 bits
        if not (isinstance(self.seed, numbers.Integral) and not isinstance(self.seed, bool) and 0 <= self.seed < 2**64):
            errors.append(f"seed must be an integer in [0, 2**64), got {self.seed!r}")
        if not isinstance(self.deterministic, bool):
            errors.append(f"deterministic must be true or false, got {self.deterministic!r}")
        if self.shuffle not in SHUFFLE_MODES:
            errors.append(f"shuffle must be one of {SHUFFLE_MODES}, got {self.shuffle!r}")
        bad_points = [e for e in self.eval_at if not (e > 0 and e <= self.epochs)]
        if bad_points:
            errors.append(f"eval_at points must lie in (0, epochs={self.epochs}], got {bad_points}")
        if errors:
            raise ValueError("invalid training config: " + "; ".join(errors))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["eval_at"] = list(self.eval_at)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown training config keys: {sorted(unknown)}")
        return cls(**d)


def dense_eval_points(epochs: float, per_first_epoch: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 0.75), per_decade: int = 4) -> tuple[float, ...]:
    """Evaluation points for cutoff analyses: fractions of the first epoch, then log-spaced epochs.

    The first-epoch fractions follow the study's figure 4 (learning progress within the first epoch).
    After epoch 1, `per_decade` points per factor of ten, rounded to whole epochs.
    """
    points = {p for p in per_first_epoch if p < epochs}
    e = 1.0
    while e <= epochs:
        points.add(float(round(e)))
        e *= 10 ** (1 / per_decade)
    points.add(float(epochs))
    return tuple(sorted(points))


# Study presets; the `mini` model is the study's one-epoch model.
PRESETS: dict[str, dict[str, Any]] = {
    "base": {"srm": "none", "epochs": 10},
    "srm": {"srm": "pool1", "epochs": 10},
    "mini": {"srm": "none", "epochs": 1},
}

__all__ = ["TrainConfig", "SHUFFLE_MODES", "PRESETS", "dense_eval_points"]


def default_cache_root() -> str:
    """Where prepared datasets live unless `--cache-root` says otherwise: `$FAKEDET_CACHE`, else ~/.cache/fakedet."""
    import os

    return os.environ.get("FAKEDET_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fakedet")
