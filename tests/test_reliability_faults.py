"""Faults met mid-work, each one line naming the file or the device, nothing lost: a full disk, corrupt
saved state, SIGTERM, a stdout that cannot show a character or has gone, a decoder asked for a huge 16-bit
image, a driver killed while it planned. In-process and fast; tests/test_reliability_sweeps.py runs the
faults through whole sweeps."""

from __future__ import annotations

import io
import json
import os
import pathlib
import signal
import subprocess
import sys
import tracemalloc
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from fakedet import sweep_cli
from fakedet.data.decode import DecodeOptions, decode_image
from fakedet.sweep.execute import FatalStop, fatal_refusal, restore_tuner
from fakedet.sweep.lock import sweep_lock
from fakedet.sweep.preflight import check_free_space, check_tracking, check_writable, storage_estimate
from fakedet.sweep.record import SWEEP_FILE, read_sweep_file, tune_state_saved
from fakedet.sweep.refusals import Exit, FatalTrialError, Refused, Stopping, disk_full
from fakedet.sweep.store import SweepTracking
from fakedet.sweep.trainable import STATE_FILE, load_state
from fakedet.sweep.trust import check_state

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


# -- a full disk -------------------------------------------------------------------------------------
@pytest.fixture
def full_disk(tmp_path):
    """A 4 MB tmpfs filled to the last byte (root may mount one; elsewhere the test is skipped)."""
    mount = tmp_path / "full"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.strip() or made.returncode}): no real full disk to test on")
    try:
        (mount / "storage").mkdir()
        with open(mount / "filler", "wb") as f:
            try:
                while True:
                    f.write(b"\0" * (1 << 16))
                    f.flush()
            except OSError:
                pass
        # the last blocks: one byte at a time
        with open(mount / "filler-tail", "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0")
            except OSError:
                pass
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_one_line_with_its_own_status(full_disk):
    for what, code in (("Ray storage path", Exit.STORAGE_READONLY), ("prepared-data cache", Exit.CACHE_READONLY)):
        with pytest.raises(Refused) as refused:
            check_writable(str(full_disk / "storage"), what, code)
        assert refused.value.code == Exit.DISK_FULL and str(full_disk) in str(refused.value) and "\n" not in str(refused.value)
    with pytest.raises(Refused) as refused:  # SQLite on a full device: "database or disk is full", not a traceback
        check_tracking(f"sqlite:///{full_disk / 'storage' / 'mlflow.db'}", "exp")
    assert refused.value.code == Exit.DISK_FULL and "\n" not in str(refused.value), refused.value


def test_a_tracking_store_that_filled_mid_sweep_ends_it_as_a_full_disk():
    """SQLite's "database or disk is full" mid-sweep: the writer waits for it as an outage, then the sweep
    ends with the store's one line and exit 72, not 75."""
    import sqlalchemy.exc

    from fakedet.sweep.writer import unavailable

    full = sqlalchemy.exc.OperationalError("INSERT INTO metrics", {}, Exception("database or disk is full"))
    error = unavailable("sqlite:////data/mlflow.db", full, 600)
    assert sweep_cli.tracking_exit(error.status, str(error)) == Exit.DISK_FULL and "\n" not in str(error)
    assert sweep_cli.tracking_exit(None, "the MLflow tracking store x was unreachable for over 600 s") == Exit.TRACKING_OUTAGE


def test_the_command_line_says_a_full_cache_in_one_line(full_disk, capsys, monkeypatch):
    """The error a full cache really raises (a unit written onto the full tmpfs, after the pre-flight's probe
    passed), as the sweep's command line meets it: one line naming the cache, exit 72; the unit's
    temporary folder is gone and no half-written unit is left."""
    from fakedet.data.units import UnitStore, save_set

    cache = full_disk / "cache"
    store = UnitStore(cache)
    images = np.zeros((1000, 32, 32, 3), np.uint8)
    with pytest.raises(OSError) as met:
        store.unit("cifake-train", "0" * 16, lambda tmp: save_set(tmp, "cifake_train", images, np.zeros(1000), ["x"] * 1000))
    assert disk_full(met.value) is not None and list((cache / "units").iterdir()) == []

    def full(request):
        raise met.value

    monkeypatch.setattr(sweep_cli, "run_study", full)
    assert sweep_cli.main(["ablation", "--smoke", "--cache-root", str(cache)]) == Exit.DISK_FULL
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no space left" in err[0] and str(full_disk) in err[0], err


