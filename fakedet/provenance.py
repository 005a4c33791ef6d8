"""What every run records about itself: code version, library versions, hardware."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

TRACKED_PACKAGES = ("fakedet", "torch", "torchvision", "numpy", "ray", "mlflow", "optuna", "pandas", "scikit-learn", "kagglehub")


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """`<git sha>` (with `-dirty` when the tree has uncommitted changes), or the package version outside git."""
    repo = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from fakedet import __version__

        return f"fakedet-{__version__}"


def library_versions() -> dict[str, str]:
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    versions["python"] = platform.python_version()
    return versions


def hardware(device: torch.device | str | None = None) -> dict[str, str]:
    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "cuda_available": str(torch.cuda.is_available()),
    }
    if torch.cuda.is_available():
        index = torch.device(device).index if device is not None and torch.device(device).type == "cuda" else None
        info["gpu"] = torch.cuda.get_device_name(index or 0)
        info["cuda"] = str(torch.version.cuda)
    return info


def run_record(device: torch.device | str | None = None) -> dict[str, object]:
    return {"code_version": code_version(), "versions": library_versions(), "hardware": hardware(device)}
