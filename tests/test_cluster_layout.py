"""What runs where in cluster/: the files the README names exist and every fill-in value is documented;
the `ray up` clusters and the RayCluster have a CPU-free head and GPU workers, run one image (Ray's
pinned image plus the README's install) and share one storage at the same path; the RayJob runs the
RayCluster's spec and cleans up. Structure and field types are the schemas' (tests/test_cluster_schemas.py);
these are the project's own choices."""

from __future__ import annotations

import json
import re

import pytest

from cluster_files import (CLUSTER, CLUSTER_README, KUBERAY, LAUNCHERS, SHARED, containers, docker_volumes, launcher,
                           load, one, pinned_ray, ray_templates, readme_install, yaml_files)

# The share's folders Ray's containers mount, one by one; its root also holds MLflow's store (mlflow/)
RAY_SHARED_FOLDERS = {f"{SHARED}/{d}" for d in ("ray_results", "cache", "kagglehub", "optuna", "data")}


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
    assert not [f for f in expected if not (CLUSTER / f).is_file()]


# the Kubernetes manifests are parsed and checked by their schemas; these by no schema
@pytest.mark.parametrize("path", [p for p in yaml_files() if p.parent != KUBERAY], ids=lambda p: str(p.relative_to(CLUSTER)))
def test_every_other_yaml_parses_into_mappings(path):
    docs = load(path)
    assert docs and all(isinstance(d, dict) for d in docs), f"{path} is empty or not a mapping"


def test_every_fill_in_value_is_documented():
    readme = CLUSTER_README.read_text()
    markers = {m for p in CLUSTER.rglob("*") if p.is_file() for m in re.findall(r"REPLACE_WITH_[A-Z0-9_]+", p.read_text())}
    assert markers, "expected the configs' fill-in values to be marked REPLACE_WITH_..."
    assert not {m for m in markers if m not in readme}


# ---------------------------------------------------------------------------------------------------
# ray up (AWS, GCP)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_launcher_has_a_head_and_gpu_workers(cloud):
    cfg = launcher(cloud)
    assert cfg["cluster_name"] == "fakedet"  # cluster/mlflow/up.sh's path in the README depends on it
    assert cfg["provider"]["type"] == cloud and cfg["provider"]["region"]
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "trials stay off the head, which runs the driver"
    gpu = [t for name, t in types.items() if name != cfg["head_node_type"] and t["resources"].get("GPU", 0) >= 1]
    assert gpu, "no worker type offers a GPU"
    # fakedet asks for GPUs only if the cluster has one when the sweep starts (fakedet/sweep/plan.py, trial_resources).
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
    cfg = launcher(cloud)
    install = readme_install()
    commands = cfg.get("setup_commands", []) + cfg.get("head_setup_commands", []) + cfg.get("worker_setup_commands", [])
    assert any(install in c for c in commands), f"setup_commands should run the README's `{install}`"
    assert cfg["docker"]["image"] == f"rayproject/ray:{pinned_ray()}-py311-gpu"
    assert cfg["file_mounts"].get("/opt/fakedet-src") == ".", "the checkout is synced from the repository root"


def mount_command(cfg: dict) -> str:
    (cmd,) = [c for c in cfg["initialization_commands"] if f" {SHARED})" in c and "mount -t" in c]
    return cmd


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_launcher_mounts_shared_storage_everywhere(cloud):
    cfg = launcher(cloud)
    shared = {(h, c) for h, c, _ in docker_volumes(cfg) if h.startswith(SHARED)}
    # the folders Ray's jobs use, at the same path in the container, and not the share's root
    assert shared == {(d, d) for d in RAY_SHARED_FOLDERS}
    made = " ".join(c for c in cfg["initialization_commands"] if "install -d -o 1000 -g 100" in c)
    assert all(d in made.split() for d in RAY_SHARED_FOLDERS), "each mounted folder is created for the `ray` user"
    assert {"FAKEDET_CACHE=/mnt/fakedet/cache", "KAGGLEHUB_CACHE=/mnt/fakedet/kagglehub"} <= {
        o.split("--env ", 1)[-1] for o in cfg["docker"]["run_options"]}
    assert "mount -t nfs" in mount_command(cfg) or "mount -t efs" in mount_command(cfg)


def test_aws_mounts_efs_over_tls_and_efs_refuses_clients_without_it():
    cfg = launcher("aws")
    m = re.search(r"mount -t efs -o (\S+) REPLACE_WITH_EFS_ID:/ ", mount_command(cfg))
    assert m and "tls" in m.group(1).split(",") and "notls" not in m.group(1)
    install = " ".join(cfg["initialization_commands"])
    assert re.search(r"efs-utils.*--branch v\d+\.\d+\.\d+", install), "the EFS client is built from a pinned release"
    policy = json.loads((CLUSTER / "aws" / "efs-policy.json").read_text())
    denies = [st for st in policy["Statement"] if st["Effect"] == "Deny"]
    assert any(st["Action"] == "*" and st["Condition"] == {"Bool": {"aws:SecureTransport": "false"}} for st in denies)
    readme = CLUSTER_README.read_text()
    assert "put-file-system-policy" in readme and "file://cluster/aws/efs-policy.json" in readme


def test_fakedet_image_is_rays_image_plus_the_readme_install():
    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.M).group(1)
    assert base == f"rayproject/ray:{pinned_ray()}-py311-gpu"
    assert readme_install() in text
    ignore = [l.strip() for l in (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines() if l.strip()[:1] not in ("", "#")]
    assert ".git" not in ignore, "the image records its commit: keep .git in the build context"
    assert {"data", "cache", "ray_results", "mlflow.db"} <= set(ignore)


# ---------------------------------------------------------------------------------------------------
# KubeRay
# ---------------------------------------------------------------------------------------------------
def test_raycluster_has_a_cpu_free_head_and_gpu_workers_on_one_image():
    spec = one("RayCluster")["spec"]
    assert spec["rayVersion"] == pinned_ray()
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0", "trials stay off the head, which runs the driver"
    ports = {p["containerPort"] for p in containers(head["template"])[0]["ports"]}
    assert {6379, 8265, 10001} <= ports  # GCS, dashboard, Ray Client
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if int(containers(g["template"])[0]["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1]
    assert gpu_groups, "no worker group with an nvidia.com/gpu limit"
    # fakedet asks for GPUs only if the cluster has one when the sweep starts (fakedet/sweep/plan.py, trial_resources).
    assert all(g["minReplicas"] >= 1 and g["maxReplicas"] >= g["minReplicas"] for g in gpu_groups)
    images = {c["image"] for t in ray_templates().values() for c in containers(t)}
    assert len(images) == 1, f"head and workers must run one image, found {images}"


def test_raycluster_pods_share_one_rwx_volume_at_the_same_path():
    pvc = one("PersistentVolumeClaim", "fakedet-shared")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for name, template in ray_templates().items():
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in template["spec"]["volumes"] if "persistentVolumeClaim" in v}
        mounts = {m["mountPath"]: m["name"] for m in containers(template)[0]["volumeMounts"]}
        assert claims.get(mounts.get(SHARED)) == "fakedet-shared", name


def test_rayjob_runs_the_raycluster_spec_and_cleans_up():
    job = one("RayJob")
    assert job["spec"]["rayClusterSpec"] == one("RayCluster")["spec"], "raycluster.yaml and the RayJob drifted apart"
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert job["spec"]["activeDeadlineSeconds"] > 0, "a cost guard"
