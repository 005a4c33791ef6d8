import copy

import numpy as np
import pytest
import torch

import torch.nn as nn

import fakedet.train
from fakedet.bundle import SHARED_FIELDS, StackedModels, StackedStepper, WideStepper, bundle_key, bundle_stepper
from fakedet.config import TrainConfig
from fakedet.train import BatchSchedule, ModuleStepper, build_initial, epoch_order, train, train_bundle, train_models

# Bundled and solo runs differ by float32 reassociation only (a grouped convolution and batched matrix
# products sum in another order than the solo kernels). Over these runs (20-30 steps) the largest
# difference measured was 5e-8 in any metric and 3e-8 in any weight, about one float32 ulp at the loss's
# scale (0.69: ulp 6e-8). Differences grow with steps: over 160 steps (toy data, SRM at pool1, lr up to
# 3e-2) they reached 4e-5, as large as `train` itself differs between one and two CPU threads (1e-5).
# 1e-5 leaves room for other CPUs' kernels over these short runs.
ATOL = 1e-5


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a busy shared machine two spinning OpenMP threads made these runs 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_cfg(**kw):
    return TrainConfig(**{"epochs": 2, "batch_size": 16, "device": "cpu", "eval_at": (0.5, 1), **kw})


# different seeds (initialisation and batch order), learning rates and momenta, momentum 0 included
VARIED = [
    {"seed": 1, "lr": 1e-2, "momentum": 0.9},
    {"seed": 2, "lr": 3e-2, "momentum": 0.5},
    {"seed": 3, "lr": 5e-3, "momentum": 0.0},
]


def data(toy):
    return toy(160, 0), {"cifake_test": toy(64, 1, "cifake_test"), "cifar100_test": toy(24, 2, real_only=True)}


def assert_same_history(solo, bundled, atol=ATOL):
    assert [(h["epoch"], h["step"]) for h in solo] == [(h["epoch"], h["step"]) for h in bundled]
    for a, b in zip(solo, bundled):
        assert a["metrics"].keys() == b["metrics"].keys()
        for name, metrics in a["metrics"].items():
            assert metrics.keys() == b["metrics"][name].keys()
            for key, value in metrics.items():
                assert b["metrics"][name][key] == pytest.approx(value, abs=atol, rel=0), (a["step"], name, key)


def assert_same_state(a: dict, b: dict, atol=ATOL):
    assert list(a) == list(b)
    for key in a:
        if a[key].dtype.is_floating_point:
            torch.testing.assert_close(b[key], a[key], atol=atol, rtol=0, msg=key)
        else:
            assert torch.equal(a[key], b[key]), key  # num_batches_tracked


def solo_snapshots(store):
    """A `train` callback keeping the state at every evaluation point: store[step]."""
    return lambda record, snapshot: store.__setitem__(record.step, snapshot())


def bundle_snapshots(store):
    """A `train_bundle` callback keeping the state at every evaluation point: store[k][step]."""
    return lambda k, record, snapshot: store.setdefault(k, {}).__setitem__(record.step, snapshot())


