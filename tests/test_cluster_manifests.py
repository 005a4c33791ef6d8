"""The cluster deployment in cluster/: what `ray up`, KubeRay and MLflow will be given.

Every YAML parses; the `ray up` configs pass Ray's own schema (the check `ray up` runs first); each
manifest carries the fields it needs (GPU workers, token auth, the README's pinned install, a
PostgreSQL-backed MLflow with basic auth and proxied artifacts); no manifest holds a literal secret or
opens the dashboard, Ray Client or MLflow ports to the outside; and every `python sweeps/run.py ...`
in a manifest or in cluster/README.md parses with the real command line. No cloud, no network, a
few seconds. The checkers also run against known-bad snippets, so a check that cannot fail shows up.
"""

from __future__ import annotations

import configparser
import copy
import functools
import re
import shlex
import subprocess
import textwrap
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
CLUSTER_README = CLUSTER / "README.md"
LAUNCHERS = {"aws": CLUSTER / "aws" / "ray-cluster.yaml", "gcp": CLUSTER / "gcp" / "ray-cluster.yaml"}
KUBERAY = CLUSTER / "kuberay"
COMPOSE = CLUSTER / "mlflow" / "docker-compose.yml"
SHARED = "/mnt/fakedet"  # the shared storage's mount point, the same on every node and pod
PUBLIC_SERVICE_TYPES = {"LoadBalancer", "NodePort"}
PRIVATE_PORTS = {6379, 8265, 10001, 5000, 5432}  # GCS, dashboard, Ray Client, MLflow, PostgreSQL


# ---------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------
def yaml_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))


@functools.lru_cache(maxsize=None)
def load(path: Path) -> tuple:
    with open(path) as f:
        return tuple(d for d in yaml.safe_load_all(f) if d is not None)


def k8s_docs() -> list[dict]:
    return [d for p in sorted(KUBERAY.glob("*.yaml")) for d in load(p)]


def k8s(kind: str, name: str | None = None) -> list[dict]:
    return [d for d in k8s_docs() if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)]


def one(kind: str, name: str | None = None) -> dict:
    found = k8s(kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''} in cluster/kuberay, found {len(found)}"
    return found[0]


@functools.lru_cache(maxsize=1)
def readme_install() -> tuple[str, str]:
    """The top-level README's install: (torch pins, the whole command without the sweep)."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"pip install (torch==\S+ torchvision==\S+) && pip install -e '\.\[dev\]'", text)
    assert m, "README.md no longer shows `pip install torch==... torchvision==... && pip install -e '.[dev]'`"
    return m.group(1), m.group(0)


@functools.lru_cache(maxsize=1)
def pinned_ray() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [re.fullmatch(r"ray\[[^\]]*\]==(\S+)", d) for d in deps]
    pins = [m.group(1) for m in pins if m]
    assert len(pins) == 1, f"pyproject.toml should pin ray exactly once, found {pins}"
    return pins[0]


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


# ---------------------------------------------------------------------------------------------------
# checkers (also run against bad samples below)
# ---------------------------------------------------------------------------------------------------
SECRET_NAME = re.compile(r"(password|passwd|secret|token|credentials?|[_-]key)$", re.I)  # not `key` alone: secretKeyRef's
REFERENCE = ("${", "$(", "REPLACE_WITH_", "/", "~", "./")  # env placeholders, fill-in markers, file paths
URL_WITH_PASSWORD = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s/:@]+:[^\s/@]+@", re.I)


def literal_secrets(doc, where: str = "") -> list[str]:
    """Places in a parsed YAML document that hold a secret's value rather than a reference to one."""
    found = []
    if isinstance(doc, dict):
        if doc.get("kind") == "Secret" and (doc.get("data") or doc.get("stringData")):
            found.append(f"{where}: a Secret with values (create it with kubectl instead)")
        # Kubernetes env entries: {name: DB_PASSWORD, value: "..."} must use valueFrom.
        if isinstance(doc.get("name"), str) and SECRET_NAME.search(doc["name"]) and doc.get("value") not in (None, ""):
            if not str(doc["value"]).startswith(REFERENCE):
                found.append(f"{where}: env {doc['name']} has a literal value")
        for key, value in doc.items():
            if isinstance(value, (str, int, float)) and not isinstance(value, bool) and SECRET_NAME.search(str(key)):
                if str(value) and not str(value).startswith(REFERENCE):
                    found.append(f"{where}.{key}: literal value")
            found += literal_secrets(value, f"{where}.{key}")
    elif isinstance(doc, list):
        for i, item in enumerate(doc):
            found += literal_secrets(item, f"{where}[{i}]")
    elif isinstance(doc, str):
        if URL_WITH_PASSWORD.search(doc):
            found.append(f"{where}: a URL with a password")
        for m in re.finditer(r"\b([A-Za-z0-9_]*(?:PASSWORD|SECRET|TOKEN|_KEY))=(\S+)", doc, re.I):
            if not m.group(2).strip("'\"").startswith(REFERENCE):
                found.append(f"{where}: {m.group(1)}=<literal>")
    return found


