"""The main job's wall time against its compute floor: how much of a sweep is training and evaluation.

The floor is the work the plan asks for at the single-thread rates of this machine, spread over the CPUs
Ray may use: for each trajectory, its training images (steps x batch size) over the training rate of its
placement, plus its evaluation images (points x images in the evaluation sets) over the evaluation rate;
summed and divided by the CPUs (at most one per trial), or the longest trajectory where that is longer.
The rates are measured in the same run, one torch thread per placement, on the sweep's own data, in
thread CPU seconds (what one trial's core does, which load on a shared machine inflates less than wall
time): `fakedet.train.ModuleStepper` steps on the training set, `fakedet.train.eval_logits` on the
evaluation sets. Everything else a sweep does (Ray and its worker processes, imports, trial set-up,
checkpoints, MLflow writes, the analysis) is the ratio's excess over 1.

The sweep runs as a user runs it (`sweeps/run.py ablation ...`, its own process, a fresh local Ray and
MLflow SQLite store in a temporary folder), on data prepared before the clock starts. `--fresh-workers`
runs it once more with a new Ray worker process for every trial (`FAKEDET_REUSE_WORKERS=0`), the two
runs alternating, so that the gap between trials that worker reuse saves is measured side by side.

    python benchmarks/bench_sweep.py                          # the main job (standin preset, 12 trajectories)
    python benchmarks/bench_sweep.py --epochs 1,10            # a stated fraction of it: shorter trajectories
    python benchmarks/bench_sweep.py --smoke --fresh-workers  # the smoke preset, workers reused vs not
    python benchmarks/bench_sweep.py --plan-only              # the floor alone, no sweep

The load average (`os.getloadavg`) is printed before and after each run: on a shared machine a wall-time
ratio is only as good as the load it was measured under.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: the checkout's fakedet, not an installed one
    sys.path.insert(0, str(REPO))

from fakedet.config import TrainConfig, default_cache_root  # noqa: E402
from fakedet.data import load_splits, resolve_data  # noqa: E402
from fakedet.sweep.plan import resolve_study  # noqa: E402
from fakedet.sweep.request import SweepRequest  # noqa: E402
from fakedet.sweep.spec import Trajectory  # noqa: E402
from fakedet.sweep.trainable import SWEEP_EVAL_SETS  # noqa: E402
from fakedet.sweep_cli import build_parser  # noqa: E402
from fakedet.train import BatchSchedule, ModuleStepper, build_initial, epoch_order, eval_logits, eval_steps, sgd_for, total_steps  # noqa: E402
from fakedet.preprocess import uint8_tensor  # noqa: E402


@dataclass(frozen=True)
class Rates:
    """Single-thread images per CPU-second of one placement."""

    train: float
    eval: float


@dataclass(frozen=True)
class Work:
    """One trajectory's images: trained (steps x batch) and evaluated (points x evaluation images)."""

    srm: str
    train_images: int
    eval_images: int