@pytest.mark.parametrize("srm", ["none", "pool1"])
def test_bundle_equals_each_model_trained_alone(toy, srm):
    train_set, eval_sets = data(toy)
    cfgs = [small_cfg(srm=srm, **v) for v in VARIED]
    solo_states, bundle_states = {}, {}
    solo = [train(cfg, train_set, eval_sets, on_eval=solo_snapshots(solo_states.setdefault(k, {})))
            for k, cfg in enumerate(cfgs)]
    bundled = train_bundle(cfgs, train_set, eval_sets, on_eval=bundle_snapshots(bundle_states))
    assert len(bundled) == 3
    for k, (a, b) in enumerate(zip(solo, bundled)):
        assert b.config == cfgs[k] and b.steps_per_epoch == a.steps_per_epoch and not b.stopped_early
        assert not b.diverged
        assert_same_history(a.history, b.history)
        # final weights, and BatchNorm running statistics and batch counts where SRM has them
        assert_same_state(a.model.state_dict(), b.model.state_dict())
        assert not b.model.training
        # the snapshot at every evaluation point: the same format, torch.optim.SGD's momentum buffers
        assert solo_states[k].keys() == bundle_states[k].keys() == {5, 10, 20}
        for step, state in solo_states[k].items():
            ours = bundle_states[k][step]
            assert ours.keys() == state.keys() and ours["format"] == state["format"]
            assert ours["config"] == state["config"] and ours["step"] == state["step"] == step
            assert_same_state(state["model"], ours["model"])
            assert ours["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
            assert ours["optimizer"]["state"].keys() == state["optimizer"]["state"].keys()
            for i, s in state["optimizer"]["state"].items():
                torch.testing.assert_close(ours["optimizer"]["state"][i]["momentum_buffer"], s["momentum_buffer"],
                                           atol=ATOL, rtol=0)
    if srm == "pool1":
        # the running statistics moved, and differently per model
        means = [b.model.state_dict()["attend.bn.running_mean"] for b in bundled]
        assert not torch.equal(means[0], torch.zeros_like(means[0])) and not torch.equal(means[0], means[1])


# one seed (one initialisation, one batch order), different learning rates and momenta, momentum 0 included:
# a wide bundle
ONE_SEED = [{"seed": 4, "lr": 1e-2, "momentum": 0.9}, {"seed": 4, "lr": 3e-2, "momentum": 0.5},
            {"seed": 4, "lr": 5e-3, "momentum": 0.0}]


def steppers_used(monkeypatch) -> list:
    """The bundle steppers `train_models` builds from here on, in order."""
    made, original = [], bundle_stepper

    def recording(*args, **kwargs):
        made.append(original(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(fakedet.train, "bundle_stepper", recording)
    return made


@pytest.mark.parametrize("srm", ["none", "pool1", "pool2"])
def test_wide_bundle_equals_each_model_trained_alone(toy, srm, monkeypatch):
    """Models of one seed train as one wide network (conv1 with 6K outputs, conv2 grouped, batched linear
    layers, SRM over every model's channels) and each ends where it ends alone: metrics at every point,
    weights, SRM's BatchNorm statistics and batch counts, and the momentum buffers of its snapshots."""
    train_set, eval_sets = data(toy)
    cfgs = [small_cfg(srm=srm, **v) for v in ONE_SEED]
    made = steppers_used(monkeypatch)
    solo_states, bundle_states = {}, {}
    solo = [train(cfg, train_set, eval_sets, on_eval=solo_snapshots(solo_states.setdefault(k, {})))
            for k, cfg in enumerate(cfgs)]
    bundled = train_bundle(cfgs, train_set, eval_sets, on_eval=bundle_snapshots(bundle_states))
    assert [type(s) for s in made] == [WideStepper]
    for k, (a, b) in enumerate(zip(solo, bundled)):
        assert_same_history(a.history, b.history)
        assert_same_state(a.model.state_dict(), b.model.state_dict())
        for step, state in solo_states[k].items():
            assert_same_state(state["model"], bundle_states[k][step]["model"])
            for i, m in state["optimizer"]["state"].items():
                torch.testing.assert_close(bundle_states[k][step]["optimizer"]["state"][i]["momentum_buffer"],
                                           m["momentum_buffer"], atol=ATOL, rtol=0)
    if srm != "none":  # the running statistics moved, and differently per model
        key = "attend.bn.running_mean" if srm == "pool1" else "attend2.bn.running_mean"
        means = [b.model.state_dict()[key] for b in bundled]
        assert not torch.equal(means[0], torch.zeros_like(means[0])) and not torch.equal(means[0], means[1])


def test_a_wide_bundle_drops_a_diverged_model_and_the_others_go_on(toy, monkeypatch):
    train_set, eval_sets = data(toy)
    cfgs = [small_cfg(srm="pool1", **ONE_SEED[0]), small_cfg(srm="pool1", seed=4, lr=1e30),
            small_cfg(srm="pool1", **ONE_SEED[1])]
    made = steppers_used(monkeypatch)
    bundled = train_bundle(cfgs, train_set, eval_sets)
    assert [type(s) for s in made] == [WideStepper]
    assert bundled[1].diverged and [h["step"] for h in bundled[1].history] == [5]
    for k in (0, 2):
        assert not bundled[k].diverged
        assert_same_history(train(cfgs[k], train_set, eval_sets).history, bundled[k].history)


class OtherGate(nn.Module):
    """An attention module the wide forward pass does not know."""

    def forward(self, x):
        return x


def test_the_wide_stepper_takes_one_seed_and_modules_it_knows_and_vmap_the_rest():
    def stepper(cfgs, edit=lambda m: m, **kw):
        models = [edit(build_initial(c, torch.device("cpu"))) for c in cfgs]
        return type(bundle_stepper(cfgs, models, [torch.optim.SGD(m.parameters(), lr=c.lr) for m, c in zip(models, cfgs)], **kw))

    one_seed = [small_cfg(srm="pool1", **v) for v in ONE_SEED]
    assert stepper(one_seed) is WideStepper
    assert stepper([small_cfg(srm="both", **v) for v in ONE_SEED]) is WideStepper
    assert stepper(one_seed, wide=False) is StackedStepper
    assert stepper([small_cfg(**v) for v in VARIED]) is StackedStepper  # seeds differ: batches differ

    def swap_gate(model):
        model.attend = OtherGate()
        return model

    assert stepper(one_seed, swap_gate) is StackedStepper


@pytest.mark.slow  # 160 steps of three models, bundled and alone (5 s)
def test_bundle_stays_within_1e_4_of_solo_over_160_steps(toy):
    """The README's longer bound: 160 steps (16 epochs of 10 batches), SRM at pool1, lr up to 3e-2.

    Reassociation differences grow with steps; 1e-4 is the README's bound for this length (measured 3.6e-5).
    """
    train_set, eval_sets = data(toy)
    cfgs = [small_cfg(srm="pool1", epochs=16, eval_at=(1, 4, 16), **v) for v in VARIED]
    bundled = train_bundle(cfgs, train_set, eval_sets)
    for cfg, b in zip(cfgs, bundled):
        alone = train(cfg, train_set, eval_sets)
        assert alone.history[-1]["step"] == b.history[-1]["step"] == 160
        assert_same_history(alone.history, b.history, atol=1e-4)
        assert_same_state(alone.model.state_dict(), b.model.state_dict(), atol=1e-4)


def test_callback_sees_each_models_logits_and_can_stop_one_model(toy):
    train_set, eval_sets = data(toy)
    cfgs = [small_cfg(**v) for v in VARIED]
    seen = []

    def stop_model_1_at_epoch_1(k, record, snapshot):
        seen.append((k, record.step, {n: v.shape for n, v in record.logits.items()}))
        return k == 1 and record.epoch == 1

    bundled = train_bundle(cfgs, train_set, eval_sets, on_eval=stop_model_1_at_epoch_1)
    assert [(k, s) for k, s, _ in seen] == [(0, 5), (1, 5), (2, 5), (0, 10), (1, 10), (2, 10), (0, 20), (2, 20)]
    assert all(shapes == {"cifake_test": (64,), "cifar100_test": (24,)} for *_, shapes in seen)
    assert bundled[1].stopped_early and not bundled[0].stopped_early and not bundled[2].stopped_early
    assert [h["step"] for h in bundled[1].history] == [5, 10]
    # the stopped model holds its weights at the stop; the others run on as if alone
    stopped = train(cfgs[1], train_set, eval_sets, on_eval=lambda record, snapshot: record.epoch == 1)
    assert_same_state(stopped.model.state_dict(), bundled[1].model.state_dict())
    assert_same_history(stopped.history, bundled[1].history)
    for k in (0, 2):
        alone = train(cfgs[k], train_set, eval_sets)
        assert_same_history(alone.history, bundled[k].history)


def test_resumed_bundle_equals_uninterrupted_and_states_cross_between_bundle_and_solo(toy):
    train_set, eval_sets = data(toy)
    cfgs = [small_cfg(epochs=3, eval_at=(1, 2), srm="pool1", **v) for v in VARIED[:2]]
    full = train_bundle(cfgs, train_set, eval_sets)
    states = {}

    def stop_at_epoch_1(k, record, snapshot):
        if record.epoch == 1:
            states[k] = snapshot()
            return True
        return None

    partial = train_bundle(cfgs, train_set, eval_sets, on_eval=stop_at_epoch_1)
    assert all(r.stopped_early and len(r.history) == 1 for r in partial)
    kept = copy.deepcopy(states)
    resumed = train_bundle(cfgs, train_set, eval_sets, resume=[states[0], states[1]])
    for k in (0, 1):  # the states are left as they were
        assert_same_state(kept[k]["model"], states[k]["model"], atol=0)
        for i, s in kept[k]["optimizer"]["state"].items():
            assert torch.equal(s["momentum_buffer"], states[k]["optimizer"]["state"][i]["momentum_buffer"])
    for a, b in zip(full, resumed):
        # the same bundled arithmetic both ways: equal to the bit
        assert [{k: v for k, v in h.items() if k != "elapsed_s"} for h in a.history] == \
               [{k: v for k, v in h.items() if k != "elapsed_s"} for h in b.history]
        assert_same_state(a.model.state_dict(), b.model.state_dict(), atol=0)
    # a bundled model's state resumes alone, and a solo state resumes inside a bundle (`train` updates the
    # momentum buffers of the state it resumes from in place: it gets a copy)
    alone = train(cfgs[0], train_set, eval_sets, resume=copy.deepcopy(states[0]))
    assert_same_history(full[0].history, alone.history)
    solo_states = {}
    train(cfgs[1], train_set, eval_sets, on_eval=solo_snapshots(solo_states))
    mixed = train_bundle(cfgs, train_set, eval_sets, resume=[states[0], solo_states[10]])
    for a, b in zip(full, mixed):
        assert_same_history(a.history, b.history)
        assert_same_state(a.model.state_dict(), b.model.state_dict())


def test_a_diverging_model_ends_alone_and_the_others_go_on(toy):
    train_set, eval_sets = data(toy)
    # lr 1e30: the first update sends the weights past float32's range, so the loss turns inf/nan
    cfgs = [small_cfg(**VARIED[0]), small_cfg(seed=5, lr=1e30), small_cfg(**VARIED[1])]
    calls = []
    bundled = train_bundle(cfgs, train_set, eval_sets, on_eval=lambda k, record, snapshot: calls.append((k, record.step)))
    blown = bundled[1]
    assert blown.diverged and not blown.stopped_early
    assert [h["step"] for h in blown.history] == [5]  # ended at the first evaluation point
    assert not np.isfinite(blown.history[0]["metrics"]["train"]["loss"])
    assert (1, 10) not in calls and (1, 5) in calls
    for k in (0, 2):
        assert not bundled[k].diverged
        assert_same_history(train(cfgs[k], train_set, eval_sets).history, bundled[k].history)


def test_a_diverged_models_sets_are_counted_not_scored_as_alone(toy):
    train_set, eval_sets = data(toy)
    cfgs = [small_cfg(**VARIED[0]), small_cfg(seed=5, lr=1e30)]
    bundled = train_bundle(cfgs, train_set, eval_sets)
    alone = train(cfgs[1], train_set, eval_sets)
    metrics = bundled[1].history[-1]["metrics"]
    assert bundled[1].diverged and alone.diverged
    assert metrics.keys() == alone.history[-1]["metrics"].keys() == {"train", "cifake_test", "cifar100_test"}
    for name, n in (("cifake_test", 64), ("cifar100_test", 24)):
        assert metrics[name].keys() == {"nonfinite", "n"} and metrics[name]["n"] == n
        assert metrics[name] == alone.history[-1]["metrics"][name]


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("deterministic", [False, True])
def test_every_step_runs_in_float32_under_the_configs_algorithm_choice(toy, monkeypatch, k, deterministic):
    stepper = ModuleStepper if k == 1 else StackedStepper
    flags, original = [], stepper.step

    def recording_step(self, *args):
        flags.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
                      torch.are_deterministic_algorithms_enabled()))
        return original(self, *args)

    monkeypatch.setattr(stepper, "step", recording_step)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)  # torch's default, which the loop turns off
    cfgs = [small_cfg(deterministic=deterministic, **v) for v in VARIED[:k]]
    train_models(cfgs, toy(160, 0), {"cifake_test": toy(32, 1, "cifake_test")})
    assert flags == [(False, False, deterministic)] * 20
    assert torch.backends.cudnn.allow_tf32  # restored


