"""Training throughput of a bundle of K models in one process against K separate processes of `train`.

For each K: `fakedet.train.train_models` trains K configurations (seeds 0..K-1, learning rates spread over
1e-3..1e-2) in this process, one stacked step for all (K = 1: the plain-module stepper, `train` itself);
then K child processes each run `fakedet.train.train` on one of the same configurations at the same time,
on the same device, as K Ray trials on one machine would. Both are the one training loop, so both compute
in IEEE float32 (no TF32) under the same algorithm choice. Both train the study's CNN at batch 32 on
synthetic images (uniform noise, random labels: throughput does not depend on the pixels) for --steps steps.

    python benchmarks/bench_bundle.py [--device cuda|cpu] [--n-images 90000] [--steps 500] [--ks 1,4,16,64]
    python benchmarks/bench_bundle.py --device cpu --n-images 2000 --steps 40 --ks 1,4,16 --threads 1  # ~2 min

Prints training images/s summed over the K models for both, and their ratio (bundle / separate; above 1.0
means the bundle is faster). Only the step loops are timed: from the end of step 1 (an evaluation point with
no sets to score: a clock reading) to the end of the last step, so set-up (process start, data to the
device, models) is left out on both sides. The K children are started together behind a barrier; their
summed rate is all their images over the span from the first child's step 1 to the last child's end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fakedet.arrays import ImageSet
from fakedet.config import TrainConfig
from fakedet.train import BatchSchedule, train, train_models

BATCH = 32  # the study's batch size


def make_images(n: int, seed: int = 0) -> ImageSet:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n).astype(np.uint8)
    labels[:2] = (0, 1)  # both classes, whatever n
    return ImageSet(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), labels, name="bench")


def configs(k: int, n_images: int, steps: int, srm: str, device: str) -> list[TrainConfig]:
    spe = BatchSchedule(n_images, BATCH, "reference", 0).steps_per_epoch
    lrs = np.geomspace(1e-3, 1e-2, k) if k > 1 else [1e-3]
    return [TrainConfig(srm=srm, epochs=steps / spe, eval_at=(1 / spe,), seed=i, lr=float(lr), device=device)
            for i, lr in enumerate(lrs)]


def load(path: Path) -> ImageSet:
    blob = np.load(path)
    return ImageSet(blob["images"], blob["labels"], name="bench")


def time_bundle(data: ImageSet, cfgs: list[TrainConfig]) -> float:
    """Images/s summed over the bundle's models, loop only."""
    clock: dict[int, float] = {}

    def on_point(evals):  # every model's step is done
        clock[evals[0].record.step] = time.perf_counter()

    train_models(cfgs, data, on_eval=on_point)
    (first, t0), (last, t1) = min(clock.items()), max(clock.items())
    return len(cfgs) * (last - first) * BATCH / (t1 - t0)


def child(args: argparse.Namespace) -> None:
    """One separate process: load, report ready, wait for the go, train, print its clock readings."""
    torch.set_num_threads(args.threads)
    data = load(args.data)
    cfg = TrainConfig.from_dict(json.loads(args.config))
    clock: dict[int, float] = {}
    print("ready", flush=True)
    sys.stdin.readline()
    train(cfg, data, on_eval=lambda record, snapshot: clock.__setitem__(record.step, time.time()))
    (first, t0), (last, t1) = min(clock.items()), max(clock.items())
    print(json.dumps({"t0": t0, "t1": t1, "images": (last - first) * BATCH}), flush=True)


def time_separate(path: Path, cfgs: list[TrainConfig], threads: int) -> float:
    """Images/s summed over K processes of `train` running at once."""
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--child", "--data", str(path), "--threads", str(threads),
             "--config", json.dumps(cfg.to_dict())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        for cfg in cfgs
    ]
    try:
        for p in procs:
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError("a benchmark child process failed to start")
        for p in procs:  # the barrier: all loaded before any trains
            p.stdin.write("go\n")
            p.stdin.flush()
        results = [json.loads(p.stdout.readline()) for p in procs]
        for p in procs:
            if p.wait() != 0:
                raise RuntimeError(f"a benchmark child process exited with {p.returncode}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    span = max(r["t1"] for r in results) - min(r["t0"] for r in results)
    return sum(r["images"] for r in results) / span


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n-images", type=int, default=90_000, help="training images (CIFAKE's training set: 90,000)")
    parser.add_argument("--steps", type=int, default=500, help="training steps per model")
    parser.add_argument("--ks", default="1,4,16,64", help="bundle sizes, comma-separated")
    parser.add_argument("--srm", default="none", help="SRM placement of every model")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads: of the bundle's process, and of each separate process "
                             "(default: torch's default for the bundle, cores / K for each separate process)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    ks = [int(k) for k in args.ks.split(",")]
    if args.steps < 2 or args.n_images < 2 * BATCH or min(ks) < 1:
        parser.error("need --steps >= 2, --n-images >= 64 and bundle sizes >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    data = make_images(args.n_images)
    name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    print(f"device {args.device} ({name}), torch {torch.__version__}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}; {args.n_images} images, {args.steps} steps per model, batch {BATCH}, "
          f"srm {args.srm}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fakedet-bench-") as tmp:
        path = Path(tmp) / "images.npz"
        np.savez(path, images=data.images, labels=data.labels)
        for k in ks:
            cfgs = configs(k, args.n_images, args.steps, args.srm, args.device)
            bundle = time_bundle(data, cfgs)
            separate = time_separate(path, cfgs, args.threads or max(1, (os.cpu_count() or 1) // k))
            rows.append((k, bundle, separate))
            print(f"K={k:3d}  bundle {bundle:10.0f} images/s   {k} separate processes {separate:10.0f} images/s   "
                  f"ratio {bundle / separate:6.2f}", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    print("ratios (bundle / separate): " + ", ".join(f"K={k}: {b / s:.2f}" for k, b, s in rows))


if __name__ == "__main__":
    main()
