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
import ipaddress
import json
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
# The share's folders Ray's containers mount, one by one; its root also holds MLflow's store (mlflow/)
RAY_SHARED_FOLDERS = {f"{SHARED}/{d}" for d in ("ray_results", "cache", "kagglehub", "optuna", "data")}
UP_SH = CLUSTER / "mlflow" / "up.sh"
# where Ray's container on the head finds the driver's MLflow login (the README's `. ~/.fakedet/mlflow-client.env`)
CLIENT_MOUNT = "/home/ray/.fakedet"
OPERATOR_CIDR = "REPLACE_WITH_OPERATOR_CIDR"


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
def readme_install() -> str:
    """The top-level README's install command, without the main job: every package pinned by constraints.txt."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"pip install -c constraints\.txt -e '\.\[dev\]'", text)
    assert m, "README.md no longer shows `pip install -c constraints.txt -e '.[dev]'`"
    return m.group(0)


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
        "aws/head-iam-policy.json", "aws/efs-policy.json", "gcp/head-role.yaml", "gcp/filestore-flags.yaml",
        "kuberay/ray-networkpolicy.yaml",
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
    texts = [p for p in CLUSTER.rglob("*") if p.is_file() and p.suffix not in (".yaml", ".yml")]
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
    install = readme_install()
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


def docker_volumes(cfg: dict) -> list[tuple[str, str, str]]:
    """(host path, container path, options) of every `--volume` in docker.run_options."""
    found = []
    for option in cfg["docker"]["run_options"]:
        m = re.fullmatch(r"(?:--volume|-v)[ =](\S+)", option.strip())
        if m:
            host, container, *opts = m.group(1).split(":")
            found.append((host, container, ",".join(opts)))
    return found


def mount_command(cfg: dict) -> str:
    (cmd,) = [c for c in cfg["initialization_commands"] if f" {SHARED})" in c and "mount -t" in c]
    return cmd


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_launcher_mounts_shared_storage_everywhere(cloud):
    cfg = load(LAUNCHERS[cloud])[0]
    shared = {(h, c) for h, c, _ in docker_volumes(cfg) if h.startswith(SHARED)}
    # the folders Ray's jobs use, at the same path in the container, and not the share's root
    assert shared == {(d, d) for d in RAY_SHARED_FOLDERS}
    made = " ".join(c for c in cfg["initialization_commands"] if "install -d -o 1000 -g 100" in c)
    assert all(d in made.split() for d in RAY_SHARED_FOLDERS), "each mounted folder is created for the `ray` user"
    assert {"FAKEDET_CACHE=/mnt/fakedet/cache", "KAGGLEHUB_CACHE=/mnt/fakedet/kagglehub"} <= {
        o.split("--env ", 1)[-1] for o in cfg["docker"]["run_options"]}
    assert "mount -t nfs" in mount_command(cfg) or "mount -t efs" in mount_command(cfg)


def test_aws_mounts_efs_over_tls_and_efs_refuses_clients_without_it():
    cmd = mount_command(load(LAUNCHERS["aws"])[0])
    m = re.search(r"mount -t efs -o (\S+) REPLACE_WITH_EFS_ID:/ ", cmd)
    assert m and "tls" in m.group(1).split(",") and "notls" not in m.group(1)
    install = " ".join(load(LAUNCHERS["aws"])[0]["initialization_commands"])
    assert re.search(r"efs-utils.*--branch v\d+\.\d+\.\d+", install), "the EFS client is built from a pinned release"
    policy = json.loads((CLUSTER / "aws" / "efs-policy.json").read_text())
    denies = [st for st in policy["Statement"] if st["Effect"] == "Deny"]
    assert any(st["Action"] == "*" and st["Condition"] == {"Bool": {"aws:SecureTransport": "false"}} for st in denies)
    readme = CLUSTER_README.read_text()
    assert "put-file-system-policy" in readme and "file://cluster/aws/efs-policy.json" in readme


# ---------------------------------------------------------------------------------------------------
# secrets on a `ray up` head: what Ray's containers are given
# ---------------------------------------------------------------------------------------------------
def shell_default(script: str, variable: str) -> str:
    """The default of `variable="${OVERRIDE:-default}"` in a shell script."""
    m = re.search(rf'^{variable}="\$\{{[A-Z_]+:-([^}}]+)\}}"', script, re.M)
    assert m, f"{variable}=\"${{...:-...}}\" not found"
    return m.group(1)


def credential_mount_problems(volumes: list[tuple[str, str, str]], server_dir: str, client_dir: str) -> list[str]:
    """Mounts that would let a Ray job read more than the client's MLflow login."""
    bad = []
    for host, container, opts in volumes:
        host = host.rstrip("/")
        if server_dir == host or server_dir.startswith(host + "/"):
            bad.append(f"{host} holds the server's secrets ({server_dir})")
        if host in (SHARED, f"{SHARED}/mlflow") or host.startswith(f"{SHARED}/mlflow/"):
            bad.append(f"{host}: the share's root or MLflow's store")
        if not host.startswith(SHARED) and (host != client_dir or container != CLIENT_MOUNT or "ro" not in opts.split(",")):
            bad.append(f"{host}:{container}:{opts}: only the client folder, read-only, at {CLIENT_MOUNT}")
    return bad


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_ray_containers_get_only_the_client_credentials(cloud):
    cfg = load(LAUNCHERS[cloud])[0]
    script = UP_SH.read_text()
    server_dir, client_dir = shell_default(script, "server_dir"), shell_default(script, "client_dir")
    assert not credential_mount_problems(docker_volumes(cfg), server_dir, client_dir)
    assert (client_dir, CLIENT_MOUNT, "ro") in docker_volumes(cfg)
    # the server's secrets: a root-only folder, a file written by root with umask 077
    assert 'sudo install -d -m 700 -o root -g root "$server_dir"' in script
    assert "sudo sh -c 'umask 077 && cat >\"$1\"' sh \"$server_env\"" in script
    assert 'server_env="$server_dir/' in script and 'client_env="$client_dir/' in script
    # the client file holds the tracking login and nothing else
    heredoc = re.search(r'sh "\$client_env" <<EOF\n(.*?)\nEOF', script, re.S).group(1)
    assert [l.split("=", 1)[0] for l in heredoc.splitlines()] == [
        "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"]
    # Compose reads the server file as root; MLflow's store is out of Ray's reach
    assert 'sudo env "FAKEDET_SHARED=$shared" docker compose' in script and '--env-file "$server_env"' in script
    assert 'sudo install -d -m 700 -o root -g root "$shared/mlflow"' in script
    assert f"sudo install -d -m 755 -o root -g root {client_dir}" in cfg["initialization_commands"]


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
# cloud identities and networks
# ---------------------------------------------------------------------------------------------------
AWS_HEAD_POLICY = CLUSTER / "aws" / "head-iam-policy.json"
GCP_HEAD_ROLE = CLUSTER / "gcp" / "head-role.yaml"
# What Ray 2.60's AWS node provider calls from the head (ray/autoscaler/_private/aws/node_provider.py:
# instances.filter, create_instances, create_tags, terminate_instances, describe_instance_types,
# describe_images), plus reads of the launch's parts; nothing of IAM or S3.
AWS_HEAD_ACTIONS = {"ec2:DescribeInstances", "ec2:DescribeInstanceTypes", "ec2:DescribeImages", "ec2:DescribeSubnets",
                    "ec2:DescribeSecurityGroups", "ec2:DescribeKeyPairs", "ec2:RunInstances", "ec2:CreateTags",
                    "ec2:TerminateInstances"}


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def iam_policy_problems(policy: dict, region: str, tag: tuple[str, str], instance_types: set[str],
                        security_group: str) -> list[str]:
    """What makes an autoscaler policy broader than launching, tagging and terminating one cluster's workers."""
    bad = []
    for st in policy["Statement"]:
        if st["Effect"] != "Allow":
            continue
        actions, resources = as_list(st["Action"]), as_list(st["Resource"])
        cond = {k: v for op in st.get("Condition", {}).values() for k, v in op.items()}
        sid = st.get("Sid", "?")
        if any("*" in a or a not in AWS_HEAD_ACTIONS for a in actions):
            bad.append(f"{sid}: actions beyond the autoscaler's: {actions}")
        if "*" in resources:
            if not all(a.startswith("ec2:Describe") for a in actions):
                bad.append(f"{sid}: Resource * for {actions}")
            if cond.get("aws:RequestedRegion") != region:
                bad.append(f"{sid}: Resource * in every region")
            continue
        if any(f":{region}:" not in r for r in resources):
            bad.append(f"{sid}: resources outside {region}")
        on_instances = any(r.endswith(":instance/*") for r in resources)
        if on_instances and "ec2:RunInstances" in actions:
            if cond.get(f"aws:RequestTag/{tag[0]}") != tag[1]:
                bad.append(f"{sid}: launches instances without the cluster's tag")
            if set(as_list(cond.get("ec2:InstanceType", []))) != instance_types:
                bad.append(f"{sid}: launches instance types other than {sorted(instance_types)}")
        if on_instances and {"ec2:TerminateInstances", "ec2:CreateTags"} & set(actions):
            if cond.get(f"ec2:ResourceTag/{tag[0]}") != tag[1] and cond.get("ec2:CreateAction") != "RunInstances":
                bad.append(f"{sid}: tags or terminates instances not of this cluster")
            if "ec2:TerminateInstances" in actions and cond.get(f"ec2:ResourceTag/{tag[0]}") != tag[1]:
                bad.append(f"{sid}: terminates instances not of this cluster")
        if any(":security-group/" in r and not r.endswith(f"/{security_group}") for r in resources):
            bad.append(f"{sid}: launches into other security groups")
    return bad


