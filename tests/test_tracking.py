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
    assert runs_link(tracking.uri, "7") == "http://127.0.0.1:5000/#/experiments/7/runs"
    assert runs_link("http://mlflow:5000/", "7") == "http://mlflow:5000/#/experiments/7/runs"
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
