"""A sweep's MLflow record written in-process: each trial's results replayed through the real Ray Tune callback
(`MlflowCellCallback`), its cells' artifacts through the trainable's own writer, then the sweep's analysis.
The views' and the transfer matrix's tests read such a store, made in seconds instead of by a Ray sweep."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from ray import tune

from fakedet.arrays import ImageSet
from fakedet.sweep.spec import CELL_ARTIFACTS, TRIAL_KEY, Trajectory, fmt_epochs
from fakedet.sweep.store import SweepTracking
from fakedet.sweep.study import Study
from fakedet.sweep.tracking import MlflowCellCallback
from fakedet.sweep.trainable import write_cell_artifacts
from fakedet.train import EvalRecord, build_initial


def replay_sweep(root: Path, experiment: str, sweep: str, study: Study, parent_params: dict[str, Any],
                 sets: dict[str, ImageSet], record_at: Callable[[Trajectory, int], EvalRecord], steps_per_epoch: int,
                 cell_epochs: list[float]) -> str:
    """The tracking URI of `study`'s sweep under `root`, every trial's points made by `record_at`, analysed."""
    from fakedet.report import analyse_sweep

    tracking = SweepTracking.open(f"sqlite:///{root / 'mlflow.db'}", experiment, sweep, parent_params, {"fakedet.study": study.name})
    callback = MlflowCellCallback(tracking, None, {"sweep": sweep}, {"fakedet.study": study.name})
    for t, spec in enumerate(study.trials()):
        trial = SimpleNamespace(trial_id=f"t{t}", config={TRIAL_KEY: spec})
        (trajectory,) = spec.trajectories
        callback.on_trial_start(0, [], trial)
        total = round(trajectory.config.epochs * steps_per_epoch)
        steps = sorted({max(1, round(e * steps_per_epoch)) for e in trajectory.config.eval_at} | {total})
        state = build_initial(trajectory.config, torch.device("cpu")).state_dict()
        for step in steps:
            rec = record_at(trajectory, step)
            callback.on_trial_result(0, [], trial, {**rec.flat(), "trajectory": 0, "epoch": rec.epoch, "step": step,
                                                    "total_steps": total, "node_id": "n1", "diverged": False})
            done = [c for c in trajectory.cells if abs(c.epochs - rec.epoch) < 1e-9]
            if done:
                folder = root / f"ckpt_{t}_{step}"
                for cell in done:
                    write_cell_artifacts(folder / CELL_ARTIFACTS / "0" / fmt_epochs(cell.epochs), rec, sets, state, cell)
                callback.on_checkpoint(0, [], trial, tune.Checkpoint.from_directory(str(folder)))
        callback.on_trial_complete(0, [], trial)
    assert callback.writer.flush(timeout=120)
    assert analyse_sweep(tracking, study, list(cell_epochs), {"code_version": "test"}) == 0
    return tracking.uri
