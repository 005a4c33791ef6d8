"""`python sweeps/run.py ablation|hpo|cutoff`: the sweep command line.

The top of the stack: it plans a sweep (`fakedet.sweep.plan`), runs it on Ray Tune
(`fakedet.sweep.execute`), then has `fakedet.report` analyse it and log the analysis to MLflow.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fakedet.config import default_cache_root
from fakedet.console import robust_output, say, say_last
from fakedet.sweep.refusals import Exit, Refused, disk_full
from fakedet.sweep.request import SweepRequest

if TYPE_CHECKING:
    from fakedet.sweep.study import Study


def _number(text: str) -> int | float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    return int(value) if text.strip().lstrip("+-").isdigit() else value


def _list(item_type):
    def parse(text: str) -> list:
        items = [t for t in text.replace(" ", ",").split(",") if t]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        return [item_type(t) for t in items]

    return parse


def _objective(text: str) -> str | list[str]:
    names = _list(str)(text)
    return names[0] if len(names) == 1 else names


def _bundle(text: str) -> int | str:
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"--bundle takes a positive integer or auto, not {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sweeps/run.py", description="Sweeps of CIFAKE-trained detectors on Ray Tune, Optuna and MLflow.")
    sub = parser.add_subparsers(dest="kind", required=True, metavar="{ablation,hpo,cutoff}")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--study", help="study file (default: sweeps/<command>.toml)")
        p.add_argument("--data", default="synthetic", help="synthetic (built-in stand-in, default), kaggle, or PATH (prepared cache or folder of sources)")
        p.add_argument("--cache-root", help=f"prepared-data cache (default: {default_cache_root()})")
        p.add_argument("--smoke", action="store_true", help="the study's smoke preset: tiny grid, small stand-in, about 80 s on 2 cores")
        p.add_argument("--name", help="sweep name (default: <study>-<date>-<time>-<random>); names the Ray experiment and the MLflow parent run")
        p.add_argument("--resume", nargs="?", const="latest", metavar="NAME", help="continue an interrupted sweep (default: the latest)")
        p.add_argument("--allow-data-change", action="store_true", help="with --resume: continue although the prepared data's hash changed")
        p.add_argument("--trust-changed-state", action="store_true",
                       help="with --resume: let Ray restore its saved state although it changed since this sweep's driver last "
                            "stopped (after a killed driver). Ray unpickles that state: whoever could write it can run code as you")
        p.add_argument("--adopt-study-file", action="store_true",
                       help="with --resume: run today's study file instead of the study recorded when the sweep started")
        p.add_argument("--address", help="join a Ray cluster (e.g. auto, or ray://host:10001); default: start a local Ray")
        p.add_argument("--num-cpus", type=int, help="CPUs for a local Ray (default: all)")
        p.add_argument("--ray-temp-dir", help="temp dir for a local Ray")
        p.add_argument("--storage-path", help="Ray Tune results and checkpoints (default: ./ray_results; shared storage on a multi-node cluster)")
        p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///./mlflow.db)")
        p.add_argument("--experiment", help="MLflow experiment (default: the study's name)")
        p.add_argument("--gpus-per-trial", type=float, help="GPU fraction per trial where GPUs exist (default: the study's, 0.25)")
        p.add_argument("--cpus-per-trial", type=float, help="CPUs per trial (default: the study's, 1)")
        p.add_argument("--max-concurrent", type=int, help="at most this many trials at once")
        p.add_argument("--tracking-outage", type=float, default=600.0, metavar="SECONDS",
                       help="how long an unreachable MLflow server is waited for (writes queued, retried) before the sweep stops resumably (default 600)")
        p.add_argument("--verbose", action="store_true", help="show the trials' own output")
        p.add_argument("--crash-once-after-step", type=int, help=argparse.SUPPRESS)  # fault injection for tests
        p.add_argument("--kill-after-planning", action="store_true", help=argparse.SUPPRESS)  # fault injection for tests

    p = sub.add_parser("ablation", help="SRM placement × epochs × learning rate × seeds")
    common(p)
    p.add_argument("--srm", type=_list(str), help="placements, e.g. none,pool1,pool2")
    p.add_argument("--epochs", type=_list(_number), help="epoch counts, e.g. 1,10,50,100 (cells share one trajectory per placement/lr/seed)")
    p.add_argument("--lr", type=_list(_number), help="learning rates, e.g. 1e-4,1e-3,1e-2")
    p.add_argument("--seeds", type=int, help="seeds per cell (11, 12, ...)")
    p.add_argument("--eval-at", type=_list(_number), help="extra evaluation points in epochs")
    p.add_argument("--bundle", type=_bundle, help="trajectories trained together per trial, one fused step (default: the study's, auto: 1 on CPUs, up to 64 on GPUs)")

    p = sub.add_parser("hpo", help="Optuna TPE (through Ray Tune's OptunaSearch) with ASHA stopping")
    common(p)
    p.add_argument("--objective", type=_objective,
                   help="metric to optimise (default: the study's, agiri_val/auc); several, comma-separated "
                        "(cifake_val/auc,agiri_val/auc), search their Pareto front")
    p.add_argument("--optuna-storage", help="Optuna storage URL (default: sqlite:///./optuna.db)")

    p = sub.add_parser("cutoff", help="training-length cutoffs of a finished sweep, from MLflow")
    p.add_argument("--sweep", required=True, help="the sweep's name (or its MLflow parent run id)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///./mlflow.db)")
    p.add_argument("--study", help="study file whose [metrics] and [cutoff] settings to use (default: the study recorded with the sweep)")
    p.add_argument("--storage-path", help="where the sweep's file is looked for (default: ./ray_results)")
    return parser


def run_study(request: SweepRequest) -> int:
    """Resolve the sweep's name, hold its lock for the driver's life, and run it."""
    from fakedet.sweep.lock import sweep_lock
    from fakedet.sweep.plan import resolve_study, sweep_name
    from fakedet.sweep.record import read_sweep_file, storage_root
    from fakedet.sweep.request import check_name

    storage = storage_root(request.storage_path)
    if request.resume:
        name = read_sweep_file(storage, request.resume, request.kind)["name"]
        study = None
    else:
        study = resolve_study(request)
        # the grid expanded (or the HPO template built) now, so that a study that cannot run is refused
        # before the lock, the pre-flight or Ray touch anything; the plan builds them again, cheaply
        study.trajectories() if request.kind == "ablation" else study.hpo_template()
        name = sweep_name(request, study)
    check_name("sweep name", name)
    with sweep_lock(storage, name):
        return _run_locked(request, storage, name, study)


def _run_locked(request: SweepRequest, storage: str, name: str, study: Study | None) -> int:
    from mlflow.tracking import MlflowClient

    from fakedet.sweep.preflight import answering_quickly, preflight
    from fakedet.sweep.record import check_resumable, read_sweep_file, recorded_choices, sweep_exists
    from fakedet.sweep.request import EXPERIMENT_NAME, check_name
    from fakedet.sweep.study import StudyError
    from fakedet.sweep.store import default_tracking_uri, mlflow_ui_command

    kind = request.kind
    meta, bundle, by_seed = None, None, False
    if request.resume:
        meta = check_resumable(read_sweep_file(storage, name, kind), storage)  # again, now that the lock is held
        choices = recorded_choices(meta)
        request = request.resumed(meta["name"], choices)
        study = resumed_study(request, meta)
        # the bundle size chosen when the sweep started (older sweep files kept it as the `bundle` choice)
        bundle = meta.get("bundle_size") or (choices.get("bundle") if isinstance(choices.get("bundle"), int) else None)
        by_seed = bool(meta.get("bundle_by_seed", False))
    elif sweep_exists(storage, name):
        raise StudyError(f"a sweep named {name!r} already exists under {storage}; "
                         f"continue it with --resume {name}, or choose another --name")
    uri = meta["tracking_uri"] if meta else (request.tracking_uri or default_tracking_uri())
    experiment = meta["experiment"] if meta else check_name("experiment", request.experiment or study.name, EXPERIMENT_NAME)
    cache_root = request.cache_root or default_cache_root()
    preflight(uri, experiment, storage, cache_root, needs_cache=not (Path(request.data) / "manifest.json").is_file())
    if meta:
        with answering_quickly():
            parent = MlflowClient(uri).get_run(meta["parent_run_id"])
        if parent.info.status == "FINISHED":
            say(f"sweep {name} has already finished; nothing to resume "
                f"(to analyse it again: python sweeps/run.py cutoff --sweep {name} --tracking-uri {uri})")
            return 0
        check_restorable(storage, name, parent.data.tags, request.trust_changed_state)
    # Ray, Optuna and the data layer load only now: a refused pre-flight answers without them
    from fakedet.sweep.execute import ray_cpus, ray_resources, run_sweep
    from fakedet.sweep.plan import build_plan

    # a resumed sweep rebuilds the trials it recorded: no new bundling choice (capacity is not asked)
    plan = build_plan(request, study, name, ray_resources(request), bundle=bundle, by_seed=by_seed,
                      capacity=None if meta else ray_cpus)
    if not meta:  # a resumed sweep's checkpoints are partly there already: its disk was checked when it started
        from fakedet.sweep.preflight import check_free_space, storage_estimate

        points = [len({*t.config.eval_at, float(t.config.epochs)}) for spec in (plan.trials or (plan.template,))
                  for t in spec.trajectories] * (1 if plan.trials else plan.total_trials)
        check_free_space(storage, storage_estimate(points), f"its {len(points)} trajectories' checkpoints")
    say(f"MLflow tracking: {uri} (experiment {experiment!r}); view it with: {mlflow_ui_command(uri)}")
    if plan.kind == "hpo":
        stops = "ASHA may stop a trial early" if not plan.study.metrics.multi_objective else "each runs its full length"
        shape = (f"{plan.total_trials} trials sampled by Optuna, one model each, up to {plan.cell_epochs[-1]:g} epochs "
                 f"({stops})")
    else:
        shape = f"{plan.trajectory_count} trajectories, {plan.cell_count} cells"
    say(f"sweep {plan.name}: {shape}, study {plan.study.source}" + (f" (preset {plan.study.preset})" if plan.study.preset else ""))

    resume_cmd = f"python sweeps/run.py {kind} --resume {plan.name}" + (f" --storage-path {request.storage_path}" if request.storage_path else "")
    try:
        outcome = run_sweep(plan, request, storage, uri, experiment, meta)
    except KeyboardInterrupt:
        say_last(f"\n{TERMINATION.word()}. Resume with:\n  {resume_cmd}")
        return Exit.INTERRUPTED
    except Refused as e:  # stopped mid-sweep (a full disk, a checkpoint that does not load): resumable once fixed
        print(f"error: sweep stopped: {e}. Resume with: {resume_cmd}", file=sys.stderr)
        return e.code
    tracking = outcome.tracking
    if outcome.tracking_error:
        code = tracking_exit(outcome.tracking_status, outcome.tracking_error)
        if code != Exit.TRACKING_OUTAGE:  # refused, not away: waiting would not help
            print(f"error: sweep stopped: {outcome.tracking_error}. The trials' checkpoints are kept under "
                  f"{storage}/{plan.name}; once the permission is back, resume with: {resume_cmd}", file=sys.stderr)
            return code
        say(f"\nsweep stopped: {outcome.tracking_error}. Nothing measured is lost: the trials' checkpoints are under "
            f"{storage}/{plan.name}. Once MLflow is reachable again, resume with:\n  {resume_cmd}")
        try:  # mark the parent where the store answers again; the resume reopens it
            tracking.client().set_terminated(tracking.parent_run_id, "FAILED")
        except Exception:  # noqa: BLE001 - the store is down: said above
            pass
        return code
    if not outcome.complete:
        from fakedet.sweep.execute import close_parent

        close_parent(tracking, "KILLED")  # ended from outside; --resume reopens it
        say_last(f"\nsweep {TERMINATION.word()} ({outcome.ended_cells}/{plan.cell_count} cells ended). Resume with:\n  {resume_cmd}")
        return Exit.INTERRUPTED
    from fakedet.report import analyse_sweep

    status = analyse_sweep(tracking, plan.study, plan.cell_epochs, outcome.record)
    if plan.kind == "hpo":
        from fakedet.sweep.execute import optuna_storage_url
        from fakedet.sweep.hpo import answer_sweep

        answer_sweep(optuna_storage_url(request), plan.name, tracking.client(), tracking.parent_run_id)
    if outcome.failed_trials:
        say(f"{outcome.failed_trials} trial(s) failed; their cells are marked FAILED in MLflow")
    tracking.client().set_terminated(tracking.parent_run_id, "FAILED" if outcome.failed_trials else "FINISHED")
    say_links(tracking)
    return Exit.FAILED_TRIALS if outcome.failed_trials or status else Exit.OK


def tracking_exit(status: int | None, error: str = "") -> Exit:
    """The exit status of a sweep stopped by its tracking store: refused credentials or permission, a full
    disk (SQLite's "database or disk is full", waited for as an outage first), else an outage."""
    if disk_full(RuntimeError(error)):
        return Exit.DISK_FULL
    return {401: Exit.BAD_CREDENTIALS, 403: Exit.NOT_PERMITTED}.get(status, Exit.TRACKING_OUTAGE)


def check_restorable(storage: str, name: str, parent_tags: dict[str, str], trust_changed: bool) -> None:
    """Before Ray unpickles the sweep's saved state: its folder private to this user and its files the ones
    the sweep's driver left at its last stop (`fakedet.sweep.trust`). Local storage only."""
    from fakedet.sweep.trust import TAG_STATE_DIGEST, check_state

    if "://" in storage:
        say(f"resuming from {storage}: a storage URI's permissions and contents are not checked before Ray restores it "
            f"(cluster/README.md, security)")
        return
    warning = check_state(Path(storage), Path(storage) / name, parent_tags.get(TAG_STATE_DIGEST), trust_changed)
    if warning:
        say(f"warning: {warning}")


def say_links(tracking) -> None:
    """The MLflow links a sweep ends with (the report's is above them, with the analysis): its runs (only
    this sweep's, in the model-training view), its parent run (figures, analysis tables, report), and the
    cells side by side."""
    from fakedet.sweep.store import compare_link, mlflow_ui_command, run_link, runs_link

    uri, exp, parent = tracking.uri, tracking.experiment_id, tracking.parent_run_id
    cells = [r.info.run_id for r in sorted(tracking.cell_runs(), key=lambda r: r.info.run_name)]
    say(f"\nMLflow ({mlflow_ui_command(uri)}):\n"
        f"  runs:    {runs_link(uri, exp, tracking.sweep_name)}\n"
        f"  parent:  {run_link(uri, exp, parent)}\n"
        f"  compare: {compare_link(uri, exp, cells)}")


def resumed_study(request: SweepRequest, meta: dict[str, Any]) -> Study:
    """The study a resumed sweep runs: the resolved study recorded when it started, with what today's study
    file (same preset and overrides) would change said; today's with --adopt-study-file."""
    from fakedet.sweep.plan import resolve_study, study_differences
    from fakedet.sweep.record import recorded_study
    from fakedet.sweep.study import StudyError

    name = meta["name"]
    recorded = recorded_study(meta, f"the sweep file of {name}")
    if recorded is None:  # a sweep file from before the study was recorded
        say(f"sweep {name} recorded no resolved study; resuming with today's {request.study_path}")
        return resolve_study(request)
    try:
        today = resolve_study(request)
    except StudyError as e:
        if request.adopt_study_file:
            raise
        say(f"today's study file no longer resolves ({e}); the recorded study is unaffected")
        return recorded
    differences = study_differences(recorded, today)
    if differences:
        say(f"today's {today.source} resolves differently from the study recorded with sweep {name}:\n  "
            + "\n  ".join(differences))
    if request.adopt_study_file:
        say(f"resuming sweep {name} with today's study {today.source} (--adopt-study-file)")
        return today
    say(f"resuming sweep {name} with the study recorded when it started ({recorded.source})"
        + ("; pass --adopt-study-file to take today's" if differences else ""))
    return recorded


def cutoff_study(results, storage: str, tracking_uri: str) -> tuple[Study, str]:
    """The study a finished sweep ran, and where it was read: its sweep file under `storage`, else the
    parent run's `analysis/run_record.json`, else the study file its parameters name."""
    import json
    import tempfile

    from fakedet.sweep.record import read_sweep_file, recorded_study, sweep_exists
    from fakedet.sweep.study import Study

    if results.name and sweep_exists(storage, results.name):
        meta = read_sweep_file(storage, results.name, results.kind)
        study = recorded_study(meta, f"the sweep file of {results.name}")
        if study is not None:
            return study, f"recorded in {storage}/{results.name}"
    from mlflow.tracking import MlflowClient

    from fakedet.results import no_progress_bar

    client = MlflowClient(tracking_uri)
    try:
        with tempfile.TemporaryDirectory() as d, no_progress_bar():
            record = json.loads(Path(client.download_artifacts(results.parent_run_id, "analysis/run_record.json", d)).read_text())
    except Exception:  # noqa: BLE001 - no analysis logged yet: fall back to the parameters
        record = {}
    if record.get("study"):
        return Study.from_sections(record["study"], source=f"run {results.parent_run_id} analysis/run_record.json"), \
            "recorded in the parent run's analysis/run_record.json"
    params = results.parent.data.params
    study = Study.load(params.get("study") or results.kind, preset=params.get("preset") or None)
    return study, f"today's {study.source}, named by the parent run's parameters"


def run_cutoff(args: argparse.Namespace) -> int:
    """Analyse a finished sweep again from what MLflow holds (the sweep's name or parent run id): a new
    analysis beside the sweep's own (`analysis/v<N>/`), which stays as it was."""
    from fakedet.provenance import run_record
    from fakedet.report import AnalysisOrigin, analyse_sweep
    from fakedet.results import load_sweep, SweepNotFoundError
    from fakedet.sweep.plan import study_differences
    from fakedet.sweep.record import storage_root
    from fakedet.sweep.study import Study, StudyError
    from fakedet.sweep.store import SweepTracking, check_tracking_uri, default_tracking_uri

    uri = args.tracking_uri or default_tracking_uri()
    check_tracking_uri(uri)
    try:
        results = load_sweep(uri, args.sweep)
    except (SweepNotFoundError, FileNotFoundError) as e:
        raise StudyError(str(e)) from None
    recorded, where = cutoff_study(results, storage_root(args.storage_path), uri)
    study, changes = recorded, []
    if args.study:
        study = Study.load(args.study)
        changes = study_differences(recorded, study)
        where = f"--study {args.study}; the sweep's own was {where}"
    say(f"study: {study.source} ({where})")
    if changes:
        say("it differs from the study the sweep recorded:\n  " + "\n  ".join(changes))
    tracking = SweepTracking(uri, results.parent.info.experiment_id, results.parent_run_id, results.name)
    close_if_orphaned(tracking, results.parent.info.status, storage_root(args.storage_path))
    epochs = sorted(results.cells["cell_epochs"].unique()) if len(results.cells) else []
    command = "sweeps/run.py cutoff --sweep " + args.sweep + (f" --study {args.study}" if args.study else "")
    status = analyse_sweep(tracking, study, epochs, run_record(), AnalysisOrigin(command, where, tuple(changes)))
    say_links(tracking)
    return status


class Termination:
    """SIGTERM (a Kubernetes pod or a batch job being stopped, `kill PID`) handled as Ctrl-C: whatever
    handles SIGINT at that moment (Tune's own stop while trials run: every trial saves its state once more;
    Python's KeyboardInterrupt before and after) handles it, and the exit status says which signal came
    (`Exit.TERMINATED`, 143). A second SIGTERM, like a second Ctrl-C, stops at once."""

    def __init__(self) -> None:
        self.received = False

    def __enter__(self) -> "Termination":
        self.received, self.previous = False, None
        if threading.current_thread() is threading.main_thread():  # only the main thread may set a handler
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)

    def _handle(self, signum, frame) -> None:
        self.received = True
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(signal.SIGINT, frame)
        else:
            raise KeyboardInterrupt

    def word(self) -> str:
        return "terminated (SIGTERM)" if self.received else "interrupted"

    def status(self, code: int) -> int:
        return int(Exit.TERMINATED) if self.received and code == Exit.INTERRUPTED else int(code)


