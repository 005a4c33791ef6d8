"""Where a detector looks: Grad-CAM maps, attention gates, and the share of a map's mass on the object.

The study's first future-work item (section 6) asks whether content- or texture-based features are the
more salient; these maps are the measurement the sweep records for it, on a fixed probe set per
evaluation set (`probe_set`: the same seeded images for every cell of a sweep).

- Grad-CAM (Selvaraju et al. 2017, "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
  Localization"): at a layer with activations A (c, h, w), the map is ReLU(Σ_k α_k A_k), with α_k the
  spatial mean of ∂y/∂A_k, upsampled (bilinear) to the image's 32×32. The model returns one logit (REAL);
  y is the evidence for the image's own class: the logit for a REAL image, minus the logit for a FAKE one.
  Taken at the last convolution's output (`last_conv`, every model) and at the input of each attention
  module (a module with a `gates` method, `fakedet.models.SRM.gates`), whatever its kind.
- Gates: each attention module's `gates(x)` on the input it saw (`channel` (b, c); `spatial` (b, h, w)
  where a module has one), caught by forward hooks: no module needs to know it is watched.
- Shares: where a set carries object masks (`ImageSet.masks`: the stand-in's CIFAKE, whose renderer knows
  each focal object), the share of a map's mass off the object (`cam_bg_share`) and the object's share of
  the image's area (`cam_bg_area`, what a map spread evenly would give). Everywhere: the mass in the
  central 16×16 (`cam_centre_share`; even: 0.25) and the map's entropy over its 1,024 pixels, divided by
  log 1024 (`cam_entropy`; even: 1).

A Grad-CAM says which activations the logit's gradient weighs, not why the model decides: it is no
evidence of a causal mechanism, and the stand-in's masks are no evidence about real images.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fakedet import FAKE, REAL
from fakedet.arrays import ImageSet
from fakedet.config import TrainConfig
from fakedet.models import build_model
from fakedet.preprocess import preprocess

PROBE_PER_CLASS = 16
"""Probe images per class (REAL, FAKE) of each evaluation set; a real-only set gets 2× this many."""
PROBE_SEED = 0x5A11E7
"""The probe sets' seed: fixed, so every cell of every sweep on the same data sees the same images."""
LAST_CONV = "last_conv"
METRICS = ("cam_bg_share", "cam_bg_share_real", "cam_bg_share_fake", "cam_bg_area", "cam_centre_share", "cam_entropy")
"""Per evaluation set, logged at every evaluation point (`<set>/<metric>`)."""


@dataclass(frozen=True)
class Probe:
    """A fixed sample of one evaluation set: its rows there, and those rows."""

    rows: np.ndarray
    images: ImageSet


def probe_set(image_set: ImageSet, per_class: int = PROBE_PER_CLASS, seed: int = PROBE_SEED) -> Probe:
    """Up to `per_class` REAL and `per_class` FAKE images of `image_set` (2·per_class of a real-only
    set), drawn with (seed, label) alone: the same rows whatever else the sweep does."""
    rows = []
    for label in (REAL, FAKE):
        where = np.flatnonzero(np.asarray(image_set.labels) == label)
        want = 2 * per_class if image_set.real_only else per_class
        take = np.random.default_rng([seed, int(label)]).choice(where, min(want, len(where)), replace=False)
        rows.append(np.sort(take))
    rows_all = np.concatenate(rows)
    return Probe(rows_all, image_set.subset(rows_all))


def probe_sets(eval_sets: Mapping[str, ImageSet], per_class: int = PROBE_PER_CLASS) -> dict[str, Probe]:
    return {name: probe_set(s, per_class) for name, s in eval_sets.items() if len(s)}


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The model's attention modules by name: every submodule with a `gates` method."""
    return {name: m for name, m in model.named_modules() if name and callable(getattr(m, "gates", None))}


def last_conv(model: nn.Module) -> nn.Module:
    """The network's last feature convolution: a convolution inside an attention module (CBAM's 7x7 spatial
    gate) computes a gate, not features, and is left out."""
    inside = {id(m) for a in attention_modules(model).values() for m in a.modules()}
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and id(m) not in inside]
    if not convs:
        raise ValueError(f"{type(model).__name__} has no Conv2d layer for Grad-CAM")
    return convs[-1]


@dataclass
class Explanation:
    """Maps of n images: `cams[layer]` (n, 32, 32) float32 ≥ 0, `gates[module/kind]` (n, …), `logits` (n,)."""

    cams: dict[str, np.ndarray]
    gates: dict[str, np.ndarray]
    logits: np.ndarray