def plan_work(trajectories: list[Trajectory], n_train: int, n_eval: int) -> list[Work]:
    """Each trajectory's training and evaluation images, as the loop will run them."""
    work = []
    for t in trajectories:
        cfg = t.config
        spe = BatchSchedule(n_train, cfg.batch_size, cfg.shuffle, cfg.seed).steps_per_epoch
        steps = total_steps(cfg, spe)
        # `reference` drops the remainder (every step a full batch); `full` ends each epoch on a short one
        images = steps * cfg.batch_size if cfg.shuffle == "reference" else \
            (steps // spe) * n_train + min(steps % spe * cfg.batch_size, n_train)
        work.append(Work(cfg.srm, images, len(eval_steps(cfg, spe)) * n_eval))
    return work


def compute_floor(work: list[Work], rates: dict[str, Rates], cpus: int) -> float:
    """Seconds the plan's training and evaluation take at least on `cpus` cores: the total work over the
    cores a sweep can keep busy (one per trial), or the longest trajectory, whichever is longer."""
    if not work:
        raise ValueError("no trajectories: nothing to time")
    each = [w.train_images / rates[w.srm].train + w.eval_images / rates[w.srm].eval for w in work]
    return max(sum(each) / max(1, min(cpus, len(work))), max(each))


def measure_rates(placements: list[str], splits: dict, steps: int, warmup: int = 20) -> dict[str, Rates]:
    """Training and evaluation images per thread-CPU-second of each placement, one torch thread, on the
    sweep's data: `steps` training steps after `warmup`, then one pass over the evaluation sets."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_set = splits["cifake_train"]
        images = uint8_tensor(train_set.images)
        labels = torch.from_numpy(np.asarray(train_set.labels, dtype=np.float32))
        eval_images = [uint8_tensor(splits[k].images) for k in SWEEP_EVAL_SETS if k in splits]
        device = torch.device("cpu")
        rates = {}
        for srm in placements:
            cfg = TrainConfig(srm=srm, epochs=1, device="cpu")
            schedule = BatchSchedule(len(train_set), cfg.batch_size, cfg.shuffle, cfg.seed)
            model = build_initial(cfg, device)
            stepper = ModuleStepper(model, sgd_for(model, cfg), device)
            order, offsets = epoch_order([schedule], 0, device)
            spe = schedule.steps_per_epoch

            def run(n: int) -> None:
                for s in range(n):
                    stepper.step(images, labels, order[:, offsets[s % spe] : offsets[s % spe + 1]])

            run(warmup)
            t0 = time.thread_time()
            run(steps)
            train_rate = steps * cfg.batch_size / (time.thread_time() - t0)
            eval_logits(model, eval_images[0][:64], cfg.eval_batch_size, device)  # first-call set-up left out
            t0 = time.thread_time()
            n = sum(len(eval_logits(model, e, cfg.eval_batch_size, device)) for e in eval_images)
            rates[srm] = Rates(train_rate, n / (time.thread_time() - t0))
        return rates
    finally:
        torch.set_num_threads(threads)


def run_sweep(flags: list[str], cache_root: str, cpus: int, reuse: bool) -> dict:
    """`sweeps/run.py ablation FLAGS` in a fresh folder; wall seconds, load average before and after."""
    with tempfile.TemporaryDirectory(prefix="fakedet-bench-sweep-") as d, \
            tempfile.TemporaryDirectory(prefix="fdray", dir="/tmp") as ray_tmp:  # Ray's socket paths stay short
        args = [sys.executable, str(REPO / "sweeps" / "run.py"), "ablation", *flags, "--name", "bench",
                "--cache-root", cache_root, "--storage-path", f"{d}/ray_results", "--tracking-uri", f"sqlite:///{d}/mlflow.db",
                "--ray-temp-dir", ray_tmp, "--num-cpus", str(cpus)]
        env = {**os.environ, "FAKEDET_REUSE_WORKERS": "1" if reuse else "0",
               "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=d)
        wall = time.perf_counter() - t0
        load_after = os.getloadavg()[0]
        if proc.returncode != 0:
            raise SystemExit(f"the sweep failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return {"reuse_workers": reuse, "wall_s": wall, "load_before": load_before, "load_after": load_after}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the study's smoke preset")
    parser.add_argument("--srm", help="placements, e.g. none,pool1 (default: the preset's)")
    parser.add_argument("--epochs", help="epoch counts, e.g. 1,10 (default: the preset's)")
    parser.add_argument("--lr", help="learning rates (default: the preset's)")
    parser.add_argument("--seeds", help="seeds per cell (default: the preset's)")
    parser.add_argument("--bundle", help="trajectories per trial (default: the study's)")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray (default: all)")
    parser.add_argument("--cache-root", default=str(default_cache_root()), help="prepared-data cache")
    parser.add_argument("--rate-steps", type=int, default=300, help="training steps timed per placement for its rate")
    parser.add_argument("--fresh-workers", action="store_true",
                        help="also run the sweep with a new worker process per trial, alternating with the default")
    parser.add_argument("--repeats", type=int, default=1, help="sweep runs per setting")
    parser.add_argument("--plan-only", action="store_true", help="print the plan's work and floor; run no sweep")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)

    flags = ["--smoke"] if args.smoke else []
    for name in ("srm", "epochs", "lr", "seeds", "bundle"):
        if getattr(args, name):
            flags += [f"--{name}", getattr(args, name)]
    request = SweepRequest.from_flags(vars(build_parser().parse_args(["ablation", *flags, "--cache-root", args.cache_root])))
    study = resolve_study(request)
    trajectories = study.trajectories()
    cache = resolve_data(request.data, args.cache_root, size=study.data.size, variant=study.data.variant)
    splits = load_splits(cache)
    n_eval = sum(len(splits[k]) for k in SWEEP_EVAL_SETS if k in splits)
    work = plan_work(trajectories, len(splits["cifake_train"]), n_eval)
    placements = sorted({w.srm for w in work})

    print(f"plan: {' '.join(flags) or '(the main job)'}: {len(work)} trajectories, "
          f"{sum(w.train_images for w in work):,} training images, {sum(w.eval_images for w in work):,} evaluation "
          f"images ({n_eval:,} per point); {args.num_cpus} CPUs; torch {torch.__version__}")
    print(f"load average before the rates: {os.getloadavg()[0]:.2f}")
    rates = measure_rates(placements, splits, args.rate_steps)
    for srm, r in rates.items():
        print(f"  {srm:6} single-thread: training {r.train:,.0f} img/CPU-s, evaluation {r.eval:,.0f} img/CPU-s")
    floor = compute_floor(work, rates, args.num_cpus)
    print(f"compute floor: {floor:.1f} s on {args.num_cpus} CPUs (load average after the rates: {os.getloadavg()[0]:.2f})")
    runs = []
    if not args.plan_only:
        settings = [True, False] if args.fresh_workers else [True]
        for r in range(args.repeats):
            for reuse in settings if r % 2 == 0 else settings[::-1]:  # alternated, so load drifts hit both
                run = run_sweep(flags, args.cache_root, args.num_cpus, reuse)
                run["ratio"] = run["wall_s"] / floor
                runs.append(run)
                print(f"  sweep, workers {'reused' if reuse else 'fresh per trial'}: {run['wall_s']:.1f} s wall = "
                      f"{run['ratio']:.2f}x the floor (load average {run['load_before']:.2f} before, {run['load_after']:.2f} after)")
    if args.json:
        Path(args.json).write_text(json.dumps({"flags": flags, "cpus": args.num_cpus, "floor_s": floor,
                                               "rates": {k: asdict(v) for k, v in rates.items()},
                                               "work": [asdict(w) for w in work], "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
