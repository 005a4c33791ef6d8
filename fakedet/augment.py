"""Training-time augmentation, batched on the device: Wang et al.'s (2020, CVPR, "CNN-generated images are
surprisingly easy to spot... for now") Gaussian blur and JPEG re-encoding.

`augment_batch` takes a batch of uint8 N×H×W×3 images where training runs and returns the augmented batch
in the same form, so the steppers normalise it as any batch. Each image is blurred with probability p
(sigma ~ U(`augment_sigma`)), then re-encoded as JPEG with probability p (quality ~ U{`augment_quality`}),
as Wang et al. apply them. No per-image Python: the blur is one grouped separable convolution with a
kernel per image; JPEG is a batched torch codec (`jpeg_roundtrip`): JFIF YCbCr, 4:2:0 chroma by 2×2
means, an orthonormal 8×8 DCT as one 64×64 matrix product per plane, the IJG tables scaled by each image's quality
(libjpeg's `jpeg_quality_scaling`, baseline: at most 255), rounding to the nearest step, then libjpeg's
"fancy" (triangular) chroma upsampling on decoding. It matches PIL (libjpeg) on the same images to
within the tolerance stated and tested in tests/test_augment.py; it is not bit-exact (libjpeg's integer
DCT rounds otherwise).

Every random draw comes from (seed, epoch, step in the epoch) alone (`draws`), so a resumed run and a
prefix-shared one augment every batch exactly as an uninterrupted run does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fakedet.config import TrainConfig
from fakedet.data.jpeg import CHROMA_TABLE, LUMA_TABLE
from fakedet.preprocess import to_device

# JFIF's full-range YCbCr (ITU-R BT.601 coefficients), as libjpeg converts
RGB_TO_YCBCR = ((0.299, 0.587, 0.114), (-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))
YCBCR_TO_RGB = ((1.0, 0.0, 1.402), (1.0, -0.344136, -0.714136), (1.0, 1.772, 0.0))


def quality_tables(quality: torch.Tensor) -> torch.Tensor:
    """The luma and chroma tables (N, 2, 8, 8) for IJG qualities `quality` (N,), as libjpeg's
    `jpeg_set_quality(..., force_baseline=TRUE)` scales them: 5000/q below 50, 200 − 2q from 50, each entry
    (T·scale + 50) // 100 clamped to [1, 255]."""
    q = quality.to(torch.int64).clamp(1, 100)
    scale = torch.where(q < 50, 5000 // q, 200 - 2 * q)
    base = torch.tensor((LUMA_TABLE, CHROMA_TABLE), dtype=torch.int64, device=q.device).reshape(1, 2, 8, 8)
    return ((base * scale.reshape(-1, 1, 1, 1) + 50) // 100).clamp(1, 255).to(torch.float32)


def _dct_basis(device: torch.device) -> torch.Tensor:
    """The orthonormal 8×8 DCT-II as one (64, 64) matrix on row-major blocks: coefficients = block @ basis.

    kron(D, D).T of the 8-point matrix D (coefficients = D @ block @ D.T), so each plane's blocks transform
    in one matrix product (on the CPU 10-20 times faster than two broadcast 8×8 products per block)."""
    k = torch.arange(8, dtype=torch.float64)
    d = torch.cos((2 * k[None, :] + 1) * k[:, None] * math.pi / 16) * math.sqrt(2 / 8)
    d[0] /= math.sqrt(2)
    return torch.kron(d, d).T.to(torch.float32).to(device)


def _blocks(plane: torch.Tensor) -> torch.Tensor:
    """(N, H, W) → (N, H/8 · W/8, 64): each 8×8 block row-major."""
    n, h, w = plane.shape
    return plane.reshape(n, h // 8, 8, w // 8, 8).transpose(2, 3).reshape(n, -1, 64)


def _unblocks(blocks: torch.Tensor, h: int, w: int) -> torch.Tensor:
    n = blocks.shape[0]
    return blocks.reshape(n, h // 8, w // 8, 8, 8).transpose(2, 3).reshape(n, h, w)


def _code(plane: torch.Tensor, table: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """One plane (N, H, W) in 0..255 through level shift, DCT, quantisation by `table` (N, 8, 8), and back."""
    steps = table.reshape(-1, 1, 64)
    coefficients = torch.round((_blocks(plane - 128.0) @ basis) / steps) * steps
    return _unblocks(coefficients @ basis.T, *plane.shape[1:]) + 128.0


def _mix(planes: tuple[torch.Tensor, ...], matrix: tuple[tuple[float, ...], ...], offsets: tuple[float, ...]) -> list[torch.Tensor]:
    """Three planes mixed by a 3×3 colour matrix, plus offsets: elementwise (a (…, 3) @ (3, 3) product is
    several times slower on the CPU)."""
    return [sum(c * p for c, p in zip(row, planes) if c) + o for row, o in zip(matrix, offsets)]


def _sample(x: torch.Tensor) -> torch.Tensor:
    """Values rounded to libjpeg's 8-bit samples."""
    return torch.round(x).clamp_(0, 255)


def _upsample_fancy(plane: torch.Tensor) -> torch.Tensor:
    """(N, h, w) → (N, 2h, 2w) by libjpeg's h2v2 "fancy" upsampling: along each axis an output sample is
    3/4 of its nearest input sample and 1/4 of the next nearest (edges repeated)."""

    def along_last(x: torch.Tensor) -> torch.Tensor:
        padded = torch.cat((x[..., :1], x, x[..., -1:]), dim=-1)
        even = 0.75 * x + 0.25 * padded[..., :-2]
        odd = 0.75 * x + 0.25 * padded[..., 2:]
        return torch.stack((even, odd), dim=-1).flatten(-2)

    return along_last(along_last(plane).transpose(1, 2)).transpose(1, 2)


def jpeg_roundtrip(images: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) images encoded as baseline JPEG at `quality` (N,) with 4:2:0 chroma and decoded,
    as uint8 (N, H, W, 3). H and W are padded to multiples of 16 by repeating the edge (as libjpeg pads a
    partial MCU) and the result cropped back."""
    n, h, w, _ = images.shape
    if n == 0:
        return images.clone()
    device = images.device
    x = images.to(torch.float32)
    ph, pw = -h % 16, -w % 16
    if ph or pw:
        x = F.pad(x.permute(0, 3, 1, 2), (0, pw, 0, ph), mode="replicate").permute(0, 2, 3, 1)
    # libjpeg's pipeline is integer between its stages: samples are rounded (and clamped to 0..255) after
    # the colour conversion, the chroma downsampling and the inverse DCT
    y, cb, cr = (_sample(p) for p in _mix(x.unbind(-1), RGB_TO_YCBCR, (0.0, 128.0, 128.0)))
    tables, basis = quality_tables(quality.to(device)), _dct_basis(device)
    luma = _sample(_code(y, tables[:, 0], basis))
    chroma = [_sample(F.avg_pool2d(p.unsqueeze(1), 2).squeeze(1)) for p in (cb, cr)]  # 2×2 means
    cb, cr = (_upsample_fancy(_sample(_code(p, tables[:, 1], basis))) for p in chroma)
    rgb = torch.stack(_mix((luma, cb - 128.0, cr - 128.0), YCBCR_TO_RGB, (0.0, 0.0, 0.0)), dim=-1)
    return torch.round(rgb[:, :h, :w]).clamp_(0, 255).to(torch.uint8)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """uint8 (N, H, W, 3) images each blurred by a Gaussian of its own `sigma` (N,) pixels, truncated at
    `radius` pixels (kernel 2·radius + 1 taps, normalised to sum 1; sigma 0 is the identity), edges
    mirrored (scipy's and PIL's `reflect`-type padding); one grouped convolution per axis. uint8 out."""
    n, h, w, _ = images.shape
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=images.device)
    s = sigma.to(torch.float32).reshape(-1, 1)
    weights = torch.where(s > 0, torch.exp(-0.5 * (offsets / s.clamp_min(1e-6)) ** 2), (offsets == 0).to(torch.float32))
    weights = (weights / weights.sum(1, keepdim=True)).repeat_interleave(3, dim=0)  # (3N, taps): one per channel
    x = images.permute(0, 3, 1, 2).reshape(1, n * 3, h, w).to(torch.float32)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), weights.reshape(n * 3, 1, 1, -1), groups=n * 3)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), weights.reshape(n * 3, 1, -1, 1), groups=n * 3)
    return torch.round(x.reshape(n, 3, h, w).permute(0, 2, 3, 1)).clamp_(0, 255).to(torch.uint8)


@dataclass(frozen=True)
class Draws:
    """One batch's random choices, one entry per image (all on the device)."""

    blur: torch.Tensor
    """bool (N,): blurred."""
    sigma: torch.Tensor
    """float32 (N,): the blur's sigma in pixels."""
    jpeg: torch.Tensor
    """bool (N,): re-encoded."""
    quality: torch.Tensor
    """int64 (N,): the JPEG quality."""


def draws(cfg: TrainConfig, epoch: int, step: int, n: int, device: torch.device) -> Draws:
    """The choices for the `n` images of batch `step` of `epoch` of a run with `cfg`'s seed: from
    (seed, epoch, step) alone, never from a global generator, so a resumed run draws what the
    uninterrupted one drew. Drawn on the host (a few numbers) and copied without making it wait."""
    rng = np.random.default_rng([cfg.seed, 0xA06, epoch, step])  # 0xA06: apart from the shuffle's streams
    p = cfg.augment_p
    blur = rng.random(n) < p
    sigma = rng.uniform(*cfg.augment_sigma, size=n).astype(np.float32)
    jpeg = rng.random(n) < p
    low, high = cfg.augment_quality
    quality = rng.integers(low, high + 1, size=n)
    packed = to_device(np.stack((blur, sigma, jpeg, quality)).astype(np.float32), device)  # one copy
    return Draws(packed[0] > 0.5, packed[1], packed[2] > 0.5, packed[3].to(torch.int64))


def blur_radius(cfg: TrainConfig) -> int:
    """Taps either side of the blur kernel: 3 sigma of the widest blur (at least 1), as scipy's 4 sigma
    nearly is (the tail beyond 3 sigma holds 0.3% of the weight)."""
    return max(1, math.ceil(3 * cfg.augment_sigma[1]))


def augment_batch(images: torch.Tensor, cfg: TrainConfig, epoch: int, step: int) -> torch.Tensor:
    """A batch of uint8 (N, H, W, 3) images (on the training device) augmented as `cfg.augment` says, for
    batch `step` of `epoch`: the images themselves under `none`."""
    if cfg.augment == "none":
        return images
    return _apply(images, draws(cfg, epoch, step, len(images), images.device), cfg)


def _apply(images: torch.Tensor, d: Draws, cfg: TrainConfig) -> torch.Tensor:
    if cfg.augment != "blur_jpeg":
        raise ValueError(f"unknown augmentation {cfg.augment!r}")
    images = torch.where(d.blur.reshape(-1, 1, 1, 1), gaussian_blur(images, d.sigma, blur_radius(cfg)), images)
    return torch.where(d.jpeg.reshape(-1, 1, 1, 1), jpeg_roundtrip(images, d.quality), images)


def augment_rows(images: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor, cfgs: list[TrainConfig], epoch: int,
                 step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training loop's hook: K models' batches (row k of `idx` (K, B) indexes `images` and `labels`)
    gathered and augmented, as (images (K·B, ...), labels (K·B,), an index (K, B) into them), the form
    every stepper takes. Row k's draws are `draws(cfgs[k], ...)`: a model in a bundle augments its batch
    as it would alone. The configs share the augmentation settings (`fakedet.bundle.SHARED_FIELDS`)."""
    flat = idx.reshape(-1)
    k, b = idx.shape
    d = [draws(cfg, epoch, step, b, images.device) for cfg in cfgs]
    joined = Draws(*(torch.cat([getattr(x, f) for x in d]) for f in ("blur", "sigma", "jpeg", "quality")))
    batch = _apply(images[flat], joined, cfgs[0])
    return batch, labels[flat], torch.arange(k * b, device=idx.device).reshape(k, b)
