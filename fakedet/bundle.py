"""Training a bundle of models at once: K configurations of one architecture, one fused step for all.

At batch 32 a training step of the study's CNN (61,241 parameters) on a GPU is bound by kernel launches and
Python, not by arithmetic. `train_bundle` trains K configurations that share the architecture, SRM
placement, batch size, shuffle mode, length, evaluation points and device, and differ in learning rate,
momentum and seed, as one stacked model:

- the K models' parameters are the rows of one (K, P) tensor; the forward pass is `torch.func.vmap` over
  `torch.func.functional_call` of the architecture's own module (convolutions run as grouped convolutions,
  linear layers as batched matrix products), so every registered architecture and SRM placement bundles
  without a second implementation; BatchNorm running statistics are stacked (K, C) buffers updated in place;
- each model draws its own batch from one uint8 copy of the training images on the device (a (K, B) index
  per step, from each model's own `BatchSchedule`), normalised per batch;
- each model's loss is its own batch mean; the backward pass of their sum gives each model its own gradient;
- SGD with momentum (torch.optim.SGD's arithmetic: buf = momentum*buf + grad, p -= lr*buf) updates all rows
  in three tensor operations, with per-model lr and momentum columns.

Each model keeps its initialisation (built as `train` builds it), its batch order, its hyperparameters,
its history, its callbacks and its resumable state in `train`'s format: a bundled model resumes alone with
`train(resume=...)` and a solo run's state resumes inside a bundle. Results equal training each model alone
up to floating-point reassociation (a grouped convolution sums in another order than a single one);
tests/test_bundle.py bounds the difference.

The step loop never waits for the device: losses accumulate on the device, batch indices for a whole epoch
go up in one copy, and only evaluation points read values back. A model whose training loss or logits are
not finite at an evaluation point is ended as diverged; a model whose callback returns True is stopped;
either way its rows leave the stacked tensors, and the others continue unchanged.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call
from tqdm.auto import tqdm

from fakedet.arrays import ImageSet
from fakedet.config import TrainConfig
from fakedet.metrics import score_logits
from fakedet.models import build_model
from fakedet.preprocess import preprocess, resolve_device, uint8_tensor
from fakedet.train import (
    STATE_FORMAT,
    BatchSchedule,
    EvalRecord,
    TrainResult,
    _check_resumable,
    _cpu_copy,
    eval_steps,
    total_steps,
)

SHARED_FIELDS = ("arch", "srm", "batch_size", "shuffle", "epochs", "eval_at", "device")


def bundle_key(cfg: TrainConfig) -> tuple:
    """What configs trained in one bundle must share: their values of `SHARED_FIELDS`."""
    return tuple(getattr(cfg, name) for name in SHARED_FIELDS)
"""Config fields every model of a bundle must share: they fix the network's shape, the steps and the
evaluation points, and the device. lr, momentum and seed may differ; eval_batch_size (no effect on
results) is the first config's."""

# A bundle callback gets the model's index in the bundle, its record and a function returning its
# resumable state (the format of `train`'s snapshots); returning True stops that model only.
BundleCallback = Callable[[int, EvalRecord, Callable[[], dict[str, Any]]], "bool | None"]


def check_bundle(cfgs: Sequence[TrainConfig]) -> None:
    """Refuse configs that cannot train as one bundle, naming the first field that differs."""
    if not cfgs:
        raise ValueError("a bundle needs at least one training config")
    first = cfgs[0]
    for name in SHARED_FIELDS:
        for i, cfg in enumerate(cfgs[1:], start=1):
            if getattr(cfg, name) != getattr(first, name):
                raise ValueError(
                    f"cannot bundle: configs differ in {name!r} (model 0: {getattr(first, name)!r}, "
                    f"model {i}: {getattr(cfg, name)!r}); a bundle shares {', '.join(SHARED_FIELDS)}"
                )