def test_enospc_is_recognised_wherever_it_is_met():
    assert disk_full(OSError(28, "No space left on device", "/data/cache/x.npy")) == "/data/cache/x.npy"
    wrapped = RuntimeError("copy failed")
    wrapped.__cause__ = OSError(28, "No space left on device")
    assert disk_full(wrapped) is not None
    assert disk_full(RuntimeError("(sqlite3.OperationalError) database or disk is full")) is not None
    assert disk_full(OSError(13, "Permission denied", "/x")) is None
    # a trial's error as Ray hands it to the driver: text, the file named by the OS
    text = ("Failure # 1 (occurred at 2026-12-03)\nray::run_trial() (pid=1)\n  File \"/venv/lib/ray/train/_internal/storage.py\"\n"
            "OSError: [Errno 28] No space left on device: '/mnt/results/s1/trial_a/checkpoint_000002/state.pt'\n")
    refusal = fatal_refusal(text)
    assert refusal.code == Exit.DISK_FULL and "/mnt/results/s1/trial_a/checkpoint_000002/state.pt" in str(refusal)
    assert fatal_refusal("Failure # 1\nValueError: a bug in the trial\n") is None  # a crash stays a crash: retried


def test_the_free_space_estimate_refuses_a_sweep_that_cannot_fit(tmp_path):
    assert storage_estimate([3, 3, 14]) == 20 * (1 << 20)
    with pytest.raises(Refused) as refused:
        check_free_space(str(tmp_path / "ray_results"), 1 << 60, "its 1 trajectories' checkpoints")
    assert refused.value.code == Exit.DISK_FULL and "MiB free" in str(refused.value)
    check_free_space(str(tmp_path / "ray_results" / "not" / "yet"), 1 << 10, "x")  # a folder still to be made: its parent's device


# -- corrupt state -----------------------------------------------------------------------------------
def resume(tmp_path, name="s1"):
    return sweep_cli.main(["ablation", "--resume", name, "--storage-path", str(tmp_path / "ray_results"),
                           "--cache-root", str(tmp_path / "cache")])


