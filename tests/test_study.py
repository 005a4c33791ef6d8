"""Study files: the strict schema, every file in sweeps/ with each of its presets, and the refusals."""

from __future__ import annotations

import pickle
import time
import tomllib
from pathlib import Path

import pytest

from fakedet.config import TRAIN_FIELDS, TrainConfig
from fakedet.sweep.plan import resolve_study
from fakedet.sweep.request import SweepRequest
from fakedet.sweep.spec import TRIAL_KEY, Cell, TrialSpec, resolve_trial
from fakedet.sweep.study import MAX_NESTING, SECTIONS, SWEEPS_DIR, AblationFile, HpoFile, Study, StudyError

STUDY_FILES = sorted(SWEEPS_DIR.glob("*.toml"))


def test_there_are_study_files():
    assert {p.stem for p in STUDY_FILES} >= {"ablation", "hpo"}


@pytest.mark.parametrize("path", STUDY_FILES, ids=lambda p: p.name)
def test_every_study_file_loads_with_each_preset(path):
    study = Study.load(path)
    assert "smoke" in study.presets, f"{path.name} has no smoke preset"
    for preset in [None, *study.presets]:
        s = Study.load(path, preset=preset)
        specs = s.trials() if s.kind == "ablation" else [s.hpo_template()]
        assert specs and all(isinstance(t, TrialSpec) and t.cells for t in specs)
        for trajectory in (t for spec in specs for t in spec.trajectories):
            trajectory.config.validate()
            assert TrainConfig.from_dict(trajectory.config.to_dict()) == trajectory.config
        # what a sweep records resolves to the same study and trials
        again = Study.from_sections(s.sections(), source="record")
        assert again.sections() == s.sections()
        assert (again.trials() if s.kind == "ablation" else [again.hpo_template()]) == specs


def _schema_default(kind: str, section: str, key: str):
    model = {"ablation": AblationFile, "hpo": HpoFile}[kind]
    default = model.model_fields[section].get_default(call_default_factory=True)
    return getattr(default, key)


@pytest.mark.parametrize("path", STUDY_FILES, ids=lambda p: p.name)
def test_study_files_hold_only_what_differs_from_the_schema(path):
    """A study file is a delta: no key restates the schema's default, no preset restates the file."""
    raw = tomllib.loads(path.read_text())
    study = Study.load(path)
    assert "name" not in raw or raw["name"] != path.stem, "name restates the default (the file's stem)"
    restated = []
    for section in SECTIONS:
        table = raw.get(section, {})
        if section == "space" and study.kind == "hpo":
            assert table, "an HPO study needs its space"
            continue  # samplers have no defaults
        for key in table:
            if getattr(getattr(study.spec, section), key) == _schema_default(study.kind, section, key):
                restated.append(f"[{section}] {key}")
    assert not restated, f"{path.name} restates the schema's defaults: {restated}"
    for name, delta in study.presets.items():
        with_preset = Study.load(path, preset=name)
        same = [f"[presets.{name}] {section}.{key}" for section, table in delta.items() for key in table
                if getattr(getattr(with_preset.spec, section), key) == getattr(getattr(study.spec, section), key)]
        assert not same, f"{path.name}: presets restating the file: {same}"


def test_a_restated_default_is_found(tmp_path):
    """The delta check above can fail: a file restating a default is caught by the same comparison."""
    path = write(tmp_path, 'kind = "ablation"\n[budget]\nmax_failures = 2\n[space]\nseeds = 3')
    study = Study.load(path)
    assert study.spec.budget.max_failures == _schema_default("ablation", "budget", "max_failures")
    assert study.spec.space.seeds != _schema_default("ablation", "space", "seeds")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.toml"
    path.write_text(text if text.startswith("name") else 'name = "t"\n' + text)
    return path


