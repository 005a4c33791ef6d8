"""Decode image files of any size and mode into 32×32 RGB uint8, in parallel, listing every skip.

One function, `decode_image`, turns the bytes of one file into a 32×32×3 uint8 array or raises
`Skip` with a reason; `decode_files` runs it over many files in worker processes, chunked, with
a progress bar, and returns the rows that decoded, in input order, plus a reason for each that
did not. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

from fakedet.data.files import Unreadable, read_bounded

SIZE = 32  # every set is N×32×32×3 (fakedet.arrays.IMAGE_SHAPE)

# Files considered images, by extension (lower case). Anything else under a class folder
# (.DS_Store, Thumbs.db, README.txt, ...) is ignored and listed as ignored, not decoded.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)

RESIZE_METHODS: dict[str, int | None] = {
    "bilinear": Image.Resampling.BILINEAR,  # antialiased: Pillow widens the filter support when reducing
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "nearest": Image.Resampling.NEAREST,
    # `Image.resize(size)` with no filter, as the reference project called it: BICUBIC for RGB
    # in Pillow >= 7 (applied after our RGB conversion, so never the NEAREST used for "P"/"1").
    "pil-default": None,
}


@dataclass(frozen=True)
class DecodeOptions:
    """Every choice that changes decoded pixels. All of it goes into the cache key."""

    resize: str = "bilinear"
    """Filter used when an image is not 32×32 (one of RESIZE_METHODS). The reference study used
    PIL's default resize ("pil-default"); antialiased bilinear is our default because it matches
    how CIFAKE's fakes were downsampled (study, section 2) and does not sharpen."""
    max_pixels: int = Image.MAX_IMAGE_PIXELS or 89_478_485
    """Decompression-bomb guard: the most pixels we let a decoder allocate for one image. The default
    is Pillow's own warning threshold (~89.5 MP, 268 MB as RGB). Baseline JPEGs above it are decoded
    in draft mode (DCT-domain downscaling by 2, 4 or 8) so honest large photos still load; other
    formats above it are skipped with the reason, and so are progressive and multi-scan JPEGs:
    libjpeg keeps their coefficients at full size whatever the scale (a 4 kB progressive file
    declaring 24000×24000 peaked at 1.7 GiB in draft mode), so the guard applies to their full size."""
    max_file_bytes: int = 256 * 2**20
    """Files larger than this are skipped unread (a 32-px target never needs them)."""
    jpeg_draft: bool = False
    """Also use JPEG draft mode for speed on every JPEG larger than 4×32 px per side. Off by default:
    the reference decoded at full resolution before resizing, and draft scaling changes pixels."""

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_METHODS:
            raise ValueError(f"unknown resize method {self.resize!r}; choose one of {', '.join(RESIZE_METHODS)}")
        if self.max_pixels < SIZE * SIZE:
            raise ValueError(f"max_pixels must be at least {SIZE * SIZE}, got {self.max_pixels}")

    def to_dict(self) -> dict:
        return asdict(self)


class Skip(Exception):
    """A file that is not decoded; the message is the reason recorded in the manifest."""


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def read_image_file(path: str | Path, opts: DecodeOptions) -> bytes:
    """The bytes of an image file, or `Skip(reason)`: a regular file (after symlinks) of at most
    `opts.max_file_bytes`; FIFOs, devices, directories and dangling links are refused unopened."""
    try:
        return read_bounded(path, opts.max_file_bytes)
    except Unreadable as e:
        raise Skip(str(e)) from None


# Start-of-frame markers (ITU T.81 table B.1; C4, C8 and CC are other segments) and those of them
# that start a progressive frame.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_PROGRESSIVE_SOF = frozenset({0xC2, 0xC6, 0xCA, 0xCE})


