"""JPEG settings of the study's data: CIFAKE's encoder quality, estimated, and the round trip that
gives CIFAR-100 test the same compression (cifar100_test_jpeg)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from fakedet.data.decode import DecodeOptions
from fakedet.data.files import read_bounded

DEFAULT_QUALITY = 75  # Pillow's default
TRIED_FILES = 8  # files tried in turn when estimating a folder's quality, should the first not be a JPEG

# ITU T.81 Annex K (the IJG tables libjpeg and PIL start from), row-major over (v, u); libjpeg scales them by
# 5000/q (q < 50) or 200 - 2q
LUMA_TABLE = (
    16, 11, 10, 16, 24, 40, 51, 61,
    12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77,
    24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101,
    72, 92, 95, 98, 112, 100, 103, 99,
)  # fmt: skip
CHROMA_TABLE = (
    17, 18, 24, 47, 99, 99, 99, 99,
    18, 21, 26, 66, 99, 99, 99, 99,
    24, 26, 56, 99, 99, 99, 99, 99,
    47, 66, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99,
)  # fmt: skip


def estimate_jpeg_quality(path: Path) -> int | None:
    """The IJG quality whose luminance table best matches this JPEG's (None if not a readable JPEG)."""
    try:
        data = read_bounded(path, DecodeOptions.max_file_bytes)
        with Image.open(io.BytesIO(data)) as im:
            table = np.array(im.quantization[0])  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - an estimate only (Unreadable, not a JPEG, no tables)
        return None
    qs = np.arange(1, 101)
    scale = np.where(qs < 50, 5000 // qs, 200 - 2 * qs)
    tables = np.clip((np.asarray(LUMA_TABLE)[None] * scale[:, None] + 50) // 100, 1, 255)
    # sums are order-free: Pillow versions differ on zigzag vs natural order
    return int(qs[np.argmin(np.abs(tables.sum(1) - table.sum()))])


def folder_jpeg_quality(folder: Path) -> int | None:
    """The estimated quality of the first JPEG file (by name) in `folder` that can be read."""
    names = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    return next((q for p in names[:TRIED_FILES] if (q := estimate_jpeg_quality(p)) is not None), None)


def jpeg_round_trip(images: np.ndarray, quality: int) -> np.ndarray:
    """Each uint8 N×32×32×3 image through one JPEG encode and decode (Pillow, 4:2:0 subsampling)."""
    out = np.empty(images.shape, np.uint8)
    for i, img in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(np.asarray(img)).save(buf, "JPEG", quality=quality)
        out[i] = np.asarray(Image.open(buf).convert("RGB"))
    return out
