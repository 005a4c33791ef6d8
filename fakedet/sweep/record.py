"""The sweep file kept beside Ray's results (`<storage>/<name>/fakedet_sweep.json`): what `--resume`
needs to rebuild the same sweep (its request, the resolved study it ran, the bundle size, tracking store,
parent run, data hash), and what `cutoff` reads the study from."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.fs

from fakedet.sweep.refusals import Exit, Refused
from fakedet.sweep.study import Study, StudyError

SWEEP_FILE = "fakedet_sweep.json"


def storage_root(storage_path: str | None) -> str:
    """Ray Tune's storage: an absolute local folder (default ./ray_results) or a URI (s3://, gs://, ...)."""
    if storage_path and "://" in storage_path:
        return storage_path.rstrip("/")
    return str(Path(storage_path or Path.cwd() / "ray_results").resolve())


def _fs(storage: str):
    """(pyarrow filesystem, path in it) for a local folder or a URI, as Ray Tune itself resolves storage."""
    if "://" in storage:
        return pyarrow.fs.FileSystem.from_uri(storage)
    return pyarrow.fs.LocalFileSystem(), storage


def sweep_exists(storage: str, name: str) -> bool:
    fs, root = _fs(storage)
    return fs.get_file_info(f"{root}/{name}").type != pyarrow.fs.FileType.NotFound


def tune_state_saved(storage: str, name: str) -> bool:
    """Whether Tune has saved its state (`tuner.pkl`) for sweep `name`: a sweep stopped while it was being
    planned has its sweep file, but no Tune state to restore."""
    fs, root = _fs(storage)
    return fs.get_file_info(f"{root}/{name}/tuner.pkl").type == pyarrow.fs.FileType.File


# what --resume reads from the sweep file before anything else: without one of them it cannot go on
REQUIRED = ("kind", "name", "tracking_uri", "experiment", "parent_run_id")


def write_sweep_file(storage: str, name: str, meta: dict[str, Any]) -> None:
    """Written whole or not at all: to a temporary name, then renamed (a full disk or a kill mid-write
    leaves the temporary file, never a truncated sweep file)."""
    fs, root = _fs(storage)
    fs.create_dir(f"{root}/{name}", recursive=True)
    tmp = f"{root}/{name}/.{SWEEP_FILE}.tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(json.dumps(meta, indent=1, default=str).encode())
    fs.move(tmp, f"{root}/{name}/{SWEEP_FILE}")


def read_sweep_file(storage: str, name: str, kind: str) -> dict[str, Any]:
    """The sweep file of `name` (or of the most recent `kind` sweep for `latest`)."""
    fs, root = _fs(storage)

    def read(path: str) -> dict:
        with fs.open_input_stream(path) as f:
            raw = f.read()
        try:
            meta = json.loads(raw.decode())
        except ValueError as e:  # truncated (a full disk, a kill mid-write before writes were atomic) or edited
            raise Refused(f"the sweep file {path} is not valid JSON ({len(raw)} bytes; {e}); restore it from a backup, "
                          f"or start the sweep again under a new --name (its MLflow runs stay as they are)",
                          Exit.CORRUPT_STATE) from None
        if not isinstance(meta, dict):
            raise Refused(f"the sweep file {path} holds a JSON {type(meta).__name__}, not an object; restore it from a "
                          f"backup, or start the sweep again under a new --name", Exit.CORRUPT_STATE)
        return meta

    if name == "latest":
        metas = []
        for info in fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True)):
            path = f"{info.path}/{SWEEP_FILE}"
            if info.type == pyarrow.fs.FileType.Directory and fs.get_file_info(path).type == pyarrow.fs.FileType.File:
                meta = read(path)
                if meta.get("kind") == kind:
                    metas.append((fs.get_file_info(path).mtime, meta))
        if not metas:
            raise StudyError(f"--resume: no {kind} sweep found under {storage}")
        meta = max(metas, key=lambda m: m[0])[1]
    else:
        path = f"{root}/{name}/{SWEEP_FILE}"
        if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
            raise StudyError(f"--resume: no sweep {name!r} under {storage} (expected {path})")
        meta = read(path)
    if meta.get("kind") != kind:
        raise StudyError(f"--resume: sweep {meta.get('name')!r} is a {meta.get('kind')} sweep, not {kind}")
    return meta


def check_resumable(meta: dict[str, Any], storage: str) -> dict[str, Any]:
    """`meta` when it holds what `--resume` reads first (`REQUIRED`), else one line naming the file and the keys."""
    missing = [k for k in REQUIRED if not meta.get(k)]
    if missing:
        raise Refused(f"the sweep file {storage}/{meta.get('name')}/{SWEEP_FILE} lacks {', '.join(missing)}: --resume cannot find "
                      f"the sweep's tracking store and parent run without them; restore the file from a backup, or start "
                      f"the sweep again under a new --name", Exit.CORRUPT_STATE)
    return meta


def recorded_choices(meta: dict[str, Any]) -> dict[str, Any]:
    """The request's recorded choices (sweep files before the request was recorded kept them as `args`)."""
    return meta.get("request", meta.get("args", {}))


def recorded_study(meta: dict[str, Any], where: str) -> Study | None:
    """The resolved study the sweep ran, checked by the study schema; None in a sweep file without one."""
    if not meta.get("study"):
        return None
    return Study.from_sections(meta["study"], source=meta.get("study_source") or where)