def aws_cfg() -> dict:
    return load(LAUNCHERS["aws"])[0]


def test_aws_head_policy_allows_only_what_the_autoscaler_needs_for_this_cluster():
    from ray.autoscaler.tags import TAG_RAY_CLUSTER_NAME

    cfg = aws_cfg()
    workers = {t["node_config"]["InstanceType"] for name, t in cfg["available_node_types"].items()
               if name != cfg["head_node_type"]}
    (group,) = {g for t in cfg["available_node_types"].values() for g in t["node_config"]["SecurityGroupIds"]}
    policy = json.loads(AWS_HEAD_POLICY.read_text())
    assert not iam_policy_problems(policy, cfg["provider"]["region"], (TAG_RAY_CLUSTER_NAME, cfg["cluster_name"]),
                                   workers, group)
    allowed = {a for st in policy["Statement"] if st["Effect"] == "Allow" for a in as_list(st["Action"])}
    assert {"ec2:RunInstances", "ec2:TerminateInstances", "ec2:CreateTags", "ec2:DescribeInstances"} <= allowed
    assert not any(a.startswith(("iam:", "s3:")) for a in allowed), "workers have no profile to pass; no S3 is used"


def test_aws_only_the_head_has_an_instance_profile():
    cfg = aws_cfg()
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]["node_config"]
    # given, so `ray up` does not make ray-autoscaler-v1 (AmazonEC2FullAccess + AmazonS3FullAccess)
    assert head["IamInstanceProfile"]["Arn"] == "REPLACE_WITH_HEAD_INSTANCE_PROFILE_ARN"
    assert all("IamInstanceProfile" not in t["node_config"] for n, t in types.items() if n != cfg["head_node_type"])
    readme = CLUSTER_README.read_text()
    assert "put-role-policy --role-name fakedet-ray-head" in readme and "head-iam-policy.json" in readme


