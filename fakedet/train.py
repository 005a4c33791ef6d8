"""The one training loop. The CLI, notebooks, benchmarks and tests call `train` (one model); sweeps and
bundles call `train_models` (K >= 1 models), which `train` is with one config.

The loop is the same for every K; only its stepper differs: one model steps as a plain module with
`torch.optim.SGD` (`ModuleStepper`), several as one vmapped stack (`fakedet.bundle.StackedStepper`), and on a
GPU `GraphStepper` can replay either from a CUDA graph (`TrainConfig.cuda_graph`).
Input checks, initialisation, resume, batch order, evaluation records, snapshots (`STATE_FORMAT`), the
float32 and deterministic settings and the result are shared, so a bundled model's state resumes alone
and a solo state resumes inside a bundle.

Data arrive as `ImageSet`s (uint8 N×32×32×3). They are put on the device once as uint8 and batched
there (no DataLoader: at 32×32 the per-batch Python of a DataLoader costs more than the model); each
batch is normalised on the device as it is drawn. Every shuffle is derived from (seed, epoch) alone,
so a run resumed from a checkpoint at any step continues exactly as if never stopped, and with a
constant learning rate the state after epoch 10 of a 100-epoch run is the state of a 10-epoch run
with the same seed. "Exactly" is bit for bit on the CPU; on a GPU it holds with
`TrainConfig.deterministic` and to rounding without it (README, "GPU").
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from fakedet.arrays import ImageSet
from fakedet.augment import augment_rows
from fakedet.bundle import bundle_stepper, check_bundle
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


# `train`'s callback gets the record and a function returning a resumable state; returning True stops training.
EvalCallback = Callable[[EvalRecord, Callable[[], dict[str, Any]]], "bool | None"]
# `train_bundle`'s gets the model's index too; returning True stops that model alone.
BundleCallback = Callable[[int, EvalRecord, Callable[[], dict[str, Any]]], "bool | None"]


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


def rounded_points(cfg: TrainConfig, n_items: int) -> list[tuple[float, float]]:
    """The evaluation points that fall between optimizer steps, as (asked, measured) epochs: a point is
    taken at the nearest whole step (`eval_steps`), so with 11 steps an epoch 0.25 is measured at 3/11 = 0.273."""
    spe = BatchSchedule(n_items, cfg.batch_size, cfg.shuffle, cfg.seed).steps_per_epoch
    total = total_steps(cfg, spe)
    measured = [(e, min(total, max(1, round(e * spe))) / spe) for e in cfg.eval_at]
    return [(e, m) for e, m in measured if abs(e - m) > 1e-9 * max(1.0, e)]


def rounding_note(cfg: TrainConfig, n_items: int) -> str | None:
    """One line saying which evaluation points are measured at another epoch than asked (None: none)."""
    moved = rounded_points(cfg, n_items)
    if not moved:
        return None
    spe = BatchSchedule(n_items, cfg.batch_size, cfg.shuffle, cfg.seed).steps_per_epoch
    shown = ", ".join(f"{e:g} → {m:.3g}" for e, m in moved[:8]) + (f", … ({len(moved)} in all)" if len(moved) > 8 else "")
    return (f"evaluation points at whole optimizer steps ({spe} per epoch at batch size {cfg.batch_size} on "
            f"{n_items} images): {shown}")


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    return max(1, round(cfg.epochs * steps_per_epoch))


def eval_logits(model: nn.Module, images_uint8: torch.Tensor, batch_size: int, device: torch.device) -> np.ndarray:
    """Logits (float32, N) of `model` in eval mode on uint8 N×H×W×3 images on `device`; `model` itself
    (the training weights and their train mode) is not touched.

    On the CPU the forward passes run on a channels_last copy of the model, on batches cast straight from
    the NHWC uint8 images (their channels_last view; no transpose): 1.8-1.9× the images per CPU-second of
    the model as trained on contiguous NCHW batches (median over placements; 1 thread, batch 1024, where
    256 and 512 do as well), logits within 1.2e-5 of those (0 without SRM; benchmarks/bench_eval.py). The
    normalisation is `preprocess`'s, value for value. oneDNN blocks the batch, so another batch size may
    change a logit in its last bits. Elsewhere the model runs as it is (`predict_logits`): channels_last
    is not measured on a GPU.
    """
    if device.type != "cpu":
        return predict_logits(model, images_uint8, batch_size, device)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    twin = copy.deepcopy(model).to(memory_format=torch.channels_last).eval()
    with torch.inference_mode():
        out = [twin(channels_last_batch(images_uint8[i : i + batch_size])).reshape(-1)
               for i in range(0, len(images_uint8), batch_size)]
    if not out:
        return np.zeros(0, dtype=np.float32)
    return torch.cat(out).numpy()


def channels_last_batch(images_uint8: torch.Tensor) -> torch.Tensor:
    """`preprocess`'s values, value for value, in NHWC memory: the uint8 N×H×W×3 batch's channels_last view
    cast without a transpose (what a channels_last model consumes without reordering its input)."""
    return images_uint8.permute(0, 3, 1, 2).to(torch.float32).sub_(127.5).div_(127.5)


def evaluate(
    model: nn.Module, image_set: ImageSet, device: torch.device, batch_size: int = TrainConfig.eval_batch_size,
    images: torch.Tensor | None = None,
) -> tuple[dict[str, float], np.ndarray]:
    """Score one set: (metrics, logits). `images` is the set already on `device` (uint8), if at hand.

    Logits that are not all finite (a diverged model) are not scored (sklearn refuses NaN): the metrics
    are then `{nonfinite: count, n: size}`.
    """
    on_device = images if images is not None else uint8_tensor(image_set.images).to(device)
    logits = eval_logits(model, on_device, batch_size, device)
    return score(image_set, logits), logits


def score(image_set: ImageSet, logits: np.ndarray) -> dict[str, float]:
    """One model's metrics on one set; `{nonfinite: count, n: size}` where its logits are not all finite."""
    nonfinite = int(np.count_nonzero(~np.isfinite(logits)))
    if nonfinite:
        return {"nonfinite": nonfinite, "n": len(logits)}
    return score_logits(image_set, logits)