def explain(model: nn.Module, images: ImageSet, device: torch.device | str = "cpu") -> Explanation:
    """Grad-CAM at the last convolution and at each attention module's input, and every gate, for the
    images of `images` (uint8; their labels choose the class explained). The model is put in eval mode
    and its parameters' gradients are left as they were (the maps differentiate the activations only)."""
    device = torch.device(device)
    model.eval()
    targets: dict[str, tuple[nn.Module, bool]] = {LAST_CONV: (last_conv(model), False)}
    attention = attention_modules(model)
    targets.update({name: (m, True) for name, m in attention.items()})  # True: the module's input
    seen: dict[str, torch.Tensor] = {}
    gates: dict[str, torch.Tensor] = {}
    handles = []

    def keep(name: str, of_input: bool) -> Callable:
        def hook(module, inputs, output):
            a = inputs[0] if of_input else output  # downstream of the input image, which requires grad
            a.retain_grad()
            seen[name] = a
            if of_input:
                with torch.no_grad():
                    for kind, g in module.gates(a).items():
                        gates[f"{name}/{kind}"] = g.detach()
        return hook

    for name, (module, of_input) in targets.items():
        handles.append(module.register_forward_hook(keep(name, of_input)))
    params = [p for p in model.parameters()]
    had_grad = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        x = preprocess(images.images, device).requires_grad_(True)
        with torch.enable_grad():
            logits = model(x)
            sign = torch.from_numpy(np.where(np.asarray(images.labels) == REAL, 1.0, -1.0).astype(np.float32)).to(device)
            (logits * sign).sum().backward()
    finally:
        for h in handles:
            h.remove()
        for p, g in zip(params, had_grad):
            p.requires_grad_(g)
    cams = {}
    size = images.images.shape[1:3]
    for name, a in seen.items():
        weights = a.grad.mean(dim=(2, 3), keepdim=True)  # α_k: each channel's mean gradient
        cam = F.relu((weights * a.detach()).sum(1, keepdim=True))
        cams[name] = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[:, 0].cpu().numpy()
    return Explanation(cams, {k: v.cpu().numpy() for k, v in gates.items()}, logits.detach().cpu().numpy())


