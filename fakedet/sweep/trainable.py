"""The Ray Tune trainable: a thin adapter that runs `fakedet.train.train` and reports every evaluation point.

Each report carries a checkpoint (the resumable training state), so a crashed trial is retried from its
last evaluation point. At a cell's epoch count the checkpoint also holds that cell's artifacts
(model weights, threshold curves, confusion matrices, CIFAR-100 per-class recall), which the driver
logs to the cell's MLflow run.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fakedet.arrays import ImageSet
from fakedet.config import TrainConfig

STATE_FILE = "state.pt"
CELL_ARTIFACTS = "cell_artifacts"
# Evaluation sets at every point: CIFAKE test (intrinsic) and validation, CIFAR-100 test, AGIRI test
# and transfer-validation.
SWEEP_EVAL_SETS = ("cifake_val", "cifake_test", "cifar100_test", "agiri_val", "agiri_test", "cifar100_test_jpeg")


def trajectory_config(config: dict[str, Any], base: dict[str, Any]) -> TrainConfig:
    """The trial's training config: the study's fixed trajectory settings with the trial's sampled values."""
    return TrainConfig.from_dict({**base["train"], **{k: v for k, v in config.items() if k in base["train"]}})


def cell_epochs(base: dict[str, Any]) -> list[float]:
    return [float(e) for e in base["cell_epochs"]]


def run_trajectory(config: dict[str, Any], splits: dict[str, ImageSet], base: dict[str, Any]) -> None:
    """Ray Tune function trainable. `splits` and `base` arrive through `tune.with_parameters` (object store)."""
    import ray
    from ray import tune

    from fakedet.train import BatchSchedule, total_steps, train

    # the Ray node this trial runs on: nodes of one host share an IP, not an id
    node_id = ray.get_runtime_context().get_node_id()
    cfg = trajectory_config(config, base)
    cells = cell_epochs(base)
    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            resume = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
    crash = _CrashOnce(base.get("crash_once"))
    eval_sets = {k: splits[k] for k in SWEEP_EVAL_SETS if k in splits}
    train_set = splits["cifake_train"]
    total = total_steps(cfg, BatchSchedule(len(train_set), cfg.batch_size, cfg.shuffle, cfg.seed).steps_per_epoch)

    def on_eval(record, snapshot) -> None:
        state = snapshot()
        with tempfile.TemporaryDirectory(prefix="fakedet-ckpt-") as d:
            torch.save(state, Path(d) / STATE_FILE)
            done = [e for e in cells if _same_epoch(e, record.epoch)]
            for epochs in done:
                write_cell_artifacts(Path(d) / CELL_ARTIFACTS / f"{epochs:g}", record, eval_sets, state["model"], cfg, epochs)
            result = {**record.flat(), "epoch": record.epoch, "step": record.step, "total_steps": total,
                      "cells_done": [float(e) for e in done], "node_id": node_id}
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(d))
        crash.maybe(record.step)

    train(cfg, train_set, eval_sets, on_eval=on_eval, resume=resume)


def _same_epoch(a: float, b: float) -> bool:
    return abs(a - b) < 1e-9 * max(1.0, abs(a))


def write_cell_artifacts(out: Path, record, eval_sets: dict[str, ImageSet], model_state: dict, cfg: TrainConfig, epochs: float) -> None:
    """What a cell's MLflow run holds besides metrics, computed from the logits at the cell's epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fakedet.metrics import best_worst_classes, confusion, per_class_recall, plot_threshold_curves, threshold_table
    from fakedet.models import save_checkpoint

    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / "model.pt", model_state, {**cfg.to_dict(), "epochs": epochs})
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
                fig = plot_threshold_curves(table, f"{name}: srm={cfg.srm} lr={cfg.lr:g} epochs={epochs:g}")
                fig.savefig(out / f"{name}_thresholds.png", dpi=110, bbox_inches="tight")
                plt.close(fig)
    (out / "metrics.json").write_text(json.dumps(record.metrics, indent=1))


class _CrashOnce:
    """Fault injection for the retry test: kill this worker process once, after a given step.

    `spec` is {"after_step": int, "marker": path}; the marker file makes the crash happen only once
    across retries, so the retried trial must continue from its checkpoint.
    """

    def __init__(self, spec: dict | None) -> None:
        self.spec = spec

    def maybe(self, step: int) -> None:
        if not self.spec or step < int(self.spec["after_step"]):
            return
        marker = Path(self.spec["marker"])
        if marker.exists():
            return
        marker.write_text(str(step))
        os._exit(17)  # a hard worker death, as an OOM kill or a lost node would be
