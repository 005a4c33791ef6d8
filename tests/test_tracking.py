"""The driver's MLflow logging without Ray running: the cell callback against a real SQLite store, fed
the reports a trial would send, and the writer's retries through a store that fails."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient
from ray import tune

from fakedet.sweep.spec import CELL_ARTIFACTS, TRIAL_KEY
from fakedet.sweep.study import Study
from fakedet.sweep.store import SweepTracking, compare_link, runs_link
from fakedet.sweep.tracking import MlflowCellCallback
from fakedet.sweep.writer import TrackingUnavailable, TrackingWriter, retrying, transient


@pytest.fixture
def tracking(tmp_path):
    return SweepTracking.open(f"sqlite:///{tmp_path / 'mlflow.db'}", "exp", "sweep1", {"kind": "ablation"}, {})


def trial_of(spec, trial_id="t1"):
    return SimpleNamespace(trial_id=trial_id, config={TRIAL_KEY: spec})


def report(epoch: float, step: int, acc: float) -> dict:
    return {"epoch": epoch, "step": step, "train/loss": 1.0 / step, "cifake_test/acc": acc, "total_steps": 40, "node_id": "n1"}


def checkpoint_with_cells(tmp_path, *epochs: str):
    d = tmp_path / f"ckpt_{'_'.join(epochs)}"
    for e in epochs:
        (d / CELL_ARTIFACTS / "0" / e).mkdir(parents=True)  # trajectory 0 of the trial, its cell at e epochs
        (d / CELL_ARTIFACTS / "0" / e / "metrics.json").write_text("{}")
    return tune.Checkpoint.from_directory(str(d))


def history(client, run, key="cifake_test/acc"):
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, key))


def test_callback_logs_cells_and_resumes_without_duplicates(tracking, tmp_path):
    spec = Study.load("ablation", preset="smoke").trials()[0]  # cells at 1 and 2 epochs; points 0.5, 1, 2
    cb = MlflowCellCallback(tracking, None, {"sweep": "sweep1"}, {})
    trial = trial_of(spec)
    cb.on_trial_start(0, [], trial)
    cb.on_trial_result(0, [], trial, report(0.5, 10, 0.6))
    cb.on_trial_result(0, [], trial, report(1.0, 20, 0.7))
    cb.on_checkpoint(0, [], trial, checkpoint_with_cells(tmp_path, "1"))
    assert cb.writer.flush(timeout=60)

    # the driver restarts (Tuner.restore unpickles the callback without its runs); the trial is replayed
    # from its checkpoint at step 20, so the points at 10 and 20 arrive again, then the rest
    again = pickle.loads(pickle.dumps(cb))
    assert again._trials == {}
    again.on_trial_start(0, [], trial)
    for r in (report(0.5, 10, 0.6), report(1.0, 20, 0.7), report(2.0, 40, 0.8)):
        again.on_trial_result(0, [], trial, r)
    again.on_checkpoint(0, [], trial, checkpoint_with_cells(tmp_path, "2"))
    again.on_trial_complete(0, [], trial)
    assert again.writer.flush(timeout=60)

    client = MlflowClient(tracking.uri)
    runs = {r.info.run_name: r for r in tracking.cell_runs()}
    assert sorted(runs) == [c.name for c in spec.cells]  # one run per cell, none duplicated
    one, two = runs[spec.cells[0].name], runs[spec.cells[1].name]
    assert history(client, one) == [10, 20] and history(client, two) == [10, 20, 40]  # each (key, step) once
    assert one.info.status == two.info.status == "FINISHED"
    assert one.data.params["epochs"] == "1" and one.data.tags["fakedet.trajectory"] == "none lr=0.01 seed=11"
    assert [a.path for a in client.list_artifacts(two.info.run_id)] == ["metrics.json"]


def test_planned_runs_are_found_again_by_their_trial(tracking):
    specs = Study.load("ablation", preset="smoke").trials()
    cb = MlflowCellCallback(tracking, None, {}, {})
    ids = cb.plan_runs(specs)
    assert len(ids) == 4 and all(MlflowClient(tracking.uri).get_run(i).info.status == "SCHEDULED" for i in ids)
    cb.on_trial_start(0, [], trial_of(specs[0], "tA"))
    assert cb.writer.flush(timeout=60)
    runs = tracking.cell_runs()
    assert len(runs) == 4  # found, not created twice
    started = [r for r in runs if r.data.tags.get("fakedet.trial") == "tA"]
    assert len(started) == 2 and all(r.info.status == "RUNNING" for r in started)


def test_links_point_at_the_runs_table_and_a_comparison(tracking):
    assert runs_link(tracking.uri, "7") == "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
    assert runs_link("http://mlflow:5000/", "7") == "http://mlflow:5000/#/experiments/7/runs?workflowType=machine_learning"
    assert compare_link("http://mlflow:5000", "7", ["a1", "b2"]) == \
        "http://mlflow:5000/#/compare-runs?runs=%5B%22a1%22%2C%22b2%22%5D&experiments=%5B%227%22%5D"


def test_writer_retries_through_an_outage_in_order():
    applied, failures = [], {"left": 3}

    def flaky(i):
        def write(client):
            if i == 1 and failures["left"]:
                failures["left"] -= 1
                raise ConnectionError("connection refused")
            applied.append(i)
        return write

    lines = []
    writer = TrackingWriter("http://127.0.0.1:9", outage_s=30, backoff_s=0.01, say=lines.append)
    for i in range(4):
        writer.submit(flaky(i))
    assert writer.flush(timeout=30)
    assert applied == [0, 1, 2, 3] and failures["left"] == 0  # nothing lost, nothing reordered
    assert any("unreachable" in line for line in lines) and any("is back" in line for line in lines)


def test_writer_gives_up_after_its_outage_budget():
    writer = TrackingWriter("http://127.0.0.1:9", outage_s=0.2, backoff_s=0.05, say=lambda _: None)
    writer.submit(lambda client: (_ for _ in ()).throw(ConnectionError("down")))
    assert writer.flush(timeout=10) is False
    with pytest.raises(TrackingUnavailable, match="unreachable for over 0.2 s"):
        writer.submit(lambda client: None)


def test_writer_stops_at_a_refused_write_without_retrying_it():
    calls = []
    writer = TrackingWriter("http://127.0.0.1:9", outage_s=30, backoff_s=0.01, say=lambda _: None)
    writer.submit(lambda client: (calls.append(1), (_ for _ in ()).throw(KeyError("bad param")))[1])
    assert writer.flush(timeout=10) is False and calls == [1]  # tried once, not for the whole outage budget
    with pytest.raises(TrackingUnavailable, match="refused a write"):
        writer.check()


def test_the_trial_spec_is_resolved_once_per_trial_and_once_after_a_restore(tracking, tmp_path, monkeypatch):
    import fakedet.sweep.tracking as tracking_module

    spec = Study.load("ablation", preset="smoke").trials()[0]
    calls = []
    monkeypatch.setattr(tracking_module, "resolve_trial", lambda config, template: calls.append(1) or config[TRIAL_KEY])
    cb = MlflowCellCallback(tracking, None, {}, {})
    trial = trial_of(spec)
    cb.on_trial_start(0, [], trial)
    for r in (report(0.5, 10, 0.6), report(1.0, 20, 0.7)):
        cb.on_trial_result(0, [], trial, r)
    cb.on_checkpoint(0, [], trial, checkpoint_with_cells(tmp_path, "1"))
    assert len(calls) == 1
    again = pickle.loads(pickle.dumps(cb))
    again.on_trial_start(0, [], trial)
    again.on_trial_result(0, [], trial, report(2.0, 40, 0.8))
    again.on_trial_complete(0, [], trial)
    assert len(calls) == 2
    assert again.writer.flush(timeout=60)


# ---------------------------------------------------------------------------------------------------
# the one retry loop, and which failures it waits out
# ---------------------------------------------------------------------------------------------------
class FakeTime:
    def __init__(self):
        self.now, self.waits = 0.0, []

    def sleep(self, s):
        self.waits.append(s)
        self.now += s


def test_retrying_backs_off_from_1_s_doubling_to_30_s_within_the_outage_budget():
    t = FakeTime()
    with pytest.raises(ConnectionError):
        retrying(lambda: (_ for _ in ()).throw(ConnectionError("refused")), outage_s=100, sleep=t.sleep, clock=lambda: t.now)
    assert t.waits == [1, 2, 4, 8, 16, 30, 30, 9]  # the last wait ends at the budget, then the failure is raised


def test_retrying_returns_once_the_store_answers_and_raises_a_refusal_at_once():
    t, left = FakeTime(), [2]

    def flaky():
        if left[0]:
            left[0] -= 1
            raise TimeoutError("slow")
        return "ok"

    assert retrying(flaky, outage_s=100, sleep=t.sleep, clock=lambda: t.now) == "ok" and t.waits == [1, 2]
    t = FakeTime()
    with pytest.raises(KeyError):
        retrying(lambda: {}["x"], outage_s=100, sleep=t.sleep, clock=lambda: t.now)
    assert t.waits == []


class StubServer:
    """An HTTP server on 127.0.0.1 answering every request with one status and a plain-text body."""

    def __init__(self, status: int):
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def answer(self):
                body = b"stub"
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = answer

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def failure_of(call) -> BaseException:
    try:
        call()
    except Exception as e:  # noqa: BLE001
        return e
    raise AssertionError("the call did not fail")


@pytest.fixture
def no_client_retries(monkeypatch):
    # MLflow's own client retries 429 and 5xx with backoff; once is enough to see what it raises
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


@pytest.mark.parametrize("status, expected", [(503, True), (502, True), (500, True), (429, True),
                                              (401, False), (403, False), (404, False), (400, False)])
def test_a_server_answer_is_transient_for_5xx_and_429_only(no_client_retries, status, expected):
    stub = StubServer(status)
    try:
        e = failure_of(lambda: MlflowClient(stub.uri).get_experiment("0"))
    finally:
        stub.close()
    assert transient(e) is expected, f"HTTP {status}: {type(e).__name__}: {e}"


def test_a_closed_port_is_transient_through_the_mlflow_client(no_client_retries):
    e = failure_of(lambda: MlflowClient(f"http://127.0.0.1:{closed_port()}").get_experiment("0"))
    assert transient(e)


def test_requests_sqlite_and_local_failures_are_classified_by_their_class():
    import socket
    import sqlite3

    import requests
    import sqlalchemy.exc

    refused = failure_of(lambda: requests.get(f"http://127.0.0.1:{closed_port()}", timeout=5))
    assert isinstance(refused, requests.exceptions.ConnectionError) and transient(refused)
    with socket.socket() as silent:  # accepts connections (the backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        timeout = failure_of(lambda: requests.get(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=0.3))
    assert isinstance(timeout, requests.exceptions.Timeout) and transient(timeout)
    locked = sqlalchemy.exc.OperationalError("INSERT ...", {}, sqlite3.OperationalError("database is locked"))
    assert transient(locked)
    assert not transient(failure_of(lambda: requests.get("http://", timeout=5)))  # a wrong URL, not an outage
    assert not transient(PermissionError("mlartifacts")) and not transient(KeyError("bad param"))


def test_a_refused_login_stops_the_writer_at_once_with_one_clear_line(no_client_retries):
    stub = StubServer(401)
    try:
        writer = TrackingWriter(stub.uri, outage_s=30, backoff_s=0.01, say=lambda _: None)
        writer.submit(lambda client: client.get_experiment("0"))
        assert writer.flush(timeout=20) is False
    finally:
        stub.close()
    with pytest.raises(TrackingUnavailable, match=r"refused the sweep's credentials \(HTTP 401\); set MLFLOW_TRACKING_USERNAME"):
        writer.check()


def test_an_immediate_read_waits_out_its_budget_then_says_the_store_is_unreachable(no_client_retries):
    stub = StubServer(503)
    try:
        writer = TrackingWriter(stub.uri, outage_s=0.3, backoff_s=0.05, say=lambda _: None)
        with pytest.raises(TrackingUnavailable, match="unreachable for over 0.3 s"):
            writer.read(lambda client: client.get_experiment("0"))
    finally:
        stub.close()


def test_the_progress_line_resolves_a_trial_label_once(monkeypatch):
    import fakedet.sweep.progress as progress_module

    spec = Study.load("ablation", preset="smoke").trials()[0]
    calls = []
    monkeypatch.setattr(progress_module, "resolve_trial", lambda config, template: calls.append(1) or config[TRIAL_KEY])
    monkeypatch.setattr(progress_module, "say", lambda _: None)
    progress = progress_module.Progress(1)
    trial = SimpleNamespace(trial_id="t1", config={TRIAL_KEY: spec}, local_path="/tmp/t1")
    for _ in range(3):
        progress.on_trial_recover(0, [], trial)
    assert len(calls) == 1
    again = pickle.loads(pickle.dumps(progress))
    again.on_trial_recover(0, [], trial)
    assert len(calls) == 2
