"""The data layer: sources → a decoded, memory-mapped cache → `ImageSet`s.

    from fakedet.data import resolve_data, load_splits, cache_hash
    cache = resolve_data("synthetic", "cache", size="tiny")   # or "kaggle", or a folder
    sets = load_splits(cache)      # {"cifake_train": ImageSet, ..., "cifar100_test_jpeg": ImageSet}
    cache_hash(cache)              # e.g. "3f9c0a1b2d4e": names the data and preprocessing

Modules, each importing only those listed before it: errors; files (regular files only, bounded
reads); decode (any image → 32×32 RGB, in parallel); cifar100 (restricted unpickler); sources
(pinned handles, layouts, kagglehub); splits (seeded held-out splits); jpeg (CIFAKE's quality, the
round trip); options (`PrepareOptions`); cache (the read path: manifest, memory maps); units
(atomic units, the writers' lock); builders (each dataset's units); build (`prepare`, the
manifest); synthetic (the built-in stand-in); resolve (`--data`); cli (`prepare`, `make-synthetic`).
"""

from fakedet.data.build import prepare
from fakedet.data.cache import DEFAULT_SET_NAMES, SET_NAMES, cache_hash, load_splits, read_manifest
from fakedet.data.errors import (
    CacheError,
    DataError,
    LayoutError,
    SourceUnavailableError,
    UnsafePickleError,
)
from fakedet.data.options import PrepareOptions
from fakedet.data.resolve import resolve_data
from fakedet.data.synthetic import SIZES, make_synthetic

__all__ = [
    "DEFAULT_SET_NAMES",
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
