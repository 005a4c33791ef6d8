"""A sweep refuses, in one line with its own exit status, what would otherwise fail late or run twice:
a second driver of one sweep, a flag out of range or a name that escapes its folder, a tracking store
or folder it cannot write, and saved state it cannot trust. Fast, in-process, without Ray."""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import signal
import socket
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from fakedet import sweep_cli
from fakedet.sweep.execute import check_satisfiable
from fakedet.sweep.lock import lock_path, sweep_lock
from fakedet.sweep.preflight import check_tracking, check_writable, preflight
from fakedet.sweep.record import SWEEP_FILE
from fakedet.sweep.refusals import Exit, Refused
from fakedet.sweep.request import RequestError, SweepRequest
from fakedet.sweep.spec import TRIAL_KEY_RESULT
from fakedet.sweep.store import SweepTracking
from fakedet.sweep.study import Study
from fakedet.sweep.tracking import MlflowCellCallback
from fakedet.sweep.trust import MANIFEST_FILE, TAG_STATE_DIGEST, check_state, record_state
from fakedet.sweep.writer import TrackingUnavailable, unavailable

REPO = pathlib.Path(__file__).resolve().parents[1]


# -- a lock per sweep --------------------------------------------------------------------------------
def test_a_second_driver_of_a_sweep_is_refused_naming_the_holder(tmp_path):
    with sweep_lock(str(tmp_path), "s1") as path:
        assert path == tmp_path / "s1.lock"
        with pytest.raises(Refused) as refused:
            with sweep_lock(str(tmp_path), "s1"):
                pass
        assert refused.value.code == Exit.SWEEP_LOCKED
        message = str(refused.value)
        assert f"pid {os.getpid()} on {socket.gethostname()}" in message and "\n" not in message
        with sweep_lock(str(tmp_path), "s2"):  # another sweep in the same storage is not held up
            pass
    with sweep_lock(str(tmp_path), "s1"):  # released with the driver
        pass


