"""The data layer: sources → a decoded, memory-mapped cache → `ImageSet`s.

    from fakedet.data import resolve_data, load_splits, cache_hash
    cache = resolve_data("synthetic", "cache", size="tiny")   # or "kaggle", or a folder
    sets = load_splits(cache)      # {"cifake_train": ImageSet, ..., "cifar100_test_jpeg": ImageSet}
    cache_hash(cache)              # e.g. "3f9c0a1b2d4e": names the data and preprocessing

Modules: sources (pinned handles, layouts, kagglehub), decode (any image → 32×32 RGB, in parallel),
cifar100 (restricted unpickler), splits (seeded held-out splits), cache (prepare / load),
synthetic (the built-in stand-in), resolve (`--data`), cli (`prepare`, `make-synthetic`).
"""

from fakedet.data.cache import (
    SET_NAMES,
    PrepareOptions,
    cache_hash,
    load_splits,
    prepare,
    read_manifest,
)
from fakedet.data.errors import (
    CacheError,
    DataError,
    LayoutError,
    SourceUnavailableError,
    UnsafePickleError,
)
from fakedet.data.resolve import resolve_data
from fakedet.data.synthetic import SIZES, make_synthetic

__all__ = [
    "SET_NAMES",
    "SIZES",
    "CacheError",
    "DataError",
    "LayoutError",
    "PrepareOptions",
    "SourceUnavailableError",
    "UnsafePickleError",
    "cache_hash",
    "load_splits",
    "make_synthetic",
    "prepare",
    "read_manifest",
    "resolve_data",
]
