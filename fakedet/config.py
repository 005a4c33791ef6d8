"""Typed training configuration. Every default is the reference study's protocol (section 3.1).

Each field's rule is the pydantic type in its annotation (`LearningRate`, `BatchSize`, ...). `TrainConfig`
checks itself against `TRAIN_FIELDS`, a pydantic model generated from those annotations, and a study
file's `[fixed]` table is that same model (its `[space]` axes are lists of the same types), so one rule
per field holds wherever a value comes from: the constructor, `fakedet train`'s flags, a study file, a
command-line override or a sampled HPO trial.
"""

from __future__ import annotations

import dataclasses
import numbers
import operator
import reprlib
import typing
from dataclasses import asdict, dataclass
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model, model_validator

from fakedet.models import ARCHITECTURES, ATTENTIONS, PLACEMENTS

# The weights train in float32 (`train.ieee_float32`): a learning rate above float32's largest number is
# inf there (every update NaN from the first step), one below its smallest normal number flushes
# updates to zero. Either can only fail, or do nothing, inside a trial.
FLOAT32_RANGE = (float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max))

_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 60  # a 100 MB value in a study file is named, not echoed whole
_SHOWN.maxlist = _SHOWN.maxtuple = _SHOWN.maxdict = 8
_SHOWN.maxlevel = 3


def shown(value: Any) -> str:
    """`repr(value)` cut short enough for a one-line error."""
    try:
        return _SHOWN.repr(value)
    except ValueError:  # an int of more digits than Python turns into text
        return f"<a {type(value).__name__} too long to show>"


def clipped(name: str, limit: int = 60) -> str:
    """A key or section name as written, cut in the middle when longer than `limit`."""
    name = str(name)
    return name if len(name) <= limit else f"{name[:limit // 2]}...{name[-limit // 2:]}"


def joined(parts: list[str], most: int = 8) -> str:
    """Errors as one line: the first `most` of them, then how many more (a list of 10^4 bad values is not echoed)."""
    more = len(parts) - most
    return "; ".join(parts[:most]) + (f"; and {more} more" if more > 0 else "")


def _known(names: dict | tuple, what: str) -> AfterValidator:
    def check(value: str) -> str:
        if value not in names:
            raise ValueError(f"unknown {what} {shown(value)} (known: {', '.join(names)})")
        return value

    return AfterValidator(check)


def _float32_range(value: float) -> float:
    low, high = FLOAT32_RANGE
    if not low <= value <= high:
        raise ValueError(f"must lie in float32's range [{low:.3g}, {high:.3g}] (the weights' type), got {shown(value)}")
    return value


def _integer(value: Any) -> Any:
    # numpy integers (a seed from np.arange) are integers; bools are not
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return operator.index(value)
    return value


def _as_tuple(value: Any) -> Any:
    # a list (from JSON, argparse or Ray) is kept as a tuple: the dataclass stays hashable
    return tuple(value) if isinstance(value, list) else value


# ---- one rule per field: the dataclass below, `TRAIN_FIELDS`, `[fixed]` and `[space]` all use these ----
Architecture = Annotated[str, _known(ARCHITECTURES, "architecture")]
Placement = Annotated[str, _known(PLACEMENTS, "SRM placement")]
Attention = Annotated[str, _known(ATTENTIONS, "attention module")]
Augment = Literal["none", "blur_jpeg"]
AUGMENTS = typing.get_args(Augment)
Probability = Annotated[float, Field(ge=0, le=1)]


def _ordered(value: tuple) -> tuple:
    if value[0] > value[1]:
        raise ValueError(f"a range is (low, high) with low <= high, got {shown(value)}")
    return value


# Wang et al. (2020) blur with sigma in pixels (>= 0) and re-encode at an IJG quality in 1..100
SigmaRange = Annotated[tuple[Annotated[float, Field(ge=0, le=8, allow_inf_nan=False)], Annotated[float, Field(ge=0, le=8, allow_inf_nan=False)]],
                       BeforeValidator(_as_tuple), AfterValidator(_ordered)]
QualityRange = Annotated[tuple[Annotated[int, Field(ge=1, le=100)], Annotated[int, Field(ge=1, le=100)]],
                         BeforeValidator(_as_tuple), AfterValidator(_ordered)]
