"""A sweep's analysis, its re-analyses and its report page, against a real SQLite MLflow store without Ray:
a sweep's runs are written as the tracking callback writes them (parent run, cell runs with their
metric histories), then analysed in-process, as at a sweep's end and as `cutoff` does later."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import sys
import tempfile
import urllib.parse
from html.parser import HTMLParser
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.entities import Metric, Param, RunTag

from fakedet import figures
from fakedet.report import AnalysisOrigin, analyse_sweep, headlines, render_report
from fakedet.results import AnalysisVersion, analysis_versions, find_tracking_uri, load_sweep, next_analysis
from fakedet.sweep.store import SweepTracking, compare_link, run_link, runs_link, sweep_filter
from fakedet.sweep.study import Study
from fakedet.sweep.tags import TAG_KIND, TAG_PARENT, TAG_SWEEP, TAG_TRAJECTORY

EPOCHS = (0.5, 1.0, 2.0)  # evaluation points; cells end at 1 and 2 epochs, as in the smoke study
STEPS_PER_EPOCH = 20
METRICS = ("train/loss", "cifake_val/loss", "cifake_val/acc", "cifake_val/auc", "agiri_val/auc", "cifake_test/acc",
           "cifake_test/f1", "cifake_test/auc", "agiri_test/acc", "agiri_test/f1", "agiri_test/auc", "cifar100_test/real_recall")


def smoke_study(**overrides) -> Study:
    # fewer resamples than the study's 1000: the tests check where things are written, not the intervals
    return Study.load("ablation", preset="smoke", overrides={"statistics": {"n_boot": 200}, **overrides})


def write_sweep(uri: str, name: str, seeds=(11, 12, 13), srms=("none", "pool1"), rng_seed=0, kind="ablation") -> SweepTracking:
    """A finished sweep's runs: a parent, and per trajectory (srm × seed) a 1- and a 2-epoch cell whose
    metric histories are the trajectory's points, values drawn at random (what is checked here is where
    the analysis goes, not what it says)."""
    rng = np.random.default_rng(rng_seed)
    study = smoke_study()
    tracking = SweepTracking.open(uri, kind, name, {"kind": kind, "study": kind, "preset": "smoke",
                                                          "cutoff_select_on": study.cutoff.select_on,
                                                          "cutoff_report": list(study.cutoff.report)}, {})
    client = tracking.client()
    for srm in srms:
        for seed in seeds:
            label = f"{srm} lr=0.01 seed={seed}"
            values = {m: rng.uniform(0.3, 0.9, len(EPOCHS)) for m in METRICS}
            for cell_epochs in (1, 2):
                run = client.create_run(tracking.experiment_id, run_name=f"{srm}-e{cell_epochs}-s{seed}", tags={
                    TAG_PARENT: tracking.parent_run_id, TAG_SWEEP: name, TAG_KIND: "cell", TAG_TRAJECTORY: label})
                params = {"srm": srm, "lr": "0.01", "seed": str(seed), "epochs": str(cell_epochs), "momentum": "0.9",
                          "batch_size": "32"}
                metrics = [Metric("epoch", e, 0, int(e * STEPS_PER_EPOCH)) for e in EPOCHS if e <= cell_epochs]
                metrics += [Metric(m, float(values[m][i]), 0, int(e * STEPS_PER_EPOCH))
                            for m in METRICS for i, e in enumerate(EPOCHS) if e <= cell_epochs]
                client.log_batch(run.info.run_id, metrics=metrics, params=[Param(k, v) for k, v in params.items()])
                client.set_terminated(run.info.run_id, "FINISHED")
    client.set_terminated(tracking.parent_run_id, "FINISHED")
    return tracking


@pytest.fixture
def store(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


# a few of the views (the cells written here have no threshold or class-recall tables): what is checked
# is where the figures go and that the page holds each one, not how they look (tests/test_figures.py)
SOME_VIEWS = ("figure4_first_epoch.png", "cutoff_curves.png", "seed_spread_agiri_test_auc.png", "table2_cifake_test.csv")


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    """A sweep with its own analysis, written as at the sweep's end."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(figures, "VIEWS", {k: figures.VIEWS[k] for k in SOME_VIEWS})
        tracking = write_sweep(f"sqlite:///{tmp_path_factory.mktemp('report') / 'mlflow.db'}", "sw1")
        assert analyse_sweep(tracking, smoke_study(), [1.0, 2.0], {"code_version": "test"}) == 0
        yield tracking