TERMINATION = Termination()


def close_if_orphaned(tracking, status: str, storage: str) -> None:
    """A parent run still RUNNING whose driver is gone (killed: kill -9, a lost node) is closed as KILLED, as
    its driver would have closed it; `--resume` reopens it. The sweep's lock tells: the kernel drops it with
    the driver, so a lock that can be taken has no live driver. A lock held: the sweep is running, and what
    it has logged so far is analysed, its parent left as it is."""
    from fakedet.sweep.lock import sweep_lock

    if status != "RUNNING" or not tracking.sweep_name:
        return
    if "://" in storage or not (Path(storage) / tracking.sweep_name).is_dir():
        say(f"sweep {tracking.sweep_name}: its parent run is RUNNING and its folder is not under {storage} (pass "
            f"--storage-path to tell whether its driver lives); analysing what it has logged so far")
        return
    try:
        with sweep_lock(storage, tracking.sweep_name):
            tracking.client().set_terminated(tracking.parent_run_id, "KILLED")
        say(f"sweep {tracking.sweep_name}: its parent run was RUNNING with no live driver (lock {storage}/"
            f"{tracking.sweep_name}.lock free): closed as KILLED; --resume {tracking.sweep_name} continues it")
    except Refused as e:
        if e.code == Exit.SWEEP_LOCKED:
            say(f"sweep {tracking.sweep_name} is still running ({e}); analysing what it has logged so far")
        else:
            say(f"sweep {tracking.sweep_name}: its parent run is RUNNING; whether its driver lives is unknown ({e})")


