"""No secret's value in cluster/, and each secret only where it is needed: token auth everywhere, Secrets
by reference, the MLflow login on the Ray head only, the server's secrets out of Ray's reach. The
checkers also run against known-bad samples, so a check that cannot fail shows up."""

from __future__ import annotations

import configparser
import re
from urllib.parse import urlparse

import pytest
import yaml

from cluster_files import (CLIENT_MOUNT, CLUSTER, COMPOSE, LAUNCHERS, ROOT, SHARED, UP_SH, containers, docker_volumes,
                           env_of, launcher, load, one, shell_default, yaml_files)

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


# ---------------------------------------------------------------------------------------------------
# no values
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(CLUSTER)))
def test_no_literal_secret_in_any_manifest(path):
    found = [f for i, d in enumerate(load(path)) for f in literal_secrets(d, f"doc{i}")]
    assert not found, f"{path.relative_to(ROOT)}: {found}"


def test_no_literal_secret_in_scripts_and_docs():
    texts = [p for p in CLUSTER.rglob("*") if p.is_file() and p.suffix not in (".yaml", ".yml")]
    found = {str(p.relative_to(ROOT)): literal_secrets_in_text(p.read_text()) for p in texts}
    assert not {k: v for k, v in found.items() if v}


def test_basic_auth_config_holds_no_password():
    ini = configparser.ConfigParser()  # as MLflow reads it (mlflow/server/auth/config.py), interpolation included
    assert ini.read(CLUSTER / "mlflow" / "basic_auth.ini")
    section = ini["mlflow"]
    assert section["default_permission"] in {"READ", "USE", "EDIT", "MANAGE", "NO_PERMISSIONS"}
    auth_db = urlparse(section["database_uri"])
    assert auth_db.scheme.startswith("postgresql") and auth_db.password is None
    assert not section.get("admin_password"), "the admin password comes from MLFLOW_AUTH_ADMIN_PASSWORD"


# ---------------------------------------------------------------------------------------------------
# Ray's token
# ---------------------------------------------------------------------------------------------------
def test_token_auth_is_never_switched_off():
    for p in CLUSTER.rglob("*"):
        if p.is_file():
            text = p.read_text()
            assert not re.search(r"RAY_AUTH_MODE\s*[=:]\s*['\"]?disabled", text), p
            assert not re.search(r"^\s*mode:\s*['\"]?disabled", text, re.M), p


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_launcher_uses_token_auth_everywhere(cloud):
    cfg = launcher(cloud)
    assert "--env RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
    # Ray's default token path on every node (docs: ray-security/token-auth, "Ray clusters on remote VMs"):
    # ~/.ray/auth_token of the image's `ray` user, copied from yours.
    assert cfg["file_mounts"].get("/home/ray/.ray/auth_token") == "~/.ray/auth_token"
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in starts)


def test_raycluster_uses_token_auth_from_a_secret():
    auth = one("RayCluster")["spec"]["authOptions"]
    assert auth["mode"] == "token" and auth["secretName"]


# ---------------------------------------------------------------------------------------------------
# Secrets by reference, and only where they are needed
# ---------------------------------------------------------------------------------------------------
def test_only_the_ray_head_gets_mlflow_credentials_and_from_secrets():
    spec = one("RayCluster")["spec"]
    head_env = env_of(containers(spec["headGroupSpec"]["template"])[0])
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "KAGGLE_USERNAME", "KAGGLE_KEY"):
        assert "secretKeyRef" in head_env[name]["valueFrom"], name
    for group in spec["workerGroupSpecs"]:
        assert not {"MLFLOW_TRACKING_PASSWORD", "KAGGLE_KEY"} & set(env_of(containers(group["template"])[0]))


def test_mlflow_on_kubernetes_gets_its_secrets_by_reference():
    env = env_of(containers(one("Deployment", "mlflow")["spec"]["template"])[0])
    for name in ("PGPASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert "secretKeyRef" in env[name]["valueFrom"], name
    postgres_env = env_of(containers(one("StatefulSet", "postgres")["spec"]["template"])[0])
    assert "secretKeyRef" in postgres_env["POSTGRES_PASSWORD"]["valueFrom"]
    job_env = env_of(containers(one("Job", "mlflow-create-user")["spec"]["template"])[0])
    assert all("secretKeyRef" in job_env[n]["valueFrom"] for n in ("MLFLOW_AUTH_ADMIN_PASSWORD", "FAKEDET_MLFLOW_PASSWORD"))


def test_mlflow_on_a_ray_up_head_gets_its_secrets_from_the_environment():
    services = load(COMPOSE)[0]["services"]
    names = {**services["mlflow"]["environment"], **services["postgres"]["environment"]}
    secret = {n: v for n, v in names.items() if SECRET_NAME.search(n) or n == "PGPASSWORD"}
    assert {"PGPASSWORD", "POSTGRES_PASSWORD"} <= set(secret)
    assert all(str(v).startswith("${") for v in secret.values()), secret


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_ray_containers_get_only_the_client_credentials(cloud):
    cfg = launcher(cloud)
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
"""


def test_secret_checkers_catch_bad_samples():
    secrets = [f for d in yaml.safe_load_all(BAD_MANIFESTS) for f in literal_secrets(d)]
    assert any("Secret with values" in s for s in secrets)
    assert any("DB_PASSWORD" in s for s in secrets)
    assert any("URL with a password" in s for s in secrets)
    assert any("RAY_AUTH_TOKEN" in s for s in secrets)
    assert len(literal_secrets({"environment": {"MLFLOW_FLASK_SERVER_SECRET_KEY": "abc", "KAGGLE_KEY": "abc"}})) == 2
    assert not literal_secrets({"valueFrom": {"secretKeyRef": {"name": "fakedet-kaggle", "key": "key"}}})
    assert literal_secrets_in_text("export MLFLOW_TRACKING_PASSWORD=hunter2hunter2")
    assert not literal_secrets_in_text('export MLFLOW_TRACKING_PASSWORD="$(cat ~/.secret)"')


def test_credential_mount_checker_catches_bad_samples():
    assert credential_mount_problems([("/home/ubuntu/.fakedet", CLIENT_MOUNT, "ro")], "/home/ubuntu/.fakedet", "/home/ubuntu/.fakedet")
    assert credential_mount_problems([(SHARED, SHARED, "")], "/etc/fakedet/server", "/etc/fakedet/client")
    assert credential_mount_problems([("/etc/fakedet/client", CLIENT_MOUNT, "")], "/etc/fakedet/server", "/etc/fakedet/client")
    assert not credential_mount_problems([("/etc/fakedet/client", CLIENT_MOUNT, "ro")], "/etc/fakedet/server", "/etc/fakedet/client")
