"""Seeded, stratified held-out splits.

Two are needed: a validation split of CIFAKE train for intrinsic early
stopping and threshold calibration, and a transfer-validation sample of AGIRI train, so that a
transfer cutoff is never chosen on a test split. Both are stratified by label (each class keeps
its share) and depend only on the labels, the seed and the size: the same inputs give the same
rows on every machine.
"""

from __future__ import annotations

import numpy as np

# Distinct streams for distinct purposes, so that changing one split never moves another.
_STREAM = {"cifake_val": 1, "agiri_val": 2}


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


def per_class_quota(total: int, n_classes: int) -> list[int]:
    """`total` shared as evenly as possible (the first classes get the remainder)."""
    base, extra = divmod(total, n_classes)
    return [base + (i < extra) for i in range(n_classes)]
