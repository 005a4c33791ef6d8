"""The loopback cluster's checks: what a sweep sent to MLflow, read back through its REST API only, and
what the cluster lets in.

- `check_sweep`: the parent run and one cell run per cell, FINISHED; every metric point each trial
  reported (Ray Tune's result.json files), once, with its value; every artifact, listed with its size
  and downloaded through the server's artifact proxy byte for byte; the parent's analysis; that the
  trials ran on both Ray nodes and that each cell run's `fakedet.node_id` tag names its trial's node.
- `check_mlflow_auth`: a request without credentials, or with a wrong password, is refused with 401;
  the sweeps' user signs in and is no admin; its password is in no run's params or tags.
- `refused`: a driver with a wrong Ray token is turned away.
- `loopback_check`: all of it on a started `LoopbackCluster`, plus: everything started listened on
  127.0.0.1 only.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from loopback_cluster import HOST, REPO, LoopbackCluster, basic_auth_header, say
from supervise import Service, log_tail

if str(REPO) not in sys.path:  # run as a script from anywhere: the checks read fakedet's own definitions
    sys.path.insert(0, str(REPO))
from fakedet.sweep.tags import TAG_NODE as NODE_TAG  # set by the sweep's MLflow callback from the trial's node id
PARENT_ARTIFACTS = ("analysis/cells.csv", "analysis/points.csv", "analysis/correlations.csv", "analysis/cells_summary.csv",
                    "analysis/cutoffs.csv", "analysis/cutoff_summary.csv", "analysis/cutoff_comparison.csv",
                    "analysis/run_record.json")


class Rest:
    """The few MLflow REST calls the checks use; nothing from MLflow's client library."""

    def __init__(self, base: str, auth: tuple[str, str] | None = None) -> None:
        self.base = base.rstrip("/")
        self.headers = {"Authorization": basic_auth_header(*auth)} if auth else {}

    def _open(self, endpoint: str, params: dict | None = None, body: dict | None = None) -> bytes:
        url = f"{self.base}{endpoint}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        data = json.dumps(body).encode() if body is not None else None
        headers = {**self.headers, **({"Content-Type": "application/json"} if data else {})}
        req = urllib.request.Request(url, data=data, headers=headers)
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.read()

    def get(self, endpoint: str, **params) -> dict:
        return json.loads(self._open(endpoint, params) or b"{}")

    def post(self, endpoint: str, body: dict) -> dict:
        return json.loads(self._open(endpoint, body=body) or b"{}")

    def search_runs(self, experiment_ids: list[str], filter_string: str) -> list[dict]:
        runs, token = [], None
        while True:
            body = {"experiment_ids": experiment_ids, "filter": filter_string, "max_results": 1000}
            if token:
                body["page_token"] = token
            page = self.post("/api/2.0/mlflow/runs/search", body)
            runs += page.get("runs", [])
            token = page.get("next_page_token")
            if not token:
                return runs

    def history(self, run_id: str, key: str) -> list[dict]:
        points, token = [], None
        while True:
            params = {"run_id": run_id, "metric_key": key, "max_results": 25000}
            if token:
                params["page_token"] = token
            page = self.get("/api/2.0/mlflow/metrics/get-history", **params)
            points += page.get("metrics", [])
            token = page.get("next_page_token")
            if not token:
                return points

    def artifacts(self, run_id: str, path: str = "") -> dict[str, int]:
        """{path: size} of every file under `path`, recursively (artifacts/list, as the UI lists them)."""
        files = {}
        listing = self.get("/api/2.0/mlflow/artifacts/list", run_id=run_id, **({"path": path} if path else {}))
        for f in listing.get("files", []):
            if f.get("is_dir"):
                files.update(self.artifacts(run_id, f["path"]))
            else:
                files[f["path"]] = int(f.get("file_size", -1))
        return files

    def download(self, artifact_uri: str, path: str) -> bytes:
        """A file through the artifact proxy (`mlflow-artifacts:/...` roots)."""
        root = artifact_uri.split("mlflow-artifacts:", 1)[1].lstrip("/")
        return self._open(f"/api/2.0/mlflow-artifacts/artifacts/{urllib.parse.quote(root)}/{urllib.parse.quote(path)}")


@dataclass
class Report:
    failures: list[str] = field(default_factory=list)
    passed: list[str] = field(default_factory=list)
    log: Callable[[str], None] = say

    def check(self, ok: bool, what: str, detail: str = "") -> bool:
        if ok:
            self.passed.append(what)
            self.log(f"  ok    {what}")
        else:
            self.failures.append(f"{what}: {detail}" if detail else what)
            self.log(f"  FAIL  {what}" + (f": {detail}" if detail else ""))
        return ok


