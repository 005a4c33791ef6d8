"""The deployment's files against the schemas of the programs that read them, strictly (an unknown or
misspelt field is refused):

- every core object in cluster/kuberay/ against the Kubernetes JSON schemas (kubernetes-validate);
- every RayCluster and RayJob against KubeRay's own CRD schema: the `openAPIV3Schema` of `ray.io/v1`,
  vendored in tests/data/kuberay/ from the KubeRay release cluster/README.md installs. The API server
  applies it with `kubectl apply`'s strict field validation, so here every object that lists its
  properties refuses others (unless it preserves unknown fields), `x-kubernetes-list-type` map/set
  refuse duplicate entries, and `nullable` admits null. Its metadata is checked as ObjectMeta and its
  pod templates as the Pods KubeRay makes of them. CEL rules (`x-kubernetes-validations`) are not
  evaluated here: a test keeps the fields that carry them unset;
- both `ray up` configs against Ray's own schema (the check `ray up` runs first).

Each validator is also shown broken copies, and must refuse each for the reason planted.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections import Counter
from pathlib import Path

import jsonschema
import pytest

from cluster_files import LAUNCHERS, k8s_docs, launcher, readme_command_lines

kubernetes_validate = pytest.importorskip("kubernetes_validate")

K8S_VERSION = kubernetes_validate.latest_version()  # the newest Kubernetes the package ships schemas for
KUBERAY_SCHEMAS = Path(__file__).resolve().parent / "data" / "kuberay"

DOCS = [(f"{d['kind']}/{d['metadata']['name']}", d) for d in k8s_docs()]


def is_kuberay(doc: dict) -> bool:
    return doc["apiVersion"].startswith("ray.io/")


def the(kind: str) -> dict:
    (doc,) = [d for _, d in DOCS if d["kind"] == kind]
    return copy.deepcopy(doc)


# ---------------------------------------------------------------------------------------------------
# KubeRay's CRD schema, as the API server applies it
# ---------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def vendored(api_version: str, kind: str) -> dict:
    """tests/data/kuberay/<group>_<version>_<kind>.json: {source, openAPIV3Schema}."""
    group, version = api_version.split("/")
    path = KUBERAY_SCHEMAS / f"{group}_{version}_{kind}.json"
    assert path.is_file(), f"no KubeRay schema for {api_version} {kind} in tests/data/kuberay/ (see its README)"
    return json.loads(path.read_text())


# keywords whose values are data, not schemas
DATA_KEYWORDS = {"default", "enum", "example", "required", "x-kubernetes-validations", "x-kubernetes-list-map-keys"}


def strict(schema):
    """The schema as strict field validation applies it: an object that lists its properties admits no
    other unless it preserves unknown fields; `nullable: true` admits null."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: ({n: strict(s) for n, s in v.items()} if k == "properties" else v if k in DATA_KEYWORDS else strict(v))
           for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


def list_type(validator, kind, instance, schema):
    """`x-kubernetes-list-type`: the API server refuses a `set` with a repeated item and a `map` with two
    entries of one key (an entry without a key field takes that field's default, as the server defaults
    it before it checks)."""
    if not validator.is_type(instance, "array") or kind not in ("set", "map"):
        return
    if kind == "set":
        keys = [json.dumps(item, sort_keys=True) for item in instance]
    else:
        fields = schema.get("x-kubernetes-list-map-keys", [])
        defaults = {f: s.get("default") for f, s in schema.get("items", {}).get("properties", {}).items()}
        keys = [tuple(item.get(f, defaults.get(f)) for f in fields) for item in instance if isinstance(item, dict)]
    for key, n in Counter(keys).items():
        if n > 1:
            yield jsonschema.ValidationError(f"duplicate entry {key} in a list of type {kind}")


# OpenAPI 3.0's schema objects are JSON Schema draft 4-5 with extensions
KubernetesSchemaValidator = jsonschema.validators.extend(jsonschema.Draft4Validator, {"x-kubernetes-list-type": list_type})


@functools.lru_cache(maxsize=None)
def kuberay_validator(api_version: str, kind: str):
    return KubernetesSchemaValidator(strict(vendored(api_version, kind)["openAPIV3Schema"]))


def schema_errors(validator, doc: dict) -> list[str]:
    errors = sorted(validator.iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path])
    return [f"{'.'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}" for e in errors]


