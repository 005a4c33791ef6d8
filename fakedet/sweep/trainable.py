"""The Ray Tune trainable: a thin adapter that runs `fakedet.train.train` on a `TrialSpec` and reports
every evaluation point.

Each report carries a checkpoint (the resumable training state), so a crashed trial is retried from its
last evaluation point. At a cell's epoch count the checkpoint also holds that cell's artifacts
(model weights, threshold curves, confusion matrices, CIFAR-100 per-class recall), which the driver
logs to the cell's MLflow run.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray import tune

from fakedet.arrays import ImageSet
from fakedet.config import TrainConfig
from fakedet.metrics import best_worst_classes, confusion, per_class_recall, plot_threshold_curves, threshold_table
from fakedet.models import save_checkpoint
from fakedet.sweep.spec import CELL_ARTIFACTS, Cell, TrialSpec, fmt_epochs, resolve_trial
from fakedet.train import BatchSchedule, EvalRecord, total_steps, train

STATE_FILE = "state.pt"
# Evaluation sets at every point: CIFAKE test (intrinsic) and validation, CIFAR-100 test (and its JPEG
# round-trip copy), AGIRI test and transfer-validation.
SWEEP_EVAL_SETS = ("cifake_val", "cifake_test", "cifar100_test", "agiri_val", "agiri_test", "cifar100_test_jpeg")


def run_trial(config: dict[str, Any], splits: dict[str, ImageSet], template: TrialSpec | None = None) -> None:
    """Ray Tune function trainable. `splits` and `template` (HPO) arrive through `tune.with_parameters` (object store)."""
    spec = resolve_trial(config, template)
    (trajectory,) = spec.trajectories  # one model per trial
    cfg = trajectory.config
    # the Ray node this trial runs on: nodes of one host share an IP, not an id
    node_id = ray.get_runtime_context().get_node_id()
    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            resume = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
    eval_sets = {k: splits[k] for k in SWEEP_EVAL_SETS if k in splits}
    train_set = splits["cifake_train"]
    total = total_steps(cfg, BatchSchedule(len(train_set), cfg.batch_size, cfg.shuffle, cfg.seed).steps_per_epoch)

    def on_eval(record: EvalRecord, snapshot) -> None:
        state = snapshot()
        with tempfile.TemporaryDirectory(prefix="fakedet-ckpt-") as d:
            torch.save(state, Path(d) / STATE_FILE)
            done = [c for c in trajectory.cells if _same_epoch(c.epochs, record.epoch)]
            for cell in done:
                write_cell_artifacts(Path(d) / CELL_ARTIFACTS / fmt_epochs(cell.epochs), record, eval_sets, state["model"], cell)
            result = {**record.flat(), "epoch": record.epoch, "step": record.step, "total_steps": total,
                      "cells_done": [c.epochs for c in done], "node_id": node_id}
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(d))
        if spec.faults is not None:
            spec.faults.maybe_crash(record.step)

    train(cfg, train_set, eval_sets, on_eval=on_eval, resume=resume)


def _same_epoch(a: float, b: float) -> bool:
    return abs(a - b) < 1e-9 * max(1.0, abs(a))


def write_cell_artifacts(out: Path, record: EvalRecord, eval_sets: dict[str, ImageSet], model_state: dict, cell: Cell) -> None:
    """What a cell's MLflow run holds besides metrics, computed from the logits at the cell's epoch."""
    cfg: TrainConfig = cell.config
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / "model.pt", model_state, cfg.to_dict())
    for name, image_set in eval_sets.items():
        logits = record.logits[name]
        p_real = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
        if image_set.real_only:
            if image_set.fine is not None and image_set.fine_names is not None:
                per_class_recall(p_real, image_set.fine, image_set.fine_names).to_csv(out / f"{name}_recall_fine.csv", index=False)
            if image_set.coarse is not None and image_set.coarse_names is not None:
                per_class_recall(p_real, image_set.coarse, image_set.coarse_names).to_csv(out / f"{name}_recall_coarse.csv", index=False)
            if image_set.fine is not None and image_set.coarse is not None:
                best_worst_classes(image_set, p_real).to_csv(out / f"{name}_best_worst.csv", index=False)
        else:
            confusion(image_set.labels, p_real).to_csv(out / f"{name}_confusion.csv")
            table = threshold_table(image_set.labels, p_real)
            table.to_csv(out / f"{name}_thresholds.csv", index=False)
            if name in ("cifake_test", "agiri_test"):
                fig = plot_threshold_curves(table, f"{name}: srm={cfg.srm} lr={cfg.lr:g} epochs={fmt_epochs(cfg.epochs)}")
                fig.savefig(out / f"{name}_thresholds.png", dpi=110, bbox_inches="tight")
    (out / "metrics.json").write_text(json.dumps(record.metrics, indent=1))
