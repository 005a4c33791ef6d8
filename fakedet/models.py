"""The study's CNN, SRM channel attention, and the registries that make an ablation axis one change.

Architecture (the PyTorch CIFAR-10 tutorial net with a one-logit head, as in the study, section 3.1):
conv1 3→6 k5 → ReLU → MaxPool 2 → conv2 6→16 k5 → ReLU → MaxPool 2 → fc 400→120→84→1.
The model returns a logit; the probability that an image is REAL is its sigmoid.

SRM (Lee et al. 2019, "SRM: A Style-based Recalibration Module"), formulated as in the reference
project: per-channel mean and unbiased std over H×W, a channel-wise Conv1d over that pair,
BatchNorm1d, sigmoid, and the input multiplied by the gate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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
    """The study's base CNN with optional SRM in the slots `pool1` and `pool2`.

    Parameter names match the reference checkpoints: the SRM at `pool1` is `attend`, so the
    published state dicts load as they are. The SRM at `pool2` is `attend2`.
    """

    SLOTS = ("pool1", "pool2")

    def __init__(self, srm: str = "none") -> None:
        super().__init__()
        slots = placement(srm).slots
        unknown = set(slots) - set(self.SLOTS)
        if unknown:
            raise ValueError(f"placement {srm!r} names slots {sorted(unknown)} that this architecture lacks")
        self.srm = srm
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 1)
        self.attend = SRM(6) if "pool1" in slots else None
        self.attend2 = SRM(16) if "pool2" in slots else None

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


# Architectures: a new one is one decorated builder taking the placement name.
ARCHITECTURES: dict[str, Callable[[str], nn.Module]] = {}


def register_architecture(name: str) -> Callable[[Callable[[str], nn.Module]], Callable[[str], nn.Module]]:
    def decorate(builder: Callable[[str], nn.Module]) -> Callable[[str], nn.Module]:
        if name in ARCHITECTURES:
            raise ValueError(f"architecture {name!r} is already registered")
        ARCHITECTURES[name] = builder
        return builder

    return decorate


@register_architecture("cifar_cnn")
def cifar_cnn(srm: str) -> nn.Module:
    return CifarTutorialCNN(srm)


def placement(name: str) -> Placement:
    try:
        return PLACEMENTS[name]
    except KeyError:
        raise ValueError(f"unknown SRM placement {name!r}; choose one of {', '.join(PLACEMENTS)}") from None


def build_model(arch: str = "cifar_cnn", srm: str = "none") -> nn.Module:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    placement(srm)
    return ARCHITECTURES[arch](srm)


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
    model = build_model(config.get("arch", "cifar_cnn"), config.get("srm", "none"))
    model.load_state_dict(blob["state_dict"])
    return model.eval(), config