def kuberay_errors(doc: dict) -> list[str]:
    return schema_errors(kuberay_validator(doc["apiVersion"], doc["kind"]), doc)


def core_objects(doc: dict) -> list[dict]:
    """What the Kubernetes schemas check: the object itself; for a KubeRay resource, its metadata (as
    ObjectMeta, on a carrier ConfigMap) and its pod templates (as PodTemplates)."""
    if not is_kuberay(doc):
        return [doc]
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    return [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]}] + [
        {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"{doc['metadata']['name']}-{i}"}, "template": t}
        for i, t in enumerate(templates)]


def validate(doc: dict) -> None:
    """Raises unless `doc` passes every schema that applies to it."""
    if is_kuberay(doc):
        errors = kuberay_errors(doc)
        assert not errors, "KubeRay's schema refuses it:\n" + "\n".join(errors)
    for obj in core_objects(doc):
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_every_kind_is_covered():
    kinds = {d["kind"] for _, d in DOCS}
    assert {"Deployment", "StatefulSet", "Service", "NetworkPolicy", "PersistentVolumeClaim", "Job", "ConfigMap",
            "RayCluster", "RayJob"} <= kinds


@pytest.mark.parametrize("where, doc", DOCS, ids=[w for w, _ in DOCS])
def test_manifest_passes_its_schemas(where, doc):
    validate(doc)


def test_the_vendored_schemas_are_of_the_operator_the_readme_installs():
    (helm,) = readme_command_lines("helm install kuberay-operator")
    installed = re.search(r"--version (\S+)", helm).group(1)
    for api_version, kind in sorted({(d["apiVersion"], d["kind"]) for _, d in DOCS if is_kuberay(d)}):
        source = vendored(api_version, kind)["source"]
        assert source["kuberay"] == f"v{installed}", (kind, source)
        assert (source["kind"], f"ray.io/{source['version']}") == (kind, api_version)
        assert source["file"] == f"ray-operator/config/crd/bases/ray.io_{kind.lower()}s.yaml"


def cel_rule_fields(schema: dict, path: tuple = ()) -> list[tuple]:
    """The fields that carry CEL rules (`x-kubernetes-validations`), which jsonschema does not evaluate;
    `[]` stands for every item of a list."""
    found = [path] if "x-kubernetes-validations" in schema else []
    for name, sub in schema.get("properties", {}).items():
        found += cel_rule_fields(sub, path + (name,))
    if isinstance(schema.get("items"), dict):
        found += cel_rule_fields(schema["items"], path + ("[]",))
    return found


def is_set(doc, path: tuple) -> bool:
    if not path:
        return True
    if path[0] == "[]":
        return isinstance(doc, list) and any(is_set(item, path[1:]) for item in doc)
    return isinstance(doc, dict) and path[0] in doc and is_set(doc[path[0]], path[1:])


def fields_with_unchecked_rules(doc: dict) -> list[str]:
    schema = vendored(doc["apiVersion"], doc["kind"])["openAPIV3Schema"]
    return [".".join(p) for p in cel_rule_fields(schema) if is_set(doc, p)]


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_no_manifest_sets_a_field_whose_rules_go_unchecked(kind):
    doc = the(kind)
    assert not fields_with_unchecked_rules(doc)
    doc["spec"]["managedBy"] = "ray.io/kuberay-operator"  # a field with CEL rules in both kinds
    assert fields_with_unchecked_rules(doc) == ["spec.managedBy"]


# ---------------------------------------------------------------------------------------------------
# the validators refuse broken copies, each for the reason planted
# ---------------------------------------------------------------------------------------------------
def head_container(doc: dict) -> dict:
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    return spec["headGroupSpec"]["template"]["spec"]["containers"][0]


def misspelt_spec_field(rc):
    rc["spec"]["workerGroupSpec"] = rc["spec"].pop("workerGroupSpecs")


def misspelt_container_field(rc):
    head_container(rc)["imagePullPolcy"] = "Always"


def replicas_as_a_string(rc):
    rc["spec"]["workerGroupSpecs"][0]["minReplicas"] = "1"


def no_head_group(rc):
    del rc["spec"]["headGroupSpec"]


def unknown_auth_mode(rc):
    rc["spec"]["authOptions"]["mode"] = "tokens"