def test_a_truncated_sweep_file_is_one_line_naming_it(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "ray_results" / "s1"
    folder.mkdir(parents=True)
    (folder / SWEEP_FILE).write_text('{"kind": "ablation", "name": "s1", "tracking_u')
    assert resume(tmp_path) == Exit.CORRUPT_STATE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(folder / SWEEP_FILE) in err[0] and "not valid JSON" in err[0], err
    with pytest.raises(Refused, match="not valid JSON"):  # --resume latest meets it too
        read_sweep_file(str(tmp_path / "ray_results"), "latest", "ablation")


def test_a_sweep_file_without_its_parent_run_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "ray_results" / "s1"
    folder.mkdir(parents=True)
    (folder / SWEEP_FILE).write_text(json.dumps({"kind": "ablation", "name": "s1", "tracking_uri": "sqlite:///x.db",
                                                 "experiment": "exp", "request": {"smoke": True}}))
    assert resume(tmp_path) == Exit.CORRUPT_STATE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "parent_run_id" in err[0] and SWEEP_FILE in err[0], err
    assert not (tmp_path / "cache").exists()  # refused before the pre-flight or the data


def test_a_truncated_tuner_pkl_is_one_line_naming_it(tmp_path):
    exp = tmp_path / "s1"
    exp.mkdir()
    (exp / "tuner.pkl").write_bytes(b"\x80\x05\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94(\x8c")  # a pickle cut short
    with pytest.raises(Refused) as refused:
        restore_tuner(str(exp), lambda config: None, {})
    message = str(refused.value)
    assert refused.value.code == Exit.CORRUPT_STATE and str(exp) in message and "tuner.pkl" in message and "\n" not in message


def test_a_garbled_checkpoint_is_fatal_not_a_crash_to_retry(tmp_path):
    path = tmp_path / STATE_FILE
    torch.save({"states": [None], "diverged": [False]}, path)
    assert load_state(path, "x")["diverged"] == [False]
    raw = path.read_bytes()
    path.write_bytes(raw[:40] + b"\xff" * 64 + raw[104:])
    with pytest.raises(FatalTrialError) as fatal:
        load_state(path, "/results/s1/trial_a/checkpoint_000001/state.pt")
    # what the driver reads back from Ray's error text: the same one line, with its status
    refusal = fatal_refusal(f"Failure # 1\nTraceback ...\nfakedet.sweep.refusals.FatalTrialError: {fatal.value}\n")
    assert refusal.code == Exit.CORRUPT_STATE and "/results/s1/trial_a/checkpoint_000001/state.pt" in str(refusal)


def test_a_fatal_trial_error_stops_the_sweep_and_costs_no_retry(tmp_path):
    """FatalStop on a retried trial whose error is fatal: Tune's own stop (SIGUSR1) is raised once, and the
    failure is not counted against the trial's retries; an ordinary crash passes untouched."""
    error = tmp_path / "error.txt"
    trial = SimpleNamespace(error_file=str(error), run_metadata=SimpleNamespace(num_failures=1))
    raised = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: raised.append(signum))
    try:
        Stopping.refusal = None
        error.write_text("Failure # 1 (occurred at x)\nValueError: a bug\n")
        FatalStop().on_trial_recover(0, [], trial)
        assert raised == [] and trial.run_metadata.num_failures == 1 and Stopping.refusal is None
        error.write_text(error.read_text() + "Failure # 2 (occurred at y)\nOSError: [Errno 28] No space left on device: '/r/s1/x'\n")
        trial.run_metadata.num_failures = 2
        FatalStop().on_trial_recover(0, [], trial)
        assert raised == [signal.SIGUSR1] and trial.run_metadata.num_failures == 1
        assert Stopping.refusal.code == Exit.DISK_FULL and "/r/s1/x" in str(Stopping.refusal)
    finally:
        signal.signal(signal.SIGUSR1, previous)
        Stopping.refusal = None


# -- resumable from any moment -----------------------------------------------------------------------
def test_a_sweep_stopped_before_tune_saved_its_state_resumes_afresh(tmp_path):
    """Killed while planning: the sweep file exists, Tune's tuner.pkl does not. Nothing is unpickled, so
    nothing is refused: the resume starts the recorded plan afresh."""
    storage = tmp_path / "ray_results"
    (storage / "s1").mkdir(parents=True)
    (storage / "s1" / SWEEP_FILE).write_text("{}")
    assert not tune_state_saved(str(storage), "s1")
    assert check_state(storage, storage / "s1", None, accept_changed=False) is None
    (storage / "s1" / "tuner.pkl").write_bytes(b"x")
    assert tune_state_saved(str(storage), "s1")


