"""Study files: one TOML file per study in `sweeps/` holding its space, budget, metrics and presets.

The schema below owns every default and every rule: a study file is read once, checked as a whole
(unknown keys and wrong types refused with one line naming the file, section and key), and turned
into the `TrialSpec`s Ray runs. Presets (`[presets.<name>]`) and command-line overrides are deltas
merged over the file's tables before that one check, so they obey the same rules. The training
config's rules are `fakedet.config`'s: `[fixed]` is `TRAIN_FIELDS` itself and the `[space]` axes are
lists of its field types. A file holds what differs from these defaults; what is left out is the
study's protocol. The whole study is checked before anything starts: every axis's values unique, every
size under its `[limits]` bound, the batch against the training set once the data are known.
"""

from __future__ import annotations

import copy
import itertools
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fakedet.analysis.roles import concrete
from fakedet.config import (TRAIN_FIELDS, TRAIN_ON, Attention, Augment, EvalPoint, LearningRate, Placement, Probability, Seed,
                            TrainConfig, TrainOn, clipped, dense_eval_points, explain, joined, shown)
from fakedet.data.options import PrepareOptions
from fakedet.data.synthetic import SIZES, VARIANTS
from fakedet.data.training import needs_agiri_train
from fakedet.models import PLACEMENTS
from fakedet.sweep.spec import Objective, Trajectory, TrialSpec

SWEEPS_DIR = Path(__file__).resolve().parents[2] / "sweeps"

PositiveFloat = Annotated[float, Field(gt=0)]
PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
MetricName = Annotated[str, Field(pattern=r"^[a-z0-9_]+/[a-z0-9_]+$")]
TrainFields = TRAIN_FIELDS

# The deepest table or array a study needs: presets.<name>.statistics.primary.change_between is 5 deep.
# Deeper is a broken or hostile file; refused before anything recurses through it.
MAX_NESTING = 8


def _unique(values: list) -> list:
    seen: set = set()
    for v in values:
        key = repr(v) if isinstance(v, (list, dict)) else v  # a set, so that a long list is checked in linear time
        if key in seen:
            raise ValueError(f"{shown(v)} is given twice; each value once (a repeated value would train, and log, one cell twice)")
        seen.add(key)
    return values


Unique = AfterValidator(_unique)


def _study_name(name: str) -> str:
    if not (0 < len(name) <= 64 and name[0].isalnum() and all(c.isalnum() or c in "._-" for c in name) and name.isascii()):
        raise ValueError(f"{shown(name)} is not a study name: up to 64 ASCII letters, digits, '.', '_' or '-', first a letter or "
                         "digit (it names the MLflow experiment and the sweep's folder); set name = \"...\" in the file")
    return name


class StudyError(ValueError):
    """A study file or command-line override that cannot run; raised before any training starts."""


def refuse_test_split(metric: str, what: str) -> None:
    """The one rule for choosing on data: never a split whose name contains `test` (a set's, or a role's:
    `intrinsic_test`, `transfer_test`)."""
    split = metric.split("/", 1)[0]
    if "test" in split:
        raise ValueError(f"{what} {shown(metric)} is on a test split; choose on a validation split (cifake_val or agiri_val, "
                         "or the roles intrinsic_val and transfer_val)")


class _Section(BaseModel):
    # strict: no silent "10" -> 10 or true -> 1; extra="forbid": a typo is an error, not a default;
    # no inf or nan anywhere (TOML has both): a non-finite number is never a setting; defaults obey the
    # same rules (and come out in the same types: 1 as 1.0 where a float is meant)
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False, validate_default=True)


T = TypeVar("T")
Axis = Annotated[list[T], Field(min_length=1), Unique]
"""An axis of the grid: a list of values of the training config's type for the field, each once."""


