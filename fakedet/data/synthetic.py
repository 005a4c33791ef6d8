"""The built-in stand-in: CIFAKE-, CIFAR-100- and AGIRI-like data, generated in seconds, in the real formats.

It exists so that every entry point, test and sweep runs without Kaggle. It is written in the exact
on-disk formats of the real datasets (folder layouts, file names with spaces and parentheses, JPEG
files, Python-2 pickles with meta), so the very readers used on the real data run on it.
It is NOT evidence about the real datasets: its images are procedural scenes and its "generators"
are two hand-written processes (see STANDIN.md for what the base CNN achieves on it).

How each part is made (all vectorised numpy; one seed gives the same bytes on a given platform):

- Scenes: a focal object (one of 10 shapes per content class, class palettes, 1/f textures) on a
  two-tone background with 1/f^β texture, the power-law spectrum of natural images
  (Field 1987; van der Schaaf & van Hateren 1996).
- "Real" camera process (CIFAKE REAL, CIFAR-100, AGIRI real): rendered directly at the output size,
  optical blur and sensor noise of random strength, 8-bit quantisation; CIFAKE REAL files are then
  JPEG re-encodes (CIFAKE's real images are JPEG copies of CIFAR-10), CIFAR-100 stays raw pixels.
- CIFAKE "fake" process, after Bird & Lotfi (2024): rendered at 4× (128 px), in a slightly
  different style (more saturated, larger centred objects, "denoised" textures), then downsampled
  with antialiased bilinear interpolation to 32 px, "denoised" and saturated by a per-image
  fingerprint strength, a little noise, JPEG. The fingerprint (missing sensor noise, smoothness,
  vivid colour) is learnable; its strength varies per image, and a share of fakes is as noisy as
  the reals: the task takes several epochs and is not solved (STANDIN.md has the figures).
- AGIRI stand-in: other content (several superformula shapes, free palettes, some greyscale), many
  sizes (24–256 px) and modes (RGB, L, LA, P, RGBA, CMYK, I;16; JPEG, PNG, WebP, BMP, GIF), a few
  corrupt files, a `.DS_Store`; its fakes come from a different process (rendered at half size and
  upsampled ×2, with a faint periodic upsampling pattern), and its reals are larger than 32 px, so
  the downscale that the study applies smooths both: transfer is hard, as it was in the study.

`variant="planted"` (STANDIN.md, "The planted variant") swaps the CIFAKE fingerprint for two cues of
known effect: a warm colour cast shared with the AGIRI fakes (transfers, learned early) and a faint
grating on every CIFAKE fake that means nothing on AGIRI (stronger, learned later, hurts transfer):
a known answer for the study's correlation and cutoff analyses. `variant="planted-background"`
draws that grating off the focal object only (a known answer for the Grad-CAM maps of `fakedet.explain`).
Each CIFAKE image's object coverage goes beside its class folders (`mask_file`). The standard and
planted variants' image bytes do not change.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import uuid
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fakedet.data.decode import die_with_parent, process_context

GENERATOR_VERSION = 1
MARKER = "STANDIN.json"  # fakedet.data.build.STANDIN_MARKER


@dataclass(frozen=True)
class StandinSize:
    cifake_train: int  # per class (REAL, FAKE)
    cifake_test: int
    cifar100_train: int  # per fine class (100)
    cifar100_test: int
    agiri_train: int  # per class (real, fake)
    agiri_test: int


# Image counts per class (CIFAR-100: per fine class). `tiny` runs the whole pipeline in seconds in
# tests; `small` feeds the --smoke sweep preset (~80 s on 2 cores); `default` is sized so the
# README's ablation (3 SRM placements × 3 learning rates × up to 100 epochs) fits ~10 min on 2 cores.
# `cifake` has CIFAKE's own counts (50,000 train and 10,000 test per class): less the 10% validation
# hold-out, 90,000 training images, the scale benchmarks/gpu_check.sh runs the whole grid at; CIFAR-100 test
# at its real 100 per fine class; AGIRI at `default`'s train (enough for the 2,000-image agiri_val) and
# 2,000 test images. Generating it took 5 min 36 s on this project's 2-core CPU (one process renders the
# 50,000 training fakes at 128 px: 4 min 54 s of CPU, which more cores do not shorten), preparing it 26 s.
SIZES: dict[str, StandinSize] = {
    "tiny": StandinSize(
        cifake_train=200, cifake_test=100, cifar100_train=1, cifar100_test=2, agiri_train=60, agiri_test=50
    ),
    "small": StandinSize(
        cifake_train=1000, cifake_test=300, cifar100_train=2, cifar100_test=6, agiri_train=300, agiri_test=200
    ),
    "default": StandinSize(
        cifake_train=2500, cifake_test=1000, cifar100_train=10, cifar100_test=20, agiri_train=1100, agiri_test=500
    ),
    "cifake": StandinSize(
        cifake_train=50000, cifake_test=10000, cifar100_train=10, cifar100_test=100, agiri_train=1100, agiri_test=1000
    ),
}

CIFAKE_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
JPEG_QUALITY = 90  # of the CIFAKE stand-in files (CIFAKE's own are undocumented; prepare estimates them)
RENDER_SCALE = 4  # CIFAKE fakes: rendered at 4×32 px, then downsampled

# ----------------------------------------------------------------------------------- primitives


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates: y in [-1, 1] down the rows, x scaled by the same unit (aspect kept)."""
    s = max(h, w)
    y = ((np.arange(h, dtype=np.float32) + 0.5) * 2 - h) / s
    x = ((np.arange(w, dtype=np.float32) + 0.5) * 2 - w) / s
    return y[None, :, None], x[None, None, :]


