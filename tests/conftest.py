"""Shared set-up, as pytest fixtures: toy image sets, the tiny stand-in, and a sweep workspace with the
smoke ablation that the sweep, view and notebook tests read."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fakedet.arrays import ImageSet

REPO = Path(__file__).resolve().parents[1]


def _toy_set(n: int, seed: int = 0, name: str = "toy", real_only: bool = False) -> ImageSet:
    """Images whose class is learnable in a few steps: REAL images are darker on average."""
    rng = np.random.default_rng(seed)
    labels = np.ones(n, np.uint8) if real_only else (np.arange(n) % 2).astype(np.uint8)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    images[labels == 1] //= 2
    return ImageSet(images, labels, name=name)


@pytest.fixture
def toy():
    """`toy(n, seed=0, name="toy", real_only=False)`: a learnable toy ImageSet."""
    return _toy_set


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """The tiny stand-in, generated and prepared once per test session."""
    from fakedet.data import resolve_data

    root = tmp_path_factory.getbasetemp() / "fakedet-data-tiny"
    resolve_data("synthetic", root, size="tiny", show_progress=False)
    return root


def run_cmd(args, timeout=600, **kw) -> subprocess.CompletedProcess:
    """A command as a user runs it: its own process, output captured."""
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="session")
def run():
    """`run(args, timeout=600, **subprocess_kwargs)`: run a command, capture its output."""
    return run_cmd


@dataclass
class SweepWorkspace:
    """One folder for the sweeps of a test session: a prepared-data cache, Ray storage, an MLflow store."""

    root: Path
    ray_tmp: Path

    command = [sys.executable, str(REPO / "sweeps" / "run.py")]

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def storage(self) -> Path:
        return self.root / "ray_results"

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    def args(self, name: str, *extra: str, kind: str = "ablation") -> list[str]:
        """`sweeps/run.py KIND --smoke` in this workspace, with two CPUs for a local Ray."""
        return [*self.command, kind, "--smoke", "--name", name, "--cache-root", str(self.cache),
                "--storage-path", str(self.storage), "--tracking-uri", self.tracking_uri,
                "--ray-temp-dir", str(self.ray_tmp), "--num-cpus", "2", *extra]

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.tracking_uri)

    def runs(self, name: str):
        """(client, parent run, child runs) of the sweep `name`."""
        c = self.client()
        parent = c.search_runs([e.experiment_id for e in c.search_experiments()],
                               filter_string=f"tags.`fakedet.sweep` = '{name}' and tags.`fakedet.kind` = 'sweep'")
        assert len(parent) == 1, f"expected one parent run for {name}, found {len(parent)}"
        parent = parent[0]
        children = c.search_runs([parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        return c, parent, children


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> SweepWorkspace:
    # Ray's socket paths must stay short: its temp dir goes under /tmp directly
    return SweepWorkspace(tmp_path_factory.mktemp("sweep"), Path(tempfile.mkdtemp(prefix="fdray", dir="/tmp")))


@pytest.fixture(scope="session")
def smoke_sweep(workspace):
    """The smoke ablation, run once per session as a user runs it: `sweeps/run.py ablation --smoke`."""
    proc = run_cmd(workspace.args("smoke1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc
