"""The step-time cost of training-time augmentation (`fakedet.augment`, TrainConfig.augment) on the CPU.

`fakedet.train.train` (base CNN and SRM at pool1, batch 32, SGD lr 1e-2 momentum 0.9) on the same images with
`augment = none` and with `blur_jpeg` (the default p 0.5 and sigma range, and sigma up to 1.5 px), interleaved
in one process with their order rotated every repeat, one intra-op thread (as a sweep's trial runs). Each run
is read on this process's CPU clock (`time.process_time`: with one thread the work done, which a loaded
machine inflates less than wall time) from the end of step 1 to the end of training, through an evaluation
point right after step 1 with no sets to score. Ratios are augmented / plain per repeat, printed as median,
min and max, with the load average before and after. The augmentation alone (`augment_batch` on one batch of
32) is timed the same way.

    python benchmarks/bench_augment.py [--images 3200] [--epochs 2] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
import torch

from fakedet.arrays import ImageSet
from fakedet.augment import augment_batch
from fakedet.config import TrainConfig
from fakedet.train import train

VARIANTS = {
    "none": {},
    "blur_jpeg": {"augment": "blur_jpeg"},
    "blur_jpeg sigma<=1.5": {"augment": "blur_jpeg", "augment_sigma": (0.0, 1.5)},
}


def images(n: int) -> ImageSet:
    """Smooth random scenes with noise, half of them darker (a learnable task, like tests' toy set)."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (n, 8, 8, 3)).repeat(4, 1).repeat(4, 2)
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    labels = (np.arange(n) % 2).astype(np.uint8)
    pixels[labels == 1] //= 2
    return ImageSet(pixels, labels, name="bench")


def cpu_seconds_of_training(cfg: TrainConfig, data: ImageSet) -> tuple[float, int]:
    """CPU seconds from the end of step 1 to the end of training, and the steps in that span."""
    marks = {}

    def at_point(record, _snapshot):
        marks.setdefault(record.step, time.process_time())

    result = train(cfg, data, on_eval=at_point)
    return time.process_time() - marks[1], result.history[-1]["step"] - 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=3200)
    p.add_argument("--epochs", type=float, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = images(args.images)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} thread(s); "
          f"load before {os.getloadavg()}")
    for srm in ("none", "pool1"):
        per_step = {name: [] for name in VARIANTS}
        names = list(VARIANTS)
        for r in range(args.repeats):
            for name in names[r % len(names):] + names[: r % len(names)]:  # rotated: load hits every variant alike
                cfg = TrainConfig(srm=srm, lr=1e-2, epochs=args.epochs, eval_at=(1 / (args.images // 32),), device="cpu",
                                  **VARIANTS[name])
                seconds, steps = cpu_seconds_of_training(cfg, data)
                per_step[name].append(seconds / steps)
        for name in names[1:]:
            ratios = [a / b for a, b in zip(per_step[name], per_step["none"])]
            print(f"srm={srm:5s} {name:22s} {1e3 * statistics.median(per_step[name]):6.2f} ms/step against "
                  f"{1e3 * statistics.median(per_step['none']):6.2f}: ratio median {statistics.median(ratios):.2f} "
                  f"(min {min(ratios):.2f}, max {max(ratios):.2f}, n = {args.repeats} repeats)")
    batch = torch.from_numpy(data.images[:32])
    for name in names[1:]:
        cfg = TrainConfig(**VARIANTS[name])
        start = time.process_time()
        for step in range(200):
            augment_batch(batch, cfg, 0, step)
        print(f"augment_batch alone, {name}: {1e3 * (time.process_time() - start) / 200:.2f} ms per batch of 32")
    print(f"load after {os.getloadavg()}")


if __name__ == "__main__":
    main()
