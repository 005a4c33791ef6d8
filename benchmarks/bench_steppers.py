"""The training loop's steppers side by side: memory layout of one model, the two bundle forms, CUDA graphs.

- `layout`: `fakedet.train.ModuleStepper` on contiguous NCHW (the default) against `channels_last=True` (weights
  and batches in NHWC memory), per SRM placement;
- `bundle`: K models stepped one after another (K `ModuleStepper`s, what K trials do) against one
  `fakedet.bundle.StackedStepper` (vmap; the models' own seeds) and one `fakedet.bundle.WideStepper` (one
  wide network; the models share a seed and so every batch), per placement and K;
- `graph` (CUDA only): each stepper eager against `fakedet.train.GraphStepper` around the same stepper (the
  step captured once into a CUDA graph and replayed): one model (K = 1, `ModuleStepper`) and, at each K of
  `--ks` above 1, the vmap bundle (K seeds) and the wide bundle (one seed); per K a line compares vmap, wide
  and K `ModuleStepper`s one after another (whose summed rate is one model's rate, so one is timed), eager
  and graphed. On the CPU it prints that graphs need CUDA and measures nothing.

The same stand-in-like images for every side (4,480: the default stand-in's training set), `--steps` timed
steps after 10 untimed ones (a graph is captured within those). On the CPU: one torch thread (a sweep's
trial has one CPU), timed in thread CPU seconds (`time.thread_time`: the work done, which a loaded machine
inflates less than wall time). On CUDA (`--device cuda`): wall clock between two `torch.cuda.synchronize()`
calls, the device's work included. Every side runs under the training loop's settings (`algorithms(False)`:
cuDNN benchmarks its algorithms; `ieee_float32()`). The sides run interleaved, their order rotated each
repeat, and each ratio (above 1: faster than the baseline, in training images per second summed over
models) is taken per repeat and printed as median (min, max) over `--repeats`, with the load average.
`--json PATH` writes every side's rate per repeat and the ratios.

    python benchmarks/bench_steppers.py [--what layout,bundle] [--srm none,pool1,pool2] [--ks 2,4,8] [--steps 100] [--repeats 5]
    python benchmarks/bench_steppers.py --device cuda --what graph,bundle --srm none --ks 1,4,16,64 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fakedet.bundle import StackedStepper, WideStepper  # noqa: E402
from fakedet.config import TrainConfig  # noqa: E402
from fakedet.preprocess import algorithms, ieee_float32  # noqa: E402
from fakedet.train import BatchSchedule, GraphStepper, ModuleStepper, build_initial, epoch_order, sgd_for  # noqa: E402

BATCH = 32  # the study's batch size
N_IMAGES = 4480  # the default stand-in's training set size (140 batches of 32)
WARMUP_STEPS = 10  # untimed steps first: cuDNN's algorithm search, a graph's warm-up and capture
GRAPH_NEEDS_CUDA = "CUDA graphs need a CUDA device (--device cuda); nothing measured on the CPU"


@dataclass(frozen=True)
class Bench:
    """Where and how long every side runs."""

    device: torch.device
    steps: int
    x: torch.Tensor  # uint8 N×32×32×3 on the device
    y: torch.Tensor  # float labels on the device

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def clock(self) -> float:
        """Thread CPU seconds on the CPU; on CUDA wall seconds once the device is idle."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return time.perf_counter()
        return time.thread_time()


@dataclass
class Counters:
    """A `GraphStepper`'s counters after a side's last run: graph replays, eager steps, captures."""

    replayed: int = 0
    eager: int = 0
    captures: int = 0


@dataclass
class Side:
    """One thing timed: a run returns its seconds for `bench.steps` steps; `images` is per run, over all models."""

    run: Callable[[], float]
    images: int


@dataclass
class Row:
    """One comparison's figures for --json: rates (images/s summed over models) per side and repeat."""

    what: str
    srm: str
    k: int
    rates: dict[str, list[float]]
    ratios: dict[str, list[float]] = field(default_factory=dict)
    counters: dict[str, dict[str, int]] = field(default_factory=dict)


def images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 2).astype(np.float32)
    x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    x[labels == 1] //= 2
    return torch.from_numpy(x), torch.from_numpy(labels)


def timer(bench: Bench, make_stepper: Callable[[], Any], seeds: list[int], counters: Counters | None = None) -> Callable[[], float]:
    """A function that builds the stepper afresh and returns its seconds for `bench.steps` steps; with
    `counters`, a graph stepper's counters are copied there after each run."""
    def run() -> float:
        stepper = make_stepper()
        schedules = [BatchSchedule(len(bench.x), BATCH, "reference", s) for s in seeds]
        order, offsets = epoch_order(schedules, 0, bench.device)
        spe = schedules[0].steps_per_epoch

        def go(n: int, start: int) -> None:
            for s in range(start, start + n):
                stepper.step(bench.x, bench.y, order[:, offsets[s % spe] : offsets[s % spe + 1]])

        go(WARMUP_STEPS, 0)
        t0 = bench.clock()
        go(bench.steps, WARMUP_STEPS)
        seconds = bench.clock() - t0
        if counters is not None:
            counters.replayed, counters.eager, counters.captures = stepper.replayed, stepper.eager, stepper.captures
        return seconds
    return run