@pytest.mark.parametrize("text, message", [
    ('kind = "ablation"\n[budget]\nmax_failure = 5', "[budget] max_failure: unknown key"),
    ('kind = "ablation"\n[cutoff]\npatienc = 3', "[cutoff] patienc: unknown key"),
    ('kind = "ablation"\nspace = "srm"', "space: must be a table of keys"),
    ('kind = "ablation"\n[space]\nepochs = "10"', "[space] epochs: Input should be a valid list"),
    ('kind = "ablation"\n[space]\nepochs = [1, 2.5]', "[space] epochs.1: Input should be a valid integer"),
    ('kind = "ablation"\n[space]\nsrm = ["pool9"]', "[space] srm.0: unknown SRM placement 'pool9'"),
    ('kind = "ablation"\n[budget]\nmax_failures = -1', "[budget] max_failures: Input should be greater than or equal to 0"),
    ('kind = "ablation"\n[budget]\ndense_points = 1', "[budget] dense_points: Input should be a valid boolean"),
    ('kind = "ablation"\n[fixed]\nmomentun = 0.9', "[fixed] momentun: unknown key"),
    ('kind = "ablation"\n[fixed]\nmomentum = 1.5', "[fixed] momentum: Input should be less than 1, got 1.5"),
    ('kind = "ablation"\n[fixed]\nbatch_size = 32.0', "[fixed] batch_size: Input should be a valid integer, got 32.0"),
    ('kind = "ablation"\n[fixed]\nsrm = "pool1"', "[fixed] srm: set per trial by [space] srm; remove it from [fixed]"),
    ('kind = "hpo"\n[space]\nlr = { uniform = [1e-3, 1e-2] }\n[fixed]\nlr = 1e-3', "[fixed] lr: set per trial by [space] lr"),
    ('kind = "hpo"\n[space]\nlr = { uniform = [1e-3, 1e-2] }\n[fixed]\nepochs = 5', "[fixed] epochs: set per trial by [budget] epochs"),
    ('kind = "ablation"\n[cutoff]\nselect_on = "agiri_test/auc"', "[cutoff] select_on: cutoff selection metric 'agiri_test/auc' is on a test split"),
    ('kind = "ablation"\n[cutoff]\nselect_on = "cifar100_test_jpeg/real_recall"', "is on a test split"),
    ('kind = "ablation"\n[presets.smoke]\nspace = { epoch = [1] }', "(preset 'smoke'): [space] epoch: unknown key"),
    ('kind = "ablation"\n[presets.smoke]\nspaces = { epochs = [1] }', "'spaces' is not a section"),
    ('kind = "ablation"\n[data]\nsize = "huge"', "[data] size: Input should be"),
    ('kind = "sweep"', "kind must be 'ablation' or 'hpo'"),
    ('name = "../../escaped"\nkind = "ablation"', "name: '../../escaped' is not a study name"),
    ('kind = "hpo"\n[space]\nlr = { loguniform = [0, 1] }', "[space] lr: loguniform needs low > 0"),
    ('kind = "hpo"\n[space]\nmomentum = { uniform = [0.5, 1.5] }', "[space] momentum: the value 1.5 it can sample is refused"),
    ('kind = "hpo"\n[space]\nlr = { uniform = [1e-3, 1e-2], choice = [1] }', "[space] lr: give exactly one of"),
    ('kind = "hpo"\n[space]\nlearning_rate = { uniform = [1e-3, 1e-2] }', "[space] learning_rate: not a training config field"),
    ('kind = "hpo"\n[space]\nlr = { uniform = [1e-3, 1e-2] }\n[metrics]\nobjective = "agiri_test/auc"', "[metrics] objective"),
])
def test_bad_study_files_are_refused_with_one_line(tmp_path, text, message):
    with pytest.raises(StudyError) as e:
        Study.load(write(tmp_path, text))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert str(tmp_path / "study.toml") in str(e.value)  # names the file


def test_defaults_live_in_the_schema(tmp_path):
    """A study of nothing but its kind is the study's protocol: one trajectory of TrainConfig's defaults."""
    study = Study.load(write(tmp_path, 'kind = "ablation"'))
    (trial,) = study.trials()
    (trajectory,) = trial.trajectories
    protocol = TrainConfig()
    assert trajectory.cell_epochs == (protocol.epochs,)
    for field in ("srm", "lr", "seed", "momentum", "batch_size", "shuffle", "arch"):
        assert getattr(trajectory.config, field) == getattr(protocol, field), field
    assert study.budget.max_failures == 2 and study.cutoff.patience_epochs == 3 and study.data.size == "default"
    # [fixed] is the training config's own schema: the same fields, the same defaults
    assert set(TRAIN_FIELDS.model_fields) == set(TrainConfig.__dataclass_fields__)
    assert study.spec.fixed == TRAIN_FIELDS()