def test_bundle_key_is_the_shared_fields():
    a, b = small_cfg(seed=1, lr=1e-3), small_cfg(seed=2, lr=1e-2, momentum=0.5)
    assert bundle_key(a) == bundle_key(b) == tuple(getattr(a, f) for f in SHARED_FIELDS)
    assert bundle_key(small_cfg(srm="pool1")) != bundle_key(a)


@pytest.mark.parametrize(
    "other, message",
    [({"srm": "pool1"}, "differ in 'srm'"), ({"batch_size": 8}, "differ in 'batch_size'"),
     ({"epochs": 1, "eval_at": ()}, "differ in 'epochs'"), ({"eval_at": (1,)}, "differ in 'eval_at'"),
     ({"shuffle": "full"}, "differ in 'shuffle'"), ({"deterministic": True}, "differ in 'deterministic'")],
)
def test_configs_that_cannot_share_a_bundle_are_refused(toy, other, message):
    with pytest.raises(ValueError, match=message):
        train_bundle([small_cfg(), small_cfg(**other)], toy(64, 0))


def test_resume_states_must_match_the_bundle(toy):
    train_set = toy(64, 0)
    states = {}
    train(small_cfg(), train_set, on_eval=solo_snapshots(states))
    with pytest.raises(ValueError, match="one .or None. per config"):
        train_bundle([small_cfg(), small_cfg(seed=2)], train_set, resume=[states[2]])
    with pytest.raises(ValueError, match="different steps"):
        train_bundle([small_cfg(), small_cfg()], train_set, resume=[states[2], states[4]])
    with pytest.raises(ValueError, match="different config"):
        train_bundle([small_cfg(lr=0.5), small_cfg()], train_set, resume=[states[2], None])


