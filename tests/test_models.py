import pytest
import torch

from fakedet.models import ARCHITECTURES, PLACEMENTS, SRM, build_model, count_parameters, register_architecture


def test_base_cnn_has_the_reference_parameter_count():
    # conv1 3*6*25+6=456, conv2 6*16*25+16=2416, fc1 400*120+120=48120, fc2 120*84+84=10164, fc3 84+1=85
    assert count_parameters(build_model("cifar_cnn", "none")) == 456 + 2416 + 48120 + 10164 + 85 == 61241


@pytest.mark.parametrize("srm, extra", [("none", 0), ("pool1", 6 * 2 + 2 * 6), ("pool2", 16 * 2 + 2 * 16), ("both", 24 + 64)])
def test_srm_placements_add_cfc_and_batchnorm_parameters(srm, extra):
    # SRM on C channels: a grouped Conv1d with C filters of 2 taps (2C) and BatchNorm1d's weight and bias (2C)
    assert count_parameters(build_model("cifar_cnn", srm)) == 61241 + extra


@pytest.mark.parametrize("srm", list(PLACEMENTS))
def test_forward_returns_one_logit_per_image(srm):
    model = build_model("cifar_cnn", srm)
    assert model(torch.randn(5, 3, 32, 32)).shape == (5,)


def test_srm_keeps_shape_and_gates_each_channel_in_0_1():
    torch.manual_seed(0)
    layer = SRM(6).eval()
    x = torch.randn(4, 6, 14, 14)
    y = layer(x)
    assert y.shape == x.shape
    gate = y / x
    # one gate per (image, channel), constant over the feature map, strictly between 0 and 1
    assert torch.allclose(gate, gate[..., :1, :1].expand_as(gate), atol=1e-5)
    assert ((gate > 0) & (gate < 1)).all()


def test_srm_uses_unbiased_std_like_the_reference():
    layer = SRM(1).eval()
    with torch.no_grad():
        layer.cfc.weight.copy_(torch.tensor([[[0.0, 1.0]]]))  # gate depends on std only
    x = torch.tensor([[[[1.0, 3.0]]]])  # std: unbiased sqrt(2) vs biased 1
    expected_gate = torch.sigmoid(torch.tensor(2.0**0.5) / torch.sqrt(torch.tensor(1.0 + 1e-5)))
    assert torch.allclose(layer(x) / x, expected_gate.expand(1, 1, 1, 2), atol=1e-6)


def test_unknown_placement_and_architecture_are_refused():
    with pytest.raises(ValueError, match="unknown SRM placement 'pool3'"):
        build_model("cifar_cnn", "pool3")
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("resnet", "none")


def test_registering_an_architecture_is_one_decorated_function():
    name = "tiny_linear_for_test"
    try:
        @register_architecture(name)
        def tiny(srm, attention):
            return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 1), torch.nn.Flatten(0))

        assert build_model(name, "none")(torch.zeros(2, 3, 32, 32)).shape == (2,)
        with pytest.raises(ValueError, match="already registered"):
            register_architecture(name)(tiny)
    finally:
        ARCHITECTURES.pop(name, None)