def artifact_hashes(tracking: SweepTracking) -> dict[str, str]:
    """sha256 of every artifact of the parent run, by path."""
    with tempfile.TemporaryDirectory() as d:
        root = Path(tracking.client().download_artifacts(tracking.parent_run_id, "", d))
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow  # two analyses with their figures: ~20 s on 2 free cores, minutes on a loaded machine
def test_a_reanalysis_writes_a_new_version_and_leaves_the_sweeps_record_byte_for_byte(analysed, capsys, monkeypatch):
    monkeypatch.setattr(figures, "VIEWS", {k: figures.VIEWS[k] for k in SOME_VIEWS})
    client, parent = analysed.client(), analysed.parent_run_id
    before = artifact_hashes(analysed)
    assert {"analysis/run_record.json", "analysis/cutoffs.csv", "figures/cutoff_curves.png", "report.html"} <= set(before)
    metrics_before = client.get_run(parent).data.metrics
    # a re-analysis with another study: the cutoff chosen on another validation metric
    changed = smoke_study(cutoff={"select_on": "cifake_val/auc"})
    origin = AnalysisOrigin("sweeps/run.py cutoff --sweep sw1 --study other.toml", "--study other.toml",
                            ("[cutoff] select_on: 'agiri_val/auc' → 'cifake_val/auc'",))
    assert analyse_sweep(analysed, changed, [1.0, 2.0], {"code_version": "test"}, origin) == 0
    out = capsys.readouterr().out

    after = artifact_hashes(analysed)
    assert {k: after.get(k) for k in before} == before  # every original artifact, byte for byte
    new = sorted(set(after) - set(before))
    assert new and all(p.startswith("analysis/v2/") for p in new), new
    assert {"analysis/v2/run_record.json", "analysis/v2/cutoffs.csv", "analysis/v2/report.html",
            "analysis/v2/figures/cutoff_curves.png"} <= set(new)
    # the parent's metrics are the sweep's own answer: a re-analysis adds no point to them
    assert client.get_run(parent).data.metrics == metrics_before
    assert all(len(client.get_metric_history(parent, k)) == 1 for k in metrics_before)
    # it says what it wrote and where
    assert "analysis v2 logged to parent run" in out and "analysis/v2/: " in out and "run_record.json" in out
    assert f"#/experiments/{analysed.experiment_id}/runs/{parent}/artifacts/analysis/v2/report.html?" in out

    # its own record: the study and options it used, what started it
    with tempfile.TemporaryDirectory() as d:
        record = json.loads(Path(client.download_artifacts(parent, "analysis/v2/run_record.json", d)).read_text())
        first = json.loads(Path(client.download_artifacts(parent, "analysis/run_record.json", d)).read_text())
    assert record["study"]["cutoff"]["select_on"] == "cifake_val/auc" and first["study"]["cutoff"]["select_on"] == "agiri_val/auc"
    assert record["analysis"]["version"] == "v2" and first["analysis"]["version"] == "v1"
    assert record["analysis"]["command"].startswith("sweeps/run.py cutoff") and record["analysis"]["study_changes"]

    # the views read the latest analysis unless told otherwise
    assert analysis_versions(client, parent) == [AnalysisVersion(1), AnalysisVersion(2)]
    latest, own = load_sweep(analysed.uri, "sw1"), load_sweep(analysed.uri, "sw1", analysis=AnalysisVersion(1))
    assert latest.analysis == AnalysisVersion(2) and own.analysis == AnalysisVersion(1)
    def chosen_on(r):
        return set(r.artifact_table(r.parent_run_id, r.analysis_file("cutoffs.csv"))["chosen_on"].dropna())

    assert "cifake_val/auc" in chosen_on(latest) and "cifake_val/auc" not in chosen_on(own)
    assert figures.cutoff_summary(latest).equals(latest.artifact_table(latest.parent_run_id, "analysis/v2/cutoff_summary.csv"))

    # and the next one goes one past the latest, never onto an existing one
    assert next_analysis(client, parent) == AnalysisVersion(3)


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.external, self.ids, self.text = [], [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a.get("src", ""))
        if tag in ("script", "link", "iframe") or (tag != "a" and re.match(r"(https?:)?//", a.get("src", "") or "")):
            self.external.append((tag, a))
        if "id" in a:
            self.ids.append(a["id"])

    def handle_data(self, data):
        self.text.append(data)


@pytest.mark.slow  # the sweep's analysis (shared fixture)
def test_the_report_page_is_self_contained_and_shows_the_answers(analysed):
    client, parent = analysed.client(), analysed.parent_run_id
    with tempfile.TemporaryDirectory() as d:
        page = Path(client.download_artifacts(parent, "report.html", d)).read_text()
    parsed = _Page()
    parsed.feed(page)
    assert not parsed.external, parsed.external  # nothing fetched: no scripts, stylesheets or remote images
    pngs = [a.path for a in client.list_artifacts(parent, "figures") if a.path.endswith(".png")]
    assert len(parsed.images) == len(pngs) == 3
    for src in parsed.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert parsed.ids == ["headlines", "cells", "cutoffs", "explain", "transfer", "figures", "correlations", "record"]
    text = " ".join(parsed.text)
    results = load_sweep(analysed.uri, "sw1", analysis=AnalysisVersion(1))
    lines = headlines(results)
    # one per pre-registered question (along training, across models, across seeds) and the cutoff's
    assert len(lines) == 4 and lines[-1].startswith("cutoff: transfer_val − intrinsic_val_loss")
    assert all(line in text for line in lines)
    assert "transfer_val" in text and "oracle_test" in text and '"code_version": "test"' in text
    # links back to MLflow: the sweep's runs and its parent run
    assert runs_link(analysed.uri, analysed.experiment_id, "sw1").replace("&", "&amp;") in page
    # built from what is logged: the same page again for the same analysis
    assert render_report(results, analysed.uri) == page


