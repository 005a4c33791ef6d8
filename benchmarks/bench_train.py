"""Training throughput of fakedet's loop against a plain loop in the reference project's style.

Both train the base CNN (batch 32, SGD lr 1e-3 momentum 0.9, BCE) on the same images in the same process.
The reference style: every batch pre-built as a normalised float tensor up front, then a Python loop
over the batches (shuffled batch order, items permuted inside each batch) with the model ending in a
sigmoid and BCELoss, as the reference project's training script does. fakedet: `fakedet.train.train`
with the `reference` shuffle mode (uint8 data on the device, batched there).

    python benchmarks/bench_train.py [--images 20000] [--epochs 2] [--repeats 3] [--device cpu]

Prints images/s for both and their ratio (fakedet / reference; above 1.0 means fakedet is faster). Both
loops are timed without their one-time set-up (the reference's batch building, fakedet's normalising of
the data); the ratio with fakedet's set-up counted is printed too.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time

import numpy as np
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


def reference_style(data: ImageSet, epochs: int, device: torch.device) -> float:
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
    start = time.perf_counter()
    for _ in range(epochs):
        random.shuffle(batches)
        for xb, yb in batches:
            perm = torch.randperm(len(xb))
            xb, yb = xb[perm], yb[perm]
            optimizer.zero_grad()
            loss = criterion(model(xb), yb.reshape(-1, 1))
            loss.item()  # the reference accumulates the loss as a Python float every batch
            loss.backward()
            optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n_batches * 32 * epochs / (time.perf_counter() - start)


def fakedet_loop(data: ImageSet, epochs: int, device: torch.device) -> tuple[float, float]:
    """(loop images/s, images/s including set-up). The loop is timed from the end of the first step to the
    end of training, from the history's own clock, as the reference loop is timed without its batch building."""
    first_step = 1 / (len(data) // 32)  # an evaluation point right after step 1 (no sets to score: a clock reading)
    cfg = TrainConfig(epochs=epochs, device=str(device), eval_at=(first_step,))
    start = time.perf_counter()
    result = train(cfg, data)
    if device.type == "cuda":
        torch.cuda.synchronize()
    total = time.perf_counter() - start
    first, last = result.history[0], result.history[-1]
    loop = (last["step"] - first["step"]) * 32 / (last["elapsed_s"] - first["elapsed_s"])
    return loop, last["step"] * 32 / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    data = make_images(args.images)
    ref, ours, ours_total = [], [], []
    for repeat in range(args.repeats):  # interleaved, first one then the other first, so that noise hits both alike
        for which in (("ref", "ours") if repeat % 2 == 0 else ("ours", "ref")):
            if which == "ref":
                ref.append(reference_style(data, args.epochs, device))
            else:
                loop, total = fakedet_loop(data, args.epochs, device)
                ours.append(loop)
                ours_total.append(total)
    ratio = [o / r for o, r in zip(ours, ref)]
    ratio_total = [o / r for o, r in zip(ours_total, ref)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device {device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.images} images × {args.epochs} epochs, batch 32, {args.repeats} repeats")
    print(f"reference-style loop:      {statistics.median(ref):8.0f} images/s (runs: {', '.join(f'{v:.0f}' for v in ref)})")
    print(f"fakedet train() loop:      {statistics.median(ours):8.0f} images/s (runs: {', '.join(f'{v:.0f}' for v in ours)})")
    print(f"fakedet train() with set-up: {statistics.median(ours_total):6.0f} images/s (normalising the data once, model, schedule)")
    print(f"ratio fakedet/reference (loops): {statistics.median(ratio):.2f} (median of {args.repeats}; runs: {', '.join(f'{v:.2f}' for v in ratio)})")
    print(f"ratio with fakedet's set-up counted: {statistics.median(ratio_total):.2f}")


if __name__ == "__main__":
    main()
