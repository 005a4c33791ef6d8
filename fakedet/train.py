"""The one training function. The CLI, sweeps, notebooks, benchmarks and tests all call `train`.

Data arrive as `ImageSet`s (uint8 N×32×32×3). They are put on the device once as uint8 and batched
there (no DataLoader: at 32×32 the per-batch Python of a DataLoader costs more than the model); each
batch is normalised on the device as it is drawn. Every shuffle is derived from (seed, epoch) alone,
so a run resumed from a checkpoint at any step continues exactly as if never stopped, and with a
constant learning rate the state after epoch 10 of a 100-epoch run is the state of a 10-epoch run
with the same seed. "Exactly" is bit for bit on the CPU; on a GPU it holds with
`TrainConfig.deterministic` and to rounding without it (README, "GPU").
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
from fakedet.preprocess import (
    algorithms,
    host_sync_allowed,
    ieee_float32,
    predict_logits,
    preprocess,
    resolve_device,
    to_device,
    uint8_tensor,
)

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
    diverged: bool = False
    """The training loss since the previous point, or a logit of some evaluation set, is not finite
    (NaN or infinite): training ends here. A set with non-finite logits is not scored; its metrics
    are `{nonfinite: count, n: size}`."""
    logits: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    """Per evaluation set, the logits at this point; passed to callbacks, never kept in the history."""

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "elapsed_s": self.elapsed_s, "diverged": self.diverged,
                "metrics": self.metrics}

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
    """The callback asked to stop before the last evaluation point."""
    diverged: bool = False
    """Training ended at the last record of `history` because the loss or logits stopped being finite."""

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
    """Score one set: (metrics, logits). `images` is the set already on `device` (uint8), if at hand.

    Logits that are not all finite (a diverged model) are not scored (sklearn refuses NaN): the metrics
    are then `{nonfinite: count, n: size}`.
    """
    logits = predict_logits(model, image_set.images if images is None else images, batch_size, device)
    nonfinite = int(np.count_nonzero(~np.isfinite(logits)))
    if nonfinite:
        return {"nonfinite": nonfinite, "n": len(logits)}, logits
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
    and data give the same result (bit for bit on CPU; on a GPU see `TrainConfig.deterministic`).

    A run whose training loss or logits stop being finite ends at the evaluation point that sees it:
    the record there (and the result) says `diverged`, and the callback still gets it. Finiteness is
    read at evaluation points only, where the host waits for the GPU anyway; the training steps never
    make it wait (they may run under `torch.cuda.set_sync_debug_mode("error")`).
    """
    cfg.validate()
    eval_sets = dict(eval_sets or {})
    if "train" in eval_sets:
        raise ValueError("'train' is reserved for the training loss; name the evaluation set otherwise")
    if len(train_set) == 0 or len(np.unique(train_set.labels)) < 2:
        raise ValueError(f"training set {train_set.name!r} must hold both REAL and FAKE images")
    device = resolve_device(cfg.device)
    with algorithms(cfg.deterministic), ieee_float32():
        return _train(cfg, train_set, eval_sets, device, on_eval, resume, progress)


def _train(
    cfg: TrainConfig,
    train_set: ImageSet,
    eval_sets: dict[str, ImageSet],
    device: torch.device,
    on_eval: EvalCallback | None,
    resume: dict[str, Any] | None,
    progress: bool,
) -> TrainResult:
    schedule = BatchSchedule(len(train_set), cfg.batch_size, cfg.shuffle, cfg.seed)
    spe = schedule.steps_per_epoch
    n_total = total_steps(cfg, spe)
    points = eval_steps(cfg, spe)

    with host_sync_allowed(device):
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

        # Every set goes to the device once, as uint8 (1 byte a value: 276 MB for CIFAKE's 90k training
        # images, not the 1.1 GB of a float32 copy); each step gathers its batch and normalises it there.
        images = uint8_tensor(train_set.images).to(device)
        labels = torch.from_numpy(np.asarray(train_set.labels, dtype=np.float32)).to(device)
        eval_images = {k: uint8_tensor(s.images).to(device) for k, s in eval_sets.items()}
        loss_sum = torch.zeros((), device=device)

    def snapshot() -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "config": cfg.to_dict(),
            "step": step,
            "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "optimizer": _cpu_copy(optimizer.state_dict()),
            "history": list(history),
        }

    def evaluation_point() -> EvalRecord:
        # the one place the host reads training values back: the mean loss and the logits
        train_loss = float(loss_sum) / loss_steps
        diverged = not math.isfinite(train_loss)
        metrics, logits = {"train": {"loss": train_loss}}, {}
        for name, image_set in eval_sets.items():
            metrics[name], logits[name] = evaluate(model, image_set, device, cfg.eval_batch_size, eval_images[name])
            diverged = diverged or not np.isfinite(logits[name]).all()
        return EvalRecord(step / spe, step, metrics, time.perf_counter() - started, diverged, logits)

    model.train()
    started = time.perf_counter()
    loss_steps = 0
    stopped_early = diverged = False
    bar = tqdm(total=n_total, initial=step, unit="step", desc=f"train {cfg.srm} lr={cfg.lr:g}", disable=not progress)
    epoch_index, order = -1, None
    while points:
        if step // spe != epoch_index:
            epoch_index = step // spe
            # the epoch's batches, row indices end to end (batch k is rows k*batch_size onwards)
            order = to_device(np.concatenate(schedule.epoch(epoch_index)), device)
        start = (step % spe) * cfg.batch_size
        idx = order[start : start + cfg.batch_size]
        loss = criterion(model(preprocess(images[idx])), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach()
        loss_steps += 1
        step += 1
        bar.update(1)
        if step == points[0]:
            points.pop(0)
            with host_sync_allowed(device):
                record = evaluation_point()
                history.append(record.to_dict())
                loss_sum.zero_()
                loss_steps = 0
                diverged = record.diverged
                if on_eval is not None and on_eval(record, snapshot) and points:
                    stopped_early = not diverged
                    break
                if diverged:
                    break
    bar.close()
    model.eval()
    return TrainResult(cfg, model, history, spe, stopped_early, diverged)


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
    # The device and the GPU algorithm choice change rounding only, not the arithmetic asked for.
    ignore = {"epochs", "eval_at", "eval_batch_size", "device", "deterministic"}
    ours = {k: v for k, v in cfg.to_dict().items() if k not in ignore}
    theirs = {k: v for k, v in saved.items() if k not in ignore}
    if ours != theirs:
        diff = {k: (theirs.get(k), v) for k, v in ours.items() if theirs.get(k) != v}
        raise ValueError(f"cannot resume: the saved state was trained with a different config {diff}")
