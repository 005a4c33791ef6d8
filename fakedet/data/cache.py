"""The prepared-data cache: decode once, then every load is a memory map.

Layout of a cache directory (what `fakedet prepare --cache DIR` writes):

    DIR/manifest.json              what is there, counts, skips, options, hashes (written last, atomically)
    DIR/units/<unit>-<key>/        one build step's output: <set>.images.npy, .labels.npy, .paths.npy,
                                   (.fine.npy, .coarse.npy), info.json
    DIR/.lock                      held while preparing: concurrent prepares of DIR take turns

A unit is built in a temporary folder and renamed into place, so a crash never leaves half of one;
the manifest is replaced atomically after all its units exist, so a reader sees the old cache or
the new one, never a mix. Units are:

    cifake-train   CIFAKE train decoded      key: files (path, size, mtime) + decode options
    cifake-split   cifake_train, cifake_val  key: cifake-train + val_fraction + seed
    cifake-test    cifake_test               key: files + decode options
    agiri-val      agiri_val, a sample of AGIRI train (only the sample is decoded)
                                             key: train files + decode options + size + seed
    agiri-test     agiri_test                key: files + decode options
    cifar100-test  cifar100_test             key: the pickles (path, size, mtime)
    cifar100-jpeg  cifar100_test_jpeg        key: cifar100-test + JPEG quality
    cifar100-train counts only (not cached: the study uses CIFAR-100 test alone)

So changing the validation fraction re-splits without decoding, and an unchanged input never
decodes twice. Each unit also records a content digest (sha1 of every input file's bytes, plus the
options); `cache_hash` combines those of the sets in the manifest: it names the data and the
preprocessing, not the machine or the file dates, and is what runs log.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import platform
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fakedet import FAKE, REAL, __version__
from fakedet.arrays import ImageSet
from fakedet.data import cifar100 as c100
from fakedet.data.decode import SIZE, DecodeOptions, decode_files
from fakedet.data.errors import CacheError, DataError, LayoutError
from fakedet.data.sources import (
    DATASETS,
    SOURCES,
    download,
    find_root,
    list_split,
    stat_fingerprint,
)
from fakedet.data.splits import holdout, per_class_quota, sample_order

log = logging.getLogger("fakedet.data")

FORMAT = "fakedet-cache/1"
# Bump when a code change alters decoded pixels or split rows: every unit is rebuilt.
DECODE_VERSION = 1
SPLIT_VERSION = 1
SET_NAMES = (
    "cifake_train",
    "cifake_val",
    "cifake_test",
    "agiri_val",
    "agiri_test",
    "cifar100_test",
    "cifar100_test_jpeg",
)
STANDIN_MARKER = "STANDIN.json"
DEFAULT_JPEG_QUALITY = 75  # Pillow's default


@dataclass(frozen=True)
class PrepareOptions:
    """Every preprocessing and split choice; all of it is in the cache key and the manifest."""

    resize: str = "bilinear"
    """Filter for images that are not 32×32 (fakedet.data.decode.RESIZE_METHODS). The reference used
    PIL's default resize: pass "pil-default" to reproduce it."""
    val_fraction: float = 0.1
    """Share of CIFAKE train held out (stratified) as cifake_val."""
    agiri_val_size: int = 2000
    """Images sampled (stratified) from AGIRI train as agiri_val; clipped to what exists, recorded."""
    seed: int = 0
    """Seed of both held-out splits (not of training)."""
    cifar100_jpeg: bool = True
    """Also write cifar100_test_jpeg: CIFAR-100 test through one JPEG encode/decode. CIFAKE's real
    images are JPEG files, CIFAR-100's pickles raw pixels: the copy separates a content shift from
    a compression shift."""
    jpeg_quality: int | None = None
    """Quality of that round trip (Pillow's encoder, 4:2:0 chroma subsampling). None: the quality
    estimated from CIFAKE's REAL files (from their quantisation tables) when CIFAKE is in the same
    cache, else 75 (Pillow's default); CIFAKE's encoder settings are not documented."""
    max_pixels: int = DecodeOptions.max_pixels
    jpeg_draft: bool = False

    def __post_init__(self) -> None:
        DecodeOptions(self.resize, self.max_pixels, jpeg_draft=self.jpeg_draft)  # validates
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.agiri_val_size < 0:
            raise ValueError(f"agiri_val_size must be >= 0, got {self.agiri_val_size}")
        if self.jpeg_quality is not None and not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")

    def decode(self) -> DecodeOptions:
        return DecodeOptions(resize=self.resize, max_pixels=self.max_pixels, jpeg_draft=self.jpeg_draft)


