"""The loopback cluster: PostgreSQL, `mlflow server` with basic auth, a Ray head and a second Ray node, on 127.0.0.1.

`LoopbackCluster` starts them as the cloud recipes do, with throwaway credentials made per run:
- PostgreSQL: Debian's server programs, a fresh `initdb` (password auth, scram-sha-256), the tracking
  database and, from cluster/mlflow/initdb/10-mlflow-auth-db.sql, the users' database. As root its
  programs run as the `postgres` user (PostgreSQL refuses root) through `Popen(user=...)`, so the pid
  we hold is the postmaster's.
- MLflow: `mlflow server --app-name basic-auth` with cluster/mlflow/basic_auth.ini (its store pointed
  at this PostgreSQL), proxied artifacts, the admin password and Flask key in the environment, the
  database password in PGPASSWORD; then cluster/mlflow/create_user.py makes the sweeps' non-admin user,
  whose name and password the sweep gets in MLFLOW_TRACKING_USERNAME/PASSWORD.
- Ray 2.60 on one host:
  - `ray start` and `ray.init` rewrite 127.0.0.1 (in `--node-ip-address`, `--address`) to the machine's
    outward IP, unless `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, Ray's switch for single-machine
    clusters: the head and the sweep's driver run with it. With 127.0.0.1 as its address, the head
    binds GCS, raylet and agents to 127.0.0.1 only.
  - The second node starts through tools/loopback/ray_on_loopback.py (ray-project/ray#59110), which fails
    loudly if its patch of Ray's private code no longer applies.
  - Every port is picked free and passed explicitly, and workers take theirs from the OS
    (`--min-worker-port 0 --max-worker-port 0`): the two nodes, and any other Ray on the machine, never
    collide (defaults such as the dashboard agent's 52365 or Ray Client's 10001 would).
  - Token auth: `RAY_AUTH_MODE=token` and `RAY_AUTH_TOKEN_PATH`, a mode-600 file holding a fresh
    256-bit token, for both nodes and the driver; `RAY_AUTH_TOKEN`, which would take precedence, is
    removed from their environment, and `~/.ray/auth_token` is neither read nor written.
Processes are started, watched and stopped by tools/loopback/supervise.py.
"""

from __future__ import annotations

import base64
import configparser
import importlib.util
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
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from supervise import Proc, Service, Supervisor, follow, log_tail

from fakedet.console import tagged

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"  # the deployment this rehearses: its MLflow configuration and scripts
HERE = Path(__file__).resolve().parent
HOST = "127.0.0.1"
PG_PROGRAMS = ("postgres", "initdb", "pg_isready", "createdb", "psql")
MLFLOW_USER = "fakedet"  # the sweeps' non-admin MLflow user, as in the cloud recipes
# the environment a started process must not inherit from whoever runs this: it would override ours
SCRUBBED = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
            "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
            "MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD",
            "MLFLOW_FLASK_SERVER_SECRET_KEY", "PGPASSWORD")


say = tagged("loopback")


class LoopbackError(RuntimeError):
    pass


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
        if all((folder / name).exists() for name in PG_PROGRAMS):
            return folder
    return None


def missing_requirements() -> str | None:
    """Why this machine cannot run the loopback cluster, or None."""
    if not sys.platform.startswith("linux"):
        return "Linux only (process sessions, Debian's PostgreSQL layout)"
    if find_postgres() is None:
        return (f"PostgreSQL server programs not found ({', '.join(PG_PROGRAMS)} on PATH or in "
                "/usr/lib/postgresql/*/bin); on Debian: apt-get install postgresql")
    for module, why in (("psycopg2", "mlflow server needs it for a postgresql:// store: pip install psycopg2-binary"),
                        ("flask_wtf", "MLflow's basic-auth app needs it: pip install 'mlflow[auth]'")):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed ({why})"
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


