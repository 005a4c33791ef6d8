"""The training loop's steppers side by side on the CPU: memory layout of one model, and the two bundle forms.

- `layout`: `fakedet.train.ModuleStepper` on contiguous NCHW (the default) against `channels_last=True` (weights
  and batches in NHWC memory), per SRM placement;
- `bundle`: K models stepped one after another (K `ModuleStepper`s, what K trials do) against one
  `fakedet.bundle.StackedStepper` (vmap; the models' own seeds) and one `fakedet.bundle.WideStepper` (one
  wide network; the models share a seed and so every batch), per placement and K.

One torch thread (a sweep's trial has one CPU), the same stand-in-like images for every side, `--steps`
timed steps after 10 untimed ones, in thread CPU seconds (`time.thread_time`: the work done, which a loaded
machine inflates less than wall time). The sides run interleaved, their order rotated each repeat, and each
ratio (above 1: faster than the baseline, in training images per CPU-second summed over models) is taken
per repeat and printed as median (min, max) over `--repeats`, with the load average before and after.

    python benchmarks/bench_steppers.py [--what layout,bundle] [--srm none,pool1,pool2] [--ks 2,4,8] [--steps 100] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fakedet.bundle import StackedStepper, WideStepper  # noqa: E402
from fakedet.config import TrainConfig  # noqa: E402
from fakedet.train import BatchSchedule, ModuleStepper, build_initial, epoch_order, sgd_for  # noqa: E402

DEVICE = torch.device("cpu")


def images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 2).astype(np.float32)
    x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    x[labels == 1] //= 2
    return torch.from_numpy(x), torch.from_numpy(labels)


def timer(make_stepper: Callable[[], object], seeds: list[int], x: torch.Tensor, y: torch.Tensor, steps: int) -> Callable[[], float]:
    """A function that builds the stepper afresh and returns its thread-CPU seconds for `steps` steps."""
    def run() -> float:
        stepper = make_stepper()
        schedules = [BatchSchedule(len(x), 32, "reference", s) for s in seeds]
        order, offsets = epoch_order(schedules, 0, DEVICE)
        spe = schedules[0].steps_per_epoch

        def go(n: int, start: int) -> None:
            for s in range(start, start + n):
                stepper.step(x, y, order[:, offsets[s % spe] : offsets[s % spe + 1]])

        go(10, 0)
        t0 = time.thread_time()
        go(steps, 10)
        return time.thread_time() - t0
    return run


def solo(cfg: TrainConfig, channels_last: bool = False) -> Callable[[], ModuleStepper]:
    def make() -> ModuleStepper:
        model = build_initial(cfg, DEVICE)
        return ModuleStepper(model, sgd_for(model, cfg), DEVICE, channels_last=channels_last)
    return make


def bundle(cls, cfgs: list[TrainConfig]) -> Callable[[], object]:
    def make():
        models = [build_initial(c, DEVICE) for c in cfgs]
        return cls(models, [sgd_for(m, c) for m, c in zip(models, cfgs)])
    return make


def summary(ratios: list[float]) -> str:
    return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"


def compare(sides: dict[str, tuple[Callable[[], float], int]], baseline: str, repeats: int) -> dict[str, list[float]]:
    """Per repeat, every side's images/CPU-s over the baseline's; sides are (timer, images per run)."""
    names = list(sides)
    ratios: dict[str, list[float]] = {n: [] for n in names if n != baseline}
    for r in range(repeats):
        rate = {}
        for n in names[r % len(names):] + names[: r % len(names)]:  # rotated
            run, n_images = sides[n]
            rate[n] = n_images / run()
        for n in ratios:
            ratios[n].append(rate[n] / rate[baseline])
    return ratios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--what", default="layout,bundle")
    parser.add_argument("--srm", default="none,pool1,pool2")
    parser.add_argument("--ks", default="2,4,8")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    x, y = images(4480)  # the default stand-in's training set size (140 batches of 32)
    what, placements, ks = args.what.split(","), args.srm.split(","), [int(k) for k in args.ks.split(",")]
    print(f"torch {torch.__version__}, 1 thread, {args.steps} steps x {args.repeats} repeats; load average {os.getloadavg()[0]:.2f}")
    if "layout" in what:
        for srm in placements:
            cfg = TrainConfig(srm=srm, device="cpu")
            sides = {"contiguous": (timer(solo(cfg), [cfg.seed], x, y, args.steps), args.steps * 32),
                     "channels_last": (timer(solo(cfg, True), [cfg.seed], x, y, args.steps), args.steps * 32)}
            r = compare(sides, "contiguous", args.repeats)
            print(f"layout {srm:6}: channels_last / contiguous {summary(r['channels_last'])} (n = {args.repeats}); "
                  f"load average {os.getloadavg()[0]:.2f}")
    if "bundle" in what:
        for srm in placements:
            for k in ks:
                lrs = np.geomspace(1e-3, 1e-2, k)
                wide_cfgs = [TrainConfig(srm=srm, device="cpu", lr=float(lr)) for lr in lrs]
                vmap_cfgs = [TrainConfig(srm=srm, device="cpu", lr=float(lr), seed=11 + i) for i, lr in enumerate(lrs)]
                runs = [timer(solo(c), [c.seed], x, y, args.steps) for c in vmap_cfgs]
                sides = {"alone": (lambda runs=runs: sum(run() for run in runs), k * args.steps * 32),
                         "vmap": (timer(bundle(StackedStepper, vmap_cfgs), [c.seed for c in vmap_cfgs], x, y, args.steps), k * args.steps * 32),
                         "wide": (timer(bundle(WideStepper, wide_cfgs), [c.seed for c in wide_cfgs], x, y, args.steps), k * args.steps * 32)}
                r = compare(sides, "alone", args.repeats)
                print(f"bundle {srm:6} K={k:<3}: vmap / alone {summary(r['vmap'])}, wide / alone {summary(r['wide'])} "
                      f"(n = {args.repeats}); load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
