"""Roles instead of set names: what is intrinsic and what is transfer depends on what a model trained on.

A study's metric names (`[metrics]`, `[cutoff]`, `[statistics] trained_metric`) may name a set
(`cifake_test/acc`) or a role (`intrinsic_test/acc`), resolved per trajectory from its `train_on`:

| train_on | intrinsic_val | intrinsic_test | transfer_val | transfer_test |
| --- | --- | --- | --- | --- |
| cifake (the study) | cifake_val | cifake_test | agiri_val | agiri_test |
| agiri | agiri_val | agiri_test | cifake_val | cifake_test |
| cifake+agiri | cifake_val, agiri_val | cifake_test, agiri_test | none | none |

*Intrinsic* is the training distribution's own held-out split; *transfer* is the other labelled
distribution. For CIFAKE, transfer validation is agiri_val (sampled from AGIRI train, as the study's
transfer cutoff needs); for AGIRI it is cifake_val (held out of CIFAKE train): in both, a split of the
other source's *training* files, never a test split. A model trained on both has two intrinsic splits,
and its role value is their unweighted mean (macro over the two sources, as its training set weighs
them equally: the mean of two AUCs, not the AUC of their union); it has no labelled transfer set, so
its transfer roles are NaN (a cutoff rule on them picks nothing there). CIFAR-100 is all real and
trains no model: it is transfer for every training set and keeps its set name
(`cifar100_test/real_recall`); a role has no `real_recall`.

A study of one training set resolves its roles to set names when it is loaded (`concrete`), so its
tables name sets as they always did; where roles stay (several training sets, or the mixed one), the
tables get one column per role metric (`with_role_columns`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

DEFAULT_TRAIN_ON = "cifake"  # TrainConfig's default: a sweep from before the field was recorded trained on CIFAKE
ROLES = ("intrinsic_val", "intrinsic_test", "transfer_val", "transfer_test")
ROLE_SETS: dict[str, dict[str, tuple[str, ...]]] = {
    "cifake": {"intrinsic_val": ("cifake_val",), "intrinsic_test": ("cifake_test",),
               "transfer_val": ("agiri_val",), "transfer_test": ("agiri_test",)},
    "agiri": {"intrinsic_val": ("agiri_val",), "intrinsic_test": ("agiri_test",),
              "transfer_val": ("cifake_val",), "transfer_test": ("cifake_test",)},
    "cifake+agiri": {"intrinsic_val": ("cifake_val", "agiri_val"), "intrinsic_test": ("cifake_test", "agiri_test"),
                     "transfer_val": (), "transfer_test": ()},
}
"""The sets each role stands for, per training set (the table above)."""


def split_of(metric: str) -> str:
    return metric.split("/", 1)[0]


def is_role(metric: str) -> bool:
    return split_of(metric) in ROLES


def sets_for(metric: str, train_on: str) -> tuple[str, ...]:
    """The set metrics a name stands for in a trajectory trained on `train_on`: itself for a set name; for
    a role, one (or, for the mixed training set's intrinsic roles, two, or no) `<set>/<metric>`."""
    if not is_role(metric):
        return (metric,)
    role, what = metric.split("/", 1)
    if train_on not in ROLE_SETS:
        raise ValueError(f"unknown training set {train_on!r} (known: {', '.join(ROLE_SETS)})")
    return tuple(f"{s}/{what}" for s in ROLE_SETS[train_on][role])


def concrete(metric: str, train_ons: Iterable[str]) -> str:
    """The set name a role stands for where every training set in `train_ons` gives the same one set;
    else the role name itself (then `with_role_columns` computes it per row)."""
    names = {sets_for(metric, t) for t in set(train_ons)}
    if len(names) == 1:
        (only,) = names
        if len(only) == 1:
            return only[0]
    return metric


def train_ons_of(frame: pd.DataFrame) -> list[str]:
    """The training sets in a table (`train_on` column; a table without one trained on CIFAKE)."""
    if "train_on" not in frame or frame.empty:
        return [DEFAULT_TRAIN_ON]
    return sorted(frame["train_on"].fillna(DEFAULT_TRAIN_ON).astype(str).unique())


def with_role_columns(frame: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """`frame` (points or cells: a `train_on` column, else CIFAKE) with a column for every role name in
    `metrics` that it lacks: per row, the mean of the set metrics the role stands for there (`sets_for`),
    NaN where it stands for none or they were not logged."""
    roles = [m for m in dict.fromkeys(metrics) if is_role(m) and m not in frame]
    if not roles:
        return frame
    out = frame.copy()
    train_on = (out["train_on"].fillna(DEFAULT_TRAIN_ON).astype(str) if "train_on" in out
                else pd.Series(DEFAULT_TRAIN_ON, index=out.index))
    for metric in roles:
        values = np.full(len(out), np.nan)
        for t in train_on.unique():
            rows = (train_on == t).to_numpy()
            cols = sets_for(metric, t)
            if cols and all(c in out for c in cols):
                values[rows] = out.loc[rows, list(cols)].astype(float).mean(axis=1, skipna=False).to_numpy()
        out[metric] = values
    return out