def jpeg_buffered_mode(data: bytes) -> str | None:
    """Why libjpeg must hold this JPEG's coefficients whole, at full size whatever the draft scale:
    "progressive" or "multi-scan"; None when it decodes row by row.

    libjpeg's rule (jdinput.c, `has_multiple_scans`): a progressive frame, or a first scan holding
    fewer components than the frame. Only the headers up to the first scan are read.
    """
    pos, n = 2, len(data)  # after SOI
    frame_components, progressive = None, False
    while pos + 1 < n:
        if data[pos] != 0xFF:  # stray bytes between segments: skipped, as Pillow and libjpeg do
            pos += 1
            continue
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x00, 0x01, 0xD8, 0xD9) or 0xD0 <= marker <= 0xD7:  # no length field
            pos += 2
            continue
        if pos + 4 > n:
            break
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker in _SOF and frame_components is None and pos + 9 < n:
            frame_components, progressive = data[pos + 9], marker in _PROGRESSIVE_SOF
        elif marker == 0xDA:  # start of scan: its component count follows the length
            if progressive:
                return "progressive"
            scan_components = data[pos + 4] if pos + 4 < n else 0
            return "multi-scan" if frame_components is not None and scan_components < frame_components else None
        pos += 2 + length
    return "progressive" if progressive else None


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB.

    Pillow's own `convert("RGB")` clips 16- and 32-bit greys at 255 (a 16-bit PNG turns white) and
    copies LAB channels as if they were RGB, so those modes are converted here; alpha is dropped
    (Pillow's semantics; what a plain `convert("RGB")` pipeline such as the reference's does).
    """
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I;16") or mode == "I" or mode == "F":
        # 8-bit grey, made one band of rows at a time: the whole image never exists as int64/float64 (8 B
        # a pixel, several copies), only Pillow's own decoded image and the 1-byte result. Kept grey ("L"):
        # resizing it, then making it RGB, gives the same pixels as resizing an RGB copy (channels equal)
        return _grey8(im)
    if mode == "LAB":
        from PIL import ImageCms  # needs Pillow built with LittleCMS; only LAB TIFFs come here

        lab, srgb = ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB")
        return ImageCms.applyTransform(im, ImageCms.buildTransform(lab, srgb, "LAB", "RGB"))
    if mode in ("P", "PA") and "transparency" in im.info:
        im = im.convert("RGBA")  # palette transparency must go through RGBA (Pillow warns otherwise)
    if mode in ("La", "RGBa"):
        im = im.convert("RGBA")  # premultiplied alpha: Pillow converts these only via RGBA
    return im.convert("RGB")


# rows converted at once by `_grey8`: about 1 MP a band, so its temporaries (float64 the largest) stay
# near 8 MB whatever the image's size
BAND_PIXELS = 1 << 20


def _bands(im: Image.Image):
    w, h = im.size
    rows = max(1, BAND_PIXELS // w)
    for y in range(0, h, rows):
        yield y, np.asarray(im.crop((0, y, w, min(h, y + rows))))


def _grey8(im: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit int or float grey image as 8-bit "L" (the rules in `_to_rgb`), band by band."""
    mode = im.mode
    w, h = im.size
    grey = np.empty((h, w), np.uint8)
    if mode == "I":  # 32-bit int images are nearly always 16-bit data widened by Pillow (PNG, TIFF)
        wide = max((int(a.max(initial=0)) for _, a in _bands(im)), default=0) > 255
    elif mode == "F":  # float images in [0, 1] or in [0, 255]
        scale = 255.0 if max((float(np.nan_to_num(a.astype(np.float64)).max(initial=0.0)) for _, a in _bands(im)),
                             default=0.0) <= 1.0 else 1.0
    for y, a in _bands(im):
        if mode.startswith("I;16"):
            band = a.astype(np.uint16) >> 8  # 16-bit: keep the top byte
        elif mode == "I":
            band = np.clip(a.astype(np.int64), 0, 65535) >> 8 if wide else np.clip(a, 0, 255)
        else:
            band = np.clip(np.rint(np.nan_to_num(a.astype(np.float64)) * scale), 0, 255)
        grey[y:y + len(a)] = band
    return Image.fromarray(grey, "L")


