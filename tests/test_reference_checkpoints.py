"""fakedet reproduces the study's published models (shared/reference/) on the same image files.

The reference side is re-implemented here from shared/reference/README.md alone, independently of
fakedet: PIL image → np.array(img) / 255 (float64) → ToTensor → Normalize(0.5, 0.5) → .float(), and a
module that always holds `attend` but applies it only when SRM is active, fc3 then sigmoid.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

from fakedet.models import load_reference_checkpoint
from fakedet.data.decode import DecodeOptions, decode_image
from fakedet.preprocess import predict_proba, preprocess

# beside the repository (../shared/reference), or where FAKEDET_REFERENCE_DIR says (a GPU machine's copy)
REFERENCE = Path(os.environ.get("FAKEDET_REFERENCE_DIR") or Path(__file__).resolve().parents[2] / "shared" / "reference")
CHECKPOINTS = [("base_model.pth", "none"), ("mini_model.pth", "none"), ("SRM_model.pth", "pool1")]

pytestmark = pytest.mark.skipif(
    not all((REFERENCE / name).is_file() for name, _ in CHECKPOINTS),
    reason=f"the study's checkpoints are not at {REFERENCE} (expected ../shared/reference beside the repository, "
    "or FAKEDET_REFERENCE_DIR)",
)


class RefSRM(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.cfc = nn.Conv1d(c, c, kernel_size=2, bias=False, groups=c)
        self.bn = nn.BatchNorm1d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, _, _ = x.size()
        mean = x.view(b, c, -1).mean(-1).unsqueeze(-1)
        std = x.view(b, c, -1).std(-1).unsqueeze(-1)
        g = torch.sigmoid(self.bn(self.cfc(torch.cat((mean, std), -1))))
        return x * g.view(b, c, 1, 1).expand_as(x)


class RefNet(nn.Module):
    def __init__(self, attn: bool) -> None:
        super().__init__()
        self.attn = attn
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.attend = RefSRM(6)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        if self.attn:
            x = self.attend(x)
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc2(F.relu(self.fc1(x))))
        return torch.sigmoid(self.fc3(x)).squeeze(-1)


def decode(path: Path) -> np.ndarray:
    """fakedet's decoder, as `fakedet predict` and data preparation use it."""
    return decode_image(path.read_bytes(), DecodeOptions())


REF_TRANSFORM = T.Compose([T.ToTensor(), T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])


def reference_input(path: Path) -> torch.Tensor:
    return REF_TRANSFORM(np.array(Image.open(path)) / 255).float()


def reference_proba(name: str, srm: str, paths: list[Path]) -> np.ndarray:
    net = RefNet(attn=srm == "pool1")
    net.load_state_dict(torch.load(REFERENCE / name, map_location="cpu", weights_only=True), strict=True)
    net.eval()  # BatchNorm on its running statistics, so a score does not depend on the batch
    with torch.no_grad():
        return net(torch.stack([reference_input(p) for p in paths])).numpy()


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> list[Path]:
    """24 deterministic 32×32 RGB files: noise and smooth images, as PNG and as JPEG."""
    root = tmp_path_factory.mktemp("reference_images")
    rng = np.random.default_rng(2025)
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    arrays = []
    for i in range(12):
        arrays.append(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
        phase = rng.uniform(0, 2 * np.pi, 3)
        freq = rng.uniform(0.5, 4, 3)
        smooth = [0.5 + 0.5 * np.sin(2 * np.pi * freq[c] * (xx * np.cos(i) + yy * np.sin(i)) + phase[c]) for c in range(3)]
        arrays.append(np.round(255 * np.stack(smooth, -1)).astype(np.uint8))
    paths = []
    for i, a in enumerate(arrays):
        path = root / (f"{i:02d}.jpg" if i % 3 == 2 else f"{i:02d}.png")
        Image.fromarray(a).save(path, **({"quality": 90} if path.suffix == ".jpg" else {}))
        paths.append(path)
    return paths


def test_preprocess_is_the_reference_transform_bit_for_bit(image_files):
    decoded = np.stack([decode(p) for p in image_files])
    for path, array in zip(image_files, decoded):
        np.testing.assert_array_equal(array, np.array(Image.open(path)))  # 32×32 RGB: decoded as it is
    ours = preprocess(decoded, "cpu")
    ref = torch.stack([reference_input(p) for p in image_files])
    assert ours.dtype == torch.float32 and ours.shape == (len(image_files), 3, 32, 32)
    assert torch.equal(ours, ref)
    every_value = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, -1)
    assert torch.equal(preprocess(every_value, "cpu")[0], REF_TRANSFORM(every_value[0] / 255).float())


@pytest.mark.parametrize("name,srm", CHECKPOINTS)
def test_fakedet_reproduces_reference_probabilities(name, srm, image_files):
    expected = reference_proba(name, srm, image_files)
    assert expected.std() > 1e-3, "test images must get different scores for the comparison to mean anything"
    model = load_reference_checkpoint(REFERENCE / name, srm)
    decoded = np.stack([decode(p) for p in image_files])
    ours = predict_proba(model, decoded, batch_size=7)  # batches of 7: batching must not matter
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name,_", CHECKPOINTS)
def test_reference_files_carry_attend_keys(name, _):
    state = torch.load(REFERENCE / name, map_location="cpu", weights_only=True)
    attend = sorted(k for k in state if k.startswith("attend."))
    assert attend == [
        "attend.bn.bias", "attend.bn.num_batches_tracked", "attend.bn.running_mean", "attend.bn.running_var",
        "attend.bn.weight", "attend.cfc.weight",
    ]  # fmt: skip


def test_srm_placement_matters(image_files):
    decoded = np.stack([decode(p) for p in image_files])
    with_srm = predict_proba(load_reference_checkpoint(REFERENCE / "SRM_model.pth", "pool1"), decoded)
    without = predict_proba(load_reference_checkpoint(REFERENCE / "SRM_model.pth", "none"), decoded)
    assert np.abs(with_srm - without).max() > 1e-3
    np.testing.assert_allclose(without, reference_proba("SRM_model.pth", "none", image_files), atol=1e-5)


@pytest.mark.parametrize("srm", ["pool2", "both"])
def test_placements_the_reference_never_had_are_refused(srm):
    with pytest.raises(ValueError, match=srm):
        load_reference_checkpoint(REFERENCE / "SRM_model.pth", srm)
