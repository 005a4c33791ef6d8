"""Reading a prepared cache: the manifest, and every set as a memory map. All a trial needs.

Layout of a cache directory (what `fakedet prepare --cache DIR` writes; fakedet.data.build):

    DIR/manifest.json              what is there, counts, skips, options, hashes (written last, atomically)
    DIR/units/<unit>-<key>/        one build step's output: <set>.images.npy, .labels.npy, .paths.npy,
                                   (.fine.npy, .coarse.npy; .masks.npy: the stand-in's object masks), info.json
    DIR/.lock                      held while preparing: concurrent prepares of DIR take turns

Units are renamed into place when complete and the manifest is replaced atomically after all its
units exist, so a reader needs no lock: it sees the old cache or the new one, never a mix. A
cache on a read-only store is read as it is.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fakedet.arrays import ImageSet
from fakedet.data.errors import CacheError

FORMAT = "fakedet-cache/1"
SET_NAMES = (
    "cifake_train",
    "cifake_val",
    "cifake_test",
    "agiri_train",
    "agiri_val",
    "agiri_test",
    "cifar100_test",
    "cifar100_test_jpeg",
)
# What a cache holds unless `PrepareOptions.agiri_train` asked for AGIRI's training images too (train_on)
DEFAULT_SET_NAMES = tuple(n for n in SET_NAMES if n != "agiri_train")


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


def read_set(folder: Path, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images (memory-mapped), labels and source paths of set `name` in a unit folder."""
    # Copy-on-write maps: nothing is read until used, a write never reaches the cache file, and
    # torch.from_numpy accepts them without its "non-writable array" warning (a read-only map
    # would trigger it in every consumer that wraps the images in a tensor).
    return (
        np.load(folder / f"{name}.images.npy", mmap_mode="c"),
        np.load(folder / f"{name}.labels.npy"),
        np.load(folder / f"{name}.paths.npy"),
    )


def load_splits(cache_dir: str | Path) -> dict[str, ImageSet]:
    """Every set in a prepared cache, memory-mapped: cifake_train, cifake_val, cifake_test,
    agiri_val, agiri_test, cifar100_test and (when prepared) cifar100_test_jpeg and agiri_train.

    A cache prepared with `--only` holds the sets of those datasets alone.
    """
    cache_dir = Path(cache_dir).expanduser()
    manifest = read_manifest(cache_dir)
    out: dict[str, ImageSet] = {}
    for name, entry in manifest["sets"].items():
        folder = cache_dir / entry["unit"]
        try:
            images, labels, paths = read_set(folder, name)
            extra = {}
            if (folder / f"{name}.masks.npy").is_file():  # the stand-in's object masks (ImageSet.masks)
                extra["masks"] = np.load(folder / f"{name}.masks.npy", mmap_mode="r")
            if (folder / f"{name}.fine.npy").is_file():
                extra.update(
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
