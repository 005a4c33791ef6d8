"""Where a detector looks (fakedet.explain): Grad-CAM and gates caught by hooks on any attention module,
the shares against known masks, the stand-in's masks carried into the cache, and a known answer: a cue
drawn off the object pulls the maps off the object as the model learns it, one drawn on it pulls them on."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fakedet.arrays import ImageSet
from fakedet.config import TrainConfig
from fakedet.data import load_splits
from fakedet.data.synthetic import cifake_name, mask_file
from fakedet.explain import LAST_CONV, explain, last_conv, explain_probes, map_grid, point_metrics, probe_set, probe_sets, shares, trained_model, write_maps
from fakedet.models import build_model
from fakedet.train import train, train_bundle


def _random_set(n: int = 24, seed: int = 0, masks: bool = True) -> ImageSet:
    rng = np.random.default_rng(seed)
    m = rng.integers(0, 256, (n, 32, 32), dtype=np.uint8) if masks else None
    return ImageSet(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), (np.arange(n) % 2).astype(np.uint8), masks=m)


class _Both(nn.Module):
    """An attention module of another kind: a channel and a spatial gate, the protocol's two names."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(c))
        self.s = nn.Conv2d(c, 1, 3, padding=1)

    def gates(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"channel": torch.sigmoid(x.mean((2, 3)) * self.w), "spatial": torch.sigmoid(self.s(x))[:, 0]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gates(x)
        return x * g["channel"][..., None, None] * g["spatial"][:, None]


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.att, self.conv2, self.fc = nn.Conv2d(3, 4, 3), _Both(4), nn.Conv2d(4, 5, 3), nn.Linear(5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.att(F.relu(self.conv1(x))))
        return self.fc(F.relu(x).mean((2, 3))).squeeze(-1)


def test_gates_and_maps_of_any_attention_module_through_hooks():
    torch.manual_seed(0)
    images = _random_set()
    model = build_model(srm="pool1")
    e = explain(model, images)
    assert set(e.cams) == {LAST_CONV, "attend"} and set(e.gates) == {"attend/channel"}
    for cam in e.cams.values():
        assert cam.shape == (24, 32, 32) and (cam >= 0).all() and cam.max() > 0
    # the gate is what the module computes on the input it saw
    x = F.max_pool2d(F.relu(model.conv1((torch.from_numpy(images.images).permute(0, 3, 1, 2).float() - 127.5) / 127.5)), 2)
    assert np.allclose(e.gates["attend/channel"], model.attend.gates(x)["channel"].detach().numpy(), atol=1e-6)
    assert np.allclose(e.logits, model(torch.from_numpy(images.images).permute(0, 3, 1, 2).float().sub(127.5).div(127.5)).detach().numpy(), atol=1e-5)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())  # weights untouched
    assert set(explain(build_model(srm="none"), images).cams) == {LAST_CONV}
    other = explain(_Net(), images)  # another module kind, found by its `gates` method alone
    assert set(other.cams) == {LAST_CONV, "att"} and other.gates["att/spatial"].shape == (24, 30, 30)
    assert other.gates["att/channel"].shape == (24, 4)


def test_grad_cam_is_the_gradient_weighted_activation():
    """Against Selvaraju et al.'s formula computed separately with torch.autograd.grad."""
    torch.manual_seed(1)
    images = _random_set(8, masks=False)
    model = build_model(srm="none").eval()
    x = (torch.from_numpy(images.images).permute(0, 3, 1, 2).float() - 127.5) / 127.5
    a = model.conv2(model.pool(F.relu(model.conv1(x))))
    z = model.fc3(F.relu(model.fc2(F.relu(model.fc1(torch.flatten(model.pool(F.relu(a)), 1)))))).squeeze(-1)
    sign = torch.from_numpy(np.where(images.labels == 1, 1.0, -1.0)).float()
    (g,) = torch.autograd.grad((z * sign).sum(), a)
    cam = F.relu((g.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True))
    want = F.interpolate(cam, size=(32, 32), mode="bilinear", align_corners=False)[:, 0].detach().numpy()
    assert np.allclose(explain(model, images).cams[LAST_CONV], want, atol=1e-6)