def main(argv: list[str] | None = None) -> int:
    # torch, Ray and MLflow load only after the arguments parse: --help and bad flags answer at once
    from fakedet.data import DataError
    from fakedet.sweep.study import StudyError

    robust_output()
    args = build_parser().parse_args(argv)
    with TERMINATION:
        try:
            if args.kind == "cutoff":
                return run_cutoff(args)
            return TERMINATION.status(run_study(SweepRequest.from_flags(vars(args))))
        except Refused as e:
            print(f"error: {e}", file=sys.stderr)
            return int(e.code)
        except (StudyError, DataError, ConnectionError, FileNotFoundError, ValueError) as e:
            where = disk_full(e)
            print(f"error: {e}" if where is None else _disk_full_line(where, args), file=sys.stderr)
            return 2 if where is None else int(Exit.DISK_FULL)
        except KeyboardInterrupt:
            print(TERMINATION.word(), file=sys.stderr)
            return TERMINATION.status(Exit.INTERRUPTED)
        except Exception as e:  # noqa: BLE001 - a full disk, wherever it is met, is one line; any other fault is a bug
            where = disk_full(e)
            if where is None:
                raise
            print(_disk_full_line(where, args), file=sys.stderr)
            return int(Exit.DISK_FULL)


# a device with less free space than this, among those the sweep writes, is the one that filled up
NEARLY_FULL = 1 << 20


def _disk_full_line(where: str, args: argparse.Namespace) -> str:
    """One line for a full disk: the file the OS named, else the folder (cache, storage, tracking store)
    whose device has under `NEARLY_FULL` free."""
    import shutil

    from fakedet.sweep.refusals import UNKNOWN_DEVICE
    from fakedet.sweep.record import storage_root

    if where == UNKNOWN_DEVICE:
        tracking = getattr(args, "tracking_uri", None) or ""
        candidates = [getattr(args, "cache_root", None) or default_cache_root(), storage_root(getattr(args, "storage_path", None)),
                      tracking.removeprefix("sqlite:///") if tracking.startswith("sqlite:///") else str(Path.cwd())]
        for folder in (Path(c) for c in candidates if c and "://" not in c):
            while not folder.exists() and folder != folder.parent:
                folder = folder.parent
            if shutil.disk_usage(folder).free < NEARLY_FULL:
                where = str(folder)
                break
    return f"error: no space left on the device of {where}; free space there and run the command again (a started sweep: with --resume)"