def test_overrides_are_checked_like_the_file():
    study = Study.load("ablation", preset="smoke", overrides={"space": {"seeds": 2, "lr": [1e-3]}})
    assert sorted({t.trajectories[0].config.seed for t in study.trials()}) == [11, 12]
    with pytest.raises(StudyError, match=r"command-line overrides: \[space\] lr.0"):
        Study.load("ablation", overrides={"space": {"lr": [-1.0]}})


# ---- the typed trial spec ------------------------------------------------------------------------
def test_trial_spec_cells_names_and_keys():
    study = Study.load("ablation", preset="smoke")
    spec = study.trials()[0]
    (trajectory,) = spec.trajectories
    assert trajectory.config.epochs == 2 and trajectory.config.eval_at == (0.5, 1.0, 2.0)
    assert [c.name for c in spec.cells] == ["srm=none ep=1 lr=0.01 seed=11", "srm=none ep=2 lr=0.01 seed=11"]
    assert [c.params()["epochs"] for c in spec.cells] == [1, 2] and all(isinstance(c.params()["epochs"], int) for c in spec.cells)
    assert trajectory.label == "none lr=0.01 seed=11"
    # a cell's key ignores how it is evaluated and names the same cell however it was built
    one = spec.cells[0]
    assert one.key == Cell(one.config.__class__(**{**one.config.to_dict(), "eval_at": (0.5,), "device": "cpu"})).key
    assert len({c.key for t in study.trials() for c in t.cells}) == 12  # 2 placements x 2 lengths x 3 seeds, all distinct
    # passed through Ray as is: pickles to an equal object
    assert pickle.loads(pickle.dumps(spec)) == spec


def test_resolve_trial_grid_and_sampled():
    study = Study.load("ablation", preset="smoke")
    spec = study.trials()[1]
    assert resolve_trial({TRIAL_KEY: spec}, None) is spec
    template = Study.load("hpo", preset="smoke").hpo_template()
    sampled = resolve_trial({"lr": 0.05, "srm": "pool2", "batch_size": 64}, template)
    cfg = sampled.trajectories[0].config
    assert (cfg.lr, cfg.srm, cfg.batch_size, cfg.epochs) == (0.05, "pool2", 64, 2)
    assert sampled.trajectories[0].label == "pool2 lr=0.05 seed=11 bs=64"
    with pytest.raises(ValueError, match="momentum"):
        resolve_trial({"momentum": 2.0}, template)


