"""No code from data: what must hold before Ray is allowed to unpickle a sweep's saved state.

`Tuner.restore` unpickles `tuner.pkl`, the experiment-state files (cloudpickled trials inside JSON)
and the searcher's state, and Ray keeps each trial's config as `params.pkl`; whoever can write those
files can run code as the user who resumes. So before a restore, as ssh's StrictModes does for
`authorized_keys`, the storage folder, the sweep's folder and every such file must belong to this
user (or root) and be writable by no one else; and the files must be the ones this sweep's driver
left at its last stop: their SHA-256 digests are recorded then in the parent MLflow run (a store the
storage path's writers cannot write), and compared before the next restore. fakedet's own replay
reads only JSON (`result.json`), never `params.pkl`.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

from fakedet.sweep.record import SWEEP_FILE
from fakedet.sweep.refusals import Exit, Refused

# the parent run's tag holding the digest of the saved state at the driver's last stop
TAG_STATE_DIGEST = "fakedet.ray_state_sha256"
# beside the state: which file had which digest (only to name the file that changed; the tag decides)
MANIFEST_FILE = "fakedet_state_manifest.json"
ACCEPT_FLAG = "--trust-changed-state"
_OURS = {SWEEP_FILE, MANIFEST_FILE}


def state_files(experiment_dir: Path) -> list[Path]:
    """What Ray may unpickle on a restore: the folder's own `.pkl`/`.json` files (but fakedet's JSON) and
    every `.pkl` below it (trials' `params.pkl`, checkpoint metadata)."""
    top = [p for p in experiment_dir.iterdir() if p.suffix in (".pkl", ".json") and p.name not in _OURS]
    below = [p for p in experiment_dir.rglob("*.pkl") if p.parent != experiment_dir]
    return sorted(top + below)


def state_manifest(experiment_dir: Path) -> dict[str, str]:
    manifest = {}
    for path in state_files(experiment_dir):
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        manifest[path.relative_to(experiment_dir).as_posix()] = digest.hexdigest()
    return manifest


def manifest_digest(manifest: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def check_ownership(storage: Path, experiment_dir: Path) -> None:
    """Refuse (`Exit.UNTRUSTED_STATE`) state another user could have written: any of the storage folder, the
    sweep's folder, the folders holding state files and the files themselves owned by someone else
    (but root) or writable by group or others, or a state file that is a symbolic link."""
    uid = os.getuid()
    files = state_files(experiment_dir)
    for path in [storage, experiment_dir, *sorted({f.parent for f in files}), *files]:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode) and path in files:
            raise Refused(f"refusing to restore {experiment_dir}: {path} is a symbolic link; Ray would unpickle "
                          f"whatever it points to", Exit.UNTRUSTED_STATE)
        st = os.stat(path)
        if st.st_uid not in (uid, 0):
            raise Refused(f"refusing to restore {experiment_dir}: {path} belongs to uid {st.st_uid}, not you (uid {uid}); "
                          f"Ray would run code its owner wrote", Exit.UNTRUSTED_STATE)
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise Refused(f"refusing to restore {experiment_dir}: {path} is writable by "
                          f"{'others' if st.st_mode & stat.S_IWOTH else 'its group'} (mode {stat.S_IMODE(st.st_mode):o}); "
                          f"if no one else wrote it: chmod -R go-w {path}", Exit.UNTRUSTED_STATE)


def check_state(storage: Path, experiment_dir: Path, recorded_digest: str | None, accept_changed: bool) -> str | None:
    """Before a restore: ownership and permissions (always), then the state's digest against the one
    recorded at the last stop. Returns a warning to print when a changed state is accepted. Without
    `tuner.pkl` nothing is restored (Tune starts the recorded plan afresh), so no digest is asked for."""
    check_ownership(storage, experiment_dir)
    if not (experiment_dir / "tuner.pkl").is_file():
        return None  # Tune saved no state (stopped while planning): nothing is restored, the plan starts afresh
    manifest = state_manifest(experiment_dir)
    if manifest_digest(manifest) == recorded_digest:
        return None
    why = "no digest was recorded (the driver never stopped cleanly, or the sweep predates the check)" \
        if recorded_digest is None else f"{_changed(experiment_dir, manifest)} changed since this sweep's driver last stopped"
    risk = "Ray unpickles these files, so whoever wrote them can run code as you"
    if accept_changed:
        return f"restoring {experiment_dir} although {why}, as {ACCEPT_FLAG} asks ({risk})"
    raise Refused(f"refusing to restore {experiment_dir}: {why}. {risk}; if only this sweep's own driver wrote them "
                  f"(it was killed), pass {ACCEPT_FLAG}", Exit.UNTRUSTED_STATE)


def _changed(experiment_dir: Path, manifest: dict[str, str]) -> str:
    try:
        before = json.loads((experiment_dir / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return "the saved state"
    changed = sorted(k for k in set(before) | set(manifest) if before.get(k) != manifest.get(k))
    if not changed:
        return "the saved state"
    return ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")


def record_state(experiment_dir: Path) -> tuple[str, dict[str, str]] | None:
    """The digest and manifest of the state as the driver leaves it (None when Tune never saved any);
    the manifest is written beside it."""
    if not (experiment_dir / "tuner.pkl").is_file():
        return None
    manifest = state_manifest(experiment_dir)
    try:
        (experiment_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    except OSError:  # a full disk: the manifest only names what changed, the digest (in MLflow) decides
        (experiment_dir / MANIFEST_FILE).unlink(missing_ok=True)
    return manifest_digest(manifest), manifest
