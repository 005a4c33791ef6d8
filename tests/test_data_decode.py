"""Decoding any image file to 32×32 RGB: every mode, odd sizes and names, corrupt files, bombs."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fakedet.data.decode import (
    DecodeOptions,
    Skip,
    decode_files,
    decode_image,
    is_image_name,
    jpeg_buffered_mode,
)

OPTS = DecodeOptions()


def _save(path: Path, im: Image.Image, fmt: str, **kw) -> Path:
    im.save(path, fmt, **kw)
    return path


def _decode_one(path: Path, opts: DecodeOptions = OPTS) -> np.ndarray:
    return decode_image(path.read_bytes(), opts)


# (name, image, format, expected RGB of the uniform image, tolerance)
MODES = [
    ("1", lambda: Image.new("1", (40, 40), 1), "PNG", (255, 255, 255), 0),
    ("L", lambda: Image.new("L", (40, 40), 100), "PNG", (100, 100, 100), 0),
    ("L-jpeg", lambda: Image.new("L", (40, 40), 100), "JPEG", (100, 100, 100), 2),
    ("LA", lambda: Image.new("LA", (40, 40), (100, 50)), "PNG", (100, 100, 100), 0),
    ("P", lambda: Image.new("RGB", (40, 40), (200, 10, 10)).quantize(8), "PNG", (200, 10, 10), 3),
    ("P-gif", lambda: Image.new("RGB", (40, 40), (10, 200, 10)).quantize(8), "GIF", (10, 200, 10), 3),
    ("RGB", lambda: Image.new("RGB", (32, 32), (1, 2, 3)), "PNG", (1, 2, 3), 0),
    ("RGBA", lambda: Image.new("RGBA", (40, 40), (10, 20, 30, 0)), "PNG", (10, 20, 30), 0),
    ("RGBA-webp", lambda: Image.new("RGBA", (40, 40), (10, 20, 200, 128)), "WEBP", (10, 20, 200), 6),
    ("CMYK-jpeg", lambda: Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG", (255, 0, 0), 3),
    ("CMYK-tiff", lambda: Image.new("CMYK", (40, 40), (0, 0, 0, 0)), "TIFF", (255, 255, 255), 0),
    ("I;16", lambda: Image.fromarray(np.full((40, 40), 32768, np.uint16)), "PNG", (128, 128, 128), 0),
    ("I", lambda: Image.fromarray(np.full((40, 40), 65535, np.int32)), "TIFF", (255, 255, 255), 0),
    ("F", lambda: Image.fromarray(np.full((40, 40), 0.5, np.float32)), "TIFF", (128, 128, 128), 0),
    ("LAB", lambda: Image.new("LAB", (40, 40), (128, 128, 128)), "TIFF", (119, 119, 119), 2),
    ("YCbCr", lambda: Image.new("YCbCr", (40, 40), (128, 128, 128)), "TIFF", (128, 128, 128), 2),
]


@pytest.mark.parametrize("name,make,fmt,rgb,tol", MODES, ids=[m[0] for m in MODES])
def test_every_mode_becomes_rgb(tmp_path, name, make, fmt, rgb, tol):
    im = make()
    if name == "P":
        im.info["transparency"] = 0  # palette transparency takes the RGBA path
    path = _save(tmp_path / f"x.{fmt.lower()}", im, fmt)
    out = _decode_one(path)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    centre = out[8:24, 8:24].reshape(-1, 3).mean(0)
    assert np.abs(centre - np.array(rgb)).max() <= tol + 0.5, (name, centre)


def test_pillows_own_16bit_conversion_would_clip(tmp_path):
    # why _to_rgb handles I;16 itself: Pillow's convert("RGB") turns mid-grey 16-bit white
    im = Image.fromarray(np.full((4, 4), 32768, np.uint16))
    assert np.asarray(im.convert("RGB"))[0, 0, 0] == 255
    assert _decode_one(_save(tmp_path / "g.png", im, "PNG"))[0, 0, 0] == 128


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (40, 40), c).quantize(4) for c in ((250, 0, 0), (0, 0, 250))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert _decode_one(path)[16, 16, 0] > 200


@pytest.mark.parametrize("size", [(33, 32), (8, 8), (300, 40), (1000, 750)])
def test_resized_to_32(tmp_path, size):
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    out = _decode_one(_save(tmp_path / "r.png", im, "PNG"))
    assert out.shape == (32, 32, 3)
    expected = np.asarray(im.resize((32, 32), Image.Resampling.BILINEAR))
    assert np.array_equal(out, expected)


def test_resize_method_is_an_option(tmp_path):
    rng = np.random.default_rng(1)
    im = Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8))
    path = _save(tmp_path / "r.png", im, "PNG")
    bilinear = _decode_one(path)
    pil_default = _decode_one(path, DecodeOptions(resize="pil-default"))
    assert np.array_equal(pil_default, np.asarray(im.resize((32, 32))))  # the reference's call
    assert not np.array_equal(bilinear, pil_default)
    with pytest.raises(ValueError, match="unknown resize method 'cubic'"):
        DecodeOptions(resize="cubic")


def test_32px_images_are_not_resampled(tmp_path):
    arr = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert np.array_equal(_decode_one(_save(tmp_path / "e.png", Image.fromarray(arr), "PNG")), arr)


def _png_header_only(w: int, h: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")
    )


def test_decompression_bomb_refused_from_its_header():
    # a 50k×50k PNG of a few dozen bytes: refused before any pixel is allocated
    with pytest.raises(Skip, match=r"decompression-bomb guard: 50000×50000 = 2,500,000,000 px"):
        decode_image(_png_header_only(50_000, 50_000), OPTS)


def test_large_jpeg_decoded_in_draft_mode_not_refused(tmp_path):
    rng = np.random.default_rng(3)
    big = Image.fromarray(rng.integers(0, 256, (400, 400, 3), dtype=np.uint8))
    small_budget = DecodeOptions(max_pixels=10_000)  # 400×400 = 160k px: 16× over budget
    jpg = _save(tmp_path / "big.jpg", big, "JPEG")
    assert _decode_one(jpg, small_budget).shape == (32, 32, 3)  # draft: 1/4 scale = 100×100
    png = _save(tmp_path / "big.png", big, "PNG")
    with pytest.raises(Skip, match="only JPEG can be decoded at reduced size"):
        _decode_one(png, small_budget)


def _jpeg(progressive: bool = False, side: int = 64) -> bytes:
    buf = io.BytesIO()
    pixels = np.random.default_rng(6).integers(0, 256, (side, side, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, "JPEG", quality=90, progressive=progressive)
    return buf.getvalue()


def _declare_size(jpeg: bytes, w: int, h: int) -> bytes:
    """The same file with its frame header (SOF0 or SOF2) declaring w×h: the scan data stay small."""
    b = bytearray(jpeg)
    i = next(b.find(m) for m in (b"\xff\xc2", b"\xff\xc0") if b.find(m) >= 0)
    b[i + 5 : i + 9] = struct.pack(">HH", h, w)
    return bytes(b)


def _first_scan_one_component(jpeg: bytes) -> bytes:
    """A sequential JPEG whose first scan holds the luminance alone (non-interleaved), as multi-scan
    encoders write them: libjpeg then buffers the whole image too (jdinput.c, has_multiple_scans)."""
    b = bytearray(jpeg)
    i = b.find(b"\xff\xda")
    assert b[i + 4] == 3  # Ns: the scan held Y, Cb, Cr
    b[i + 2 : i + 5] = struct.pack(">HB", 8, 1)  # Ls = 6 + 2·Ns
    del b[i + 7 : i + 11]  # the Cb and Cr selectors
    return bytes(b)


def test_jpeg_buffered_mode_from_the_headers():
    assert jpeg_buffered_mode(_jpeg()) is None
    assert jpeg_buffered_mode(_jpeg(progressive=True)) == "progressive"
    assert jpeg_buffered_mode(_first_scan_one_component(_jpeg())) == "multi-scan"
    grey = io.BytesIO()
    Image.new("L", (40, 40), 7).save(grey, "JPEG")  # one component, one scan: sequential
    assert jpeg_buffered_mode(grey.getvalue()) is None


def test_progressive_jpeg_bomb_refused_at_its_full_size():
    # ~4 kB declaring 24000×24000: in draft mode libjpeg still allocates the full-size coefficient
    # buffers of a progressive (or multi-scan) file; measured before this guard: 1.7 GiB peak RSS
    for data, kind in ((_declare_size(_jpeg(True), 24_000, 24_000), "progressive"),
                       (_first_scan_one_component(_declare_size(_jpeg(), 24_000, 24_000)), "multi-scan")):  # fmt: skip
        assert len(data) < 10_000
        for opts in (OPTS, DecodeOptions(jpeg_draft=True)):
            with pytest.raises(Skip, match=rf"24000×24000 = 576,000,000 px exceeds max_pixels .*a {kind} JPEG"):
                decode_image(data, opts)


def test_progressive_jpeg_over_a_lowered_limit_is_skipped_baseline_drafted():
    small_budget = DecodeOptions(max_pixels=10_000)  # 400×400 = 160k px: 16× over budget
    assert decode_image(_jpeg(progressive=False, side=400), small_budget).shape == (32, 32, 3)  # draft 1/4
    with pytest.raises(Skip, match="a progressive JPEG"):
        decode_image(_jpeg(progressive=True, side=400), small_budget)
    # within the limit a progressive JPEG decodes as any other
    assert decode_image(_jpeg(progressive=True, side=96), small_budget).shape == (32, 32, 3)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [0, 2])
def test_special_files_are_skipped_with_reasons_not_opened(tmp_path, workers):
    from test_data_files import special_files

    expected = special_files(tmp_path)
    (tmp_path / "ok.jpg").write_bytes(_jpeg())
    names = sorted([*expected, "ok.jpg"])
    d = decode_files(tmp_path, names, OPTS, workers=workers, chunk_size=2, show_progress=False)
    skipped = {names[i]: why for i, why in d.skipped}
    assert set(skipped) == set(expected)
    for name, fragment in expected.items():
        assert fragment in skipped[name], (name, skipped[name])
    assert [names[i] for i in d.kept] == ["ok.jpg"]


def _tree(tmp_path: Path) -> tuple[Path, list[str], dict[str, str]]:
    """Files of every kind, with the reason expected for each one that must be skipped."""
    rng = np.random.default_rng(4)
    good = Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8))
    files: dict[str, bytes] = {}
    for name in ("0000 (10).jpg", "1000 (10).jpg", "0 (10).jpg", "café crème.JPG", "a.b.c.jpeg", "x" * 120 + ".png"):
        buf = __import__("io").BytesIO()
        good.save(buf, "PNG" if name.endswith(".png") else "JPEG")
        files[name] = buf.getvalue()
    jpeg = files["0000 (10).jpg"]
    files["truncated.jpg"] = jpeg[: len(jpeg) // 2]
    files["empty.png"] = b""
    files["html.jpg"] = b"<html>not found</html>"
    files["._0000 (10).jpg"] = b"\x00\x05\x16\x07" + bytes(60)  # macOS AppleDouble: image name, not an image
    expected = {
        "truncated.jpg": "truncated",
        "empty.png": "empty file",
        "html.jpg": "not an image",
        "._0000 (10).jpg": "not an image",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return tmp_path, sorted(files), expected


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_files_are_skipped_with_reasons_never_crash(tmp_path, workers):
    root, names, expected = _tree(tmp_path)
    d = decode_files(root, names, OPTS, workers=workers, chunk_size=3, show_progress=False)
    skipped = {names[i]: why for i, why in d.skipped}
    assert set(skipped) == set(expected)
    for name, fragment in expected.items():
        assert fragment in skipped[name], (name, skipped[name])
    kept = [names[i] for i in d.kept]
    assert len(d.images) == len(kept) == len(names) - len(expected)
    # output rows are the input order, whatever the parallelism
    for row, name in zip(d.images, kept):
        assert np.array_equal(row, _decode_one(root / name))
    assert all(d.digests[i] for i in d.kept) and d.digests[names.index("empty.png")] != ""


def test_parallel_equals_serial(tmp_path):
    root, names, _ = _tree(tmp_path)
    a = decode_files(root, names, OPTS, workers=0, show_progress=False)
    b = decode_files(root, names, OPTS, workers=2, chunk_size=2, show_progress=False)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.kept, b.kept) and a.skipped == b.skipped


def test_unreadable_and_oversized_files(tmp_path):
    (tmp_path / "big.jpg").write_bytes(b"\xff\xd8" + bytes(2000))
    d = decode_files(
        tmp_path, ["missing.jpg", "big.jpg"], DecodeOptions(max_file_bytes=1000), workers=0, show_progress=False
    )
    reasons = dict(d.skipped)
    assert "cannot read" in reasons[0] and "exceeds max_file_bytes" in reasons[1]


def test_image_extensions():
    assert is_image_name("0000 (10).jpg") and is_image_name("X.JPEG") and is_image_name("a.webp")
    assert not is_image_name(".DS_Store") and not is_image_name("Thumbs.db") and not is_image_name("notes.txt")


def test_jpeg_draft_option_keeps_four_times_the_output_size(tmp_path):
    rng = np.random.default_rng(5)
    jpg = _save(tmp_path / "p.jpg", Image.fromarray(rng.integers(0, 256, (400, 600, 3), dtype=np.uint8)), "JPEG")
    with Image.open(jpg) as im:
        im.draft(None, (300, 200))  # 1/2 scale: the most that keeps >= 128 px per side
        assert im.size == (300, 200)
        expected = np.asarray(im.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR))
    assert np.array_equal(_decode_one(jpg, DecodeOptions(jpeg_draft=True)), expected)
    assert not np.array_equal(_decode_one(jpg), expected)  # off by default: full decode
