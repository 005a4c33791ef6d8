"""Seeded, stratified held-out splits.

Two are needed: a validation split of CIFAKE train for intrinsic early
stopping and threshold calibration, and a transfer-validation sample of AGIRI train, so that a
transfer cutoff is never chosen on a test split. A model trained on AGIRI (`train_on`) trains on
AGIRI train less that sample, which stays held out as its own validation split; the mixed training
set takes equal numbers of each source and class (`balanced_rows`). Both are stratified by label (each class keeps
its share) and depend only on the labels, the seed and the size: the same inputs give the same
rows on every machine.
"""

from __future__ import annotations

import numpy as np

# Distinct streams for distinct purposes, so that changing one split never moves another.
_STREAM = {"cifake_val": 1, "agiri_val": 2, "cifake+agiri": 3}


def holdout(
    labels: np.ndarray, fraction: float, seed: int, stream: str = "cifake_val"
) -> tuple[np.ndarray, np.ndarray]:
    """(keep, held) row indices, sorted; `held` has round(fraction·n_c) rows of each class c."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng([seed, _STREAM[stream]])
    held = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        held.append(rng.permutation(rows)[: int(round(fraction * len(rows)))])
    held_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    mask = np.ones(len(labels), bool)
    mask[held_idx] = False
    return np.flatnonzero(mask), held_idx


def sample_order(labels: np.ndarray, seed: int, stream: str = "agiri_val") -> list[np.ndarray]:
    """Per class (in sorted label order), all of its row indices in a seeded random order.

    The AGIRI validation sample takes a prefix of each order and, when a file turns out to be
    corrupt, the next one: so only the sample is ever decoded, not the 48k-image train split.
    """
    rng = np.random.default_rng([seed, _STREAM[stream]])
    return [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]


def balanced_rows(groups: dict[str, np.ndarray], seed: int, stream: str = "cifake+agiri") -> dict[str, np.ndarray]:
    """Equal numbers from every group (source × class): per group, a seeded sample (sorted) of as many rows
    as the smallest group holds. `groups` maps a group's name to its row indices."""
    n = min((len(rows) for rows in groups.values()), default=0)
    rng = np.random.default_rng([seed, _STREAM[stream]])
    return {name: np.sort(rng.permutation(rows)[:n]) for name, rows in groups.items()}


def per_class_quota(total: int, n_classes: int) -> list[int]:
    """`total` shared as evenly as possible (the first classes get the remainder)."""
    base, extra = divmod(total, n_classes)
    return [base + (i < extra) for i in range(n_classes)]
