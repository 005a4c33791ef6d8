"""The `fakedet` command: one subcommand per job; each module adds its own subparsers."""

from __future__ import annotations

import argparse
import os
import sys
from unittest import mock
from dataclasses import dataclass
from pathlib import Path

# the notebook ships with the repository, beside the package (an editable install or a checkout)
REPOSITORY = Path(__file__).resolve().parents[1]
STUDY_VIEWS = REPOSITORY / "notebooks" / "study_views.ipynb"


def build_parser() -> argparse.ArgumentParser:
    from fakedet import __version__
    from fakedet.data import cli as data_cli
    from fakedet import train_cli

    parser = argparse.ArgumentParser(
        prog="fakedet", description="Train, evaluate and sweep small CNN detectors of AI-generated images."
    )
    parser.add_argument("--version", action="version", version=f"fakedet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    data_cli.add_subcommands(sub)  # prepare, make-synthetic
    train_cli.add_subcommands(sub)  # train, predict
    add_report_subcommand(sub)
    return parser


def add_report_subcommand(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report", help="a sweep's report page (one self-contained HTML file), or the study-views notebook run on it",
        description="Write the report page of a sweep's analysis (headlines, cells, cutoffs, figures, run record; "
                    "figures inline, nothing fetched), read from MLflow; with --notebook, run "
                    "notebooks/study_views.ipynb on the sweep from the repository root and write the executed notebook.")
    p.add_argument("--sweep", help="the sweep's name or parent run id (default: the most recent sweep; "
                                   "with --notebook the most recent ablation sweep)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $FAKEDET_TRACKING_URI, $MLFLOW_TRACKING_URI, "
                                          "else the mlflow.db in this folder or the nearest folder above)")
    p.add_argument("--analysis", metavar="VERSION", help="which analysis: v1 (the sweep's own), v2, ... (default: the latest)")
    p.add_argument("--out", metavar="FILE", help="where to write (default: ./<sweep>.report.html; with --notebook "
                                                 "./<sweep>.study_views.ipynb)")
    p.add_argument("--notebook", action="store_true", help="run notebooks/study_views.ipynb on the sweep instead "
                                                           "(needs the notebook extra: pip install -e '.[notebook]')")
    p.add_argument("--list", action="store_true", help="list the store's sweeps and their analyses, and stop")
    p.set_defaults(func=lambda args: run_report(ReportRequest.from_flags(args)))


@dataclass(frozen=True)
class ReportRequest:
    """What `fakedet report` was asked for, parsed once."""

    tracking_uri: str
    sweep: str | None
    analysis: str | None
    out: Path | None
    notebook: bool
    list_only: bool

    @classmethod
    def from_flags(cls, args: argparse.Namespace) -> "ReportRequest":
        from fakedet.results import find_tracking_uri

        return cls(args.tracking_uri or find_tracking_uri(), args.sweep, args.analysis,
                   Path(args.out) if args.out else None, args.notebook, args.list)


def run_report(request: ReportRequest) -> int:
    from mlflow.tracking import MlflowClient

    from fakedet.console import say
    from fakedet.report import headlines, render_report
    from fakedet.results import AnalysisVersion, SweepNotFoundError, analysis_versions, list_sweeps, load_sweep

    try:
        analysis = AnalysisVersion.parse(request.analysis) if request.analysis else None
        if request.list_only:
            sweeps = list_sweeps(request.tracking_uri)
            if sweeps.empty:
                say(f"no sweeps in {request.tracking_uri}")
            client = MlflowClient(request.tracking_uri)
            for row in sweeps.itertuples():
                versions = analysis_versions(client, row.parent_run_id)
                say(f"{row.name}  {row.kind}  {row.status}  {row.cells} cells  started {row.start_time:%Y-%m-%d %H:%M}  "
                    f"analyses: {', '.join(v.name for v in versions) or 'none'}")
            return 0
        if request.notebook:
            return run_notebook(request)
        results = load_sweep(request.tracking_uri, request.sweep, analysis=analysis)
        if not analysis_versions(results.client, results.parent_run_id):
            raise SweepNotFoundError(f"sweep {results.name!r} has no analysis yet; write one with "
                                     f"`python sweeps/run.py cutoff --sweep {results.name} --tracking-uri {request.tracking_uri}`")
    except (SweepNotFoundError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = request.out or Path(f"{results.name}.report.html")
    out.write_text(render_report(results, request.tracking_uri))
    say(f"sweep {results.name}, analysis {results.analysis.name}:")
    for line in headlines(results):
        say(f"headline: {line}")
    say(f"report written to {out.resolve()} (open it in a browser: file://{out.resolve()})")
    return 0


def run_notebook(request: ReportRequest) -> int:
    """Run the study-views notebook on one sweep, its kernel in the repository root (where the sweeps write
    `mlflow.db`), the store and sweep handed to it as FAKEDET_TRACKING_URI, FAKEDET_SWEEP and
    FAKEDET_ANALYSIS; the executed notebook is written to `request.out`."""
    from fakedet.console import say
    from fakedet.results import SweepNotFoundError, list_sweeps

    try:
        import nbformat
        from nbclient import NotebookClient
        from nbclient.exceptions import CellExecutionError
    except ImportError as e:
        raise SweepNotFoundError(f"--notebook needs the notebook extra ({e.name} is missing): pip install -e '.[notebook]'") from None
    if not STUDY_VIEWS.is_file():
        raise FileNotFoundError(f"no notebook at {STUDY_VIEWS}: --notebook runs the one in a checkout of the repository")
    sweep = request.sweep
    if sweep is None:  # the notebook's views are an ablation's (an HPO sweep's cells are single dots)
        sweeps = list_sweeps(request.tracking_uri)
        ablations = sweeps[sweeps["kind"] == "ablation"]
        if ablations.empty:
            raise SweepNotFoundError(f"no ablation sweep in {request.tracking_uri}; name one with --sweep")
        sweep = ablations["name"].iloc[0]
    out = request.out or Path(f"{sweep}.study_views.ipynb")
    nb = nbformat.read(STUDY_VIEWS, as_version=4)
    cells = [c for c in nb.cells if c.cell_type == "code"]
    say(f"running {STUDY_VIEWS.relative_to(REPOSITORY)} on sweep {sweep} ({request.tracking_uri}), "
        f"{len(cells)} cells, from {REPOSITORY}")
    env = {"FAKEDET_TRACKING_URI": request.tracking_uri, "FAKEDET_SWEEP": sweep, "FAKEDET_ANALYSIS": request.analysis or ""}
    done = []

    def progress(cell, cell_index, **_):
        if cell.cell_type == "code":
            done.append(cell_index)
            say(f"[notebook] cell {len(done)}/{len(cells)} done")

    try:
        with mock.patch.dict(os.environ, env):  # the kernel inherits this process's environment
            NotebookClient(nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(REPOSITORY)}},
                           on_cell_executed=progress).execute()
    except CellExecutionError as e:
        nbformat.write(nb, out)
        print(f"error: the notebook stopped at a cell ({str(e).strip().splitlines()[-1]}); what ran is in {out}", file=sys.stderr)
        return 1
    nbformat.write(nb, out)
    say(f"executed notebook written to {out.resolve()} (open it in Jupyter or VS Code; its outputs are saved)")
    return 0


def main(argv: list[str] | None = None) -> int:
    from fakedet.console import robust_output

    robust_output()  # before the parser: --help prints 32×32 and →
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
