"""The study's CNN, its attention modules, and the registries that make an ablation axis one change.

Architecture (the PyTorch CIFAR-10 tutorial net with a one-logit head, as in the study, section 3.1):
conv1 3→6 k5 → ReLU → MaxPool 2 → conv2 6→16 k5 → ReLU → MaxPool 2 → fc 400→120→84→1.
The model returns a logit; the probability that an image is REAL is its sigmoid.

SRM (Lee et al. 2019, "SRM: A Style-based Recalibration Module"), formulated as in the reference
project: per-channel mean and unbiased std over H×W, a channel-wise Conv1d over that pair,
BatchNorm1d, sigmoid, and the input multiplied by the gate.

The attention axis (`ATTENTIONS`, `@register_attention`) puts another module in SRM's slots: SE
(Hu et al. 2018), ECA (Wang et al. 2020) or CBAM (Woo et al. 2018). Every module follows one protocol:
`gates(x)` returns `channel` (b, c) and, where the module has one, `spatial` (b, h, w), and `forward`
multiplies the input by them; the attention maps read any module through it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class SRM(nn.Module):
    """Style-based recalibration of `channels` feature maps."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        # channel-wise fully connected layer: one 2-tap filter per channel over (mean, std)
        self.cfc = nn.Conv1d(channels, channels, kernel_size=2, groups=channels, bias=False)
        self.bn = nn.BatchNorm1d(channels)

    def gates(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The module's gates for input `x`: `channel` (b, c), each channel's multiplier in (0, 1).

        Every attention module names its gates this way (`channel` (b, c), `spatial` (b, h, w)), so the
        maps and views read any module's gates without knowing its kind."""
        b, c = x.shape[:2]
        flat = x.reshape(b, c, -1)
        style = torch.stack((flat.mean(-1), flat.std(-1)), dim=-1)  # (b, c, 2); std is unbiased, as in the reference
        return {"channel": torch.sigmoid(self.bn(self.cfc(style))).reshape(b, c)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        return x * self.gates(x)["channel"].reshape(b, c, 1, 1)


def _apply(x: torch.Tensor, gates: dict[str, torch.Tensor]) -> torch.Tensor:
    """`x` (b, c, h, w) times its channel gate and, where there is one, its spatial gate."""
    b, c = x.shape[:2]
    out = x * gates["channel"].reshape(b, c, 1, 1)
    if "spatial" in gates:
        out = out * gates["spatial"].unsqueeze(1)
    return out


def bottleneck(channels: int) -> int:
    """The hidden width of SE's and CBAM's channel MLP on `channels` maps: channels // 4, at least 2.

    Hu et al. (2018, table 5) found reduction ratios 4 to 32 within 0.3% top-1 of each other on ResNet-50 and
    chose 16 for its 64 to 2,048 channels; here 6 // 16 and 16 // 16 would leave 0 and 1 hidden units, a
    gate that can only scale every channel together. Ratio 4 (the smallest they tested) with a floor of 2
    keeps a bottleneck narrower than the input: 6 → 2 → 6 and 16 → 4 → 16, about as many parameters as
    SRM's 4 per channel (32 and 148 against 24 and 64)."""
    return max(2, channels // 4)


class SE(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018): global average pool, FC → ReLU → FC, sigmoid gate per channel."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = bottleneck(channels)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def gates(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """`channel` (b, c): each channel's multiplier in (0, 1)."""
        return {"channel": torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3))))))}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _apply(x, self.gates(x))


def eca_kernel_size(channels: int, gamma: float = 2, b: float = 1) -> int:
    """ECA's adaptive kernel size (Wang et al. 2020, eq. 12): k = |log2(C)/γ + b/γ| rounded to the odd
    number at or above its integer part, γ = 2, b = 1 (the paper's values): 1 for 6 channels (each channel
    gated by its own mean, one weight shared), 3 for 16."""
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 else t + 1