def trained_model(cfg: TrainConfig, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """A module of `cfg`'s architecture, placement and attention module holding the weights `state` (a snapshot's `model`),
    in eval mode: each model of a bundle as its own module."""
    model = build_model(cfg.arch, cfg.srm, cfg.attention)
    model.load_state_dict(state)
    return model.eval()


def _mass(cam: np.ndarray) -> np.ndarray:
    return cam.reshape(len(cam), -1).sum(1)


def shares(cam: np.ndarray, images: ImageSet) -> dict[str, float]:
    """`METRICS` of one layer's maps of a probe set: means over its images with any mass (a map that
    is zero everywhere has no share). The background shares need the set's masks; without them only
    the content-independent summaries are given."""
    mass = _mass(cam)
    ok = mass > 0
    # a map zero everywhere (no positive evidence at the layer) has no share: NaN where no image has one,
    # so that every point logs the same names
    names = METRICS if images.masks is not None else ("cam_centre_share", "cam_entropy")
    out: dict[str, float] = dict.fromkeys(names, float("nan"))
    if not ok.any():
        return out
    p = cam[ok].reshape(ok.sum(), -1) / mass[ok, None]
    h, w = cam.shape[1:]
    centre = np.zeros((h, w), bool)
    centre[h // 4 : h - h // 4, w // 4 : w - w // 4] = True
    out["cam_centre_share"] = float(p[:, centre.ravel()].sum(1).mean())
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(p > 0, p * np.log(p), 0.0).sum(1) / np.log(h * w)
    out["cam_entropy"] = float(ent.mean())
    if images.masks is not None:
        obj = np.asarray(images.masks, np.float32)[ok].reshape(ok.sum(), -1) / 255.0
        bg = 1.0 - (p * obj).sum(1)
        out["cam_bg_share"] = float(bg.mean())
        out["cam_bg_area"] = float((1.0 - obj.mean(1)).mean())
        labels = np.asarray(images.labels)[ok]
        for label, tag in ((REAL, "real"), (FAKE, "fake")):
            if (labels == label).any():
                out[f"cam_bg_share_{tag}"] = float(bg[labels == label].mean())
    return out


def explain_probes(model: nn.Module, probes: Mapping[str, Probe], device: torch.device | str = "cpu") -> dict[str, Explanation]:
    """`explain` of every probe set in one forward and backward pass (each image's map depends on that
    image alone, so the sets share a batch)."""
    if not probes:
        return {}
    joined = ImageSet(np.concatenate([p.images.images for p in probes.values()]),
                      np.concatenate([p.images.labels for p in probes.values()]))
    e = explain(model, joined, device)
    out, start = {}, 0
    for name, probe in probes.items():
        part = slice(start, start + len(probe.images))
        out[name] = Explanation({k: v[part] for k, v in e.cams.items()}, {k: v[part] for k, v in e.gates.items()}, e.logits[part])
        start = part.stop
    return out


def probe_shares(explained: Mapping[str, Explanation], probes: Mapping[str, Probe]) -> dict[str, float]:
    """`<set>/<metric>` of the last convolution's maps of every probe set: what an evaluation point logs."""
    return {f"{name}/{k}": v for name, e in explained.items() for k, v in shares(e.cams[LAST_CONV], probes[name].images).items()}


def point_metrics(model: nn.Module, probes: Mapping[str, Probe], device: torch.device | str = "cpu") -> dict[str, float]:
    """`probe_shares` of `model` on `probes`."""
    return probe_shares(explain_probes(model, probes, device), probes)


def write_maps(out: Path, probes: Mapping[str, Probe], explained: Mapping[str, Explanation]) -> None:
    """`out/<set>.npz` (images, labels, rows, logits, `cam/<layer>`, `gate/<module>/<kind>`, masks where
    known) and `out/<set>.png` (`mosaic`: each image above its maps, upscaled ×2) for every probe set.
    The PNG is the bare mosaic (matplotlib's `imsave`: no figure to lay out, a fifth of a labelled figure's cost);
    `map_grid` draws it with labels from the npz."""
    from matplotlib.image import imsave

    out.mkdir(parents=True, exist_ok=True)
    for name, probe in probes.items():
        e = explained[name]
        arrays = {"images": probe.images.images, "labels": probe.images.labels, "rows": probe.rows, "logits": e.logits,
                  **{f"cam/{k}": v for k, v in e.cams.items()}, **{f"gate/{k}": v for k, v in e.gates.items()}}
        if probe.images.masks is not None:
            arrays["masks"] = np.asarray(probe.images.masks)
        np.savez_compressed(out / f"{name}.npz", **arrays)
        # ×2 and zlib level 1: 0.04 s a set where ×3 at Pillow's default level 6 took 0.14 s
        imsave(out / f"{name}.png", np.kron(mosaic(probe.images, e), np.ones((2, 2, 1), np.float32)), pil_kwargs={"compress_level": 1})


def mosaic(images: ImageSet, e: Explanation, columns: int = 16) -> np.ndarray:
    """The probe images in rows of `columns` (REAL, then FAKE: `probe_set`'s order), each with its maps
    below it, one row per layer in `e.cams`' order (`last_conv` first): the map, scaled per image, in jet
    over the image at alpha 0.5, the object's outline in white where the set has masks. A map shows
    where, not how much. RGB float in [0, 1], 2 px white between tiles."""
    from matplotlib import colormaps

    layers = list(e.cams)
    n = len(images)
    cols = max(1, min(columns, n))
    blocks = -(-n // cols)
    tile, pad = 32, 2
    img = np.asarray(images.images, np.float32) / 255.0  # (n, 32, 32, 3)
    tiles = [img]
    if images.masks is not None:
        inside = np.asarray(images.masks) > 127
        edge = inside & ~(np.roll(inside, 1, 1) & np.roll(inside, -1, 1) & np.roll(inside, 1, 2) & np.roll(inside, -1, 2))
    for layer in layers:
        cam = e.cams[layer]
        top = cam.reshape(n, -1).max(1)
        scaled = np.divide(cam, top[:, None, None], out=np.zeros_like(cam), where=top[:, None, None] > 0)
        over = 0.5 * img + 0.5 * colormaps["jet"](scaled)[..., :3].astype(np.float32)
        if images.masks is not None:
            over[edge] = 1.0
        tiles.append(over)
    stack = np.stack(tiles, 1)  # (n, 1 + layers, 32, 32, 3)
    padded = np.ones((blocks * cols, 1 + len(layers), tile + pad, tile + pad, 3), np.float32)
    padded[:n, :, :tile, :tile] = stack
    # (block, col, row, y, x, c) -> rows of tiles: block-major, then the image row and its maps below it
    grid = padded.reshape(blocks, cols, 1 + len(layers), tile + pad, tile + pad, 3).transpose(0, 2, 3, 1, 4, 5)
    return grid.reshape(blocks * (1 + len(layers)) * (tile + pad), cols * (tile + pad), 3)


def map_grid(images: ImageSet, e: Explanation, title: str, columns: int = 16):
    """`mosaic` as a labelled figure: the layer of each row, each image's class (R/F) and logit."""
    from matplotlib.figure import Figure

    layers = list(e.cams)
    cols = max(1, min(columns, len(images)))
    blocks = -(-len(images) // cols)
    rows = blocks * (1 + len(layers))
    fig = Figure(figsize=(max(6.0, cols * 0.55), rows * 0.55 + 1.0))
    ax = fig.add_axes((0.08, 0.1, 0.9, 0.75))
    ax.imshow(mosaic(images, e, columns), interpolation="nearest")
    ax.set_xticks([(c + 0.5) * 34 for c in range(cols)])
    ax.set_xticklabels([f"{'R' if images.labels[k] == REAL else 'F'}{e.logits[k]:+.1f}" for k in range(cols)], fontsize=6, rotation=90)
    ax.set_yticks([(r + 0.5) * 34 for r in range(rows)])
    ax.set_yticklabels((["image", *layers] * blocks)[:rows], fontsize=6)
    ax.tick_params(length=0)
    fig.suptitle(f"{title}\nGrad-CAM for each image's own class, per layer; labels: class (R/F) and logit of the first row", fontsize=8)
    return fig