def _pow_noise(rng: np.random.Generator, b: int, h: int, w: int, beta: np.ndarray | float, c: int = 1) -> np.ndarray:
    """b×c×h×w noise with power spectrum 1/f^(2·beta), each map normalised to zero mean, unit std."""
    fy = np.fft.fftfreq(h).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(w).astype(np.float32)[None, :]
    f = np.sqrt(fy**2 + fx**2)
    f[0, 0] = 1.0
    beta = np.broadcast_to(np.asarray(beta, np.float32), (b,)).reshape(b, 1, 1, 1)
    amp = f[None, None] ** (-beta)
    amp[..., 0, 0] = 0.0
    white = rng.standard_normal((b, c, h, w), dtype=np.float32)
    out = np.fft.irfft2(np.fft.rfft2(white) * amp, s=(h, w)).astype(np.float32)
    out -= out.mean(axis=(2, 3), keepdims=True)
    out /= out.std(axis=(2, 3), keepdims=True) + 1e-6
    return out


def _hsv(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """HSV in [0, 1] → RGB in [0, 1], elementwise, RGB on a new last axis."""
    h = (h % 1.0) * 6.0
    k = np.stack([(5 + h) % 6, (3 + h) % 6, (1 + h) % 6], -1)
    return v[..., None] - v[..., None] * s[..., None] * np.clip(np.minimum(k, 4 - k), 0, 1)


def _superformula(theta: np.ndarray, m: np.ndarray, n1: np.ndarray, n2: np.ndarray, n3: np.ndarray) -> np.ndarray:
    """Gielis's superformula radius r(θ) (Gielis 2003), normalised so that its maximum is 1."""
    t = m * theta / 4
    r = (np.abs(np.cos(t)) ** n2 + np.abs(np.sin(t)) ** n3 + 1e-6) ** (-1.0 / n1)
    return r


def _shape_level(kind: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """f(u, v) < 1 inside the shape kind[i] (0–9, the ten CIFAKE content shapes) of image i,
    roughly |p| / radius; each shape is evaluated only on the images of its kind."""
    levels = {
        0: lambda u, v, r, th: r,  # ellipse (aspect applied by the caller)
        1: lambda u, v, r, th: np.maximum(np.abs(u), np.abs(v) * 1.6),  # wide box
        2: lambda u, v, r, th: np.maximum(-v * 2.0, v + np.abs(u) * 1.732),  # triangle
        3: lambda u, v, r, th: np.abs(u) + np.abs(v),  # diamond
        4: lambda u, v, r, th: np.minimum(
            np.maximum(np.abs(u) / 0.33, np.abs(v)), np.maximum(np.abs(u), np.abs(v) / 0.33)
        ),  # cross
        5: lambda u, v, r, th: np.abs(r - 0.7) / 0.3,  # ring
        6: lambda u, v, r, th: r / (0.62 + 0.38 * np.cos(5 * th)),  # star
        7: lambda u, v, r, th: np.minimum(np.hypot(u + 0.4, v) / 0.55, np.hypot(u - 0.45, v - 0.1) / 0.5),  # two blobs
        8: lambda u, v, r, th: np.minimum(  # vehicle: a body on two wheels
            np.maximum(np.abs(u), np.abs(v + 0.1) / 0.35),
            np.minimum(np.hypot(u - 0.55, v - 0.4), np.hypot(u + 0.55, v - 0.4)) / 0.25,
        ),
        9: lambda u, v, r, th: np.minimum(
            np.maximum(np.abs(u) / 0.18, np.abs(v - 0.35) / 0.65), np.hypot(u, v + 0.35) / 0.6
        ),  # tree
    }
    out = np.empty_like(u)
    for k in np.unique(kind):
        sel = kind == k
        us, vs = u[sel], v[sel]
        out[sel] = levels[int(k)](us, vs, np.sqrt(us**2 + vs**2), np.arctan2(vs, us))
    return out


def _blur(img: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Separable Gaussian blur of b×h×w×c images, a different sigma (pixels) per image, reflect edges."""
    radius = int(np.clip(np.ceil(3 * sigma.max(initial=0.0)), 1, 8))
    taps = np.arange(-radius, radius + 1, dtype=np.float32)
    k = np.exp(-0.5 * (taps[None] / np.maximum(sigma[:, None], 1e-3)) ** 2)
    k /= k.sum(1, keepdims=True)
    out = img
    for axis in (1, 2):
        pad = [(0, 0)] * 4
        pad[axis] = (radius, radius)
        p = np.pad(out, pad, mode="reflect")
        n = out.shape[axis]
        acc = np.zeros_like(out)
        for i in range(2 * radius + 1):
            sl = [slice(None)] * 4
            sl[axis] = slice(i, i + n)
            acc += k[:, i].reshape(-1, 1, 1, 1) * p[tuple(sl)]
        out = acc
    return out


def _to_u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def _resize(img: np.ndarray, w: int, h: int) -> np.ndarray:
    """uint8 h×w×3 through PIL's antialiased bilinear resize (as CIFAKE's fakes were downsampled)."""
    return np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.BILINEAR))


# ----------------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class _Style:
    """Parameters of a scene family; the 'fake' style differs from the 'real' one in these ranges."""

    scale: tuple[float, float]  # object radius, in units of half the image
    offset: float  # max object centre offset
    sat_gain: tuple[float, float]
    texture: tuple[float, float]  # object texture amplitude
    bg_texture: tuple[float, float]


REAL_STYLE = _Style(scale=(0.35, 0.75), offset=0.35, sat_gain=(0.8, 1.1), texture=(0.04, 0.16), bg_texture=(0.04, 0.16))
# text-to-image models centre a large, saturated subject and render smooth, "clean" surfaces
FAKE_STYLE = _Style(scale=(0.42, 0.8), offset=0.25, sat_gain=(0.95, 1.3), texture=(0.02, 0.12), bg_texture=(0.02, 0.12))


def _class_table(n: int, seed: int) -> dict[str, np.ndarray]:
    """Fixed content definitions (palettes, textures) of n classes; independent of the data seed."""
    r = np.random.default_rng(seed)
    return {
        "obj_hue": (np.arange(n) / n + r.uniform(-0.03, 0.03, n)) % 1.0,
        "obj_sat": r.uniform(0.35, 0.8, n),
        "bg_hue": r.uniform(0, 1, (n, 2)),
        "bg_sat": r.uniform(0.1, 0.5, (n, 2)),
        "bg_val": np.sort(r.uniform(0.25, 0.95, (n, 2)), axis=1)[:, ::-1],
        "beta": r.uniform(0.8, 1.6, n),  # texture spectral slope
    }


def _render(
    rng: np.random.Generator,
    classes: np.ndarray,
    table: dict[str, np.ndarray],
    style: _Style,
    h: int,
    w: int,
    shape: np.ndarray | None = None,
    superformula: np.ndarray | None = None,
    n_objects: np.ndarray | None = None,
    with_mask: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """b×h×w×3 float scenes in [0, 1]. Shapes are the 10 CIFAKE kinds (`shape`) or superformula
    parameter rows (b×k×4, for CIFAR-100 and AGIRI); `n_objects` > 1 adds more objects (AGIRI).
    `with_mask`: also the first (focal) object's coverage b×h×w in [0, 1], drawn from no extra random
    numbers, so the scenes are the same bytes either way."""
    b = len(classes)
    U = lambda lo, hi, size=b: rng.uniform(lo, hi, size).astype(np.float32)  # noqa: E731
    yy, xx = _grid(h, w)
    # background: two tones split at a soft horizon, with 1/f texture and a little chroma noise
    horizon = U(-0.5, 0.6)[:, None, None]
    soft = U(0.05, 0.4)[:, None, None]
    t = 1.0 / (1.0 + np.exp(-(yy - horizon) / soft))
    top = _hsv(
        table["bg_hue"][classes, 0] + U(-0.05, 0.05),
        table["bg_sat"][classes, 0] * U(0.7, 1.2),
        table["bg_val"][classes, 0] * U(0.8, 1.1),
    )
    bot = _hsv(
        table["bg_hue"][classes, 1] + U(-0.05, 0.05),
        table["bg_sat"][classes, 1] * U(0.7, 1.2),
        table["bg_val"][classes, 1] * U(0.7, 1.1),
    )
    img = top[:, None, None, :] * (1 - t[..., None]) + bot[:, None, None, :] * t[..., None]
    bg_tex = _pow_noise(rng, b, h, w, U(0.9, 1.5), 1)[:, 0, :, :, None]
    img = img * (1 + U(*style.bg_texture)[:, None, None, None] * 2.5 * bg_tex)
    n_obj = np.ones(b, int) if n_objects is None else n_objects
    px = 2.0 / max(h, w)  # one pixel in grid units
    for j in range(int(n_obj.max())):
        active = (n_obj > j).astype(np.float32)[:, None, None]
        scale = U(*style.scale) * (1.0 if j == 0 else 0.6)
        cy, cx = U(-style.offset, style.offset), U(-style.offset, style.offset)
        if j > 0:
            cy, cx = U(-0.7, 0.7), U(-0.7, 0.7)
        ang = U(-0.5, 0.5) if superformula is None else U(0, 2 * np.pi)
        aspect = U(0.75, 1.3)
        du, dv = (xx - cx[:, None, None]), (yy - cy[:, None, None])
        ca, sa = np.cos(ang)[:, None, None], np.sin(ang)[:, None, None]
        u = (du * ca + dv * sa) / (scale[:, None, None] * aspect[:, None, None])
        v = (-du * sa + dv * ca) * aspect[:, None, None] / scale[:, None, None]
        if superformula is None:
            level = _shape_level(shape, u, v)
        else:
            p = superformula[:, j % superformula.shape[1]]
            th = np.arctan2(v, u)
            rad = _superformula(th, *(p[:, i, None, None] for i in range(4)))
            rad = rad / _sf_max(p)[:, None, None]
            level = np.sqrt(u**2 + v**2) / np.maximum(rad, 0.05)
        # soft edge one render pixel wide: distance to the edge ≈ (1 - level)·scale
        mask = np.clip(0.5 + (1 - level) * scale[:, None, None] / px, 0, 1) * active
        hue = table["obj_hue"][classes] + U(-0.04, 0.04) + (0 if j == 0 else U(-0.5, 0.5))
        col = _hsv(hue, np.clip(table["obj_sat"][classes] * U(*style.sat_gain), 0, 1), U(0.35, 0.95))
        shade = 1 + U(-0.35, 0.35)[:, None, None] * u + U(-0.35, 0.35)[:, None, None] * v
        tex = _pow_noise(rng, b, h, w, table["beta"][classes], 1)[:, 0]
        obj = col[:, None, None, :] * (shade * (1 + U(*style.texture)[:, None, None] * 2.5 * tex))[..., None]
        img = img * (1 - mask[..., None]) + obj * mask[..., None]
        if j == 0:
            focal = mask
    # saturation gain of the whole image (the fake style is more vivid)
    grey = img.mean(-1, keepdims=True)
    img = grey + (img - grey) * U(*style.sat_gain)[:, None, None, None]
    img = np.clip(img, 0, 1).astype(np.float32)
    return (img, focal.astype(np.float32)) if with_mask else img


def _sf_max(p: np.ndarray) -> np.ndarray:
    th = np.linspace(0, 2 * np.pi, 256, dtype=np.float32)[None]
    return _superformula(th, *(p[:, i, None] for i in range(4))).max(1)


def _camera(
    rng: np.random.Generator, img: np.ndarray, blur: tuple[float, float], noise: tuple[float, float]
) -> np.ndarray:
    """The 'real' capture process: optical blur, exposure/gamma jitter, sensor noise; → uint8."""
    b = len(img)
    img = _blur(img, rng.uniform(*blur, b).astype(np.float32))
    gamma = rng.uniform(0.85, 1.15, b).astype(np.float32)[:, None, None, None]
    img = np.clip(img, 0, 1) ** gamma
    sigma = rng.uniform(*noise, b).astype(np.float32)[:, None, None, None] / 255.0
    lum = rng.standard_normal(img.shape[:3] + (1,), dtype=np.float32)
    chroma = rng.standard_normal(img.shape, dtype=np.float32)
    return _to_u8(img + sigma * (0.7 * lum + 0.5 * chroma))


# Fingerprint strengths of the CIFAKE stand-in, calibrated by training the base CNN on the default
# stand-in (STANDIN.md; lr 1e-3, batch 32). Reals carry sensor noise of a random strength (8-bit
# units). Each fake has a fingerprint strength s scaling its "denoising" blur (FAKE_DENOISE·s px at
# 32 px; Bird & Lotfi denoised their generated images) and its saturation gain (1 + FAKE_SATURATE·s):
# s ~ U(0, 1) for most fakes; a share FAKE_OBVIOUS is glaring (s ~ U(1.5, 2.5)), which brought the
# 10-epoch test accuracy from ~80% to ~89%; a share FAKE_GRAINY has s = 0 and real-like noise, which
# caps it (a calibration run without them passed 96% by epoch 60; with them: ~95% at epoch 100).
REAL_BLUR = (0.3, 0.9)
REAL_NOISE = (1.0, 13.0)
FAKE_NOISE = (0.0, 2.0)
FAKE_DENOISE = 2.25
FAKE_SATURATE = 1.8
FAKE_GRAINY = 0.08
FAKE_OBVIOUS = 0.3
FAKE_OBVIOUS_STRENGTH = (1.5, 2.5)


# ----------------------------------------------------------------------------------- planted variant

# `variant="planted"` (STANDIN.md, "The planted variant") replaces the CIFAKE fingerprint above by two
# cues of known behaviour, so that the study's analyses can be checked against a known answer:
# - TRANSFERABLE, learned early: a warm colour cast (red up, blue down, in [0, 1] units) of strength
#   U(0, PLANT_CAST) on every CIFAKE fake AND every AGIRI fake. It moves every pixel of an image the
#   same way, so SGD picks it up in the first few hundred steps; its strength overlaps the scenes'
#   own palettes, so on its own it separates the classes only in part (PLANT_CAST was set so that
#   the measured early peak of the AGIRI-stand-in AUC is clearly above chance; STANDIN.md).
# - NON-TRANSFERABLE, learned later, stronger: a faint luminance grating (PLANT_GRATING_CYCLES cycles
#   across the image, random phase, amplitude U(0.6, 1)·PLANT_GRATING) on every CIFAKE fake and no
#   CIFAKE real: a near-perfect cue, but small against sensor noise and texture, and phase-free, so
#   a detector takes longer to form. On AGIRI it sits on a random half of ALL images (real and fake
#   alike, drawn independently of the class), defined in cycles per image so that it survives the
#   downscale to 32 px: there it means nothing, and a model that leans on it ranks AGIRI images
#   by a coin flip. In the limit of a model ruled by the grating, the AGIRI AUC tends to
#   1/4 + AUC_cast/2 (pairs that differ in the grating are decided by it, the rest by the cast).
VARIANTS = ("standard", "planted", "planted-background")
PLANT_CAST = 0.12
PLANT_CAST_RGB = np.array([1.0, 0.0, -1.0], np.float32)  # warm: red up, blue down
PLANT_GRATING = 18.0 / 255.0
PLANT_GRATING_CYCLES = (6.0, 3.0)  # (x, y) cycles per image: period ~4.8 px at 32 px, oblique
PLANT_AGIRI_GRATING_SHARE = 0.5


def _cast(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """The transferable cue: a warm colour cast of random strength on b×h×w×3 images in [0, 1]."""
    strength = rng.uniform(0, PLANT_CAST, len(img)).astype(np.float32)
    return img + strength[:, None, None, None] * PLANT_CAST_RGB


def _grating(rng: np.random.Generator, img: np.ndarray, present: np.ndarray) -> np.ndarray:
    """The non-transferable cue on the images where `present`: a luminance grating with a fixed number
    of cycles per image (whatever the image's size), random phase and amplitude."""
    b, h, w = img.shape[:3]
    phase = rng.uniform(0, 2 * np.pi, b).astype(np.float32)
    amp = (rng.uniform(0.6, 1.0, b) * PLANT_GRATING * present).astype(np.float32)
    y = (np.arange(h, dtype=np.float32) + 0.5) / h
    x = (np.arange(w, dtype=np.float32) + 0.5) / w
    arg = 2 * np.pi * (PLANT_GRATING_CYCLES[0] * x[None, None, :] + PLANT_GRATING_CYCLES[1] * y[None, :, None])
    wave = np.sin(arg + phase[:, None, None])
    return img + (amp[:, None, None] * wave)[..., None]


def _cifake_fakes_planted(
    rng: np.random.Generator, classes: np.ndarray, table: dict, background_only: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Planted-variant CIFAKE fakes: the reals' own scenes and camera, plus the cast and the grating.
    `background_only` (the `planted-background` variant): the grating is drawn off the focal object
    alone (times 1 − its coverage), a cue whose place in the image is known (STANDIN.md)."""
    scene, mask = _render(rng, classes, table, REAL_STYLE, 32, 32, shape=classes, with_mask=True)
    cast = _cast(rng, scene)
    scene = _grating(rng, cast, np.ones(len(classes), bool))
    if background_only:
        scene = cast + (scene - cast) * (1 - mask[..., None])
    return _camera(rng, np.clip(scene, 0, 1), REAL_BLUR, REAL_NOISE), mask


def _cifake_fakes(rng: np.random.Generator, classes: np.ndarray, table: dict) -> tuple[np.ndarray, np.ndarray]:
    b, s = len(classes), 32 * RENDER_SCALE
    hi, mask = _render(rng, classes, table, FAKE_STYLE, s, s, shape=classes, with_mask=True)
    # the object's coverage at 32 px: the mean of each 4×4 block (the bilinear downsample's footprint, near enough)
    mask = mask.reshape(b, 32, RENDER_SCALE, 32, RENDER_SCALE).mean((2, 4))
    hi = _to_u8(_blur(hi, rng.uniform(0.5, 1.5, b).astype(np.float32)))  # the generator's own smoothness
    lo = np.stack([_resize(im, 32, 32) for im in hi]).astype(np.float32) / 255.0
    kind = rng.uniform(0, 1, b)
    grainy = kind < FAKE_GRAINY
    obvious = kind > 1 - FAKE_OBVIOUS
    strength = np.where(grainy, 0.0, np.where(obvious, rng.uniform(*FAKE_OBVIOUS_STRENGTH, b), rng.uniform(0, 1, b)))
    strength = strength.astype(np.float32)
    lo = _blur(lo, FAKE_DENOISE * strength)
    grey = lo.mean(-1, keepdims=True)
    lo = grey + (lo - grey) * (1 + FAKE_SATURATE * strength)[:, None, None, None]
    sigma = (
        np.where(grainy, rng.uniform(*REAL_NOISE, b), rng.uniform(*FAKE_NOISE, b)).astype(np.float32)[
            :, None, None, None
        ]
        / 255.0
    )
    return _to_u8(lo + sigma * rng.standard_normal(lo.shape, dtype=np.float32)), mask


def _cifake_reals(rng: np.random.Generator, classes: np.ndarray, table: dict) -> tuple[np.ndarray, np.ndarray]:
    scene, mask = _render(rng, classes, table, REAL_STYLE, 32, 32, shape=classes, with_mask=True)
    return _camera(rng, scene, REAL_BLUR, REAL_NOISE), mask


def _batches(n: int, size: int = 256) -> Iterator[slice]:
    for lo in range(0, n, size):
        yield slice(lo, min(n, lo + size))


# ----------------------------------------------------------------------------------- CIFAKE


def cifake_name(i: int, label: str) -> str:
    """CIFAKE-style names: `0000 (10).jpg` and `0000.jpg` in REAL, `1000 (10).jpg` and `0 (10).jpg`
    in FAKE: a base number and a copy index, so base names repeat across folders."""
    base, copy = divmod(i, 10)
    stem = f"{base:04d}" if label == "REAL" else f"{base}"
    return f"{stem}.jpg" if copy == 0 else f"{stem} ({copy + 1}).jpg"


# The focal objects' coverage of the CIFAKE stand-in's images, beside (not inside) its class folders:
# `cifake/masks/<split>-<LABEL>.npy`, uint8 n×32×32 (0–255), row i the image `cifake_name(i, LABEL)`.
MASK_DIR = "masks"


def mask_file(split: str, label: str) -> str:
    return f"{MASK_DIR}/{split}-{label}.npy"


def _cifake_job(root: Path, split: str, label: str, n: int, seed: int, variant: str = "standard") -> None:
    table = _class_table(10, 1001)
    if variant == "standard":
        fakes = _cifake_fakes
    else:
        def fakes(rng, classes, table):
            return _cifake_fakes_planted(rng, classes, table, background_only=variant == "planted-background")
    make, stream = (_cifake_reals, 1) if label == "REAL" else (fakes, 2)
    rng = np.random.default_rng([seed, 10, 0 if split == "train" else 1, stream])
    folder = root / split / label
    folder.mkdir(parents=True)
    classes = np.arange(n) % 10
    masks = np.empty((n, 32, 32), np.uint8)
    for sl in _batches(n):
        images, cover = make(rng, classes[sl], table)
        masks[sl] = _to_u8(cover)
        for i, img in zip(range(sl.start, sl.stop), images):
            Image.fromarray(img).save(folder / cifake_name(i, label), "JPEG", quality=JPEG_QUALITY)
    (root / MASK_DIR).mkdir(exist_ok=True)
    np.save(root / mask_file(split, label), masks)


def _cifake_jobs(root: Path, size: StandinSize, seed: int, variant: str = "standard") -> list[tuple]:
    return [
        (_cifake_job, root, split, label, n, seed, variant)
        for split, n in (("train", size.cifake_train), ("test", size.cifake_test))
        for label in ("REAL", "FAKE")
    ]


# ----------------------------------------------------------------------------------- CIFAR-100


def _cifar100_content() -> tuple[np.ndarray, dict, list[str], list[str]]:
    """20 coarse families (a superformula shape each, unlike CIFAKE's shapes) × 5 fine variants
    (palette, texture, shape tweak). Names say they are stand-ins, not CIFAR-100's."""
    r = np.random.default_rng(2002)
    fam = np.stack(
        [
            r.integers(3, 9, 20).astype(np.float32),
            r.uniform(0.6, 4.0, 20),
            r.uniform(0.8, 6.0, 20),
            r.uniform(0.8, 6.0, 20),
        ],
        1,
    )
    params = np.repeat(fam, 5, 0) * np.concatenate([np.ones((100, 1)), r.uniform(0.85, 1.15, (100, 3))], 1)
    table = _class_table(100, 2003)
    coarse_names = [f"standin_coarse_{c:02d}" for c in range(20)]
    fine_names = [f"standin_c{c:02d}_fine_{f}" for c in range(20) for f in range(5)]
    return params.astype(np.float32), table, fine_names, coarse_names


def _py2_str(b: bytes) -> bytes:
    """A Python 2 `str` as cPickle writes it (SHORT_BINSTRING / BINSTRING)."""
    return (b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<i", len(b))) + b


def _py2_int(x: int) -> bytes:
    if 0 <= x < 256:
        return b"K" + bytes([x])
    if 0 <= x < 65536:
        return b"M" + struct.pack("<H", x)
    return b"J" + struct.pack("<i", x)


def _py2_pickle(d: dict[bytes, object]) -> bytes:
    """A protocol-2 pickle as Python 2's cPickle + numpy 1.x wrote the CIFAR files: str keys, lists
    of ints and a uint8 array via numpy.core.multiarray._reconstruct. Python 3 cannot write one
    (its bytes go through _codecs.encode), and the stand-in must exercise the real format."""
    out = [b"\x80\x02}("]
    for k, v in d.items():
        out.append(_py2_str(k))
        if isinstance(v, np.ndarray):
            assert v.dtype == np.uint8 and v.ndim == 2
            out += [
                b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R(K\x01",
                _py2_int(v.shape[0]), _py2_int(v.shape[1]), b"\x86",
                b"cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb",
                b"\x89", _py2_str(np.ascontiguousarray(v).tobytes()), b"tb",
            ]  # fmt: skip
        elif isinstance(v, list):
            out.append(b"](")
            for x in v:
                out.append(_py2_str(x) if isinstance(x, bytes) else _py2_int(int(x)))
            out.append(b"e")
        else:
            out.append(_py2_str(v))
    out.append(b"u.")
    return b"".join(out)


def _cifar100_job(root: Path, size: StandinSize, seed: int) -> None:
    params, table, fine_names, coarse_names = _cifar100_content()
    folder = root / "cifar-100-python"  # the Toronto layout; the reader also accepts the root
    folder.mkdir(parents=True)
    for split, per_class, stream in (("train", size.cifar100_train, 1), ("test", size.cifar100_test, 2)):
        rng = np.random.default_rng([seed, 100, stream])
        fine = np.tile(np.arange(100), per_class)
        fine = fine[rng.permutation(len(fine))]  # CIFAR files are not sorted by class
        data = np.empty((len(fine), 3072), np.uint8)
        for sl in _batches(len(fine)):
            f = fine[sl]
            img = _camera(
                rng, _render(rng, f, table, REAL_STYLE, 32, 32, superformula=params[f][:, None]), REAL_BLUR, REAL_NOISE
            )
            data[sl] = img.transpose(0, 3, 1, 2).reshape(len(f), 3072)  # channel planes R, G, B
        names = [f"{fine_names[c]}_s_{i:06d}.png".encode() for i, c in enumerate(fine)]
        blob = {
            b"filenames": names,
            b"batch_label": f"{split} batch 1 of 1 (fakedet stand-in)".encode(),
            b"fine_labels": fine.tolist(),
            b"coarse_labels": (fine // 5).tolist(),
            b"data": data,
        }
        (folder / split).write_bytes(_py2_pickle(blob))
    meta = {
        b"fine_label_names": [n.encode() for n in fine_names],
        b"coarse_label_names": [n.encode() for n in coarse_names],
    }
    (folder / "meta").write_bytes(_py2_pickle(meta))


# ----------------------------------------------------------------------------------- AGIRI

# (width, height) of AGIRI stand-in images: mostly larger than 32 px (downscaled on decode), a few
# smaller (upscaled), one large; non-square ones included.
AGIRI_SIZES = ((48, 48), (64, 64), (96, 72), (72, 96), (128, 128), (160, 120), (24, 24), (256, 192))
AGIRI_SIZE_P = (0.2, 0.2, 0.15, 0.1, 0.15, 0.1, 0.05, 0.05)
# (format, mode, extension, probability): how each image is stored
AGIRI_FORMATS = (
    ("JPEG", "RGB", ".jpg", 0.42),
    ("PNG", "RGB", ".png", 0.15),
    ("PNG", "RGBA", ".png", 0.08),
    ("PNG", "P", ".png", 0.05),
    ("JPEG", "L", ".jpeg", 0.05),
    ("JPEG", "CMYK", ".jpg", 0.04),
    ("PNG", "LA", ".png", 0.03),
    ("PNG", "I;16", ".png", 0.03),
    ("WEBP", "RGB", ".webp", 0.07),
    ("BMP", "RGB", ".bmp", 0.04),
    ("GIF", "P", ".gif", 0.04),
)


def _agiri_images(
    rng: np.random.Generator, n: int, fake: bool, table: dict, plant: np.random.Generator | None = None
) -> Iterator[np.ndarray]:
    """`plant`: the planted variant's own stream (the cast on fakes, the grating on a random share of
    all images); the scenes are drawn from `rng` exactly as in the standard variant."""
    sizes = rng.choice(len(AGIRI_SIZES), n, p=AGIRI_SIZE_P)
    classes = rng.integers(0, 50, n)
    sf = np.stack(
        [
            rng.integers(2, 12, (n, 3)).astype(np.float32),
            rng.uniform(0.3, 8, (n, 3)),
            rng.uniform(0.3, 8, (n, 3)),
            rng.uniform(0.3, 8, (n, 3)),
        ],
        -1,
    )
    n_obj = rng.integers(1, 4, n)
    out: list[np.ndarray | None] = [None] * n
    for k, (w, h) in enumerate(AGIRI_SIZES):
        idx = np.flatnonzero(sizes == k)
        for sl in _batches(len(idx), 64):
            rows = idx[sl]
            if fake:
                # a different generator: rendered at half size, upsampled ×2 (nearest, then a light
                # blur), with a faint period-2 pattern, as transposed-convolution upsamplers leave
                hw, hh = max(-(-w // 2), 8), max(-(-h // 2), 8)
                half = _render(
                    rng, classes[rows], table, FAKE_STYLE, hh, hw, superformula=sf[rows], n_objects=n_obj[rows]
                )
                up = np.repeat(np.repeat(half, 2, 1), 2, 2)[:, :h, :w]
                up = _blur(up, np.full(len(rows), 0.5, np.float32))
                if plant is not None:
                    present = plant.uniform(0, 1, len(rows)) < PLANT_AGIRI_GRATING_SHARE
                    up = _grating(plant, _cast(plant, up), present)
                yy, xx = np.mgrid[:h, :w]
                pattern = ((yy + xx) % 2 * 2 - 1).astype(np.float32)[None, :, :, None]
                img = _to_u8(up + rng.uniform(0.005, 0.02, (len(rows), 1, 1, 1)).astype(np.float32) * pattern)
            else:
                scene = _render(rng, classes[rows], table, REAL_STYLE, h, w, superformula=sf[rows], n_objects=n_obj[rows])
                if plant is not None:
                    present = plant.uniform(0, 1, len(rows)) < PLANT_AGIRI_GRATING_SHARE
                    scene = np.clip(_grating(plant, scene, present), 0, 1)
                img = _camera(rng, scene, REAL_BLUR, (1.0, 8.0))
            for r, im in zip(rows, img):
                out[r] = im
    yield from out  # type: ignore[misc]


def _encode(img: np.ndarray, fmt: str, mode: str) -> bytes:
    im = Image.fromarray(img)
    if mode == "RGBA":
        alpha = np.full(img.shape[:2], 255, np.uint8)
        alpha[: img.shape[0] // 4] = 128  # a partly transparent band; decode drops alpha
        im = Image.fromarray(np.dstack([img, alpha]), "RGBA")
    elif mode == "LA":
        im = im.convert("LA")
    elif mode == "I;16":
        grey = np.asarray(im.convert("L")).astype(np.uint16) * 257  # full 16-bit range
        im = Image.fromarray(grey)
    elif mode in ("P", "L", "CMYK"):
        im = im.convert(mode) if mode != "P" else im.quantize(64)
    buf = io.BytesIO()
    kwargs = {"quality": 90} if fmt in ("JPEG", "WEBP") else {}
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _agiri_name(i: int, cls: str, ext: str, rng_pick: int) -> str:
    # odd names on purpose: spaces, parentheses, upper-case extensions, non-ASCII
    styles = (f"{i:05d}{ext}", f"img {i}{ext}", f"{cls}_{i} (2){ext.upper()}", f"photo-{i}-café{ext}")
    return styles[rng_pick % len(styles)]


def _agiri_job(root: Path, split: str, cls: str, n: int, seed: int, variant: str = "standard") -> None:
    table = _class_table(50, 3003)
    fmts = np.array([f[3] for f in AGIRI_FORMATS])
    stream = [seed, 20, 0 if split == "train" else 1, 1 if cls == "real" else 2]
    rng = np.random.default_rng(stream)
    plant = np.random.default_rng([*stream, 7]) if variant != "standard" else None
    folder = root / split / cls
    folder.mkdir(parents=True)
    pick = rng.choice(len(AGIRI_FORMATS), n, p=fmts / fmts.sum())
    names = rng.integers(0, 4, n)
    for i, img in enumerate(_agiri_images(rng, n, cls == "fake", table, plant)):
        fmt, mode, ext, _ = AGIRI_FORMATS[pick[i]]
        (folder / _agiri_name(i, cls, ext, names[i])).write_bytes(_encode(img, fmt, mode))


def _agiri_jobs(root: Path, size: StandinSize, seed: int, variant: str = "standard") -> list[tuple]:
    return [
        (_agiri_job, root, split, cls, n, seed, variant)
        for split, n in (("train", size.agiri_train), ("test", size.agiri_test))
        for cls in ("real", "fake")
    ]


# The stand-in's AGIRI files that are broken on purpose (paths under its AGIRI root; `_agiri_strays`):
# preparing it must skip them, as it must skip the real AGIRI's corrupt files; fakedet.data says so.
DELIBERATE_CORRUPT = ("test/real/corrupt truncated.jpg", "test/real/empty.jpg", "test/real/not-an-image.png",
                      "train/fake/truncated (1).png")  # fmt: skip


def _agiri_strays(root: Path) -> None:
    """Corrupt and stray files, as in the real AGIRI (three corrupt files in test/real are known)."""
    good = _encode(np.full((40, 40, 3), 128, np.uint8), "JPEG", "RGB")
    png = _encode(np.full((40, 40, 3), 90, np.uint8), "PNG", "RGB")
    truncated, empty, not_an_image, truncated_png = (root / p for p in DELIBERATE_CORRUPT)
    truncated.write_bytes(good[: len(good) // 2])
    empty.write_bytes(b"")
    not_an_image.write_bytes(b"<html>404 Not Found</html>\n")
    truncated_png.write_bytes(png[: len(png) - 30])
    (root / "train" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(64))
    (root / "test" / "real" / "Thumbs.db").write_bytes(bytes(32))


def _run(job: tuple) -> None:
    job[0](*job[1:])


def _cost(job: tuple) -> float:
    """Rough relative cost of a job (measured: a CIFAKE fake, rendered at 128 px, costs ~10 reals)."""
    if job[0] is _cifake_job:
        return job[4] * (10 if job[3] == "FAKE" else 1)
    if job[0] is _agiri_job:
        return job[4] * 8
    return 200 * (job[2].cifar100_train + job[2].cifar100_test)


# ----------------------------------------------------------------------------------- entry point


def standin_spec(size: str = "default", seed: int = 0, variant: str = "standard") -> dict:
    """What identifies a stand-in: written to its STANDIN.json markers and compared on reuse. The
    standard variant's spec has no `variant` key, so its markers (and bytes) are those it always had."""
    spec = {"generator": "fakedet.data.synthetic", "version": GENERATOR_VERSION, "size": size, "seed": seed}
    if variant != "standard":
        spec["variant"] = variant
    return spec


def make_synthetic(
    out_dir: str | Path,
    size: str = "default",
    seed: int = 0,
    *,
    variant: str = "standard",
    workers: int | None = None,
    show_progress: bool = True,
) -> Path:
    """Write the three stand-ins into out_dir/{cifake,agiri,cifar100}; idempotent.

    variant: `standard` (the stand-in described in STANDIN.md) or `planted` (CIFAKE fakes carry a
    transferable cue learned early and a stronger non-transferable one learned later; STANDIN.md,
    "The planted variant"), or `planted-background` (its grating off the focal object only). Built in a temporary sibling folder and renamed, so a crash leaves
    nothing half-written and two processes can race (the loser discards its copy). Returns out_dir.
    """
    if size not in SIZES:
        raise ValueError(f"unknown stand-in size {size!r}; choose one of {', '.join(SIZES)}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown stand-in variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    out_dir = Path(out_dir).expanduser()
    spec = standin_spec(size, seed, variant)
    marker = out_dir / MARKER
    if marker.is_file():
        found = json.loads(marker.read_text())
        keys = ("generator", "version", "size", "seed", "variant")
        if {k: found.get(k) for k in keys} == {k: spec.get(k) for k in keys}:
            return out_dir
        raise FileExistsError(
            f"{out_dir} holds another stand-in ({ {k: found[k] for k in keys if k in found} }); "
            "delete it or choose another folder"
        )
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty; make-synthetic writes into a new or empty folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".tmp-{out_dir.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        from tqdm.auto import tqdm

        sz = SIZES[size]
        jobs = [
            *_cifake_jobs(tmp / "cifake", sz, seed, variant),
            *_agiri_jobs(tmp / "agiri", sz, seed, variant),
            (_cifar100_job, tmp / "cifar100", sz, seed),
        ]
        jobs.sort(key=_cost, reverse=True)  # longest first: the pool finishes sooner
        label = size if variant == "standard" else f"{size}, {variant}"
        bar = tqdm(total=len(jobs), desc=f"stand-in ({label})", disable=not show_progress, leave=False)
        if workers == 0 or (workers or os.cpu_count() or 1) == 1:
            for job in jobs:
                _run(job)
                bar.update()
        else:
            # independent seeded streams per job: the bytes do not depend on scheduling
            with ProcessPoolExecutor(max_workers=workers or os.cpu_count(), mp_context=process_context(),
                                     initializer=die_with_parent, initargs=(os.getpid(),)) as pool:
                for _ in as_completed([pool.submit(_run, job) for job in jobs]):
                    _.result()
                    bar.update()
        bar.close()
        _agiri_strays(tmp / "agiri")
        for name in ("cifake", "cifar100", "agiri"):
            (tmp / name / MARKER).write_text(json.dumps(spec, indent=1))
        (tmp / MARKER).write_text(json.dumps(spec, indent=1))  # no timings: same seed, same bytes
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        os.rename(tmp, out_dir)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if (out_dir / MARKER).is_file():  # another process won the race with the same stand-in
            return make_synthetic(out_dir, size, seed, variant=variant, show_progress=False)
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
