"""Study files: the strict schema, every file in sweeps/ with each of its presets, and the refusals."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from fakedet.sweep.spec import TRIAL_KEY, Cell, TrialSpec, resolve_trial
from fakedet.sweep.study import SWEEPS_DIR, Study, StudyError

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


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.toml"
    path.write_text('name = "t"\n' + text)
    return path


@pytest.mark.parametrize("text, message", [
    ('kind = "ablation"\n[budget]\nmax_failure = 5', "[budget] max_failure: unknown key"),
    ('kind = "ablation"\n[cutoff]\npatienc = 3', "[cutoff] patienc: unknown key"),
    ('kind = "ablation"\nspace = "srm"', "space: must be a table of keys"),
    ('kind = "ablation"\n[space]\nepochs = "10"', "[space] epochs: Input should be a valid list"),
    ('kind = "ablation"\n[space]\nepochs = [1, 2.5]', "[space] epochs.1: Input should be a valid integer"),
    ('kind = "ablation"\n[space]\nsrm = ["pool9"]', "[space] srm: unknown SRM placement"),
    ('kind = "ablation"\n[budget]\nmax_failures = -1', "[budget] max_failures: Input should be greater than or equal to 0"),
    ('kind = "ablation"\n[budget]\ndense_points = 1', "[budget] dense_points: Input should be a valid boolean"),
    ('kind = "ablation"\n[fixed]\nmomentun = 0.9', "[fixed] momentun: unknown key"),
    ('kind = "ablation"\n[fixed]\nmomentum = 1.5', "[fixed] invalid training config: momentum"),
    ('kind = "ablation"\n[cutoff]\nselect_on = "agiri_test/auc"', "[cutoff] select_on: cutoff selection metric 'agiri_test/auc' is on a test split"),
    ('kind = "ablation"\n[cutoff]\nselect_on = "cifar100_test_jpeg/real_recall"', "is on a test split"),
    ('kind = "ablation"\n[presets.smoke]\nspace = { epoch = [1] }', "(preset 'smoke'): [space] epoch: unknown key"),
    ('kind = "ablation"\n[presets.smoke]\nspaces = { epochs = [1] }', "'spaces' is not a section"),
    ('kind = "ablation"\n[data]\nsize = "huge"', "[data] size: Input should be"),
    ('kind = "sweep"', "kind must be 'ablation' or 'hpo'"),
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
    study = Study.load(write(tmp_path, 'kind = "ablation"'))
    trials = study.trials()
    assert len(trials) == 3 * 3 * 1  # srm {none, pool1, pool2} × lr {1e-4, 1e-3, 1e-2} × 1 seed
    assert trials[0].trajectories[0].cell_epochs == (1.0, 10.0, 50.0, 100.0)
    assert study.budget.max_failures == 2 and study.cutoff.patience_epochs == 3 and study.data.size == "default"


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
