"""Writing a cache: units built whole or not at all, the writers' lock, and pruning.

A unit is one build step's output (fakedet.data.builders lists them), in `units/<name>-<key>/`. It
is built in a temporary folder and renamed into place, so a crash never leaves half of one; the key
is a digest of everything its contents depend on, so an existing unit is reused as it is.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from filelock import FileLock, Timeout

from fakedet import REAL
from fakedet.data.cache import read_set

log = logging.getLogger("fakedet.data")


class Stale(Exception):
    """A unit the cache needs is missing (raised by a UnitStore that may not build)."""


def digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def content_digest(relpaths: list[str], digests: list[str]) -> str:
    h = hashlib.sha256()
    for rel, d in zip(relpaths, digests):
        h.update(f"{rel}\0{d}\n".encode())
    return h.hexdigest()


def save_set(
    folder: Path, name: str, images: np.ndarray, labels: np.ndarray, paths: list[str] | np.ndarray, **extra: np.ndarray
) -> dict:
    np.save(folder / f"{name}.images.npy", np.ascontiguousarray(images, dtype=np.uint8))
    np.save(folder / f"{name}.labels.npy", np.asarray(labels, dtype=np.uint8))
    np.save(folder / f"{name}.paths.npy", np.asarray(paths, dtype=str))
    for k, v in extra.items():
        np.save(folder / f"{name}.{k}.npy", v)
    n_real = int((np.asarray(labels) == REAL).sum())
    return {"n": len(labels), "real": n_real, "fake": len(labels) - n_real}


@dataclass
class UnitStore:
    """The units of the cache at `root`.

    With `building` False nothing is written: a missing unit raises Stale, and messages are held
    until `flush` (a pass that finds the cache stale is followed by a locked one that says them).
    That is how a current cache is used without the writers' lock, e.g. on a read-only store.
    """

    root: Path
    building: bool = True
    _held: list[tuple[int, str, tuple]] = field(default_factory=list)

    def say(self, level: int, msg: str, *args: object) -> None:
        if self.building:
            log.log(level, msg, *args)
        else:
            self._held.append((level, msg, args))

    def flush(self) -> None:
        for level, msg, args in self._held:
            log.log(level, msg, *args)
        self._held.clear()

    def read(self, rel: str, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return read_set(self.root / rel, name)

    def unit(self, name: str, key: str, build: Callable[[Path], dict]) -> tuple[str, dict]:
        """The unit `name` with cache key `key`: reused if present, else built into a temp dir and renamed.
        The returned info has `cached` True when it was reused."""
        rel = f"units/{name}-{key[:16]}"
        final = self.root / rel
        info_path = final / "info.json"
        if info_path.is_file():
            self.say(logging.INFO, "%s: cached (%s)", name, rel)
            return rel, {**json.loads(info_path.read_text()), "cached": True}
        if not self.building:
            raise Stale(f"{rel} is missing")
        tmp = self.root / "units" / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
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

    def warn_skips(self, what: str, info: dict, deliberate: Collection[str] = ()) -> None:
        """Say which files decoding skipped; `deliberate`: the paths a source breaks on purpose (the
        stand-in's, `synthetic.DELIBERATE_CORRUPT`), said to be expected rather than warned about."""
        skipped = info["skipped"]
        if skipped and info.get("cached"):
            self.say(logging.INFO, "%s: %d file(s) skipped when decoded; listed in manifest.json", what, len(skipped))
            return
        planted = [s for s in skipped if s["path"] in deliberate]
        skipped = [s for s in skipped if s["path"] not in deliberate]
        if planted:  # said at WARNING, so that a sweep (which shows only warnings of fakedet.data) says it too
            self.say(logging.WARNING, "%s: %d file(s) skipped as intended: the stand-in breaks %s on purpose, as the "
                     "real AGIRI has corrupt files; listed in manifest.json", what, len(planted),
                     ", ".join(repr(s["path"].rsplit("/", 1)[-1]) for s in planted))  # fmt: skip
        if skipped:
            head = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:3])
            more = f" (and {len(skipped) - 3} more)" if len(skipped) > 3 else ""
            self.say(
                logging.WARNING,
                "%s: skipped %d file(s): %s%s; all are listed in manifest.json",
                what,
                len(skipped),
                head,
                more,
            )

    def prune(self, keep: set[str]) -> None:
        """Remove units not in `keep` (and temp folders of crashed builds)."""
        units = self.root / "units"
        if not units.is_dir():
            return
        for p in units.iterdir():
            if f"units/{p.name}" not in keep:
                shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def writer_lock(path: Path, what: str) -> Iterator[None]:
    """An exclusive lock on `path` (filelock: flock on POSIX) held for the block; says so if it must wait."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting for another process %s (lock %s)", what, path)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()