def one_port_twice(rc):
    ports = head_container(rc)["ports"]
    ports.append({**ports[0], "name": "again"})  # same containerPort, protocol defaulted to TCP on both


def misspelt_rayjob_field(job):
    job["spec"]["shutdownAfterJobFinish"] = job["spec"].pop("shutdownAfterJobFinishes")


def entrypoint_as_a_list(job):
    job["spec"]["entrypoint"] = job["spec"]["entrypoint"].split()


def rayjob_worker_without_a_group_name(job):
    del job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"]


BROKEN = [  # (kind, break it, where the error is, what it says)
    ("RayCluster", misspelt_spec_field, "spec", "'workerGroupSpec' was unexpected"),
    ("RayCluster", misspelt_container_field, "spec.headGroupSpec.template.spec.containers.0", "'imagePullPolcy' was unexpected"),
    ("RayCluster", replicas_as_a_string, "spec.workerGroupSpecs.0.minReplicas", "'1' is not of type 'integer'"),
    ("RayCluster", no_head_group, "spec", "'headGroupSpec' is a required property"),
    ("RayCluster", unknown_auth_mode, "spec.authOptions.mode", "'tokens' is not one of ['disabled', 'token']"),
    ("RayCluster", one_port_twice, "spec.headGroupSpec.template.spec.containers.0.ports", "duplicate entry (6379, 'TCP')"),
    ("RayJob", misspelt_rayjob_field, "spec", "'shutdownAfterJobFinish' was unexpected"),
    ("RayJob", entrypoint_as_a_list, "spec.entrypoint", "is not of type 'string'"),
    ("RayJob", rayjob_worker_without_a_group_name, "spec.rayClusterSpec.workerGroupSpecs.0", "'groupName' is a required property"),
]


@pytest.mark.parametrize("kind, breaks, where, says", BROKEN, ids=[b.__name__ for _, b, _, _ in BROKEN])
def test_kuberays_schema_refuses_a_broken_copy(kind, breaks, where, says):
    doc = the(kind)
    assert not kuberay_errors(doc)
    breaks(doc)
    errors = kuberay_errors(doc)
    assert [e for e in errors if e.startswith(f"{where}: ") and says in e], errors
    with pytest.raises(AssertionError, match="KubeRay's schema refuses it"):
        validate(doc)


def test_unknown_fields_are_refused_by_strictness_not_by_the_upstream_schema():
    # Without strict field validation the API server prunes an unknown field silently: the upstream
    # schema as written accepts the misspelling, the strict reading refuses it.
    rc = the("RayCluster")
    misspelt_container_field(rc)
    upstream = KubernetesSchemaValidator(vendored("ray.io/v1", "RayCluster")["openAPIV3Schema"])
    assert not schema_errors(upstream, rc)
    assert kuberay_errors(rc)


def test_a_kuberay_version_without_a_vendored_schema_is_refused():
    rc = the("RayCluster")
    rc["apiVersion"] = "ray.io/v1alpha1"
    with pytest.raises(AssertionError, match="no KubeRay schema for ray.io/v1alpha1 RayCluster"):
        validate(rc)


def test_the_kubernetes_schemas_refuse_broken_copies():
    misspelt = the("Deployment")
    misspelt["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    wrong_type = the("Deployment")
    wrong_type["spec"]["replicas"] = "one"
    bad_label = the("RayCluster")  # metadata is ObjectMeta: label values are strings
    bad_label["metadata"]["labels"] = {"replicas": 2}
    for broken in (misspelt, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            validate(broken)
    assert not kuberay_errors(bad_label), "the CRD leaves metadata to ObjectMeta"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(bad_label)


# ---------------------------------------------------------------------------------------------------
# ray up: Ray's own schema
# ---------------------------------------------------------------------------------------------------
def ray_up_validate(cfg: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cfg)))  # what `ray up` does first


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_launcher_passes_rays_own_schema(cloud):
    ray_up_validate(launcher(cloud))


def test_rays_schema_refuses_a_broken_launcher():
    cfg = copy.deepcopy(launcher("aws"))
    cfg["max_worker"] = cfg.pop("max_workers")
    with pytest.raises(jsonschema.ValidationError, match="'max_worker' was unexpected"):
        ray_up_validate(cfg)
