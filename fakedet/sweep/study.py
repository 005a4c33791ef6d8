"""Study files: one TOML file per study in `sweeps/` holding its space, budget, metrics and presets.

The schema below owns every default and every rule: a study file is read once, checked as a whole
(unknown keys and wrong types refused with one line naming the file, section and key), and turned
into the `TrialSpec`s Ray runs. Presets (`[presets.<name>]`) and command-line overrides are deltas
merged over the file's tables before that one check, so they obey the same rules.
"""

from __future__ import annotations

import copy
import itertools
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fakedet.config import TrainConfig, dense_eval_points
from fakedet.data.synthetic import SIZES, VARIANTS
from fakedet.models import PLACEMENTS
from fakedet.sweep.spec import Objective, Trajectory, TrialSpec

SWEEPS_DIR = Path(__file__).resolve().parents[2] / "sweeps"

PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
MetricName = Annotated[str, Field(pattern=r"^[a-z0-9_]+/[a-z0-9_]+$")]


class StudyError(ValueError):
    """A study file or command-line override that cannot run; raised before any training starts."""


def refuse_test_split(metric: str, what: str) -> None:
    """The one rule for choosing on data: never a split whose name contains `test`."""
    split = metric.split("/", 1)[0]
    if "test" in split:
        raise ValueError(f"{what} {metric!r} is on a test split; choose on a validation split (cifake_val or agiri_val)")


class _Section(BaseModel):
    # strict: no silent "10" -> 10 or true -> 1; extra="forbid": a typo is an error, not a default
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class AblationSpace(_Section):
    srm: list[str] = ["none", "pool1", "pool2"]
    """SRM placements (fakedet.models.PLACEMENTS): none = the study's base model, pool1 = its SRM model."""
    epochs: list[PositiveInt] = [1, 10, 50, 100]
    """Cell lengths; cells differing only here share one trajectory."""
    lr: list[PositiveFloat] = [1e-4, 1e-3, 1e-2]
    """Constant SGD learning rates."""
    seeds: PositiveInt | list[int] = 1
    """A count (seeds fixed.seed, fixed.seed + 1, ...) or an explicit list."""

    @field_validator("srm")
    @classmethod
    def _known_placements(cls, value: list[str]) -> list[str]:
        bad = [s for s in value if s not in PLACEMENTS]
        if bad:
            raise ValueError(f"unknown SRM placement(s) {bad} (known: {', '.join(PLACEMENTS)})")
        return value

    @field_validator("srm", "epochs", "lr")
    @classmethod
    def _not_empty(cls, value: list) -> list:
        if not value:
            raise ValueError("needs at least one value")
        return value


