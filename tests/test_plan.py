"""The sweep layer without Ray or MLflow: request, plan, bundling, resources, Tune's config, the sweep file,
the study a resumed sweep or a cutoff runs, and bad input stopping with one line. In-process, seconds."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from ray import tune

from fakedet.bundle import bundle_key
from fakedet.config import TrainConfig
from fakedet.sweep.execute import _tracking_cause, run_config, tune_config
from fakedet.sweep.plan import build_plan, bundle_size, bundled, default_name, resolve_study, study_differences, trial_resources
from fakedet.sweep.record import SWEEP_FILE, read_sweep_file, recorded_choices, recorded_study, write_sweep_file
from fakedet.sweep.spec import TRIAL_KEY, FaultInjection, Trajectory
from fakedet.sweep.writer import TrackingUnavailable
from fakedet.sweep.request import SweepRequest
from fakedet.sweep.study import Study, StudyError
from fakedet.sweep_cli import build_parser, cutoff_study, main, resumed_study

CPU = {"cpu": 1.0}
GPU = {"cpu": 1.0, "gpu": 0.25}


def request_from(*argv: str) -> SweepRequest:
    return SweepRequest.from_flags(vars(build_parser().parse_args(list(argv))))


def plan_for(request: SweepRequest, resources=CPU, bundle=None):
    study = resolve_study(request)
    return build_plan(request, study, "p", lambda budget: dict(resources), bundle=bundle)


def test_request_is_made_from_the_flags_and_frozen():
    r = request_from("ablation", "--smoke", "--srm", "none,pool1", "--lr", "1e-3", "--seeds", "2", "--bundle", "2")
    assert r.kind == "ablation" and r.smoke and r.srm == ("none", "pool1") and r.lr == (1e-3,) and r.seeds == 2
    with pytest.raises(AttributeError):
        r.name = "x"  # type: ignore[misc]
    assert r.overrides() == {"space": {"srm": ["none", "pool1"], "lr": [1e-3], "seeds": 2}, "budget": {"bundle": 2}}
    assert request_from("hpo", "--objective", "cifake_val/auc").overrides() == {"metrics": {"objective": "cifake_val/auc"}}


def test_request_deltas_reach_the_study():
    study = resolve_study(request_from("ablation", "--smoke", "--srm", "none", "--lr", "1e-3", "--seeds", "2", "--eval-at", "1.5"))
    assert study.preset == "smoke" and study.spec.space.srm == ["none"] and study.seeds() == [11, 12]
    assert 1.5 in study.trajectories()[0].config.eval_at
    with pytest.raises(StudyError, match=r"command-line overrides: \[space\] lr.0"):
        resolve_study(request_from("ablation", "--lr", "0"))
    with pytest.raises(StudyError, match="is a hpo study"):
        resolve_study(SweepRequest(kind="ablation", study="hpo"))
    # the built-in stand-in takes the `standin` preset where the study has one
    assert resolve_study(SweepRequest(kind="ablation")).preset == ("standin" if "standin" in Study.load("ablation").presets else None)


def test_bundling_is_decided_in_the_plan():
    one = plan_for(request_from("ablation", "--smoke", "--seeds", "2", "--bundle", "1"))
    two = plan_for(request_from("ablation", "--smoke", "--seeds", "2", "--bundle", "2"))
    assert one.bundle == 1 and one.total_trials == 4 and [len(t.trajectories) for t in one.trials] == [1] * 4
    assert two.bundle == 2 and two.total_trials == 2 and [len(t.trajectories) for t in two.trials] == [2, 2]
    # each bundle holds trajectories that can share a step; together the same trajectories as unbundled
    assert all(len({t.config.srm for t in trial.trajectories}) == 1 for trial in two.trials)
    assert sorted(t.label for s in two.trials for t in s.trajectories) == sorted(t.label for s in one.trials for t in s.trajectories)
    assert two.cell_count == one.cell_count == 8 and two.trajectory_count == 4
    # unbundled trials keep the grid's order, as the study lists them
    assert one.trials == tuple(resolve_study(request_from("ablation", "--smoke", "--seeds", "2")).trials())
    # auto: one per trial on CPUs, the whole grid where trials get a GPU; a recorded size wins
    assert plan_for(request_from("ablation", "--smoke", "--seeds", "2")).bundle == 1
    assert plan_for(request_from("ablation", "--smoke", "--seeds", "2"), GPU).bundle == 4
    assert plan_for(request_from("ablation", "--smoke", "--seeds", "2"), GPU, bundle=2).total_trials == 2


def trajectory(srm: str = "none", lr: float = 1e-3, seed: int = 11, epochs: int = 2) -> Trajectory:
    return Trajectory(TrainConfig(srm=srm, lr=lr, seed=seed, epochs=epochs, eval_at=(1.0,)), (1.0, float(epochs)))


def test_bundled_chunks_only_trajectories_that_share_a_step():
    grid = [trajectory(srm, lr, seed) for srm in ("none", "pool1") for lr in (1e-3, 1e-2) for seed in (11, 12)]
    grid.append(trajectory("none", epochs=3))  # other evaluation points and length: a bundle of its own
    # k = 1: one trial per trajectory, in the grid's order
    assert [trial.trajectories for trial in bundled(grid, 1)] == [(t,) for t in grid]
    trials = bundled(grid, 3)
    assert all(len({bundle_key(t.config) for t in trial.trajectories}) == 1 for trial in trials)
    assert sorted(t.label + str(t.cell_epochs) for trial in trials for t in trial.trajectories) == sorted(
        t.label + str(t.cell_epochs) for t in grid)  # each trajectory once
    # four 2-epoch `none`, four 2-epoch `pool1`, one 3-epoch `none`: 3 + 1, 3 + 1, 1
    assert sorted(len(trial.trajectories) for trial in trials) == [1, 1, 1, 3, 3]
    # lr and seed may differ within a bundle
    assert any(len({(t.config.lr, t.config.seed) for t in trial.trajectories}) == 3 for trial in trials)


def test_the_grid_is_checked_before_resources_are_asked_for():
    asked = []
    request = request_from("ablation", "--smoke", "--eval-at", "7")
    with pytest.raises(StudyError, match="beyond the longest cell"):
        build_plan(request, resolve_study(request), "p", lambda budget: asked.append(budget) or CPU)
    assert not asked  # Ray would not have been started


def test_bundle_size():
    budget = Study.load("ablation").budget
    assert bundle_size("ablation", budget, 10, CPU) == 1
    assert bundle_size("ablation", budget, 10, GPU) == 10
    assert bundle_size("ablation", budget.model_copy(update={"max_bundle": 4}), 10, GPU) == 4
    assert bundle_size("ablation", budget.model_copy(update={"bundle": 3}), 10, CPU) == 3
    assert bundle_size("hpo", Study.load("hpo").budget, 10, GPU) == 1


def test_trial_resources():
    budget = Study.load("ablation").budget
    plain = SweepRequest(kind="ablation")
    assert trial_resources(budget, plain, cluster_gpus=0) == {"cpu": float(budget.cpus_per_trial)}
    assert trial_resources(budget, plain, cluster_gpus=1) == {"cpu": float(budget.cpus_per_trial), "gpu": float(budget.gpus_per_trial)}
    # asked for explicitly: honoured though no GPU is up yet
    assert trial_resources(budget, SweepRequest(kind="ablation", gpus_per_trial=0.5, cpus_per_trial=2), 0) == {"cpu": 2.0, "gpu": 0.5}
    assert trial_resources(budget, SweepRequest(kind="ablation", gpus_per_trial=0), 1) == {"cpu": float(budget.cpus_per_trial)}


def test_tune_config(tmp_path):
    ablation = plan_for(request_from("ablation", "--smoke", "--max-concurrent", "3"))
    config = tune_config(ablation, request_from("ablation", "--max-concurrent", "3"))
    assert config.num_samples == 1 and config.max_concurrent_trials == 3
    request = request_from("hpo", "--smoke", "--optuna-storage", f"sqlite:///{tmp_path / 'optuna.db'}")
    hpo = plan_for(request)
    config = tune_config(hpo, request)
    assert config.num_samples == hpo.total_trials == hpo.study.spec.budget.num_samples
    assert config.metric == hpo.template.objective.best_key and config.mode == hpo.study.metrics.objective_mode
    assert config.max_concurrent_trials == hpo.study.spec.budget.max_concurrent


def test_run_config_keeps_every_checkpoint_and_the_studys_retries(tmp_path):
    plan = plan_for(request_from("ablation", "--smoke"))
    config = run_config(plan, str(tmp_path), callbacks=[])
    assert config.name == plan.name and config.storage_path == str(tmp_path)
    assert config.failure_config.max_failures == plan.study.budget.max_failures
    assert config.checkpoint_config.num_to_keep is None  # any evaluation point's model can be reloaded


def test_faults_reach_every_trial_and_the_grid(tmp_path):
    plan = plan_for(request_from("ablation", "--smoke"))
    faults = FaultInjection(after_step=3, marker=str(tmp_path / "m"))
    faulty = plan.with_faults(faults)
    assert all(t.faults == faults for t in faulty.trials) and not any(t.faults for t in plan.trials)
    assert faulty.param_space[TRIAL_KEY] == tune.grid_search(list(faulty.trials))


def test_plan_counts_for_an_hpo_study():
    plan = plan_for(request_from("hpo", "--smoke"))
    budget = plan.study.spec.budget
    assert plan.trials == () and plan.total_trials == plan.trajectory_count == budget.num_samples
    assert plan.cell_count == budget.num_samples * len(plan.template.cells)


def test_default_names_of_one_study_differ():
    study = Study.load("ablation", preset="smoke")
    names = {default_name(study) for _ in range(20)}
    assert len(names) == 20 and all(n.startswith(f"{study.name}-") for n in names)


@pytest.mark.parametrize("flags, field, value", [
    (["--epochs", "1,10"], "epochs", [1, 10]), (["--epochs", "1 2.5"], "epochs", [1, 2.5]),
    (["--lr", "1e-3,0.01"], "lr", [1e-3, 0.01]), (["--bundle", "auto"], "bundle", "auto"), (["--bundle", "4"], "bundle", 4)])
def test_flags_parse_into_numbers_lists_and_bundle_sizes(flags, field, value):
    parsed = getattr(build_parser().parse_args(["ablation", *flags]), field)
    assert parsed == value and [type(v) for v in as_list(parsed)] == [type(v) for v in as_list(value)]


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


@pytest.mark.parametrize("flags, message", [(["--bundle", "0"], "--bundle takes a positive integer or auto"),
                                            (["--lr", "fast"], "'fast' is not a number"), (["--srm", ","], "a comma-separated list")])
def test_bad_flags_are_one_argparse_error(capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["ablation", *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_tracking_outage_is_found_behind_the_errors_it_caused():
    try:
        try:
            raise TrackingUnavailable("store down")
        except TrackingUnavailable as e:
            raise RuntimeError("the trial's result could not be logged") from e
    except RuntimeError as outer:
        assert str(_tracking_cause(outer)) == "store down"
    assert _tracking_cause(RuntimeError("a bug")) is None


def sweep_file(tmp_path: Path, request: SweepRequest, name: str = "s1") -> dict:
    plan = plan_for(request)
    storage = str(tmp_path / "ray_results")
    write_sweep_file(storage, name, {"kind": request.kind, "name": name, "request": request.recorded(),
                                     "bundle_size": plan.bundle, "study": plan.study.sections(), "study_source": plan.study.source})
    return read_sweep_file(storage, name, request.kind)


def test_the_request_round_trips_through_the_sweep_file(tmp_path):
    request = request_from("ablation", "--smoke", "--srm", "none", "--epochs", "1,2", "--lr", "1e-3", "--seeds", "2",
                           "--eval-at", "0.25", "--bundle", "2", "--name", "s1")
    meta = sweep_file(tmp_path, request)
    later = request_from("ablation", "--resume", "s1").resumed(meta["name"], recorded_choices(meta))
    for field in ("data", "smoke", "study", "srm", "epochs", "lr", "seeds", "eval_at", "objective", "bundle", "name"):
        assert getattr(later, field) == getattr(request, field), field
    # the recorded study resolves to the same trials
    study = recorded_study(meta, "sweep file")
    assert build_plan(later, study, "s1", lambda b: CPU, bundle=meta["bundle_size"]).trials == plan_for(request).trials


def test_resume_latest_finds_the_newest_sweep_of_its_kind(tmp_path):
    storage = str(tmp_path)
    for i, (name, kind) in enumerate([("old", "ablation"), ("new", "ablation"), ("newest", "hpo")]):
        write_sweep_file(storage, name, {"kind": kind, "name": name})
        os.utime(tmp_path / name / SWEEP_FILE, (1e9 + i, 1e9 + i))
    assert read_sweep_file(storage, "latest", "ablation")["name"] == "new"
    assert read_sweep_file(storage, "latest", "hpo")["name"] == "newest"
    with pytest.raises(StudyError, match="sweep 'newest' is a hpo sweep, not ablation"):
        read_sweep_file(storage, "newest", "ablation")
    with pytest.raises(StudyError, match="no sweep 'gone'"):
        read_sweep_file(storage, "gone", "ablation")
    with pytest.raises(StudyError, match="no ablation sweep found"):
        read_sweep_file(str(tmp_path / "empty"), "latest", "ablation")


STUDY = """kind = "ablation"
[space]
srm = ["none"]
epochs = [1, 2]
[cutoff]
patience_epochs = 3
[presets.smoke.data]
size = "small"
"""


def edited_copy(tmp_path: Path) -> Path:
    path = tmp_path / "mine.toml"
    path.write_text(STUDY)
    return path


def test_resume_runs_the_recorded_study_and_says_what_the_edit_would_change(tmp_path, capsys):
    path = edited_copy(tmp_path)
    request = request_from("ablation", "--study", str(path), "--smoke", "--name", "s1")
    meta = sweep_file(tmp_path, request)
    recorded = recorded_study(meta, "sweep file")
    path.write_text(STUDY.replace("patience_epochs = 3", "patience_epochs = 7"))
    later = request_from("ablation", "--resume", "s1").resumed("s1", recorded_choices(meta))
    study = resumed_study(later, meta)
    out = capsys.readouterr().out
    assert study.sections() == recorded.sections() and study.cutoff.patience_epochs != 7
    assert "[cutoff] patience_epochs: 3.0 → 7.0" in out
    assert "with the study recorded when it started" in out and "--adopt-study-file" in out
    adopted = resumed_study(SweepRequest.from_flags({**vars(later), "adopt_study_file": True}), meta)
    assert adopted.cutoff.patience_epochs == 7 and "--adopt-study-file" in capsys.readouterr().out
    # unchanged file: nothing to say but which study runs
    path.write_text(STUDY)
    resumed_study(later, meta)
    assert "resolves differently" not in capsys.readouterr().out


def test_study_differences_names_section_and_key():
    a = Study.load("ablation", preset="smoke")
    b = Study.load("ablation", preset="smoke", overrides={"space": {"seeds": a.spec.space.seeds + 1}})
    assert study_differences(a, a) == []
    assert study_differences(a, b) == [f"[space] seeds: {a.spec.space.seeds!r} → {a.spec.space.seeds + 1}"]


def test_cutoff_uses_the_study_recorded_with_the_sweep(tmp_path):
    path = edited_copy(tmp_path)
    meta = sweep_file(tmp_path, request_from("ablation", "--study", str(path), "--smoke", "--name", "s1"))
    path.write_text(STUDY.replace("patience_epochs = 3", "patience_epochs = 7"))
    results = SimpleNamespace(name="s1", kind="ablation", parent_run_id="r",
                              parent=SimpleNamespace(data=SimpleNamespace(params={"study": str(path), "preset": "smoke"})))
    study, where = cutoff_study(results, str(tmp_path / "ray_results"), "sqlite:///unused.db")
    assert study.sections() == meta["study"] and "recorded in" in where


def test_the_recorded_study_is_checked_by_the_schema():
    sections = Study.load("ablation", preset="smoke").sections()
    sections["budget"] = {**sections["budget"], "max_failure": 5}
    with pytest.raises(StudyError, match=r"sweep file: \[budget\] max_failure: unknown key"):
        Study.from_sections(sections, source="sweep file")


@pytest.mark.parametrize(
    "extra, message",
    [(["--srm", "none,pool9"], "[space] srm.1: unknown SRM placement 'pool9'"), (["--lr", "0"], "[space] lr.0: Input should be greater than 0"),
     (["--epochs", "1,2.5"], "[space] epochs.1: Input should be a valid integer"),
     (["--epochs", "0"], "[space] epochs.0: Input should be greater than 0"),
     (["--eval-at", "7"], "beyond the longest cell"), (["--tracking-uri", "http://127.0.0.1:9"], "unreachable"),
     (["--seeds", "0"], "[space] seeds")],
)
def test_bad_input_stops_before_training(tmp_path, capsys, extra, message):
    storage = tmp_path / "ray_results"
    argv = ["ablation", "--smoke", "--name", "bad", "--storage-path", str(storage),
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", *extra]
    rc = main(argv)
    err = capsys.readouterr().err
    unreachable = "--tracking-uri" in extra
    assert rc == (69 if unreachable else 2), err  # an unreachable store has its own status (README, exit codes)
    assert message in err and err.startswith("error: ") and err.count("\n") == 1
    # nothing was scheduled; a bad study is refused before the sweep's lock (beside its folder) is taken
    assert not (storage / "bad").exists() if unreachable else not storage.exists()


def test_unknown_key_exits_2_naming_the_key(tmp_path, capsys):
    path = tmp_path / "s.toml"
    path.write_text('kind = "ablation"\n[budget]\nmax_failure = 5')
    assert main(["ablation", "--study", str(path), "--storage-path", str(tmp_path / "rr")]) == 2
    err = capsys.readouterr().err
    assert "max_failure: unknown key" in err and str(path) in err and err.count("\n") == 1
    assert not (tmp_path / "rr").exists()


def test_an_existing_sweep_name_is_refused_unless_resuming(tmp_path, capsys):
    (tmp_path / "ray_results" / "taken").mkdir(parents=True)
    assert main(["ablation", "--smoke", "--name", "taken", "--storage-path", str(tmp_path / "ray_results")]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--resume taken" in err


def test_auto_on_cpus_bundles_one_seed_as_a_wide_network_and_never_idles_a_cpu():
    from fakedet.bundle import wide_supported
    from fakedet.sweep.plan import cpu_wide_bundle, wide_config
    from fakedet.train import build_initial

    # 3 placements x 4 rates x 1 seed: a same-seed group holds the 4 rates
    request = request_from("ablation", "--lr", "1e-4,1e-3,1e-2,3e-2", "--seeds", "1")
    study = resolve_study(request)
    plan = build_plan(request, study, "p", lambda budget: dict(CPU), capacity=lambda: 2.0)
    assert plan.bundle == 4 and plan.bundle_by_seed and plan.total_trials == 3
    for trial in plan.trials:
        configs = [t.config for t in trial.trajectories]
        assert len({c.seed for c in configs}) == 1 and len({bundle_key(c) for c in configs}) == 1
        assert len({c.lr for c in configs}) == 4
    # on 8 CPUs bundles of 4 would leave 3 trials for 8 CPUs, and smaller ones do not pay: none
    assert build_plan(request, study, "p", lambda budget: dict(CPU), capacity=lambda: 8.0).bundle == 1
    # --max-concurrent caps the slots: 2 at a time lets the groups bundle again
    capped = request_from("ablation", "--lr", "1e-4,1e-3,1e-2,3e-2", "--seeds", "1", "--max-concurrent", "2")
    assert build_plan(capped, resolve_study(capped), "p", lambda budget: dict(CPU), capacity=lambda: 8.0).bundle == 4
    # the main job's stand-in grid has 2 rates: pairs do not pay (CPU_WIDE_MIN), so one trajectory per trial
    main = request_from("ablation")
    assert build_plan(main, resolve_study(main), "p", lambda budget: dict(CPU), capacity=lambda: 2.0).bundle == 1
    # GPUs, a number, and a resumed sweep (no capacity asked) keep their own choice
    assert not build_plan(request, study, "p", lambda budget: dict(GPU), capacity=lambda: 2.0).bundle_by_seed
    single = request_from("ablation", "--lr", "1e-4,1e-3,1e-2,3e-2", "--seeds", "1", "--bundle", "1")
    assert build_plan(single, resolve_study(single), "p", lambda b: dict(CPU), capacity=lambda: 2.0).bundle == 1
    assert plan_for(request).bundle == 1
    # a module the wide form does not know trains alone under by_seed
    attention = Study.load("attention")
    trajectories = attention.trajectories()
    assert cpu_wide_bundle(trajectories, attention.budget, 1) == 1
    # the config-level test agrees with the module-level one for every placement and module
    for srm in ("none", "pool1", "pool2", "both"):
        for module in ("srm", "se", "eca", "cbam"):
            cfg = TrainConfig(srm=srm, attention=module)
            assert wide_config(cfg) == wide_supported(build_initial(cfg, "cpu")), (srm, module)


def test_a_resumed_wide_bundled_sweep_rebuilds_the_same_trials(tmp_path):
    request = request_from("ablation", "--lr", "1e-4,1e-3,1e-2,3e-2", "--seeds", "1", "--name", "w1")
    plan = build_plan(request, resolve_study(request), "w1", lambda budget: dict(CPU), capacity=lambda: 2.0)
    storage = str(tmp_path / "ray_results")
    write_sweep_file(storage, "w1", {"kind": "ablation", "name": "w1", "request": request.recorded(), "bundle_size": plan.bundle,
                                     "bundle_by_seed": plan.bundle_by_seed, "study": plan.study.sections(),
                                     "study_source": plan.study.source})
    meta = read_sweep_file(storage, "w1", "ablation")
    later = request_from("ablation", "--resume", "w1").resumed(meta["name"], recorded_choices(meta))
    again = build_plan(later, recorded_study(meta, "sweep file"), "w1", lambda b: dict(CPU), bundle=meta["bundle_size"],
                       by_seed=meta["bundle_by_seed"])
    assert again.trials == plan.trials and again.bundle_by_seed
