"""`GraphStepper` (`TrainConfig.cuda_graph`) on the CPU: the fallback, and its buffer handling.

A CUDA graph replays recorded kernels on the buffers it was captured on, so what can go wrong without a
GPU is the plumbing: a batch not copied into the captured index, images that are not the captured ones, a
capture that outlives a change of shapes. `ReplayInPython` captures the step as a closure over the same
buffers and replays it by calling it, so every mistake of that kind changes the training here too, and
the loop's results must equal eager training bit for bit. tests/test_gpu.py runs the real capture.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fakedet.train as train_module
from fakedet.config import TrainConfig
from fakedet.train import GraphStepper, ModuleStepper, build_initial, sgd_for, stepper_for, train, train_models

CPU = torch.device("cpu")


class PythonStepGraph:
    def __init__(self, step) -> None:
        self.step, self.output = step, torch.zeros(())  # a capture runs nothing
        self.replays = 0

    def replay(self) -> None:
        self.output = self.step()
        self.replays += 1

    def release(self) -> None:
        self.step = None


class ReplayInPython:
    def __init__(self) -> None:
        self.graphs: list[PythonStepGraph] = []
        self.warm_steps = 0

    def warm(self, step):
        self.warm_steps += 1
        return step()

    def capture(self, step):
        self.graphs.append(PythonStepGraph(step))
        return self.graphs[-1]


@pytest.fixture
def replayed(monkeypatch):
    """Every stepper the loop builds wrapped in a `GraphStepper` replaying in Python; the wrappers, in order."""
    made: list[GraphStepper] = []

    def wrapped(cfgs, models, optimizers, device):
        inner = stepper_for(cfgs, models, optimizers, device)  # on the CPU: the eager stepper
        made.append(GraphStepper(inner, device, copy_inputs=cfgs[0].augment != "none", backend=ReplayInPython()))
        return made[-1]

    monkeypatch.setattr(train_module, "stepper_for", wrapped)
    return made


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"epochs": 2, "batch_size": 16, "lr": 1e-2, "eval_at": (0.5, 1), "device": "cpu", **kw})


def curves(history):
    return [{k: v for k, v in h.items() if k != "elapsed_s"} for h in history]


def test_cuda_graph_has_no_effect_on_the_cpu(toy):
    train_set, eval_sets = toy(128, 0), {"t": toy(40, 1, "t")}
    config = cfg(srm="pool1", cuda_graph=True)
    model = build_initial(config, CPU)
    assert isinstance(stepper_for([config], [model], [sgd_for(model, config)], CPU), ModuleStepper)
    assert curves(train(config, train_set, eval_sets).history) == curves(train(cfg(srm="pool1"), train_set, eval_sets).history)


def test_a_graph_stepper_needs_a_cuda_device_and_a_warm_up():
    model = build_initial(cfg(), CPU)
    inner = ModuleStepper(model, sgd_for(model, cfg()), CPU)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        GraphStepper(inner, CPU)
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        GraphStepper(inner, CPU, warmup=0, backend=ReplayInPython())


@pytest.mark.parametrize("srm, shuffle", [("none", "reference"), ("both", "full")])
def test_one_model_replayed_trains_as_eagerly(toy, replayed, srm, shuffle):
    # 120 images in batches of 16: `full` shuffling ends each epoch with a batch of 8, which the capture
    # (of 16) cannot take: that step runs eagerly
    train_set, eval_sets = toy(120, 0), {"t": toy(40, 1, "t")}
    config = cfg(srm=srm, shuffle=shuffle)
    graphed = train(config, train_set, eval_sets)
    (stepper,) = replayed
    with pytest.MonkeyPatch.context() as m:
        m.setattr(train_module, "stepper_for", stepper_for)
        eager = train(config, train_set, eval_sets)
    assert curves(graphed.history) == curves(eager.history)
    for a, b in zip(graphed.model.state_dict().values(), eager.model.state_dict().values()):
        assert torch.equal(a, b)
    steps = graphed.history[-1]["step"]
    short = 2 if shuffle == "full" else 0  # one shorter last batch per epoch
    assert stepper.captures == 1
    assert stepper.eager == train_module.GRAPH_WARMUP + short
    assert stepper.replayed == steps - stepper.eager


@pytest.mark.parametrize("seeds", [[5, 5, 5], [5, 6, 7]], ids=["wide", "vmap"])
def test_a_bundle_replayed_trains_as_eagerly_and_captures_again_when_a_model_leaves(toy, replayed, seeds):
    train_set, eval_sets = toy(128, 0), {"t": toy(40, 1, "t")}
    cfgs = [cfg(srm="pool1", seed=s, lr=lr, epochs=3, eval_at=(1, 2)) for s, lr in zip(seeds, (1e-2, 2e-2, 5e-3))]

    def stop_model_1_at_epoch_1(evals):
        return {1} if evals[0].record.epoch == 1 else None

    graphed = train_models(cfgs, train_set, eval_sets, on_eval=stop_model_1_at_epoch_1)
    (stepper,) = replayed
    with pytest.MonkeyPatch.context() as m:
        m.setattr(train_module, "stepper_for", stepper_for)
        eager = train_models(cfgs, train_set, eval_sets, on_eval=stop_model_1_at_epoch_1)
    for g, e in zip(graphed, eager):
        assert curves(g.history) == curves(e.history)
    assert graphed[1].stopped_early and len(graphed[1].history) == 1
    # the capture of three models is dropped when model 1 leaves; two models warm up and are captured anew
    assert stepper.captures == 2 and stepper.eager == 2 * train_module.GRAPH_WARMUP
    assert stepper.replayed == 3 * 8 - stepper.eager


def test_augmented_batches_are_copied_into_the_captured_buffers(toy, replayed):
    train_set, eval_sets = toy(128, 0), {"t": toy(40, 1, "t")}
    config = cfg(augment="blur_jpeg", augment_p=0.5)
    graphed = train(config, train_set, eval_sets)
    (stepper,) = replayed
    assert stepper.copy_inputs and stepper.replayed == 16 - train_module.GRAPH_WARMUP
    with pytest.MonkeyPatch.context() as m:
        m.setattr(train_module, "stepper_for", stepper_for)
        eager = train(config, train_set, eval_sets)
    assert curves(graphed.history) == curves(eager.history)


def test_a_batch_the_capture_did_not_see_is_refused_by_the_replay_and_stepped_eagerly(toy):
    # other images than the captured ones (without copy_inputs) must not be read from the captured tensor
    model = build_initial(cfg(), CPU)
    stepper = GraphStepper(ModuleStepper(model, sgd_for(model, cfg()), CPU), CPU, warmup=1, backend=ReplayInPython())
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8))
    y = (torch.arange(64) % 2).float()
    idx = torch.arange(16).reshape(1, 16)
    stepper.step(x, y, idx)  # warm-up
    stepper.step(x, y, idx)  # capture and first replay
    stepper.step(x.clone(), y, idx)
    stepper.step(x, y, idx + 16)
    assert (stepper.eager, stepper.captures, stepper.replayed) == (2, 1, 2)