class Sampler(_Section):
    """One HPO dimension: exactly one of loguniform/uniform/randint = [low, high] or choice = [...]."""

    loguniform: tuple[float, float] | None = None
    uniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None
    choice: list[Any] | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)  # TOML arrays for the tuples

    @model_validator(mode="after")
    def _exactly_one(self) -> "Sampler":
        given = [k for k in ("loguniform", "uniform", "randint", "choice") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of loguniform, uniform, randint = [low, high] or choice = [...]")
        how = given[0]
        if how == "choice":
            if not self.choice:
                raise ValueError("choice needs at least one value")
        else:
            lo, hi = getattr(self, how)
            if not lo < hi:
                raise ValueError(f"{how} needs low < high, got [{lo}, {hi}]")
            if how == "loguniform" and lo <= 0:
                raise ValueError(f"loguniform needs low > 0, got {lo}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("loguniform", "uniform", "randint", "choice") if getattr(self, k) is not None)

    def extremes(self) -> list[Any]:
        """The values a valid training config must accept: both bounds, or every choice."""
        if self.choice is not None:
            return list(self.choice)
        lo, hi = getattr(self, self.kind)
        return [lo, hi - 1] if self.kind == "randint" else [lo, hi]  # randint's high is exclusive (Ray Tune)


class Budget(_Section):
    dense_points: bool = True
    """Also evaluate at fractions of the first epoch and log-spaced epochs (the cutoff analysis)."""
    eval_at: list[PositiveFloat] = []
    """Extra evaluation points, in epochs."""
    cpus_per_trial: PositiveFloat = 1
    gpus_per_trial: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.25
    """Asked for only where the cluster has GPUs: four small CNNs share one GPU."""
    max_failures: NonNegativeInt = 2
    """A crashed trial is retried from its last checkpoint this many times (Ray's -1, forever, is refused)."""
    bundle: PositiveInt | Literal["auto"] = "auto"
    """Trajectories trained together in one trial (one fused step, `fakedet.bundle`): `auto` is 1 where
    the cluster has no GPU (bundling does not pay on a CPU) and, on GPUs, as many as the grid allows up to
    `max_bundle`. HPO trials train one sampled configuration each."""
    max_bundle: PositiveInt = 64
    """The most trajectories `auto` puts in one trial (the issue's K = 64 benchmark point)."""


class AblationBudget(Budget):
    pass


class HpoBudget(Budget):
    epochs: PositiveInt = 10
    """Every trial's maximum length."""
    num_samples: PositiveInt = 20
    """Trials Optuna proposes."""
    max_concurrent: PositiveInt = 2
    """TPE learns from finished trials: few at once keeps it informed."""
    grace_period: PositiveFloat = 1
    """ASHA: epochs every trial gets before it may be stopped."""
    reduction_factor: Annotated[float, Field(gt=1)] = 3
    """ASHA: keep the best 1/reduction_factor at each rung."""
    seed: int = 0
    """TPE sampler seed."""


class Metrics(_Section):
    intrinsic: list[MetricName] = ["cifake_test/acc", "cifake_test/f1", "cifake_test/auc"]
    transfer: list[MetricName] = ["agiri_test/acc", "agiri_test/f1", "agiri_test/auc", "cifar100_test/real_recall"]
    objective: MetricName | list[MetricName] = "agiri_val/auc"
    """HPO only: the metric Optuna and ASHA optimise (never a test split); a list of two or more
    (e.g. ["cifake_val/auc", "agiri_val/auc"], intrinsic vs transfer) searches their Pareto front."""
    mode: Literal["max", "min"] | list[Literal["max", "min"]] | None = None
    """HPO only: default min for losses, max otherwise; a list, one per objective, for several."""

    @field_validator("objective")
    @classmethod
    def _objective_not_test(cls, value: str | list[str]) -> str | list[str]:
        names = [value] if isinstance(value, str) else value
        if isinstance(value, list) and (len(value) < 2 or len(set(value)) != len(value)):
            raise ValueError("a list of objectives needs two or more different metrics")
        for name in names:
            refuse_test_split(name, "objective")
        return value

    @model_validator(mode="after")
    def _one_mode_per_objective(self) -> "Metrics":
        if isinstance(self.mode, list) and len(self.mode) != len(self.objectives):
            raise ValueError(f"mode: {len(self.mode)} modes for {len(self.objectives)} objectives")
        return self

    @property
    def objectives(self) -> tuple[str, ...]:
        return (self.objective,) if isinstance(self.objective, str) else tuple(self.objective)

    @property
    def modes(self) -> tuple[str, ...]:
        if isinstance(self.mode, list):
            return tuple(self.mode)
        return tuple(self.mode or ("min" if m.endswith("/loss") else "max") for m in self.objectives)

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def objective_mode(self) -> str:
        """The mode of a single objective."""
        return self.modes[0]


class Cutoff(_Section):
    select_on: MetricName = "agiri_val/auc"
    """The transfer-validation metric the transfer-optimal cutoff is chosen on."""
    intrinsic_loss: MetricName = "cifake_val/loss"
    intrinsic_acc: MetricName = "cifake_val/acc"
    patience_epochs: PositiveFloat = 3
    """Early stopping on intrinsic_loss: epochs without an improvement before it stops (counted in epochs,
    not evaluation points, which are uneven); the best point is kept."""
    report: Annotated[list[MetricName], Field(min_length=1)] = ["agiri_test/auc", "agiri_test/acc", "cifake_test/acc"]
    """Metrics read at each rule's chosen point (test splits: reported, never chosen on)."""

    @field_validator("select_on", "intrinsic_loss", "intrinsic_acc")
    @classmethod
    def _chosen_not_on_test(cls, value: str) -> str:
        refuse_test_split(value, "cutoff selection metric")
        return value


class DataOptions(_Section):
    size: Literal[tuple(SIZES)] = "default"  # type: ignore[valid-type]
    """Size of the built-in stand-in when `--data synthetic`."""
    variant: Literal[tuple(VARIANTS)] = "standard"  # type: ignore[valid-type]
    """The stand-in's variant when `--data synthetic`: `standard`, or `planted` (cues of known effect on
    transfer, fakedet/data/STANDIN.md)."""


class Primary(_Section):
    """The pre-registered primary answer of each question, fixed in the study file before the sweep
    (README, "Statistics"): printed as the headlines and Holm-adjusted together; every other row of
    `analysis/correlations.csv` is exploratory (Benjamini–Hochberg). The pair is the first intrinsic
    and the first transfer metric of `[metrics]`; the cutoff question's is `[cutoff]`'s `report[0]`."""

    along_training: Literal["transfer_change", "peak_lag", "within_correlation"] = "transfer_change"
    """As one model trains: `transfer_change`, the mean over trajectories of transfer at
    `change_between[1]` minus at `change_between[0]` epochs (the study's contrast: its 1-epoch model
    transferred better than its 10-epoch one); `peak_lag`, log10 epoch of best transfer minus of best
    intrinsic skill; `within_correlation`, each trajectory's correlation over its points (≈ +1 whenever
    both rise: it measures the shared trend)."""
    change_between: Annotated[list[PositiveFloat], Field(min_length=2, max_length=2)] = [1.0, 10.0]
    """The two lengths (epochs) of `transfer_change`: the study's mini (1) and base (10) models."""
    correlation: Literal["pearson", "spearman", "kendall"] = "pearson"
    """The correlation of the across-models and across-seeds questions (over all lengths: each model's
    standing averaged over the lengths)."""
    rule: str = "transfer_val"
    """The cutoff rule compared with early stopping on the intrinsic validation loss."""


class StatisticsOptions(_Section):
    """How the analysis measures uncertainty, and its primary answers (fakedet/analysis/)."""

    primary: Primary = Primary()
    """The headline answer of each question, chosen before the sweep."""
    n_boot: PositiveInt = 1000
    """Bootstrap resamples (of whole trajectories) for the descriptive pooled correlation's interval."""
    seed: int = 0
    """Seeds every resample: the same sweep gives the same table."""
    confidence: Annotated[float, Field(gt=0, lt=1)] = 0.95
    trained_metric: MetricName = "cifake_val/auc"
    """With `trained_threshold`: the intrinsic validation metric a cell must clear to count as trained."""
    trained_threshold: float | None = 0.75
    """A `pooled|trained` row keeps only cells whose `trained_metric` reaches this, so models still on the
    all-FAKE plateau (accuracy 0.5, AUC ~0.6-0.7 on the stand-in's first epoch) do not drive the
    descriptive pooled correlation; none: no such row."""
    cutoff_strata: list[str] = []
    """Columns whose combinations stratify the cutoff comparison's t (e.g. ["srm", "lr"]: df = trajectories
    − conditions, needs 2+ seeds in some condition); empty: a t over trajectories (valid with one seed
    per condition, wider when conditions differ)."""

    @field_validator("trained_metric")
    @classmethod
    def _trained_not_on_test(cls, value: str) -> str:
        refuse_test_split(value, "trained_metric")
        return value


class _StudyFile(_Section):
    name: str
    kind: Literal["ablation", "hpo"]
    fixed: dict[str, Any] = {}
    metrics: Metrics = Metrics()
    cutoff: Cutoff = Cutoff()
    data: DataOptions = DataOptions()
    statistics: StatisticsOptions = StatisticsOptions()
    presets: dict[str, dict[str, dict[str, Any]]] = {}

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class AblationFile(_StudyFile):
    kind: Literal["ablation"]
    space: AblationSpace = AblationSpace()
    budget: AblationBudget = AblationBudget()


class HpoFile(_StudyFile):
    kind: Literal["hpo"]
    space: dict[str, Sampler]
    budget: HpoBudget = HpoBudget()


SECTIONS = ("space", "fixed", "budget", "metrics", "cutoff", "data", "statistics")


def _format(path: str, error: ValidationError) -> str:
    """Pydantic's errors as one line: `FILE: [section] key: message; ...`."""
    parts = []
    for e in error.errors():
        loc = [str(x) for x in e["loc"] if not (isinstance(x, str) and x in ("function-after[_exactly_one()]",))]
        section, key = (loc[0], ".".join(loc[1:])) if loc else ("", "")
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key" if key else "unknown section"
        elif not key and e["type"] in ("model_type", "dict_type"):
            msg = "must be a table of keys"
        where = f"[{section}] {key}" if key else f"{section}"
        parts.append(f"{where}: {msg}")
    return f"{path}: " + "; ".join(parts)


@dataclass(frozen=True)
class Study:
    """A study file, checked: its typed sections, the preset applied (if any), and where it came from."""

    spec: AblationFile | HpoFile
    source: str
    preset: str | None = None

    # ---- loading -------------------------------------------------------------------------------
    @classmethod
    def load(cls, path_or_name: str | Path, preset: str | None = None,
             overrides: dict[str, dict[str, Any]] | None = None, preset_if_present: str | None = None) -> "Study":
        """Read and check a study file; `preset` and `overrides` ({section: {key: value}}) are merged first.
        `preset_if_present`: the preset taken when none is asked for and the file has one of that name."""
        path = resolve_path(path_or_name)
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise StudyError(f"{path}: not valid TOML: {e}") from None
        raw.setdefault("name", path.stem)
        base = cls._check(raw, str(path))
        # every preset must apply cleanly, whichever one is asked for: a typo in one is found at once
        for name in base.spec.presets:
            cls._check(_merge(raw, base.spec.presets[name], f"{path}: preset {name!r}"), f"{path} (preset {name!r})")
        if preset is None and preset_if_present in base.spec.presets:
            preset = preset_if_present
        if preset is not None and preset not in base.spec.presets:
            raise StudyError(f"{path}: no preset {preset!r} (has: {', '.join(base.spec.presets) or 'none'})")
        merged = _merge(raw, base.spec.presets[preset], str(path)) if preset else raw
        if overrides:
            merged = _merge(merged, overrides, f"{path}: command-line override")
        where = str(path) + (f" (preset {preset!r})" if preset else "") + (" with command-line overrides" if overrides else "")
        study = cls._check(merged, where)
        return cls(study.spec, str(path), preset)

    @classmethod
    def from_sections(cls, sections: dict[str, Any], source: str) -> "Study":
        """A resolved study as `sections()` wrote it (a sweep's record), checked by the same schema as a file."""
        raw = {k: copy.deepcopy(v) for k, v in sections.items() if k != "preset"}
        study = cls._check(raw, source)
        return cls(study.spec, source, sections.get("preset"))

    @classmethod
    def _check(cls, raw: dict[str, Any], where: str) -> "Study":
        model = {"ablation": AblationFile, "hpo": HpoFile}.get(raw.get("kind"))
        if model is None:
            raise StudyError(f"{where}: kind must be 'ablation' or 'hpo', got {raw.get('kind')!r}")
        try:
            spec = model.model_validate(raw)
        except ValidationError as e:
            raise StudyError(_format(where, e)) from None
        study = cls(spec, where)
        study._check_training_configs(where)
        return study

    def _check_training_configs(self, where: str) -> None:
        """`[fixed]` and every value the space can produce must make a valid TrainConfig."""
        unknown = sorted(set(self.spec.fixed) - set(TrainConfig.__dataclass_fields__))
        if unknown:
            raise StudyError(f"{where}: [fixed] {', '.join(unknown)}: unknown key (TrainConfig fields: "
                             f"{', '.join(TrainConfig.__dataclass_fields__)})")
        try:
            TrainConfig(**self.spec.fixed)
        except (TypeError, ValueError) as e:
            raise StudyError(f"{where}: [fixed] {e}") from None
        if isinstance(self.spec, HpoFile):
            for key, sampler in self.spec.space.items():
                if key not in TrainConfig.__dataclass_fields__ or key in ("epochs", "eval_at"):
                    raise StudyError(f"{where}: [space] {key}: not a training config field an HPO trial can vary")
                for value in sampler.extremes():
                    try:
                        TrainConfig(**{**self.spec.fixed, key: value})
                    except (TypeError, ValueError) as e:
                        raise StudyError(f"{where}: [space] {key}: the value {value!r} it can sample is refused: {e}") from None

    # ---- the typed sections --------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def budget(self) -> AblationBudget | HpoBudget:
        return self.spec.budget

    @property
    def metrics(self) -> Metrics:
        return self.spec.metrics

    @property
    def cutoff(self) -> Cutoff:
        return self.spec.cutoff

    @property
    def data(self) -> DataOptions:
        return self.spec.data

    @property
    def statistics(self) -> StatisticsOptions:
        return self.spec.statistics

    @property
    def presets(self) -> dict[str, dict]:
        return self.spec.presets

    def sections(self) -> dict[str, Any]:
        """The resolved study as plain data (what a sweep records)."""
        return {"name": self.name, "kind": self.kind, "preset": self.preset, **self.spec.model_dump(include=set(SECTIONS))}

    # ---- trials --------------------------------------------------------------------------------
    def seeds(self) -> list[int]:
        seeds = self.spec.space.seeds
        if isinstance(seeds, int):
            base = int(self.spec.fixed.get("seed", TrainConfig.seed))
            return [base + i for i in range(seeds)]
        return list(seeds)

    def trajectories(self) -> list[Trajectory]:
        """The ablation grid's trajectories: one per (placement, lr, seed), its cells at every epoch count."""
        if not isinstance(self.spec, AblationFile):
            raise StudyError(f"study {self.name!r} is a {self.kind} study, not an ablation grid")
        space, budget = self.spec.space, self.spec.budget
        cell_epochs = sorted(set(space.epochs))
        longest = cell_epochs[-1]
        points = {float(e) for e in budget.eval_at} | {float(e) for e in cell_epochs}
        if budget.dense_points:
            points |= set(dense_eval_points(longest))
        beyond = sorted(p for p in points if p > longest)
        if beyond:
            raise StudyError(f"{self.source}: [budget] eval_at: points {beyond} lie beyond the longest cell ({longest} epochs)")
        trajectories = []
        for srm, lr, seed in itertools.product(space.srm, space.lr, self.seeds()):
            cfg = self._train_config(srm=srm, lr=float(lr), seed=seed, epochs=longest, eval_at=tuple(sorted(points)))
            trajectories.append(Trajectory(cfg, tuple(cell_epochs)))
        return trajectories

    def trials(self) -> list[TrialSpec]:
        return [TrialSpec((t,)) for t in self.trajectories()]

    def hpo_template(self) -> TrialSpec:
        """The HPO trials' template: the fixed config at the budget's length; each trial replaces the sampled fields."""
        if not isinstance(self.spec, HpoFile):
            raise StudyError(f"study {self.name!r} is a {self.kind} study, not an HPO study")
        epochs = self.spec.budget.epochs
        points = {float(e) for e in self.spec.budget.eval_at if e <= epochs}
        if self.spec.budget.dense_points:
            points |= set(dense_eval_points(epochs, per_first_epoch=(0.25, 0.5)))
        points.add(float(epochs))
        cfg = self._train_config(epochs=epochs, eval_at=tuple(sorted(points)))
        metrics = self.spec.metrics
        # several objectives are read at each trial's last point (one model per point of the Pareto
        # front), so the trial reports no best-so-far value (`fakedet.sweep.hpo`)
        objective = None if metrics.multi_objective else Objective(metrics.objective, metrics.objective_mode)
        return TrialSpec((Trajectory(cfg, (float(epochs),)),), objective=objective)

    def _train_config(self, **values: Any) -> TrainConfig:
        try:
            return TrainConfig(**{**self.spec.fixed, **values})
        except (TypeError, ValueError) as e:
            raise StudyError(f"{self.source}: {e}") from None


def resolve_path(path_or_name: str | Path) -> Path:
    """A study file's path: as given, or `sweeps/<name>.toml` for a bare name."""
    path = Path(path_or_name)
    if not path.suffix and not path.exists():
        path = SWEEPS_DIR / f"{path_or_name}.toml"
    if not path.is_file():
        raise StudyError(f"study file {path} not found (studies live in {SWEEPS_DIR}: "
                         f"{', '.join(p.stem for p in sorted(SWEEPS_DIR.glob('*.toml')))})")
    return path


def _merge(raw: dict[str, Any], delta: dict[str, Any], where: str) -> dict[str, Any]:
    """`delta`'s tables merged key by key over `raw`'s sections."""
    merged = copy.deepcopy(raw)
    for section, values in delta.items():
        if section not in SECTIONS:
            raise StudyError(f"{where}: {section!r} is not a section of a study ({', '.join(SECTIONS)})")
        if not isinstance(values, dict):
            raise StudyError(f"{where}: [{section}] must be a table of keys")
        merged.setdefault(section, {})
        if not isinstance(merged[section], dict):
            raise StudyError(f"{where}: [{section}] must be a table of keys, got {type(merged[section]).__name__}")
        merged[section] = {**merged[section], **copy.deepcopy(values)}
    return merged