SECRET_ASSIGNMENT = re.compile(r"\b([A-Za-z0-9_.-]*(?:password|passwd|secret|token|key))\s*=\s*(\S+)", re.I)


def literal_secrets_in_text(text: str) -> list[str]:
    """`NAME=value` / `name = value` (shell, .env, ini) whose value is not a reference, and URLs with a
    password, in scripts and docs. (`name: value` is YAML's, checked on the parsed documents.)"""
    found = []
    for line in text.splitlines():
        if URL_WITH_PASSWORD.search(line):
            found.append(line.strip())
        for m in SECRET_ASSIGNMENT.finditer(line):
            value = m.group(2).strip("'\"`,")
            if value and not value.startswith(REFERENCE + ("$", "{", "<", "os.environ")):
                found.append(line.strip())
    return found


def public_exposures(doc: dict) -> list[str]:
    """Kubernetes objects that would reach outside the cluster."""
    kind = doc.get("kind")
    spec = doc.get("spec") or {}
    bad = []
    if kind == "Service" and spec.get("type") in PUBLIC_SERVICE_TYPES:
        bad.append(f"Service {doc['metadata']['name']} is {spec['type']}")
    if kind in ("Ingress", "Route", "Gateway", "HTTPRoute"):
        bad.append(f"{kind} {doc['metadata']['name']}")
    cluster_spec = spec if kind == "RayCluster" else spec.get("rayClusterSpec") if kind == "RayJob" else None
    if cluster_spec:
        head = cluster_spec["headGroupSpec"]
        if head.get("serviceType") in PUBLIC_SERVICE_TYPES:
            bad.append(f"{kind} {doc['metadata']['name']}: head serviceType {head['serviceType']}")
        if (head.get("headService") or {}).get("spec", {}).get("type") in PUBLIC_SERVICE_TYPES:
            bad.append(f"{kind} {doc['metadata']['name']}: headService is public")
        if head.get("enableIngress"):
            bad.append(f"{kind} {doc['metadata']['name']}: enableIngress")
    return bad


def open_security_group_rules(provider: dict) -> list[str]:
    bad = []
    for rule in (provider.get("security_group") or {}).get("IpPermissions", []):
        world = [r for r in rule.get("IpRanges", []) if r.get("CidrIp") == "0.0.0.0/0"]
        world += [r for r in rule.get("Ipv6Ranges", []) if r.get("CidrIpv6") == "::/0"]
        lo, hi = rule.get("FromPort", -1), rule.get("ToPort", -1)
        if world and (lo == -1 or any(lo <= p <= hi for p in PRIVATE_PORTS)):
            bad.append(f"ports {lo}-{hi} open to the internet")
    return bad


PLACEHOLDERS = {"MLFLOW_TRACKING_URI": "http://mlflow.example.internal:5000"}


def substitute_env(text: str) -> str:
    """$VAR, ${VAR} and ${VAR:-default} → a dummy value the parser accepts."""
    def value(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        return PLACEHOLDERS.get(name, f"dummy-{name.lower()}")

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-=?+][^}]*)?\}|\$([A-Za-z_][A-Za-z0-9_]*)", value, text)


