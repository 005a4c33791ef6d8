"""Where each dataset comes from (pinned kagglehub handles or a local folder) and how it is laid out.

Layouts, as published (and as `make-synthetic` writes them):

- CIFAKE  `train|test/REAL|FAKE/*.jpg`, 32×32 JPEG, names such as `0000 (10).jpg`.
- AGIRI   `train|test/real|fake/*`, any size and mode, a few corrupt files.
- CIFAR-100 python pickles `train`, `test`, `meta`, in `cifar-100-python/` (the Toronto archive,
  what torchvision downloads) or at the folder's root (Kaggle mirror).

kagglehub resolves an *unversioned* handle over the network even when the files are cached, so
every handle here carries its version: a cached download then resolves offline.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fakedet import FAKE, REAL
from fakedet.data.decode import is_image_name
from fakedet.data.errors import LayoutError, SourceUnavailableError


@dataclass(frozen=True)
class Source:
    name: str
    handle: str
    """kagglehub dataset handle with its version: `owner/slug/versions/N`."""
    classes: dict[str, int] = field(default_factory=dict)
    """Class folder name → label, for the image-folder datasets."""
    splits: tuple[str, ...] = ("train", "test")
    note: str = ""


SOURCES: dict[str, Source] = {
    # Bird & Lotfi (2024); version 3 is the current one the study used (100k train, 20k test).
    "cifake": Source(
        "cifake", "birdy654/cifake-real-and-ai-generated-synthetic-images/versions/3", {"REAL": REAL, "FAKE": FAKE}
    ),
    # Zhang (2024), "AI-generated images vs real images"; version 2 (48k train, 12k test).
    "agiri": Source(
        "agiri", "tristanzhang32/ai-generated-images-vs-real-images/versions/2", {"real": REAL, "fake": FAKE}
    ),
    # A Kaggle mirror of the Toronto pickles, so that all three sources download the same way.
    # Its version number is pinned but could not be checked offline; the Toronto archive
    # (torchvision.datasets.CIFAR100(root, download=True) then --cifar100 ROOT) works as well.
    "cifar100": Source("cifar100", "fedesoriano/cifar100/versions/1", note="pickles train, test, meta"),
}
DATASETS = tuple(SOURCES)

CIFAR100_FILES = ("test", "meta")  # required; `train` is read when present
CIFAR100_SUBDIR = "cifar-100-python"


def _listing(path: Path, depth: int = 2, limit: int = 12) -> str:
    """A short description of what a folder holds, for error messages."""
    if not path.exists():
        return "nothing (the path does not exist)"
    if not path.is_dir():
        return "a file, not a folder"
    lines: list[str] = []

    def walk(p: Path, prefix: str, d: int) -> None:
        try:
            entries = sorted(p.iterdir(), key=lambda e: e.name)
        except OSError as e:
            lines.append(f"{prefix}<unreadable: {e.strerror}>")
            return
        dirs = [e for e in entries if e.is_dir()]
        n_files = len(entries) - len(dirs)
        for e in dirs[:limit]:
            lines.append(f"{prefix}{e.name}/")
            if d > 1:
                walk(e, prefix + "  ", d - 1)
        if len(dirs) > limit:
            lines.append(f"{prefix}... {len(dirs) - limit} more folders")
        if n_files:
            names = [e.name for e in entries if not e.is_dir()][:3]
            lines.append(f"{prefix}{n_files} file(s), e.g. {', '.join(names)}")

    walk(path, "  ", depth)
    return "\n" + "\n".join(lines) if lines else "an empty folder"


def _candidates(path: Path) -> list[Path]:
    """The folder itself, then (for archives extracted into a wrapper folder) its only subfolder."""
    out = [path]
    if path.is_dir():
        subdirs = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
        if len(subdirs) == 1:
            out.append(subdirs[0])
    return out


def find_root(name: str, path: str | Path) -> Path:
    """The dataset root inside `path` (which may be the root or a wrapper around it), or LayoutError."""
    src = SOURCES[name]
    path = Path(path).expanduser()
    if not path.exists():
        raise LayoutError(f"{name}: {path} does not exist; give the folder that holds the dataset")
    if name == "cifar100":
        for base in _candidates(path):
            for root in (base / CIFAR100_SUBDIR, base):
                if all((root / f).is_file() for f in CIFAR100_FILES):
                    return root
        hint = ""
        if list(path.glob("cifar-100-python.tar.gz")):
            hint = "\nIt holds the archive cifar-100-python.tar.gz: extract it first (tar xzf cifar-100-python.tar.gz)."
        raise LayoutError(
            f"cifar100: {path} is not a CIFAR-100 python-version folder. Expected the pickles 'test' and "
            f"'meta' (and optionally 'train') either in {CIFAR100_SUBDIR}/ (the Toronto archive, what "
            f"torchvision downloads) or at the root (Kaggle mirror). Found: {_listing(path)}{hint}"
        )
    wanted = [f"{s}/{c}" for s in src.splits for c in src.classes]
    for root in _candidates(path):
        if all((root / w).is_dir() for w in wanted):
            return root
    # a helpful guess when the case differs: CIFAKE uses REAL/FAKE, AGIRI real/fake
    found_ci = {
        f"{s.name}/{c.name}"
        for s in (path.iterdir() if path.is_dir() else [])
        if s.is_dir()
        for c in s.iterdir()
        if c.is_dir()
    }
    hint = ""
    lower = {w.lower() for w in wanted}
    if found_ci and {f.lower() for f in found_ci} >= lower and not set(wanted) <= found_ci:
        other = next(
            (
                n
                for n, s in SOURCES.items()
                if s.classes and n != name and {f"{sp}/{c}" for sp in s.splits for c in s.classes} <= found_ci
            ),
            None,
        )
        hint = "\nThe class folders differ only in case" + (f": this looks like the {other} layout." if other else ".")
    raise LayoutError(
        f"{name}: {path} does not have the expected layout. Expected the folders "
        f"{', '.join(wanted)} (images inside, any depth). Found: {_listing(path)}{hint}"
    )


@dataclass
class Listing:
    """The image files of one split of an image-folder dataset, sorted by relative path."""

    relpaths: list[str]
    """Every entry named like an image, whatever it is: FIFOs, devices, dangling symlinks and
    directories included, so that decoding lists each of those as skipped, with the reason."""
    labels: np.ndarray
    ignored: list[str]
    """Files that are not images by extension (.DS_Store, ...), relative to the dataset root."""


def list_split(name: str, root: Path, split: str) -> Listing:
    src = SOURCES[name]
    rows: list[tuple[str, int]] = []
    ignored: list[str] = []
    for cls, label in src.classes.items():
        base = root / split / cls
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            rel_dir = Path(dirpath).relative_to(root).as_posix()
            for fn in sorted(filenames):
                rel = f"{rel_dir}/{fn}"
                (rows.append((rel, label)) if is_image_name(fn) else ignored.append(rel))
            # a directory named like an image (walked into all the same, unless it is a symlink)
            rows += [(f"{rel_dir}/{d}", label) for d in dirnames if is_image_name(d)]
    # files lying next to the class folders (e.g. train/.DS_Store) are ignored too, and said so
    split_dir = root / split
    ignored += sorted(f"{split}/{p.name}" for p in split_dir.iterdir() if p.is_file())
    rows.sort()
    return Listing([r for r, _ in rows], np.array([lab for _, lab in rows], np.uint8), sorted(ignored))


def stat_fingerprint(root: Path, relpaths: list[str]) -> str:
    """A cheap fingerprint of files: relative path, size and mtime of each.

    Used to decide whether decoded arrays are still valid without reading every file; a copy of the
    same files with new mtimes therefore decodes again (the content hash in the manifest, which
    `cache_hash` is built from, stays the same).
    """
    h = hashlib.sha256()
    for rel in relpaths:
        try:
            st = os.stat(root / rel)
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError as e:  # a dangling symlink: decoding will list it as skipped
            h.update(f"{rel}\0{e.errno}\n".encode())
    return h.hexdigest()


def download(name: str) -> Path:
    """Download (or find in the kagglehub cache) one dataset by its pinned, versioned handle."""
    handle = SOURCES[name].handle
    flag = {"cifake": "--cifake", "agiri": "--agiri", "cifar100": "--cifar100"}[name]
    local = f"or download it elsewhere and pass {flag} PATH (a local folder; clusters often have no internet)"
    try:
        import kagglehub
        from kagglehub.config import get_cache_folder, get_kaggle_credentials
        from kagglehub.exceptions import KaggleApiHTTPError, UnauthenticatedError
    except ImportError as e:
        raise SourceUnavailableError(
            f"{name}: kagglehub is not installed ({e}); pip install kagglehub==1.0.3, {local}"
        ) from e
    import requests

    try:
        return Path(kagglehub.dataset_download(handle))
    except UnauthenticatedError as e:
        raise SourceUnavailableError(_no_credentials(name, handle, local)) from e
    except KaggleApiHTTPError as e:
        status = getattr(e.response, "status_code", None)
        if status in (401, 403):
            if get_kaggle_credentials() is None:
                raise SourceUnavailableError(_no_credentials(name, handle, local)) from e
            raise SourceUnavailableError(
                f"{name}: Kaggle refused the download of {handle} (HTTP {status}) with your credentials; "
                f"accept the dataset's terms on kaggle.com if it asks for that, {local}"
            ) from e
        if status == 404:
            raise SourceUnavailableError(
                f"{name}: Kaggle has no dataset {handle} (HTTP 404); the pinned version may have been removed. {local}"
            ) from e
        raise SourceUnavailableError(f"{name}: the download of {handle} failed: {e}; retry, {local}") from e
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as e:
        raise SourceUnavailableError(
            f"{name}: no network: could not reach Kaggle to download {handle}, and it is not in the "
            f"kagglehub cache ({os.path.join(get_cache_folder(), 'datasets')}; set KAGGLEHUB_CACHE to use "
            f"another). Connect and retry, copy a filled kagglehub cache here, {local}"
        ) from e


def _no_credentials(name: str, handle: str, local: str) -> str:
    return (
        f"{name}: no Kaggle credentials: downloading {handle} needs them. Set KAGGLE_USERNAME and "
        f"KAGGLE_KEY (or KAGGLE_API_TOKEN), or put kaggle.json in ~/.kaggle/ (kaggle.com → Settings → "
        f"API → Create New Token), {local}"
    )
