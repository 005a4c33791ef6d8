"""The shared MLflow server, on Kubernetes (cluster/kuberay/mlflow.yaml) and on a `ray up` head
(cluster/mlflow/): basic auth, a PostgreSQL store without a password in its URI, proxied artifacts,
host-header protection on, the users' database made from the same SQL, and the image's MLflow the
clients' MLflow. The checker also runs against known-bad commands."""

from __future__ import annotations

import re
import tomllib
from urllib.parse import urlparse

from cluster_files import CLUSTER, COMPOSE, ROOT, load, mlflow_k8s_command, one


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
    initdb = one("ConfigMap", "mlflow-initdb")["data"]["10-mlflow-auth-db.sql"]
    assert initdb == (CLUSTER / "mlflow" / "initdb" / "10-mlflow-auth-db.sql").read_text()


def test_mlflow_on_a_ray_up_head():
    assert not check_mlflow_server_command(load(COMPOSE)[0]["services"]["mlflow"]["command"])


def test_mlflow_image_pins_the_projects_mlflow_with_auth_and_db_extras():
    text = (CLUSTER / "mlflow" / "Dockerfile").read_text()
    m = re.search(r'"mlflow\[([^\]]+)\]==(3\.17\.\d+)"', text)
    assert m and {"auth", "db"} <= set(m.group(1).split(","))
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "mlflow>=3.17,<3.18" in deps, "the server's MLflow must match the clients' (pyproject.toml)"
    assert "MLFLOW_AUTH_CONFIG_PATH=/opt/mlflow/basic_auth.ini" in text


def test_the_checker_catches_bad_server_commands():
    assert check_mlflow_server_command(["mlflow", "server", "--backend-store-uri=sqlite:///m.db"])
    assert "a password in --backend-store-uri" in check_mlflow_server_command(
        ["mlflow", "server", "--app-name=basic-auth", "--serve-artifacts", "--artifacts-destination=/a",
         "--backend-store-uri=postgresql://u:p@h/d"])
    assert "host-header protection off" in check_mlflow_server_command(
        ["mlflow", "server", "--app-name=basic-auth", "--serve-artifacts", "--artifacts-destination=/a",
         "--backend-store-uri=postgresql://h/d", "--allowed-hosts=*"])
