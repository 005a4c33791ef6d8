"""An outage of a real `mlflow server` in the middle of a sweep costs nothing: the driver queues its
writes and retries them until the server is back; every cell ends FINISHED with each point once."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow  # a sweep of two trajectories and a 40-second outage: about 3 minutes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` on 127.0.0.1 in its own session, stopped by the process group we started."""

    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port, self.proc = root, port, None
        self.uri = f"http://127.0.0.1:{port}"

    def start(self) -> None:
        log = (self.root / "mlflow-server.log").open("a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}", "--artifacts-destination", str(self.root / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("mlflow server did not come up: " + (self.root / "mlflow-server.log").read_text()[-2000:])

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the session we started: the server and its workers
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def test_sweep_survives_a_tracking_server_outage(workspace, tmp_path):
    server = MlflowServer(tmp_path, free_port())
    server.start()
    try:
        args = workspace.args("outage1", "--epochs", "1,4", "--seeds", "1", "--max-concurrent", "1", "--tracking-uri", server.uri)
        # a client that gives up at once, so the outage reaches fakedet's own retries
        env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
        sweep = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        client = MlflowClient(server.uri)
        deadline = time.time() + 400
        while time.time() < deadline and sweep.poll() is None:  # the outage starts once the first cell finished
            time.sleep(1)
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                      filter_string="tags.`fakedet.sweep` = 'outage1' and tags.`fakedet.kind` = 'cell'")
            if any(r.info.status == "FINISHED" for r in runs):
                break
        assert sweep.poll() is None, "the sweep ended before the outage: " + sweep.stdout.read()[-3000:]
        server.stop()
        time.sleep(40)
        server.start()
        out, _ = sweep.communicate(timeout=600)
        assert sweep.returncode == 0, out[-4000:]
        assert "unreachable" in out and "is back" in out, out[-4000:]

        parent = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                    filter_string="tags.`fakedet.sweep` = 'outage1' and tags.`fakedet.kind` = 'sweep'")
        assert len(parent) == 1 and parent[0].info.status == "FINISHED"
        cells = client.search_runs([parent[0].info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent[0].info.run_id}'")
        assert len(cells) == 4 and all(r.info.status == "FINISHED" for r in cells)
        assert len({r.data.tags["fakedet.cell_key"] for r in cells}) == 4
        for r in cells:
            expected = {"1": 2, "4": 3}[r.data.params["epochs"]]  # the smoke preset's points 0.5, 1 (, 4)
            for key in ("train/loss", "cifake_test/acc", "agiri_val/auc"):
                steps = [m.step for m in client.get_metric_history(r.info.run_id, key)]
                assert len(steps) == len(set(steps)) == expected, (r.info.run_name, key, steps)
            assert "model.pt" in {a.path for a in client.list_artifacts(r.info.run_id)}
    finally:
        server.stop()
