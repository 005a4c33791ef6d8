"""The deployment in cluster/ as the tests/test_cluster_*.py files read it: where each file is, its parsed
documents, and the few facts several subjects share (the shared mount, the README's install, Ray's pin)."""

from __future__ import annotations

import functools
import re
import textwrap
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
CLUSTER_README = CLUSTER / "README.md"
LAUNCHERS = {"aws": CLUSTER / "aws" / "ray-cluster.yaml", "gcp": CLUSTER / "gcp" / "ray-cluster.yaml"}
KUBERAY = CLUSTER / "kuberay"
COMPOSE = CLUSTER / "mlflow" / "docker-compose.yml"
UP_SH = CLUSTER / "mlflow" / "up.sh"
SHARED = "/mnt/fakedet"  # the shared storage's mount point, the same on every node and pod
# where Ray's container on the head finds the driver's MLflow login (the README's `. ~/.fakedet/mlflow-client.env`)
CLIENT_MOUNT = "/home/ray/.fakedet"
OPERATOR_CIDR = "REPLACE_WITH_OPERATOR_CIDR"
# The label the Ray pods carry and the NetworkPolicies select (cluster/kuberay/ray-networkpolicy.yaml)
RAY_POD_LABEL = ("app.kubernetes.io/part-of", "fakedet-ray")


def yaml_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))


@functools.lru_cache(maxsize=None)
def load(path: Path) -> tuple:
    with open(path) as f:
        return tuple(d for d in yaml.safe_load_all(f) if d is not None)


def launcher(cloud: str) -> dict:
    """A `ray up` config, as parsed."""
    return load(LAUNCHERS[cloud])[0]


def k8s_docs() -> list[dict]:
    return [d for p in sorted(KUBERAY.glob("*.yaml")) for d in load(p)]


def k8s(kind: str, name: str | None = None) -> list[dict]:
    return [d for d in k8s_docs() if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)]


def one(kind: str, name: str | None = None) -> dict:
    found = k8s(kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''} in cluster/kuberay, found {len(found)}"
    return found[0]


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def ray_templates() -> dict[str, dict]:
    """The RayCluster's pod templates by group: `head` and each worker group's name."""
    spec = one("RayCluster")["spec"]
    return {"head": spec["headGroupSpec"]["template"], **{g["groupName"]: g["template"] for g in spec["workerGroupSpecs"]}}


def mlflow_k8s_command() -> list[str]:
    return containers(one("Deployment", "mlflow")["spec"]["template"])[0]["command"]


def docker_volumes(cfg: dict) -> list[tuple[str, str, str]]:
    """(host path, container path, options) of every `--volume` in a `ray up` config's docker.run_options."""
    found = []
    for option in cfg["docker"]["run_options"]:
        m = re.fullmatch(r"(?:--volume|-v)[ =](\S+)", option.strip())
        if m:
            host, container, *opts = m.group(1).split(":")
            found.append((host, container, ",".join(opts)))
    return found


def shell_default(script: str, variable: str) -> str:
    """The default of `variable="${OVERRIDE:-default}"` in a shell script."""
    m = re.search(rf'^{variable}="\$\{{[A-Z_]+:-([^}}]+)\}}"', script, re.M)
    assert m, f"{variable}=\"${{...:-...}}\" not found"
    return m.group(1)


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


FENCE = re.compile(r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```", re.S | re.M)  # fenced blocks, in lists too


def markdown_code(text: str) -> list[str]:
    """Fenced blocks, then inline code spans outside them."""
    fenced = [textwrap.dedent(b) for b in FENCE.findall(text)]
    return fenced + re.findall(r"`([^`\n]+)`", FENCE.sub("", text))


def readme_command_lines(needle: str) -> list[str]:
    """The command lines of cluster/README.md's code that contain `needle`, continuation lines joined."""
    return [l.strip() for b in markdown_code(CLUSTER_README.read_text()) for l in b.replace("\\\n", " ").splitlines()
            if needle in l]
