from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from fakedet.arrays import ImageSet


def toy_set(n: int, seed: int = 0, name: str = "toy", real_only: bool = False) -> ImageSet:
    """Images whose class is learnable in a few steps: REAL images are darker on average."""
    rng = np.random.default_rng(seed)
    labels = np.ones(n, np.uint8) if real_only else (np.arange(n) % 2).astype(np.uint8)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    images[labels == 1] //= 2
    return ImageSet(images, labels, name=name)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """The tiny stand-in, generated and prepared once per test session."""
    from fakedet.data import resolve_data

    root = tmp_path_factory.getbasetemp() / "fakedet-data-tiny"
    resolve_data("synthetic", root, size="tiny", show_progress=False)
    return root


@pytest.fixture
def toy():
    return toy_set


# ---- a smoke sweep shared by the sweep, notebook and plot tests ------------------------------------
REPO = Path(__file__).resolve().parents[1]
RUN = [sys.executable, str(REPO / "sweeps" / "run.py")]


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    # Ray's socket paths must stay short: its temp dir goes under /tmp directly
    ray_tmp = Path(tempfile.mkdtemp(prefix="fdray", dir="/tmp"))
    yield {"root": root, "cache": root / "cache", "ray_tmp": ray_tmp}


def sweep_args(ws, name: str, *extra: str, kind: str = "ablation") -> list[str]:
    return [*RUN, kind, "--smoke", "--name", name, "--cache-root", str(ws["cache"]),
            "--storage-path", str(ws["root"] / "ray_results"), "--tracking-uri", f"sqlite:///{ws['root'] / 'mlflow.db'}",
            "--ray-temp-dir", str(ws["ray_tmp"]), "--num-cpus", "2", *extra]


def run(args, timeout=600, **kw):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=kw.pop("cwd", None), **kw)


def client(ws):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{ws['root'] / 'mlflow.db'}")


def sweep_runs(ws, name):
    c = client(ws)
    parent = c.search_runs([e.experiment_id for e in c.search_experiments()],
                           filter_string=f"tags.`fakedet.sweep` = '{name}' and tags.`fakedet.kind` = 'sweep'")
    assert len(parent) == 1, f"expected one parent run for {name}, found {len(parent)}"
    parent = parent[0]
    children = c.search_runs([parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return c, parent, children


@pytest.fixture(scope="session")
def smoke_sweep(workspace):
    proc = run(sweep_args(workspace, "smoke1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