def test_runs_link_filter_selects_exactly_one_sweeps_runs(store):
    """Two sweeps in one experiment: the runs link's filter, read back from the link and given to
    mlflow.search_runs, returns exactly that sweep's parent and cells."""
    one = write_sweep(store, "abl-1", seeds=(11,), srms=("none",))
    two = write_sweep(store, "abl-2", seeds=(11, 12), srms=("none",))
    assert one.experiment_id == two.experiment_id
    mlflow.set_tracking_uri(store)
    for tracking, n_cells in ((one, 2), (two, 4)):
        link = runs_link(store, tracking.experiment_id, tracking.sweep_name)
        base, fragment = link.split("#", 1)
        path, query = fragment.split("?", 1)
        assert base == "http://127.0.0.1:5000/" and path == f"/experiments/{tracking.experiment_id}/runs"
        q = urllib.parse.parse_qs(query)
        assert q["workflowType"] == ["machine_learning"] and q["searchFilter"] == [sweep_filter(tracking.sweep_name)]
        assert "%60fakedet.sweep%60" in query and " " not in link  # URL-encoded as a browser sends it
        found = mlflow.search_runs([tracking.experiment_id], filter_string=q["searchFilter"][0], output_format="list")
        expected = {tracking.parent_run_id, *(r.info.run_id for r in tracking.cell_runs())}
        assert {r.info.run_id for r in found} == expected and len(expected) == 1 + n_cells
    assert runs_link("http://mlflow:5000/", "7") == "http://mlflow:5000/#/experiments/7/runs?workflowType=machine_learning"
    assert run_link(store, "7", "abc") == "http://127.0.0.1:5000/#/experiments/7/runs/abc?workflowType=machine_learning"
    assert run_link(store, "7", "abc", "analysis/v2/report.html") == \
        "http://127.0.0.1:5000/#/experiments/7/runs/abc/artifacts/analysis/v2/report.html?workflowType=machine_learning"
    assert compare_link("http://mlflow:5000", "7", ["a1", "b2"]) == \
        "http://mlflow:5000/#/compare-runs?runs=%5B%22a1%22%2C%22b2%22%5D&experiments=%5B%227%22%5D"


def test_the_store_is_found_from_the_repository_root_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("FAKEDET_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "mlflow.db").write_bytes(b"")
    (tmp_path / "notebooks").mkdir()
    # a notebook's kernel starts in notebooks/: the store in the folder above is found
    assert find_tracking_uri(tmp_path / "notebooks") == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://a:5000")
    assert find_tracking_uri(tmp_path / "notebooks") == "http://a:5000"
    monkeypatch.setenv("FAKEDET_TRACKING_URI", "sqlite:////x/y.db")
    assert find_tracking_uri(tmp_path / "notebooks") == "sqlite:////x/y.db"


def test_the_views_default_to_the_latest_ablation_never_a_later_hpo_sweep(store):
    write_sweep(store, "abl", seeds=(11,), srms=("none",))
    write_sweep(store, "hp", seeds=(11,), srms=("none",), kind="hpo")  # started after it
    assert load_sweep(store).name == "hp"  # the most recent sweep of any kind
    assert load_sweep(store, kind="ablation").name == "abl"
    with pytest.raises(LookupError, match="no analysis v2; it has: none"):
        load_sweep(store, "abl", analysis=AnalysisVersion(2))


def test_analysis_versions_parse_as_a_user_names_them():
    assert [AnalysisVersion.parse(t) for t in ("v2", "2", "analysis/v2", "analysis", "v1")] == \
        [AnalysisVersion(2)] * 3 + [AnalysisVersion(1)] * 2
    assert AnalysisVersion(3).report == "analysis/v3/report.html" and AnalysisVersion(1).report == "report.html"
    for bad in ("v0", "latest", "figures"):
        with pytest.raises(ValueError, match="expected v1, v2"):
            AnalysisVersion.parse(bad)


@pytest.mark.slow  # two commands as a user runs them, each importing MLflow and matplotlib
def test_report_command_writes_the_page_of_any_sweep(analysed, tmp_path, run):
    out = tmp_path / "page.html"
    proc = run([sys.executable, "-m", "fakedet", "report", "--sweep", "sw1", "--tracking-uri", analysed.uri, "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.is_file() and "data:image/png;base64," in out.read_text() and str(out) in proc.stdout
    assert "headline:" in proc.stdout  # the answers, printed as well
    bad = run([sys.executable, "-m", "fakedet", "report", "--sweep", "nope", "--tracking-uri", analysed.uri])
    assert bad.returncode == 2 and bad.stderr.startswith("error: no sweep named 'nope'") and len(bad.stderr.splitlines()) == 1