class ECA(nn.Module):
    """Efficient channel attention (Wang et al. 2020): global average pool, a 1-D convolution of
    `eca_kernel_size(C)` taps across neighbouring channels (no bias, as in the paper's code), sigmoid."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        k = eca_kernel_size(channels)
        self.conv = nn.Conv1d(1, 1, kernel_size=k, padding=k // 2, bias=False)

    def gates(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """`channel` (b, c): each channel's multiplier in (0, 1)."""
        pooled = x.mean((2, 3)).unsqueeze(1)  # (b, 1, c): channels as the sequence the conv slides over
        return {"channel": torch.sigmoid(self.conv(pooled)).squeeze(1)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _apply(x, self.gates(x))


class CBAM(nn.Module):
    """Convolutional block attention (Woo et al. 2018): a channel gate, then a spatial gate on the
    channel-refined maps.

    Channel: one MLP (C → `bottleneck(C)` → C, as SE's) over the average- and the max-pooled
    descriptors, summed, sigmoid. Spatial: the channel-wise mean and max of the channel-refined maps,
    a 7×7 convolution (2 → 1, the paper's best kernel) with a bias, sigmoid. The authors' code follows
    the 7×7 convolution with BatchNorm; a 1-map BatchNorm over 5×5 to 14×14 maps adds little, and the
    bias stands in for its shift."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = bottleneck(channels)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)
        self.spatial = nn.Conv2d(2, 1, kernel_size=7, padding=3)

    def gates(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """`channel` (b, c) and `spatial` (b, h, w), each in (0, 1); forward applies both."""
        b, c = x.shape[:2]

        def mlp(v: torch.Tensor) -> torch.Tensor:
            return self.fc2(F.relu(self.fc1(v)))

        channel = torch.sigmoid(mlp(x.mean((2, 3))) + mlp(x.amax((2, 3))))
        refined = x * channel.reshape(b, c, 1, 1)
        pooled = torch.stack((refined.mean(1), refined.amax(1)), dim=1)  # (b, 2, h, w)
        return {"channel": channel, "spatial": torch.sigmoid(self.spatial(pooled)).squeeze(1)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _apply(x, self.gates(x))


# Attention modules: a new one is one decorated builder taking the channel count.
ATTENTIONS: dict[str, Callable[[int], nn.Module]] = {}


def register_attention(name: str) -> Callable[[Callable[[int], nn.Module]], Callable[[int], nn.Module]]:
    def decorate(builder: Callable[[int], nn.Module]) -> Callable[[int], nn.Module]:
        if name in ATTENTIONS:
            raise ValueError(f"attention module {name!r} is already registered")
        ATTENTIONS[name] = builder
        return builder

    return decorate


@register_attention("srm")
def srm_attention(channels: int) -> nn.Module:
    return SRM(channels)


@register_attention("se")
def se_attention(channels: int) -> nn.Module:
    return SE(channels)


@register_attention("eca")
def eca_attention(channels: int) -> nn.Module:
    return ECA(channels)


@register_attention("cbam")
def cbam_attention(channels: int) -> nn.Module:
    return CBAM(channels)


def attention_module(name: str, channels: int) -> nn.Module:
    try:
        builder = ATTENTIONS[name]
    except KeyError:
        raise ValueError(f"unknown attention module {name!r}; choose one of {', '.join(ATTENTIONS)}") from None
    return builder(channels)


@dataclass(frozen=True)
class Placement:
    """Where SRM layers sit in the network: the names of the slots that get one."""

    slots: tuple[str, ...]
    description: str


# The SRM placement axis. A new placement is one entry here; architectures name their slots.
PLACEMENTS: dict[str, Placement] = {
    "none": Placement((), "no SRM: the study's base model"),
    "pool1": Placement(("pool1",), "after the first pooling, before conv2: the study's SRM model"),
    "pool2": Placement(("pool2",), "after the second pooling, before flatten: the study's footnote 4"),
    "both": Placement(("pool1", "pool2"), "after both pooling layers"),
}


class CifarTutorialCNN(nn.Module):
    """The study's base CNN with an attention module (SRM unless told otherwise) in the slots `pool1` and `pool2`.

    Parameter names match the reference checkpoints: the module at `pool1` is `attend`, so the
    published state dicts load as they are. The module at `pool2` is `attend2`.
    """

    SLOTS = ("pool1", "pool2")

    def __init__(self, srm: str = "none", attention: str = "srm") -> None:
        super().__init__()
        slots = placement(srm).slots
        unknown = set(slots) - set(self.SLOTS)
        if unknown:
            raise ValueError(f"placement {srm!r} names slots {sorted(unknown)} that this architecture lacks")
        self.srm, self.attention = srm, attention
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 1)
        # an unknown name is refused whatever the placement; checked, not built: building a module draws its
        # initial weights from torch's generator, which would shift every module built after it off the
        # study's initialisation under the same seed
        if attention not in ATTENTIONS:
            attention_module(attention, 6)  # raises the one-line refusal
        self.attend = attention_module(attention, 6) if "pool1" in slots else None
        self.attend2 = attention_module(attention, 16) if "pool2" in slots else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        if self.attend is not None:
            x = self.attend(x)
        x = self.pool(F.relu(self.conv2(x)))
        if self.attend2 is not None:
            x = self.attend2(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x).squeeze(-1)


# Architectures: a new one is one decorated builder taking the placement and the attention module's names.
ArchitectureBuilder = Callable[[str, str], nn.Module]
ARCHITECTURES: dict[str, ArchitectureBuilder] = {}


def register_architecture(name: str) -> Callable[[ArchitectureBuilder], ArchitectureBuilder]:
    def decorate(builder: ArchitectureBuilder) -> ArchitectureBuilder:
        if name in ARCHITECTURES:
            raise ValueError(f"architecture {name!r} is already registered")
        ARCHITECTURES[name] = builder
        return builder

    return decorate


@register_architecture("cifar_cnn")
def cifar_cnn(srm: str, attention: str) -> nn.Module:
    return CifarTutorialCNN(srm, attention)


def placement(name: str) -> Placement:
    try:
        return PLACEMENTS[name]
    except KeyError:
        raise ValueError(f"unknown SRM placement {name!r}; choose one of {', '.join(PLACEMENTS)}") from None


def build_model(arch: str = "cifar_cnn", srm: str = "none", attention: str = "srm") -> nn.Module:
    """Architecture `arch` with the attention module `attention` at the slots of placement `srm`."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    placement(srm)
    if attention not in ATTENTIONS:
        raise ValueError(f"unknown attention module {attention!r}; choose one of {', '.join(ATTENTIONS)}")
    return ARCHITECTURES[arch](srm, attention)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_reference_checkpoint(path: str | Path, srm: str) -> CifarTutorialCNN:
    """A model holding one of the study's published state dicts (shared/reference/).

    Those files always carry the `attend.*` keys, whether SRM was active or not, so the caller
    names the placement: `none` (base_model, mini_model) or `pool1` (SRM_model). Keys that the
    placement does not use are dropped; any other mismatch is an error.
    """
    if srm not in ("none", "pool1"):
        raise ValueError(f"the reference checkpoints hold a model without SRM or with SRM at pool1, not {srm!r}")
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "conv1.weight" not in state:
        raise ValueError(f"{path}: not a state dict of the reference CNN (no conv1.weight)")
    model = CifarTutorialCNN(srm)
    if srm == "none":
        state = {k: v for k, v in state.items() if not k.startswith("attend.")}
    # the reference head is fc3 with a (1, 84) weight: the same layout as ours
    model.load_state_dict(state, strict=True)
    return model.eval()


def save_checkpoint(path: str | Path, model: nn.Module | dict, config: dict) -> None:
    """A fakedet checkpoint: the state dict (of `model`, or `model` itself) plus the config that rebuilds it."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    state = model.state_dict() if isinstance(model, nn.Module) else model
    torch.save({"format": "fakedet-checkpoint/1", "config": config, "state_dict": state}, path)


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict]:
    blob = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != "fakedet-checkpoint/1":
        raise ValueError(
            f"{path}: not a fakedet checkpoint; for the study's published files use --reference-checkpoint with --srm"
        )
    config = blob["config"]
    # a checkpoint written before the attention axis holds SRM, the study's module
    model = build_model(config.get("arch", "cifar_cnn"), config.get("srm", "none"), config.get("attention", "srm"))
    model.load_state_dict(blob["state_dict"])
    return model.eval(), config
