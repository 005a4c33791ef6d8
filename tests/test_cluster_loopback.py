"""The cluster path on one machine, with the real parts: PostgreSQL, `mlflow server` on it with basic
auth, a Ray head and a second Ray node (`ray start`, token auth), all on 127.0.0.1; the smoke ablation
joined to them, signed in to MLflow as the sweeps' user.

The same code as `python tools/loopback/loopback.py`; tools/loopback/loopback_cluster.py says how each part is
started, tools/loopback/supervise.py how its processes are found and stopped, tools/loopback/loopback_checks.py what
is checked. Skipped where PostgreSQL's server programs, psycopg2 or Flask-WTF (MLflow's basic-auth
app) are missing; CI installs them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "loopback"))
from loopback_checks import loopback_check
from loopback_cluster import HOST, LoopbackCluster, missing_requirements
from supervise import alive

MISSING = missing_requirements()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(MISSING is not None, reason=f"loopback cluster: {MISSING}")]


def test_smoke_ablation_on_a_two_node_loopback_cluster(workspace):
    cluster = LoopbackCluster()
    with cluster:  # leaving it stops everything by pid, and raises if any process is left
        assert cluster.tracking_uri.startswith(f"http://{HOST}:") and cluster.ray_address.startswith(f"{HOST}:")
        assert len(set(cluster.node_ids.values())) == 2, cluster.node_ids
        report = loopback_check(cluster, "loopback1", workspace.cache, sweep_timeout=600)
    started = cluster.all_procs()
    assert {"postgres", "mlflow", "mlflow-create-user", "ray-head", "ray-worker", "sweep-loopback1",
            "client-wrong-token"} <= {s.name for s in cluster.services}
    assert len(started) > 10, started  # postgres', mlflow's, both Ray nodes' (and their workers'), the sweep's
    assert not [p for p in started if alive(p)]
    assert not report.failures, "\n".join(report.failures)
    # the authenticated path was the one exercised: refusals seen, not skipped
    assert sum("(401)" in p for p in report.passed) == 2, report.passed