# ---- the study's values, checked whole before anything starts --------------------------------------
@pytest.mark.parametrize("text, message", [
    ('[space]\nsrm = ["none", "none"]', "[space] srm: 'none' is given twice"),
    ('[space]\nepochs = [1, 10, 1]', "[space] epochs: 1 is given twice"),
    ('[space]\nseeds = [11, 12, 11]', "[space] seeds"),
    ('[budget]\neval_at = [0.5, 0.5]', "[budget] eval_at: 0.5 is given twice"),
    ('[metrics]\nintrinsic = ["cifake_test/acc", "cifake_test/acc"]', "[metrics] intrinsic: 'cifake_test/acc' is given twice"),
    ('[space]\nlr = [1e308]', "[space] lr.0: must lie in float32's range"),
    ('[space]\nlr = [1e-40]', "[space] lr.0: must lie in float32's range"),
    ('[space]\nlr = [inf]', "[space] lr.0: Input should be a finite number"),
    ('[space]\nlr = [nan]', "[space] lr.0: Input should be a finite number"),
    ('[budget]\ngpus_per_trial = nan', "[budget] gpus_per_trial: Input should be a finite number"),
    ('[statistics]\ntrained_threshold = inf', "[statistics] trained_threshold"),
    ('[space]\nseeds = 1000000000', "[space] seeds: 1000000000 seeds, more than [limits] seeds = 100 (raise it there"),
    ('[space]\nepochs = [1, 1000000000]', "[space] epochs: 1000000000 epochs, more than [limits] epochs = 1000"),
    ('[budget]\nmax_failures = 1000000000', "[budget] max_failures: 1000000000 retries, more than [limits] max_failures = 20"),
    ('[statistics]\nn_boot = 1000000000', "[statistics] n_boot: 1000000000 resamples, more than [limits] n_boot = 100000"),
    ('[budget]\nbundle = 1000000000', "[budget] bundle: 1000000000 is more than max_bundle = 64"),
    ('[space]\nlr = [' + ", ".join(f"{1e-4 * (1 + i / 1000):.7g}" for i in range(101)) + ']', "[space] lr: 101 values, more than [limits] values = 100"),
    ('[space]\nsrm = ["none", "pool1", "pool2", "both"]\nlr = [' + ", ".join(f"1e-{i}" for i in range(1, 31)) + ']\nseeds = 100'
     '\nepochs = [1, 2, 3]', "[space]: 36000 cells (4 srm x 30 lr x 100 seeds x 3 epochs), more than [limits] cells = 10000"),
    ('[limits]\nvalues = 5000\n[budget]\neval_at = [' + ", ".join(str(1 + i / 100) for i in range(1200)) + ']\n[space]\nepochs = [100]',
     "evaluation points per trajectory (with the cells' and the dense ones), more than [limits] eval_points = 1000"),
    ('[limits]\nseeds = 0', "[limits] seeds: Input should be greater than 0"),
])
def test_study_values_are_refused_whole_before_anything_starts(tmp_path, text, message):
    with pytest.raises(StudyError) as e:
        Study.load(write(tmp_path, 'kind = "ablation"\n' + text))
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)[:500]


@pytest.mark.parametrize("text, message", [
    ('[space]\nbatch_size = { choice = [16, 32, 16] }', "[space] batch_size.choice: 16 is given twice"),
    ('[space]\nlr = { loguniform = [1e-4, 1e308] }', "[space] lr: the value 1e+308 it can sample is refused: lr: must lie in float32's range"),
    ('[space]\nmomentum = { uniform = [0.5, inf] }', "[space] momentum.uniform.1: Input should be a finite number"),
    ('[space]\nlr = { loguniform = ["1e-4", "1e-1"] }', "[space] lr.loguniform.0: Input should be a valid number"),
    ('[space]\nlr = { loguniform = [1e-4, 1e-1] }\n[budget]\nnum_samples = 1000000', "[budget] num_samples: 1000000 trials (one cell each), more than [limits] cells = 10000"),
    ('[space]\nlr = { loguniform = [1e-4, 1e-1] }\n[budget]\nepochs = 2\ngrace_period = 3', "[budget] grace_period: 3 epochs is longer than a trial (2 epochs)"),
    ('[space]\nlr = { loguniform = [1e-4, 1e-1] }\n[budget]\nseed = -1', "[budget] seed: Input should be greater than or equal to 0"),
])
def test_hpo_values_are_refused_before_anything_starts(tmp_path, text, message):
    with pytest.raises(StudyError) as e:
        Study.load(write(tmp_path, 'kind = "hpo"\n' + text))
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)[:500]


def test_every_broken_rule_is_said_at_once(tmp_path):
    with pytest.raises(StudyError) as e:
        Study.load(write(tmp_path, 'kind = "ablation"\n[budget]\nmax_failures = 1000\n[statistics]\nn_boot = 1000000000'))
    assert "[budget] max_failures" in str(e.value) and "[statistics] n_boot" in str(e.value)


def test_a_repeated_flag_value_is_refused_through_the_same_overrides():
    """`--lr 1e-2,1e-2` and `--srm none,none` reach the study as overrides and meet the same rule."""
    with pytest.raises(StudyError, match=r"command-line overrides: \[space\] lr: 0.01 is given twice"):
        resolve_study(SweepRequest(kind="ablation", smoke=True, lr=(1e-2, 1e-2)))
    with pytest.raises(StudyError, match=r"\[space\] srm: 'none' is given twice"):
        resolve_study(SweepRequest(kind="ablation", smoke=True, srm=("none", "none")))
    with pytest.raises(StudyError, match=r"\[space\] seeds: 100000 seeds, more than \[limits\] seeds = 100"):
        resolve_study(SweepRequest(kind="ablation", smoke=True, seeds=100000))


