"""Training throughput and memory of fakedet's loop, against a plain loop in the reference project's style.

Both train the base CNN (batch 32, SGD lr 1e-3 momentum 0.9, BCE) on the same images in the same process.

- The reference style: every batch pre-built as a normalised float tensor up front, then a Python loop
  over the batches (shuffled batch order, items permuted inside each batch) with the model ending in a
  sigmoid and BCELoss, as the reference project's training script does. Each step: `zero_grad`, forward,
  `loss.item()` (the reference accumulates its running loss as a Python float every batch: on the CPU a
  cheap read, on a GPU a host wait per step), `backward`, `step`.
- fakedet: `fakedet.train.train` with the `reference` shuffle mode (uint8 data on the device, each batch
  gathered and normalised there); the loss stays on the device until an evaluation point.

Memory layout, matched on both sides and both reported:

- `contiguous`: NCHW contiguous input, as fakedet trains (`preprocess`) and as the reference project's
  `ToTensor` + DataLoader give it (each image C×H×W, stacked);
- `channels_last`: the same values in NHWC memory (the weights stay contiguous; the convolutions then run
  channels_last). The reference style gets it from its `permute` without `.contiguous()`; fakedet by
  swapping, in this script only, its batch normalisation for one that casts the NHWC uint8 batch without
  a transpose (the same values; fakedet has no channels_last training option).

fakedet contiguous against the reference style channels_last is printed too, marked as not like with like.

Timing boundaries, the same on both sides: from the end of training step 1 (first-call allocations and
kernel choices left out) to the end of the last step; set-up (the reference's batch building, fakedet's
model, schedule and upload of the data) is outside. fakedet's boundaries are its history's own clock (an
evaluation point right after step 1 with no sets to score: a clock reading, then the end of training); its
images/s with set-up counted is printed too. On CUDA both sides synchronise before reading the clock.
Each span is read on two clocks: wall (images/s) and this process's CPU seconds (`time.process_time`, read
on fakedet's side by the evaluation callback at the same two points); with one thread the second is the
work done, which a loaded machine inflates less than wall time.

One thread per process (`--threads 1`, the default), as a sweep runs a trial: Ray sets OMP_NUM_THREADS to a
trial's one CPU. The four (side, layout) runs are interleaved in one process, their order rotated every
repeat, so that load on a shared machine hits all alike; ratios are fakedet / reference per repeat
(above 1.0: fakedet faster), printed as median, min and max, with the load average (`uptime`) before and
after.

    python benchmarks/bench_train.py [--images 8000] [--epochs 1] [--repeats 5] [--threads 1] [--device cpu]
    python benchmarks/bench_train.py --concurrent 4 --images 90000 --epochs 0.25 --device cuda

`--concurrent N` runs N fakedet trials at once, each in its own process (as N Ray trials sharing one
device would be), started together, and prints each trial's images/s and memory: on CUDA
`torch.cuda.max_memory_allocated` (what the trial's tensors took on the device at their peak), on the
CPU the growth of the process's peak RSS over its data at rest. `--json PATH` also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import random
import resource
import statistics
import time

import numpy as np
import psutil
import torch
import torch.nn as nn

import fakedet.train
from fakedet.arrays import ImageSet
from fakedet.config import TrainConfig
from fakedet.models import build_model
from fakedet.train import train


def make_images(n: int, seed: int = 0) -> ImageSet:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n).astype(np.uint8)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    return ImageSet(images, labels, name="bench")


class SigmoidHead(nn.Module):
    """The reference forward pass: the base CNN with the sigmoid inside the model."""

    def __init__(self) -> None:
        super().__init__()
        self.net = build_model("cifar_cnn", "none")

    def forward(self, x):
        return torch.sigmoid(self.net(x)).reshape(-1, 1)


LAYOUTS = ("contiguous", "channels_last")


def reference_style(data: ImageSet, epochs: float, device: torch.device, layout: str) -> tuple[float, float]:
    """(images/s, images per CPU-second) of the reference-style loop from the end of its step 1 to the end
    of its last step."""
    torch.manual_seed(11)
    # pre-batched normalised tensors, built once (not timed), as the reference loader does at start-up
    x = torch.from_numpy(data.images).float().div(255).permute(0, 3, 1, 2).sub(0.5).div(0.5)  # NHWC memory
    if layout == "contiguous":
        x = x.contiguous()  # NCHW memory, as ToTensor + the DataLoader's stacking give it
    y = torch.from_numpy(data.labels.astype(np.float32))
    order = list(range(len(data)))
    random.Random(11).shuffle(order)
    n_batches = len(data) // 32
    batches = [(x[order[i * 32:(i + 1) * 32]].to(device), y[order[i * 32:(i + 1) * 32]].to(device)) for i in range(n_batches)]
    model = SigmoidHead().to(device)
    criterion = nn.BCELoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    n_steps = max(2, round(epochs * n_batches))
    for step in range(n_steps):
        if step % n_batches == 0:
            random.shuffle(batches)
        xb, yb = batches[step % n_batches]
        perm = torch.randperm(len(xb))
        xb, yb = xb[perm], yb[perm]
        optimizer.zero_grad()
        loss = criterion(model(xb), yb.reshape(-1, 1))
        loss.item()  # the reference accumulates the loss as a Python float every batch
        loss.backward()
        optimizer.step()
        if step == 0:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, cpu_start = time.perf_counter(), time.process_time()  # the end of step 1, as fakedet's clock starts
    if device.type == "cuda":
        torch.cuda.synchronize()
    images = (n_steps - 1) * 32
    return images / (time.perf_counter() - start), images / (time.process_time() - cpu_start)


def channels_last_batches(images_uint8: torch.Tensor, device=None) -> torch.Tensor:
    """`fakedet.preprocess.preprocess`'s values in NHWC memory: the uint8 batch's channels_last view cast
    without a transpose (the swap this script makes for fakedet's `channels_last` runs)."""
    x = images_uint8 if device is None else images_uint8.to(device)
    return x.permute(0, 3, 1, 2).to(torch.float32).sub_(127.5).div_(127.5)


def fakedet_loop(data: ImageSet, epochs: float, device: torch.device, deterministic: bool = False,
                 layout: str = "contiguous") -> tuple[float, float, float]:  # fmt: skip
    """(loop images/s, loop images per CPU-second, images/s including set-up). The loop is timed from the
    end of the first step to the end of training, from the history's own clock (the CPU clock read by the
    evaluation callback at the same two points), as the reference loop is timed without its batch building."""
    first_step = 1 / (len(data) // 32)  # an evaluation point right after step 1 (no sets to score: a clock reading)
    extra = {"deterministic": True} if deterministic else {}  # only when asked: older versions lack the field
    cfg = TrainConfig(epochs=epochs, device=str(device), eval_at=(first_step,), **extra)
    swapped = fakedet.train.preprocess
    if layout == "channels_last":
        fakedet.train.preprocess = channels_last_batches
    cpu_at: list[float] = []  # process CPU seconds at each evaluation point: after step 1, at the end
    try:
        start = time.perf_counter()
        result = train(cfg, data, on_eval=lambda record, snapshot: cpu_at.append(time.process_time()))
        if device.type == "cuda":
            torch.cuda.synchronize()
        total = time.perf_counter() - start
    finally:
        fakedet.train.preprocess = swapped
    first, last = result.history[0], result.history[-1]
    images = (last["step"] - first["step"]) * 32
    return images / (last["elapsed_s"] - first["elapsed_s"]), images / (cpu_at[-1] - cpu_at[0]), last["step"] * 32 / total


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()


def trial_worker(index: int, args: argparse.Namespace, threads: int, barrier, queue) -> None:
    """One of `--concurrent` trials, in its own process: its own data, model and (on CUDA) context."""
    torch.set_num_threads(threads)
    device = torch.device(args.device)
    data = make_images(args.images, seed=index)
    rss_at_rest = psutil.Process().memory_info().rss
    if device.type == "cuda":
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats(device)
    barrier.wait()  # all trials start training together
    loop, _, total = fakedet_loop(data, args.epochs, device, args.deterministic)
    if device.type == "cuda":
        memory = {"kind": "cuda max_memory_allocated", "bytes": torch.cuda.max_memory_allocated(device)}
    else:  # ru_maxrss is in KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        memory = {"kind": "peak RSS over data at rest", "bytes": max(0, peak - rss_at_rest)}
    queue.put({"trial": index, "loop_images_per_s": loop, "images_per_s_with_setup": total,
               "memory_bytes": memory["bytes"], "memory_kind": memory["kind"],
               "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "")})


def run_concurrent(args: argparse.Namespace) -> list[dict]:
    ctx = mp.get_context("spawn")  # CUDA cannot be used in forked children
    barrier, queue = ctx.Barrier(args.concurrent), ctx.Queue()
    # CPU threads shared out so that N trials do not oversubscribe the cores
    threads = max(1, (os.cpu_count() or 1) // args.concurrent)
    workers = [ctx.Process(target=trial_worker, args=(i, args, threads, barrier, queue)) for i in range(args.concurrent)]
    for w in workers:
        w.start()
    results = []
    try:
        for _ in workers:
            results.append(queue.get(timeout=args.timeout))
    finally:
        for w in workers:
            w.join(timeout=30)
            if w.is_alive():
                w.terminate()
    bad = [w.exitcode for w in workers if w.exitcode]
    if bad:
        raise SystemExit(f"{len(bad)} trial process(es) failed (exit codes {bad})")
    return sorted(results, key=lambda r: r["trial"])


def spread(values: list[float], fmt: str) -> str:
    """median (min, max) of values, each with fmt."""
    return f"{fmt.format(statistics.median(values))} (min {fmt.format(min(values))}, max {fmt.format(max(values))})"


def compare(args: argparse.Namespace, device: torch.device) -> dict:
    """The interleaved comparison in this process: every (side, layout) once per repeat, the order rotated."""
    data = make_images(args.images)
    layouts = args.layouts.split(",")
    runs = [(side, layout) for layout in layouts for side in ("reference", "fakedet")
            if side == "fakedet" or not args.no_reference]  # fmt: skip
    rate: dict[tuple[str, str], list[float]] = {r: [] for r in runs}  # images/s (wall)
    cpu: dict[tuple[str, str], list[float]] = {r: [] for r in runs}  # images per CPU-second
    with_setup: dict[str, list[float]] = {layout: [] for layout in layouts}
    peaks: list[int] = []
    load_before = os.getloadavg()
    for repeat in range(args.repeats):
        for side, layout in runs[repeat % len(runs):] + runs[: repeat % len(runs)]:
            if side == "reference":
                wall, per_cpu_s = reference_style(data, args.epochs, device, layout)
                rate[side, layout].append(wall)
                cpu[side, layout].append(per_cpu_s)
                continue
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            loop, per_cpu_s, total = fakedet_loop(data, args.epochs, device, args.deterministic, layout)
            rate[side, layout].append(loop)
            cpu[side, layout].append(per_cpu_s)
            with_setup[layout].append(total)
            if device.type == "cuda":
                peaks.append(torch.cuda.max_memory_allocated(device))
    load_after = os.getloadavg()
    n = args.repeats
    print(f"from the end of step 1 to the end of the last step, median (min, max) over {n} repeats: images/s (wall) | "
          f"images per CPU-second of this process (what load inflates least)")
    for side, layout in runs:
        print(f"  {side:<9} {layout:<13} {spread(rate[side, layout], '{:6.0f}')} | {spread(cpu[side, layout], '{:6.0f}')}")
    for layout in layouts:
        print(f"  fakedet   {layout:<13} with set-up counted (model, schedule, data upload): "
              f"{spread(with_setup[layout], '{:6.0f}')}")
    if peaks:
        print(f"fakedet train() device memory: {mb(max(peaks))} (torch.cuda.max_memory_allocated)")
    ratios = {}
    if not args.no_reference:
        print(f"ratio fakedet / reference per repeat (above 1.0: fakedet faster), median (min, max), n = {n}: "
              f"wall | CPU time")
        pairs = [(layout, layout) for layout in layouts]
        if set(LAYOUTS) <= set(layouts):  # the comparison this script made before: not like with like
            pairs.append(("contiguous", "channels_last"))
        for ours, theirs in pairs:
            r = [a / b for a, b in zip(rate["fakedet", ours], rate["reference", theirs])]
            c = [a / b for a, b in zip(cpu["fakedet", ours], cpu["reference", theirs])]
            ratios[f"{ours}/{theirs}"], ratios[f"{ours}/{theirs} cpu"] = r, c
            like = "same layout" if ours == theirs else "layouts differ: not like with like"
            print(f"  fakedet {ours} / reference {theirs} ({like}): {spread(r, '{:.2f}')} | {spread(c, '{:.2f}')}")
    loads = lambda v: ", ".join(f"{x:.2f}" for x in v)  # noqa: E731
    print(f"load average (uptime; 1, 5, 15 min) before: {loads(load_before)}; after: {loads(load_after)}; "
          f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads")
    first = layouts[0]
    out = {"repeats": n, "layouts": layouts, "load_before": load_before, "load_after": load_after,
           "rates": {f"{side} {layout}": v for (side, layout), v in rate.items()},
           "rates_per_cpu_s": {f"{side} {layout}": v for (side, layout), v in cpu.items()}, "ratios": ratios,
           # the first layout's figures under the names gpu_check.sh's summary reads
           "fakedet_loop": rate["fakedet", first], "fakedet_with_setup": with_setup[first],
           "fakedet_max_memory_allocated": peaks}  # fmt: skip
    if not args.no_reference:
        out.update({"reference_loop": rate["reference", first], "ratio": ratios[f"{first}/{first}"]})
    return out


def mb(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8000)
    parser.add_argument("--epochs", type=float, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in this process (a sweep's trial: 1)")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="memory layouts to compare, of " + ", ".join(LAYOUTS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--deterministic", action="store_true", help="fakedet in its deterministic mode (TrainConfig.deterministic)")
    parser.add_argument("--no-reference", action="store_true", help="time fakedet's loop only")
    parser.add_argument("--concurrent", type=int, default=0, metavar="N", help="N fakedet trials at once, one process each")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for the concurrent trials")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    bad = [layout for layout in args.layouts.split(",") if layout not in LAYOUTS]
    if bad:
        parser.error(f"unknown layout {bad[0]!r}; choose from {', '.join(LAYOUTS)}")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data_bytes = args.images * (32 * 32 * 3 + 4)  # uint8 images + float32 labels on the device
    header = {"device": str(device), "device_name": device_name(device), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "images": args.images,
              "epochs": args.epochs, "batch_size": 32, "deterministic": args.deterministic}
    mode = " (deterministic)" if args.deterministic else ""
    print(f"device {device} ({header['device_name']}), torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads; "
          f"{args.images} images × {args.epochs:g} epochs, batch 32{mode}")
    print(f"training data on the device: {mb(data_bytes)} (uint8 images and labels; a float32 copy of the images "
          f"would be {mb(args.images * 32 * 32 * 3 * 4)})")

    if args.concurrent:
        trials = run_concurrent(args)
        for t in trials:
            print(f"trial {t['trial']}: {t['loop_images_per_s']:8.0f} images/s (loop), {mb(t['memory_bytes'])} "
                  f"({t['memory_kind']})")
        total = sum(t["loop_images_per_s"] for t in trials)
        print(f"{args.concurrent} concurrent trials on one {device.type} device: {total:.0f} images/s together, "
              f"{total / args.concurrent:.0f} per trial; memory per trial at most {mb(max(t['memory_bytes'] for t in trials))}")
        out = {**header, "concurrent": args.concurrent, "trials": trials, "images_per_s_total": total}
    else:
        out = {**header, **compare(args, device)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