def test_shares_against_known_maps():
    masks = np.zeros((4, 32, 32), np.uint8)
    masks[:, 8:24, 8:24] = 255  # the object: the central quarter
    images = ImageSet(np.zeros((4, 32, 32, 3), np.uint8), np.array([1, 1, 0, 0], np.uint8), masks=masks)
    cam = np.zeros((4, 32, 32), np.float32)
    cam[0] = 1.0  # spread evenly
    cam[1] = 1 - masks[1] / 255  # all off the object
    cam[2] = masks[2] / 255  # all on it
    got = shares(cam, images)  # image 3: no mass, left out
    assert got["cam_bg_share_real"] == pytest.approx((0.75 + 1.0) / 2)
    assert got["cam_bg_share_fake"] == pytest.approx(0.0)
    assert got["cam_bg_area"] == pytest.approx(0.75) and got["cam_centre_share"] == pytest.approx((0.25 + 0 + 1) / 3)
    assert shares(cam[:1], images.subset(np.array([0])))["cam_entropy"] == pytest.approx(1.0)
    none = shares(np.zeros((4, 32, 32), np.float32), images)
    assert all(math.isnan(v) for v in none.values()) and "cam_bg_share" in none
    assert set(shares(cam, ImageSet(images.images, images.labels))) == {"cam_centre_share", "cam_entropy"}  # no masks


def test_probe_sets_are_fixed_and_balanced():
    s = _random_set(100)
    a, b = probe_set(s), probe_set(s.subset(np.arange(100)))
    assert np.array_equal(a.rows, b.rows) and len(a.rows) == 32 and a.images.counts() == {"real": 16, "fake": 16}
    real = ImageSet(s.images, np.ones(100, np.uint8))
    assert len(probe_set(real).rows) == 32 and np.array_equal(a.images.masks, s.masks[a.rows])


def test_the_standins_masks_reach_the_cache(tiny_root):
    sets = load_splits(tiny_root / "synthetic-tiny" / "cache")
    sources = tiny_root / "synthetic-tiny" / "sources" / "cifake"
    for name in ("cifake_train", "cifake_val", "cifake_test"):
        s = sets[name]
        assert s.masks is not None and s.masks.shape == (len(s), 32, 32) and s.masks.dtype == np.uint8
        assert 0.05 < s.masks.mean() / 255 < 0.5  # a focal object, not the whole image
        path = str(s.paths[-1])  # the row's own mask, by its file name
        split, label, file = path.split("/")
        row = next(i for i in range(10_000) if cifake_name(i, label) == file)
        assert np.array_equal(np.load(sources / mask_file(split, label))[row], s.masks[-1])
    assert all(sets[k].masks is None for k in ("agiri_test", "cifar100_test"))
    # the object differs from its surround: pixels inside are nearer each other than to those outside
    s = sets["cifake_test"]
    inside = s.masks > 200
    lum = s.images.astype(np.float32).mean(-1)
    gap = [abs(lum[i][inside[i]].mean() - lum[i][~inside[i]].mean()) for i in range(len(s)) if 20 < inside[i].sum() < 900]
    assert np.median(gap) > 5


