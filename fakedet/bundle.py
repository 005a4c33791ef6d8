"""Bundles: K models of one architecture stepped at once, the stacked stepper of `fakedet.train`'s one loop.

At batch 32 a training step of the study's CNN (61,241 parameters) on a GPU is bound by kernel launches and
Python, not by arithmetic. `fakedet.train.train_models` trains K configurations that share the architecture,
SRM placement, batch size, shuffle mode, length, evaluation points, device and algorithm choice
(`SHARED_FIELDS`), and differ in learning rate, momentum and seed; for K > 1 it steps them with
`StackedStepper`, which holds them as one stacked model:

- the K models' parameters are the rows of one (K, P) tensor; the forward pass is `torch.func.vmap` over
  `torch.func.functional_call` of the architecture's own module (convolutions run as grouped convolutions,
  linear layers as batched matrix products), so every registered architecture and SRM placement bundles
  without a second implementation; BatchNorm running statistics are stacked (K, C) buffers updated in place;
- each model draws its own batch from one uint8 copy of the training images on the device (row k of a
  (K, B) index per step, from each model's own `BatchSchedule`), normalised per batch;
- each model's loss is its own batch mean; the backward pass of their sum gives each model its own gradient;
- SGD with momentum (torch.optim.SGD's arithmetic: buf = momentum*buf + grad, p -= lr*buf) updates all rows
  in three tensor operations, with per-model lr and momentum columns.

The loop, its input checks, resume, evaluation records, snapshots and float32/determinism settings are
`fakedet.train`'s, the same for one model and for K; this module holds no loop. Results equal training each
model alone up to floating-point reassociation (a grouped convolution sums in another order than a single
one); tests/test_bundle.py bounds the difference. Nothing in a step waits for the device.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from fakedet.config import TrainConfig
from fakedet.models import SRM, CifarTutorialCNN
from fakedet.preprocess import preprocess

SHARED_FIELDS = ("arch", "srm", "attention", "augment", "augment_p", "augment_sigma", "augment_quality", "batch_size",
                 "shuffle", "epochs", "eval_at", "device", "deterministic", "cuda_graph", "train_on")
"""Config fields every model of a bundle must share: they fix the network's shape, the augmentation (one
batched blur and JPEG pass over every model's batch; each model's draws follow its own seed), the training
set, the steps and the evaluation points, the device, the process-wide GPU algorithm choice the loop runs
under and whether its one stepper replays a CUDA graph. lr, momentum and seed may differ; eval_batch_size (no effect on results) is the first config's."""


