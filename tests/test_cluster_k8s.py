"""The Kubernetes manifests in cluster/kuberay/ against the Kubernetes JSON schemas (kubernetes-validate,
strict: an unknown or misspelt field is refused). No registry package ships KubeRay's CRD schema, so
a RayCluster or RayJob is checked through its embedded core parts: each pod template as a PodTemplate.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")

KUBERAY = Path(__file__).resolve().parents[1] / "cluster" / "kuberay"
K8S_VERSION = kubernetes_validate.latest_version()  # the newest Kubernetes the package ships schemas for


def documents() -> list[tuple[str, dict]]:
    return [(f"{p.name}:{d['kind']}/{d['metadata']['name']}", d) for p in sorted(KUBERAY.glob("*.yaml"))
            for d in yaml.safe_load_all(p.read_text()) if d]


def core_objects(doc: dict) -> list[dict]:
    """What the Kubernetes schemas can check: the object itself, or a KubeRay resource's pod templates."""
    if not doc["apiVersion"].startswith("ray.io/"):
        return [doc]
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    return [{"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"{doc['metadata']['name']}-{i}"},
             "template": t} for i, t in enumerate(templates)]


DOCS = documents()


def test_every_kind_is_covered():
    kinds = {d["kind"] for _, d in DOCS}
    assert {"Deployment", "StatefulSet", "Service", "NetworkPolicy", "PersistentVolumeClaim", "Job", "ConfigMap",
            "RayCluster", "RayJob"} <= kinds


@pytest.mark.parametrize("where, doc", DOCS, ids=[w for w, _ in DOCS])
def test_manifest_passes_the_kubernetes_schema(where, doc):
    for obj in core_objects(doc):
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_the_validator_refuses_broken_copies():
    (deployment,) = [d for _, d in DOCS if d["kind"] == "Deployment"]
    misspelt = copy.deepcopy(deployment)
    misspelt["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "one"
    (raycluster,) = [d for _, d in DOCS if d["kind"] == "RayCluster"]
    bad_pod = copy.deepcopy(raycluster)
    bad_pod["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "http"
    for broken in (misspelt, wrong_type, bad_pod):
        with pytest.raises(kubernetes_validate.ValidationError):
            for obj in core_objects(broken):
                kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