def build_initial(cfg: TrainConfig, device: torch.device) -> nn.Module:
    """The model a run starts from: built under the config's seed without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return build_model(cfg.arch, cfg.srm, cfg.attention).to(device)


def sgd_for(model: nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    """The run's optimizer; its state dict is the `optimizer` of a snapshot."""
    # foreach: one multi-tensor update for the ten parameter tensors instead of a Python loop over them
    # (torch's default on the CPU); the same arithmetic, about 4% of a CPU step saved
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, foreach=True)


def epoch_order(schedules: Sequence[BatchSchedule], epoch: int, device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """Every model's batches of `epoch` as one (K, items) index tensor on the device, and the step offsets.

    All models share the number of items and the batch size, so step s is columns offsets[s]:offsets[s+1]
    for every model (`full` mode's last, shorter batch included). One copy per epoch, which never makes the
    host wait (`to_device`).
    """
    batches = [s.epoch(epoch) for s in schedules]
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in batches[0]])]).tolist()
    return to_device(np.stack([np.concatenate(b) for b in batches]).astype(np.int64), device), offsets


class Stepper(Protocol):
    """How the loop advances its K live models (rows, in the order of the loop's live models).

    `ModuleStepper` (K = 1) runs the plain module and `torch.optim.SGD`; `fakedet.bundle.StackedStepper`
    (K > 1) runs all rows as one vmapped model (`WideStepper`: as one wide network). `GraphStepper` replays
    any of them from a CUDA graph. None waits for the device in `step`.
    """

    def __len__(self) -> int: ...

    def step(self, images_uint8: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """One SGD step of every row on its batch (row k of `idx`, (K, B), indexes `images_uint8` and
        `labels`); the batch losses (K,), on the device."""
        ...

    def logits(self, images_uint8: torch.Tensor, batch_size: int) -> np.ndarray:
        """Logits (K, N) of every row in eval mode on uint8 images already on the device."""
        ...

    def module(self, row: int) -> nn.Module:
        """Row `row`'s current weights in a module of the architecture."""
        ...

    def optimizer(self, row: int) -> torch.optim.SGD:
        """Row `row`'s current optimizer state, as `torch.optim.SGD` over `module(row)`'s parameters."""
        ...

    def keep(self, rows: Sequence[int]) -> None:
        """Drop every row not in `rows` (nonempty, in that order)."""
        ...


class ModuleStepper:
    """The stepper for one model: its own module and `torch.optim.SGD`, as the reference trains.

    `channels_last`: the weights and each batch in NHWC memory (the batch cast from the uint8 images without
    a transpose, `channels_last_batch`); the same values, other kernels, so other rounding. Off by default
    (README, "Benchmarks": measured by benchmarks/bench_steppers.py)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.SGD, device: torch.device,
                 channels_last: bool = False) -> None:
        self.model, self._optimizer, self.device = model, optimizer, device
        self.criterion = nn.BCEWithLogitsLoss()  # the reference's sigmoid + BCELoss, in the numerically stable form
        # Module.to keeps each Parameter object (only its data changes): the optimizer's references stay valid
        self.batch = channels_last_batch if channels_last else preprocess
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.model.train()

    def __len__(self) -> int:
        return 1

    def step(self, images_uint8: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        idx = idx[0]
        loss = self.criterion(self.model(self.batch(images_uint8[idx])), labels[idx])
        loss.backward()
        self._optimizer.step()
        # the gradients go after the step, not before the next: every backward pass then allocates them
        # afresh (a CUDA graph's capture takes them into its own memory) and no model leaves with them
        self._optimizer.zero_grad(set_to_none=True)
        return loss.detach().reshape(1)

    def logits(self, images_uint8: torch.Tensor, batch_size: int) -> np.ndarray:
        return eval_logits(self.model, images_uint8, batch_size, self.device)[None]

    def module(self, row: int) -> nn.Module:
        return self.model

    def optimizer(self, row: int) -> torch.optim.SGD:
        return self._optimizer

    def keep(self, rows: Sequence[int]) -> None:
        if list(rows) != [0]:
            raise ValueError(f"a one-model stepper keeps its one row, not {list(rows)}")


GRAPH_WARMUP = 3
"""Eager steps before a capture (and again after models leave a bundle): torch's CUDA-graph notes warm a
captured region up on a side stream first, so that lazy set-up (cuBLAS handles, cuDNN's benchmarked
algorithm for each shape, the optimizer's momentum buffers) happens outside the capture; they use 3."""


class StepGraph(Protocol):
    """One captured training step: `replay` runs it again on the buffers it was captured on, after which
    `output` (always the same tensor) holds its losses."""

    output: torch.Tensor

    def replay(self) -> None: ...

    def release(self) -> None: ...


class CudaStepGraph:
    """A step captured with `torch.cuda.graph` on the device (its own memory pool). The capture records
    the kernels without running them; `GraphStepper` replays it once to take the step."""

    def __init__(self, device: torch.device, step: Callable[[], torch.Tensor]) -> None:
        self.device, self.graph = device, torch.cuda.CUDAGraph()
        # thread_local: a CUDA call from another thread of the process (Ray's, MLflow's) must not void the capture
        with torch.cuda.device(device), torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.output = step()

    def replay(self) -> None:
        self.graph.replay()

    def release(self) -> None:
        # a replay may still run on the device: its buffers are freed only once it has ended
        torch.cuda.current_stream(self.device).synchronize()
        self.graph.reset()


class GraphBackend(Protocol):
    """How `GraphStepper` warms up and captures: `CudaGraphs` on a GPU; tests replay in Python."""

    def warm(self, step: Callable[[], torch.Tensor]) -> torch.Tensor: ...

    def capture(self, step: Callable[[], torch.Tensor]) -> StepGraph: ...


class CudaGraphs:
    """Warm-up steps on a side stream (ordered after and before the loop's stream), captures with
    `CudaStepGraph`."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.side = device, torch.cuda.Stream(device)

    def warm(self, step: Callable[[], torch.Tensor]) -> torch.Tensor:
        current = torch.cuda.current_stream(self.device)
        self.side.wait_stream(current)
        with torch.cuda.stream(self.side):
            out = step()
        current.wait_stream(self.side)
        out.record_stream(current)  # used on the loop's stream: its memory is not reused on the side stream before
        return out

    def capture(self, step: Callable[[], torch.Tensor]) -> StepGraph:
        return CudaStepGraph(self.device, step)


class GraphStepper:
    """Any stepper's training step captured once and replayed (`TrainConfig.cuda_graph`): on a GPU a step of
    this 61k-parameter network is a few dozen kernels of microseconds each, bound by their launches; a
    replay launches them all at once. Evaluation, snapshots and `keep` go to the wrapped stepper.

    The capture holds the step's buffers: the batch index `idx` is copied into a buffer of its own every
    step; the images and labels are the very tensors the capture saw (the training set on the device, the
    same every step) or, with `copy_inputs` (augmented batches, new tensors every step), copied into
    buffers of their shapes. The parameters, momentum buffers and BatchNorm statistics are updated in
    place, as eagerly. A step the capture cannot take (another batch shape, such as `full` shuffling's
    shorter last batch, or other tensors without `copy_inputs`) runs eagerly; so do the first
    `GRAPH_WARMUP` steps and, after `keep` (models leaving a bundle change its shapes), the next
    `GRAPH_WARMUP` before a new capture. `replayed`, `eager` and `captures` count them.
    """

    def __init__(self, inner: Stepper, device: torch.device, copy_inputs: bool = False, warmup: int = GRAPH_WARMUP,
                 backend: GraphBackend | None = None) -> None:
        if backend is None:
            if device.type != "cuda":
                raise ValueError(f"a CUDA graph needs a CUDA device, not {device}")
            backend = CudaGraphs(device)
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 eager step before a capture, got {warmup}")
        self.inner, self.device, self.copy_inputs, self.warmup, self.backend = inner, device, copy_inputs, warmup, backend
        self.graph: StepGraph | None = None
        self.replayed = self.eager = self.captures = 0
        self._warmed, self._last_shapes, self._captured_shapes = 0, None, None
        self._idx: torch.Tensor | None = None
        self._images: torch.Tensor | None = None
        self._labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.inner)

    @staticmethod
    def _shapes(images: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor) -> tuple:
        return tuple(images.shape), tuple(labels.shape), tuple(idx.shape)

    def _fits(self, images: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor) -> bool:
        if self._shapes(images, labels, idx) != self._captured_shapes:
            return False
        return self.copy_inputs or (images.data_ptr() == self._images.data_ptr() and labels.data_ptr() == self._labels.data_ptr())

    def step(self, images_uint8: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if self.graph is not None:
            if not self._fits(images_uint8, labels, idx):
                self.eager += 1
                return self.inner.step(images_uint8, labels, idx)
            self._idx.copy_(idx)
            if self.copy_inputs:
                self._images.copy_(images_uint8)
                self._labels.copy_(labels)
            self.graph.replay()
            self.replayed += 1
            return self.graph.output.clone()
        shapes = self._shapes(images_uint8, labels, idx)
        if self._warmed < self.warmup or shapes != self._last_shapes:
            # a capture takes the shape of the steps before it, never a one-off (a shorter last batch)
            self._warmed = self._warmed + 1 if shapes == self._last_shapes else 1
            self._last_shapes = shapes
            self.eager += 1
            return self.backend.warm(lambda: self.inner.step(images_uint8, labels, idx))
        with host_sync_allowed(self.device):  # a capture begins by waiting for the device
            self._captured_shapes = shapes
            self._idx = idx.clone()
            self._images, self._labels = ((images_uint8.clone(), labels.clone()) if self.copy_inputs
                                          else (images_uint8, labels))
            self.graph = self.backend.capture(lambda: self.inner.step(self._images, self._labels, self._idx))
            self.captures += 1
        self.graph.replay()  # the capture only recorded this step: take it
        self.replayed += 1
        return self.graph.output.clone()

    def logits(self, images_uint8: torch.Tensor, batch_size: int) -> np.ndarray:
        return self.inner.logits(images_uint8, batch_size)

    def module(self, row: int) -> nn.Module:
        return self.inner.module(row)

    def optimizer(self, row: int) -> torch.optim.SGD:
        return self.inner.optimizer(row)

    def keep(self, rows: Sequence[int]) -> None:
        self.inner.keep(rows)
        self.release()

    def release(self) -> None:
        """Drop the capture and its buffers; the next steps warm up and capture again."""
        if self.graph is not None:
            self.graph.release()
        self.graph, self._warmed, self._last_shapes = None, 0, None
        self._idx = self._images = self._labels = None


def stepper_for(cfgs: Sequence[TrainConfig], models: Sequence[nn.Module], optimizers: Sequence[torch.optim.SGD],
                device: torch.device) -> Stepper:
    """The loop's stepper: `ModuleStepper` for one model, `fakedet.bundle.bundle_stepper` for several, inside
    a `GraphStepper` where the configs ask for `cuda_graph` and the device is a GPU (elsewhere it has no
    effect: the steps run eagerly)."""
    first = cfgs[0]
    stepper: Stepper = (ModuleStepper(models[0], optimizers[0], device) if len(cfgs) == 1
                        else bundle_stepper(cfgs, models, optimizers))
    if first.cuda_graph and device.type == "cuda":
        stepper = GraphStepper(stepper, device, copy_inputs=first.augment != "none")
    return stepper


@dataclass
class ModelEval:
    """One live model at one evaluation point, as the loop's callback gets it."""

    index: int
    """The model's index in the configs given to `train_models`."""
    record: EvalRecord
    snapshot: Callable[[], dict[str, Any]]
    """Returns the model's resumable state here (`STATE_FORMAT`): `resume` takes it, alone or in a bundle."""


# The loop's callback: every live model's record at one evaluation point (diverged ones included, for
# the last time), in index order; it returns the indices of the models to stop (or None: none).
PointCallback = Callable[[list[ModelEval]], "Collection[int] | None"]


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
    make it wait (they may run under `torch.cuda.set_sync_debug_mode("error")`). This is `train_models`
    with one config (its plain-module stepper).
    """

    def on_point(evals: list[ModelEval]) -> set[int] | None:
        (e,) = evals
        return {0} if on_eval is not None and on_eval(e.record, e.snapshot) else None

    (result,) = train_models([cfg], train_set, eval_sets, on_eval=on_point, resume=[resume], progress=progress)
    return result


def train_bundle(
    cfgs: Sequence[TrainConfig],
    train_set: ImageSet,
    eval_sets: Mapping[str, ImageSet] | None = None,
    *,
    on_eval: BundleCallback | None = None,
    resume: Sequence[dict[str, Any] | None] | None = None,
    progress: bool = False,
) -> list[TrainResult]:
    """`train_models` with a callback per model: `on_eval(k, record, snapshot)` for each live model k at each
    evaluation point, in index order; returning True stops model k alone."""

    def on_point(evals: list[ModelEval]) -> set[int]:
        return {e.index for e in evals if on_eval is not None and on_eval(e.index, e.record, e.snapshot)}

    return train_models(cfgs, train_set, eval_sets, on_eval=on_point, resume=resume, progress=progress)


def train_models(
    cfgs: Sequence[TrainConfig],
    train_set: ImageSet,
    eval_sets: Mapping[str, ImageSet] | None = None,
    *,
    on_eval: PointCallback | None = None,
    resume: Sequence[dict[str, Any] | None] | None = None,
    progress: bool = False,
) -> list[TrainResult]:
    """Train one model per config (K >= 1) on `train_set`; one `TrainResult` per config, in order.

    The configs must share `fakedet.bundle.SHARED_FIELDS`. One model steps as a plain module
    (`ModuleStepper`); several step together (`fakedet.bundle.StackedStepper`) and each result is what
    `train(cfgs[k], ...)` gives, up to floating-point reassociation. At every evaluation point `on_eval`
    gets every live model's `ModelEval`, and the models whose indices it returns stop. A model whose
    training loss or logits are not finite ends there as diverged; a stopped or diverged model leaves the
    stepper and the others go on. `resume` holds one state (or None: from scratch) per config, all at one
    step. The whole run, both steppers alike, runs under `algorithms(deterministic)`, `ieee_float32()`
    and, around setup and evaluation points only, `host_sync_allowed`.
    """
    cfgs = list(cfgs)
    check_bundle(cfgs)
    for cfg in cfgs:
        cfg.validate()
    eval_sets = dict(eval_sets or {})
    if "train" in eval_sets:
        raise ValueError("'train' is reserved for the training loss; name the evaluation set otherwise")
    if len(train_set) == 0 or len(np.unique(train_set.labels)) < 2:
        raise ValueError(f"training set {train_set.name!r} must hold both REAL and FAKE images")
    resume = [None] * len(cfgs) if resume is None else list(resume)
    if len(resume) != len(cfgs):
        raise ValueError(f"resume holds {len(resume)} states for {len(cfgs)} configs; give one (or None) per config")
    device = resolve_device(cfgs[0].device)
    with algorithms(cfgs[0].deterministic), ieee_float32():
        return _train(cfgs, train_set, eval_sets, device, on_eval, resume, progress)


def _train(
    cfgs: list[TrainConfig],
    train_set: ImageSet,
    eval_sets: dict[str, ImageSet],
    device: torch.device,
    on_eval: PointCallback | None,
    resume: list[dict[str, Any] | None],
    progress: bool,
) -> list[TrainResult]:
    first, n_models = cfgs[0], len(cfgs)
    schedules = [BatchSchedule(len(train_set), c.batch_size, c.shuffle, c.seed) for c in cfgs]
    spe = schedules[0].steps_per_epoch
    n_total = total_steps(first, spe)
    points = eval_steps(first, spe)

    with host_sync_allowed(device):
        models = [build_initial(cfg, device) for cfg in cfgs]
        optimizers = [sgd_for(model, cfg) for model, cfg in zip(models, cfgs)]
        histories: list[list[dict[str, Any]]] = [[] for _ in cfgs]
        starts = [0] * n_models
        for k, state in enumerate(resume):
            if state is not None:
                _check_resumable(state, cfgs[k])
                models[k].load_state_dict(state["model"])
                optimizers[k].load_state_dict(state["optimizer"])
                starts[k], histories[k] = int(state["step"]), list(state["history"])
        if len(set(starts)) > 1:
            raise ValueError(f"cannot bundle resumed models at different steps {starts}; resume them at one step")
        step = starts[0]
        points = [p for p in points if p > step]
        stepper = stepper_for(cfgs, models, optimizers, device)

        # Every set goes to the device once, as uint8 (1 byte a value: 276 MB for CIFAKE's 90k training
        # images, not the 1.1 GB of a float32 copy), shared by all models; each step gathers its batches
        # and normalises them there.
        images = uint8_tensor(train_set.images).to(device)
        labels = torch.from_numpy(np.asarray(train_set.labels, dtype=np.float32)).to(device)
        eval_images = {k: uint8_tensor(s.images).to(device) for k, s in eval_sets.items()}
        loss_sum = torch.zeros(n_models, device=device)

    live = list(range(n_models))  # the config index of each row of the stepper
    ended: dict[int, tuple[nn.Module, dict[str, Any], int]] = {}  # model, optimizer state, step at its end
    stopped_early, diverged = [False] * n_models, [False] * n_models

    def state_of(k: int, model: nn.Module, optimizer_state: dict[str, Any], at: int) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "config": cfgs[k].to_dict(),
            "step": at,
            "model": {name: v.detach().cpu().clone() for name, v in model.state_dict().items()},
            "optimizer": optimizer_state,
            "history": list(histories[k]),
        }

    def snapshot(k: int) -> dict[str, Any]:
        if k in ended:
            return state_of(k, *ended[k])
        row = live.index(k)
        model = stepper.module(row)
        return state_of(k, model, _cpu_copy(stepper.optimizer(row).state_dict()), step)

    def end(rows: list[int]) -> None:
        """The models of these rows end now: their weights and optimizer state leave the stepper."""
        for row in rows:
            model = stepper.module(row)
            ended[live[row]] = (model, _cpu_copy(stepper.optimizer(row).state_dict()), step)

    def evaluation_point() -> list[ModelEval]:
        # the one read-back per evaluation point: every model's mean loss and logits
        train_loss = loss_sum.cpu().numpy()
        logits = {name: stepper.logits(eval_images[name], first.eval_batch_size) for name in eval_sets}
        evals = []
        for row, k in enumerate(live):
            # the float32 sum of the interval's batch losses, divided in double precision
            metrics = {"train": {"loss": float(train_loss[row]) / loss_steps}}
            model_logits = {name: logits[name][row] for name in eval_sets}
            for name, image_set in eval_sets.items():
                metrics[name] = score(image_set, model_logits[name])
            blown = not math.isfinite(metrics["train"]["loss"]) or not all(
                np.isfinite(v).all() for v in model_logits.values())
            record = EvalRecord(step / spe, step, metrics, time.perf_counter() - started, blown, model_logits)
            histories[k].append(record.to_dict())
            evals.append(ModelEval(k, record, lambda k=k: snapshot(k)))
        return evals

    started = time.perf_counter()
    loss_steps = 0
    desc = f"train {first.srm} lr={first.lr:g}" if n_models == 1 else f"train bundle of {n_models} {first.srm}"
    bar = tqdm(total=n_total, initial=step, unit="step", desc=desc, disable=not progress)
    epoch_index, order, offsets = -1, None, []
    while points and live:
        if step // spe != epoch_index:
            epoch_index = step // spe
            order, offsets = epoch_order([schedules[k] for k in live], epoch_index, device)
        s = step % spe
        batch = (images, labels, order[:, offsets[s] : offsets[s + 1]])
        if first.augment != "none":  # each row's batch augmented from (its seed, epoch, step) alone
            batch = augment_rows(*batch, [cfgs[k] for k in live], epoch_index, s)
        loss_sum += stepper.step(*batch)
        loss_steps += 1
        step += 1
        bar.update(1)
        if step != points[0]:
            continue
        points.pop(0)
        with host_sync_allowed(device):
            evals = evaluation_point()
            stop = set(on_eval(evals) or ()) if on_eval is not None else set()
            ending = []
            for row, e in enumerate(evals):
                if e.record.diverged:
                    diverged[e.index] = True
                    ending.append(row)
                elif e.index in stop and points:  # a stop at the last point is no early stop
                    stopped_early[e.index] = True
                    ending.append(row)
            end(ending)
            keep = [row for row in range(len(live)) if row not in ending]
            live = [live[row] for row in keep]
            if ending and live:
                stepper.keep(keep)
                index = torch.tensor(keep, device=device)
                loss_sum, order = loss_sum[index], order[index]
            loss_sum.zero_()
            loss_steps = 0
    bar.close()
    end(list(range(len(live))))
    results = []
    for k, cfg in enumerate(cfgs):
        model = ended[k][0]
        model.eval()
        results.append(TrainResult(cfg, model, histories[k], spe, stopped_early[k], diverged[k]))
    return results


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
    ignore = {"epochs", "eval_at", "eval_batch_size", "device", "deterministic", "cuda_graph"}
    ours = {k: v for k, v in cfg.to_dict().items() if k not in ignore}
    theirs = {k: v for k, v in saved.items() if k not in ignore}
    if ours != theirs:
        diff = {k: (theirs.get(k), v) for k, v in ours.items() if theirs.get(k) != v}
        raise ValueError(f"cannot resume: the saved state was trained with a different config {diff}")
