"""Every notebook in notebooks/ runs top to bottom against the shared smoke sweep, and is stored without outputs.

The kernel is `python3`, which ipykernel installs as package data in the environment's own
share/jupyter/kernels (no `ipykernel install --user` needed), and jupyter_client starts it with the
interpreter running the tests; it inherits the environment variables that point the notebook at the store.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no notebook"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_has_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, cell in enumerate(nb.cells)
             if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)]
    assert not dirty, f"{path.name}: cells {dirty} hold outputs or execution counts; clear them before committing"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"


def execute(path: Path, cwd: Path, timeout: int = 300):
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(path, as_version=4)
    try:
        NotebookClient(nb, kernel_name="python3", timeout=timeout, resources={"metadata": {"path": str(cwd)}}).execute()
    except CellExecutionError as e:
        pytest.fail(f"{path.name} failed:\n{str(e)[-3000:]}")
    return nb


def tagged(nb, tag: str):
    cells = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
    return cells[0]


def result(cell, mime: str) -> str:
    data = [o["data"][mime] for o in cell.outputs if o.output_type in ("execute_result", "display_data") and mime in o.get("data", {})]
    assert data, f"cell {cell.metadata.get('tags')} shows no {mime}; its outputs: {[o.output_type for o in cell.outputs]}"
    return data[-1]


def html_rows(html: str) -> int:
    body = re.search(r"<tbody>(.*?)</tbody>", html, re.S)
    return body.group(1).count("<tr") if body else 0


@pytest.fixture(scope="module")
def executed(workspace, smoke_sweep, tmp_path_factory):
    """Run each notebook once against the smoke sweep's store, from an empty folder (nothing is found
    by accident in the repository); the executed notebooks by path."""
    done = {}

    def run(path: Path):
        if path not in done:
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("FAKEDET_TRACKING_URI", workspace.tracking_uri)
                # the shared store also holds the other tests' sweeps: name the one to show
                mp.setenv("FAKEDET_SWEEP", "smoke1")
                done[path] = execute(path, tmp_path_factory.mktemp("notebook"))
        return done[path]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_without_errors(path, executed):
    nb = executed(path)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, [f"{e.ename}: {e.evalue}" for e in errors]


@pytest.mark.slow
def test_study_views_notebook_shows_the_smoke_sweep(executed):
    nb = executed(REPO / "notebooks" / "study_views.ipynb")
    load = "".join(o.get("text", "") for o in tagged(nb, "load").outputs if o.output_type == "stream")
    assert "sweep 'smoke1'" in load and "12 cells (12 finished)" in load and "analysis v" in load
    # it opens with the answers: the first output after the sweep's line is the headline per question
    first = next(c for c in nb.cells[nb.cells.index(tagged(nb, "load")) + 1:] if c.cell_type == "code")
    assert first is tagged(nb, "headline") and "along training" in result(first, "text/markdown")
    # smoke grid: srm {none, pool1} × epochs {1, 2} × 3 seeds: twelve cells, each with a max and a min row in table 3
    for tag, rows, column in (("table2", 12, "precision_fake"), ("table3", 24, "fine_class"), ("table4", 12, "recall_real")):
        html = result(tagged(nb, tag), "text/html")
        assert html_rows(html) == rows, tag
        assert f"<th>{column}</th>" in html, tag
    for tag in ("figure4", "figure5", "figure5_agiri", "transfer_scatter", "cutoff_curves"):
        png = result(tagged(nb, tag), "image/png")
        assert len(png) > 5000, tag  # base64 of a rendered figure, not an empty canvas
        assert not [o for o in tagged(nb, tag).outputs if o.output_type == "display_data"], f"{tag} shown twice"
    # spearman rows: 3 intrinsic × 4 transfer × scopes (epochs=1, epochs=2, cells, within and their |trained variants that have cells)
    corr = result(tagged(nb, "correlations"), "text/html")
    shape = re.search(r"<p>(\d+) rows × (\d+) columns</p>", corr)  # pandas shows a long table's shape
    rows = int(shape.group(1)) if shape else html_rows(corr)
    assert rows % 12 == 0 and rows >= 48 and "<th>ci_low</th>" in corr
    assert html_rows(result(tagged(nb, "cells_summary"), "text/html")) == 4 and "<th>n_seeds</th>" in result(tagged(nb, "cells_summary"), "text/html")
    assert "eta_sq" in result(tagged(nb, "variance"), "text/html")
    assert len(result(tagged(nb, "seed_spread"), "image/png")) > 5000
    assert "mean_diff" in result(tagged(nb, "cutoff_comparison"), "text/html")
    assert "transfer_val" in result(tagged(nb, "cutoff_summary"), "text/html")
    assert len(result(tagged(nb, "explain"), "image/png")) > 5000  # where the detectors look
    assert "cifake_test/cam_bg_share_fake" in result(tagged(nb, "explain_table"), "text/html")


@pytest.mark.slow
def test_report_notebook_command_runs_it_on_the_latest_ablation(workspace, smoke_sweep, tmp_path, run):
    """`fakedet report --notebook`, run as a user would from anywhere: the kernel starts in the repository
    root, the store is the one named, the sweep the most recent ablation (never an HPO sweep)."""
    out = tmp_path / "views.ipynb"
    proc = run([sys.executable, "-m", "fakedet", "report", "--notebook", "--tracking-uri", workspace.tracking_uri,
                "--out", str(out)], cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"from {REPO}" in proc.stdout and str(out) in proc.stdout
    nb = nbformat.read(out, as_version=4)
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    load = "".join(o.get("text", "") for o in tagged(nb, "load").outputs if o.output_type == "stream")
    assert "(ablation)" in load and "along training" in result(tagged(nb, "headline"), "text/markdown")