def test_a_bound_is_raised_deliberately_in_limits(tmp_path):
    text = 'kind = "ablation"\n[space]\nseeds = 150\n'
    with pytest.raises(StudyError, match=r"\[limits\] seeds = 100"):
        Study.load(write(tmp_path, text))
    study = Study.load(write(tmp_path, text + "[limits]\nseeds = 150\n"))
    assert len(study.trials()) == 150 and study.limits.seeds == 150
    # a preset may raise one too: presets are deltas over every section
    path = write(tmp_path, text + "[limits]\nseeds = 150\n[presets.wide]\nspace = { seeds = 200 }\nlimits = { seeds = 200 }\n")
    assert len(Study.load(path, preset="wide").trials()) == 200


def test_many_presets_are_refused_before_each_is_checked(tmp_path):
    path = write(tmp_path, 'kind = "ablation"\n' + "".join(f"[presets.p{i}]\nspace = {{ seeds = 2 }}\n" for i in range(10_000)))
    start = time.perf_counter()
    with pytest.raises(StudyError, match=r"presets: 10000 presets, more than \[limits\] presets = 100"):
        Study.load(path)
    assert time.perf_counter() - start < 10  # 10^4 presets checked one by one took minutes


@pytest.mark.parametrize("depth", [MAX_NESTING + 1, 50, 100_000])
def test_deep_arrays_are_refused_without_a_recursion_error(tmp_path, depth):
    path = write(tmp_path, 'kind = "ablation"\n[space]\nseeds = ' + "[" * depth + "]" * depth)
    with pytest.raises(StudyError, match="nest") as e:
        Study.load(path)
    assert "\n" not in str(e.value) and len(str(e.value)) < 300


def test_a_huge_value_is_named_not_echoed(tmp_path):
    huge = "x" * 1_000_000  # a megabyte: the error must not grow with it
    for text in (f'kind = "{huge}"', f'kind = "ablation"\n[space]\nsrm = ["{huge}"]', f'kind = "ablation"\n[budget]\n{huge} = 1',
                 f'kind = "ablation"\n[fixed]\nshuffle = "{huge}"', f'kind = "hpo"\n[space]\n{huge} = {{ choice = [1] }}',
                 f'kind = "ablation"\n[space]\nseeds = {"9" * 5000}'):  # more digits than Python turns into text
        with pytest.raises(StudyError) as e:
            Study.load(write(tmp_path, text))
        assert len(str(e.value)) < len(str(tmp_path)) + 400 and "..." in str(e.value), str(e.value)[:400]


def test_a_batch_larger_than_the_training_set_is_refused_up_front():
    study = Study.load("ablation", preset="smoke")
    study.check_training_set(study.spec.fixed.batch_size, "the stand-in")  # exactly one batch: runs
    with pytest.raises(StudyError, match=r"\[fixed\] batch_size: a batch of 32 is more than the 31 training images of the stand-in"):
        study.check_training_set(31, "the stand-in")
    hpo = Study.load("hpo", preset="smoke")
    largest = max(hpo.spec.space["batch_size"].choice)
    with pytest.raises(StudyError, match=rf"\[space\] batch_size: a batch of {largest} is more than the 100"):
        hpo.check_training_set(100, "cache c")


def test_recorded_fixed_holds_what_no_trial_varies():
    sections = Study.load("ablation").sections()
    assert set(sections["fixed"]) == set(TRAIN_FIELDS.model_fields) - {"srm", "attention", "augment", "augment_p", "lr", "train_on", "epochs", "eval_at"}
    assert sections["fixed"]["momentum"] == TrainConfig.momentum and "limits" in sections
    hpo = Study.load("hpo").sections()
    assert not set(hpo["fixed"]) & (set(hpo["space"]) | {"epochs", "eval_at"})
