#!/usr/bin/env python
"""The cluster path, on one machine over 127.0.0.1, with the real parts.

`python cluster/loopback.py` starts PostgreSQL (Debian's server programs, a fresh `initdb` in a temp
dir), `mlflow server` on it with proxied artifacts, a Ray head and a second Ray node with `ray start`
and token authentication; runs the smoke ablation joined to them (`--address`, `--tracking-uri
http://127.0.0.1:PORT`); checks that the trials ran on both nodes and, through MLflow's REST API
only, that every run, metric point and artifact reached the server; checks that a driver with a
wrong Ray token is refused and that everything started listens on 127.0.0.1 only; then stops
everything it started by process id, checks that none of those processes is left, and exits 0 (all
passed) or 1. `tests/test_cluster_loopback.py` runs the same code (`LoopbackCluster`, `loopback_check`).

What it takes from the machine:
- PostgreSQL's server programs: on PATH, or Debian's `/usr/lib/postgresql/<version>/bin` (where the
  `postgresql` package puts them, off PATH). As root they run as the `postgres` user (PostgreSQL
  refuses root) through `subprocess.Popen(user=...)`, so the pid we hold is the postmaster's.
- psycopg2, which `mlflow server` needs for a PostgreSQL store.
- Linux: processes and sockets are read from /proc.

Processes. Every server starts with `start_new_session=True`, so its session id is the pid we
started. Its processes are that pid, its descendants and whatever is left in its session, read from
/proc at the start and every second after, and recorded as (pid, start time), so a pid the kernel
reuses later is never taken for ours. Stopping: the server's own graceful signal to the pid we
started (`ray start --block` stops its node's processes on SIGTERM; PostgreSQL takes SIGINT as a fast
shutdown), then SIGTERM, then SIGKILL, to each recorded process still alive. Never `ray stop` (it
kills every Ray on the machine by name) nor `pkill`.

Ray 2.60 on one host:
- `ray start` and `ray.init` rewrite 127.0.0.1 (in `--node-ip-address`, `--address`) to the machine's
  outward IP, unless `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, Ray's switch for single-machine
  clusters: the head and the sweep's driver run with it. With 127.0.0.1 as its address, the head
  binds GCS, raylet and agents to 127.0.0.1 only.
- `ray start` refuses to start a second node under that switch, and without it sends the node to the
  outward IP, where nothing listens (ray-project/ray#59110). The second node's `ray start` therefore
  runs with that one rewrite turned off (`RAY_START_ON_LOOPBACK`); its own address is then the one it
  reaches the head from, 127.0.0.1, and its servers bind there too.
- Every port is picked free and passed explicitly, and workers take theirs from the OS
  (`--min-worker-port 0 --max-worker-port 0`): the two nodes, and any other Ray on the machine, never
  collide (defaults such as the dashboard agent's 52365 or Ray Client's 10001 would).
- Token auth: `RAY_AUTH_MODE=token` and `RAY_AUTH_TOKEN_PATH`, a mode-600 file holding a fresh
  256-bit token, for both nodes and the driver; `RAY_AUTH_TOKEN`, which would take precedence, is
  removed from their environment, and `~/.ray/auth_token` is neither read nor written.
- Both nodes are 127.0.0.1, so a trial's node is known by process and by id: Tune reports each
  trial's pid, which is one node's process; each cell run's `fakedet.node_id` tag must name that
  node's id (the `--node_id` on its raylet's command line).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
NODE_TAG = "fakedet.node_id"  # set by the sweep's MLflow callback from the trial's reported node id
# `ray start` with Ray's loopback rewrite turned off (ray-project/ray#59110): a worker node's `--address 127.0.0.1:P`
# is otherwise rewritten to the machine's outward IP, where a head on 127.0.0.1 does not listen
RAY_START_ON_LOOPBACK = ("import sys, ray._private.services as s; s.resolve_ip_for_localhost = lambda host: host; "
                         "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; sys.exit(main())")
PARENT_ARTIFACTS = ("analysis/cells.csv", "analysis/points.csv", "analysis/correlations_cells.csv",
                    "analysis/correlations_points.csv", "analysis/cutoffs.csv", "analysis/cutoff_summary.csv",
                    "analysis/cutoff_curves.png", "analysis/run_record.json")


def say(msg: str) -> None:
    print(f"[loopback] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------
# what the machine must have
# ---------------------------------------------------------------------------------------------------
def find_postgres() -> Path | None:
    """The folder of PostgreSQL's server programs: on PATH, else Debian's /usr/lib/postgresql/<version>/bin."""
    candidates = []
    if shutil.which("postgres"):
        candidates.append(Path(shutil.which("postgres")).resolve().parent)
    versions = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if p.parent.name.isdigit()]
    candidates += sorted(versions, key=lambda p: int(p.parent.name), reverse=True)
    for folder in candidates:
        if all((folder / name).exists() for name in ("postgres", "initdb", "pg_isready", "createdb")):
            return folder
    return None


def missing_requirements() -> str | None:
    """Why this machine cannot run the loopback check, or None."""
    import importlib.util

    if not sys.platform.startswith("linux"):
        return "the loopback check reads processes from /proc: Linux only"
    if find_postgres() is None:
        return ("PostgreSQL server programs not found (postgres, initdb, pg_isready, createdb on PATH or in "
                "/usr/lib/postgresql/*/bin); on Debian: apt-get install postgresql")
    if importlib.util.find_spec("psycopg2") is None:
        return "psycopg2 is not installed (mlflow server needs it for a postgresql:// store): pip install psycopg2-binary"
    return None


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free on 127.0.0.1 now (held open together, so no two are the same)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((HOST, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


# ---------------------------------------------------------------------------------------------------
# processes, from /proc
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Proc:
    pid: int
    start: int  # start time in clock ticks after boot: a reused pid has another

    def cmdline(self) -> list[str]:
        try:
            return Path(f"/proc/{self.pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            return []


def _stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, session id, start time) of a process, or None when there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) ": field 3 onwards
    return fields[0], int(fields[1]), int(fields[3]), int(fields[19])


def process_table() -> dict[int, tuple[str, int, int, int]]:
    table = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None:
                table[int(entry.name)] = st
    return table


def alive(p: Proc) -> bool:
    """Still running: the same process (same start time), neither a zombie nor dead."""
    st = _stat(p.pid)
    return st is not None and st[3] == p.start and st[0] not in ("Z", "X", "x")


def family(root: Proc, table: dict[int, tuple[str, int, int, int]]) -> set[Proc]:
    """`root`, its descendants, and every process in its session (a session started with `root`)."""
    children: dict[int, list[int]] = {}
    for pid, (_, ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    stack = [pid for pid, (_, _, sid, start) in table.items() if sid == root.pid and start >= root.start]
    if root.pid in table and table[root.pid][3] == root.start:
        stack.append(root.pid)
    found: set[int] = set()
    while stack:
        pid = stack.pop()
        if pid in found or pid not in table:
            continue
        found.add(pid)
        stack.extend(children.get(pid, []))
    return {Proc(pid, table[pid][3]) for pid in found}


def _signal(p: Proc, sig: int) -> None:
    if alive(p):
        try:
            os.kill(p.pid, sig)
        except ProcessLookupError:
            pass


def listening(procs) -> set[str]:
    """The TCP addresses (ip:port) these processes listen on: their sockets' inodes in /proc/net/tcp{,6}."""
    import ipaddress

    inodes = set()
    for p in procs:
        try:
            for fd in os.listdir(f"/proc/{p.pid}/fd"):
                target = os.readlink(f"/proc/{p.pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) < 10 or cols[3] != "0A" or cols[9] not in inodes:  # 0A: LISTEN
                continue
            addr, port = cols[1].split(":")
            raw = bytes.fromhex(addr)
            # 32-bit words in host (little-endian) order
            ip = ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
                ip = ip.ipv4_mapped
            found.add(f"{ip}:{int(port, 16)}" if ip.version == 4 else f"[{ip}]:{int(port, 16)}")
    return found


@dataclass
class Service:
    """A process tree started here: the pid we started, and every process of its tree or session seen since."""

    name: str
    popen: subprocess.Popen
    log: Path
    stop_signal: int = signal.SIGTERM
    root: Proc = field(init=False)
    procs: set[Proc] = field(default_factory=set)

    def __post_init__(self) -> None:
        st = _stat(self.popen.pid)
        self.root = Proc(self.popen.pid, st[3] if st else 0)
        self.procs.add(self.root)

    def refresh(self, table=None) -> None:
        # called from the watcher thread and the main thread: readers iterate over list() copies
        self.procs |= family(self.root, table if table is not None else process_table())

    def running(self) -> bool:
        return self.popen.poll() is None

    def left(self) -> list[Proc]:
        return sorted((p for p in list(self.procs) if alive(p)), key=lambda p: p.pid)

    def stop(self, grace: float = 30.0) -> list[Proc]:
        """Stop the tree by pid; returns the processes still alive afterwards (none, normally)."""
        self.refresh()
        if self.running():
            _signal(self.root, self.stop_signal)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        self.refresh()
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            left = self.left()
            if not left:
                break
            for p in left:
                _signal(p, sig)
            deadline = time.time() + wait
            while time.time() < deadline and self.left():
                self.popen.poll()  # reaps the root if it is ours and has ended
                time.sleep(0.2)
        if self.popen.poll() is None:
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                pass
        return self.left()


def log_tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


# ---------------------------------------------------------------------------------------------------
# the cluster
# ---------------------------------------------------------------------------------------------------
class LoopbackError(RuntimeError):
    pass


class LoopbackCluster:
    """PostgreSQL, `mlflow server` on it, and a two-node Ray cluster, all on 127.0.0.1; a context manager.

    `root` (default: a new `/tmp/fdlb*` folder; short, for Ray's Unix socket paths) holds the database,
    the artifacts, Ray's temp dir, the token, Tune's storage and every log (`logs/`).
    """

    def __init__(self, root: Path | None = None, keep: bool = False, log: Callable[[str], None] = say) -> None:
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="fdlb", dir="/tmp"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self.log = log
        self.logs = self.root / "logs"
        self.logs.mkdir(exist_ok=True)
        self.storage = self.root / "ray_results"
        self.services: list[Service] = []
        self.node_ids: dict[str, str] = {}  # node name (head, worker) -> Ray node id
        self.ray_services: dict[str, Service] = {}
        self.heard: set[tuple[str, str]] = set()  # (service, ip:port) seen listening, sampled every second
        self.tracking_uri = self.ray_address = ""
        self.failed = False
        self._stop_watch = threading.Event()
        self._watcher: threading.Thread | None = None
        self.base_env = {k: v for k, v in os.environ.items()
                         if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "RAY_ADDRESS",
                                      "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "MLFLOW_TRACKING_URI", "PGPASSWORD")}
        self.base_env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
        self.base_env["RAY_USAGE_STATS_ENABLED"] = "0"

    # -- context manager ---------------------------------------------------------------------------
    def __enter__(self) -> LoopbackCluster:
        try:
            self.start()
        except BaseException:
            self.failed = True
            self.stop()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.failed = True
        left = self.stop()
        if left:
            raise LoopbackError(f"processes still running after the stop: {left}")

    # -- start ------------------------------------------------------------------------------------
    def start(self) -> None:
        self.log(f"working folder {self.root} (logs in {self.logs})")
        self._watcher = threading.Thread(target=self._watch, name="loopback-watch", daemon=True)
        self._watcher.start()
        self._start_postgres()
        mlflow = self._start_mlflow()  # its schema migrations run while Ray starts
        self._start_ray()
        self._wait_http(mlflow, f"{self.tracking_uri}/health", timeout=180)
        self.log(f"mlflow server ready at {self.tracking_uri}")

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str], stop_signal: int = signal.SIGTERM,
               **kw: Any) -> Service:
        log = self.logs / f"{name}.log"
        with open(log, "ab") as out:
            popen = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True, **kw)
        service = Service(name, popen, log, stop_signal)
        self.services.append(service)
        self.log(f"started {name}: pid {popen.pid}: {' '.join(cmd)}")
        return service

    def _watch(self) -> None:
        """Record every process of every service, once a second, until the stop."""
        while not self._stop_watch.wait(1.0):
            try:
                table = process_table()
                for service in list(self.services):
                    service.refresh(table)
                    self.heard |= {(service.name, a) for a in listening([p for p in list(service.procs) if alive(p)])}
            except (OSError, ValueError) as e:  # a process ending mid-read; the next round sees it
                self.log(f"(process watch: {e})")

    def _start_postgres(self) -> None:
        bindir = find_postgres()
        if bindir is None:
            raise LoopbackError(missing_requirements() or "PostgreSQL not found")
        pg = self.root / "pg"
        pg.mkdir()
        data = pg / "data"
        self.pg_password = secrets.token_hex(16)
        pwfile = pg / "pwfile"
        pwfile.write_text(self.pg_password + "\n")
        pwfile.chmod(0o600)
        as_user: dict[str, Any] = {}
        if os.geteuid() == 0:
            # PostgreSQL refuses to run as root: its programs run as the `postgres` user the Debian
            # package creates (or `nobody`), which may traverse, not list, this working folder
            user = next((u for u in (_user("postgres"), _user("nobody")) if u is not None), None)
            if user is None:
                raise LoopbackError("running as root and no `postgres` or `nobody` user to run PostgreSQL as")
            as_user = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
            self.root.chmod(0o711)
            for path in (pg, pwfile):
                os.chown(path, user.pw_uid, user.pw_gid)
            self.log(f"running PostgreSQL as user {user.pw_name!r} (it refuses root)")
        env = {"PATH": self.base_env.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C"}
        with open(self.logs / "initdb.log", "wb") as out:
            cmd = [str(bindir / "initdb"), "-D", str(data), "-U", "mlflow", "--pwfile", str(pwfile),
                   "--auth", "scram-sha-256", "-E", "UTF8", "--locale", "C", "--no-sync"]
            self.log(f"initdb: {' '.join(cmd)}")
            done = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=pg, timeout=180, check=False, **as_user)
        pwfile.unlink()
        if done.returncode != 0:
            raise LoopbackError(f"initdb failed ({done.returncode}):\n{log_tail(self.logs / 'initdb.log')}")
        (self.pg_port,) = free_ports(1)
        # a throwaway database: fsync off; TCP on 127.0.0.1 only, the Unix socket in our own folder
        service = self._spawn("postgres", [str(bindir / "postgres"), "-D", str(data), "-h", HOST, "-p", str(self.pg_port),
                                           "-k", str(pg), "-c", "fsync=off"],
                              env, stop_signal=signal.SIGINT, cwd=pg, **as_user)  # SIGINT: fast shutdown
        deadline = time.time() + 60
        while True:
            ready = subprocess.run([str(bindir / "pg_isready"), "-h", HOST, "-p", str(self.pg_port), "-t", "2"],
                                   env=env, capture_output=True, check=False)
            if ready.returncode == 0:
                break
            if not service.running() or time.time() > deadline:
                raise LoopbackError(f"PostgreSQL did not start:\n{log_tail(service.log)}")
            time.sleep(0.3)
        created = subprocess.run([str(bindir / "createdb"), "-h", HOST, "-p", str(self.pg_port), "-U", "mlflow", "mlflow"],
                                 env={**env, "PGPASSWORD": self.pg_password}, capture_output=True, text=True, timeout=60, check=False)
        if created.returncode != 0:
            raise LoopbackError(f"createdb failed: {created.stderr}")
        self.log(f"PostgreSQL {bindir.parent.name} ready at {HOST}:{self.pg_port}, database `mlflow`")

    def _start_mlflow(self) -> Service:
        (port,) = free_ports(1)
        self.tracking_uri = f"http://{HOST}:{port}"
        self.artifacts = self.root / "mlartifacts"
        # the database password travels in PGPASSWORD (libpq reads it), never in the URI; `+psycopg2`:
        # SQLAlchemy 2.1 takes a bare postgresql:// for psycopg 3
        cmd = [sys.executable, "-m", "mlflow", "server",
               "--backend-store-uri", f"postgresql+psycopg2://mlflow@{HOST}:{self.pg_port}/mlflow",
               "--artifacts-destination", str(self.artifacts), "--serve-artifacts",
               "--host", HOST, "--port", str(port), "--workers", "1"]
        return self._spawn("mlflow", cmd, {**self.base_env, "PGPASSWORD": self.pg_password}, cwd=self.root)

    def _start_ray(self) -> None:
        self.ray_temp = self.root / "ray"
        token = self.root / "ray_auth_token"
        token.write_text(secrets.token_hex(32))  # 256 bits, as `ray get-auth-token --generate` makes
        token.chmod(0o600)
        self.token_env = {**self.base_env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
        # the head and the sweep's driver: Ray keeps 127.0.0.1 as the node's and the GCS's address
        # (else it rewrites it to the machine's outward IP), and then binds its servers to 127.0.0.1
        self.client_env = {**self.token_env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        ray = Path(sys.executable).with_name("ray")
        ray_cmd = [str(ray)] if ray.exists() else [sys.executable, "-m", "ray.scripts.scripts"]
        common = ["--num-cpus", "1", "--num-gpus", "0", "--temp-dir", str(self.ray_temp), "--disable-usage-stats",
                  "--object-store-memory", str(256 * 2**20), "--min-worker-port", "0", "--max-worker-port", "0", "--block"]

        def node_ports() -> list[str]:
            names = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                     "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port")
            return [a for pair in zip(names, map(str, free_ports(len(names)))) for a in pair]

        gcs, dashboard = free_ports(2)
        head_args = ["start", "--head", "--node-ip-address", HOST, "--port", str(gcs), "--include-dashboard", "false",
                     "--dashboard-host", HOST, "--dashboard-port", str(dashboard), *common, *node_ports()]
        if _ray_client_installed():  # else `ray start` refuses the flag; with Ray Client it would take 10001
            head_args += ["--ray-client-server-port", str(free_ports(1)[0])]
        head = self._spawn("ray-head", [*ray_cmd, *head_args], self.client_env, cwd=self.root)
        self.ray_services["head"] = head
        self.node_ids["head"] = self._wait_ray_node(head)
        self.ray_address = f"{HOST}:{gcs}"
        # the second node: `ray start` refuses to start a worker node with the switch above, so it runs
        # without it, with Ray's rewrite of its --address turned off; its own address is the one it
        # reaches the head from, 127.0.0.1
        worker = self._spawn("ray-worker", [sys.executable, "-c", RAY_START_ON_LOOPBACK, "start", "--address", self.ray_address,
                                            *common, *node_ports()], self.token_env, cwd=self.root)
        self.ray_services["worker"] = worker
        self.node_ids["worker"] = self._wait_ray_node(worker)
        self.log(f"Ray cluster at {self.ray_address}: head node {self.node_ids['head']}, "
                 f"second node {self.node_ids['worker']}, 1 CPU each, token auth on")

    def _wait_ray_node(self, service: Service, timeout: float = 120) -> str:
        """The node id, once `ray start` reports the node up (its raylet's `--node_id`)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not service.running():
                raise LoopbackError(f"{service.name} exited ({service.popen.returncode}):\n{log_tail(service.log)}")
            if "Ray runtime started" in service.log.read_text(errors="replace"):
                service.refresh()
                for p in list(service.procs):
                    argv = p.cmdline()
                    if argv and Path(argv[0]).name == "raylet":
                        ip = next((a.split("=", 1)[1] for a in argv if a.startswith("--node_ip_address=")), "")
                        if ip != HOST:
                            raise LoopbackError(f"{service.name}: the raylet advertises {ip}, not {HOST}")
                        return next(a.split("=", 1)[1] for a in argv if a.startswith("--node_id="))
            time.sleep(0.5)
        raise LoopbackError(f"{service.name} not up after {timeout:.0f} s:\n{log_tail(service.log)}")

    def _wait_http(self, service: Service, url: str, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not service.running():
                raise LoopbackError(f"{service.name} exited ({service.popen.returncode}):\n{log_tail(service.log)}")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.5)
        raise LoopbackError(f"{url} not answering after {timeout:.0f} s:\n{log_tail(service.log)}")

    # -- token auth ---------------------------------------------------------------------------------
    def start_wrong_token_client(self) -> Service:
        """A driver holding a wrong token, which the cluster must refuse (Ray retries for about 20 s first)."""
        wrong = self.root / "wrong_auth_token"
        wrong.write_text(secrets.token_hex(32))
        wrong.chmod(0o600)
        code = f"import ray; ray.init(address={self.ray_address!r}); print('CONNECTED', flush=True)"
        return self._spawn("client-wrong-token", [sys.executable, "-c", code],
                           {**self.client_env, "RAY_AUTH_TOKEN_PATH": str(wrong)}, cwd=self.root)

    @staticmethod
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

    # -- the sweep ----------------------------------------------------------------------------------
    def run_sweep(self, name: str, cache_root: Path | None = None, timeout: float = 900, echo: bool = False) -> int:
        """The smoke ablation, as a user runs it against this cluster; its output goes to logs/sweep-NAME.log.

        `cache_root`: the prepared-data cache (default: the sweep's own default, `$FAKEDET_CACHE` or
        ~/.cache/fakedet). Tune's storage is `root/ray_results`, which both nodes share, being one host.
        """
        cmd = [sys.executable, str(REPO / "sweeps" / "run.py"), "ablation", "--smoke", "--name", name,
               "--address", self.ray_address, "--tracking-uri", self.tracking_uri, "--storage-path", str(self.storage),
               *(["--cache-root", str(cache_root)] if cache_root else [])]
        service = self._spawn(f"sweep-{name}", cmd, self.client_env, cwd=self.root)
        started = time.time()
        try:
            if echo:
                follower = threading.Thread(target=_follow, args=(service, lambda line: print(f"  | {line}", flush=True)),
                                            daemon=True)
                follower.start()
            rc = service.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.log(f"sweep {name} still running after {timeout:.0f} s: stopping it")
            service.stop()
            rc = 124
        if echo:
            follower.join(5)
        self.log(f"sweep {name} ended with {rc} after {time.time() - started:.0f} s (log: {service.log})")
        return rc

    # -- stop -----------------------------------------------------------------------------------------
    def stop(self) -> list[tuple[str, Proc]]:
        """Stop every service, newest first, by pid; returns the processes still alive (none, normally)."""
        self._stop_watch.set()
        if self._watcher is not None:
            self._watcher.join(5)
        left = []
        for service in reversed(self.services):
            procs = service.stop()
            left += [(service.name, p) for p in procs]
            self.log(f"stopped {service.name}: {len(service.procs)} process(es) "
                     f"({', '.join(str(p.pid) for p in sorted(service.procs, key=lambda p: p.pid))})"
                     + (f"; STILL RUNNING: {[p.pid for p in procs]}" if procs else ", none left"))
        if not self.keep and not self.failed and not left:
            shutil.rmtree(self.root, ignore_errors=True)
        else:
            self.log(f"kept {self.root} (logs in {self.logs})")
        return left

    def node_pids(self) -> dict[str, set[int]]:
        """{node name: every process id seen in its `ray start` session}."""
        return {node: {p.pid for p in list(service.procs)} for node, service in self.ray_services.items()}

    def all_procs(self) -> set[Proc]:
        return {p for s in list(self.services) for p in list(s.procs)}


def _user(name: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


def _ray_client_installed() -> bool:
    try:
        from ray._private.utils import get_ray_client_dependency_error
    except ImportError:
        return False
    return get_ray_client_dependency_error() is None


def _follow(service: Service, emit: Callable[[str], None]) -> None:
    """Print a service's log as it grows, until it ends."""
    with open(service.log, errors="replace") as f:
        while True:
            line = f.readline()
            if line:
                emit(line.rstrip("\n"))
            elif not service.running():
                for rest in f.read().splitlines():
                    emit(rest)
                return
            else:
                time.sleep(0.2)


# ---------------------------------------------------------------------------------------------------
# the checks, through MLflow's REST API
# ---------------------------------------------------------------------------------------------------
class Rest:
    """The few MLflow REST calls the checks use; nothing from MLflow's client library."""

    def __init__(self, base: str) -> None:
        self.base = base.rstrip("/")

    def _open(self, endpoint: str, params: dict | None = None, body: dict | None = None) -> bytes:
        url = f"{self.base}{endpoint}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
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


def check_sweep(tracking_uri: str, name: str, storage: Path, node_ids: dict[str, str], node_pids: dict[str, set[int]],
                report: Report | None = None, log: Callable[[str], None] = say) -> Report:
    """Did the sweep `name` run on every node, and did all it reported reach the server?

    `node_ids` and `node_pids`: each node's (by name) id, and the process ids seen in its `ray start` session.

    The reference is what the trials reported (Ray Tune's result.json files) and the artifact files of
    their checkpoints (Tune's storage, shared by both nodes here); the server is read through its REST
    API only.
    """
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    # which reported values the sweep logs as MLflow metrics
    from fakedet.sweep.tracking import is_logged_metric

    rest = Rest(tracking_uri)
    report = report if report is not None else Report(log=log)
    log(f"checking sweep {name!r} through {tracking_uri}")
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
        folders = sorted((storage / name).glob(f"*{tags.get('fakedet.trial', '?')}*/checkpoint_*/cell_artifacts/{epochs:g}"))
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
    for what, ok in (("correlations across cells (Pearson, Spearman, Kendall)",
                      all(any(k.startswith("corr/cells/") and m in k for k in pm) for m in ("pearson", "spearman", "kendall"))),
                     ("correlations across points", "corr/points/n" in pm),
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


# ---------------------------------------------------------------------------------------------------
# the script
# ---------------------------------------------------------------------------------------------------
def loopback_check(cluster: LoopbackCluster, name: str, cache_root: Path | None = None, echo: bool = False,
                   sweep_timeout: float = 900) -> Report:
    """On a started cluster: the smoke ablation, its records on the server, and a wrong-token driver refused."""
    report = Report(log=cluster.log)
    probe = cluster.start_wrong_token_client()  # turned away while the sweep runs
    rc = cluster.run_sweep(name, cache_root, timeout=sweep_timeout, echo=echo)
    sweep_log = cluster.logs / f"sweep-{name}.log"
    if report.check(rc == 0, "the smoke ablation exited 0", f"exit {rc}; its log ends:\n{log_tail(sweep_log, 60)}"):
        try:
            check_sweep(cluster.tracking_uri, name, cluster.storage, cluster.node_ids, cluster.node_pids(), report,
                        log=cluster.log)
        except urllib.error.HTTPError as e:
            report.check(False, "the MLflow REST API answers", f"{e.url}: {e.code} {e.read()[:500]!r}")
        except OSError as e:
            report.check(False, "the MLflow REST API answers", str(e))
    refused, why = cluster.refused(probe)
    report.check(refused, "a driver with a wrong Ray token is refused", why)
    heard = sorted(set(cluster.heard))  # a copy: the watcher may still add
    outside = [(svc, a) for svc, a in heard if not a.startswith(f"{HOST}:")]
    report.check(bool(heard) and not outside, f"{len(heard)} listening sockets seen, all on {HOST} "
                 f"({', '.join(sorted({n for n, _ in heard}))})", f"not on {HOST}: {outside}")
    cluster.failed = cluster.failed or bool(report.failures)
    return report


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
