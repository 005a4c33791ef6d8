"""Evaluation throughput of the training loop's forward passes: batch size × memory layout, on the CPU.

What an evaluation point of the main job runs: the study's CNN in eval mode over uint8 images already on
the device (`fakedet.train.eval_logits`, what `ModuleStepper.logits` calls), for each SRM placement, over
one evaluation point's sets: on the default stand-in 9,500 images in six sets (CIFAKE test 2,000 and
validation 500, CIFAR-100 test 2,000 and its JPEG copy 2,000, AGIRI test 1,000 and transfer-validation
2,000), here random uint8 images of those sizes (throughput does not depend on the pixels). The variants:

- `nchw B`: `fakedet.preprocess.predict_logits` at batch B: the model as trained, batches normalised into
  contiguous NCHW (the path before `eval_logits`; B = 1024 was the default);
- `channels_last B`: `eval_logits` at batch B: a channels_last copy of the model, batches cast straight
  from their NHWC uint8 (no transpose).

With `--bundle K`, a bundle's evaluation (`fakedet.bundle.StackedStepper.logits`, K models vmapped,
contiguous NCHW) is timed at each batch size too, since `eval_batch_size` sets its batch as well (K = 4
adds about as much CPU time as the rest).

One thread (`torch.set_num_threads(1)`), as a sweep's trial runs on one CPU; the variants interleaved in
one process, the order rotated every repeat, so that load on a shared machine hits all alike. Times are
the process's CPU seconds (`time.process_time`; one thread, so CPU time is the work, which load inflates
far less than wall time), printed as images per CPU-second: median, min and max over --repeats, and each
variant's ratio to `nchw 1024` per repeat (median, min, max).

Agreement: each variant's logits against `nchw 1024`'s (max |Δ logit|), on models trained 300 steps at
lr 1e-2 (larger logits than at initialisation), and, where the study's checkpoints are found
(../shared/reference or FAKEDET_REFERENCE_DIR), on those three.

    python benchmarks/bench_eval.py [--repeats 5] [--batches 256,512,1024] [--bundle 4]  # ~2 CPU-min without --bundle
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from fakedet.arrays import ImageSet
from fakedet.bundle import StackedStepper
from fakedet.config import TrainConfig
from fakedet.models import load_reference_checkpoint
from fakedet.preprocess import predict_logits
from fakedet.train import build_initial, eval_logits, sgd_for, train

CPU = torch.device("cpu")
PLACEMENTS = ("none", "pool1", "pool2")
REFERENCE = Path(os.environ.get("FAKEDET_REFERENCE_DIR") or Path(__file__).resolve().parents[2] / "shared" / "reference")
CHECKPOINTS = [("base_model.pth", "none"), ("mini_model.pth", "none"), ("SRM_model.pth", "pool1")]


POINT_SETS = (2000, 500, 2000, 2000, 1000, 2000)  # one evaluation point's sets on the default stand-in


def random_images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))


def trained(srm: str) -> torch.nn.Module:
    """The base CNN with `srm` after 300 steps (batch 32, lr 1e-2) on a learnable toy set."""
    rng = np.random.default_rng(1)
    labels = (np.arange(9600) % 2).astype(np.uint8)
    images = rng.integers(0, 256, (9600, 32, 32, 3), dtype=np.uint8)
    images[labels == 1] //= 2  # REAL darker: learnable, so the logits grow
    return train(TrainConfig(srm=srm, epochs=1, lr=1e-2, device="cpu"), ImageSet(images, labels, name="toy")).model


def spread(values: list[float], fmt: str) -> str:
    return f"{fmt.format(statistics.median(values))} (min {fmt.format(min(values))}, max {fmt.format(max(values))})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", default="256,512,1024")
    parser.add_argument("--bundle", type=int, default=0, help="also time a bundle's evaluation with K models (0: no)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    batches = [int(b) for b in args.batches.split(",")]
    sets = [random_images(n, seed) for seed, n in enumerate(POINT_SETS)]
    images = torch.cat(sets)  # for the agreement checks
    n_point = sum(POINT_SETS)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, 1 thread; "
          f"one point = {n_point} images in sets of {', '.join(map(str, POINT_SETS))}; {args.repeats} repeats; load average before: "
          + ", ".join(f"{v:.1f}" for v in os.getloadavg()))  # fmt: skip

    models = {srm: trained(srm) for srm in PLACEMENTS}
    variants = {f"nchw {b}": (lambda m, x, b=b: predict_logits(m, x, b, CPU)) for b in (1024, 256)}
    variants.update({f"channels_last {b}": (lambda m, x, b=b: eval_logits(m, x, b, CPU)) for b in batches})
    bundles = {}
    if args.bundle:
        cfgs = [TrainConfig(lr=lr, device="cpu") for lr in np.geomspace(1e-3, 1e-2, args.bundle)]
        bundle_models = [build_initial(c, CPU) for c in cfgs]
        bundles = {f"bundle K={args.bundle} nchw {b}": (StackedStepper(bundle_models, [sgd_for(m, c) for m, c in zip(bundle_models, cfgs)]), b)
                   for b in sorted({256, 1024, *batches}, reverse=True)}  # fmt: skip

    print("\nagreement with nchw 1024 (max |Δ logit|; 0 = bit-identical):")
    checks = {f"trained {srm}": m for srm, m in models.items()}
    if all((REFERENCE / name).is_file() for name, _ in CHECKPOINTS):
        checks.update({f"checkpoint {name}": load_reference_checkpoint(REFERENCE / name, srm) for name, srm in CHECKPOINTS})
    else:
        print(f"  (the study's checkpoints are not at {REFERENCE}: trained models only)")
    for label, model in checks.items():
        base = predict_logits(model, images, 1024, CPU)
        diffs = {name: float(np.abs(f(model, images) - base).max()) for name, f in variants.items()}
        print(f"  {label:<28} |logit| ≤ {np.abs(base).max():6.2f}: " + ", ".join(f"{n} {d:.1e}" for n, d in diffs.items()))
    if bundles:
        (stepper, _), *_ = bundles.values()
        base = stepper.logits(images, 1024)
        diffs = [f"batch {b} {np.abs(s.logits(images, b) - base).max():.1e}" for s, b in bundles.values()]
        print(f"  bundle K={args.bundle} (initial weights) against its batch 1024: " + ", ".join(diffs))

    print(f"\nimages per CPU-second, 1 thread (median, min, max over {args.repeats} repeats), and the ratio to nchw 1024:")
    for srm, model in models.items():
        seconds: dict[str, list[float]] = {name: [] for name in variants}
        names = list(variants)
        for name in names:  # warm-up: first-call allocations and kernel choices out of the timings
            variants[name](model, sets[0])
        for repeat in range(args.repeats):
            for name in names[repeat % len(names):] + names[: repeat % len(names)]:
                start = time.process_time()
                for x in sets:
                    variants[name](model, x)
                seconds[name].append(time.process_time() - start)
        for name in names:
            rate = [n_point / s for s in seconds[name]]
            ratio = [b / s for b, s in zip(seconds["nchw 1024"], seconds[name])]
            print(f"  {srm:<5} {name:<18} {spread(rate, '{:6.0f}')} images/s   ×{spread(ratio, '{:.2f}')}")
    if bundles:
        seconds = {name: [] for name in bundles}
        names = list(bundles)
        for repeat in range(args.repeats):
            for name in names[repeat % len(names):] + names[: repeat % len(names)]:
                stepper, b = bundles[name]
                start = time.process_time()
                for x in sets:
                    stepper.logits(x, b)
                seconds[name].append(time.process_time() - start)
        ref = names[0]  # batch 1024
        for name in names:
            rate = [args.bundle * n_point / s for s in seconds[name]]  # images × models
            ratio = [b / s for b, s in zip(seconds[ref], seconds[name])]
            print(f"  {name:<26} {spread(rate, '{:6.0f}')} model-images/s   ×{spread(ratio, '{:.2f}')}")
    print("load average after: " + ", ".join(f"{v:.1f}" for v in os.getloadavg()))


if __name__ == "__main__":
    main()