def test_aws_nodes_use_the_operators_group_not_rays_default():
    cfg = aws_cfg()
    # Ray's own group always opens SSH to 0.0.0.0/0 (aws/config.py, _create_default_ssh_inbound_rules);
    # SecurityGroupIds on every node type keep `ray up` from making or using it
    assert "security_group" not in cfg["provider"]
    groups = [t["node_config"].get("SecurityGroupIds") for t in cfg["available_node_types"].values()]
    assert all(g == ["REPLACE_WITH_SECURITY_GROUP_ID"] for g in groups)


def readme_command_lines(needle: str) -> list[str]:
    return [l.strip() for b in markdown_code(CLUSTER_README.read_text()) for l in b.replace("\\\n", " ").splitlines()
            if needle in l]


def network_rule_problems(lines: list[str]) -> list[str]:
    """Firewall / security-group commands that open more than the cluster to itself and SSH to the operator."""
    bad = []
    for line in lines:
        if re.search(r"0\.0\.0\.0/0|::/0", line):
            bad.append(f"open to the internet: {line}")
        cidrs = re.findall(r"--(?:cidr|source-ranges)[ =](\S+)", line)
        for cidr in cidrs:
            if cidr != OPERATOR_CIDR:
                bad.append(f"source range {cidr} (a VPC-wide or public range): {line}")
        if cidrs and not re.search(r"--port 22\b|--allow=tcp:22\b", line):
            bad.append(f"an address range may reach more than SSH: {line}")
        if not cidrs and not re.search(r"--source-group|--source-tags|UserIdGroupPairs", line):
            bad.append(f"no source: {line}")
    return bad