Epochs = Annotated[float, Field(gt=0, allow_inf_nan=False)]
LearningRate = Annotated[float, Field(gt=0, allow_inf_nan=False), AfterValidator(_float32_range)]
Momentum = Annotated[float, Field(ge=0, lt=1)]
BatchSize = Annotated[int, Field(gt=0)]
Shuffle = Literal["reference", "full"]
SHUFFLE_MODES = typing.get_args(Shuffle)
# numpy's seed sequences take non-negative integers, torch.manual_seed at most 64 bits
Seed = Annotated[int, BeforeValidator(_integer), Field(ge=0, lt=2**64)]
# What a model trains on: the study's CIFAKE, AGIRI's training split at 32 px (without the held-out
# agiri_val), or both in equal shares (fakedet.data.training holds which cached sets each one is)
TrainOn = Literal["cifake", "agiri", "cifake+agiri"]
TRAIN_ON = typing.get_args(TrainOn)
EvalPoint = Annotated[float, Field(gt=0, allow_inf_nan=False)]
EvalPoints = Annotated[tuple[EvalPoint, ...], BeforeValidator(_as_tuple)]
EvalBatchSize = Annotated[int, Field(gt=0)]


@dataclass(frozen=True)
class TrainConfig:
    arch: Architecture = "cifar_cnn"
    """Architecture name from `fakedet.models.ARCHITECTURES`: the PyTorch CIFAR tutorial net."""
    srm: Placement = "none"
    """SRM placement from `fakedet.models.PLACEMENTS`: none (the study's base model), pool1 (its SRM model), pool2, both."""
    attention: Attention = "srm"
    """The module at the placement's slots, from `fakedet.models.ATTENTIONS`: `srm` (the study's), `se`
    (squeeze-excitation, Hu et al. 2018), `eca` (Wang et al. 2020), `cbam` (Woo et al. 2018). No effect
    with placement `none`."""
    augment: Augment = "none"
    """Training-time augmentation of each batch (`fakedet.augment`): `none` (the study's), or `blur_jpeg`,
    Wang et al.'s (2020, CVPR) Gaussian blur and JPEG re-encoding, each applied to an image with
    probability `augment_p`."""
    augment_p: Probability = 0.5
    """Probability of each of blur and JPEG per image under `blur_jpeg` (Wang et al. used 0.5 and 0.1)."""
    augment_sigma: SigmaRange = (0.0, 0.43)
    """Blur sigma ~ U(low, high) in pixels of the 32 px image. Wang et al. drew sigma ~ U[0, 3] px on
    images of 224-256 px; the same blur relative to the image is 3 * 32/224 = 0.43 px here (at 32 px a
    scene is 7-8 times coarser, so their widest blur spans 7-8 times fewer of its pixels)."""
    augment_quality: QualityRange = (30, 100)
    """JPEG quality ~ U{low, ..., high} (IJG scale; Wang et al.'s 30-100). Not rescaled: JPEG's 8×8 blocks
    are in pixels whatever the image size."""
    epochs: Epochs = 10
    """Training length in epochs; the study trained 10 (base, SRM), 1 (mini), and tried 50 and 100."""
    lr: LearningRate = 1e-3
    """SGD learning rate (the study's 0.001), constant: no schedule."""
    momentum: Momentum = 0.9
    """SGD momentum (the study's 0.9)."""
    batch_size: BatchSize = 32
    """Images per step (the study's 32)."""
    shuffle: Shuffle = "reference"
    """`reference`: one seeded shuffle into fixed batches, then each epoch shuffles the batch order and the
    items inside each batch, as the study's loader did (a remainder smaller than a batch is dropped, as
    there). `full`: a fresh permutation of all items every epoch, last partial batch kept."""
    seed: Seed = 11
    """Seeds the initial weights and every shuffle. 11 is the seed of the study's one-time data shuffle."""
    train_on: TrainOn = "cifake"
    """The training set: `cifake` (the study's), `agiri` (AGIRI train decoded at 32 px, less the held-out
    transfer-validation split agiri_val), or `cifake+agiri` (equal numbers of each source and class,
    `fakedet.data.training`). Every model is evaluated on every set whatever it trained on."""
    eval_at: EvalPoints = ()
    """Epochs (fractions allowed, e.g. 0.05, 0.25, 1, 10) at which every evaluation set is scored.
    The end of training is always an evaluation point."""
    eval_batch_size: EvalBatchSize = 1024
    """Images per forward pass during evaluation. On the CPU 256 to 1024 are equally fast (channels_last
    evaluation, benchmarks/bench_eval.py); another size may change a logit in its last bits (oneDNN
    blocks the batch), never a training step."""
    device: str = "auto"
    """`auto` (CUDA when available, else CPU), `cpu`, `cuda` or `cuda:N`."""
    deterministic: bool = False
    """GPU only; CPU runs are bit-exact either way. False (fast, the default): cuDNN benchmarks its
    algorithms and keeps the fastest, some of which sum in a varying order, so two GPU runs of one
    config, and a resumed or prefix-shared run against an uninterrupted one, agree only to rounding.
    True: deterministic algorithms (`torch.use_deterministic_algorithms`, `cudnn.deterministic`,
    `CUBLAS_WORKSPACE_CONFIG=:4096:8`): GPU runs repeat bit for bit on the same GPU model and
    software, at the cost of the faster algorithms (README, "GPU", gives the measured cost)."""
    cuda_graph: bool = False
    """CUDA only: capture the training step (one model or a bundle) once into a CUDA graph and replay it,
    one launch per step instead of a few dozen kernel launches (`fakedet.train.GraphStepper`). The same
    kernels on the same buffers: in the deterministic mode equal to eager steps bit for bit is what
    tests/test_gpu.py checks. Off by default until it is measured on a GPU (benchmarks/gpu_check.sh). On
    the CPU it has no effect (the steps run eagerly)."""

    def __post_init__(self) -> None:
        checked = _check(self.to_dict())
        for name in ("eval_at", "augment_sigma", "augment_quality"):  # a list given is kept as a tuple
            object.__setattr__(self, name, getattr(checked, name))

    def validate(self) -> None:
        """Every field checked by its rule; one ValueError naming every broken one."""
        _check(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for name in ("eval_at", "augment_sigma", "augment_quality"):
            d[name] = list(getattr(self, name))
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """A config from plain data (JSON, a checkpoint): unknown keys are refused with the broken values."""
        _check(d)
        return cls(**d)


class _TrainRules(BaseModel):
    # strict: no silent "10" -> 10 or true -> 1 (an int is a float, as in TOML); extra="forbid": a typo
    # is an error, not a default
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    @model_validator(mode="after")
    def _points_within_training(self) -> "_TrainRules":
        beyond = [e for e in self.eval_at if e > self.epochs]
        if beyond:
            raise ValueError(f"eval_at points must lie in (0, epochs={self.epochs:g}], got {shown(beyond)}")
        return self


def _fields_model(cls: type) -> type[BaseModel]:
    """A pydantic model of the dataclass: its fields, annotations (the rules) and defaults."""
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: (hints[f.name], f.default) for f in dataclasses.fields(cls)}
    return create_model(f"{cls.__name__}Fields", __base__=_TrainRules, __module__=__name__, **fields)