def test_cutoff_closes_a_parent_left_running_by_a_killed_driver(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = tmp_path / "ray_results"
    (storage / "s1").mkdir(parents=True)
    tracking = SweepTracking.open(uri, "exp", "s1", {}, {})
    client = MlflowClient(uri)
    with sweep_lock(str(storage), "s1"):  # a live driver: left as it is
        sweep_cli.close_if_orphaned(tracking, "RUNNING", str(storage))
        assert client.get_run(tracking.parent_run_id).info.status == "RUNNING"
        assert "still running" in capsys.readouterr().out
    sweep_cli.close_if_orphaned(tracking, "RUNNING", str(storage))  # its driver gone: the lock is free
    assert client.get_run(tracking.parent_run_id).info.status == "KILLED"
    assert "no live driver" in capsys.readouterr().out


KILLED_PREPARE = r'''
import os, sys, time
from fakedet.data.decode import die_with_parent
from fakedet.data.decode import process_context
from concurrent.futures import ProcessPoolExecutor

pool = ProcessPoolExecutor(2, mp_context=process_context(), initializer=die_with_parent, initargs=(os.getpid(),))
futures = [pool.submit(time.sleep, 300) for _ in range(2)]
time.sleep(2)
print(" ".join(str(p) for p in pool._processes), flush=True)
time.sleep(300)
'''


def test_pool_workers_die_with_a_killed_parent(tmp_path):
    """kill -9 of a process decoding with a pool: its workers go with it (PR_SET_PDEATHSIG), none orphaned."""
    import psutil

    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux's")
    proc = subprocess.Popen([sys.executable, "-c", KILLED_PREPARE], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        workers = [int(p) for p in proc.stdout.readline().split()]
        assert len(workers) == 2 and all(psutil.pid_exists(p) for p in workers)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    gone, alive = psutil.wait_procs([psutil.Process(p) for p in workers if psutil.pid_exists(p)], timeout=20)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive


def test_a_killed_builds_temporary_folders_are_removed_on_the_next_start(tmp_path):
    from fakedet.data.build import _remove_stale_temps

    (tmp_path / "units" / ".tmp-cifake-train-1a2b3c4d").mkdir(parents=True)
    (tmp_path / "units" / ".tmp-cifake-train-1a2b3c4d" / "images.npy").write_bytes(b"\0" * 100)
    (tmp_path / "units" / "cifake-train-0123456789abcdef").mkdir()
    (tmp_path / ".manifest-1a2b3c4d.json").write_text("{")
    _remove_stale_temps(tmp_path)
    assert sorted(p.name for p in (tmp_path / "units").iterdir()) == ["cifake-train-0123456789abcdef"]
    assert not list(tmp_path.glob(".manifest-*"))


# -- SIGTERM -----------------------------------------------------------------------------------------
def test_sigterm_is_handled_as_ctrl_c():
    """Before Tune runs: Python's KeyboardInterrupt, exit 143; while it runs: whatever handles SIGINT then
    (Tune's stop), called instead, nothing raised."""
    termination = sweep_cli.Termination()
    with termination:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            signal.sigtimedwait([], 0) if hasattr(signal, "sigtimedwait") else None
        assert termination.status(Exit.INTERRUPTED) == Exit.TERMINATED and termination.status(Exit.OK) == Exit.OK
        called = []
        previous = signal.signal(signal.SIGINT, lambda signum, frame: called.append(signum))
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        finally:
            signal.signal(signal.SIGINT, previous)
        assert called == [signal.SIGINT]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL or signal.getsignal(signal.SIGTERM) is not termination._handle
    assert sweep_cli.Termination().status(Exit.INTERRUPTED) == Exit.INTERRUPTED  # Ctrl-C stays 130


# -- output that cannot show a character, or has gone ------------------------------------------------
NARROW = """
from fakedet.cli import main
from fakedet.console import say
try:
    main(["prepare", "--help"])
except SystemExit:
    pass
say("Spearman ρ = 0.81, Kendall τ = 0.6, 0.91 ± 0.02, 1 → 2 epochs…")
"""


@pytest.mark.parametrize("encoding", ["ascii", "latin-1"])
def test_help_and_analysis_print_on_a_narrow_encoding(encoding):
    """`fakedet prepare --help` prints 32×32 (a UnicodeEncodeError at once on an ASCII stdout before); the
    analysis' ρ, τ, ± and → after it, in the same process."""
    proc = subprocess.run([sys.executable, "-c", NARROW], capture_output=True, env={**ENV, "PYTHONIOENCODING": encoding}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-1000:]
    out = proc.stdout.decode(encoding)
    assert ("Nx32x32x3" if encoding == "ascii" else "N×32×32×3") in out
    said = out.strip().splitlines()[-1]
    assert said == ("Spearman rho = 0.81, Kendall tau = 0.6, 0.91 ± 0.02, 1 -> 2 epochs..." if encoding == "latin-1" else
                    "Spearman rho = 0.81, Kendall tau = 0.6, 0.91 +/- 0.02, 1 -> 2 epochs...")


def test_a_closed_pipe_drops_output_and_the_work_goes_on():
    code = ("import sys; from fakedet.console import robust_output, say, say_last\nrobust_output()\n"
            "for i in range(20000):\n    say(f'line {i} ' + 'x' * 60)\n"
            "say_last('resume with: python sweeps/run.py ablation --resume s1')\nsys.exit(7)")
    proc = subprocess.run(f"{sys.executable} -c \"{code}\" | head -3", shell=True, capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.stdout.splitlines()[:1] == ["line 0 " + "x" * 60]
    assert "Broken pipe" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == ["resume with: python sweeps/run.py ablation --resume s1"]


# -- a bounded decoder -------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_a_large_16_bit_or_float_image_decodes_in_bounded_memory(mode):
    """A 9 MP grey image at 16 or 32 bits: the decoder's numpy memory stays near one byte a pixel plus one
    band (it was 10-25 bytes a pixel: int64/float64 copies of the whole image)."""
    side = 3000
    values = {"I;16": np.full((side, side), 40000, np.uint16), "I": np.full((side, side), 40000, np.int32),
              "F": np.full((side, side), 0.5, np.float32)}[mode]
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, "PNG" if mode == "I;16" else "TIFF", **({} if mode == "I;16" else {"compression": "tiff_deflate"}))
    data = buf.getvalue()
    del values, buf
    tracemalloc.start()
    try:
        out = decode_image(data, DecodeOptions())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.shape == (32, 32, 3) and int(out[0, 0, 0]) == (156 if mode != "F" else 128)
    assert peak < 1.3 * side * side + (40 << 20), f"{peak / side / side:.1f} bytes a pixel"


# -- fakedet train's bounds --------------------------------------------------------------------------
def test_train_epochs_are_bounded_like_a_studys(capsys):
    from fakedet.cli import main

    assert main(["train", "--epochs", "1e9", "--data", "/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert "--epochs 1e+09: more than 1000" in err and "nonexistent" not in err  # refused before the data are looked for


def test_tunes_traceback_of_a_fatal_fault_is_dropped_and_a_crash_kept():
    import logging

    from fakedet.sweep.execute import RayNoise

    noise = RayNoise(lambda line: None)

    def record(error: BaseException) -> logging.LogRecord:
        try:
            raise error
        except BaseException:
            return logging.LogRecord("ray.tune.execution.tune_controller", logging.ERROR, "x", 1,
                                     "Trial task failed for trial run_trial_1", None, sys.exc_info())

    assert not noise.filter(record(OSError(28, "No space left on device", "/r/s1/trial_a/checkpoint_000001/state.pt")))
    assert not noise.filter(record(FatalTrialError("the checkpoint /r/state.pt does not load", Exit.CORRUPT_STATE)))
    assert noise.filter(record(ValueError("a bug in the trial")))  # a crash's traceback stays: it is retried


def test_a_truncated_run_state_is_found_without_unpickling_it(tmp_path):
    from fakedet.sweep.execute import damaged_run_state

    (tmp_path / "experiment_state-2026-12-03_10-00-00.json").write_text('{"trial_data": [')
    assert [p.name for p in damaged_run_state(tmp_path)] == ["experiment_state-2026-12-03_10-00-00.json"]
    (tmp_path / "experiment_state-2026-12-03_11-00-00.json").write_text('{"trial_data": []}')
    assert damaged_run_state(tmp_path) == []  # Tune restores the latest, which is whole
