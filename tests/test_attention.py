"""The attention axis: every registered module follows the gates protocol, trains alone and in a bundle,
and saves and loads with its kind; SRM keeps the study's parameter names."""

import pytest
import torch
import torch.nn as nn

from fakedet.config import TrainConfig
from fakedet.models import (ATTENTIONS, CBAM, ECA, SE, bottleneck, build_model, count_parameters, eca_kernel_size,
                            load_checkpoint, placement, register_attention, save_checkpoint)
from fakedet.train import train, train_models
from test_bundle import ATOL, assert_same_history, assert_same_state, data, one_thread  # noqa: F401

BASE = 61241  # the study's CNN without a module (tests/test_models.py)


@pytest.mark.parametrize("name", list(ATTENTIONS))
@pytest.mark.parametrize("channels, size", [(6, 14), (16, 5)])
def test_every_module_gates_as_the_protocol_says_and_forward_applies_the_gates(name, channels, size):
    torch.manual_seed(0)
    module = ATTENTIONS[name](channels).eval()
    x = torch.randn(3, channels, size, size)
    gates = module.gates(x)
    assert set(gates) <= {"channel", "spatial"} and "channel" in gates
    assert gates["channel"].shape == (3, channels)
    expected = x * gates["channel"].reshape(3, channels, 1, 1)
    if "spatial" in gates:
        assert gates["spatial"].shape == (3, size, size)
        expected = expected * gates["spatial"].unsqueeze(1)
    for g in gates.values():
        assert ((g > 0) & (g < 1)).all()
    torch.testing.assert_close(module(x), expected, rtol=0, atol=1e-6)


def test_cbam_has_a_spatial_gate_and_the_channel_modules_none():
    x = torch.randn(2, 6, 14, 14)
    assert set(CBAM(6).gates(x)) == {"channel", "spatial"}
    assert set(SE(6).gates(x)) == set(ECA(6).gates(x)) == {"channel"}
    # the spatial gate varies over the map: it is not a channel gate in disguise
    spatial = CBAM(6).gates(x)["spatial"]
    assert spatial.std(dim=(1, 2)).min() > 0


def test_eca_kernel_size_follows_the_papers_formula():
    # k = |log2(C)/2 + 1/2| to the odd number: C=6 → |1.79| = 1 (odd); C=16 → |2.5| = 2 → 3; C=64 → 3 → 3; C=256 → 4 → 5
    assert [eca_kernel_size(c) for c in (6, 16, 64, 256)] == [1, 3, 3, 5]
    assert ECA(16).conv.kernel_size == (3,) and ECA(6).conv.kernel_size == (1,)


@pytest.mark.parametrize("srm, slots", [("none", ()), ("pool1", (6,)), ("pool2", (16,)), ("both", (6, 16))])
def test_parameter_counts_per_module_and_placement(srm, slots):
    def se(c):  # two Linear layers through the bottleneck, with biases
        h = bottleneck(c)
        return c * h + h + h * c + c

    per_module = {"srm": lambda c: 4 * c, "se": se, "eca": eca_kernel_size, "cbam": lambda c: se(c) + 2 * 49 + 1}
    for name, extra in per_module.items():
        assert count_parameters(build_model("cifar_cnn", srm, name)) == BASE + sum(extra(c) for c in slots), name
    assert bottleneck(6) == 2 and bottleneck(16) == 4


def test_srm_model_keeps_the_reference_parameter_names():
    names = list(build_model("cifar_cnn", "both", "srm").state_dict())
    assert [n for n in names if n.startswith("attend")] == [
        "attend.cfc.weight", "attend.bn.weight", "attend.bn.bias", "attend.bn.running_mean", "attend.bn.running_var",
        "attend.bn.num_batches_tracked", "attend2.cfc.weight", "attend2.bn.weight", "attend2.bn.bias",
        "attend2.bn.running_mean", "attend2.bn.running_var", "attend2.bn.num_batches_tracked"]


@pytest.mark.parametrize("attention", sorted(ATTENTIONS))
@pytest.mark.parametrize("srm", ["none", "pool1", "pool2", "both"])
def test_a_model_draws_its_initial_weights_for_its_own_layers_only(srm, attention):
    """Under one seed a model's weights are those of its layers built in order, nothing drawn in between:
    a module built and thrown away would move the attention modules' (and the study's SRM) initialisation."""
    torch.manual_seed(5)
    model = build_model("cifar_cnn", srm, attention)
    after_model = torch.rand(1)
    torch.manual_seed(5)
    by_hand = [nn.Conv2d(3, 6, 5), nn.Conv2d(6, 16, 5), nn.Linear(400, 120), nn.Linear(120, 84), nn.Linear(84, 1)]
    slots = placement(srm).slots
    by_hand += [ATTENTIONS[attention](c) for slot, c in (("pool1", 6), ("pool2", 16)) if slot in slots]
    assert torch.equal(torch.rand(1), after_model)
    theirs = [p for m in by_hand for p in m.state_dict().values()]
    assert len(theirs) == len(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), theirs))


