"""Decode throughput and warm-load time of the data layer, at CIFAKE scale.

Three measurements, each on data built here from the `default` stand-in (no download needed):

1. CIFAKE-like: N 32×32 JPEG files (the stand-in's CIFAKE files, hard-linked under new names until
   there are N; 120,000 = CIFAKE's size) decoded by `prepare` into a fresh cache: images/s.
2. AGIRI-like: large photos (M JPEGs of 1024×768 and M PNGs of 640×480, made from stand-in
   images) decoded and downscaled to 32 px: images/s, with and without --jpeg-draft.
3. Warm load: `load_splits` on the CIFAKE-scale cache, best of R (a memory map: no pixel is read).

    python benchmarks/bench_data.py [--images 120000] [--photos 200] [--workers N] [--repeats 5]

Numbers depend on the disk and on the page cache (the files are freshly written, so they are
read from memory); the hardware and library versions are printed with them.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from fakedet.data import load_splits, prepare, resolve_data
from fakedet.data.decode import DecodeOptions, decode_files


def cifake_scale(src: Path, out: Path, n: int) -> Path:
    """A CIFAKE-layout folder of n JPEG files, hard links to the stand-in's (copies if links fail)."""
    for split, share in (("train", 5 / 6), ("test", 1 / 6)):  # CIFAKE: 100k train, 20k test
        for label in ("REAL", "FAKE"):
            files = sorted((src / split / label).iterdir())
            dst = out / split / label
            dst.mkdir(parents=True)
            for i in range(int(n * share / 2)):
                target = dst / f"{i // 10:04d} ({i % 10 + 1}).jpg"
                try:
                    os.link(files[i % len(files)], target)
                except OSError:
                    shutil.copyfile(files[i % len(files)], target)
    return out


def photos(src: Path, out: Path, m: int) -> list[str]:
    """m 1024×768 JPEGs and m 640×480 PNGs (stand-in images upscaled, plus noise so they compress like photos)."""
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    files = sorted((src / "train" / "REAL").iterdir())
    names = []
    for i in range(m):
        base = np.asarray(Image.open(files[i % len(files)]).convert("RGB"))
        for (w, h), fmt in (((1024, 768), "JPEG"), ((640, 480), "PNG")):
            big = np.asarray(Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
            big = np.clip(big + rng.integers(-6, 7, big.shape), 0, 255).astype(np.uint8)
            name = f"{i:05d}.{fmt.lower()}"
            Image.fromarray(big).save(out / name, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
            names.append(name)
    return names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--images", type=int, default=120_000, help="CIFAKE-like files to decode (default: CIFAKE's 120,000)"
    )
    ap.add_argument("--photos", type=int, default=200, help="large photos of each kind (JPEG 1024×768, PNG 640×480)")
    ap.add_argument("--workers", type=int, default=None, help="decode processes (default: all cores)")
    ap.add_argument("--repeats", type=int, default=5, help="warm loads timed (best is reported)")
    ap.add_argument("--tmp", default=None, help="scratch folder (default: a temporary one, removed after)")
    args = ap.parse_args()

    import PIL

    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, numpy {np.__version__}, Pillow {PIL.__version__}"
    )
    scratch = Path(args.tmp or tempfile.mkdtemp(prefix="fakedet-bench-"))
    try:
        t0 = time.perf_counter()
        standin = resolve_data("synthetic", scratch / "root", size="default", show_progress=False)
        src = standin.parent / "sources"
        print(f"stand-in ready in {time.perf_counter() - t0:.1f}s")

        data = cifake_scale(src / "cifake", scratch / "cifake", args.images)
        t0 = time.perf_counter()
        m = prepare(scratch / "cache", cifake=data, only=["cifake"], workers=args.workers, show_progress=False)
        total = time.perf_counter() - t0
        e = m["datasets"]["cifake"]
        n = e["train"]["files"] + e["test"]["files"]
        decode_s = e["train"]["decode_seconds"] + e["test"]["decode_seconds"]
        print(
            f"CIFAKE-like 32x32 JPEG: {n:,} files decoded in {decode_s:.1f}s = {n / decode_s:,.0f} images/s "
            f"(prepare in all, with split and writes: {total:.1f}s)"
        )

        names = photos(src / "cifake", scratch / "photos", args.photos)
        for draft in (False, True):
            d = decode_files(
                scratch / "photos", names, DecodeOptions(jpeg_draft=draft), workers=args.workers, show_progress=False
            )
            kind = "with --jpeg-draft" if draft else "full decode"
            print(
                f"large photos (JPEG 1024x768 + PNG 640x480), {kind}: {len(names)} in {d.seconds:.1f}s = {len(names) / d.seconds:,.0f} images/s"
            )

        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            sets = load_splits(scratch / "cache")
            times.append(time.perf_counter() - t0)
        rows = sum(len(s) for s in sets.values())
        print(
            f"warm load_splits of the CIFAKE-scale cache ({rows:,} rows): best {min(times) * 1000:.1f} ms of {args.repeats}"
        )
        t0 = time.perf_counter()
        touched = int(sets["cifake_train"].images.sum(dtype=np.uint64) % 7)  # reading every pixel once
        print(f"reading every pixel of cifake_train once after that: {time.perf_counter() - t0:.2f}s ({touched})")
    finally:
        if args.tmp is None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
