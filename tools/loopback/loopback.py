#!/usr/bin/env python
"""The cluster path, on one machine over 127.0.0.1, with the real parts.

`python tools/loopback/loopback.py` starts PostgreSQL, `mlflow server` on it with basic auth and proxied
artifacts, a Ray head and a second Ray node with `ray start` and token authentication; runs the smoke
ablation joined to them (`--address`, `--tracking-uri http://127.0.0.1:PORT`, the sweeps' MLflow user
in MLFLOW_TRACKING_USERNAME/PASSWORD); checks that the trials ran on both nodes and, through MLflow's
REST API only, that every run, metric point and artifact reached the server; checks that MLflow
refuses requests without credentials (401), that a driver with a wrong Ray token is refused and that
everything started listens on 127.0.0.1 only; then stops everything it started by process id, checks
that none of those processes is left, and exits 0 (all passed) or 1.

The parts, one job each (tests/test_cluster_loopback.py runs the same code):
- tools/loopback/supervise.py: starting processes, finding all of theirs, stopping them by pid (psutil);
- tools/loopback/loopback_cluster.py: the cluster (`LoopbackCluster`), and what the machine must have;
- tools/loopback/ray_on_loopback.py: `ray start` for the second node (ray-project/ray#59110);
- tools/loopback/loopback_checks.py: the checks (`loopback_check`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from loopback_checks import loopback_check
from loopback_cluster import LoopbackCluster, LoopbackError, missing_requirements, say


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-root", help="prepared-data cache (default: the sweep command's, $FAKEDET_CACHE or ~/.cache/fakedet)")
    parser.add_argument("--root", help="working folder (default: a new /tmp/fdlb*; keep it short: Ray's socket paths)")
    parser.add_argument("--keep", action="store_true", help="keep the working folder (logs, database, artifacts)")
    parser.add_argument("--name", default="loopback1", help="sweep name")
    parser.add_argument("--quiet", action="store_true", help="do not echo the sweep's output")
    args = parser.parse_args(argv)
    why = missing_requirements()
    if why:
        say(f"cannot run here: {why}")
        return 1
    started = time.time()
    report = None
    cluster = LoopbackCluster(Path(args.root) if args.root else None, keep=args.keep)
    try:
        cluster.start()
        report = loopback_check(cluster, args.name, Path(args.cache_root) if args.cache_root else None, echo=not args.quiet)
    except LoopbackError as e:
        cluster.failed = True
        say(f"error: {e}")
    except BaseException:
        cluster.failed = True
        raise
    finally:
        left = cluster.stop()
        say(f"{len(cluster.all_procs())} processes started here, {len(left)} left running" + (f": {left}" if left else ""))
    if report is not None and report.failures:
        say(f"{len(report.failures)} check(s) failed:\n  " + "\n  ".join(report.failures))
    ok = report is not None and not report.failures and not left
    say(f"{'PASSED' if ok else 'FAILED'} in {time.time() - started:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
