"""The Ray Tune trainable: a thin adapter that runs `fakedet.train.train_models` on a `TrialSpec` (one
model or a bundle, one call either way) and reports every evaluation point.

Each report carries a checkpoint (the resumable training state), so a crashed trial is retried from its
last evaluation point. At a cell's epoch count the checkpoint also holds that cell's artifacts
(model weights, threshold curves, confusion matrices, CIFAR-100 per-class recall, and where the study
keeps `budget.explain` on, the Grad-CAM maps of `fakedet.explain` in `explain/`), which the driver logs to
the cell's MLflow run; every point's report then also holds the maps' shares on the probe sets.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray import tune

from fakedet.analysis.roles import sets_for
from fakedet.arrays import ImageSet
from fakedet.config import TrainConfig
from fakedet.explain import explain_probes, probe_sets, probe_shares, trained_model, write_maps
from fakedet.data.training import training_set
from fakedet.metrics import best_worst_classes, confusion, per_class_recall, plot_threshold_curves, threshold_table
from fakedet.models import save_checkpoint
from fakedet.sweep.refusals import Exit, FatalTrialError
from fakedet.sweep.spec import CELL_ARTIFACTS, TRIAL_KEY_RESULT, Cell, TrialSpec, fmt_epochs, resolve_trial
from fakedet.train import BatchSchedule, EvalRecord, ModelEval, total_steps, train_models

STATE_FILE = "state.pt"
# Evaluation sets at every point: CIFAKE test (intrinsic) and validation, CIFAR-100 test (and its JPEG
# round-trip copy), AGIRI test and transfer-validation.
SWEEP_EVAL_SETS = ("cifake_val", "cifake_test", "cifar100_test", "agiri_val", "agiri_test", "cifar100_test_jpeg")


def run_trial(config: dict[str, Any], splits: dict[str, ImageSet], template: TrialSpec | None = None) -> None:
    """Ray Tune function trainable. `splits` and `template` (HPO) arrive through `tune.with_parameters` (object store).

    The trajectories train in one `fakedet.train.train_models` call (one fused step for all where there are
    several). Every evaluation point of every trajectory is one report (`trajectory`: its index in the
    spec); the last report of a point carries the checkpoint with every model's state.
    """
    spec = resolve_trial(config, template)
    # the Ray node this trial runs on: nodes of one host share an IP, not an id
    node_id = ray.get_runtime_context().get_node_id()
    eval_sets = {k: splits[k] for k in SWEEP_EVAL_SETS if k in splits}
    probes = probe_sets(eval_sets) if spec.explain else {}  # the same seeded images in every trial
    train_set = training_set(splits, spec.trajectories[0].config)  # a bundle shares its training set (SHARED_FIELDS)
    cfgs = [t.config for t in spec.trajectories]
    total = total_steps(cfgs[0], BatchSchedule(len(train_set), cfgs[0].batch_size, cfgs[0].shuffle, cfgs[0].seed).steps_per_epoch)

    states: list[dict | None] = [None] * len(cfgs)
    diverged = [False] * len(cfgs)
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            saved = load_state(Path(d) / STATE_FILE, f"{checkpoint.path}/{STATE_FILE}")
        states, diverged = list(saved["states"]), list(saved["diverged"])
    best: list[tuple[float, float] | None] = [None] * len(cfgs)  # HPO: (best objective so far, its epoch)
    for k, state in enumerate(states):
        if state is not None and spec.objective is not None:
            for rec in state["history"]:
                best[k] = _better(spec, best[k], rec)
    live = [i for i in range(len(cfgs)) if not diverged[i]]
    if not live:  # resumed after every model had ended as diverged: nothing left to train
        return

    def on_point(evals: list[ModelEval]) -> None:
        # the checkpoint, with the point's last report, holds every model's state (an ended one's as it ended)
        indexed = [(live[e.index], e.record, e.snapshot()) for e in evals]
        for i, record, state in indexed:
            states[i] = state
            diverged[i] = diverged[i] or record.diverged
        with tempfile.TemporaryDirectory(prefix="fakedet-ckpt-") as d:
            torch.save({"states": states, "diverged": diverged}, Path(d) / STATE_FILE)
            reports = []
            for i, rec, st in indexed:
                trajectory = spec.trajectories[i]
                done = [c for c in trajectory.cells if _same_epoch(c.epochs, rec.epoch)]
                maps: dict[str, float] = {}
                if not rec.diverged:  # a diverged model's logits are not finite: no curves, no model to keep
                    # one pass over the probe sets gives the point's shares and, where cells end, their maps
                    explained = explain_probes(trained_model(cfgs[i], st["model"]), probes) if probes else {}
                    maps = probe_shares(explained, probes)
                    for cell in done:
                        out = Path(d) / CELL_ARTIFACTS / str(i) / fmt_epochs(cell.epochs)
                        write_cell_artifacts(out, rec, eval_sets, st["model"], cell)
                        if explained:
                            write_maps(out / "explain", probes, explained)
                result = {**rec.flat(), **maps, "trajectory": i, "epoch": rec.epoch, "step": rec.step, "total_steps": total,
                          "node_id": node_id, "diverged": rec.diverged, TRIAL_KEY_RESULT: spec.key}
                if spec.objective is not None:
                    best[i] = _better(spec, best[i], rec.to_dict())
                    # always present (Tune requires its metric in every result); NaN until a finite value exists
                    result[spec.objective.best_key], result[spec.objective.epoch_key] = best[i] or (math.nan, math.nan)
                reports.append(result)
            for result in reports[:-1]:
                tune.report(result)
            tune.report(reports[-1], checkpoint=tune.Checkpoint.from_directory(d))
        if spec.faults is not None:
            spec.faults.maybe_crash(evals[0].record.step)

    # the models that have not diverged go on together (a diverged one has ended, as alone)
    train_models([cfgs[i] for i in live], train_set, eval_sets, on_eval=on_point, resume=[states[i] for i in live])


def load_state(path: Path, where: str) -> dict:
    """The saved training state, or `FatalTrialError` naming `where`: a retry would read the same file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, garbled, not a torch file: all the same to the trial
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise FatalTrialError(f"the checkpoint {where} does not load ({type(e).__name__}: {first}): it is truncated or "
                              f"damaged, and every retry would read it again; restore it from a backup, or start the "
                              f"sweep again under a new --name", Exit.CORRUPT_STATE) from None


def _better(spec: TrialSpec, best: tuple[float, float] | None, record: dict) -> tuple[float, float] | None:
    """The objective's best value so far and its epoch, updated with one evaluation point's record."""
    objective = spec.objective
    # a role (`transfer_val/auc`) stands for this trajectory's own set(s): an HPO trial may sample train_on
    values = [record["metrics"].get(name.split("/", 1)[0], {}).get(name.split("/", 1)[1])
              for name in sets_for(objective.metric, spec.trajectories[0].config.train_on)]
    value = float(np.mean(values)) if values and all(v is not None for v in values) else None
    if value is None or not math.isfinite(value):
        return best
    if objective.better(value, None if best is None else best[0]):
        return (float(value), float(record["epoch"]))
    return best


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
                fig.savefig(out / f"{name}_thresholds.png", dpi=110)  # constrained layout fits the legend: no second, "tight" draw
    (out / "metrics.json").write_text(json.dumps(record.metrics, indent=1))