def _cue(base: ImageSet, where: str, strength: float = 48.0) -> tuple[ImageSet, ImageSet]:
    """Each base image twice: as it is (REAL) and with a warm cast drawn only off (or only on) its object
    (FAKE); train and test rows split 3:1."""
    m = base.masks.astype(np.float32) / 255
    place = 1 - m if where == "background" else m
    fake = np.clip(base.images + (strength * place)[..., None] * np.array([1, 0, -1]), 0, 255).astype(np.uint8)
    n = len(base)
    full = ImageSet(np.concatenate([base.images, fake]), np.r_[np.ones(n), np.zeros(n)].astype(np.uint8),
                    masks=np.concatenate([base.masks, base.masks]))
    idx = np.random.default_rng(0).permutation(2 * n)
    return full.subset(np.sort(idx[: 3 * n // 2])), full.subset(np.sort(idx[3 * n // 2 :]))


def test_known_answer_the_maps_follow_the_cue_off_or_on_the_object(tiny_root):
    """Measured (tiny stand-in, 280 REAL images, lr 1e-2, 4 epochs = 52 steps, seeds 11–18): with the cue off
    the object the FAKE probes' background share went from 0.72–0.91 at step 1 to 0.84–0.99 at the end
    (area baseline 0.84–0.85), above the cue-on-the-object runs' 0.70–0.86 in all 8 seed pairs."""
    sets = load_splits(tiny_root / "synthetic-tiny" / "cache")
    reals = [sets[k].subset(sets[k].labels == 1) for k in ("cifake_train", "cifake_test")]
    base = ImageSet(np.concatenate([r.images for r in reals]), np.concatenate([r.labels for r in reals]),
                    masks=np.concatenate([r.masks for r in reals]))
    ends = {}
    for where in ("background", "object"):
        train_set, test = _cue(base, where)
        probe = {"t": probe_set(test)}
        cfg = TrainConfig(epochs=4, lr=1e-2, seed=11, eval_at=(0.05,))
        seen = []
        result = train(cfg, train_set, {"t": test},
                       on_eval=lambda rec, snap: seen.append(point_metrics(trained_model(cfg, snap()["model"]), probe)))
        assert result.final["metrics"]["t"]["auc"] > 0.85 or where == "object"  # the background cue is learned
        ends[where] = seen[-1]["t/cam_bg_share_fake"]
        area = seen[-1]["t/cam_bg_area"]
        if where == "background":
            assert ends[where] > seen[0]["t/cam_bg_share_fake"] + 0.05 and ends[where] > area + 0.04
    assert ends["background"] > ends["object"] + 0.1


def test_bundled_models_each_explained_and_written(toy, tmp_path):
    """Each model of a bundle (fakedet.bundle's stacked step) comes out of its snapshot as its own module."""
    cfgs = [TrainConfig(epochs=1, lr=1e-2, seed=s, batch_size=16, srm="pool1") for s in (1, 2)]
    train_set, test = toy(96), _random_set(40, seed=3)
    probes = probe_sets({"t": test})
    got = {}
    train_bundle(cfgs, train_set, {"t": test}, on_eval=lambda k, rec, snap: got.__setitem__(k, snap()["model"]))
    metrics = [point_metrics(trained_model(cfgs[k], got[k]), probes) for k in (0, 1)]
    assert metrics[0]["t/cam_bg_share"] != metrics[1]["t/cam_bg_share"]
    write_maps(tmp_path, probes, explain_probes(trained_model(cfgs[0], got[0]), probes))
    with np.load(tmp_path / "t.npz") as z:
        assert {"images", "labels", "rows", "logits", "masks", "cam/last_conv", "cam/attend", "gate/attend/channel"} <= set(z.files)
        assert z["gate/attend/channel"].shape == (32, 6)
    assert (tmp_path / "t.png").stat().st_size > 1000
    e = explain_probes(trained_model(cfgs[1], got[1]), probes)["t"]
    assert np.array_equal(e.cams[LAST_CONV], explain(trained_model(cfgs[1], got[1]), probes["t"].images).cams[LAST_CONV])
    assert map_grid(probes["t"].images, e, "row 1").axes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_the_maps_on_cuda_equal_those_on_the_cpu():
    images = _random_set(16)
    model = build_model(srm="pool1")
    cpu = explain(model, images)
    gpu = explain(model.cuda(), images, "cuda")
    for k in cpu.cams:
        assert np.allclose(cpu.cams[k], gpu.cams[k], atol=1e-4)


@pytest.mark.parametrize("attention", ["se", "eca", "cbam"])
def test_a_cell_of_any_attention_module_is_rebuilt_and_its_gates_read(attention):
    """A cell's saved weights are rebuilt with its own module (a module's parameters are its own), and the
    maps read its gates through the same protocol as SRM's: CBAM's spatial gate as well as its channel one."""
    cfg = TrainConfig(srm="pool1", attention=attention)
    torch.manual_seed(0)
    state = build_model(cfg.arch, cfg.srm, cfg.attention).state_dict()
    model = trained_model(cfg, state)
    assert not model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    gates = model.attend.gates(torch.rand(2, 6, 14, 14))
    assert gates["channel"].shape == (2, 6)
    assert ("spatial" in gates) == (attention == "cbam")
    assert last_conv(model) is model.conv2  # CBAM's spatial convolution is a gate, not the last feature map
    e = explain(model, ImageSet(images=np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8),
                                labels=np.array([0, 1, 0, 1], dtype=np.uint8), name="probe"))
    assert set(e.cams) == {LAST_CONV, "attend"} and "attend/channel" in e.gates