def shell_tokens(text: str) -> list[str]:
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


CONTROL = {"&&", "||", ";", "|", "&", ";;", ")", "(", "\n"}


def sweep_commands(text: str) -> list[list[str]]:
    """Every `python sweeps/run.py ...` in a shell text, as the argv after `sweeps/run.py`, looking
    inside quoted arguments too (`bash -c '...'`, `ray exec CONFIG '...'`)."""
    if "sweeps/run.py" not in text:
        return []
    found = []
    for line in substitute_env(text.replace("\\\n", " ")).splitlines():
        if "sweeps/run.py" in line:
            found += _sweep_commands_in_line(line)
    return found


def _sweep_commands_in_line(line: str) -> list[list[str]]:
    found = []
    tokens = shell_tokens(line)
    for i, tok in enumerate(tokens):
        if re.fullmatch(r"python3?", tok) and i + 1 < len(tokens) and tokens[i + 1].endswith("sweeps/run.py"):
            argv = []
            for t in tokens[i + 2:]:
                if t in CONTROL:
                    break
                argv.append(t)
            found.append(argv)
        elif "sweeps/run.py" in tok and " " in tok:
            found += sweep_commands(tok)
    return found


def unquoted_shell_syntax(entrypoint: str) -> list[str]:
    """Shell operators and expansions a RayJob entrypoint leaves unquoted: KubeRay pastes the entrypoint
    into the submitter pod's shell line, so those would run there, not on the head."""
    bad = [t for t in shell_tokens(entrypoint) if t in CONTROL]
    unquoted = re.sub(r"'[^']*'", "", entrypoint)
    if "$" in unquoted or "`" in unquoted:
        bad.append("$ or ` outside single quotes")
    return bad


@functools.lru_cache(maxsize=1)
def sweep_parser():
    from fakedet.sweep_cli import build_parser

    return build_parser()


def parse_sweep(argv: list[str]):
    try:
        return sweep_parser().parse_args(argv)
    except SystemExit as e:  # argparse's way of saying no
        raise AssertionError(f"`python sweeps/run.py {shlex.join(argv)}` does not parse") from e


# ---------------------------------------------------------------------------------------------------
# every file
# ---------------------------------------------------------------------------------------------------
def test_the_expected_files_exist():
    expected = [
        "README.md", "Dockerfile", "Dockerfile.dockerignore", "aws/ray-cluster.yaml", "gcp/ray-cluster.yaml",
        "kuberay/raycluster.yaml", "kuberay/rayjob-ablation.yaml", "kuberay/storage.yaml", "kuberay/mlflow.yaml",
        "mlflow/Dockerfile", "mlflow/basic_auth.ini", "mlflow/docker-compose.yml", "mlflow/up.sh", "mlflow/create_user.py",
    ]
    missing = [f for f in expected if not (CLUSTER / f).is_file()]
    assert not missing


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(CLUSTER)))
def test_every_yaml_parses_into_mappings(path):
    docs = load(path)
    assert docs, f"{path} is empty"
    assert all(isinstance(d, dict) for d in docs)


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(CLUSTER)))
def test_no_literal_secret_in_any_manifest(path):
    found = [f for i, d in enumerate(load(path)) for f in literal_secrets(d, f"doc{i}")]
    assert not found, f"{path.relative_to(ROOT)}: {found}"


def test_no_literal_secret_in_scripts_and_docs():
    # loopback.py is the local test harness: its credentials are generated per run (secrets.token_hex), and
    # its Python (`key=lambda ...`, `token = None`) is not the shell/config text this scan is made for
    texts = [p for p in CLUSTER.rglob("*") if p.is_file() and p.suffix not in (".yaml", ".yml") and p.name != "loopback.py"]
    found = {str(p.relative_to(ROOT)): literal_secrets_in_text(p.read_text()) for p in texts}
    assert not {k: v for k, v in found.items() if v}


def test_token_auth_is_never_switched_off():
    for p in CLUSTER.rglob("*"):
        if p.is_file():
            text = p.read_text()
            assert not re.search(r"RAY_AUTH_MODE\s*[=:]\s*['\"]?disabled", text), p
            assert not re.search(r"^\s*mode:\s*['\"]?disabled", text, re.M), p


def test_every_fill_in_value_is_documented():
    readme = CLUSTER_README.read_text()
    markers = {m for p in CLUSTER.rglob("*") if p.is_file() for m in re.findall(r"REPLACE_WITH_[A-Z0-9_]+", p.read_text())}
    assert markers, "expected the configs' fill-in values to be marked REPLACE_WITH_..."
    assert not {m for m in markers if m not in readme}


# ---------------------------------------------------------------------------------------------------
# ray up (AWS, GCP)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_launcher_passes_rays_own_schema(cloud):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(load(LAUNCHERS[cloud])[0]))  # what `ray up` does first
    validate_config(config)


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_launcher_has_a_head_and_gpu_workers(cloud):
    cfg = load(LAUNCHERS[cloud])[0]
    assert cfg["cluster_name"] == "fakedet"  # cluster/mlflow/up.sh's path in the README depends on it
    assert cfg["provider"]["type"] == cloud and cfg["provider"]["region"]
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "trials stay off the head, which runs the driver"
    gpu = [t for name, t in types.items() if name != cfg["head_node_type"] and t["resources"].get("GPU", 0) >= 1]
    assert gpu, "no worker type offers a GPU"
    # fakedet asks for GPUs only if the cluster has one when the sweep starts (runner._resources).
    assert all(t.get("min_workers", 0) >= 1 for t in gpu)
    assert all(t.get("max_workers", 0) >= t["min_workers"] for t in gpu)
    if cloud == "gcp":
        for t in gpu:
            assert t["node_config"]["guestAccelerators"][0]["acceleratorCount"] >= 1
            scheduling = t["node_config"]["scheduling"]
            assert isinstance(scheduling, dict), "the Compute API's scheduling is a mapping (ray-project/ray#46248)"
            assert scheduling["onHostMaintenance"] == "TERMINATE", "GPU VMs cannot live-migrate"


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_launcher_installs_the_project_as_the_readme_does(cloud):
    cfg = load(LAUNCHERS[cloud])[0]
    _, install = readme_install()
    commands = cfg.get("setup_commands", []) + cfg.get("head_setup_commands", []) + cfg.get("worker_setup_commands", [])
    assert any(install in c for c in commands), f"setup_commands should run the README's `{install}`"
    assert cfg["docker"]["image"] == f"rayproject/ray:{pinned_ray()}-py311-gpu"
    assert cfg["file_mounts"].get("/opt/fakedet-src") == ".", "the checkout is synced from the repository root"


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_launcher_uses_token_auth_everywhere(cloud):
    cfg = load(LAUNCHERS[cloud])[0]
    assert "--env RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
    # Ray's default token path on every node (docs: ray-security/token-auth, "Ray clusters on remote VMs").
    # (~/.ray/auth_token of the image's `ray` user), copied from yours.
    assert cfg["file_mounts"].get("/home/ray/.ray/auth_token") == "~/.ray/auth_token"
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in starts)


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_launcher_keeps_ray_ports_private(cloud):
    cfg = load(LAUNCHERS[cloud])[0]
    assert not open_security_group_rules(cfg["provider"])
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=0.0.0.0" not in head_start and "--dashboard-host=127.0.0.1" in head_start


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_launcher_mounts_shared_storage_everywhere(cloud):
    cfg = load(LAUNCHERS[cloud])[0]
    assert f"--volume {SHARED}:{SHARED}" in cfg["docker"]["run_options"]
    assert any(f" {SHARED})" in c and "mount -t nfs" in c for c in cfg["initialization_commands"])


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_readme_starts_mlflow_from_where_ray_up_puts_the_checkout(cloud):
    from ray.autoscaler.sdk import get_docker_host_mount_location  # where docker-mode file mounts land on the host

    cfg = load(LAUNCHERS[cloud])[0]
    (target,) = [remote for remote, local in cfg["file_mounts"].items() if local == "."]
    host_copy = f"{get_docker_host_mount_location(cfg['cluster_name'])}{target}/cluster/mlflow/up.sh"
    readme = CLUSTER_README.read_text()
    assert f"ray exec cluster/{cloud}/ray-cluster.yaml --run-env host 'bash {host_copy}'" in readme


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_launcher_shell_commands_are_valid_bash(cloud):
    cfg = load(LAUNCHERS[cloud])[0]
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    script = "\n".join(c for k in keys for c in cfg.get(k, []))
    r = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------------------------------------------
