"""Who can reach what: no Service, port or firewall rule of the deployment opens the dashboard, Ray Client,
GCS, MLflow or PostgreSQL to the outside; the clusters' networks let in the cluster itself and SSH from
the operator only; the NetworkPolicies let each pod be reached by its own clients only. The checkers
also run against known-bad samples, so a check that cannot fail shows up."""

from __future__ import annotations

import ipaddress
import re

import pytest
import yaml

from cluster_files import (CLUSTER, CLUSTER_README, COMPOSE, KUBERAY, LAUNCHERS, OPERATOR_CIDR, RAY_POD_LABEL, UP_SH,
                           k8s, k8s_docs, launcher, load, one, ray_templates, readme_command_lines)

PUBLIC_SERVICE_TYPES = {"LoadBalancer", "NodePort"}
PRIVATE_PORTS = {6379, 8265, 10001, 5000, 5432}  # GCS, dashboard, Ray Client, MLflow, PostgreSQL


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


# ---------------------------------------------------------------------------------------------------
# nothing public
# ---------------------------------------------------------------------------------------------------
def test_no_kubernetes_object_is_reachable_from_outside():
    assert not [b for d in k8s_docs() for b in public_exposures(d)]
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


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_launcher_keeps_ray_ports_private(cloud):
    cfg = launcher(cloud)
    assert not open_security_group_rules(cfg["provider"])
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=0.0.0.0" not in head_start and "--dashboard-host=127.0.0.1" in head_start


# ---------------------------------------------------------------------------------------------------
# ray up: security groups and firewall rules
# ---------------------------------------------------------------------------------------------------
def test_network_rules_let_in_the_cluster_and_ssh_from_the_operator_only():
    aws = readme_command_lines("authorize-security-group-ingress")
    gcp = readme_command_lines("firewall-rules create")
    assert len(aws) == 3 and len(gcp) == 2
    assert not network_rule_problems(aws + gcp)
    assert any("--port 2049 --source-group" in l for l in aws), "EFS answers the nodes' group, not the VPC"
    assert all("--network=fakedet" in l and "--target-tags=fakedet-ray" in l for l in gcp)
    assert OPERATOR_CIDR in CLUSTER_README.read_text().split("## Security", 1)[1], "the Security section names it"


def test_aws_nodes_use_the_operators_group_not_rays_default():
    cfg = launcher("aws")
    # Ray's own group always opens SSH to 0.0.0.0/0 (aws/config.py, _create_default_ssh_inbound_rules);
    # SecurityGroupIds on every node type keep `ray up` from making or using it
    assert "security_group" not in cfg["provider"]
    groups = [t["node_config"].get("SecurityGroupIds") for t in cfg["available_node_types"].values()]
    assert all(g == ["REPLACE_WITH_SECURITY_GROUP_ID"] for g in groups)


def test_gcp_nodes_are_on_the_clusters_network_and_tags():
    cfg = launcher("gcp")
    (rule,) = readme_command_lines("subnets create fakedet")
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


# ---------------------------------------------------------------------------------------------------
# KubeRay: NetworkPolicies
# ---------------------------------------------------------------------------------------------------
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
    readme = CLUSTER_README.read_text()
    assert "--namespace kuberay-system" in readme or "-n kuberay-system" in readme
    for rule in (submitter, operator):
        assert [p["port"] for p in rule["ports"]] == [8265], "the dashboard's job API, nothing else"
    assert "kubectl apply -f cluster/kuberay/ray-networkpolicy.yaml" in readme


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


# ---------------------------------------------------------------------------------------------------
# the checkers themselves fail on bad input
# ---------------------------------------------------------------------------------------------------
BAD_MANIFESTS = """
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


def test_network_checkers_catch_bad_samples():
    exposures = [b for d in yaml.safe_load_all(BAD_MANIFESTS) for b in public_exposures(d)]
    assert any("LoadBalancer" in b for b in exposures) and any("NodePort" in b for b in exposures)
    assert any("enableIngress" in b for b in exposures)
    assert open_security_group_rules({"security_group": {"IpPermissions": [
        {"FromPort": 8265, "ToPort": 8265, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]}})
    assert network_rule_problems(["aws ec2 authorize-security-group-ingress --group-id x --protocol tcp --port 22 --cidr 0.0.0.0/0"])
    assert network_rule_problems(["aws ec2 authorize-security-group-ingress --group-id x --protocol tcp --port 2049 --cidr 172.31.0.0/16"])
    assert network_rule_problems([f"gcloud compute firewall-rules create x --allow=tcp --source-ranges={OPERATOR_CIDR}"])
    assert not network_rule_problems([f"gcloud compute firewall-rules create x --allow=tcp:22 --source-ranges={OPERATOR_CIDR}"])
    open_policy = {"spec": {"policyTypes": ["Ingress"], "ingress": [{}, {"from": [{"namespaceSelector": {}}]},
                                                                    {"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}]}}
    assert len(network_policy_problems(open_policy)) >= 4