def _tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def _params(run: dict) -> dict[str, str]:
    return {p["key"]: p["value"] for p in run["data"].get("params", [])}


def _metrics(run: dict) -> dict[str, float]:
    return {m["key"]: m["value"] for m in run["data"].get("metrics", [])}


def _trial_results(storage: Path, name: str) -> dict[str, dict[int, dict]]:
    """{trial id: {step: result}}: what each trial reported, from Ray Tune's result.json files."""
    out: dict[str, dict[int, dict]] = {}
    for path in (storage / name).glob("*/result.json"):
        for line in path.read_text().splitlines():
            if line.strip():
                result = json.loads(line)
                out.setdefault(result["trial_id"], {})[int(result["step"])] = result
    return out


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) or (math.isnan(a) and math.isnan(b))


def check_sweep(rest: Rest, name: str, storage: Path, node_ids: dict[str, str], node_pids: dict[str, set[int]],
                report: Report | None = None, log: Callable[[str], None] = say) -> Report:
    """Did the sweep `name` run on every node, and did all it reported reach the server?

    `rest`: the server, signed in. `node_ids` and `node_pids`: each node's (by name) id, and the process
    ids seen in its `ray start` session.

    The reference is what the trials reported (Ray Tune's result.json files) and the artifact files of
    their checkpoints (Tune's storage, shared by both nodes here); the server is read through its REST
    API only.
    """
    # which reported values the sweep logs as MLflow metrics; imported here, not above, because it
    # brings torch and Ray Tune (seconds), which collecting the tests or `--help` should not wait for
    from fakedet.sweep.tracking import is_logged_metric

    report = report if report is not None else Report(log=log)
    log(f"checking sweep {name!r} through {rest.base}")
    experiments = rest.post("/api/2.0/mlflow/experiments/search", {"max_results": 1000}).get("experiments", [])
    ids = [e["experiment_id"] for e in experiments]
    parents = rest.search_runs(ids, f"tags.`fakedet.sweep` = '{name}' and tags.`fakedet.kind` = 'sweep'") if ids else []
    if not report.check(len(parents) == 1, "one parent run for the sweep", f"found {len(parents)}"):
        return report
    parent = rest.get("/api/2.0/mlflow/runs/get", run_id=parents[0]["info"]["run_id"])["run"]
    pid, pinfo, pparams = parent["info"]["run_id"], parent["info"], _params(parent)
    report.check(pinfo["status"] == "FINISHED", "parent run FINISHED", pinfo["status"])
    experiment = rest.get("/api/2.0/mlflow/experiments/get", experiment_id=pinfo["experiment_id"])["experiment"]
    report.check(experiment["artifact_location"].startswith("mlflow-artifacts:"),
                 "artifacts proxied through the server (mlflow-artifacts:)", experiment["artifact_location"])

    children = rest.search_runs([pinfo["experiment_id"]], f"tags.`mlflow.parentRunId` = '{pid}'")
    cells = [r for r in children if _tags(r).get("fakedet.kind") == "cell"]
    expected_cells = int(pparams.get("cells", -1))
    report.check(len(cells) == expected_cells and expected_cells > 0,
                 f"{expected_cells} cell runs, as the parent's `cells` param says", f"found {len(cells)}")
    report.check(all(r["info"]["status"] == "FINISHED" for r in cells), "every cell run FINISHED",
                 str({r["info"]["run_name"]: r["info"]["status"] for r in cells}))

    results = _trial_results(storage, name)
    report.check(len(results) == int(pparams.get("trials", -1)), f"{pparams.get('trials')} trials reported to Tune",
                 f"found result.json for {len(results)}")
    ips = {r.get("node_ip") for trial in results.values() for r in trial.values()}
    report.check(ips == {HOST}, f"every trial reported from a node at {HOST}", str(ips))

    # -- metrics: every reported point of every logged metric, on the server, once ----------------------
    n_points = 0
    for run in cells:
        rid, tags, params = run["info"]["run_id"], _tags(run), _params(run)
        label = run["info"]["run_name"]
        reported = results.get(tags.get("fakedet.trial", ""), {})
        epochs = float(params.get("epochs", "nan"))
        mine = {step: r for step, r in reported.items() if float(r["epoch"]) <= epochs + 1e-9}
        keys = {k for r in mine.values() for k, v in r.items()
                if is_logged_metric(k) and isinstance(v, (int, float)) and not isinstance(v, bool)}
        stored = set(_metrics(run))
        if not report.check(bool(mine) and stored == keys, f"{label}: the metric keys the trial reported",
                            f"missing {sorted(keys - stored)[:8]}, extra {sorted(stored - keys)[:8]}, points {len(mine)}"):
            continue
        wrong = []
        for key in sorted(keys):
            history = rest.history(rid, key)
            steps = [int(m["step"]) for m in history]
            want = sorted(s for s, r in mine.items() if key in r)
            n_points += len(history)
            if sorted(steps) != want:
                wrong.append(f"{key}: steps {sorted(steps)} != reported {want}")
            else:
                by_step = {int(m["step"]): float(m["value"]) for m in history}
                bad = [s for s in want if not _close(by_step[s], float(mine[s][key]))]
                if bad:
                    wrong.append(f"{key}: values differ at steps {bad}")
        report.check(not wrong, f"{label}: full histories of {len(keys)} metrics, values as reported ({len(mine)} "
                                f"points each, epochs {sorted(float(r['epoch']) for r in mine.values())})", "; ".join(wrong[:5]))
    log(f"  ({n_points} metric points read back)")

    # -- artifacts: each cell's files, as its checkpoint holds them ------------------------------------
    for run in cells:
        rid, tags, params, label = run["info"]["run_id"], _tags(run), _params(run), run["info"]["run_name"]
        epochs = float(params.get("epochs", "nan"))
        folders = sorted((storage / name).glob(f"*{tags.get('fakedet.trial', '?')}*/checkpoint_*/cell_artifacts/*/{epochs:g}"))
        if not report.check(bool(folders), f"{label}: its artifacts in the trial's checkpoint", "no checkpoint folder"):
            continue
        local = {str(p.relative_to(folders[-1])): p for p in folders[-1].rglob("*") if p.is_file()}
        listed = rest.artifacts(rid)
        sizes_ok = listed == {k: p.stat().st_size for k, p in local.items()}
        report.check(sizes_ok and {"model.pt", "metrics.json", "cifake_test_thresholds.png"} <= set(listed),
                     f"{label}: {len(listed)} artifacts listed, names and sizes as written",
                     f"server {sorted(listed.items())[:6]} vs checkpoint {sorted(local)[:6]}")
        differ = [path for path in sorted(set(listed) & set(local))
                  if hashlib.sha256(rest.download(run["info"]["artifact_uri"], path)).digest()
                  != hashlib.sha256(local[path].read_bytes()).digest()]
        report.check(not differ, f"{label}: each artifact downloaded through the proxy, byte for byte", f"differ: {differ}")

    # -- the parent's analysis ---------------------------------------------------------------------------
    pm = _metrics(parent)
    for what, ok in (("the headline correlation's n (models, trajectories)", {"headline/n_models", "headline/n_trajectories"} <= set(pm)),
                     ("cutoffs", any(k.startswith("cutoff/transfer_val/") for k in pm))):
        report.check(ok, f"parent metrics: {what}", f"{len(pm)} metrics: {sorted(pm)[:10]}")
    panalysis = rest.artifacts(pid, "analysis")
    report.check(set(PARENT_ARTIFACTS) <= set(panalysis) and all(panalysis[k] > 0 for k in PARENT_ARTIFACTS),
                 f"parent artifacts: {len(panalysis)} under analysis/", f"missing {sorted(set(PARENT_ARTIFACTS) - set(panalysis))}")

    # -- nodes: where each trial ran, and what the server was told ----------------------------------------
    # Tune reports each trial's process id; each node's processes are those of its `ray start` session
    where: dict[str, set[str]] = {}
    for trial, reported in results.items():
        pids = {int(r["pid"]) for r in reported.values() if "pid" in r}
        where[trial] = {node for node, seen in node_pids.items() if pids & seen}
    report.check(bool(where) and all(len(nodes) == 1 for nodes in where.values()),
                 "each trial's process is one of one node's processes", str(where))
    ran_on = set().union(*where.values()) if where else set()
    report.check(ran_on == set(node_ids), f"trials ran on both nodes ({', '.join(sorted(ran_on))})",
                 f"ran on {sorted(ran_on)} of {sorted(node_ids)}")
    missing = [r["info"]["run_name"] for r in cells if not _tags(r).get(NODE_TAG)]
    if report.check(not missing, f"every cell run has a `{NODE_TAG}` tag",
                    f"none on {missing}: the trainable must report its node id (`ray.get_runtime_context()."
                    f"get_node_id()`) and the MLflow callback tag the cell runs with it"):
        wrong = {}
        for run in cells:
            tags = _tags(run)
            nodes = where.get(tags.get("fakedet.trial", ""), set())
            if len(nodes) != 1 or tags[NODE_TAG] != node_ids.get(next(iter(nodes))):
                wrong[run["info"]["run_name"]] = (tags[NODE_TAG], sorted(nodes))
        report.check(not wrong, f"every cell run's `{NODE_TAG}` names the node its trial ran on", str(wrong))
    return report



