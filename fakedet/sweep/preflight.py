"""Pre-flight: everything a sweep needs from outside, checked in a few seconds before data are prepared
or Ray is started, each failure one line with its own exit status (`refusals.Exit`).

In order: the tracking store answers; it accepts the credentials (MLflow reads them from
MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN); the user may create runs in the
experiment (a probe run is created and deleted again: a real write, since a read-only user can read
and a revoked one can still log in); the Ray storage path and the prepared-data cache can be written.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import pyarrow.fs
from mlflow.tracking import MlflowClient

from fakedet.sweep.refusals import Exit, Refused, disk_full
from fakedet.sweep.store import check_tracking_uri, ensure_experiment, store_lock
from fakedet.sweep.tags import TAG_KIND
from fakedet.sweep.writer import first_line, http_status, transient

# MLflow's REST client retries a refused connection or a 5xx for minutes (7 retries, 120 s each); the
# pre-flight asks once. 30 s: a basic-auth server hashes the password on every request, which took
# up to 10 s on this project's loaded 2-core machine; a healthy server answers in milliseconds.
PROBE_RETRIES = "0"
PROBE_TIMEOUT_S = "30"


@contextmanager
def answering_quickly() -> Iterator[None]:
    """MLflow clients made in the body ask once, with a short timeout, instead of retrying for minutes."""
    with mock.patch.dict(os.environ, {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": PROBE_RETRIES,
                                      "MLFLOW_HTTP_REQUEST_TIMEOUT": PROBE_TIMEOUT_S}):
        yield


def refusal_for_status(status: int | None, uri: str, detail: str) -> Refused:
    """The refusal for a tracking store's answer: wrong credentials, a missing permission, or another refusal."""
    if status == 401:
        return Refused(f"the MLflow tracking server {uri} refused the credentials (HTTP 401: {detail}); set "
                       f"MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)", Exit.BAD_CREDENTIALS)
    if status == 403:
        return Refused(f"the MLflow tracking server {uri} does not let this user create runs in the experiment "
                       f"(HTTP 403: {detail}); ask its admin for EDIT permission, or pass another --experiment", Exit.NOT_PERMITTED)
    return Refused(f"the MLflow tracking store {uri} refused a write ({detail})", Exit.NOT_PERMITTED)


def check_tracking(uri: str, experiment: str) -> None:
    """The store reachable, the credentials accepted, and a run created (then deleted) in `experiment`."""
    try:
        check_tracking_uri(uri)
    except ConnectionError as e:
        code = Exit.TRACKING_DOWN if uri.startswith(("http://", "https://")) else \
            Exit.NOT_PERMITTED if uri.startswith("sqlite:///") else Exit.BAD_REQUEST
        raise Refused(str(e), code) from None
    try:
        with answering_quickly():
            _probe_write(uri, experiment)
    except Exception as e:  # noqa: BLE001 - every failure of the probe becomes one line
        if disk_full(e):
            raise Refused(f"the MLflow tracking store {uri} has no space left to write to (SQLite: {first_line(e)}); "
                          f"free space on its device", Exit.DISK_FULL) from None
        if transient(e):
            raise Refused(f"the MLflow tracking store {uri} did not answer ({first_line(e)}); start it or pass another --tracking-uri",
                          Exit.TRACKING_DOWN) from None
        raise refusal_for_status(http_status(e), uri, first_line(e)) from None


def _probe_write(uri: str, experiment: str) -> None:
    lock = store_lock(uri)
    if lock is not None:
        with lock:  # the first client of a new SQLite file creates its schema (see store_lock)
            MlflowClient(uri).search_experiments(max_results=1)
    client = MlflowClient(uri)
    experiment_id = ensure_experiment(client, uri, experiment)
    probe = client.create_run(experiment_id, run_name=f"fakedet-preflight-{secrets.token_hex(3)}", tags={TAG_KIND: "preflight"})
    client.set_terminated(probe.info.run_id, "KILLED")
    try:
        client.delete_run(probe.info.run_id)
    except Exception:  # noqa: BLE001 - EDIT may create runs but not delete them (that needs MANAGE): it stays, ended
        pass


def check_writable(path: str, what: str, code: Exit) -> None:
    """`path` (a folder, or a storage URI) exists or can be made, and a file can be written in it and removed."""
    probe_name = f".fakedet-preflight-{secrets.token_hex(4)}"
    try:
        if "://" in path:
            fs, root = pyarrow.fs.FileSystem.from_uri(path)
            fs.create_dir(root, recursive=True)
            with fs.open_output_stream(f"{root}/{probe_name}") as f:
                f.write(b"probe")
            fs.delete_file(f"{root}/{probe_name}")
            return
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / probe_name
        probe.write_bytes(b"probe")
        probe.unlink()
    except OSError as e:  # pyarrow raises OSError subclasses too
        why = e.strerror or first_line(e)
        if disk_full(e):
            raise Refused(f"no space left on the device of the {what} {path}; free space there or pass another one",
                          Exit.DISK_FULL) from None
        raise Refused(f"cannot write the {what} {path} ({why}); make it writable or pass another one", code) from None


# Ray storage per model and evaluation point: the checkpoint (`state.pt`: weights, optimizer state, history)
# and, at a cell's epochs, the cell's artifacts. Measured on the smoke ablation (the study's CNN, 6 trials, 3
# points each): 15.3 MB for 18 checkpoints, 0.85 MB each; rounded up.
CHECKPOINT_BYTES = 1 << 20


def storage_estimate(trajectory_points: list[int]) -> int:
    """Bytes the sweep's checkpoints take in Ray's storage, for the evaluation points of each trajectory
    (every point of every model is kept: `execute.run_config`)."""
    return sum(trajectory_points) * CHECKPOINT_BYTES


def check_free_space(storage: str, needed: int, what: str) -> None:
    """Refuse (`Exit.DISK_FULL`) a sweep whose checkpoints would not fit on its storage's device (local
    storage; a storage URI's space is not known here)."""
    if "://" in storage:
        return
    folder = Path(storage)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise Refused(f"the Ray storage path {storage} has {free / 2**20:.0f} MiB free; {what} need about "
                      f"{needed / 2**20:.0f} MiB ({CHECKPOINT_BYTES / 2**20:g} MiB per model and evaluation point, "
                      f"measured on the study's CNN): free space, or pass another --storage-path", Exit.DISK_FULL)


def preflight(tracking_uri: str, experiment: str, storage: str, cache_root: str, needs_cache: bool = True) -> None:
    """All the pre-flight checks, cheapest first."""
    check_writable(storage, "Ray storage path (--storage-path)", Exit.STORAGE_READONLY)
    if needs_cache:
        check_writable(cache_root, "prepared-data cache (--cache-root)", Exit.CACHE_READONLY)
    check_tracking(tracking_uri, experiment)  # silent when all is well: the sweep's first line names the store
