"""`fakedet train` (one model on prepared data) and `fakedet predict` (score image files)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fakedet.config import PRESETS, SHUFFLE_MODES, TrainConfig, default_cache_root
from fakedet.data.cli import add_data_arguments
from fakedet.models import ARCHITECTURES, PLACEMENTS

# The evaluation sets of the study (CIFAKE test, CIFAR-100 test, AGIRI test) plus the two validation
# splits a cutoff may be chosen on.
EVAL_SETS = ("cifake_val", "cifake_test", "cifar100_test", "agiri_val", "agiri_test")
SUMMARY_METRICS = ("acc", "f1", "auc", "precision_real", "recall_real", "precision_fake", "recall_fake", "real_recall", "loss")


def parse_points(text: str) -> tuple[float, ...]:
    try:
        points = tuple(float(p) for p in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected epochs separated by commas, e.g. 0.25,0.5,1,2; got {text!r}") from None
    return points


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one model on prepared data and save a checkpoint",
                       description="Train one model with the study's protocol (every option's default is the study's).",
                       epilog="A run whose loss or logits stop being finite ends at the evaluation point that sees it: "
                       "it prints one line saying so, writes the history (with --history) but no checkpoint, and exits 1.")
    add_data_arguments(p)  # --data, --data-size, --cache-root
    p.add_argument("--preset", choices=sorted(PRESETS), help="the study's models: base (10 epochs), srm (SRM at pool1, 10 epochs), mini (1 epoch)")
    p.add_argument("--arch", choices=sorted(ARCHITECTURES))
    p.add_argument("--srm", choices=list(PLACEMENTS), help="SRM placement")
    p.add_argument("--epochs", type=float)
    p.add_argument("--lr", type=float)
    p.add_argument("--momentum", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--shuffle", choices=SHUFFLE_MODES)
    p.add_argument("--seed", type=int)
    p.add_argument("--eval-at", type=parse_points, help="extra evaluation points in epochs, e.g. 0.25,0.5,1,5")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--deterministic", action="store_true", default=None,
                   help="deterministic GPU algorithms: GPU runs repeat bit for bit, a little slower (CPU runs always do)")
    p.add_argument("--cuda-graph", action="store_true", default=None,
                   help="capture the training step into a CUDA graph and replay it (CUDA only; no effect on the CPU)")
    p.add_argument("--out", type=Path, default=Path("checkpoints/model.pt"), help="checkpoint path (default: checkpoints/model.pt)")
    p.add_argument("--history", type=Path, help="also write the evaluation history as JSON here")
    p.add_argument("--smoke", action="store_true", help="tiny data and one epoch: a check that everything runs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_train)

    from fakedet.predict import add_predict_subcommand

    add_predict_subcommand(sub)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = dict(PRESETS[args.preset]) if args.preset else {}
    if args.smoke:
        values["epochs"] = 1
    for name in ("arch", "srm", "epochs", "lr", "momentum", "batch_size", "shuffle", "seed", "eval_at", "device", "deterministic", "cuda_graph"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    check_limits(values)
    return TrainConfig(**values)


def check_limits(values: dict) -> None:
    """The bounds a study's values meet (`fakedet.sweep.study.Limits`: its defaults, since a single run has
    no study file to raise them in), for --epochs and --eval-at: `--epochs 1e9` would otherwise start
    and run for years, saving nothing until its first evaluation point."""
    from fakedet.sweep.study import Limits

    limits, errors = Limits(), []
    epochs = values.get("epochs")
    if isinstance(epochs, (int, float)) and epochs > limits.epochs:
        errors.append(f"--epochs {epochs:g}: more than {limits.epochs} (the study's longest run is 100)")
    points = values.get("eval_at") or ()
    if len(points) > limits.eval_points:
        errors.append(f"--eval-at: {len(points)} points, more than {limits.eval_points}")
    if errors:
        raise ValueError("; ".join(errors))


def run_train(args: argparse.Namespace) -> int:
    import pandas as pd

    from fakedet.data import DataError, cache_hash, load_splits, resolve_data
    from fakedet.models import save_checkpoint
    from fakedet.provenance import run_record
    from fakedet.train import rounding_note, train

    try:
        cfg = config_from_args(args)
    except ValueError as e:
        print(f"fakedet train: {e}", file=sys.stderr)
        return 2
    try:
        cache = resolve_data(args.data, args.cache_root or default_cache_root(), size="tiny" if args.smoke else args.data_size)
    except (DataError, ValueError, FileNotFoundError) as e:
        print(f"fakedet train: {e}", file=sys.stderr)
        return 2
    splits = load_splits(cache)
    eval_sets = {k: splits[k] for k in EVAL_SETS if k in splits}
    print(f"training {cfg.arch} srm={cfg.srm} for {cfg.epochs:g} epochs on {len(splits['cifake_train'])} images "
          f"({args.data}, cache {cache_hash(cache)})", file=sys.stderr)
    note = rounding_note(cfg, len(splits["cifake_train"]))
    if note:
        print(note, file=sys.stderr)
    result = train(cfg, splits["cifake_train"], eval_sets, progress=not args.no_progress)
    record = {"config": cfg.to_dict(), "data": args.data, "data_hash": cache_hash(cache), **run_record(cfg.device)}
    if result.diverged:
        print(f"fakedet train: {divergence_message(result.final)}; no checkpoint written", file=sys.stderr)
        _write_history(args.history, record, result.history)
        return 1

    final = result.final["metrics"]
    rows = {name: {k: m[k] for k in SUMMARY_METRICS if k in m} for name, m in final.items() if name != "train"}
    table = pd.DataFrame(rows).T.reindex(columns=[c for c in SUMMARY_METRICS if any(c in r for r in rows.values())])
    print(f"\nafter {result.final['epoch']:g} epochs (train loss {final['train']['loss']:.4f}):")
    print(table.to_string(float_format=lambda v: f"{v:.4f}"))

    # saved from the CPU, so that the file loads anywhere, also with a plain torch.load on a machine without CUDA
    save_checkpoint(args.out, result.model.cpu(), {**cfg.to_dict(), "record": record})
    print(f"\ncheckpoint: {args.out}")
    _write_history(args.history, record, result.history)
    return 0


def divergence_message(point: dict) -> str:
    """One line on a diverged evaluation point (an `EvalRecord.to_dict()`)."""
    metrics = point["metrics"]
    reasons = [f"training loss {metrics['train']['loss']:g}"]
    sets = [name for name, m in metrics.items() if "nonfinite" in m]
    if sets:
        reasons.append("non-finite logits on " + ", ".join(sets))
    return f"the run diverged at epoch {point['epoch']:g} (step {point['step']}): {'; '.join(reasons)} (a lower --lr may help)"


def _write_history(path: Path | None, record: dict, history: list[dict]) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**record, "history": history}, indent=1))
        print(f"history: {path}")