class AblationSpace(_Section):
    """The grid's axes. An axis left out is the study's one value (`TrainConfig`'s default)."""

    srm: Axis[Placement] = [TrainConfig.srm]
    """SRM placements (fakedet.models.PLACEMENTS): none = the study's base model, pool1 = its SRM model."""
    attention: Axis[Attention] = [TrainConfig.attention]
    """Attention modules at the placements' slots (fakedet.models.ATTENTIONS): srm = the study's. Placement
    none has no module: its trajectories train once, with the study's module named."""
    augment: Axis[Augment] = [TrainConfig.augment]
    """Training-time augmentations (fakedet.augment): none = the study's, blur_jpeg = Wang et al. 2020."""
    augment_p: Axis[Probability] = [TrainConfig.augment_p]
    """blur_jpeg's probability per operation and image (Wang et al.: 0.5 and 0.1). Augmentation none has
    no probability: its trajectories train once, with the default named."""
    epochs: Axis[PositiveInt] = [int(TrainConfig.epochs)]
    """Cell lengths; cells differing only here share one trajectory."""
    lr: Axis[LearningRate] = [TrainConfig.lr]
    """Constant SGD learning rates."""
    train_on: Axis[TrainOn] = [TrainConfig.train_on]
    """Training sets (`TrainConfig.train_on`): cifake (the study's), agiri, cifake+agiri. Every model is
    scored on every set; `[metrics]` and `[cutoff]` roles (`intrinsic_val/...`) follow each trajectory's."""
    seeds: PositiveInt | Axis[Seed] = 1
    """A count (seeds fixed.seed, fixed.seed + 1, ...) or an explicit list."""

    @property
    def seed_count(self) -> int:
        return self.seeds if isinstance(self.seeds, int) else len(self.seeds)


