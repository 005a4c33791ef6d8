"""What each part of the deployment may do: the `ray up` head's cloud identity can launch, tag and
terminate this cluster's workers and no more, the workers have none; every Kubernetes pod runs
unprivileged, and only the Ray head holds a service-account token. The checkers also run against
known-bad samples, so a check that cannot fail shows up."""

from __future__ import annotations

import json

from cluster_files import CLUSTER, CLUSTER_README, launcher, load, one, ray_templates

AWS_HEAD_POLICY = CLUSTER / "aws" / "head-iam-policy.json"
GCP_HEAD_ROLE = CLUSTER / "gcp" / "head-role.yaml"
# What Ray 2.60's AWS node provider calls from the head (ray/autoscaler/_private/aws/node_provider.py:
# instances.filter, create_instances, create_tags, terminate_instances, describe_instance_types,
# describe_images), plus reads of the launch's parts; nothing of IAM or S3.
AWS_HEAD_ACTIONS = {"ec2:DescribeInstances", "ec2:DescribeInstanceTypes", "ec2:DescribeImages", "ec2:DescribeSubnets",
                    "ec2:DescribeSecurityGroups", "ec2:DescribeKeyPairs", "ec2:RunInstances", "ec2:CreateTags",
                    "ec2:TerminateInstances"}
INIT_CAPABILITIES = {"CHOWN", "DAC_OVERRIDE", "FOWNER"}  # the shared-folders init container's, and no more


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


# ---------------------------------------------------------------------------------------------------
# ray up: cloud identities
# ---------------------------------------------------------------------------------------------------
def test_aws_head_policy_allows_only_what_the_autoscaler_needs_for_this_cluster():
    from ray.autoscaler.tags import TAG_RAY_CLUSTER_NAME

    cfg = launcher("aws")
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
    cfg = launcher("aws")
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]["node_config"]
    # given, so `ray up` does not make ray-autoscaler-v1 (AmazonEC2FullAccess + AmazonS3FullAccess)
    assert head["IamInstanceProfile"]["Arn"] == "REPLACE_WITH_HEAD_INSTANCE_PROFILE_ARN"
    assert all("IamInstanceProfile" not in t["node_config"] for n, t in types.items() if n != cfg["head_node_type"])
    readme = CLUSTER_README.read_text()
    assert "put-role-policy --role-name fakedet-ray-head" in readme and "head-iam-policy.json" in readme


def test_gcp_head_has_a_narrow_service_account_and_workers_none():
    cfg = launcher("gcp")
    types = cfg["available_node_types"]
    (head_sa,) = types[cfg["head_node_type"]]["node_config"]["serviceAccounts"]
    assert head_sa["email"] == "REPLACE_WITH_HEAD_SERVICE_ACCOUNT_EMAIL"
    assert head_sa["scopes"] == ["https://www.googleapis.com/auth/compute"]
    assert all(t["node_config"].get("serviceAccounts") == [] for n, t in types.items() if n != cfg["head_node_type"]), \
        "workers: no service account (absent would mean the default compute one with its default scopes)"
    assert cfg["provider"].get("cache_stopped_nodes") is False
    permissions = set(load(GCP_HEAD_ROLE)[0]["includedPermissions"])
    assert all(p.startswith("compute.") and "*" not in p for p in permissions)
    # what Ray's GCP node provider calls (gcp/node.py) and instances.insert checks for the worker config
    assert {"compute.instances.create", "compute.instances.delete", "compute.instances.list", "compute.instances.get",
            "compute.instances.setLabels", "compute.zoneOperations.get", "compute.disks.create",
            "compute.subnetworks.use", "compute.instances.setTags"} <= permissions
    assert not {"compute.instances.setServiceAccount", "compute.instances.stop", "compute.instances.start"} & permissions
    readme = CLUSTER_README.read_text()
    assert "--file=cluster/gcp/head-role.yaml" in readme and "service-accounts disable ray-autoscaler-sa-v1" in readme


# ---------------------------------------------------------------------------------------------------
# KubeRay and MLflow pods
# ---------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------
# the checkers themselves fail on bad input
# ---------------------------------------------------------------------------------------------------
def test_privilege_checkers_catch_bad_samples():
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
    root_pod = {"spec": {"containers": [{"name": "c", "securityContext": {"capabilities": {"add": ["NET_ADMIN"]}}}]}}
    problems = " ".join(pod_security_problems(root_pod))
    assert "runAsNonRoot" in problems and "allowPrivilegeEscalation" in problems and "drop" in problems