def solo(cfg: TrainConfig, device: torch.device, channels_last: bool = False) -> Callable[[], ModuleStepper]:
    def make() -> ModuleStepper:
        model = build_initial(cfg, device)
        return ModuleStepper(model, sgd_for(model, cfg), device, channels_last=channels_last)
    return make


def bundle(cls, cfgs: list[TrainConfig], device: torch.device) -> Callable[[], object]:
    def make():
        models = [build_initial(c, device) for c in cfgs]
        return cls(models, [sgd_for(m, c) for m, c in zip(models, cfgs)])
    return make


def graphed(make: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """The same stepper inside a `GraphStepper`; the training images are one tensor every step (no copy)."""
    return lambda: GraphStepper(make(), device, copy_inputs=False)


def summary(ratios: list[float]) -> str:
    return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"


def rates(sides: dict[str, Side], repeats: int) -> dict[str, list[float]]:
    """Every side's images/s per repeat, the sides' order rotated each repeat."""
    names = list(sides)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[: r % len(names)]:
            out[n].append(sides[n].images / sides[n].run())
    return out


def over(rate: dict[str, list[float]], side: str, baseline: str) -> list[float]:
    """Per repeat, `side`'s rate over `baseline`'s."""
    return [a / b for a, b in zip(rate[side], rate[baseline])]


def compare(sides: dict[str, Side], baseline: str, repeats: int) -> dict[str, list[float]]:
    """Per repeat, every side's images/s over the baseline's."""
    rate = rates(sides, repeats)
    return {n: over(rate, n, baseline) for n in sides if n != baseline}


def bundle_configs(srm: str, k: int, device: str) -> tuple[list[TrainConfig], list[TrainConfig]]:
    """K configurations with learning rates spread over 1e-3..1e-2: one seed (the wide form's) and K seeds (vmap's)."""
    lrs = np.geomspace(1e-3, 1e-2, k)
    wide = [TrainConfig(srm=srm, device=device, lr=float(lr)) for lr in lrs]
    stacked = [TrainConfig(srm=srm, device=device, lr=float(lr), seed=11 + i) for i, lr in enumerate(lrs)]
    return wide, stacked


def load() -> str:
    return f"load average {os.getloadavg()[0]:.2f}"


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def run_layout(bench: Bench, placements: list[str], repeats: int) -> list[Row]:
    rows = []
    for srm in placements:
        cfg = TrainConfig(srm=srm, device=bench.device.type)
        sides = {"contiguous": Side(timer(bench, solo(cfg, bench.device), [cfg.seed]), bench.steps * BATCH),
                 "channels_last": Side(timer(bench, solo(cfg, bench.device, True), [cfg.seed]), bench.steps * BATCH)}
        rate = rates(sides, repeats)
        r = over(rate, "channels_last", "contiguous")
        print(f"layout {srm:6}: channels_last / contiguous {summary(r)} (n = {repeats}); {load()}", flush=True)
        rows.append(Row("layout", srm, 1, rate, {"channels_last/contiguous": r}))
    return rows


def run_bundle(bench: Bench, placements: list[str], ks: list[int], repeats: int) -> list[Row]:
    rows = []
    for srm in placements:
        for k in ks:
            wide_cfgs, vmap_cfgs = bundle_configs(srm, k, bench.device.type)
            runs = [timer(bench, solo(c, bench.device), [c.seed]) for c in vmap_cfgs]
            n = k * bench.steps * BATCH
            sides = {"alone": Side(lambda runs=runs: sum(run() for run in runs), n),
                     "vmap": Side(timer(bench, bundle(StackedStepper, vmap_cfgs, bench.device), [c.seed for c in vmap_cfgs]), n),
                     "wide": Side(timer(bench, bundle(WideStepper, wide_cfgs, bench.device), [c.seed for c in wide_cfgs]), n)}
            rate = rates(sides, repeats)
            r = {"vmap/alone": over(rate, "vmap", "alone"), "wide/alone": over(rate, "wide", "alone")}
            print(f"bundle {srm:6} K={k:<3}: vmap / alone {summary(r['vmap/alone'])}, wide / alone {summary(r['wide/alone'])} "
                  f"(n = {repeats}); {load()}", flush=True)
            if bench.cuda:  # the rates themselves, which the GPU targets are stated in
                print(f"  images/s summed over models, median: alone {med(rate['alone']):.0f}, vmap {med(rate['vmap']):.0f}, "
                      f"wide {med(rate['wide']):.0f}", flush=True)
            rows.append(Row("bundle", srm, k, rate, r))
    return rows


def run_graph(bench: Bench, placements: list[str], ks: list[int], repeats: int) -> list[Row]:
    """Eager against graphed, per stepper; per K above 1 also vmap and wide against K models one after another."""
    rows = []
    for srm in placements:
        cfg = TrainConfig(srm=srm, device=bench.device.type)
        for k in ks:
            n = k * bench.steps * BATCH
            counters = {name: Counters() for name in ("one_graph", "vmap_graph", "wide_graph")}
            # K ModuleSteppers one after another train K models at one model's rate: one is timed
            sides = {"one_eager": Side(timer(bench, solo(cfg, bench.device), [cfg.seed]), bench.steps * BATCH),
                     "one_graph": Side(timer(bench, graphed(solo(cfg, bench.device), bench.device), [cfg.seed], counters["one_graph"]),
                                       bench.steps * BATCH)}
            if k > 1:
                wide_cfgs, vmap_cfgs = bundle_configs(srm, k, bench.device.type)
                for form, cls, cfgs in (("vmap", StackedStepper, vmap_cfgs), ("wide", WideStepper, wide_cfgs)):
                    make, seeds = bundle(cls, cfgs, bench.device), [c.seed for c in cfgs]
                    sides[f"{form}_eager"] = Side(timer(bench, make, seeds), n)
                    sides[f"{form}_graph"] = Side(timer(bench, graphed(make, bench.device), seeds, counters[f"{form}_graph"]), n)
            rate = rates(sides, repeats)
            forms = ["one"] + (["vmap", "wide"] if k > 1 else [])
            r = {f"{f}_graph/{f}_eager": over(rate, f"{f}_graph", f"{f}_eager") for f in forms}
            used = {name: vars(c) for name, c in counters.items() if name in sides}
            parts = []
            for f in forms[1:] if k > 1 else forms:  # above K = 1 the one model appears in the comparison below
                c = counters[f"{f}_graph"]
                label = "one model (ModuleStepper)" if f == "one" else f"{f}"
                parts.append(f"{label}: eager {med(rate[f'{f}_eager']):.0f}, graph {med(rate[f'{f}_graph']):.0f} images/s, "
                             f"graph / eager {summary(r[f'{f}_graph/{f}_eager'])} [last run: {c.replayed} replays, "
                             f"{c.eager} eager steps, {c.captures} captures]")
            print(f"graph {srm:6} K={k:<3}: " + "; ".join(parts) + f" (n = {repeats}); {load()}", flush=True)
            if k > 1:
                cells = []
                for mode in ("eager", "graph"):
                    for f in ("vmap", "wide"):
                        r[f"{f}_{mode}/one_{mode}"] = over(rate, f"{f}_{mode}", f"one_{mode}")
                    cells.append(f"{mode}: separate {med(rate[f'one_{mode}']):.0f} | " + " | ".join(
                        f"{f} {med(rate[f'{f}_{mode}']):.0f} (x{summary(r[f'{f}_{mode}/one_{mode}'])})" for f in ("vmap", "wide")))
                print(f"  K={k:<3} vmap vs wide vs {k} separate ModuleSteppers (one after another), images/s summed over "
                      f"models: " + "; ".join(cells), flush=True)
            rows.append(Row("graph", srm, k, rate, r, used))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--what", default="layout,bundle", help="comma-separated: layout, bundle, graph")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--srm", default="none,pool1,pool2")
    parser.add_argument("--ks", default="2,4,8")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    what, placements, ks = args.what.split(","), args.srm.split(","), [int(k) for k in args.ks.split(",")]
    unknown = set(what) - {"layout", "bundle", "graph"}
    if unknown or min(ks) < 1 or args.steps < 1 or args.repeats < 1:
        parser.error(f"--what takes layout, bundle, graph (not {', '.join(sorted(unknown))})" if unknown
                     else "need --ks >= 1, --steps >= 1 and --repeats >= 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    torch.set_num_threads(1)
    x, y = images(N_IMAGES)
    bench = Bench(device, args.steps, x.to(device), y.to(device))
    name = torch.cuda.get_device_name(device) if bench.cuda else platform.processor() or platform.machine()
    timing = "wall clock between torch.cuda.synchronize() calls" if bench.cuda else "thread CPU time"
    print(f"device {device.type} ({name}), torch {torch.__version__}, 1 thread, {args.steps} steps x {args.repeats} repeats, "
          f"timed in {timing}; {load()}", flush=True)
    rows: list[Row] = []
    with algorithms(False), ieee_float32():
        if "layout" in what:
            rows += run_layout(bench, placements, args.repeats)
        if "bundle" in what:
            rows += run_bundle(bench, placements, ks, args.repeats)
        if "graph" in what:
            if bench.cuda:
                rows += run_graph(bench, placements, ks, args.repeats)
            else:
                print(f"graph: {GRAPH_NEEDS_CUDA}", flush=True)
    if args.json:
        report = {"device": device.type, "device_name": name, "torch": torch.__version__, "timing": timing,
                  "steps": args.steps, "repeats": args.repeats, "batch": BATCH, "images": N_IMAGES,
                  "graph_skipped": GRAPH_NEEDS_CUDA if "graph" in what and not bench.cuda else None,
                  "rows": [vars(r) for r in rows]}
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