def test_network_rules_let_in_the_cluster_and_ssh_from_the_operator_only():
    aws = readme_command_lines("authorize-security-group-ingress")
    gcp = readme_command_lines("firewall-rules create")
    assert len(aws) == 3 and len(gcp) == 2
    assert not network_rule_problems(aws + gcp)
    assert any("--port 2049 --source-group" in l for l in aws), "EFS answers the nodes' group, not the VPC"
    assert all("--network=fakedet" in l and "--target-tags=fakedet-ray" in l for l in gcp)
    assert OPERATOR_CIDR in CLUSTER_README.read_text().split("## Security", 1)[1], "the Security section names it"


def gcp_cfg() -> dict:
    return load(LAUNCHERS["gcp"])[0]


def test_gcp_nodes_are_on_the_clusters_network_and_tags():
    cfg = gcp_cfg()
    (rule,) = [l for l in readme_command_lines("subnets create fakedet")]
    subnet = re.search(r"--range=(\S+)", rule).group(1)
    for t in cfg["available_node_types"].values():
        node = t["node_config"]
        (nic,) = node["networkInterfaces"]
        assert nic["subnetwork"].endswith("/regions/us-central1/subnetworks/fakedet"), "not the default network"
        assert node["tags"]["items"] == ["fakedet-ray"]
    flags = load(CLUSTER / "gcp" / "filestore-flags.yaml")[0]["--file-share"]
    (export,) = flags["nfs-export-options"]
    assert export["ip-ranges"] == [subnet], "the share answers the cluster's subnet only"
    assert ipaddress.ip_network(subnet).is_private
    assert "--network=name=fakedet" in " ".join(readme_command_lines("filestore instances create"))


def test_gcp_head_has_a_narrow_service_account_and_workers_none():
    cfg = gcp_cfg()
    types = cfg["available_node_types"]
    (head_sa,) = types[cfg["head_node_type"]]["node_config"]["serviceAccounts"]
    assert head_sa["email"] == "REPLACE_WITH_HEAD_SERVICE_ACCOUNT_EMAIL"
    assert head_sa["scopes"] == ["https://www.googleapis.com/auth/compute"]
    assert all(t["node_config"].get("serviceAccounts") == [] for n, t in types.items() if n != cfg["head_node_type"]), \
        "workers: no service account (absent would mean the default compute one with its default scopes)"
    assert cfg["provider"].get("cache_stopped_nodes") is False
    role = load(GCP_HEAD_ROLE)[0]
    permissions = set(role["includedPermissions"])
    assert all(p.startswith("compute.") and "*" not in p for p in permissions)
    # what Ray's GCP node provider calls (gcp/node.py) and instances.insert checks for the worker config
    assert {"compute.instances.create", "compute.instances.delete", "compute.instances.list", "compute.instances.get",
            "compute.instances.setLabels", "compute.zoneOperations.get", "compute.disks.create",
            "compute.subnetworks.use", "compute.instances.setTags"} <= permissions
    assert not {"compute.instances.setServiceAccount", "compute.instances.stop", "compute.instances.start"} & permissions
    readme = CLUSTER_README.read_text()
    assert "--file=cluster/gcp/head-role.yaml" in readme and "service-accounts disable ray-autoscaler-sa-v1" in readme


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


RAY_POD_LABEL = ("app.kubernetes.io/part-of", "fakedet-ray")
INIT_CAPABILITIES = {"CHOWN", "DAC_OVERRIDE", "FOWNER"}  # the shared-folders init container's, and no more


