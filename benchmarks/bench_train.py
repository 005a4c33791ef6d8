"""Training throughput and memory of fakedet's loop, against a plain loop in the reference project's style.

Both train the base CNN (batch 32, SGD lr 1e-3 momentum 0.9, BCE) on the same images in the same process.
The reference style: every batch pre-built as a normalised float tensor up front, then a Python loop
over the batches (shuffled batch order, items permuted inside each batch) with the model ending in a
sigmoid and BCELoss, as the reference project's training script does. fakedet: `fakedet.train.train`
with the `reference` shuffle mode (uint8 data on the device, batched and normalised there).

    python benchmarks/bench_train.py [--images 20000] [--epochs 2] [--repeats 3] [--device cpu]
    python benchmarks/bench_train.py --concurrent 4 --images 90000 --epochs 0.25 --device cuda

Prints images/s for both and their ratio (fakedet / reference; above 1.0 means fakedet is faster). Both
loops are timed without their one-time set-up (the reference's batch building, fakedet's model, schedule
and upload of the data); the ratio with fakedet's set-up counted is printed too.

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


def reference_style(data: ImageSet, epochs: float, device: torch.device) -> float:
    torch.manual_seed(11)
    # pre-batched normalised tensors, built once (not timed), as the reference loader does at start-up
    x = torch.from_numpy(data.images).float().div(255).permute(0, 3, 1, 2).sub(0.5).div(0.5)
    y = torch.from_numpy(data.labels.astype(np.float32))
    order = list(range(len(data)))
    random.Random(11).shuffle(order)
    n_batches = len(data) // 32
    batches = [(x[order[i * 32:(i + 1) * 32]].to(device), y[order[i * 32:(i + 1) * 32]].to(device)) for i in range(n_batches)]
    model = SigmoidHead().to(device)
    criterion = nn.BCELoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    n_steps = max(1, round(epochs * n_batches))
    start = time.perf_counter()
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
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n_steps * 32 / (time.perf_counter() - start)


def fakedet_loop(data: ImageSet, epochs: float, device: torch.device, deterministic: bool = False) -> tuple[float, float]:
    """(loop images/s, images/s including set-up). The loop is timed from the end of the first step to the
    end of training, from the history's own clock, as the reference loop is timed without its batch building."""
    first_step = 1 / (len(data) // 32)  # an evaluation point right after step 1 (no sets to score: a clock reading)
    extra = {"deterministic": True} if deterministic else {}  # only when asked: older versions lack the field
    cfg = TrainConfig(epochs=epochs, device=str(device), eval_at=(first_step,), **extra)
    start = time.perf_counter()
    result = train(cfg, data)
    if device.type == "cuda":
        torch.cuda.synchronize()
    total = time.perf_counter() - start
    first, last = result.history[0], result.history[-1]
    loop = (last["step"] - first["step"]) * 32 / (last["elapsed_s"] - first["elapsed_s"])
    return loop, last["step"] * 32 / total


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
    loop, total = fakedet_loop(data, args.epochs, device, args.deterministic)
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


def mb(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--deterministic", action="store_true", help="fakedet in its deterministic mode (TrainConfig.deterministic)")
    parser.add_argument("--no-reference", action="store_true", help="time fakedet's loop only")
    parser.add_argument("--concurrent", type=int, default=0, metavar="N", help="N fakedet trials at once, one process each")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for the concurrent trials")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
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
        data = make_images(args.images)
        ref, ours, ours_total, peaks = [], [], [], []
        for repeat in range(args.repeats):  # interleaved, first one then the other first, so that noise hits both alike
            for which in (("ref", "ours") if repeat % 2 == 0 else ("ours", "ref")):
                if which == "ref" and not args.no_reference:
                    ref.append(reference_style(data, args.epochs, device))
                elif which == "ours":
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    loop, total = fakedet_loop(data, args.epochs, device, args.deterministic)
                    ours.append(loop)
                    ours_total.append(total)
                    if device.type == "cuda":
                        peaks.append(torch.cuda.max_memory_allocated(device))
        runs = lambda values, fmt: ", ".join(fmt.format(v) for v in values)  # noqa: E731
        print(f"fakedet train() loop:        {statistics.median(ours):8.0f} images/s (runs: {runs(ours, '{:.0f}')})")
        print(f"fakedet train() with set-up: {statistics.median(ours_total):8.0f} images/s (model, schedule, data upload)")
        if peaks:
            print(f"fakedet train() device memory: {mb(max(peaks))} (torch.cuda.max_memory_allocated)")
        out = {**header, "repeats": args.repeats, "fakedet_loop": ours, "fakedet_with_setup": ours_total,
               "fakedet_max_memory_allocated": peaks}
        if ref:
            ratio = [o / r for o, r in zip(ours, ref)]
            ratio_total = [o / r for o, r in zip(ours_total, ref)]
            print(f"reference-style loop:        {statistics.median(ref):8.0f} images/s (runs: {runs(ref, '{:.0f}')})")
            print(f"ratio fakedet/reference (loops): {statistics.median(ratio):.2f} (median of {args.repeats}; runs: {runs(ratio, '{:.2f}')})")
            print(f"ratio with fakedet's set-up counted: {statistics.median(ratio_total):.2f}")
            out.update({"reference_loop": ref, "ratio": ratio, "ratio_with_setup": ratio_total})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