def bundle_key(cfg: TrainConfig) -> tuple:
    """The values of `SHARED_FIELDS`: configs with equal keys can train as one bundle."""
    return tuple(getattr(cfg, name) for name in SHARED_FIELDS)


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

    def losses(self, images_uint8: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Every model's batch-mean loss (K,) in train mode, BatchNorm statistics updated: vmapped."""
        x = preprocess(images_uint8[idx].flatten(0, 1)).unflatten(0, idx.shape)  # normalised per batch
        self.template.train()
        return torch.vmap(self._loss)(self.parameters(self.flat), self.buffers, x, labels[idx])

    def step(self, images_uint8: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """One SGD step of every model on its own batch: row k of `idx` (K, B) indexes model k's images in
        `images_uint8` (N×H×W×3, shared) and `labels` (N, float). Returns the batch losses (K,), on the device.
        Nothing here waits for the device."""
        losses = self.losses(images_uint8, labels, idx)
        # the models share no parameter: d(sum)/d(row k) is model k's own gradient
        losses.sum().backward()
        with torch.no_grad():
            # torch.optim.SGD (dampening 0, no nesterov, no weight decay): buf = momentum*buf + grad, the first
            # step's buf = grad (exactly what momentum*0 + grad gives), then p -= lr*buf
            self.momentum_buffer.mul_(self.momentum).add_(self.flat.grad)
            self.flat.sub_(self.lr * self.momentum_buffer)
        self.flat.grad = None
        return losses.detach()

    def forward_eval(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Logits (K, B) of every model in eval mode on one normalised batch x (B, 3, H, W): vmapped."""
        self.template.eval()
        return torch.vmap(self._logits, in_dims=(0, 0, None))(params, self.buffers, x)

    @torch.no_grad()
    def logits(self, images_uint8: torch.Tensor, batch_size: int) -> np.ndarray:
        """Logits (K, N) of every model in eval mode on the same uint8 images (N×H×W×3, on the device)."""
        params = self.parameters(self.flat.detach())
        out = [self.forward_eval(params, preprocess(images_uint8[i : i + batch_size]))
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


def wide_supported(model: nn.Module) -> bool:
    """Whether `WideModels` knows every layer of `model`: the tutorial CNN with SRM or nothing in its slots.
    Any other architecture or attention module bundles through vmap (`StackedModels`)."""
    return type(model) is CifarTutorialCNN and all(m is None or type(m) is SRM for m in (model.attend, model.attend2))


class WideModels(StackedModels):
    """K tutorial CNNs that see the same batch at every step (one seed: one batch order), as one wide network.

    The stack (parameters (K, P), momentum, per-model lr and momentum, the SGD update) is `StackedModels`';
    only the forward pass differs: conv1 is one convolution with 6K output channels on the shared batch,
    conv2 a convolution of K groups (group k: model k's 6 input and 16 output channels), SRM one module over
    the K models' channels (its channel-wise filter and BatchNorm are per channel already, so per model),
    and the linear layers batched matrix products over the K models (`torch.baddbmm`). Model k's channels
    are the k-th block everywhere, so the flattened 16×5×5 features of model k are the k-th 400 columns.
    Each model's loss is its own batch mean, as alone. No vmap, and the batch is gathered and normalised
    once, not K times: tests/test_bundle.py bounds the difference from training each model alone.
    """

    def _wide(self, params: dict[str, torch.Tensor], x: torch.Tensor, training: bool) -> torch.Tensor:
        k = len(self)

        def w(name: str) -> torch.Tensor:  # (K, out, ...) → (K*out, ...): model k's block of channels
            return params[name].flatten(0, 1)

        x = F.max_pool2d(F.relu(F.conv2d(x, w("conv1.weight"), w("conv1.bias"))), 2, 2)
        if "attend.cfc.weight" in params:
            x = self._srm(params, "attend", x, training)
        x = F.max_pool2d(F.relu(F.conv2d(x, w("conv2.weight"), w("conv2.bias"), groups=k)), 2, 2)
        if "attend2.cfc.weight" in params:
            x = self._srm(params, "attend2", x, training)
        x = x.reshape(x.shape[0], k, -1).transpose(0, 1)  # (K, B, 400)
        for name, last in (("fc1", False), ("fc2", False), ("fc3", True)):
            x = torch.baddbmm(params[f"{name}.bias"].unsqueeze(1), x, params[f"{name}.weight"].transpose(1, 2))
            x = x if last else F.relu(x)
        return x.squeeze(-1)  # (K, B)

    def _srm(self, params: dict[str, torch.Tensor], prefix: str, x: torch.Tensor, training: bool) -> torch.Tensor:
        """`fakedet.models.SRM` over the K models' channels at once (its gates, value for value)."""
        b, c = x.shape[:2]
        flat = x.reshape(b, c, -1)
        style = torch.stack((flat.mean(-1), flat.std(-1)), dim=-1)  # (b, c, 2); unbiased std, as SRM
        z = F.conv1d(style, params[f"{prefix}.cfc.weight"].flatten(0, 1), groups=c)
        bn = self.template.get_submodule(f"{prefix}.bn")
        if training:  # nn.BatchNorm's train-mode bookkeeping: the batch count, then the running averages
            self.buffers[f"{prefix}.bn.num_batches_tracked"].add_(1)
        # the stacked (K, C) buffers flattened are views: batch_norm updates them in place
        z = F.batch_norm(z, self.buffers[f"{prefix}.bn.running_mean"].view(-1), self.buffers[f"{prefix}.bn.running_var"].view(-1),
                         params[f"{prefix}.bn.weight"].flatten(0, 1), params[f"{prefix}.bn.bias"].flatten(0, 1),
                         training, bn.momentum, bn.eps)
        return x * torch.sigmoid(z).reshape(b, c, 1, 1)

    def losses(self, images_uint8: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        rows = idx[0]  # every row is the same batch (one seed); gathered and normalised once
        logits = self._wide(self.parameters(self.flat), preprocess(images_uint8[rows]), training=True)
        y = labels[rows].expand_as(logits)
        return F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(1)

    def forward_eval(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return self._wide(params, x, training=False)



class StackedStepper:
    """The stepper of `fakedet.train.train_models` for K > 1: one vmapped SGD step for all models.

    Takes each model's module and `torch.optim.SGD` as the loop built them (initialised, resumed): their
    weights and momentum buffers go into a `StackedModels`; the modules and optimizers are kept to hand
    each row's state back in their shapes (`module`, `optimizer`), so snapshots are `train`'s format.
    Rows are the loop's live models, in order; `keep` drops the others.
    """

    kind: type[StackedModels] = StackedModels

    def __init__(self, models: Sequence[nn.Module], optimizers: Sequence[torch.optim.SGD]) -> None:
        self.models, self.optimizers = list(models), list(optimizers)
        groups = [o.param_groups[0] for o in self.optimizers]
        buffers = []
        for model, optimizer in zip(self.models, self.optimizers):
            # .get: indexing torch.optim.SGD's state (a defaultdict) would add empty entries to its state dict
            saved = [optimizer.state.get(p, {}).get("momentum_buffer") for p in model.parameters()]
            if all(b is not None for b in saved):  # a resumed state with momentum on
                buffers.append(torch.cat([b.reshape(-1) for b in saved]))
            else:  # a fresh start (torch.optim.SGD's first step sets buf = grad: momentum*0 + grad here)
                buffers.append(torch.zeros_like(flatten_parameters(model)))
        self.stack = self.kind(self.models, buffers, [g["lr"] for g in groups], [g["momentum"] for g in groups])

    def __len__(self) -> int:
        return len(self.stack)

    def step(self, images_uint8: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return self.stack.step(images_uint8, labels, idx)

    def logits(self, images_uint8: torch.Tensor, batch_size: int) -> np.ndarray:
        return self.stack.logits(images_uint8, batch_size)

    def module(self, row: int) -> nn.Module:
        """Row `row`'s weights and BatchNorm statistics, loaded into its own module."""
        self.models[row].load_state_dict(self.stack.state_dict(row))
        return self.models[row]

    def optimizer(self, row: int) -> torch.optim.SGD:
        """Row `row`'s momentum as the state of its own `torch.optim.SGD` (over `module(row)`'s parameters)."""
        optimizer = self.optimizers[row]
        if optimizer.param_groups[0]["momentum"] != 0:  # torch.optim.SGD keeps a buffer only when momentum is on
            for p, b in zip(self.models[row].parameters(), self.stack.momentum_rows(row)):
                optimizer.state[p]["momentum_buffer"] = b.clone()
        return optimizer

    def keep(self, rows: Sequence[int]) -> None:
        self.stack.keep(rows)
        self.models = [self.models[r] for r in rows]
        self.optimizers = [self.optimizers[r] for r in rows]


class WideStepper(StackedStepper):
    """`StackedStepper` with the wide forward pass (`WideModels`): for K models that share their seed (so
    their initialisation and every batch; they differ in lr and momentum) of an architecture `wide_supported`
    knows."""

    kind = WideModels


def bundle_stepper(cfgs: Sequence[TrainConfig], models: Sequence[nn.Module], optimizers: Sequence[torch.optim.SGD],
                   wide: bool = True) -> StackedStepper:
    """The stepper `fakedet.train.train_models` uses for K > 1 models: `WideStepper` where every model shares
    one seed (one batch order) and `wide_supported` knows the architecture, else `StackedStepper` (vmap).
    `wide=False` always takes vmap."""
    if wide and len({c.seed for c in cfgs}) == 1 and wide_supported(models[0]):
        return WideStepper(models, optimizers)
    return StackedStepper(models, optimizers)