TRAIN_FIELDS = _fields_model(TrainConfig)
"""TrainConfig's fields as a pydantic model: what `TrainConfig` checks itself with and what a study's `[fixed]` is."""


def explain(error: ValidationError) -> list[tuple[tuple[str, ...], str]]:
    """Pydantic's errors as (location, message) pairs, each message one line naming the value it refuses."""
    out = []
    for e in error.errors():
        loc = tuple(clipped(x) for x in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] not in ("value_error", "missing") and "input" in e:
            msg += f", got {shown(e['input'])}"
        out.append((loc, msg))
    return out


def _check(values: dict[str, Any]) -> BaseModel:
    try:
        return TRAIN_FIELDS.model_validate(values)
    except ValidationError as e:
        raise ValueError("invalid training config: " + joined([f"{'.'.join(loc)}: {msg}" if loc else msg
                                                                for loc, msg in explain(e)])) from None


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

__all__ = ["TrainConfig", "TRAIN_FIELDS", "TRAIN_ON", "SHUFFLE_MODES", "PRESETS", "clipped", "dense_eval_points", "explain", "joined", "shown"]


def default_cache_root() -> str:
    """Where prepared datasets live unless `--cache-root` says otherwise: `$FAKEDET_CACHE`, else ~/.cache/fakedet."""
    import os

    return os.environ.get("FAKEDET_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fakedet")