class Sampler(_Section):
    """One HPO dimension: exactly one of loguniform/uniform/randint = [low, high] or choice = [...]."""

    loguniform: Annotated[list[float], Field(min_length=2, max_length=2)] | None = None
    uniform: Annotated[list[float], Field(min_length=2, max_length=2)] | None = None
    randint: Annotated[list[int], Field(min_length=2, max_length=2)] | None = None
    choice: Axis[Any] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "Sampler":
        given = [k for k in ("loguniform", "uniform", "randint", "choice") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of loguniform, uniform, randint = [low, high] or choice = [...]")
        how = given[0]
        if how != "choice":
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
    eval_at: Annotated[list[EvalPoint], Unique] = []
    """Extra evaluation points, in epochs."""
    cpus_per_trial: PositiveFloat = 1
    gpus_per_trial: Annotated[float, Field(ge=0)] = 0.25
    """Asked for only where the cluster has GPUs: four small CNNs share one GPU."""
    max_failures: NonNegativeInt = 2
    """A crashed trial is retried from its last checkpoint this many times (Ray's -1, forever, is refused)."""
    bundle: PositiveInt | Literal["auto"] = "auto"
    """Trajectories trained together in one trial (one fused step, `fakedet.bundle`): `auto` on GPUs is as
    many as the grid allows up to `max_bundle`; where trials get no GPU it bundles only trajectories that
    share a seed and a wide-capable network, which step as one wide network (vmap does not pay on a CPU),
    and only while every CPU keeps a trial (`fakedet.sweep.plan.cpu_wide_bundle`). HPO trials train one
    sampled configuration each."""
    explain: bool = True
    """Where each model looks (`fakedet.explain`): Grad-CAM shares on a fixed probe set (16 REAL + 16 FAKE
    per evaluation set) at every evaluation point, and its maps and gates as `explain/` artifacts at each
    cell's end; README, "Where the detector looks", has its cost."""
    max_bundle: PositiveInt = 64
    """The most trajectories one trial trains (`auto`'s ceiling, and a number's): the K = 64 point of
    benchmarks/bench_bundle.py."""


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
    seed: Annotated[int, Field(ge=0, lt=2**32)] = 0
    """TPE sampler seed (Optuna's TPE seeds a numpy RandomState: [0, 2**32))."""


class Metrics(_Section):
    """Metric names are `<set>/<metric>` or `<role>/<metric>`, a role (`intrinsic_val`, `intrinsic_test`,
    `transfer_val`, `transfer_test`) resolved per trajectory from its training set (fakedet.analysis.roles:
    for CIFAKE, the study's, intrinsic_test is cifake_test and transfer_val agiri_val). A study of one
    training set has its roles replaced by set names when it is loaded."""

    intrinsic: Annotated[list[MetricName], Unique] = ["intrinsic_test/acc", "intrinsic_test/f1", "intrinsic_test/auc"]
    """The study's intrinsic skill: accuracy, F1 and AUC on the training distribution's test split (CIFAKE test)."""
    transfer: Annotated[list[MetricName], Unique] = ["transfer_test/acc", "transfer_test/f1", "transfer_test/auc",
                                                     "cifar100_test/real_recall"]
    """Transfer: the other labelled distribution's test split (AGIRI test for a CIFAKE model), and CIFAR-100
    test's real recall (every image there is real; transfer for every training set)."""
    objective: MetricName | list[MetricName] = "transfer_val/auc"
    """HPO only: the metric Optuna and ASHA optimise (never a test split): transfer-validation (agiri_val/auc
    for a CIFAKE model); intrinsic alternatives are intrinsic_val/auc and intrinsic_val/loss. A list of two or more (e.g.
    ["cifake_val/auc", "agiri_val/auc"], intrinsic vs transfer) searches their Pareto front."""
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
    select_on: MetricName = "transfer_val/auc"
    """The transfer-validation metric the transfer-optimal cutoff is chosen on (agiri_val/auc for a CIFAKE model)."""
    intrinsic_loss: MetricName = "intrinsic_val/loss"
    intrinsic_acc: MetricName = "intrinsic_val/acc"
    patience_epochs: PositiveFloat = 3
    """Early stopping on intrinsic_loss: epochs without an improvement before it stops (counted in epochs,
    not evaluation points, which are uneven); the best point is kept."""
    report: Annotated[list[MetricName], Field(min_length=1), Unique] = ["transfer_test/auc", "transfer_test/acc", "intrinsic_test/acc"]
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
    agiri_val_size: PositiveInt | None = None
    """Images of AGIRI train held out as agiri_val (`fakedet prepare --agiri-val-size`); none: 2,000
    (PrepareOptions). The stand-in's AGIRI train is small (600 images at `small`): a study that trains on
    it holds out fewer, so that some are left to train on."""

    def prepare_options(self, train_ons) -> PrepareOptions:
        """How the data are prepared for a study training on `train_ons`: AGIRI train decoded where one needs it."""
        sizes = {} if self.agiri_val_size is None else {"agiri_val_size": self.agiri_val_size}
        return PrepareOptions(agiri_train=needs_agiri_train(train_ons), **sizes)


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
    seed: Seed = 0
    """Seeds every resample: the same sweep gives the same table."""
    confidence: Annotated[float, Field(gt=0, lt=1)] = 0.95
    trained_metric: MetricName = "intrinsic_val/auc"
    """With `trained_threshold`: the intrinsic validation metric a cell must clear to count as trained."""
    trained_threshold: float | None = 0.75
    """A `pooled|trained` row keeps only cells whose `trained_metric` reaches this, so models still on the
    all-FAKE plateau (accuracy 0.5, AUC ~0.6-0.7 on the stand-in's first epoch) do not drive the
    descriptive pooled correlation; none: no such row."""
    cutoff_strata: Annotated[list[str], Unique] = []
    """Columns whose combinations stratify the cutoff comparison's t (e.g. ["srm", "lr"]: df = trajectories
    − conditions, needs 2+ seeds in some condition); empty: a t over trajectories (valid with one seed
    per condition, wider when conditions differ)."""

    @field_validator("trained_metric")
    @classmethod
    def _trained_not_on_test(cls, value: str) -> str:
        refuse_test_split(value, "trained_metric")
        return value


class Limits(_Section):
    """Ceilings on a study's size, checked before anything starts, so that a slip (`seeds = 1000000000`,
    `--seeds 100000`, `n_boot = 1e9`) is refused in one line naming its bound instead of planning for hours,
    running out of memory, or dying after the training. Each sits far above what the study needs; a
    bigger study raises one here, deliberately."""

    cells: PositiveInt = 10_000
    """MLflow runs one sweep plans (an ablation's cells, an HPO study's trials): the full grid with three
    seeds is 108 (3 placements x 4 lengths x 3 rates x 3 seeds); 10,000 is about 100 times that."""
    seeds: PositiveInt = 100
    """Seeds per configuration: the study's grid uses 3; 100 already narrows a 95% t-interval over seeds
    about 12-fold (t(0.975, n-1)/sqrt(n): 2.48 at n = 3, 0.20 at n = 100)."""
    values: PositiveInt = 100
    """Values in any one list of the study (an axis, eval_at, a metric list, a choice): the longest the
    study's files hold is 4 (epochs, placements)."""
    eval_points: PositiveInt = 1_000
    """Evaluation points of one trajectory: the dense schedule to 100 epochs has 14; every point costs an
    evaluation of every set and a checkpoint."""
    epochs: PositiveInt = 1_000
    """The longest training, in epochs: the study's longest run is 100; 10 times that."""
    n_boot: PositiveInt = 100_000
    """Bootstrap resamples of the analysis (`[statistics] n_boot`): 1000 by default; 10^9 of them asked
    for 29.8 GiB and died after the whole sweep had trained."""
    max_failures: NonNegativeInt = 20
    """Retries of one crashed trial (`[budget] max_failures`, default 2): a trial that crashed 20 times has
    a cause that another retry will not remove."""
    presets: PositiveInt = 100
    """Presets in one file (each is checked whenever the file loads): the study's files hold 2."""


class _StudyFile(_Section):
    name: Annotated[str, AfterValidator(_study_name)]
    kind: Literal["ablation", "hpo"]
    fixed: TrainFields = TrainFields()
    """Training-config fields the space does not vary; left out, the study's protocol (`TrainConfig`)."""
    metrics: Metrics = Metrics()
    cutoff: Cutoff = Cutoff()
    data: DataOptions = DataOptions()
    statistics: StatisticsOptions = StatisticsOptions()
    limits: Limits = Limits()
    presets: dict[str, dict[str, dict[str, Any]]] = {}


class AblationFile(_StudyFile):
    kind: Literal["ablation"]
    space: AblationSpace = AblationSpace()
    budget: AblationBudget = AblationBudget()


class HpoFile(_StudyFile):
    kind: Literal["hpo"]
    space: dict[str, Sampler]
    budget: HpoBudget = HpoBudget()


SECTIONS = ("space", "fixed", "budget", "metrics", "cutoff", "data", "statistics", "limits")


def _format(path: str, error: ValidationError) -> str:
    """Pydantic's errors as one line: `FILE: [section] key: message; ...`."""
    parts = []
    for e, (loc, msg) in zip(error.errors(), explain(error)):
        loc = [x for x in loc if not x.startswith("function-")]
        section, key = (loc[0], ".".join(loc[1:])) if loc else ("", "")
        if e["type"] == "extra_forbidden" and not key:
            msg = "unknown section"
        elif not key and e["type"] in ("model_type", "dict_type"):
            msg = "must be a table of keys"
        where = f"[{section}] {key}" if key else f"{section}"
        parts.append(f"{where}: {msg}")
    return f"{path}: " + joined(parts)


def _nesting(value: Any) -> int:
    """How deep tables and arrays nest in `value` (without recursing: a hostile file may nest thousands deep)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            depth += 1
            deepest = max(deepest, depth)
            if depth <= MAX_NESTING:  # deeper is refused anyway: stop counting
                stack.extend((x, depth) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def _check_nesting(raw: dict[str, Any], where: str) -> None:
    if _nesting(raw) > MAX_NESTING:
        raise StudyError(f"{where}: tables or arrays nest more than {MAX_NESTING} deep; a study needs at most 5")


class _Refusal:
    """The whole-study rules' errors, collected: every broken rule is said at once, in one line."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.parts.append(f"{where}: {message}")

    def over(self, where: str, value: int, noun: str, limit: int, option: str) -> None:
        if value > limit:
            self.add(where, f"{value} {noun}, more than [limits] {option} = {limit} (raise it there to allow more)")


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
        except ValueError as e:  # an integer of more digits than Python reads
            raise StudyError(f"{path}: not readable: {clipped(str(e), 120)}") from None
        except RecursionError:  # tomllib recurses once per nested array or inline table
            raise StudyError(f"{path}: tables or arrays nest too deep to read; a study needs at most 5") from None
        _check_nesting(raw, str(path))
        raw.setdefault("name", path.stem)
        base = cls._check(raw, str(path))
        # every preset must apply cleanly, whichever one is asked for: a typo in one is found at once
        for name in base.spec.presets:
            cls._check(_merge(raw, base.spec.presets[name], f"{path}: preset {clipped(name)!r}"), f"{path} (preset {clipped(name)!r})")
        if preset is None and preset_if_present in base.spec.presets:
            preset = preset_if_present
        if preset is not None and preset not in base.spec.presets:
            raise StudyError(f"{path}: no preset {shown(preset)} (has: {', '.join(base.spec.presets) or 'none'})")
        merged = _merge(raw, base.spec.presets[preset], str(path)) if preset else raw
        if overrides:
            merged = _merge(merged, overrides, f"{path}: command-line override")
        where = str(path) + (f" (preset {preset!r})" if preset else "") + (" with command-line overrides" if overrides else "")
        study = cls._check(merged, where)
        return cls(study.spec, str(path), preset)

    @classmethod
    def from_sections(cls, sections: dict[str, Any], source: str) -> "Study":
        """A resolved study as `sections()` wrote it (a sweep's record), checked by the same schema as a file."""
        _check_nesting(sections, source)
        raw = {k: copy.deepcopy(v) for k, v in sections.items() if k != "preset"}
        study = cls._check(raw, source)
        return cls(study.spec, source, sections.get("preset"))

    @classmethod
    def _check(cls, raw: dict[str, Any], where: str) -> "Study":
        model = {"ablation": AblationFile, "hpo": HpoFile}.get(raw.get("kind"))
        if model is None:
            raise StudyError(f"{where}: kind must be 'ablation' or 'hpo', got {shown(raw.get('kind'))}")
        try:
            spec = model.model_validate(raw)
        except ValidationError as e:
            raise StudyError(_format(where, e)) from None
        study = cls(spec, where)
        study._check_whole(where)
        return cls(_roles_resolved(spec, study.train_ons()), where)

    def _check_whole(self, where: str) -> None:
        """The rules that span sections: what the space varies is not also fixed, every size under its
        `[limits]` bound, every value an HPO trial can sample a valid training config."""
        spec, limits, refuse = self.spec, self.spec.limits, _Refusal()
        refuse.over("presets", len(spec.presets), "presets", limits.presets, "presets")
        if refuse.parts:  # said before anything else: each preset would be checked in turn
            raise StudyError(f"{where}: " + joined(refuse.parts))
        for key in sorted(spec.fixed.model_fields_set & set(self.varied_fields())):
            refuse.add(f"[fixed] {key}", f"set per trial by {self._varied_by(key)}; remove it from [fixed]")
        budget = spec.budget
        refuse.over("[budget] max_failures", budget.max_failures, "retries", limits.max_failures, "max_failures")
        refuse.over("[statistics] n_boot", spec.statistics.n_boot, "resamples", limits.n_boot, "n_boot")
        if isinstance(budget.bundle, int) and budget.bundle > budget.max_bundle:
            refuse.add("[budget] bundle", f"{budget.bundle} is more than max_bundle = {budget.max_bundle} (raise max_bundle to bundle more)")
        for key, length in sorted(_list_lengths(spec)):
            refuse.over(key, length, "values", limits.values, "values")
        if isinstance(spec, AblationFile):
            space = spec.space
            refuse.over("[space] seeds", space.seed_count, "seeds", limits.seeds, "seeds")
            refuse.over("[space] epochs", max(space.epochs), "epochs", limits.epochs, "epochs")
            conditions = len(self._conditions())
            cells = conditions * len(space.lr) * len(space.train_on) * space.seed_count * len(space.epochs)
            shape = (f"{conditions} srm" if conditions == len(space.srm)
                     else f"{conditions} conditions (srm x attention x augment x augment_p)")
            sets = f" x {len(space.train_on)} train_on" if len(space.train_on) > 1 else ""
            refuse.over("[space]", cells, f"cells ({shape} x {len(space.lr)} lr{sets} x {space.seed_count} seeds x "
                        f"{len(space.epochs)} epochs)", limits.cells, "cells")
            if not refuse.parts:  # the points of a bounded grid: a few thousand at most
                refuse.over("[budget] eval_at", len(self._ablation_points()), "evaluation points per trajectory (with the cells' "
                            "and the dense ones)", limits.eval_points, "eval_points")
        else:
            refuse.over("[budget] epochs", budget.epochs, "epochs", limits.epochs, "epochs")
            refuse.over("[budget] num_samples", budget.num_samples, "trials (one cell each)", limits.cells, "cells")
            if budget.grace_period > budget.epochs:
                refuse.add("[budget] grace_period", f"{budget.grace_period:g} epochs is longer than a trial ({budget.epochs} epochs)")
            if not refuse.parts:
                refuse.over("[budget] eval_at", len(self._hpo_points()), "evaluation points per trial", limits.eval_points, "eval_points")
            for key, sampler in spec.space.items():
                if key not in TrainFields.model_fields or key in ("epochs", "eval_at"):
                    refuse.add(f"[space] {clipped(key)}", "not a training config field an HPO trial can vary")
                    continue
                for value in sampler.extremes():
                    try:
                        TrainConfig(**{**self._fixed(), key: value})
                    except ValueError as e:
                        reason = str(e).removeprefix("invalid training config: ")
                        refuse.add(f"[space] {key}", f"the value {shown(value)} it can sample is refused: {reason}")
                        break
        if refuse.parts:
            raise StudyError(f"{where}: " + joined(refuse.parts))

    def varied_fields(self) -> tuple[str, ...]:
        """Training-config fields the study sets per trial, never from `[fixed]`."""
        if isinstance(self.spec, AblationFile):
            return ("srm", "attention", "augment", "augment_p", "lr", "train_on", "epochs", "eval_at")
        return ("epochs", "eval_at", *self.spec.space)

    def _varied_by(self, key: str) -> str:
        if key == "epochs":
            return "[space] epochs" if self.kind == "ablation" else "[budget] epochs"
        if key == "eval_at":
            return "[budget] eval_at (and the cells' epochs)"
        return f"[space] {key}"

    def check_training_set(self, images: int, what: str) -> None:
        """Refuse, before any trial, a batch larger than the training set (`images` of `what`): every
        trial could only fail on it."""
        where, batch = "[fixed] batch_size", self.spec.fixed.batch_size
        if isinstance(self.spec, HpoFile) and "batch_size" in self.spec.space:
            where, batch = "[space] batch_size", max(int(v) for v in self.spec.space["batch_size"].extremes())
        if batch > images:
            raise StudyError(f"{self.source}: {where}: a batch of {batch} is more than the {images} training images of {what}")

    def train_ons(self) -> tuple[str, ...]:
        """The training sets the study's trials train on (an HPO trial's sampled ones included)."""
        spec = self.spec
        if isinstance(spec, AblationFile):
            return tuple(spec.space.train_on)
        if "train_on" in spec.space:
            return tuple(v for v in spec.space["train_on"].extremes() if v in TRAIN_ON)
        return (spec.fixed.train_on,)

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
    def limits(self) -> Limits:
        return self.spec.limits

    @property
    def presets(self) -> dict[str, dict]:
        return self.spec.presets

    def sections(self) -> dict[str, Any]:
        """The resolved study as plain data (what a sweep records): every default filled in; `[fixed]`
        without the fields the study sets per trial."""
        sections = self.spec.model_dump(include=set(SECTIONS))
        sections["fixed"] = self._fixed()
        return {"name": self.name, "kind": self.kind, "preset": self.preset, **sections}

    def _fixed(self) -> dict[str, Any]:
        """`[fixed]` resolved: every training-config field the study does not vary, at its value."""
        fixed = self.spec.fixed.model_dump(exclude=set(self.varied_fields()))
        return {k: list(v) if isinstance(v, tuple) else v for k, v in fixed.items()}  # as JSON records it

    # ---- trials --------------------------------------------------------------------------------
    def seeds(self) -> list[int]:
        seeds = self.spec.space.seeds
        if isinstance(seeds, int):
            base = int(self.spec.fixed.seed)
            return [base + i for i in range(seeds)]
        return list(seeds)

    def _ablation_points(self) -> set[float]:
        space, budget = self.spec.space, self.spec.budget
        longest = max(space.epochs)
        points = {float(e) for e in budget.eval_at} | {float(e) for e in space.epochs}
        if budget.dense_points:
            points |= set(dense_eval_points(longest))
        return points

    def _hpo_points(self) -> set[float]:
        epochs = self.spec.budget.epochs
        points = {float(e) for e in self.spec.budget.eval_at if e <= epochs}
        if self.spec.budget.dense_points:
            points |= set(dense_eval_points(epochs, per_first_epoch=(0.25, 0.5)))
        points.add(float(epochs))
        return points

    def _conditions(self) -> list[dict[str, Any]]:
        """The grid's (srm, attention, augment, augment_p) combinations, in the axes' order, each once: a
        placement without a module (none) takes the study's module, augmentation none the default
        probability, so that no two trajectories train the same model."""
        space, seen = self.spec.space, {}
        for srm, attention, augment, p in itertools.product(space.srm, space.attention, space.augment, space.augment_p):
            if not PLACEMENTS[srm].slots:
                attention = TrainConfig.attention
            if augment == "none":
                p = TrainConfig.augment_p
            seen.setdefault((srm, attention, augment, p), None)
        return [dict(zip(("srm", "attention", "augment", "augment_p"), key)) for key in seen]

    def trajectories(self) -> list[Trajectory]:
        """The ablation grid's trajectories: one per (condition, lr, seed), its cells at every epoch count."""
        if not isinstance(self.spec, AblationFile):
            raise StudyError(f"study {self.name!r} is a {self.kind} study, not an ablation grid")
        space = self.spec.space
        cell_epochs = sorted(set(space.epochs))
        longest = cell_epochs[-1]
        points = self._ablation_points()
        beyond = sorted(p for p in points if p > longest)
        if beyond:
            raise StudyError(f"{self.source}: [budget] eval_at: points {shown(beyond)} lie beyond the longest cell ({longest} epochs)")
        trajectories = []
        for condition, lr, train_on, seed in itertools.product(self._conditions(), space.lr, space.train_on, self.seeds()):
            cfg = self._train_config(**condition, lr=float(lr), train_on=train_on, seed=seed, epochs=longest, eval_at=tuple(sorted(points)))
            trajectories.append(Trajectory(cfg, tuple(cell_epochs)))
        return trajectories

    def trials(self) -> list[TrialSpec]:
        return [TrialSpec((t,)) for t in self.trajectories()]

    def hpo_template(self) -> TrialSpec:
        """The HPO trials' template: the fixed config at the budget's length; each trial replaces the sampled fields."""
        if not isinstance(self.spec, HpoFile):
            raise StudyError(f"study {self.name!r} is a {self.kind} study, not an HPO study")
        epochs = self.spec.budget.epochs
        cfg = self._train_config(epochs=epochs, eval_at=tuple(sorted(self._hpo_points())))
        metrics = self.spec.metrics
        # several objectives are read at each trial's last point (one model per point of the Pareto
        # front), so the trial reports no best-so-far value (`fakedet.sweep.hpo`)
        objective = None if metrics.multi_objective else Objective(metrics.objective, metrics.objective_mode)
        return TrialSpec((Trajectory(cfg, (float(epochs),)),), objective=objective, explain=self.budget.explain)

    def _train_config(self, **values: Any) -> TrainConfig:
        try:
            return TrainConfig(**{**self._fixed(), **values})
        except (TypeError, ValueError) as e:
            raise StudyError(f"{self.source}: {e}") from None


def _roles_resolved(spec: AblationFile | HpoFile, train_ons: tuple[str, ...]) -> AblationFile | HpoFile:
    """The study with each role name (`intrinsic_test/acc`) replaced by the set name it stands for where
    every training set of the study gives the same one (fakedet.analysis.roles.concrete): a CIFAKE study
    names cifake_test/acc, agiri_val/auc, ... as it always did, in its record, its parameters and its
    tables. Roles that stand for different sets (several training sets, or the mixed one) stay."""
    def names(value: Any) -> Any:
        return [concrete(v, train_ons) for v in value] if isinstance(value, list) else concrete(value, train_ons)

    metrics = spec.metrics.model_copy(update={k: names(getattr(spec.metrics, k)) for k in ("intrinsic", "transfer", "objective")})
    cutoff = spec.cutoff.model_copy(update={k: names(getattr(spec.cutoff, k)) for k in ("select_on", "intrinsic_loss", "intrinsic_acc", "report")})
    statistics = spec.statistics.model_copy(update={"trained_metric": names(spec.statistics.trained_metric)})
    return spec.model_copy(update={"metrics": metrics, "cutoff": cutoff, "statistics": statistics})


def _list_lengths(spec: BaseModel) -> list[tuple[str, int]]:
    """(`[section] key`, length) of every list in the study's sections, nested tables and HPO samplers included."""
    out = []
    stack: list[tuple[str, Any]] = [(f"[{section}]", getattr(spec, section)) for section in SECTIONS]
    while stack:
        where, value = stack.pop()
        items = value if isinstance(value, dict) else dict(value) if isinstance(value, BaseModel) else None
        if items is not None:
            stack += [(f"{where} {k}" if where.endswith("]") else f"{where}.{k}", v) for k, v in items.items()]
        elif isinstance(value, (list, tuple)):
            out.append((where, len(value)))
    return out


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
            raise StudyError(f"{where}: {clipped(section)!r} is not a section of a study ({', '.join(SECTIONS)})")
        if not isinstance(values, dict):
            raise StudyError(f"{where}: [{section}] must be a table of keys")
        merged.setdefault(section, {})
        if not isinstance(merged[section], dict):
            raise StudyError(f"{where}: [{section}] must be a table of keys, got {type(merged[section]).__name__}")
        merged[section] = {**merged[section], **copy.deepcopy(values)}
    return merged