# KubeRay
# ---------------------------------------------------------------------------------------------------
def test_raycluster_fields():
    rc = one("RayCluster")
    assert rc["apiVersion"] == "ray.io/v1"
    spec = rc["spec"]
    assert spec["rayVersion"] == pinned_ray() == "2.60.0"
    assert spec["authOptions"]["mode"] == "token" and spec["authOptions"]["secretName"]
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert head["rayStartParams"].get("num-cpus") == "0"
    head_container = containers(head["template"])[0]
    ports = {p["containerPort"] for p in head_container["ports"]}
    assert {6379, 8265, 10001} <= ports
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if int(containers(g["template"])[0]["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1]
    assert gpu_groups, "no worker group with an nvidia.com/gpu limit"
    assert all(g["minReplicas"] >= 1 and g["maxReplicas"] >= g["minReplicas"] for g in gpu_groups)
    images = {c["image"] for t in [head["template"]] + [g["template"] for g in spec["workerGroupSpecs"]] for c in containers(t)}
    assert len(images) == 1, f"head and workers must run one image, found {images}"


def test_raycluster_pods_share_one_rwx_volume_at_the_same_path():
    spec = one("RayCluster")["spec"]
    pvc = one("PersistentVolumeClaim", "fakedet-shared")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for template in [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in template["spec"]["volumes"] if "persistentVolumeClaim" in v}
        mounts = {m["mountPath"]: m["name"] for m in containers(template)[0]["volumeMounts"]}
        assert claims.get(mounts.get(SHARED)) == "fakedet-shared"


def test_only_the_head_gets_mlflow_credentials_and_from_secrets():
    spec = one("RayCluster")["spec"]
    head_env = env_of(containers(spec["headGroupSpec"]["template"])[0])
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "KAGGLE_USERNAME", "KAGGLE_KEY"):
        assert "secretKeyRef" in head_env[name]["valueFrom"], name
    for group in spec["workerGroupSpecs"]:
        assert not {"MLFLOW_TRACKING_PASSWORD", "KAGGLE_KEY"} & set(env_of(containers(group["template"])[0]))


def test_rayjob_runs_the_raycluster_spec_and_cleans_up():
    job = one("RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    assert job["spec"]["rayClusterSpec"] == one("RayCluster")["spec"], "raycluster.yaml and the RayJob drifted apart"
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert job["spec"].get("activeDeadlineSeconds", 0) > 0


def test_rayjob_entrypoint_is_the_sweep_wired_to_the_cluster():
    job = one("RayJob")
    entrypoint = job["spec"]["entrypoint"]
    assert not unquoted_shell_syntax(entrypoint)
    (argv,) = sweep_commands(entrypoint)
    args = parse_sweep(argv)
    assert args.kind == "ablation" and args.address == "auto"
    assert args.storage_path.startswith(SHARED + "/") and args.cache_root.startswith(SHARED + "/")
    # The tracking URI names the MLflow Service, and MLflow's host-header check lets that name in.
    uri = urlparse(args.tracking_uri)
    service = one("Service", "mlflow")
    assert uri.hostname.split(".")[0] == service["metadata"]["name"]
    assert uri.hostname in ("mlflow", f"mlflow.{service['metadata']['namespace']}.svc.cluster.local")
    assert uri.port == service["spec"]["ports"][0]["port"]
    allowed = [a for a in mlflow_k8s_command() if a.startswith("--allowed-hosts=")][0].split("=", 1)[1].split(",")
    assert uri.netloc in allowed


def test_fakedet_image_is_rays_image_plus_the_readme_install():
    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.M).group(1)
    assert base == f"rayproject/ray:{pinned_ray()}-py311-gpu"
    assert readme_install()[1] in text
    ignore = [l.strip() for l in (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines() if l.strip()[:1] not in ("", "#")]
    assert ".git" not in ignore, "the image records its commit: keep .git in the build context"
    assert {"data", "cache", "ray_results", "mlflow.db"} <= set(ignore)


# ---------------------------------------------------------------------------------------------------
# services and exposure
# ---------------------------------------------------------------------------------------------------
def test_no_kubernetes_object_is_reachable_from_outside():
    bad = [b for d in k8s_docs() for b in public_exposures(d)]
    assert not bad
    services = k8s("Service")
    assert services and all(s["spec"].get("type", "ClusterIP") == "ClusterIP" for s in services)


def test_compose_publishes_nothing_on_all_interfaces():
    services = load(COMPOSE)[0]["services"]
    assert "ports" not in services["postgres"], "PostgreSQL must stay on the compose network"
    for port in services["mlflow"]["ports"]:
        m = re.fullmatch(r"(\$\{[^}]+\}|[0-9.]+):(\d+):(\d+)", str(port))
        assert m and m.group(1) != "0.0.0.0", f"{port}: publish on one address, not on all interfaces"


# ---------------------------------------------------------------------------------------------------
# MLflow
# ---------------------------------------------------------------------------------------------------
def mlflow_k8s_command() -> list[str]:
    return containers(one("Deployment", "mlflow")["spec"]["template"])[0]["command"]


def check_mlflow_server_command(argv: list[str]) -> list[str]:
    """What a shared MLflow server must be started with; returns what is wrong."""
    flags = dict(a.split("=", 1) if "=" in a else (a, "") for a in argv if a.startswith("--"))
    wrong = []
    if argv[:2] != ["mlflow", "server"]:
        wrong.append("not `mlflow server`")
    if flags.get("--app-name") != "basic-auth":
        wrong.append("no --app-name=basic-auth")
    store = urlparse(flags.get("--backend-store-uri", ""))
    if not store.scheme.startswith("postgresql"):
        wrong.append("the backend store is not PostgreSQL")
    if store.password:
        wrong.append("a password in --backend-store-uri")
    if "--serve-artifacts" not in flags or "--no-serve-artifacts" in flags or not flags.get("--artifacts-destination"):
        wrong.append("artifacts not proxied (--serve-artifacts --artifacts-destination=...)")
    if "--disable-security-middleware" in flags or "*" in flags.get("--allowed-hosts", "").split(","):
        wrong.append("host-header protection off")
    return wrong


def test_mlflow_on_kubernetes():
    assert not check_mlflow_server_command(mlflow_k8s_command())
    env = env_of(containers(one("Deployment", "mlflow")["spec"]["template"])[0])
    for name in ("PGPASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert "secretKeyRef" in env[name]["valueFrom"], name
    postgres_env = env_of(containers(one("StatefulSet", "postgres")["spec"]["template"])[0])
    assert "secretKeyRef" in postgres_env["POSTGRES_PASSWORD"]["valueFrom"]
    initdb = one("ConfigMap", "mlflow-initdb")["data"]["10-mlflow-auth-db.sql"]
    assert initdb == (CLUSTER / "mlflow" / "initdb" / "10-mlflow-auth-db.sql").read_text()
    job_env = env_of(containers(one("Job", "mlflow-create-user")["spec"]["template"])[0])
    assert all("secretKeyRef" in job_env[n]["valueFrom"] for n in ("MLFLOW_AUTH_ADMIN_PASSWORD", "FAKEDET_MLFLOW_PASSWORD"))


def test_mlflow_on_a_ray_up_head():
    services = load(COMPOSE)[0]["services"]
    assert not check_mlflow_server_command(services["mlflow"]["command"])
    for name, value in {**services["mlflow"]["environment"], **services["postgres"]["environment"]}.items():
        if SECRET_NAME.search(name) or name == "PGPASSWORD":
            assert str(value).startswith("${"), f"{name} must come from the environment"


def test_basic_auth_config_holds_no_password():
    ini = configparser.ConfigParser()  # as MLflow reads it (mlflow/server/auth/config.py), interpolation included
    ini.read(CLUSTER / "mlflow" / "basic_auth.ini")
    section = ini["mlflow"]
    assert section["default_permission"] in {"READ", "USE", "EDIT", "MANAGE", "NO_PERMISSIONS"}
    auth_db = urlparse(section["database_uri"])
    assert auth_db.scheme.startswith("postgresql") and auth_db.password is None
    assert not section.get("admin_password"), "the admin password comes from MLFLOW_AUTH_ADMIN_PASSWORD"


def test_mlflow_image_pins_the_projects_mlflow_with_auth_and_db_extras():
    text = (CLUSTER / "mlflow" / "Dockerfile").read_text()
    m = re.search(r'"mlflow\[([^\]]+)\]==(3\.17\.\d+)"', text)
    assert m and {"auth", "db"} <= set(m.group(1).split(","))
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "mlflow>=3.17,<3.18" in deps, "the server's MLflow must match the clients' (pyproject.toml)"
    assert "MLFLOW_AUTH_CONFIG_PATH=/opt/mlflow/basic_auth.ini" in text


def test_mlflow_scripts_are_valid():
    r = subprocess.run(["bash", "-n", str(CLUSTER / "mlflow" / "up.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    compile((CLUSTER / "mlflow" / "create_user.py").read_text(), "create_user.py", "exec")


# ---------------------------------------------------------------------------------------------------
# sweep commands in manifests and READMEs
# ---------------------------------------------------------------------------------------------------
def strings_in(doc) -> list[str]:
    if isinstance(doc, dict):
        return [s for v in doc.values() for s in strings_in(v)]
    if isinstance(doc, list):
        return [s for v in doc for s in strings_in(v)]
    return [doc] if isinstance(doc, str) else []


FENCE = re.compile(r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```", re.S | re.M)  # fenced blocks, in lists too


def markdown_code(text: str) -> list[str]:
    """Fenced blocks, then inline code spans outside them."""
    fenced = [textwrap.dedent(b) for b in FENCE.findall(text)]
    return fenced + re.findall(r"`([^`\n]+)`", FENCE.sub("", text))


def all_sweep_commands() -> list[tuple[str, list[str]]]:
    found = []
    for path in yaml_files():
        for text in (s for d in load(path) for s in strings_in(d)):
            found += [(str(path.relative_to(ROOT)), argv) for argv in sweep_commands(text)]
    for path in (CLUSTER_README, ROOT / "README.md"):
        for block in markdown_code(path.read_text()):
            found += [(str(path.relative_to(ROOT)), argv) for argv in sweep_commands(block)]
    for path in CLUSTER.rglob("*.sh"):
        found += [(str(path.relative_to(ROOT)), argv) for argv in sweep_commands(path.read_text())]
    return found


SWEEP_COMMANDS = all_sweep_commands()


def test_sweep_commands_are_found_where_expected():
    sources = [s for s, _ in SWEEP_COMMANDS]
    assert sources.count("cluster/kuberay/rayjob-ablation.yaml") == 1
    # AWS, GCP and KubeRay runs, a resume and hpo, at least
    assert sources.count("cluster/README.md") >= 5


@pytest.mark.parametrize("source, argv", SWEEP_COMMANDS, ids=[f"{s}:{i}" for i, (s, _) in enumerate(SWEEP_COMMANDS)])
def test_sweep_command_parses_with_the_real_cli(source, argv):
    args = parse_sweep(argv)
    if getattr(args, "address", None):  # a cluster run: results on shared storage, runs on a server
        assert args.address == "auto"
        assert args.storage_path and (args.storage_path.startswith(SHARED + "/") or "://" in args.storage_path)
        assert args.tracking_uri and args.tracking_uri.startswith(("http://", "https://"))


def test_fakedet_prepare_commands_in_the_cluster_readme_parse():
    try:
        from fakedet.cli import build_parser
    except ImportError as e:  # the data command line is another module's, maybe not there yet
        pytest.skip(f"fakedet's command line does not import: {e}")
    lines = [l for b in markdown_code(CLUSTER_README.read_text()) for l in b.replace("\\\n", " ").splitlines()
             if l.strip().startswith("fakedet prepare")]
    assert lines
    for line in lines:
        argv = shlex.split(substitute_env(line))[1:]
        try:
            build_parser().parse_args(argv)
        except SystemExit as e:
            raise AssertionError(f"`{line.strip()}` does not parse") from e


# ---------------------------------------------------------------------------------------------------
# the checkers themselves fail on bad input
# ---------------------------------------------------------------------------------------------------
BAD_MANIFESTS = """
apiVersion: v1
kind: Secret
metadata: {name: leaked}
stringData: {password: hunter2}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: db}
spec:
  template:
    spec:
      containers:
        - name: db
          env:
            - {name: DB_PASSWORD, value: hunter2}
          args: ["--backend-store-uri=postgresql://mlflow:hunter2@postgres/mlflow", "RAY_AUTH_TOKEN=abc123"]
---
apiVersion: v1
kind: Service
metadata: {name: ray-dashboard}
spec: {type: LoadBalancer, ports: [{port: 8265}]}
---
apiVersion: ray.io/v1
kind: RayCluster
metadata: {name: open}
spec:
  headGroupSpec: {serviceType: NodePort, enableIngress: true, rayStartParams: {}, template: {}}
"""


def test_checkers_catch_bad_manifests():
    docs = list(yaml.safe_load_all(BAD_MANIFESTS))
    secrets = [f for d in docs for f in literal_secrets(d)]
    assert any("Secret with values" in s for s in secrets)
    assert any("DB_PASSWORD" in s for s in secrets)
    assert any("URL with a password" in s for s in secrets)
    assert any("RAY_AUTH_TOKEN" in s for s in secrets)
    exposures = [b for d in docs for b in public_exposures(d)]
    assert any("LoadBalancer" in b for b in exposures) and any("NodePort" in b for b in exposures)
    assert any("enableIngress" in b for b in exposures)
    assert len(literal_secrets({"environment": {"MLFLOW_FLASK_SERVER_SECRET_KEY": "abc", "KAGGLE_KEY": "abc"}})) == 2
    assert not literal_secrets({"valueFrom": {"secretKeyRef": {"name": "fakedet-kaggle", "key": "key"}}})
    assert literal_secrets_in_text("export MLFLOW_TRACKING_PASSWORD=hunter2hunter2")
    assert not literal_secrets_in_text('export MLFLOW_TRACKING_PASSWORD="$(cat ~/.secret)"')
    assert open_security_group_rules({"security_group": {"IpPermissions": [
        {"FromPort": 8265, "ToPort": 8265, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]}})


def test_checkers_catch_bad_commands():
    assert unquoted_shell_syntax("cd /opt/fakedet && python sweeps/run.py ablation")
    assert unquoted_shell_syntax("python sweeps/run.py ablation --tracking-uri $MLFLOW_TRACKING_URI")
    assert not unquoted_shell_syntax("bash -c 'cd /opt/fakedet && python sweeps/run.py ablation --x $Y'")
    (argv,) = sweep_commands("ray exec c.yaml 'cd /x && python sweeps/run.py ablation --bogus-flag 1'")
    with pytest.raises(AssertionError, match="does not parse"):
        parse_sweep(argv)
    assert check_mlflow_server_command(["mlflow", "server", "--backend-store-uri=sqlite:///m.db"])
    assert check_mlflow_server_command(["mlflow", "server", "--app-name=basic-auth", "--serve-artifacts",
                                        "--artifacts-destination=/a", "--backend-store-uri=postgresql://u:p@h/d"])
