"""Result tables whose truth is known, to check that an analysis method holds its level and coverage.

A design is the sweep's grid: `n_srm` placements × `lrs` × `seeds` trajectories, each evaluated at
`EPOCHS` (the stand-in main job's points, 13 of them) with cells at `CELLS`. Per trajectory t and epoch e:

    intrinsic = a_x · progress(e, lr) + condition_x[srm, lr] + u_t + noise
    transfer  = a_y · shape(progress)  + condition_y[srm, lr] + v_t + noise

with progress = 1 − exp(−e / tau), tau the same for every trajectory (`trend="common"`) or depending
on lr (`trend="lr"`: the largest lr learns in ~1 epoch, the smallest in ~10), (u_t, v_t) normal with
correlation `rho` (the only link between the metrics across models), and independent noise per point.
`simulate_curves` draws many tables at once as arrays; `to_tables` turns one into the points and
cells tables that `fakedet.analysis` reads. `simulate_differences` draws paired cutoff differences.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

EPOCHS = np.array([0.05, 0.1, 0.25, 0.5, 0.75, 1, 2, 3, 6, 10, 18, 32, 50], float)
CELLS = (1.0, 10.0, 50.0)


@dataclass(frozen=True)
class Design:
    """A sweep's grid: every trajectory's condition number, srm, lr and seed."""

    n_srm: int = 3
    lrs: tuple[float, ...] = (1e-3, 1e-2)
    seeds: int = 2

    @property
    def frame(self) -> pd.DataFrame:
        rows = [(s, lr, seed) for s in range(self.n_srm) for lr in self.lrs for seed in range(self.seeds)]
        f = pd.DataFrame(rows, columns=["srm", "lr", "seed"])
        f["srm"] = "srm" + f["srm"].astype(str)
        f["trajectory"] = [f"t{i}" for i in range(len(f))]
        return f

    @property
    def codes(self) -> np.ndarray:
        return np.repeat(np.arange(self.n_srm * len(self.lrs)), self.seeds)

    @property
    def n(self) -> int:
        return self.n_srm * len(self.lrs) * self.seeds


def _tau(design: Design, trend: str) -> np.ndarray:
    lr = design.frame["lr"].to_numpy(float)
    if trend == "common":
        return np.full(len(lr), 3.0)
    # the largest lr learns in ~1 epoch, each tenfold smaller lr ten times slower
    return 10.0 ** (np.log10(lr.max()) - np.log10(lr))


def simulate_curves(rng: np.random.Generator, reps: int, design: Design, *, trend: str = "common",
                    transfer: str = "flat", rho: float = 0.0, condition_x: float = 0.0, condition_y: float = 0.0,
                    a_x: float = 0.3, a_y: float = 0.1, level_sd: float = 0.02, noise_sd: float = 0.02) -> dict:  # fmt: skip
    """`reps` tables of one design: arrays x, y (reps × T × points) and their expectations given the
    conditions, mu_x, mu_y (reps × T × points; the trajectory levels u, v excluded). `transfer`: "flat"
    (no change in expectation), "rise" (like intrinsic) or "rise_fall" (peaks near epoch 1, then falls
    below its start while intrinsic keeps rising: the planted stand-in's shape). condition_*: sd of
    condition-specific offsets of one metric (drawn per table)."""
    T, K = design.n, len(EPOCHS)
    progress = 1 - np.exp(-EPOCHS[None, :] / _tau(design, trend)[:, None])  # T × K
    shape = {"flat": np.zeros_like(progress), "rise": progress,
             "rise_fall": 2 * np.exp(-EPOCHS[None, :] / 1.0) * (EPOCHS[None, :] / 1.0) * np.e / 2 - progress}[transfer]  # fmt: skip
    codes = design.codes
    cx = rng.normal(0, condition_x, (reps, codes.max() + 1))[:, codes] if condition_x else np.zeros((reps, T))
    cy = rng.normal(0, condition_y, (reps, codes.max() + 1))[:, codes] if condition_y else np.zeros((reps, T))
    mu_x = 0.6 + a_x * progress[None] + cx[..., None]
    mu_y = 0.6 + a_y * shape[None] + cy[..., None]
    u = rng.normal(size=(reps, T))
    v = rho * u + np.sqrt(1 - rho**2) * rng.normal(size=(reps, T))
    x = mu_x + level_sd * u[..., None] + rng.normal(0, noise_sd, (reps, T, K))
    y = mu_y + level_sd * v[..., None] + rng.normal(0, noise_sd, (reps, T, K))
    # the correlation across models of one cell, and of the standing averaged over the cells
    share = level_sd**2 / (level_sd**2 + noise_sd**2)
    combined = rho * level_sd**2 / (level_sd**2 + noise_sd**2 / len(CELLS))
    return {"x": x, "y": y, "mu_x": mu_x, "mu_y": mu_y, "rho_cell": rho * share, "rho_combined": combined}


def cells_of(values: np.ndarray) -> np.ndarray:
    """The cells (…, T, len(CELLS)) of point arrays (…, T, points)."""
    return values[..., [int(np.flatnonzero(np.isclose(EPOCHS, e))[0]) for e in CELLS]]


def to_tables(sim: dict, rep: int, design: Design, x: str = "cifake_test/acc",
              y: str = "agiri_test/auc") -> tuple[pd.DataFrame, pd.DataFrame]:  # fmt: skip
    """Table `rep` of a simulation as (points, cells), the shapes `fakedet.results.load_sweep` gives."""
    f = design.frame
    points = f.loc[f.index.repeat(len(EPOCHS))].reset_index(drop=True)
    points["epoch"] = np.tile(EPOCHS, design.n)
    points["step"] = np.tile(np.arange(len(EPOCHS)), design.n)
    points[x] = sim["x"][rep].ravel()
    points[y] = sim["y"][rep].ravel()
    cells = points[points["epoch"].isin(CELLS)].rename(columns={"epoch": "cell_epochs"}).reset_index(drop=True)
    return points, cells


def simulate_differences(rng: np.random.Generator, reps: int, design: Design, *, mean: float = 0.0,
                         condition_sd: float = 0.0, noise_sd: float = 0.02, ties: float = 0.0,
                         skew: bool = False) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Paired rule − baseline differences (reps × T): `mean` + a condition-specific effect (sd
    `condition_sd`, drawn per table and centred over the design's trajectories) + noise; a fraction `ties` of exact zeros (both rules picked the
    same point; the mean scaled to stay `mean`); `skew`: centred exponential noise instead of normal.
    Returns (differences, the true mean difference over the design's trajectories, per table)."""
    T = design.n
    codes = design.codes
    effect = rng.normal(0, condition_sd, (reps, codes.max() + 1))[:, codes] if condition_sd else np.zeros((reps, T))
    effect -= effect.mean(axis=1, keepdims=True)  # centred over the design: the true mean is `mean` in every table
    noise = (rng.exponential(noise_sd, (reps, T)) - noise_sd) if skew else rng.normal(0, noise_sd, (reps, T))
    keep = rng.random((reps, T)) >= ties
    scale = 1 / (1 - ties) if ties else 1.0
    d = np.where(keep, (mean + effect) * scale + noise, 0.0)
    truth = mean + effect.mean(axis=1)  # E[keep · scale] = 1
    return d, truth
