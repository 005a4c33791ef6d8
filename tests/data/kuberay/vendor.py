"""Re-vendor KubeRay's CRD schemas from a KubeRay checkout: `python vendor.py KUBERAY_CHECKOUT TAG`.

Writes one JSON file per kind: the `openAPIV3Schema` of the `v1` version of
ray-operator/config/crd/bases/ray.io_<plural>.yaml at TAG, unchanged, with where it came from.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import yaml

KINDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs"}  # the kinds cluster/kuberay/ uses
VERSION = "v1"  # the only ray.io version cluster/kuberay/ uses


def main(checkout: str, tag: str) -> None:
    commit = subprocess.run(["git", "-C", checkout, "rev-parse", f"{tag}^{{commit}}"], capture_output=True,
                            text=True, check=True).stdout.strip()
    for kind, plural in KINDS.items():
        path = f"ray-operator/config/crd/bases/ray.io_{plural}.yaml"
        text = subprocess.run(["git", "-C", checkout, "show", f"{commit}:{path}"], capture_output=True,
                              check=True).stdout
        crd = yaml.safe_load(text)
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == VERSION]
        out = {"source": {"kuberay": tag, "commit": commit, "file": path, "sha256": hashlib.sha256(text).hexdigest(),
                          "version": VERSION, "kind": kind},
               "openAPIV3Schema": version["schema"]["openAPIV3Schema"]}
        target = Path(__file__).with_name(f"ray.io_{VERSION}_{kind}.json")
        target.write_text(json.dumps(out, separators=(",", ":")) + "\n")
        print(f"{target.name}: {path} at {tag} ({commit[:12]})")


if __name__ == "__main__":
    main(*sys.argv[1:])