def pod_security_problems(template: dict) -> list[str]:
    """Where a pod template runs as root, can escalate, or keeps capabilities."""
    spec = template["spec"]
    pod = spec.get("securityContext") or {}
    bad = []
    if pod.get("runAsNonRoot") is not True or not isinstance(pod.get("runAsUser"), int) or pod["runAsUser"] == 0:
        bad.append("the pod: runAsNonRoot with a numeric, non-zero runAsUser")
    if (pod.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        bad.append("the pod: seccompProfile RuntimeDefault")
    for c in spec["containers"] + spec.get("initContainers", []):
        sc = c.get("securityContext") or {}
        caps = sc.get("capabilities") or {}
        if sc.get("allowPrivilegeEscalation") is not False or sc.get("privileged"):
            bad.append(f"{c['name']}: allowPrivilegeEscalation: false")
        if caps.get("drop") != ["ALL"]:
            bad.append(f"{c['name']}: capabilities.drop: [ALL]")
        root = sc.get("runAsUser") == 0 or sc.get("runAsNonRoot") is False
        if c in spec["containers"] and (root or caps.get("add")):
            bad.append(f"{c['name']}: runs as root or adds capabilities")
        if c in spec.get("initContainers", []) and not set(caps.get("add", [])) <= INIT_CAPABILITIES:
            bad.append(f"{c['name']}: adds {caps.get('add')}")
    return bad


def ray_templates() -> dict[str, dict]:
    spec = one("RayCluster")["spec"]
    return {"head": spec["headGroupSpec"]["template"], **{g["groupName"]: g["template"] for g in spec["workerGroupSpecs"]}}


def test_every_pod_runs_unprivileged():
    templates = {**ray_templates(), "mlflow": one("Deployment", "mlflow")["spec"]["template"],
                 "postgres": one("StatefulSet", "postgres")["spec"]["template"],
                 "mlflow-create-user": one("Job", "mlflow-create-user")["spec"]["template"]}
    assert {name: pod_security_problems(t) for name, t in templates.items() if pod_security_problems(t)} == {}
    # KubeRay's autoscaler sidecar, which KubeRay adds to the head pod
    sidecar = one("RayCluster")["spec"]["autoscalerOptions"]["securityContext"]
    assert sidecar["allowPrivilegeEscalation"] is False and sidecar["capabilities"]["drop"] == ["ALL"]
    # only the head talks to the Kubernetes API (KubeRay's autoscaler sidecar): no token elsewhere
    tokenless = [t for name, t in templates.items() if name != "head"]
    assert all(t["spec"].get("automountServiceAccountToken") is False for t in tokenless)


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items()) and not selector.get("matchExpressions")


def network_policy_problems(policy: dict) -> list[str]:
    """Ingress rules that let in anything beyond chosen pods: every source, every namespace, address blocks."""
    bad = []
    if "Ingress" not in policy["spec"].get("policyTypes", []):
        bad.append("no Ingress policy type")
    for rule in policy["spec"].get("ingress", []):
        if not rule.get("from"):
            bad.append("a rule without `from`: every source")
        for peer in rule.get("from", []):
            if "ipBlock" in peer:
                bad.append(f"an ipBlock: {peer['ipBlock']}")
            if not (peer.get("podSelector") or {}).get("matchLabels"):
                bad.append(f"every pod of {'every namespace' if 'namespaceSelector' in peer else 'the namespace'}")
            if "namespaceSelector" in peer and not peer["namespaceSelector"].get("matchLabels"):
                bad.append("every namespace")
    return bad


def test_ray_pods_answer_their_cluster_the_submitter_and_the_operator_only():
    policies = {d["metadata"]["name"]: d for d in load(KUBERAY / "ray-networkpolicy.yaml")}
    assert {n: network_policy_problems(p) for n, p in policies.items() if network_policy_problems(p)} == {}
    head_labels = {**ray_templates()["head"]["metadata"]["labels"], "ray.io/node-type": "head"}
    worker_labels = {**ray_templates()["gpu"]["metadata"]["labels"], "ray.io/node-type": "worker"}
    assert head_labels[RAY_POD_LABEL[0]] == RAY_POD_LABEL[1] == worker_labels[RAY_POD_LABEL[0]]
    head = policies["fakedet-ray-head"]["spec"]
    workers = policies["fakedet-ray-workers"]["spec"]
    assert selects(head["podSelector"], head_labels) and not selects(head["podSelector"], worker_labels)
    assert selects(workers["podSelector"], worker_labels) and not selects(workers["podSelector"], head_labels)
    cluster_pods = {"podSelector": {"matchLabels": dict([RAY_POD_LABEL])}}
    assert workers["ingress"] == [{"from": [cluster_pods]}]
    (own, submitter, operator) = head["ingress"]
    assert own == {"from": [cluster_pods]}
    # the RayJob's submitter pod: KubeRay names the submitter Job after the RayJob
    assert submitter["from"][0]["podSelector"]["matchLabels"] == {
        "batch.kubernetes.io/job-name": one("RayJob")["metadata"]["name"]}
    assert operator["from"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "kuberay-system"}
    assert "--namespace kuberay-system" in CLUSTER_README.read_text() or "-n kuberay-system" in CLUSTER_README.read_text()
    for rule in (submitter, operator):
        assert [p["port"] for p in rule["ports"]] == [8265], "the dashboard's job API, nothing else"
    assert "kubectl apply -f cluster/kuberay/ray-networkpolicy.yaml" in CLUSTER_README.read_text()


