"""The one training function. The CLI, sweeps, notebooks, benchmarks and tests all call `train`.

Data arrive as `ImageSet`s (uint8 N×32×32×3). They are put on the device once as uint8 and batched
there (no DataLoader: at 32×32 the per-batch Python of a DataLoader costs more than the model).
Every shuffle is derived from (seed, epoch) alone, so a run resumed from a checkpoint at any step
continues exactly as if never stopped, and with a constant learning rate the state after epoch 10 of
a 100-epoch run is the state of a 10-epoch run with the same seed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from fakedet.arrays import ImageSet
from fakedet.config import TrainConfig
from fakedet.metrics import score_logits
from fakedet.models import build_model
from fakedet.predict import predict_logits, preprocess, resolve_device, uint8_tensor

STATE_FORMAT = "fakedet-train-state/1"


@dataclass
class EvalRecord:
    """Everything measured at one evaluation point."""

    epoch: float
    """The evaluation point, in epochs (step / steps_per_epoch, so fractions are exact in steps)."""
    step: int
    """Optimizer steps taken so far."""
    metrics: dict[str, dict[str, float]]
    """`{set_name: {metric: value}}`, including `train: {loss}`: mean batch loss since the previous point."""
    elapsed_s: float
    """Training and evaluation seconds so far in this run (a resumed run counts from its resume)."""
    logits: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    """Per evaluation set, the logits at this point; passed to callbacks, never kept in the history."""

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "elapsed_s": self.elapsed_s, "metrics": self.metrics}

    def flat(self) -> dict[str, float]:
        """Metrics as `<set>/<metric>`, the names MLflow and Ray see."""
        return {f"{s}/{k}": v for s, m in self.metrics.items() for k, v in m.items()}


@dataclass
class TrainResult:
    config: TrainConfig
    model: nn.Module
    history: list[dict[str, Any]]
    """One `EvalRecord.to_dict()` per evaluation point, in order."""
    steps_per_epoch: int
    stopped_early: bool = False

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1]


# A callback gets the record and a function returning a resumable state; returning True stops training.
EvalCallback = Callable[[EvalRecord, Callable[[], dict[str, Any]]], "bool | None"]


class BatchSchedule:
    """Which rows form each batch of each epoch, from (seed, epoch) alone."""

    def __init__(self, n_items: int, batch_size: int, mode: str, seed: int) -> None:
        self.n_items, self.batch_size, self.mode, self.seed = n_items, batch_size, mode, seed
        if mode == "reference":
            # The study's loader: one seeded shuffle into fixed batches; the remainder is dropped.
            self.steps_per_epoch = n_items // batch_size
            order = np.random.default_rng([seed, 0x5EED]).permutation(n_items)
            self._fixed = order[: self.steps_per_epoch * batch_size].reshape(self.steps_per_epoch, batch_size)
        elif mode == "full":
            self.steps_per_epoch = math.ceil(n_items / batch_size)
        else:
            raise ValueError(f"unknown shuffle mode {mode!r}")
        if self.steps_per_epoch == 0:
            raise ValueError(f"{n_items} training images are fewer than one batch of {batch_size}")

    def epoch(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        if self.mode == "reference":
            # every epoch: shuffle the batch order, and the items inside each batch
            batches = rng.permuted(self._fixed[rng.permutation(self.steps_per_epoch)], axis=1)
            return list(batches)
        order = rng.permutation(self.n_items)
        return [order[i : i + self.batch_size] for i in range(0, self.n_items, self.batch_size)]


def eval_steps(cfg: TrainConfig, steps_per_epoch: int) -> list[int]:
    """Evaluation points as step counts (at least one step each), always including the last step."""
    total = total_steps(cfg, steps_per_epoch)
    steps = {min(total, max(1, round(e * steps_per_epoch))) for e in cfg.eval_at}
    steps.add(total)
    return sorted(steps)


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    return max(1, round(cfg.epochs * steps_per_epoch))


def evaluate(
    model: nn.Module, image_set: ImageSet, device: torch.device, batch_size: int = 1024, images: torch.Tensor | None = None
) -> tuple[dict[str, float], np.ndarray]:
    """Score one set: (metrics, logits). `images` is the set already on `device` (uint8), if at hand."""
    logits = predict_logits(model, image_set.images if images is None else images, batch_size, device)
    return score_logits(image_set, logits), logits


def train(
    cfg: TrainConfig,
    train_set: ImageSet,
    eval_sets: Mapping[str, ImageSet] | None = None,
    *,
    on_eval: EvalCallback | None = None,
    resume: dict[str, Any] | None = None,
    progress: bool = False,
) -> TrainResult:
    """Train one model on `train_set`, scoring every set in `eval_sets` at each of `cfg.eval_at` and at the end.

    `resume` is a state returned by the callback's snapshot function: training continues from its step
    and its history is kept. Pure apart from the optional callback and progress bar: the same config
    and data give the same result (bit for bit on CPU).
    """
    cfg.validate()
    eval_sets = dict(eval_sets or {})
    if "train" in eval_sets:
        raise ValueError("'train' is reserved for the training loss; name the evaluation set otherwise")
    if len(train_set) == 0 or len(np.unique(train_set.labels)) < 2:
        raise ValueError(f"training set {train_set.name!r} must hold both REAL and FAKE images")
    device = resolve_device(cfg.device)

    schedule = BatchSchedule(len(train_set), cfg.batch_size, cfg.shuffle, cfg.seed)
    spe = schedule.steps_per_epoch
    n_total = total_steps(cfg, spe)
    points = eval_steps(cfg, spe)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.arch, cfg.srm).to(device)
    # foreach: one multi-tensor update for the ten parameter tensors instead of a Python loop over them
    # (torch's default on the CPU); the same arithmetic, about 4% of a CPU step saved
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, foreach=True)
    criterion = nn.BCEWithLogitsLoss()  # the reference's sigmoid + BCELoss, in the numerically stable form

    step, history = 0, []
    if resume is not None:
        _check_resumable(resume, cfg)
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        step, history = int(resume["step"]), list(resume["history"])
    points = [p for p in points if p > step]

    # Normalised once, up front (4 bytes a value: 1.1 GB for CIFAKE's 90k training images): each step is
    # then one gather, as in the reference loop whose batches were pre-built tensors.
    images = torch.cat([preprocess(train_set.images[i : i + 8192], device) for i in range(0, len(train_set), 8192)])
    labels = torch.from_numpy(np.asarray(train_set.labels, dtype=np.float32)).to(device)
    eval_images = {k: uint8_tensor(s.images).to(device) for k, s in eval_sets.items()}

    def snapshot() -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "config": cfg.to_dict(),
            "step": step,
            "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "optimizer": _cpu_copy(optimizer.state_dict()),
            "history": list(history),
        }

    model.train()
    started = time.perf_counter()
    loss_sum = torch.zeros((), device=device)
    loss_steps = 0
    stopped_early = False
    bar = tqdm(total=n_total, initial=step, unit="step", desc=f"train {cfg.srm} lr={cfg.lr:g}", disable=not progress)
    epoch_index, batches = -1, []
    while points:
        if step // spe != epoch_index:
            epoch_index = step // spe
            batches = [torch.from_numpy(b).to(device) for b in schedule.epoch(epoch_index)]
        idx = batches[step % spe]
        loss = criterion(model(images[idx]), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach()
        loss_steps += 1
        step += 1
        bar.update(1)
        if step == points[0]:
            points.pop(0)
            metrics = {"train": {"loss": float(loss_sum) / loss_steps}}
            logits = {}
            for name, image_set in eval_sets.items():
                metrics[name], logits[name] = evaluate(model, image_set, device, cfg.eval_batch_size, eval_images[name])
            record = EvalRecord(step / spe, step, metrics, time.perf_counter() - started, logits)
            history.append(record.to_dict())
            loss_sum.zero_()
            loss_steps = 0
            if on_eval is not None and on_eval(record, snapshot):
                stopped_early = bool(points)
                break
    bar.close()
    model.eval()
    return TrainResult(cfg, model, history, spe, stopped_early)


def _cpu_copy(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_cpu_copy(v) for v in obj]
    return obj


def _check_resumable(state: dict[str, Any], cfg: TrainConfig) -> None:
    if state.get("format") != STATE_FORMAT:
        raise ValueError("resume state is not a fakedet training state")
    saved = dict(state["config"])
    # A resumed run may train longer or evaluate elsewhere; everything that shapes the trajectory must match.
    ignore = {"epochs", "eval_at", "eval_batch_size", "device"}
    ours = {k: v for k, v in cfg.to_dict().items() if k not in ignore}
    theirs = {k: v for k, v in saved.items() if k not in ignore}
    if ours != theirs:
        diff = {k: (theirs.get(k), v) for k, v in ours.items() if theirs.get(k) != v}
        raise ValueError(f"cannot resume: the saved state was trained with a different config {diff}")
