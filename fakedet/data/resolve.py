"""`--data synthetic|kaggle|PATH` → a prepared cache directory, preparing it when needed.

Every training entry point chooses its data through `resolve_data`, so a sweep worker, a notebook
and the CLI all end up on the same prepared cache. It is idempotent and cheap when the cache is
current (a listing and a stat of the input files), and safe when several processes call it at once
on the same cache root: preparation takes a file lock, and every write is a rename of a finished
temporary folder.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from fakedet.data.build import prepare
from fakedet.data.options import PrepareOptions
from fakedet.data.sources import DATASETS
from fakedet.data.synthetic import SIZES, VARIANTS, make_synthetic
from fakedet.data.units import writer_lock

SPEC_HELP = (
    "'synthetic' (the built-in stand-in, generated on first use), 'kaggle' (download the pinned "
    "Kaggle versions with kagglehub), a prepared cache (a folder with manifest.json), or a folder "
    "holding cifake/, agiri/ and cifar100/ source folders"
)


def resolve_data(
    spec: str,
    cache_root: str | Path,
    *,
    size: str = "default",
    show_progress: bool = True,
    options: PrepareOptions | None = None,
    seed: int = 0,
    variant: str = "standard",
) -> Path:
    """A prepared cache directory for `spec` (see SPEC_HELP), under `cache_root` when it is built here.

    size: the stand-in's size (tiny, small, default, cifake) when spec is 'synthetic'.
    seed: the stand-in's generation seed (not the split seed, which is in `options`).
    variant: the stand-in's variant (`standard`, or `planted`: cues of known effect, STANDIN.md).
    """
    cache_root = Path(cache_root).expanduser()
    options = options or PrepareOptions()
    if spec == "synthetic":
        if size not in SIZES:
            raise ValueError(f"unknown stand-in size {size!r}; choose one of {', '.join(SIZES)}")
        if variant not in VARIANTS:
            raise ValueError(f"unknown stand-in variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        # the standard variant keeps the folder name it always had
        name = f"synthetic-{size}" + ("" if variant == "standard" else f"-{variant}") + (f"-seed{seed}" if seed else "")
        sources = cache_root / name / "sources"
        cache = cache_root / name / "cache"
        if not (sources / "STANDIN.json").is_file():
            with writer_lock(cache_root / f".{name}.lock", f"generating the {size} stand-in"):
                # a no-op if another process made it
                make_synthetic(sources, size, seed, variant=variant, show_progress=show_progress)
        return _prepared(cache, {ds: sources / ds for ds in DATASETS}, options, show_progress, allow_download=False)
    if spec == "kaggle":
        return _prepared(
            cache_root / "kaggle", {ds: None for ds in DATASETS}, options, show_progress, allow_download=True
        )
    path = Path(spec).expanduser()
    if (path / "manifest.json").is_file():
        return path  # an existing prepared cache, used as it is
    if path.is_dir():
        found = {ds: path / ds for ds in DATASETS if (path / ds).is_dir()}
        if not found:
            raise ValueError(
                f"--data {spec}: this folder is neither a prepared cache (no manifest.json) nor a folder of "
                f"sources (no cifake/, agiri/ or cifar100/ inside). Give {SPEC_HELP}."
            )
        missing = [ds for ds in DATASETS if ds not in found]
        if missing:
            raise FileNotFoundError(
                f"--data {spec}: the folder holds {', '.join(f'{d}/' for d in found)} but not "
                f"{', '.join(f'{d}/' for d in missing)}; add them, or prepare what is there with "
                f"`fakedet prepare --only {' '.join(found)} ... --cache DIR` and pass --data DIR"
            )
        # a cache per source folder, named after it, so that two source folders never share one
        tag = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]
        return _prepared(
            cache_root / f"{path.resolve().name}-{tag}", found, options, show_progress, allow_download=False
        )
    if path.exists():
        raise ValueError(f"--data {spec}: a file, not a folder. Give {SPEC_HELP}.")
    raise FileNotFoundError(f"--data {spec}: no such folder, and not 'synthetic' or 'kaggle'. Give {SPEC_HELP}.")


def _prepared(cache: Path, sources: dict, options: PrepareOptions, show_progress: bool, allow_download: bool) -> Path:
    # prepare() reuses every unit whose inputs and options are unchanged: when the cache is
    # current this only lists and stats the source files and rewrites nothing but the manifest
    prepare(cache, **sources, options=options, allow_download=allow_download, show_progress=show_progress)
    return cache