def check_mlflow_auth(tracking_uri: str, username: str, password: str, report: Report) -> Report:
    """Basic auth is on: no or wrong credentials get 401, the sweeps' user gets in and is no admin."""
    probe = "/api/2.0/mlflow/experiments/search"
    for label, auth in (("without credentials", None), ("with a wrong password", (username, password + "x"))):
        try:
            Rest(tracking_uri, auth).get(probe, max_results=1)
            status: int | str = 200
        except urllib.error.HTTPError as e:
            status = e.code
        except OSError as e:
            status = str(e)
        report.check(status == 401, f"MLflow refuses a request {label} (401)", f"got {status}")
    try:
        user = Rest(tracking_uri, (username, password)).get("/api/2.0/mlflow/users/current").get("user", {})
        report.check(user.get("username") == username and user.get("is_admin") is False,
                     f"the sweeps' user {username!r} signs in and is not an admin", str(user))
    except (urllib.error.HTTPError, OSError) as e:
        report.check(False, f"the sweeps' user {username!r} signs in", str(e))
    return report


def check_no_password_logged(rest: Rest, password: str, report: Report) -> Report:
    """The tracking password is in no run's params or tags (the client takes it from the environment)."""
    experiments = rest.post("/api/2.0/mlflow/experiments/search", {"max_results": 1000}).get("experiments", [])
    runs = rest.search_runs([e["experiment_id"] for e in experiments], "") if experiments else []
    leaked = [r["info"]["run_name"] for r in runs
              if any(password in v for v in [*_params(r).values(), *_tags(r).values()])]
    report.check(bool(runs) and not leaked, f"the tracking password is in none of {len(runs)} runs' params or tags",
                 f"found in {leaked}")
    return report