def test_unknown_attention_is_refused_by_the_model_and_the_config():
    with pytest.raises(ValueError, match="unknown attention module 'gcnet'"):
        build_model("cifar_cnn", "pool1", "gcnet")
    with pytest.raises(ValueError, match="attention: unknown attention module 'gcnet'"):
        TrainConfig(attention="gcnet")


def test_a_checkpoint_saves_and_loads_its_attention_kind(tmp_path):
    torch.manual_seed(0)
    model = build_model("cifar_cnn", "both", "cbam").eval()
    cfg = TrainConfig(srm="both", attention="cbam")
    save_checkpoint(tmp_path / "m.pt", model, cfg.to_dict())
    back, config = load_checkpoint(tmp_path / "m.pt")
    assert config["attention"] == "cbam" and isinstance(back.attend, CBAM)
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(back(x), model(x))
    # a checkpoint from before the axis (no `attention` in its config) is the study's SRM
    save_checkpoint(tmp_path / "old.pt", build_model("cifar_cnn", "pool1"), {"arch": "cifar_cnn", "srm": "pool1"})
    assert type(load_checkpoint(tmp_path / "old.pt")[0].attend).__name__ == "SRM"


def test_registering_an_attention_module_is_one_decorated_function():
    name = "identity_gate_for_test"

    class Half(torch.nn.Module):
        def gates(self, x):
            return {"channel": torch.full(x.shape[:2], 0.5)}

        def forward(self, x):
            return x * 0.5

    try:
        @register_attention(name)
        def half(channels):
            return Half()

        model = build_model("cifar_cnn", "pool1", name)
        assert isinstance(model.attend, Half) and model(torch.zeros(2, 3, 32, 32)).shape == (2,)
        assert TrainConfig(srm="pool1", attention=name).attention == name  # the config's rule reads the registry
        with pytest.raises(ValueError, match="already registered"):
            register_attention(name)(half)
    finally:
        ATTENTIONS.pop(name, None)


@pytest.mark.parametrize("attention", ["se", "eca", "cbam"])
def test_a_bundle_of_each_module_equals_each_model_trained_alone(toy, attention):
    train_set, eval_sets = data(toy)
    cfgs = [TrainConfig(epochs=2, batch_size=16, device="cpu", eval_at=(1,), srm="both", attention=attention, **v)
            for v in ({"seed": 1, "lr": 1e-2}, {"seed": 2, "lr": 3e-2, "momentum": 0.5})]
    solo = [train(cfg, train_set, eval_sets) for cfg in cfgs]
    bundled = train_models(cfgs, train_set, eval_sets)
    for a, b in zip(solo, bundled):
        assert_same_history(a.history, b.history)
        assert_same_state(a.model.state_dict(), b.model.state_dict())
    # the two trained apart: the bundle is not one model twice
    assert solo[0].history[-1]["metrics"] != solo[1].history[-1]["metrics"]


def test_a_bundle_refuses_mixed_modules(toy):
    train_set, _ = data(toy)
    cfgs = [TrainConfig(epochs=1, batch_size=16, device="cpu", srm="pool1", attention=a) for a in ("srm", "se")]
    with pytest.raises(ValueError, match="differ in 'attention'"):
        train_models(cfgs, train_set)


@pytest.mark.slow  # four 10-epoch trainings on the small planted stand-in (about 40 s on 2 idle cores)
def test_every_module_learns_the_intrinsic_task_on_the_planted_standin(tmp_path_factory):
    """A known answer: the planted stand-in's CIFAKE task is learnable to near-perfect ranking (the grating
    marks every fake), and SRM at pool1 learns it within 10 epochs at lr 1e-2; so must every module. Measured
    (seed 11): CIFAKE test AUC 1.0 (srm), 0.999 (se), 0.997 (eca), 0.877 (cbam) at epoch 10, against 0.64-0.79 at
    epoch 2; seeds 11-13 in fakedet/data/STANDIN.md."""
    from test_augment import planted_small

    sets = planted_small(tmp_path_factory)
    auc = {}
    for attention in ATTENTIONS:
        cfg = TrainConfig(srm="pool1", attention=attention, lr=1e-2, seed=11, epochs=10, eval_at=(2,), device="cpu")
        history = train(cfg, sets["cifake_train"], {"cifake_test": sets["cifake_test"]}).history
        auc[attention] = [h["metrics"]["cifake_test"]["auc"] for h in history]
    for attention, (early, late) in auc.items():
        assert late > early + 0.1, auc  # every module learns
        # the channel gates reach the grating's near-perfect ranking by epoch 10; CBAM, whose 7x7 spatial gate
        # starts near 0.5 everywhere and halves every map, is slower: 0.64 -> 0.88 (seed 11), not there yet
        assert late > (0.75 if attention == "cbam" else 0.95), auc