def test_a_killed_drivers_lock_is_not_stale(tmp_path):
    """kill -9 leaves the holder file behind, but the kernel drops the lock with the process."""
    code = (f"import os, signal; from fakedet.sweep.lock import sweep_lock\n"
            f"with sweep_lock({str(tmp_path)!r}, 's1'):\n    os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert pathlib.Path(str(lock_path(str(tmp_path), "s1")) + ".holder").exists()  # left by the killed driver
    with sweep_lock(str(tmp_path), "s1"):
        pass


def test_resume_and_same_name_start_refused_while_a_driver_runs(tmp_path, capsys):
    """The command line while s1's driver holds its lock: `--resume s1` and `--name s1` each refused with
    exit 71 and one line, before the cache, the tracking store or Ray are touched."""
    storage = tmp_path / "ray_results"
    (storage / "s1").mkdir(parents=True)
    (storage / "s1" / SWEEP_FILE).write_text(json.dumps({"kind": "ablation", "name": "s1"}))
    base = ["ablation", "--storage-path", str(storage), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--cache-root", str(tmp_path / "cache")]
    with sweep_lock(str(storage), "s1"):  # flock is per open file: a second one in this process is refused too
        for extra in (["--resume", "s1"], ["--smoke", "--name", "s1"]):
            assert sweep_cli.main(base + extra) == Exit.SWEEP_LOCKED
            lines = capsys.readouterr().err.strip().splitlines()
            assert len(lines) == 1 and f"pid {os.getpid()} on {socket.gethostname()}" in lines[0], lines
    assert not (tmp_path / "cache").exists() and not (tmp_path / "mlflow.db").exists()


# -- every number and name checked -------------------------------------------------------------------
BAD_FLAGS = [
    (["--cpus-per-trial", "nan"], "--cpus-per-trial"),
    (["--cpus-per-trial", "1e9"], "--cpus-per-trial"),
    (["--cpus-per-trial", "0"], "--cpus-per-trial"),
    (["--gpus-per-trial", "-1"], "--gpus-per-trial"),
    (["--gpus-per-trial", "inf"], "--gpus-per-trial"),
    (["--max-concurrent", "0"], "--max-concurrent"),
    (["--tracking-outage", "nan"], "--tracking-outage"),
    (["--tracking-outage", "-5"], "--tracking-outage"),
    (["--bundle", "1000000000"], "--bundle"),
    (["--num-cpus", "0"], "--num-cpus"),
    (["--num-cpus", "2", "--cpus-per-trial", "4"], "--cpus-per-trial"),
    (["--name", "../../escaped"], "--name"),
    (["--name", "/tmp/absolute"], "--name"),
    (["--name", "x" * 300], "--name"),
    (["--name", ".hidden"], "--name"),
    (["--resume", "../other"], "--resume"),
    (["--experiment", "e" * 10_000], "--experiment"),
    (["--experiment", "bad\nname"], "--experiment"),
]


@pytest.mark.parametrize("flags,flag", BAD_FLAGS, ids=[" ".join(f)[:40] for f, _ in BAD_FLAGS])
def test_a_bad_flag_is_refused_in_one_short_line_naming_it(flags, flag):
    args = sweep_cli.build_parser().parse_args(["ablation", *flags])
    with pytest.raises(RequestError) as refused:
        SweepRequest.from_flags(vars(args))
    message = str(refused.value)
    assert message.startswith(flag) and "\n" not in message and len(message) < 300, message


def test_good_flags_pass():
    args = sweep_cli.build_parser().parse_args(
        ["ablation", "--cpus-per-trial", "0.5", "--gpus-per-trial", "0", "--max-concurrent", "4", "--tracking-outage", "0",
         "--bundle", "auto", "--name", "abl-2026_01.x", "--experiment", "/Users/me/study 1"])
    request = SweepRequest.from_flags(vars(args))
    assert (request.cpus_per_trial, request.max_concurrent, request.name) == (0.5, 4, "abl-2026_01.x")


def test_a_bad_flag_exits_2_before_anything_is_written(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "sweeps" / "run.py"), "ablation", "--name", "../../escaped",
                           "--storage-path", str(tmp_path / "ray_results")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == Exit.BAD_REQUEST and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_trial_larger_than_the_local_ray_is_refused():
    with pytest.raises(RequestError, match="local Ray has 2"):
        check_satisfiable({"cpu": 3.0}, {"CPU": 2.0})
    with pytest.raises(RequestError, match="GPUs"):
        check_satisfiable({"cpu": 1.0, "gpu": 1.0}, {"CPU": 2.0})
    check_satisfiable({"cpu": 2.0, "gpu": 0.25}, {"CPU": 2.0, "GPU": 1.0})


# -- pre-flight --------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unwritable_storage_and_cache_each_have_their_status(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a folder below a file cannot be made, whoever runs the test (root too)
    with pytest.raises(Refused) as refused:
        check_writable(str(blocker / "ray_results"), "Ray storage path", Exit.STORAGE_READONLY)
    assert refused.value.code == Exit.STORAGE_READONLY and str(blocker) in str(refused.value)
    with pytest.raises(Refused) as refused:
        preflight(f"sqlite:///{tmp_path / 'mlflow.db'}", "exp", str(tmp_path / "ray_results"), str(blocker / "cache"))
    assert refused.value.code == Exit.CACHE_READONLY
    check_writable(str(tmp_path / "new" / "folder"), "Ray storage path", Exit.STORAGE_READONLY)
    assert list((tmp_path / "new" / "folder").iterdir()) == []  # the probe file is gone


def test_an_unreachable_server_and_an_unwritable_database_are_refused_at_once(tmp_path):
    start = time.monotonic()
    with pytest.raises(Refused) as refused:
        check_tracking(f"http://127.0.0.1:{free_port()}", "exp")
    assert refused.value.code == Exit.TRACKING_DOWN and time.monotonic() - start < 10
    (tmp_path / "a-file").write_text("")
    with pytest.raises(Refused) as refused:
        check_tracking(f"sqlite:///{tmp_path / 'a-file' / 'mlflow.db'}", "exp")
    assert refused.value.code == Exit.NOT_PERMITTED


def test_the_probe_run_is_cleaned_up(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    check_tracking(uri, "exp")
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("exp")
    assert experiment.artifact_location == (tmp_path / "mlartifacts").as_uri()  # created as the sweep creates it
    assert client.search_runs([experiment.experiment_id]) == []  # the probe run is deleted


def test_an_unreachable_server_is_refused_before_data_or_ray(tmp_path):
    """As a user sees it: exit 69 in one line; no stand-in generated, no Ray started, no sweep folder."""
    ray_tmp = tmp_path / "ray"
    ray_tmp.mkdir()
    proc = subprocess.run([sys.executable, str(REPO / "sweeps" / "run.py"), "ablation", "--smoke", "--name", "pf1",
                           "--storage-path", str(tmp_path / "ray_results"), "--cache-root", str(tmp_path / "cache"),
                           "--tracking-uri", f"http://127.0.0.1:{free_port()}", "--ray-temp-dir", str(ray_tmp)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == Exit.TRACKING_DOWN, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and "unreachable" in proc.stderr
    assert list((tmp_path / "cache").iterdir()) == [] and list(ray_tmp.iterdir()) == []
    assert not (tmp_path / "ray_results" / "pf1").exists()


def test_a_refusal_mid_sweep_keeps_its_status_and_exit_code():
    import requests

    response = requests.Response()
    response.status_code = 403
    error = unavailable("http://x", requests.exceptions.HTTPError("403 Forbidden", response=response), 600)
    again = pickle.loads(pickle.dumps(error))
    assert isinstance(again, TrackingUnavailable) and again.status == 403 and str(again) == str(error)
    assert sweep_cli.tracking_exit(403) == Exit.NOT_PERMITTED
    assert sweep_cli.tracking_exit(401) == Exit.BAD_CREDENTIALS
    assert sweep_cli.tracking_exit(None) == Exit.TRACKING_OUTAGE  # an outage stays an outage


# -- no code from data -------------------------------------------------------------------------------
class Booby:
    """Unpickling it creates `marker`: what a hostile pickle in a shared folder would do."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def booby_pickle(path: pathlib.Path, marker: pathlib.Path) -> None:
    path.write_bytes(pickle.dumps(Booby(marker)))


def test_replay_reads_results_as_json_never_params_pkl(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking = SweepTracking.open(uri, "exp", "sweep1", {}, {})
    spec = Study.load("ablation", preset="smoke").trials()[0]
    trial_dir = tmp_path / "exp_dir" / "trial_t1"
    trial_dir.mkdir(parents=True)
    marker = tmp_path / "pwned"
    booby_pickle(trial_dir / "params.pkl", marker)
    lines = [{"trial_id": "t1", "epoch": e, "step": s, "train/loss": 1.0 / s, "cifake_test/acc": 0.5 + e / 10,
              "node_id": "n1", TRIAL_KEY_RESULT: spec.key} for e, s in ((0.5, 10), (1.0, 20))]
    (trial_dir / "result.json").write_text("\n".join(json.dumps(r) for r in lines) + "\n{\"trial_id\": \"t1\", \"ep")
    cb = MlflowCellCallback(tracking, None, {}, {})
    assert cb.replay_stored(tmp_path / "exp_dir", [spec]) == 1
    assert cb.writer.flush(timeout=60)
    assert not marker.exists()
    runs = tracking.cell_runs()
    assert len(runs) == len(spec.cells)
    assert all(sorted(m.step for m in MlflowClient(uri).get_metric_history(r.info.run_id, "train/loss")) == [10, 20] for r in runs)


def fake_experiment(root: pathlib.Path) -> pathlib.Path:
    """A sweep folder as Ray leaves it, with harmless pickles."""
    exp = root / "s1"
    (exp / "trial_a").mkdir(parents=True)
    (exp / "tuner.pkl").write_bytes(pickle.dumps({"tuner": 1}))
    (exp / "experiment_state-2026.json").write_text("{}")
    (exp / "trial_a" / "params.pkl").write_bytes(pickle.dumps({"lr": 0.1}))
    (exp / "trial_a" / "result.json").write_text("{}\n")
    (exp / SWEEP_FILE).write_text("{}")
    return exp


@pytest.mark.parametrize("tampered", ["tuner.pkl", "trial_a/params.pkl"])
def test_tampered_state_is_refused_before_ray_unpickles_it(tmp_path, tampered):
    exp = fake_experiment(tmp_path)
    digest, _ = record_state(exp)
    assert check_state(tmp_path, exp, digest, accept_changed=False) is None
    (exp / "trial_a" / "result.json").write_text("{}\n{}\n")  # results grow between stops: not state
    (exp / SWEEP_FILE).write_text('{"edited": true}')  # fakedet's own JSON is not unpickled
    assert check_state(tmp_path, exp, digest, accept_changed=False) is None
    marker = tmp_path / "pwned"
    booby_pickle(exp / tampered, marker)
    with pytest.raises(Refused) as refused:
        check_state(tmp_path, exp, digest, accept_changed=False)
    assert refused.value.code == Exit.UNTRUSTED_STATE and tampered in str(refused.value) and "--trust-changed-state" in str(refused.value)
    assert "run code" in check_state(tmp_path, exp, digest, accept_changed=True)  # accepted, with the risk said
    with pytest.raises(Refused):  # never stopped cleanly: no digest
        check_state(tmp_path, exp, None, accept_changed=False)
    assert not marker.exists()


@pytest.mark.parametrize("target", ["", "s1", "s1/trial_a", "s1/tuner.pkl"])
def test_state_writable_by_others_is_refused(tmp_path, target):
    exp = fake_experiment(tmp_path)
    digest, _ = record_state(exp)
    path = tmp_path / target
    path.chmod(path.stat().st_mode | 0o020)
    with pytest.raises(Refused, match="writable by its group") as refused:
        check_state(tmp_path, exp, digest, accept_changed=True)  # no flag accepts this one
    assert refused.value.code == Exit.UNTRUSTED_STATE


def test_a_state_file_that_is_a_link_is_refused(tmp_path):
    exp = fake_experiment(tmp_path)
    (tmp_path / "elsewhere.pkl").write_bytes((exp / "tuner.pkl").read_bytes())
    (exp / "tuner.pkl").unlink()
    (exp / "tuner.pkl").symlink_to(tmp_path / "elsewhere.pkl")
    with pytest.raises(Refused, match="symbolic link"):
        check_state(tmp_path, exp, None, accept_changed=True)


def test_a_tampered_resume_runs_nothing(tmp_path, monkeypatch):
    """`--resume` of a sweep whose tuner.pkl was replaced after its last stop: refused with exit 65
    before Ray starts or data are prepared; the hostile pickle never runs."""
    import ray

    storage, uri = tmp_path / "ray_results", f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = fake_experiment(storage)
    tracking = SweepTracking.open(uri, "exp", "s1", {}, {})
    (exp / SWEEP_FILE).write_text(json.dumps({"kind": "ablation", "name": "s1", "tracking_uri": uri, "experiment": "exp",
                                              "experiment_id": tracking.experiment_id, "parent_run_id": tracking.parent_run_id,
                                              "request": {"smoke": True}}))
    digest, _ = record_state(exp)
    MlflowClient(uri).set_tag(tracking.parent_run_id, TAG_STATE_DIGEST, digest)
    marker = tmp_path / "pwned"
    booby_pickle(exp / "tuner.pkl", marker)
    monkeypatch.chdir(tmp_path)
    code = sweep_cli.main(["ablation", "--resume", "s1", "--storage-path", str(storage), "--cache-root", str(tmp_path / "cache")])
    assert code == Exit.UNTRUSTED_STATE
    assert not marker.exists() and not ray.is_initialized()
    assert not any((tmp_path / "cache").iterdir())
    assert (exp / MANIFEST_FILE).is_file()


# -- the CIFAR-100 unpickler admits no allocator ------------------------------------------------------
CRAFT_META = r'''
import pickle, sys
import numpy as np
from numpy._core.multiarray import _reconstruct, scalar
from numpy._core.numeric import _frombuffer

class Dtype:  # numpy.dtype(code) with a BUILD state of our choosing
    def __init__(self, code, itemsize=-1, flags=0):
        self.code, self.itemsize, self.flags = code, itemsize, flags
    def __reduce__(self):
        return np.dtype, (self.code, False, True), (3, "|", None, None, None, self.itemsize, 1, self.flags)

class Call:
    def __init__(self, f, *args):
        self.f, self.args = f, args
    def __reduce__(self):
        return self.f, self.args

class Array:  # numpy's own array pickle: empty, then BUILD with a state of our choosing
    def __init__(self, state):
        self.state = state
    def __reduce__(self):
        return _reconstruct, (np.ndarray, (0,), b"b"), self.state

GB4 = 1 << 32
routes = {
    # a void dtype resized by its BUILD to 4 GiB, then one zeroed scalar of it
    "void scalar": Call(scalar, Dtype("V8", GB4)),
    # a uint8 dtype flagged as holding objects: the array's bytes would be read as pointers
    "object flag": Call(_frombuffer, b"\x01" * 8, Dtype("u8", -1, 63), (1,), "C"),
    # an array of 2^20 void items resized to 4 GiB each, declared with the honest (0,) shape
    "void array": Array((1, (1 << 20,), Dtype("V8", GB4), False, b"")),
    "bytes dtype": Call(scalar, Call(np.dtype, "S1000000000")),
}
out = sys.argv[1]
for name, route in routes.items():
    blob = {b"fine_label_names": [b"apple"] * 100, b"coarse_label_names": [route] + [b"fish"] * 19}
    raw = pickle.dumps(blob, protocol=2)
    open(f"{out}/{name.replace(' ', '_')}.pkl", "wb").write(raw)
    print(name, len(raw))
'''

READ_UNDER_LIMIT = r'''
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (768 << 20, 768 << 20))  # the reader needs about 40 MB
from fakedet.data.cifar100 import safe_load
from fakedet.data.errors import UnsafePickleError
try:
    safe_load(sys.argv[1])
    print("LOADED")
except UnsafePickleError as e:
    print("REFUSED", e)
except Exception as e:
    print("FAILED", type(e).__name__, e)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the process that forked this one
print("peak MB", next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) // 1024)
'''


def test_crafted_meta_files_are_refused_with_bounded_memory(tmp_path):
    """A few hundred bytes of `meta` that would allocate gigabytes (or read bytes as pointers) through
    numpy.dtype's BUILD: refused as unsafe, under a 768 MB address-space limit, before any allocation."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    made = subprocess.run([sys.executable, "-c", CRAFT_META, str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)
    assert made.returncode == 0, made.stderr
    sizes = dict(line.rsplit(" ", 1) for line in made.stdout.splitlines())
    assert all(int(n) < 1000 for n in sizes.values()), sizes
    for crafted in sorted(tmp_path.glob("*.pkl")):
        proc = subprocess.run([sys.executable, "-c", READ_UNDER_LIMIT, str(crafted)], capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 0 and "REFUSED" in proc.stdout, f"{crafted.name}: {proc.returncode} {proc.stdout} {proc.stderr[-1000:]}"
        assert int(proc.stdout.split("peak MB")[1]) < 200, proc.stdout