def test_mlflow_and_postgres_answer_their_clients_only():
    policies = {d["metadata"]["name"]: d for d in k8s("NetworkPolicy") if d["metadata"]["name"] in
                ("mlflow-from-its-clients", "postgres-from-mlflow")}
    assert len(policies) == 2
    assert {n: network_policy_problems(p) for n, p in policies.items() if network_policy_problems(p)} == {}
    (rule,) = policies["mlflow-from-its-clients"]["spec"]["ingress"]
    sources = [peer["podSelector"]["matchLabels"] for peer in rule["from"]]
    assert sources == [{RAY_POD_LABEL[0]: RAY_POD_LABEL[1], "ray.io/node-type": "head"},
                       {"batch.kubernetes.io/job-name": "mlflow-create-user"}], "not the Ray workers, not the namespace"
    (rule,) = policies["postgres-from-mlflow"]["spec"]["ingress"]
    assert [peer["podSelector"]["matchLabels"] for peer in rule["from"]] == [
        one("Deployment", "mlflow")["spec"]["template"]["metadata"]["labels"]]


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
    assert readme_install() in text
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
    # the driver, MLflow's one client, runs on the head: the head's loopback is enough
    assert services["mlflow"]["ports"] == ["127.0.0.1:5000:5000"]
    assert "MLFLOW_TRACKING_URI=http://127.0.0.1:5000" in UP_SH.read_text()


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


def test_security_checkers_catch_bad_samples():
    from ray.autoscaler.tags import TAG_RAY_CLUSTER_NAME

    tag = (TAG_RAY_CLUSTER_NAME, "fakedet")
    broad = {"Statement": [
        {"Effect": "Allow", "Action": "ec2:*", "Resource": "*"},
        {"Effect": "Allow", "Action": ["ec2:RunInstances"], "Resource": "arn:aws:ec2:us-west-2:*:instance/*"},
        {"Effect": "Allow", "Action": "ec2:TerminateInstances", "Resource": "arn:aws:ec2:us-west-2:*:instance/*"},
        {"Effect": "Allow", "Action": "ec2:RunInstances", "Resource": "arn:aws:ec2:us-west-2:*:security-group/*"},
        {"Effect": "Allow", "Action": "s3:*", "Resource": "arn:aws:s3:::bucket/*"}]}
    problems = " ".join(iam_policy_problems(broad, "us-west-2", tag, {"g5.xlarge"}, "sg-1"))
    for what in ("actions beyond", "Resource *", "without the cluster's tag", "instance types other",
                 "terminates instances not of this cluster", "other security groups"):
        assert what in problems, what
    assert network_rule_problems(["aws ec2 authorize-security-group-ingress --group-id x --protocol tcp --port 22 --cidr 0.0.0.0/0"])
    assert network_rule_problems(["aws ec2 authorize-security-group-ingress --group-id x --protocol tcp --port 2049 --cidr 172.31.0.0/16"])
    assert network_rule_problems([f"gcloud compute firewall-rules create x --allow=tcp --source-ranges={OPERATOR_CIDR}"])
    assert not network_rule_problems([f"gcloud compute firewall-rules create x --allow=tcp:22 --source-ranges={OPERATOR_CIDR}"])
    assert credential_mount_problems([("/home/ubuntu/.fakedet", CLIENT_MOUNT, "ro")], "/home/ubuntu/.fakedet", "/home/ubuntu/.fakedet")
    assert credential_mount_problems([(SHARED, SHARED, "")], "/etc/fakedet/server", "/etc/fakedet/client")
    assert credential_mount_problems([("/etc/fakedet/client", CLIENT_MOUNT, "")], "/etc/fakedet/server", "/etc/fakedet/client")
    root_pod = {"spec": {"containers": [{"name": "c", "securityContext": {"capabilities": {"add": ["NET_ADMIN"]}}}]}}
    problems = " ".join(pod_security_problems(root_pod))
    assert "runAsNonRoot" in problems and "allowPrivilegeEscalation" in problems and "drop" in problems
    open_policy = {"spec": {"policyTypes": ["Ingress"], "ingress": [{}, {"from": [{"namespaceSelector": {}}]},
                                                                    {"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}]}}
    assert len(network_policy_problems(open_policy)) >= 4


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
