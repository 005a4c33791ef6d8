"""Sources: folder layouts and their errors, and kagglehub resolution from a pre-filled cache offline."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest

from fakedet.data import (
    LayoutError,
    SourceUnavailableError,
    load_splits,
    prepare,
    resolve_data,
)
from fakedet.data.sources import SOURCES, download, find_root, list_split


@pytest.fixture(scope="session")
def tiny_sources(tmp_path_factory) -> Path:
    # the same folder as the other test_data_* modules use: generated once per session
    root = tmp_path_factory.getbasetemp() / "fakedet-data-tiny"
    resolve_data("synthetic", root, size="tiny", show_progress=False)
    return root / "synthetic-tiny" / "sources"


@pytest.fixture
def no_network(monkeypatch):
    """Every socket connection fails, as on a cluster node without internet."""

    def refuse(*args, **kwargs):
        raise OSError(101, "Network is unreachable (blocked by the test)")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_handles_are_pinned_to_versions():
    for src in SOURCES.values():
        owner, slug, word, version = src.handle.split("/")
        assert word == "versions" and int(version) > 0, src.handle
    assert SOURCES["cifake"].handle.endswith("/versions/3") and SOURCES["agiri"].handle.endswith("/versions/2")


def test_listing_labels_and_ignored_files(tiny_sources):
    listing = list_split("agiri", tiny_sources / "agiri", "train")
    assert "train/.DS_Store" in listing.ignored
    assert all(p.startswith(("train/fake/", "train/real/")) for p in listing.relpaths)
    assert listing.relpaths == sorted(listing.relpaths)
    for rel, label in zip(listing.relpaths, listing.labels):
        assert label == (1 if rel.startswith("train/real/") else 0)
    cifake = list_split("cifake", tiny_sources / "cifake", "test")
    assert "test/REAL/0000 (10).jpg" in cifake.relpaths and "test/FAKE/0 (10).jpg" in cifake.relpaths


def test_layout_error_names_expected_and_found(tmp_path):
    (tmp_path / "train" / "cats").mkdir(parents=True)
    (tmp_path / "train" / "cats" / "a.jpg").write_bytes(b"x")
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(LayoutError) as e:
        find_root("cifake", tmp_path)
    msg = str(e.value)
    assert "Expected the folders train/REAL, train/FAKE, test/REAL, test/FAKE" in msg
    assert "train/" in msg and "cats/" in msg and "readme.txt" in msg


def test_layout_error_spots_the_other_dataset(tiny_sources):
    with pytest.raises(LayoutError, match="differ only in case: this looks like the cifake layout"):
        find_root("agiri", tiny_sources / "cifake")


def test_missing_folder(tmp_path):
    with pytest.raises(LayoutError, match="does not exist"):
        find_root("agiri", tmp_path / "nope")


def test_wrapper_folder_is_looked_through(tiny_sources, tmp_path):
    shutil.copytree(tiny_sources / "cifake", tmp_path / "archive" / "cifake-v3")
    assert find_root("cifake", tmp_path / "archive") == tmp_path / "archive" / "cifake-v3"


def _prefill(cache: Path, handle: str, src: Path) -> Path:
    """Lay out files as kagglehub 1.0.3 does after a complete download of a versioned handle
    (kagglehub/cache.py): datasets/<owner>/<slug>/versions/<n>/ plus the marker <n>.complete."""
    owner, slug, _, version = handle.split("/")
    base = cache / "datasets" / owner / slug
    shutil.copytree(src, base / "versions" / version)
    (base / f"{version}.complete").touch()
    return base / "versions" / version


def test_kagglehub_resolves_prefilled_cache_offline(tiny_sources, tmp_path, monkeypatch, no_network):
    kcache = tmp_path / "kagglehub"
    expected = _prefill(kcache, SOURCES["cifake"].handle, tiny_sources / "cifake")
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(kcache))
    assert download("cifake") == expected
    manifest = prepare(tmp_path / "cache", only=["cifake"], show_progress=False)  # no path: kagglehub
    src = manifest["datasets"]["cifake"]["source"]
    assert src["origin"] == "kagglehub" and src["handle"] == SOURCES["cifake"].handle and src["root"] == str(expected)
    assert set(load_splits(tmp_path / "cache")) == {"cifake_train", "cifake_val", "cifake_test"}


def test_no_network_error_says_what_to_do(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(SourceUnavailableError) as e:
        download("agiri")
    msg = str(e.value)
    assert msg.startswith("agiri: no network") and SOURCES["agiri"].handle in msg
    assert "--agiri PATH" in msg and "KAGGLEHUB_CACHE" in msg


def test_no_credentials_error_says_what_to_do(monkeypatch):
    import kagglehub
    from kagglehub.exceptions import UnauthenticatedError

    def refuse(handle, *a, **k):  # what kagglehub raises when Kaggle wants a login
        raise UnauthenticatedError()

    monkeypatch.setattr(kagglehub, "dataset_download", refuse)
    for var in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(SourceUnavailableError) as e:
        download("cifake")
    msg = str(e.value)
    assert "no Kaggle credentials" in msg and "KAGGLE_USERNAME" in msg and "--cifake PATH" in msg


def test_http_404_error(monkeypatch):
    import kagglehub
    import requests
    from kagglehub.exceptions import KaggleApiHTTPError

    def missing(handle, *a, **k):
        response = requests.Response()
        response.status_code = 404
        raise KaggleApiHTTPError("404 Client Error", response=response)

    monkeypatch.setattr(kagglehub, "dataset_download", missing)
    with pytest.raises(SourceUnavailableError, match=r"Kaggle has no dataset .*versions/1 \(HTTP 404\)"):
        download("cifar100")
