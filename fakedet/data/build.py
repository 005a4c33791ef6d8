"""`prepare`: decode the datasets once into a cache (fakedet.data.cache describes its layout).

Each dataset's units come from fakedet.data.builders; this module resolves the sources, runs the
builders under the cache's writers' lock, and writes the manifest: atomically, after all its units
exist, so a reader sees the old cache or the new one, never a mix. A cache that is already current
for the given sources and options is used without the lock and without any write, so a shared
read-only store works.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import PIL

from fakedet import __version__
from fakedet.data.builders import Made, cifar100_entry, image_folder_entry
from fakedet.data.cache import FORMAT, SET_NAMES, read_manifest
from fakedet.data.errors import CacheError, DataError, LayoutError
from fakedet.data.jpeg import DEFAULT_QUALITY
from fakedet.data.options import PrepareOptions
from fakedet.data.sources import DATASETS, SOURCES, download, find_root
from fakedet.data.units import Stale, UnitStore, digest, writer_lock

STANDIN_MARKER = "STANDIN.json"

log = logging.getLogger("fakedet.data")

Roots = dict[str, tuple[Path, Path, dict]]  # dataset → (the path given, its root, where it came from)


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
    roots: Roots = {}
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
        roots[ds] = (given, find_root(ds, given), origin)

    # a current cache needs no lock and no write: check it with a store that may not build
    old = _old_manifest(cache_dir)
    if old is not None:
        check = UnitStore(cache_dir, building=False)
        with contextlib.suppress(Stale):
            datasets, sets = _entries(check, roots, selected, old, options, workers, show_progress)
            if _same(old, sets, datasets, options):
                check.flush()
                log.info("%s: up to date (cache %s)", cache_dir, old["cache_hash"])
                return old  # nothing changed: leave the manifest (and its dates) alone

    with contextlib.ExitStack() as stack:
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            stack.enter_context(writer_lock(cache_dir / ".lock", f"preparing {cache_dir}"))
        except OSError as e:
            raise CacheError(
                f"{cache_dir}: cannot write here ({e.strerror or e}), and the cache is not current for these "
                f"sources and options; prepare it where it can be written (or pass --data {cache_dir} to use it as it is)"
            ) from None
        store = UnitStore(cache_dir)
        _remove_stale_temps(cache_dir)
        old = _old_manifest(cache_dir)  # another process may have written it while we waited
        datasets, sets = _entries(store, roots, selected, old, options, workers, show_progress)
        if old and _same(old, sets, datasets, options):
            log.info("%s: up to date (cache %s)", cache_dir, old["cache_hash"])
            return old
        manifest = {
            "format": FORMAT,
            "cache_hash": digest({k: v["content"] for k, v in sets.items()})[:12],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "options": options.record(),
            "datasets": datasets,
            "sets": sets,
            "versions": _versions(),
            "prepare_seconds": round(time.perf_counter() - t_start, 3),
        }
        tmp = cache_dir / f".manifest-{uuid.uuid4().hex[:8]}.json"
        tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
        os.replace(tmp, cache_dir / "manifest.json")
        store.prune({u for d in datasets.values() for u in d.get("units", [])} | {v["unit"] for v in sets.values()})
    return manifest


def _remove_stale_temps(cache_dir: Path) -> None:
    """The temporary folders and manifests of a build that was killed (kill -9 skips its own cleanup), removed
    before building: under the writers' lock no other build is running, so every one is stale."""
    import shutil

    for tmp in [*(cache_dir / "units").glob(".tmp-*"), *cache_dir.glob(".manifest-*.json")]:
        log.info("%s: removing %s, left by a build that was stopped", cache_dir, tmp.name)
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def _old_manifest(cache_dir: Path) -> dict | None:
    if not (cache_dir / "manifest.json").is_file():
        return None
    with contextlib.suppress(DataError, json.JSONDecodeError):
        return read_manifest(cache_dir)
    return None


def _entries(
    store: UnitStore,
    roots: Roots,
    selected: tuple[str, ...],
    old: dict | None,
    options: PrepareOptions,
    workers: int | None,
    show_progress: bool,
) -> tuple[dict[str, dict], dict[str, dict]]:
    """The manifest's `datasets` and `sets`: the selected datasets' from their units (reused or
    built), the others' from the old manifest."""
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
        made: Made
        if ds == "cifar100":
            quality, why = options.jpeg_quality, "given"
            if quality is None:
                q = (datasets.get("cifake") or {}).get("jpeg_quality_estimate")
                quality, why = (
                    (q, "CIFAKE's REAL files' estimated quality")
                    if q
                    else (DEFAULT_QUALITY, "Pillow's default (no CIFAKE estimate in this cache)")
                )
            part, made = cifar100_entry(store, root, options, standin is not None, quality, why)
        else:
            part, made = image_folder_entry(store, ds, root, options, workers, show_progress, standin is not None)
        entry.update(part)
        entry["units"] = [rel for rel, _, _ in made]
        entry["seconds"] = round(time.perf_counter() - t0, 3)
        datasets[ds] = entry
        for rel, info, extra in made:
            for name, counts in info.get("sets", {}).items():
                if name in SET_NAMES:
                    sets[name] = {"dataset": ds, "unit": rel, **counts, "content": info["content"], **extra}
    return datasets, {k: sets[k] for k in SET_NAMES if k in sets}


def _standin_info(path: Path, root: Path) -> dict | None:
    for p in (root, path, root.parent):
        marker = p / STANDIN_MARKER
        if marker.is_file():
            return json.loads(marker.read_text())
    return None


def _same(old: dict, sets: dict, datasets: dict, options: PrepareOptions) -> bool:
    def norm(x: object) -> object:  # as JSON has it (tuples → lists, ...)
        return json.loads(json.dumps(x, default=str))

    def strip(d: dict) -> dict:
        return {k: {f: v for f, v in e.items() if f != "seconds"} for k, e in d.items()}

    return norm([old.get("sets"), old.get("options"), strip(old.get("datasets", {}))]) == norm(
        [sets, options.record(), strip(datasets)]
    )


def _versions() -> dict:
    return {
        "fakedet": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "platform": sys.platform,
    }
