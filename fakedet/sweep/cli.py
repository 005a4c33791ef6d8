"""`python sweeps/run.py ablation|hpo|cutoff`: the sweep command line."""

from __future__ import annotations

import argparse
import sys


def _number(text: str) -> int | float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    return int(value) if text.strip().lstrip("+-").isdigit() else value


def _list(item_type):
    def parse(text: str) -> list:
        items = [t for t in text.replace(" ", ",").split(",") if t]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        return [item_type(t) for t in items]

    return parse


def build_parser() -> argparse.ArgumentParser:
    from fakedet.config import default_cache_root

    parser = argparse.ArgumentParser(prog="sweeps/run.py", description="Sweeps of CIFAKE-trained detectors on Ray Tune, Optuna and MLflow.")
    sub = parser.add_subparsers(dest="kind", required=True, metavar="{ablation,hpo,cutoff}")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--study", help="study file (default: sweeps/<command>.toml)")
        p.add_argument("--data", default="synthetic", help="synthetic (built-in stand-in, default), kaggle, or PATH (prepared cache or folder of sources)")
        p.add_argument("--cache-root", help=f"prepared-data cache (default: {default_cache_root()})")
        p.add_argument("--smoke", action="store_true", help="the study's smoke preset: tiny grid, small stand-in, about two minutes on 2 cores")
        p.add_argument("--name", help="sweep name (default: <study>-<date>-<time>); names the Ray experiment and the MLflow parent run")
        p.add_argument("--resume", nargs="?", const="latest", metavar="NAME", help="continue an interrupted sweep (default: the latest)")
        p.add_argument("--address", help="join a Ray cluster (e.g. auto, or ray://host:10001); default: start a local Ray")
        p.add_argument("--num-cpus", type=int, help="CPUs for a local Ray (default: all)")
        p.add_argument("--ray-temp-dir", help="temp dir for a local Ray")
        p.add_argument("--storage-path", help="Ray Tune results and checkpoints (default: ./ray_results; shared storage on a multi-node cluster)")
        p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///./mlflow.db)")
        p.add_argument("--experiment", help="MLflow experiment (default: the study's name)")
        p.add_argument("--gpus-per-trial", type=float, help="GPU fraction per trial where GPUs exist (default: the study's, 0.25)")
        p.add_argument("--cpus-per-trial", type=float, help="CPUs per trial (default: the study's, 1)")
        p.add_argument("--max-concurrent", type=int, help="at most this many trials at once")
        p.add_argument("--verbose", action="store_true", help="show the trials' own output")
        p.add_argument("--crash-once-after-step", type=int, help=argparse.SUPPRESS)  # fault injection for tests

    p = sub.add_parser("ablation", help="SRM placement × epochs × learning rate × seeds")
    common(p)
    p.add_argument("--srm", type=_list(str), help="placements, e.g. none,pool1,pool2")
    p.add_argument("--epochs", type=_list(_number), help="epoch counts, e.g. 1,10,50,100 (cells share one trajectory per placement/lr/seed)")
    p.add_argument("--lr", type=_list(_number), help="learning rates, e.g. 1e-4,1e-3,1e-2")
    p.add_argument("--seeds", type=int, help="seeds per cell (11, 12, ...)")
    p.add_argument("--eval-at", type=_list(_number), help="extra evaluation points in epochs")

    p = sub.add_parser("hpo", help="Optuna TPE (through Ray Tune's OptunaSearch) with ASHA stopping")
    common(p)
    p.add_argument("--objective", help="metric to optimise (default: the study's, agiri_val/auc)")
    p.add_argument("--optuna-storage", help="Optuna storage URL (default: sqlite:///./optuna.db)")

    p = sub.add_parser("cutoff", help="training-length cutoffs of a finished sweep, from MLflow")
    p.add_argument("--sweep", required=True, help="the sweep's name (or its MLflow parent run id)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///./mlflow.db)")
    p.add_argument("--study", help="study file whose [cutoff] settings to use (default: the sweep's)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from fakedet.data import DataError
    from fakedet.sweep.study import StudyError

    args = build_parser().parse_args(argv)
    try:
        if args.kind == "cutoff":
            from fakedet.sweep.runner import run_cutoff

            return run_cutoff(args)
        from fakedet.sweep.runner import run_study

        return run_study(args.kind, args)
    except (StudyError, DataError, ConnectionError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