def test_full_shuffle_keeps_the_last_partial_batch(toy):
    # 150 images in batches of 16: nine full batches and one of 6 per epoch, for every model
    train_set, eval_sets = toy(150, 0), {"cifake_test": toy(32, 1, "cifake_test")}
    cfgs = [small_cfg(shuffle="full", **v) for v in VARIED[:2]]
    bundled = train_bundle(cfgs, train_set, eval_sets)
    for cfg, b in zip(cfgs, bundled):
        assert_same_history(train(cfg, train_set, eval_sets).history, b.history)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
def test_gpu_steps_never_wait_for_the_device(toy):
    cfgs = [small_cfg(device="cuda", **v) for v in VARIED]
    train_set = toy(160, 0)
    models = [build_initial(c, torch.device("cuda")) for c in cfgs]
    stack = StackedModels(models, [torch.zeros(sum(p.numel() for p in m.parameters()), device="cuda") for m in models],
                          [c.lr for c in cfgs], [c.momentum for c in cfgs])
    images = torch.from_numpy(train_set.images).cuda()
    labels = torch.from_numpy(train_set.labels.astype(np.float32)).cuda()
    order, offsets = epoch_order([BatchSchedule(160, 16, "reference", c.seed) for c in cfgs], 0, torch.device("cuda"))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
    try:
        losses = [stack.step(images, labels, order[:, offsets[s] : offsets[s + 1]]) for s in range(len(offsets) - 1)]
        order, offsets = epoch_order([BatchSchedule(160, 16, "reference", c.seed) for c in cfgs], 1, torch.device("cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(torch.stack(losses)).all()


@pytest.mark.gpu
@needs_cuda
def test_gpu_bundle_equals_each_model_trained_alone(toy):
    train_set, eval_sets = data(toy)
    cfgs = [small_cfg(device="cuda", srm="pool1", **v) for v in VARIED]
    # no TF32 to switch off by hand: the one loop runs both steppers in IEEE float32
    bundled = train_bundle(cfgs, train_set, eval_sets)
    for cfg, b in zip(cfgs, bundled):
        alone = train(cfg, train_set, eval_sets)
        assert_same_history(alone.history, b.history, atol=1e-4)
        assert_same_state(alone.model.state_dict(), b.model.state_dict(), atol=1e-4)