def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


# ----------------------------------------------------------------------------------- locking


@contextlib.contextmanager
def file_lock(path: Path, what: str = "") -> Iterator[None]:
    """An exclusive advisory lock (flock) held for the block; waits, saying so, if another holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            import fcntl
        except ImportError:  # Windows: msvcrt locks a byte range instead
            import msvcrt

            msvcrt.locking(f.fileno(), msvcrt.LK_LOCK, 1)
            try:
                yield
            finally:
                f.seek(0)
                msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)
            return
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process %s (lock %s)", what or "using this cache", path)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------- units


def _save_set(
    folder: Path, name: str, images: np.ndarray, labels: np.ndarray, paths: list[str] | np.ndarray, **extra: np.ndarray
) -> dict:
    np.save(folder / f"{name}.images.npy", np.ascontiguousarray(images, dtype=np.uint8))
    np.save(folder / f"{name}.labels.npy", np.asarray(labels, dtype=np.uint8))
    np.save(folder / f"{name}.paths.npy", np.asarray(paths, dtype=str))
    for k, v in extra.items():
        np.save(folder / f"{name}.{k}.npy", v)
    n_real = int((np.asarray(labels) == REAL).sum())
    return {"n": len(labels), "real": n_real, "fake": len(labels) - n_real}


def _unit(cache_dir: Path, name: str, key: str, build: Callable[[Path], dict]) -> tuple[str, dict]:
    """The unit `name` with cache key `key`: reused if present, else built into a temp dir and renamed.
    The returned info has `cached` True when it was reused."""
    rel = f"units/{name}-{key[:16]}"
    final = cache_dir / rel
    info_path = final / "info.json"
    if info_path.is_file():
        log.info("%s: cached (%s)", name, rel)
        return rel, {**json.loads(info_path.read_text()), "cached": True}
    tmp = cache_dir / "units" / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        info = build(tmp)
        info.update(unit=name, key=key, built=time.strftime("%Y-%m-%dT%H:%M:%S"))
        (tmp / "info.json").write_text(json.dumps(info, indent=1, ensure_ascii=False))
        if final.exists():  # left by a crash between rename and manifest: not referenced, replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return rel, info


def _read_set(folder: Path, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # Copy-on-write maps: nothing is read until used, a write never reaches the cache file, and
    # torch.from_numpy accepts them without its "non-writable array" warning (a read-only map
    # would trigger it in every consumer that wraps the images in a tensor).
    return (
        np.load(folder / f"{name}.images.npy", mmap_mode="c"),
        np.load(folder / f"{name}.labels.npy"),
        np.load(folder / f"{name}.paths.npy"),
    )


def _skips(relpaths: list[str], skipped: list[tuple[int, str]]) -> list[dict]:
    return [{"path": relpaths[i], "reason": why} for i, why in skipped]


def _warn_skips(what: str, info: dict) -> None:
    skipped = info["skipped"]
    if skipped and info.get("cached"):
        log.info("%s: %d file(s) skipped when decoded; listed in manifest.json", what, len(skipped))
    elif skipped:
        head = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:3])
        more = f" (and {len(skipped) - 3} more)" if len(skipped) > 3 else ""
        log.warning("%s: skipped %d file(s): %s%s; all are listed in manifest.json", what, len(skipped), head, more)


def _content(relpaths: list[str], digests: list[str]) -> str:
    h = hashlib.sha256()
    for rel, d in zip(relpaths, digests):
        h.update(f"{rel}\0{d}\n".encode())
    return h.hexdigest()


def estimate_jpeg_quality(path: Path) -> int | None:
    """The IJG quality whose luminance table best matches this JPEG's (None if not a baseline JPEG)."""
    from PIL import Image

    # ITU T.81 Annex K luminance table; libjpeg scales it by 5000/q (q < 50) or 200 - 2q
    std = np.array([16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
                    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
                    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99])  # fmt: skip
    try:
        with Image.open(path) as im:
            table = np.array(im.quantization[0])  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - an estimate only
        return None
    qs = np.arange(1, 101)
    scale = np.where(qs < 50, 5000 // qs, 200 - 2 * qs)
    tables = np.clip((std[None] * scale[:, None] + 50) // 100, 1, 255)
    # sums are order-free: Pillow versions differ on zigzag vs natural order
    return int(qs[np.argmin(np.abs(tables.sum(1) - table.sum()))])


def _image_folder_unit(
    cache_dir: Path, ds: str, root: Path, split: str, opts: PrepareOptions, workers: int | None, show_progress: bool
) -> tuple[str, dict]:
    listing = list_split(ds, root, split)
    if not listing.relpaths:
        raise LayoutError(
            f"{ds}: {root}/{split} holds no image files (looked for .jpg, .png, ... under its class folders)"
        )
    dec = opts.decode()
    key = _digest(FORMAT, DECODE_VERSION, ds, split, stat_fingerprint(root, listing.relpaths), dec.to_dict())
    set_name = f"{ds}_{split}" if ds != "cifake" or split == "test" else "cifake_trainval"

    def build(tmp: Path) -> dict:
        d = decode_files(
            root, listing.relpaths, dec, workers=workers, desc=f"{ds}/{split}", show_progress=show_progress
        )
        kept_paths = [listing.relpaths[i] for i in d.kept]
        counts = _save_set(tmp, set_name, d.images, listing.labels[d.kept], kept_paths)
        skipped = _skips(listing.relpaths, d.skipped)
        return {
            "sets": {set_name: counts},
            "files": len(listing.relpaths),
            "skipped": skipped,
            "ignored": listing.ignored,
            "content": _digest(_content(listing.relpaths, d.digests), dec.to_dict(), DECODE_VERSION),
            "decode_seconds": round(d.seconds, 3),
            "images_per_second": round(len(listing.relpaths) / max(d.seconds, 1e-9), 1),
        }

    rel, info = _unit(cache_dir, f"{ds}-{split}", key, build)
    _warn_skips(f"{ds}/{split}", info)
    return rel, info


def _agiri_val_unit(
    cache_dir: Path, root: Path, opts: PrepareOptions, workers: int | None, show_progress: bool
) -> tuple[str, dict]:
    listing = list_split("agiri", root, "train")
    dec = opts.decode()
    key = _digest(
        FORMAT,
        DECODE_VERSION,
        SPLIT_VERSION,
        "agiri-val",
        stat_fingerprint(root, listing.relpaths),
        dec.to_dict(),
        opts.agiri_val_size,
        opts.seed,
    )

    def build(tmp: Path) -> dict:
        t0 = time.perf_counter()
        orders = sample_order(listing.labels, opts.seed)
        quotas = per_class_quota(opts.agiri_val_size, len(orders))
        chosen: list[int] = []
        images: list[np.ndarray] = []
        skipped: list[tuple[int, str]] = []
        digests: dict[int, str] = {}
        for order, quota in zip(orders, quotas):
            got, pos = 0, 0
            # decode the first `quota` of the seeded order; replace each corrupt file by the next one
            while got < quota and pos < len(order):
                take = order[pos : pos + (quota - got)]
                pos += len(take)
                rels = [listing.relpaths[i] for i in take]
                d = decode_files(
                    root, rels, dec, workers=workers, desc="agiri/train (val sample)", show_progress=show_progress
                )
                chosen += [int(take[k]) for k in d.kept]
                images.append(np.array(d.images))
                skipped += [(int(take[k]), why) for k, why in d.skipped]
                digests.update({int(i): s for i, s in zip(take, d.digests)})
                got += len(d.kept)
        order_out = np.argsort(chosen, kind="stable")  # rows in path order, like every other set
        rows = np.asarray(chosen, np.int64)[order_out]
        imgs = np.concatenate(images)[order_out] if images else np.zeros((0, SIZE, SIZE, 3), np.uint8)
        counts = _save_set(tmp, "agiri_val", imgs, listing.labels[rows], [listing.relpaths[i] for i in rows])
        seen = sorted(digests)
        used = len(rows)
        available = {"real": int((listing.labels == REAL).sum()), "fake": int((listing.labels == FAKE).sum())}
        clip = None
        if used < opts.agiri_val_size:
            clip = (
                f"agiri_val_size {opts.agiri_val_size} clipped to {used}: AGIRI train holds {len(listing.relpaths)} "
                f"image files ({available['real']} real, {available['fake']} fake), {len(skipped)} of those tried could not be decoded"
            )
            log.warning("%s", clip)
        seconds = time.perf_counter() - t0
        return {
            "sets": {"agiri_val": counts},
            "files": len(listing.relpaths),
            "available": available,
            "tried": len(seen),
            "requested": opts.agiri_val_size,
            "clipped": clip,
            "skipped": [{"path": listing.relpaths[i], "reason": why} for i, why in sorted(skipped)],
            "ignored": listing.ignored,
            "content": _digest(
                _content([listing.relpaths[i] for i in seen], [digests[i] for i in seen]),
                dec.to_dict(),
                DECODE_VERSION,
                SPLIT_VERSION,
                opts.agiri_val_size,
                opts.seed,
            ),
            "decode_seconds": round(seconds, 3),
            "images_per_second": round(len(seen) / max(seconds, 1e-9), 1),
        }

    rel, info = _unit(cache_dir, "agiri-val", key, build)
    _warn_skips("agiri/train (val sample)", info)
    return rel, info


def _cifake_split_unit(cache_dir: Path, parent_rel: str, parent: dict, opts: PrepareOptions) -> tuple[str, dict]:
    key = _digest(FORMAT, SPLIT_VERSION, parent["key"], opts.val_fraction, opts.seed)

    def build(tmp: Path) -> dict:
        images, labels, paths = _read_set(cache_dir / parent_rel, "cifake_trainval")
        keep, held = holdout(labels, opts.val_fraction, opts.seed)
        return {
            "sets": {
                "cifake_train": _save_set(tmp, "cifake_train", images[keep], labels[keep], paths[keep]),
                "cifake_val": _save_set(tmp, "cifake_val", images[held], labels[held], paths[held]),
            },
            "content": _digest(parent["content"], SPLIT_VERSION, opts.val_fraction, opts.seed),
        }

    return _unit(cache_dir, "cifake-split", key, build)


def _cifar100_units(
    cache_dir: Path, root: Path, opts: PrepareOptions, standin: bool, quality: int
) -> tuple[list[tuple[str, dict]], dict]:
    files = [f for f in ("test", "meta", "train") if (root / f).is_file()]
    key = _digest(FORMAT, DECODE_VERSION, "cifar100-test", stat_fingerprint(root, ["test", "meta"]))

    def build(tmp: Path) -> dict:
        fine_names, coarse_names = c100.read_meta(root)
        split = c100.read_split(root, "test")
        if split.fine.max(initial=0) >= len(fine_names) or split.coarse.max(initial=0) >= len(coarse_names):
            raise LayoutError(
                f"cifar100: {root}/test has labels beyond the {len(fine_names)} fine / {len(coarse_names)} coarse names in meta"
            )
        paths = [f"test#{i}:{fn}" if fn else f"test#{i}" for i, fn in enumerate(split.filenames)]
        labels = np.full(len(split.images), REAL, np.uint8)
        counts = _save_set(tmp, "cifar100_test", split.images, labels, paths, fine=split.fine, coarse=split.coarse)
        md5 = {"test": split.md5, "meta": c100.md5_of(root / "meta")}
        return {
            "sets": {"cifar100_test": counts},
            "fine_names": list(fine_names),
            "coarse_names": list(coarse_names),
            "md5": md5,
            "skipped": [],
            "content": _digest(md5, DECODE_VERSION),
        }

    units = [_unit(cache_dir, "cifar100-test", key, build)]
    test_rel, test_info = units[0]
    if opts.cifar100_jpeg:
        jkey = _digest(FORMAT, DECODE_VERSION, "cifar100-jpeg", test_info["key"], quality)

        def build_jpeg(tmp: Path) -> dict:
            from PIL import Image

            images, labels, paths = _read_set(cache_dir / test_rel, "cifar100_test")
            out = np.empty(images.shape, np.uint8)
            for i, img in enumerate(images):
                buf = io.BytesIO()
                Image.fromarray(np.asarray(img)).save(buf, "JPEG", quality=quality)
                out[i] = np.asarray(Image.open(buf).convert("RGB"))
            folder = cache_dir / test_rel
            extra = {k: np.load(folder / f"cifar100_test.{k}.npy") for k in ("fine", "coarse")}
            counts = _save_set(tmp, "cifar100_test_jpeg", out, labels, paths, **extra)
            return {
                "sets": {"cifar100_test_jpeg": counts},
                "jpeg_quality": quality,
                "content": _digest(test_info["content"], quality),
            }

        units.append(_unit(cache_dir, "cifar100-jpeg", jkey, build_jpeg))

    md5_report = {}
    for f in ("test", "meta"):
        got = test_info["md5"][f]
        md5_report[f] = {"md5": got, "official": got == c100.OFFICIAL_MD5[f]}
    if "train" in files:
        # counts only, read through the same safe reader; cached as a unit so it is read once
        tkey = _digest(FORMAT, "cifar100-train", stat_fingerprint(root, ["train"]))

        def build_train(tmp: Path) -> dict:
            split = c100.read_split(root, "train")
            return {"sets": {}, "count": len(split.images), "md5": split.md5, "content": split.md5}

        train_rel, train_info = _unit(cache_dir, "cifar100-train", tkey, build_train)
        units.append((train_rel, train_info))
        md5_report["train"] = {"md5": train_info["md5"], "official": train_info["md5"] == c100.OFFICIAL_MD5["train"]}
    differ = [f for f, r in md5_report.items() if not r["official"]]
    if differ and not standin:
        log.warning(
            "cifar100: the MD5 of %s differs from the official Toronto release (%s): these are not the official "
            "files (a mirror may have re-pickled them). They are read anyway; the manifest records both MD5s.",
            ", ".join(differ),
            ", ".join(f"{f} {md5_report[f]['md5']} vs {c100.OFFICIAL_MD5[f]}" for f in differ),
        )
    for f in differ:
        md5_report[f]["expected"] = c100.OFFICIAL_MD5[f]
    return units, md5_report


# ----------------------------------------------------------------------------------- prepare


def _standin_info(path: Path, root: Path) -> dict | None:
    for p in (root, path, root.parent):
        marker = p / STANDIN_MARKER
        if marker.is_file():
            return json.loads(marker.read_text())
    return None


Made = list[tuple[str, dict, dict]]  # (unit folder, unit info, extra manifest fields of its sets)


def _prepare_image_folders(
    cache_dir: Path, ds: str, root: Path, options: PrepareOptions, workers: int | None, show_progress: bool
) -> tuple[dict, Made]:
    """CIFAKE or AGIRI: the manifest entry's fields, and the units made."""
    entry: dict = {}
    made: Made = []
    if ds == "cifake":
        tr_rel, tr = _image_folder_unit(cache_dir, ds, root, "train", options, workers, show_progress)
        made += [(tr_rel, tr, {}), (*_cifake_split_unit(cache_dir, tr_rel, tr, options), {})]
        reals = sorted(p for p in (root / "train" / "REAL").iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
        entry["jpeg_quality_estimate"] = estimate_jpeg_quality(reals[0]) if reals else None
        entry["options"] = {
            "decode": options.decode().to_dict(),
            "val_fraction": options.val_fraction,
            "seed": options.seed,
        }
        train_set = "cifake_trainval"
    else:
        tr_rel, tr = _agiri_val_unit(cache_dir, root, options, workers, show_progress)
        made.append((tr_rel, tr, {}))
        entry["options"] = {
            "decode": options.decode().to_dict(),
            "agiri_val_size": options.agiri_val_size,
            "seed": options.seed,
        }
        train_set = "agiri_val"
    te_rel, te = _image_folder_unit(cache_dir, ds, root, "test", options, workers, show_progress)
    made.append((te_rel, te, {}))
    for split, info, set_name in (("train", tr, train_set), ("test", te, f"{ds}_test")):
        counts = info["sets"][set_name]
        entry[split] = {
            "real": counts["real"],
            "fake": counts["fake"],
            "skipped": info["skipped"],
            "ignored": info["ignored"],
            "files": info["files"],
            "decode_seconds": info["decode_seconds"],
            "images_per_second": info["images_per_second"],
        }
    if ds == "agiri":
        entry["train"].update(
            note="only the agiri_val sample is decoded; counts are of that sample",
            available=tr["available"],
            requested=tr["requested"],
            clipped=tr["clipped"],
        )
    return entry, made


def _prepare_cifar100(
    cache_dir: Path, root: Path, options: PrepareOptions, standin: bool, quality: int, why: str
) -> tuple[dict, Made]:
    unit_list, md5 = _cifar100_units(cache_dir, root, options, standin, quality)
    test_info = unit_list[0][1]
    names = {"fine_names": test_info["fine_names"], "coarse_names": test_info["coarse_names"]}
    counts = test_info["sets"]["cifar100_test"]
    entry: dict = {"test": {"real": counts["real"], "fake": 0, "skipped": []}}
    train = next((i for _, i in unit_list if i["unit"] == "cifar100-train"), None)
    if train:
        entry["train"] = {
            "real": train["count"],
            "fake": 0,
            "skipped": [],
            "note": "counted, not cached: the study uses CIFAR-100 test",
        }
    entry["md5"] = md5
    entry["n_fine"], entry["n_coarse"] = len(names["fine_names"]), len(names["coarse_names"])
    entry["options"] = {
        "cifar100_jpeg": options.cifar100_jpeg,
        "jpeg_quality": quality if options.cifar100_jpeg else None,
        "jpeg_quality_from": why,
    }
    return entry, [(rel, info, names) for rel, info in unit_list]


def read_manifest(cache_dir: str | Path) -> dict:
    cache_dir = Path(cache_dir)
    path = cache_dir / "manifest.json"
    if not path.is_file():
        raise CacheError(
            f"{cache_dir} is not a prepared cache (no manifest.json). Prepare one with "
            f"`fakedet prepare --cache {cache_dir}` (or `fakedet make-synthetic` for the built-in stand-in)."
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise CacheError(
            f"{path}: cache format {manifest.get('format')!r}, this fakedet reads {FORMAT!r}; prepare it again"
        )
    return manifest


def prepare(
    cache_dir: str | Path,
    *,
    cifake: str | Path | None = None,
    agiri: str | Path | None = None,
    cifar100: str | Path | None = None,
    only: tuple[str, ...] | list[str] | None = None,
    options: PrepareOptions | None = None,
    allow_download: bool = True,
    workers: int | None = None,
    show_progress: bool = True,
) -> dict:
    """Decode the selected datasets into `cache_dir` (reusing what is unchanged) and write the manifest.

    A dataset without a path is downloaded with kagglehub (pinned version) unless `allow_download`
    is False. Datasets outside `only` keep their entries from an existing manifest. Returns the
    manifest. Safe to call from several processes at once on the same `cache_dir` (they take turns).
    """
    options = options or PrepareOptions()
    paths = {"cifake": cifake, "agiri": agiri, "cifar100": cifar100}
    selected = tuple(only) if only else DATASETS
    unknown = set(selected) - set(DATASETS)
    if unknown:
        raise ValueError(f"unknown dataset(s) {sorted(unknown)}; choose from {', '.join(DATASETS)}")
    cache_dir = Path(cache_dir).expanduser()
    t_start = time.perf_counter()

    # resolve every source before decoding anything: a missing download fails fast
    roots: dict[str, tuple[Path, Path, dict]] = {}
    for ds in selected:
        given = paths[ds]
        if given is None:
            if not allow_download:
                raise LayoutError(f"{ds}: no folder given; pass --{ds} PATH")
            origin = {"origin": "kagglehub", "handle": SOURCES[ds].handle}
            given = download(ds)
        else:
            origin = {"origin": "local"}
        given = Path(given).expanduser().resolve()
        root = find_root(ds, given)
        roots[ds] = (given, root, origin)

    cache_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(cache_dir / ".lock", f"preparing {cache_dir}"):
        old = None
        if (cache_dir / "manifest.json").is_file():
            with contextlib.suppress(DataError, json.JSONDecodeError):
                old = read_manifest(cache_dir)
        datasets: dict[str, dict] = {}
        sets: dict[str, dict] = {}
        for ds in DATASETS:
            if ds not in selected:
                if old and ds in old.get("datasets", {}):
                    datasets[ds] = old["datasets"][ds]
                    sets.update({k: v for k, v in old["sets"].items() if v.get("dataset") == ds})
                continue
            given, root, origin = roots[ds]
            standin = _standin_info(given, root)
            entry: dict = {"source": {**origin, "root": str(root), "standin": standin is not None}}
            if standin:
                entry["source"]["standin_generator"] = standin
            t0 = time.perf_counter()
            if ds == "cifar100":
                quality, why = options.jpeg_quality, "given"
                if quality is None:
                    q = (datasets.get("cifake") or {}).get("jpeg_quality_estimate")
                    quality, why = (
                        (q, "CIFAKE's REAL files' estimated quality")
                        if q
                        else (DEFAULT_JPEG_QUALITY, "Pillow's default (no CIFAKE estimate in this cache)")
                    )
                part, made = _prepare_cifar100(cache_dir, root, options, standin is not None, quality, why)
            else:
                part, made = _prepare_image_folders(cache_dir, ds, root, options, workers, show_progress)
            entry.update(part)
            entry["units"] = [rel for rel, _, _ in made]
            entry["seconds"] = round(time.perf_counter() - t0, 3)
            datasets[ds] = entry
            for rel, info, extra in made:
                for name, counts in info.get("sets", {}).items():
                    if name in SET_NAMES:
                        sets[name] = {"dataset": ds, "unit": rel, **counts, "content": info["content"], **extra}

        ordered = {k: sets[k] for k in SET_NAMES if k in sets}
        if old and _same(old, ordered, datasets, options):
            log.info("%s: up to date (cache %s)", cache_dir, old["cache_hash"])
            return old  # nothing changed: leave the manifest (and its dates) alone
        manifest = {
            "format": FORMAT,
            "cache_hash": _digest({k: v["content"] for k, v in ordered.items()})[:12],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "options": asdict(options),
            "datasets": datasets,
            "sets": ordered,
            "versions": _versions(),
            "prepare_seconds": round(time.perf_counter() - t_start, 3),
        }
        tmp = cache_dir / f".manifest-{uuid.uuid4().hex[:8]}.json"
        tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
        os.replace(tmp, cache_dir / "manifest.json")
        _prune(
            cache_dir,
            {u for d in datasets.values() for u in d.get("units", [])} | {v["unit"] for v in ordered.values()},
        )
    return manifest


def _same(old: dict, sets: dict, datasets: dict, options: PrepareOptions) -> bool:
    def norm(x: object) -> object:  # as JSON has it (tuples → lists, ...)
        return json.loads(json.dumps(x, default=str))

    def strip(d: dict) -> dict:
        return {k: {f: v for f, v in e.items() if f != "seconds"} for k, e in d.items()}

    return norm([old.get("sets"), old.get("options"), strip(old.get("datasets", {}))]) == norm(
        [sets, asdict(options), strip(datasets)]
    )


def _versions() -> dict:
    import PIL

    return {
        "fakedet": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "platform": sys.platform,
    }


def _prune(cache_dir: Path, keep: set[str]) -> None:
    """Remove units the manifest no longer names (and temp folders of crashed builds)."""
    units = cache_dir / "units"
    if not units.is_dir():
        return
    for p in units.iterdir():
        if f"units/{p.name}" not in keep:
            shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------------- load


def load_splits(cache_dir: str | Path) -> dict[str, ImageSet]:
    """Every set in a prepared cache, memory-mapped: cifake_train, cifake_val, cifake_test,
    agiri_val, agiri_test, cifar100_test and (when prepared) cifar100_test_jpeg.

    A cache prepared with `--only` holds the sets of those datasets alone.
    """
    cache_dir = Path(cache_dir).expanduser()
    manifest = read_manifest(cache_dir)
    out: dict[str, ImageSet] = {}
    for name, entry in manifest["sets"].items():
        folder = cache_dir / entry["unit"]
        try:
            images, labels, paths = _read_set(folder, name)
            extra = {}
            if (folder / f"{name}.fine.npy").is_file():
                extra = dict(
                    fine=np.load(folder / f"{name}.fine.npy", mmap_mode="r"),
                    coarse=np.load(folder / f"{name}.coarse.npy", mmap_mode="r"),
                    fine_names=tuple(entry["fine_names"]),
                    coarse_names=tuple(entry["coarse_names"]),
                )
        except FileNotFoundError as e:
            raise CacheError(
                f"{cache_dir}: set {name} is incomplete ({e.filename} is missing); prepare the cache again"
            ) from e
        if len(images) != entry["n"]:
            raise CacheError(
                f"{cache_dir}: set {name} has {len(images)} rows, the manifest says {entry['n']}; prepare the cache again"
            )
        out[name] = ImageSet(images=images, labels=labels, name=name, paths=paths, **extra)
    return out


def cache_hash(cache_dir: str | Path) -> str:
    """A short hash of the prepared data: input file contents and every preprocessing and split choice."""
    return read_manifest(cache_dir)["cache_hash"]
