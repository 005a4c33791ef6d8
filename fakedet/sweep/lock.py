"""One driver per sweep: a lock on `<storage>/<name>` held for the driver's whole life.

Two drivers of one sweep (a second `--resume`, or a new sweep given a running one's `--name`) would
train the same trials into the same folders and log every point twice. The lock is `filelock`'s
`FileLock`, an `flock` on `<storage>/<name>.lock` beside the sweep's folder (not in it: Ray restores
and syncs that folder). The kernel drops an `flock` when its process dies, however it dies, so a
killed driver leaves no stale lock; the holder's pid and host, written to `<name>.lock.holder`, are
only what the refusal shows. A storage URI (s3://, gs://) cannot be locked: the lock then lives in a
local folder, so it guards against a second driver on the same machine only (cluster/README.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from fakedet.config import default_cache_root
from fakedet.sweep.refusals import Exit, Refused

HOLDER_SUFFIX = ".holder"


def lock_path(storage: str, name: str) -> Path:
    """Where the lock of sweep `name` lives: beside its folder, or (storage URI) under the local cache."""
    if "://" in storage:
        digest = hashlib.sha256(f"{storage}/{name}".encode()).hexdigest()[:16]
        return Path(default_cache_root()) / "sweep-locks" / f"{name}-{digest}.lock"
    return Path(storage) / f"{name}.lock"


def holder(path: Path) -> str:
    """Who holds the lock at `path`, as its holder file says."""
    try:
        info = json.loads(Path(str(path) + HOLDER_SUFFIX).read_text())
        return f"pid {info['pid']} on {info['host']}, since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet written its pid"


@contextmanager
def sweep_lock(storage: str, name: str) -> Iterator[Path]:
    """Hold the lock of sweep `name` for the body; refuse at once (`Exit.SWEEP_LOCKED`) when another driver holds it."""
    path = lock_path(storage, name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Refused(f"cannot create the sweep lock {path}: {e.strerror}; --storage-path must be a writable folder",
                      Exit.STORAGE_READONLY) from None
    lock = FileLock(path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise Refused(f"sweep {name!r} is being run by another driver ({holder(path)}; lock {path}); "
                      f"wait for it to end, or stop that process", Exit.SWEEP_LOCKED) from None
    except OSError as e:
        raise Refused(f"cannot take the sweep lock {path}: {e.strerror}", Exit.STORAGE_READONLY) from None
    holder_file = Path(str(path) + HOLDER_SUFFIX)
    try:
        holder_file.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                           "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}))
        yield path
    finally:
        try:
            holder_file.unlink(missing_ok=True)
        finally:
            lock.release()