def refused(client: Service, timeout: float = 120) -> tuple[bool, str]:
    """(refused, why): did the cluster turn the client away for its token?"""
    try:
        rc = client.popen.wait(timeout)
    except subprocess.TimeoutExpired:
        client.stop()
        return False, f"still trying after {timeout:.0f} s"
    text = client.log.read_text(errors="replace")
    ok = rc != 0 and "CONNECTED" not in text and "auth" in text.lower()
    return ok, f"exit {rc}: {log_tail(client.log, 3)}"


def loopback_check(cluster: LoopbackCluster, name: str, cache_root: Path | None = None, echo: bool = False,
                   sweep_timeout: float = 900) -> Report:
    """On a started cluster: the smoke ablation, its records on the server, and who is let in."""
    report = Report(log=cluster.log)
    probe = cluster.start_wrong_token_client()  # turned away while the sweep runs
    check_mlflow_auth(cluster.tracking_uri, cluster.mlflow_user, cluster.mlflow_password, report)
    rc = cluster.run_sweep(name, cache_root, timeout=sweep_timeout, echo=echo)
    sweep_log = cluster.logs / f"sweep-{name}.log"
    if report.check(rc == 0, "the smoke ablation exited 0", f"exit {rc}; its log ends:\n{log_tail(sweep_log, 60)}"):
        rest = Rest(cluster.tracking_uri, (cluster.mlflow_user, cluster.mlflow_password))
        try:
            check_sweep(rest, name, cluster.storage, cluster.node_ids, cluster.node_pids(), report, log=cluster.log)
            check_no_password_logged(rest, cluster.mlflow_password, report)
        except urllib.error.HTTPError as e:
            report.check(False, "the MLflow REST API answers", f"{e.url}: {e.code} {e.read()[:500]!r}")
        except OSError as e:
            report.check(False, "the MLflow REST API answers", str(e))
    ok, why = refused(probe)
    report.check(ok, "a driver with a wrong Ray token is refused", why)
    heard = sorted(set(cluster.heard))  # a copy: the watcher may still add
    outside = [(svc, a) for svc, a in heard if not a.startswith(f"{HOST}:")]
    report.check(bool(heard) and not outside, f"{len(heard)} listening sockets seen, all on {HOST} "
                 f"({', '.join(sorted({n for n, _ in heard}))})", f"not on {HOST}: {outside}")
    cluster.failed = cluster.failed or bool(report.failures)
    return report