def basic_auth_header(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def _secret_file(path: Path, value: str) -> Path:
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(value)
    return path


def _user(name: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


def _raise_on_sigterm(signum: int, frame: Any) -> None:
    raise LoopbackError("stopped by SIGTERM")


def _ray_client_installed() -> bool:
    try:
        from ray._private.utils import get_ray_client_dependency_error
    except ImportError:
        return False
    return get_ray_client_dependency_error() is None


# ---------------------------------------------------------------------------------------------------
# the cluster
# ---------------------------------------------------------------------------------------------------
class LoopbackCluster:
    """PostgreSQL, `mlflow server` (basic auth) on it, and a two-node Ray cluster, all on 127.0.0.1; a context manager.

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
        self.supervisor = Supervisor(self.logs, log)
        self.node_ids: dict[str, str] = {}  # node name (head, worker) -> Ray node id
        self.ray_services: dict[str, Service] = {}
        self.tracking_uri = self.ray_address = ""
        # the sweeps' MLflow credentials, made per run (MLflow 3.17 wants passwords of 12 characters or more)
        self.mlflow_user = MLFLOW_USER
        self.mlflow_password = secrets.token_hex(16)
        self.failed = False
        self._sigterm: Any = None  # the SIGTERM handler to put back after the stop
        self.base_env = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
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
        if threading.current_thread() is threading.main_thread():
            # SIGTERM (a CI timeout, `kill`) ends Python without unwinding, which would leave every server
            # running in its own session: turn it into an exception, so the stop by pid still happens
            self._sigterm = signal.signal(signal.SIGTERM, _raise_on_sigterm)
        self.supervisor.watch()
        self._start_postgres()
        mlflow = self._start_mlflow()  # its schema migrations run while Ray starts
        self._start_ray()
        self._wait_http(mlflow, f"{self.tracking_uri}/health", timeout=180)
        self._create_mlflow_user()
        self.log(f"mlflow server ready at {self.tracking_uri} (basic auth; sweeps log as {self.mlflow_user!r})")

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str], stop_signal: int = signal.SIGTERM,
               **kw: Any) -> Service:
        return self.supervisor.spawn(name, cmd, env, stop_signal, **kw)

    def _start_postgres(self) -> None:
        bindir = find_postgres()
        if bindir is None:
            raise LoopbackError(missing_requirements() or "PostgreSQL not found")
        pg = self.root / "pg"
        pg.mkdir()
        data = pg / "data"
        self.pg_password = secrets.token_hex(16)
        pwfile = _secret_file(pg / "pwfile", self.pg_password + "\n")
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
        client = ["-h", HOST, "-p", str(self.pg_port), "-U", "mlflow"]
        client_env = {**env, "PGPASSWORD": self.pg_password}
        # the tracking database, then the users' database the way the postgres image's initdb.d creates it
        for cmd in ([str(bindir / "createdb"), *client, "mlflow"],
                    [str(bindir / "psql"), *client, "-d", "mlflow", "-v", "ON_ERROR_STOP=1", "-q",
                     "-f", str(CLUSTER / "mlflow" / "initdb" / "10-mlflow-auth-db.sql")]):
            created = subprocess.run(cmd, env=client_env, capture_output=True, text=True, timeout=60, check=False)
            if created.returncode != 0:
                raise LoopbackError(f"{Path(cmd[0]).name} failed: {created.stderr}")
        self.log(f"PostgreSQL {bindir.parent.name} ready at {HOST}:{self.pg_port}, databases `mlflow` and `mlflow_auth`")

    def _start_mlflow(self) -> Service:
        (port,) = free_ports(1)
        self.tracking_uri = f"http://{HOST}:{port}"
        self.artifacts = self.root / "mlartifacts"
        # The shipped basic_auth.ini with its store pointed here; `+psycopg2`: SQLAlchemy 2.1 takes a bare
        # postgresql:// for psycopg 3. The database password travels in PGPASSWORD (libpq reads it), never in a URI.
        store = f"postgresql+psycopg2://mlflow@{HOST}:{self.pg_port}"
        ini = configparser.ConfigParser()
        ini.read(CLUSTER / "mlflow" / "basic_auth.ini")
        ini["mlflow"]["database_uri"] = f"{store}/mlflow_auth"
        auth_config = self.root / "basic_auth.ini"
        with open(auth_config, "w") as f:
            ini.write(f)
        self.admin_password = secrets.token_hex(16)
        env = {**self.base_env, "PGPASSWORD": self.pg_password, "MLFLOW_AUTH_CONFIG_PATH": str(auth_config),
               "MLFLOW_AUTH_ADMIN_PASSWORD": self.admin_password, "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32)}
        cmd = [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
               "--backend-store-uri", f"{store}/mlflow",
               "--artifacts-destination", str(self.artifacts), "--serve-artifacts",
               "--host", HOST, "--port", str(port), "--workers", "1"]
        return self._spawn("mlflow", cmd, env, cwd=self.root)

    def _create_mlflow_user(self) -> None:
        """The sweeps' non-admin user, made by the script the cloud recipes run (cluster/mlflow/create_user.py)."""
        env = {**self.base_env, "MLFLOW_URI": self.tracking_uri, "MLFLOW_AUTH_ADMIN_PASSWORD": self.admin_password,
               "FAKEDET_MLFLOW_USERNAME": self.mlflow_user, "FAKEDET_MLFLOW_PASSWORD": self.mlflow_password}
        service = self._spawn("mlflow-create-user", [sys.executable, str(CLUSTER / "mlflow" / "create_user.py")], env,
                              cwd=self.root)
        try:
            rc = service.popen.wait(180)
        except subprocess.TimeoutExpired:
            rc = None
        if rc != 0:
            raise LoopbackError(f"create_user.py: exit {rc}:\n{log_tail(service.log)}")

    @property
    def tracking_env(self) -> dict[str, str]:
        """How a client signs in as the sweeps' user: MLflow's client reads these from the environment."""
        return {"MLFLOW_TRACKING_USERNAME": self.mlflow_user, "MLFLOW_TRACKING_PASSWORD": self.mlflow_password}

    def _start_ray(self) -> None:
        self.ray_temp = self.root / "ray"
        token = _secret_file(self.root / "ray_auth_token", secrets.token_hex(32))  # 256 bits, as `ray get-auth-token --generate`
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
        # the second node: `ray start` refuses a worker node under the switch above, so it runs without
        # it, through tools/loopback/ray_on_loopback.py (ray-project/ray#59110)
        worker = self._spawn("ray-worker", [sys.executable, str(HERE / "ray_on_loopback.py"), "start",
                                            "--address", self.ray_address, *common, *node_ports()],
                             self.token_env, cwd=self.root)
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
        wrong = _secret_file(self.root / "wrong_auth_token", secrets.token_hex(32))
        code = f"import ray; ray.init(address={self.ray_address!r}); print('CONNECTED', flush=True)"
        return self._spawn("client-wrong-token", [sys.executable, "-c", code],
                           {**self.client_env, "RAY_AUTH_TOKEN_PATH": str(wrong)}, cwd=self.root)

    # -- the sweep ----------------------------------------------------------------------------------
    def run_sweep(self, name: str, cache_root: Path | None = None, timeout: float = 900, echo: bool = False) -> int:
        """The smoke ablation, as a user runs it against this cluster; its output goes to logs/sweep-NAME.log.

        `cache_root`: the prepared-data cache (default: the sweep's own default, `$FAKEDET_CACHE` or
        ~/.cache/fakedet). Tune's storage is `root/ray_results`, which both nodes share, being one host.
        The driver signs in to MLflow as the sweeps' user, through the environment as on the cluster.
        """
        cmd = [sys.executable, str(REPO / "sweeps" / "run.py"), "ablation", "--smoke", "--name", name,
               "--address", self.ray_address, "--tracking-uri", self.tracking_uri, "--storage-path", str(self.storage),
               *(["--cache-root", str(cache_root)] if cache_root else [])]
        service = self._spawn(f"sweep-{name}", cmd, {**self.client_env, **self.tracking_env}, cwd=self.root)
        started = time.time()
        follower = None
        if echo:
            follower = threading.Thread(target=follow, args=(service, lambda line: print(f"  | {line}", flush=True)),
                                        daemon=True)
            follower.start()
        try:
            rc = service.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.log(f"sweep {name} still running after {timeout:.0f} s: stopping it")
            service.stop()
            rc = 124
        if follower is not None:
            follower.join(5)
        self.log(f"sweep {name} ended with {rc} after {time.time() - started:.0f} s (log: {service.log})")
        return rc

    # -- stop -----------------------------------------------------------------------------------------
    def stop(self) -> list[tuple[str, Proc]]:
        """Stop every service, newest first, by pid; returns the processes still alive (none, normally)."""
        left = self.supervisor.stop()
        if self._sigterm is not None:
            signal.signal(signal.SIGTERM, self._sigterm)
            self._sigterm = None
        if not self.keep and not self.failed and not left:
            shutil.rmtree(self.root, ignore_errors=True)
        else:
            self.log(f"kept {self.root} (logs in {self.logs})")
        return left

    @property
    def services(self) -> list[Service]:
        return self.supervisor.services

    @property
    def heard(self) -> set[tuple[str, str]]:
        """(service, ip:port) of every listening socket seen, sampled every second."""
        return self.supervisor.heard

    def node_pids(self) -> dict[str, set[int]]:
        """{node name: every process id seen in its `ray start` session}."""
        return {node: {p.pid for p in list(service.procs)} for node, service in self.ray_services.items()}

    def all_procs(self) -> set[Proc]:
        return self.supervisor.all_procs()