def build_initial(cfg: TrainConfig, device: torch.device) -> nn.Module:
    """The model `train` starts from: built under the config's seed without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return build_model(cfg.arch, cfg.srm).to(device)


def sgd_for(model: nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    """The optimizer `train` uses, so that states load and save in its format."""
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, foreach=True)


class StackedModels:
    """K models of one architecture as stacked tensors: parameters (K, P), momentum (K, P), buffers (K, ...).

    `template` is a module of the architecture whose own tensors are never used: `functional_call` runs its
    forward on one row of the stack, and `vmap` runs it on all rows at once.
    """

    def __init__(self, models: Sequence[nn.Module], momentum_buffers: Sequence[torch.Tensor], lrs: Sequence[float],
                 momenta: Sequence[float]) -> None:
        self.template = copy.deepcopy(models[0])
        self.names = [n for n, _ in self.template.named_parameters()]
        self.shapes = [p.shape for p in self.template.parameters()]
        self.sizes = [p.numel() for p in self.template.parameters()]
        self.keys = list(self.template.state_dict().keys())
        device = next(self.template.parameters()).device
        with torch.no_grad():
            self.flat = torch.stack([flatten_parameters(m) for m in models]).requires_grad_()
            self.momentum_buffer = torch.stack(list(momentum_buffers)).to(device)
            self.buffers = {n: torch.stack([dict(m.named_buffers())[n] for m in models])
                            for n, _ in self.template.named_buffers()}
        # float32 columns: torch.optim.SGD, too, applies lr and momentum in the parameters' precision
        self.lr = torch.tensor(list(lrs), dtype=torch.float32, device=device).unsqueeze(1)
        self.momentum = torch.tensor(list(momenta), dtype=torch.float32, device=device).unsqueeze(1)

    def __len__(self) -> int:
        return self.flat.shape[0]

    def parameters(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-parameter (K, *shape) views of the rows of `flat`."""
        return {n: t.unflatten(1, s) for n, t, s in zip(self.names, flat.split(self.sizes, dim=1), self.shapes)}

    def _loss(self, params: dict, buffers: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(functional_call(self.template, (params, buffers), (x,)), y)

    def _logits(self, params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.template, (params, buffers), (x,)).reshape(-1)

    def step(self, images_uint8: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """One SGD step of every model on its own batch: row k of `idx` (K, B) indexes model k's images in
        `images_uint8` (N×H×W×3, shared) and `labels` (N, float). Returns the batch losses (K,), on the device.
        Nothing here waits for the device."""
        x = preprocess(images_uint8[idx].flatten(0, 1)).unflatten(0, idx.shape)  # normalised per batch
        self.template.train()
        losses = torch.vmap(self._loss)(self.parameters(self.flat), self.buffers, x, labels[idx])
        # the models share no parameter: d(sum)/d(row k) is model k's own gradient
        losses.sum().backward()
        with torch.no_grad():
            # torch.optim.SGD (dampening 0, no nesterov, no weight decay): buf = momentum*buf + grad, the first
            # step's buf = grad (exactly what momentum*0 + grad gives), then p -= lr*buf
            self.momentum_buffer.mul_(self.momentum).add_(self.flat.grad)
            self.flat.sub_(self.lr * self.momentum_buffer)
        self.flat.grad = None
        return losses.detach()

    @torch.no_grad()
    def logits(self, images_uint8: torch.Tensor, batch_size: int) -> np.ndarray:
        """Logits (K, N) of every model in eval mode on the same uint8 images (N×H×W×3, on the device)."""
        self.template.eval()
        params = self.parameters(self.flat.detach())
        forward = torch.vmap(self._logits, in_dims=(0, 0, None))
        out = [forward(params, self.buffers, preprocess(images_uint8[i : i + batch_size]))
               for i in range(0, len(images_uint8), batch_size)]
        if not out:
            return np.zeros((len(self), 0), dtype=np.float32)
        return torch.cat(out, dim=1).float().cpu().numpy()

    def state_dict(self, row: int) -> dict[str, torch.Tensor]:
        """Row `row` as the state dict of one model (keys in the module's order), views into the stack."""
        params = {n: t[row] for n, t in self.parameters(self.flat.detach()).items()}
        return {k: params[k] if k in params else self.buffers[k][row] for k in self.keys}

    def momentum_rows(self, row: int) -> list[torch.Tensor]:
        """Row `row`'s momentum buffer, one tensor per parameter."""
        return [t.reshape(s) for t, s in zip(self.momentum_buffer[row].split(self.sizes), self.shapes)]

    def keep(self, rows: Sequence[int]) -> None:
        """Drop every row not in `rows` (in that order)."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.flat.device)
        with torch.no_grad():
            self.flat = self.flat[index].detach().requires_grad_()
            self.momentum_buffer = self.momentum_buffer[index]
            self.buffers = {n: b[index] for n, b in self.buffers.items()}
            self.lr, self.momentum = self.lr[index], self.momentum[index]


def flatten_parameters(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def epoch_order(schedules: Sequence[BatchSchedule], epoch: int, device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """Every model's batches of `epoch` as one (K, items) index tensor on the device, and the step offsets.

    All models share the number of items and the batch size, so step s is columns offsets[s]:offsets[s+1]
    for every model (`full` mode's last, shorter batch included). One copy per epoch; pinned and
    asynchronous on CUDA, so the host does not wait for the device's queue.
    """
    batches = [s.epoch(epoch) for s in schedules]
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in batches[0]])]).tolist()
    order = torch.from_numpy(np.stack([np.concatenate(b) for b in batches]).astype(np.int64))
    if device.type == "cuda":
        return order.pin_memory().to(device, non_blocking=True), offsets
    return order.to(device), offsets


def train_bundle(
    cfgs: Sequence[TrainConfig],
    train_set: ImageSet,
    eval_sets: Mapping[str, ImageSet] | None = None,
    *,
    on_eval: BundleCallback | None = None,
    resume: Sequence[dict[str, Any] | None] | None = None,
    progress: bool = False,
) -> list[TrainResult]:
    """Train one model per config on `train_set` in one fused step; one `TrainResult` per config, in order.

    Each result is what `train(cfgs[k], train_set, eval_sets)` returns, up to floating-point reassociation:
    the same evaluation points, metrics, history and final weights. `on_eval(k, record, snapshot)` is
    called for every model at every evaluation point; `snapshot()` returns model k's state in `train`'s
    format, and returning True stops model k alone. `resume` holds one state (or None: from scratch) per
    config; all must stand at the same step. A model whose training loss or logits are not finite at an
    evaluation point ends there with `diverged` set on its record and result (its record then holds the
    training loss and the sets whose logits are finite); the others go on.
    """
    cfgs = list(cfgs)
    check_bundle(cfgs)
    for cfg in cfgs:
        cfg.validate()
    first = cfgs[0]
    n_models = len(cfgs)
    eval_sets = dict(eval_sets or {})
    if "train" in eval_sets:
        raise ValueError("'train' is reserved for the training loss; name the evaluation set otherwise")
    if len(train_set) == 0 or len(np.unique(train_set.labels)) < 2:
        raise ValueError(f"training set {train_set.name!r} must hold both REAL and FAKE images")
    resume = [None] * n_models if resume is None else list(resume)
    if len(resume) != n_models:
        raise ValueError(f"resume holds {len(resume)} states for {n_models} configs; give one (or None) per config")
    device = resolve_device(first.device)

    schedules = [BatchSchedule(len(train_set), c.batch_size, c.shuffle, c.seed) for c in cfgs]
    spe = schedules[0].steps_per_epoch
    n_total = total_steps(first, spe)
    points = eval_steps(first, spe)

    models = [build_initial(cfg, device) for cfg in cfgs]
    momentum_buffers, histories, starts = [], [], []
    for cfg, model, state in zip(cfgs, models, resume):
        buffer = torch.zeros_like(flatten_parameters(model))
        if state is not None:
            _check_resumable(state, cfg)
            optimizer = sgd_for(model, cfg)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            saved = [optimizer.state[p].get("momentum_buffer") for p in model.parameters()]
            if all(b is not None for b in saved):
                buffer = torch.cat([b.reshape(-1) for b in saved])
        momentum_buffers.append(buffer)
        histories.append([] if state is None else list(state["history"]))
        starts.append(0 if state is None else int(state["step"]))
    if len(set(starts)) > 1:
        raise ValueError(f"cannot bundle resumed models at different steps {starts}; resume them at one step")
    step = starts[0]
    points = [p for p in points if p > step]

    stack = StackedModels(models, momentum_buffers, [c.lr for c in cfgs], [c.momentum for c in cfgs])
    members = list(range(n_models))  # the config index of each row of the stack
    ended_at = [step] * n_models
    ended_momentum: dict[int, list[torch.Tensor]] = {}
    stopped_early = [False] * n_models
    diverged = [False] * n_models

    images = uint8_tensor(train_set.images).to(device)  # uint8 once, shared by all models
    labels = torch.from_numpy(np.asarray(train_set.labels, dtype=np.float32)).to(device)
    eval_images = {k: uint8_tensor(s.images).to(device) for k, s in eval_sets.items()}

    def finish(k: int, row: int) -> None:
        """Model k ends now: its weights go into its own module, its momentum is kept for snapshots."""
        models[k].load_state_dict(stack.state_dict(row))
        ended_momentum[k] = [t.clone() for t in stack.momentum_rows(row)]
        ended_at[k] = step

    def snapshot(k: int) -> dict[str, Any]:
        live = k in members
        if live:
            models[k].load_state_dict(stack.state_dict(members.index(k)))
        cfg, model = cfgs[k], models[k]
        optimizer = sgd_for(model, cfg)
        if cfg.momentum != 0:  # torch.optim.SGD keeps a buffer only when momentum is on
            rows = stack.momentum_rows(members.index(k)) if live else ended_momentum[k]
            for p, b in zip(model.parameters(), rows):
                optimizer.state[p]["momentum_buffer"] = b.clone()
        return {
            "format": STATE_FORMAT,
            "config": cfg.to_dict(),
            "step": step if live else ended_at[k],
            "model": {name: v.detach().cpu().clone() for name, v in model.state_dict().items()},
            "optimizer": _cpu_copy(optimizer.state_dict()),
            "history": list(histories[k]),
        }

    started = time.perf_counter()
    loss_sum = torch.zeros(n_models, device=device)
    loss_steps = 0
    desc = f"train bundle of {n_models} {first.srm}"
    bar = tqdm(total=n_total, initial=step, unit="step", desc=desc, disable=not progress)
    epoch_index, order, offsets = -1, None, []
    while points and members:
        if step // spe != epoch_index:
            epoch_index = step // spe
            order, offsets = epoch_order([schedules[k] for k in members], epoch_index, device)
        s = step % spe
        loss_sum += stack.step(images, labels, order[:, offsets[s] : offsets[s + 1]])
        loss_steps += 1
        step += 1
        bar.update(1)
        if step != points[0]:
            continue
        points.pop(0)
        # the one read-back per evaluation point: losses and every set's logits for all models
        train_loss = loss_sum.cpu().numpy()
        logits = {name: stack.logits(eval_images[name], first.eval_batch_size) for name in eval_sets}
        ending = []
        for row, k in enumerate(members):
            model_logits = {name: logits[name][row] for name in eval_sets}
            finite = {name: bool(np.isfinite(v).all()) for name, v in model_logits.items()}
            # as `train`: the float32 sum of the interval's batch losses, divided in double precision
            metrics = {"train": {"loss": float(train_loss[row]) / loss_steps}}
            for name, image_set in eval_sets.items():
                if finite[name]:
                    metrics[name] = score_logits(image_set, model_logits[name])
            record = EvalRecord(epoch=step / spe, step=step, metrics=metrics, elapsed_s=time.perf_counter() - started,
                                logits=model_logits)
            # `diverged` is set as an attribute so that this holds whether or not EvalRecord declares the field
            record.diverged = not (math.isfinite(metrics["train"]["loss"]) and all(finite.values()))
            histories[k].append(record.to_dict())
            stop = on_eval is not None and on_eval(k, record, lambda k=k: snapshot(k))
            if record.diverged:
                diverged[k] = True
                ending.append(row)
            elif stop:
                stopped_early[k] = bool(points)
                ending.append(row)
        for row in ending:
            finish(members[row], row)
        if ending:
            keep = [row for row in range(len(members)) if row not in ending]
            members = [members[row] for row in keep]
            if members:
                stack.keep(keep)
                loss_sum = loss_sum[torch.tensor(keep, device=device)]
                order = order[torch.tensor(keep, device=device)]
        loss_sum.zero_()
        loss_steps = 0
    bar.close()
    for row, k in enumerate(members):
        finish(k, row)
    results = []
    for k, cfg in enumerate(cfgs):
        models[k].eval()
        result = TrainResult(cfg, models[k], histories[k], spe, stopped_early[k])
        result.diverged = diverged[k]  # as on the record: works whether or not TrainResult declares the field
        results.append(result)
    return results