def decode_image(data: bytes, opts: DecodeOptions) -> np.ndarray:
    """The bytes of one image file as 32×32×3 uint8 RGB, or `Skip(reason)`.

    Non-square images are resized to 32×32 without cropping (the study downscaled AGIRI so), and EXIF
    orientation is not applied (a plain Pillow pipeline, such as the reference's, does not either)."""
    if len(data) == 0:
        raise Skip("empty file (0 bytes)")
    # Pillow's global bomb check would refuse a large JPEG at open, before we can ask for draft
    # mode; our own check below replaces it (it is restored at once: other code may rely on it).
    guard, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        im = Image.open(io.BytesIO(data))  # reads the header only
    except Image.UnidentifiedImageError:
        raise Skip("not an image: Pillow cannot identify the format") from None
    except Exception as e:  # noqa: BLE001 - a broken header raises whatever its plugin raises
        raise Skip(f"unreadable header: {type(e).__name__}: {e}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = guard
    with im:
        w, h = im.size
        if w <= 0 or h <= 0:
            raise Skip(f"invalid size {w}×{h}")
        if getattr(im, "n_frames", 1) > 1:
            im.seek(0)  # animated GIF/WebP/multi-page TIFF: the first frame
        pixels = w * h
        if im.format == "JPEG" and pixels > opts.max_pixels and (buffered := jpeg_buffered_mode(data)):
            raise Skip(
                f"decompression-bomb guard: {w}×{h} = {pixels:,} px exceeds max_pixels {opts.max_pixels:,} "
                f"(a {buffered} JPEG: libjpeg holds it at full size even when decoding at reduced size)"
            )
        if im.format == "JPEG":
            # draft mode lets libjpeg decode at 1/2, 1/4 or 1/8 scale: memory and time fall by up to
            # 64×, so a 200 MP photo costs what a 3 MP one does. The least reduction that fits the
            # pixel budget; with jpeg_draft, also the most that keeps at least 4×32 px per side.
            scale = next((k for k in (1, 2, 4, 8) if -(-w // k) * -(-h // k) <= opts.max_pixels), 8)
            if opts.jpeg_draft:
                scale = max(scale, next((k for k in (8, 4, 2, 1) if min(w, h) // k >= 4 * SIZE), 1))
            if scale > 1:
                im.draft(None, (max(1, w // scale), max(1, h // scale)))  # Pillow picks scale ≤ w // requested
                w, h = im.size
                pixels = w * h
        if pixels > opts.max_pixels:
            raise Skip(
                f"decompression-bomb guard: {w}×{h} = {pixels:,} px exceeds max_pixels {opts.max_pixels:,} "
                f"({im.format}; only JPEG can be decoded at reduced size)"
            )
        try:
            im.load()
            rgb = _to_rgb(im)
            if rgb.size != (SIZE, SIZE):
                method = RESIZE_METHODS[opts.resize]
                rgb = rgb.resize((SIZE, SIZE)) if method is None else rgb.resize((SIZE, SIZE), method)
            if rgb.mode != "RGB":  # a grey kept 8-bit grey until it is small (`_to_rgb`)
                rgb = rgb.convert("RGB")
            out = np.asarray(rgb, dtype=np.uint8)
        except Skip:
            raise
        except Exception as e:  # noqa: BLE001 - truncated, bad CRC, unsupported mode, ...: skip, never crash
            raise Skip(f"decode failed: {type(e).__name__}: {e}") from None
    if out.shape != (SIZE, SIZE, 3):
        raise Skip(f"decoded to an unexpected shape {out.shape}")
    return out


@dataclass
class Decoded:
    """The result of decoding a list of files: rows that decoded, in input order."""

    images: np.ndarray
    """uint8 K×32×32×3, K ≤ len(input)."""
    kept: np.ndarray
    """Indices into the input list of the rows in `images`."""
    skipped: list[tuple[int, str]]
    """(input index, reason) for each file that was not decoded."""
    digests: list[str]
    """sha1 of each input file's bytes ("" when unreadable), in input order."""
    seconds: float = 0.0


def process_context():  # noqa: ANN201
    """The multiprocessing context for worker pools: fork on Linux, spawn elsewhere.

    Workers run only numpy and Pillow code, never torch, so fork is safe even when the parent holds
    torch's thread pools; unlike spawn it starts in milliseconds and works when __main__ is stdin
    or a notebook. macOS and Windows use spawn (fork is unsafe with their system frameworks).
    """
    return get_context("fork" if sys.platform.startswith("linux") else "spawn")


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid: int) -> None:
    """A pool worker's initializer: the kernel sends it SIGKILL when the process that started it dies, so a
    `prepare` killed with kill -9 leaves no orphan decoding on (Linux: prctl(PR_SET_PDEATHSIG); elsewhere
    nothing, and the pool's own shutdown on a clean exit is all there is). The death signal follows the
    thread that forked the worker: pools are started from the main thread."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        return
    if os.getppid() != parent_pid:  # the parent died before the prctl: nothing would signal us
        os._exit(1)


def _decode_chunk(root: str, relpaths: Sequence[str], opts: DecodeOptions) -> tuple[np.ndarray, np.ndarray, list, list]:
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error to report, not grey pixels
    images = np.zeros((len(relpaths), SIZE, SIZE, 3), np.uint8)
    ok = np.zeros(len(relpaths), bool)
    reasons: list[str | None] = []
    digests: list[str] = []
    for i, rel in enumerate(relpaths):
        try:
            data = read_image_file(os.path.join(root, rel), opts)
        except Skip as e:
            reasons.append(str(e))
            digests.append("")
            continue
        digests.append(hashlib.sha1(data).hexdigest())
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. "Corrupt EXIF data": the pixels are still fine
                images[i] = decode_image(data, opts)
            ok[i] = True
            reasons.append(None)
        except Skip as e:
            reasons.append(str(e))
    return images, ok, reasons, digests


def decode_files(
    root: str | Path,
    relpaths: Sequence[str],
    opts: DecodeOptions,
    *,
    workers: int | None = None,
    chunk_size: int = 256,
    desc: str = "decode",
    show_progress: bool = True,
) -> Decoded:
    """Decode `root/relpath` for each relpath, in parallel; output order is input order.

    workers: processes to use (default: all cores); 0 decodes in this process. Small inputs
    (one chunk) are decoded in-process too: starting workers would cost more than it saves.
    """
    import time

    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    n = len(relpaths)
    root = str(root)
    chunks = [list(relpaths[i : i + chunk_size]) for i in range(0, n, chunk_size)]
    images = np.empty((n, SIZE, SIZE, 3), np.uint8)
    ok = np.zeros(n, bool)
    reasons: list[str | None] = [None] * n
    digests: list[str] = [""] * n
    if workers is None:
        workers = os.cpu_count() or 1
    bar = tqdm(total=n, desc=desc, unit="img", disable=not show_progress, leave=False, dynamic_ncols=True)

    def store(k: int, result: tuple) -> None:
        imgs, good, why, sha = result
        lo = k * chunk_size
        images[lo : lo + len(good)] = imgs
        ok[lo : lo + len(good)] = good
        reasons[lo : lo + len(good)] = why
        digests[lo : lo + len(good)] = sha
        bar.update(len(good))

    try:
        if workers <= 1 or len(chunks) <= 1:
            for k, chunk in enumerate(chunks):
                store(k, _decode_chunk(root, chunk, opts))
        else:
            with ProcessPoolExecutor(max_workers=min(workers, len(chunks)), mp_context=process_context(),
                                     initializer=die_with_parent, initargs=(os.getpid(),)) as pool:
                futures = {pool.submit(_decode_chunk, root, chunk, opts): k for k, chunk in enumerate(chunks)}
                from concurrent.futures import as_completed

                for fut in as_completed(futures):
                    store(futures[fut], fut.result())
    finally:
        bar.close()
    kept = np.flatnonzero(ok)
    bad = np.flatnonzero(~ok)
    # compact in place, run by run between skipped rows (rows only move forward), then return a
    # view: no second N×3072 copy at CIFAKE scale
    dst = prev = 0
    for s in [*bad.tolist(), n]:
        if s > prev:
            if dst != prev:
                images[dst : dst + s - prev] = images[prev:s]
            dst += s - prev
        prev = s + 1
    skipped = [(int(i), reasons[i] or "unknown") for i in bad]
    return Decoded(images[: len(kept)], kept, skipped, digests, time.perf_counter() - t0)
