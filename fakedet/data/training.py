"""Which cached sets a model trains on (`TrainConfig.train_on`), and the mixed set assembled from them.

    cifake        cifake_train (the study's: CIFAKE train less the 10% cifake_val)
    agiri         agiri_train (AGIRI train at 32 px less the agiri_val sample, which stays held out)
    cifake+agiri  cifake+agiri_train: equal numbers of each source and class (REAL and FAKE of CIFAKE
                  and of AGIRI), as many of each as the smallest of the four holds; a seeded sample of
                  the others (`splits.balanced_rows`, the split seed), so no source outweighs the other

Each is named `<train_on>_train`. The first two are memory maps of the cache; the mixed one is a row
selection of them, made once on the driver (a copy of the chosen rows, no decoding) and handed to
every trial with the other sets.
"""

from __future__ import annotations

import numpy as np

from fakedet import FAKE, REAL
from fakedet.arrays import ImageSet
from fakedet.config import TRAIN_ON, TrainConfig
from fakedet.data.errors import CacheError
from fakedet.data.splits import balanced_rows

SOURCES = {"cifake": ("cifake",), "agiri": ("agiri",), "cifake+agiri": ("cifake", "agiri")}
"""The datasets each training set draws on."""


def set_name(train_on: str) -> str:
    """The training set's name among the splits: `cifake_train`, `agiri_train`, `cifake+agiri_train`."""
    return f"{train_on}_train"


def needs_agiri_train(train_ons) -> bool:
    """Whether the cache must hold agiri_train (PrepareOptions.agiri_train) for these training sets."""
    return any("agiri" in SOURCES[t] for t in train_ons)


def with_training_sets(splits: dict[str, ImageSet], train_ons, seed: int = 0) -> dict[str, ImageSet]:
    """`splits` with the training set of every `train_on` present under `set_name(train_on)`; `seed`: the
    split seed (PrepareOptions.seed) of the mixed set's sample."""
    out = dict(splits)
    for train_on in dict.fromkeys(train_ons):
        if train_on not in TRAIN_ON:
            raise ValueError(f"unknown training set {train_on!r} (known: {', '.join(TRAIN_ON)})")
        for source in SOURCES[train_on]:
            if set_name(source) not in splits:
                raise CacheError(f"training on {train_on} needs {set_name(source)}, which this cache does not hold; "
                                 f"prepare it with agiri_train on (`fakedet prepare --agiri-train`, or a sweep whose "
                                 f"[space] train_on names it)")
        if train_on == "cifake+agiri":
            out[set_name(train_on)] = balanced(splits["cifake_train"], splits["agiri_train"], seed)
    return out


def balanced(cifake: ImageSet, agiri: ImageSet, seed: int = 0) -> ImageSet:
    """CIFAKE and AGIRI training images in equal numbers per source and class (`splits.balanced_rows`)."""
    groups = {f"{name}/{label}": np.flatnonzero(s.labels == label) for name, s in (("cifake", cifake), ("agiri", agiri))
              for label in (REAL, FAKE)}
    rows = balanced_rows(groups, seed)
    parts = [(s, np.sort(np.concatenate([rows[f"{name}/{REAL}"], rows[f"{name}/{FAKE}"]])))
             for name, s in (("cifake", cifake), ("agiri", agiri))]
    return ImageSet(images=np.concatenate([s.images[r] for s, r in parts]), labels=np.concatenate([s.labels[r] for s, r in parts]),
                    name=set_name("cifake+agiri"),
                    paths=np.concatenate([np.char.add(f"{s.name}:", np.asarray(s.paths[r], dtype=str)) if s.paths is not None
                                          else np.full(len(r), s.name) for s, r in parts]))


def training_set(splits: dict[str, ImageSet], config: TrainConfig) -> ImageSet:
    """The set `config` trains on, from splits that `with_training_sets` completed."""
    return splits[set_name(config.train_on)]
