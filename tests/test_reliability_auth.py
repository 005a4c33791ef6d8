"""Credentials and permissions against a real basic-auth `mlflow server` on 127.0.0.1: a wrong password
is refused before data are prepared or Ray starts, a read-only user before anything is written, and a
permission revoked mid-sweep stops the writer at once with the refusal's status (not an outage)."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import requests

from fakedet.sweep.preflight import check_tracking
from fakedet.sweep.refusals import Exit, Refused
from fakedet.sweep.writer import TrackingUnavailable, TrackingWriter

pytestmark = pytest.mark.slow  # starting the auth server alone took 90 s on this project's loaded 2-core machine

REPO = Path(__file__).resolve().parents[1]
ADMIN = ("admin", "adm-Test-Secret-9876")
WRITER = ("writer", "writer-Test-Pass-1234")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mlflow server --app-name basic-auth`, new users READ-only by default; stopped by its process group."""
    root = tmp_path_factory.mktemp("auth")
    (root / "auth.ini").write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{root / 'auth.db'}\n"
                                   f"admin_username = {ADMIN[0]}\nadmin_password = {ADMIN[1]}\n"
                                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    port = free_port()
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(root / "auth.ini"), "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only"}
    log = (root / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
                             "--artifacts-destination", str(root / "artifacts")],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("mlflow server did not come up: " + (root / "server.log").read_text()[-2000:])
                time.sleep(1)
        api = f"{uri}/api/2.0/mlflow"
        requests.post(f"{api}/users/create", json={"username": WRITER[0], "password": WRITER[1]}, auth=ADMIN, timeout=60).raise_for_status()
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the session we started: the server and its workers
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def login(monkeypatch, user: tuple[str, str]) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", user[1])


def test_a_wrong_password_is_refused_before_data_or_ray(server, tmp_path):
    ray_tmp = tmp_path / "ray"
    ray_tmp.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_USERNAME": ADMIN[0], "MLFLOW_TRACKING_PASSWORD": "wrong"}
    start, before = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, str(REPO / "sweeps" / "run.py"), "ablation", "--smoke", "--name", "auth1",
                           "--storage-path", str(tmp_path / "ray_results"), "--cache-root", str(tmp_path / "cache"),
                           "--tracking-uri", server, "--ray-temp-dir", str(ray_tmp)],
                          capture_output=True, text=True, timeout=300, env=env)
    elapsed, after = time.monotonic() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    assert proc.returncode == Exit.BAD_CREDENTIALS, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and "HTTP 401" in proc.stderr and "MLFLOW_TRACKING_PASSWORD" in proc.stderr
    assert list((tmp_path / "cache").iterdir()) == [] and list(ray_tmp.iterdir()) == []  # no data prepared, no Ray
    # CPU seconds, not wall-clock: on a shared machine the wall-clock time is the load's; on an idle one
    # the command (mostly imports: torch, MLflow, Ray Tune) takes about its CPU time
    print(f"refused in {elapsed:.1f} s wall-clock, {cpu:.1f} CPU-s (process start to exit; load {os.getloadavg()[0]:.1f})")
    assert cpu < 10, f"{cpu:.1f} CPU-s"


def test_a_read_only_user_is_refused_before_anything_is_written(server, monkeypatch):
    login(monkeypatch, ADMIN)
    from mlflow.tracking import MlflowClient

    MlflowClient(server).create_experiment("shared-study")  # the admin's experiment: WRITER may only read it
    login(monkeypatch, WRITER)
    with pytest.raises(Refused) as refused:
        check_tracking(server, "shared-study")
    assert refused.value.code == Exit.NOT_PERMITTED and "HTTP 403" in str(refused.value)
    check_tracking(server, "writers-own-study")  # one they create is theirs
    login(monkeypatch, ADMIN)
    client = MlflowClient(server)
    for name in ("shared-study", "writers-own-study"):
        experiment = client.get_experiment_by_name(name)
        assert all(r.info.status == "KILLED" for r in client.search_runs([experiment.experiment_id], run_view_type=3))


def test_a_permission_revoked_mid_sweep_stops_the_writer_with_its_status(server, monkeypatch):
    from mlflow.tracking import MlflowClient

    login(monkeypatch, ADMIN)
    admin = MlflowClient(server)
    experiment_id = admin.create_experiment("revoked-study")
    from mlflow.server import get_app_client

    auth = get_app_client("basic-auth", tracking_uri=server)  # as the admin logged in above
    auth.grant_user_permission(WRITER[0], "experiment", experiment_id, "EDIT")
    login(monkeypatch, WRITER)
    writer = TrackingWriter(server, outage_s=600, say=lambda line: None)
    run = writer.read(lambda client: client.create_run(experiment_id))
    writer.submit(lambda client: client.log_metric(run.info.run_id, "m", 1.0, step=1))
    assert writer.flush(timeout=60)
    login(monkeypatch, ADMIN)
    auth.revoke_user_permission(WRITER[0], "experiment", experiment_id)
    login(monkeypatch, WRITER)  # the writer's client keeps its session; only its permission changed
    start = time.monotonic()
    writer.submit(lambda client: client.log_metric(run.info.run_id, "m", 2.0, step=2))
    assert not writer.flush(timeout=120)
    assert time.monotonic() - start < 60  # at once, not after the 600 s outage budget
    with pytest.raises(TrackingUnavailable) as stopped:
        writer.check()
    assert stopped.value.status == 403 and "refused" in str(stopped.value) and "\n" not in str(stopped.value)
