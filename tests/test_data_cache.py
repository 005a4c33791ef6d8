"""The prepared cache: what load_splits returns, hits, misses, invalidation, splits, atomicity, races."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fakedet.data.builders as builders_mod
from fakedet import FAKE, REAL
from fakedet.data import (
    DEFAULT_SET_NAMES,
    CacheError,
    PrepareOptions,
    cache_hash,
    load_splits,
    prepare,
    read_manifest,
    resolve_data,
)
from fakedet.data.synthetic import SIZES

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_cache(tiny_root) -> Path:
    return tiny_root / "synthetic-tiny" / "cache"


@pytest.fixture
def sources(tiny_root, tmp_path) -> Path:
    """A private copy of the tiny stand-in's sources, free to modify."""
    dst = tmp_path / "src"
    shutil.copytree(tiny_root / "synthetic-tiny" / "sources", dst)
    return dst


def _prep(sources: Path, cache: Path, **kw) -> dict:
    return prepare(
        cache,
        cifake=sources / "cifake",
        agiri=sources / "agiri",
        cifar100=sources / "cifar100",
        show_progress=False,
        **kw,
    )


def test_load_splits_contract(tiny_cache):
    sets = load_splits(tiny_cache)
    assert list(sets) == list(DEFAULT_SET_NAMES)
    size = SIZES["tiny"]
    for name, s in sets.items():
        assert s.name == name
        assert s.images.dtype == np.uint8 and s.images.shape[1:] == (32, 32, 3)
        assert isinstance(s.images, np.memmap) and s.images.mode == "c"  # copy-on-write map
        assert s.paths is not None and len(s.paths) == len(s)
    assert len(sets["cifake_train"]) + len(sets["cifake_val"]) == 2 * size.cifake_train
    assert len(sets["cifake_val"]) == round(0.1 * size.cifake_train) * 2  # 10%, stratified
    assert sets["cifake_val"].counts() == {"real": 20, "fake": 20}
    assert len(sets["cifake_test"]) == 2 * size.cifake_test
    assert len(sets["agiri_test"]) == 2 * size.agiri_test  # 3 corrupt files skipped, all real images kept
    for name in ("cifar100_test", "cifar100_test_jpeg"):
        s = sets[name]
        assert s.real_only and len(s) == 100 * size.cifar100_test
        assert len(s.fine_names) == 100 and len(s.coarse_names) == 20
        assert s.fine.max() == 99 and s.coarse.max() == 19 and (s.fine // 5 == s.coarse).all()
    # no image is in two of CIFAKE's splits
    tr, va, te = (set(sets[k].paths) for k in ("cifake_train", "cifake_val", "cifake_test"))
    assert not (tr & va) and not (tr & te) and not (va & te)
    # labels follow the folders
    for name in ("cifake_train", "agiri_test"):
        s = sets[name]
        for p, y in zip(s.paths, s.labels):
            assert y == (REAL if ("/REAL/" in p or "/real/" in p) else FAKE)


def test_manifest_schema(tiny_cache):
    m = read_manifest(tiny_cache)
    assert m["cache_hash"] == cache_hash(tiny_cache) and len(m["cache_hash"]) == 12
    for ds in ("cifake", "agiri", "cifar100"):
        for split in ("train", "test"):
            e = m["datasets"][ds][split]
            assert isinstance(e["real"], int) and isinstance(e["fake"], int)
            for s in e["skipped"]:
                assert set(s) == {"path", "reason"}
    skipped = {s["path"]: s["reason"] for s in m["datasets"]["agiri"]["test"]["skipped"]}
    assert set(skipped) == {"test/real/corrupt truncated.jpg", "test/real/empty.jpg", "test/real/not-an-image.png"}
    assert "empty file" in skipped["test/real/empty.jpg"]
    assert "test/real/Thumbs.db" in m["datasets"]["agiri"]["test"]["ignored"]
    assert (
        m["options"]["val_fraction"] == 0.1
        and m["options"]["agiri_val_size"] == 2000
        and m["options"]["resize"] == "bilinear"
    )
    # the tiny AGIRI train cannot fill 2,000: the clip is recorded
    train = m["datasets"]["agiri"]["train"]
    assert train["requested"] == 2000 and "clipped to 120" in train["clipped"]
    assert m["datasets"]["cifake"]["source"]["standin"] is True
    assert m["datasets"]["cifake"]["jpeg_quality_estimate"] == 90
    json.dumps(m)  # plain JSON all through


def test_writes_to_a_loaded_set_never_reach_the_cache(tiny_cache):
    s = load_splits(tiny_cache)["cifake_test"]
    before = np.array(s.images[0])
    s.images[0] = 7
    assert np.array_equal(load_splits(tiny_cache)["cifake_test"].images[0], before)


def test_warm_load_maps_the_cache_without_reading_it(tiny_cache):
    """A later load opens memory maps: no image is read or decoded until a trial touches it (its speed
    is benchmarks/bench_data.py's figure)."""
    images = load_splits(tiny_cache)["cifake_train"].images
    base = images
    while not isinstance(base, np.memmap) and getattr(base, "base", None) is not None:
        base = base.base
    assert isinstance(base, np.memmap) and base.mode in ("r", "c")  # read-only or copy-on-write


def test_unchanged_input_never_decodes_twice(sources, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = _prep(sources, cache)
    before = json.loads((cache / "manifest.json").read_text())

    def no_decoding(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(builders_mod, "decode_files", no_decoding)
    again = _prep(sources, cache)
    assert again["cache_hash"] == first["cache_hash"]
    assert json.loads((cache / "manifest.json").read_text()) == before  # not even rewritten
    # a different split fraction re-splits the decoded arrays, still without decoding
    third = _prep(sources, cache, options=PrepareOptions(val_fraction=0.2))
    assert third["cache_hash"] != first["cache_hash"]
    assert len(load_splits(cache)["cifake_val"]) == 80


def test_changed_file_rebuilds_only_its_unit(sources, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = _prep(sources, cache)
    victim = sources / "cifake" / "test" / "FAKE" / "0 (2).jpg"
    victim.write_bytes((sources / "cifake" / "test" / "REAL" / "0000.jpg").read_bytes())
    calls = []
    real = builders_mod.decode_files

    def spy(root, relpaths, *a, **k):
        calls.append((Path(root).name, len(relpaths)))
        return real(root, relpaths, *a, **k)

    monkeypatch.setattr(builders_mod, "decode_files", spy)
    second = _prep(sources, cache)
    assert calls == [("cifake", 2 * SIZES["tiny"].cifake_test)]  # cifake/test alone
    assert second["cache_hash"] != first["cache_hash"]
    assert second["sets"]["cifake_train"]["content"] == first["sets"]["cifake_train"]["content"]
    new = load_splits(cache)["cifake_test"]
    row = list(new.paths).index("test/FAKE/0 (2).jpg")
    assert np.array_equal(new.images[row], new.images[list(new.paths).index("test/REAL/0000.jpg")])
    # the old unit is gone: the cache holds what the manifest names, nothing else
    units = {p.name for p in (cache / "units").iterdir()}
    assert units == {Path(u).name for d in second["datasets"].values() for u in d["units"]}


def test_preprocessing_option_invalidates(sources, tmp_path):
    cache = tmp_path / "cache"
    a = _prep(sources, cache)
    agiri_a = np.array(load_splits(cache)["agiri_test"].images)
    b = _prep(sources, cache, options=PrepareOptions(resize="pil-default"))
    agiri_b = load_splits(cache)["agiri_test"].images
    assert b["cache_hash"] != a["cache_hash"] and b["options"]["resize"] == "pil-default"
    assert not np.array_equal(agiri_a, agiri_b)  # AGIRI images are resized: the filter matters
    c = _prep(sources, cache, options=PrepareOptions(cifar100_jpeg=False))
    assert (
        "cifar100_test_jpeg" not in load_splits(cache)
        and c["datasets"]["cifar100"]["options"]["cifar100_jpeg"] is False
    )


def test_cache_hash_names_content_not_location(sources, tmp_path):
    a = _prep(sources, tmp_path / "a")
    moved = tmp_path / "elsewhere"
    shutil.copytree(sources, moved)  # new paths and new mtimes, same bytes
    os.utime(moved / "cifake" / "test" / "REAL" / "0000.jpg", (1, 1))
    b = _prep(moved, tmp_path / "b")
    assert a["cache_hash"] == b["cache_hash"]


def test_split_determinism(sources, tmp_path):
    a = _prep(sources, tmp_path / "a")
    b = _prep(sources, tmp_path / "b")
    sa, sb = load_splits(tmp_path / "a"), load_splits(tmp_path / "b")
    for k in ("cifake_val", "agiri_val", "cifake_train"):
        assert list(sa[k].paths) == list(sb[k].paths) and np.array_equal(sa[k].images, sb[k].images)
    assert a["cache_hash"] == b["cache_hash"]
    _prep(sources, tmp_path / "c", options=PrepareOptions(seed=1, agiri_val_size=40))
    sc = load_splits(tmp_path / "c")
    assert list(sc["cifake_val"].paths) != list(sa["cifake_val"].paths)
    assert sc["agiri_val"].counts() == {"real": 20, "fake": 20}


def test_agiri_val_replaces_corrupt_files(tmp_path):
    # the seeded order of AGIRI train, with the sample's first pick made corrupt: the next file takes its place
    from fakedet.data.sources import list_split
    from fakedet.data.splits import sample_order
    from fakedet.data.synthetic import make_synthetic

    src = make_synthetic(tmp_path / "src", "tiny", show_progress=False)
    listing = list_split("agiri", src / "agiri", "train")
    fake_order, real_order = sample_order(listing.labels, seed=0)
    first_real = listing.relpaths[real_order[0]]
    (src / "agiri" / first_real).write_bytes(b"")
    prepare(
        tmp_path / "cache",
        agiri=src / "agiri",
        only=["agiri"],
        options=PrepareOptions(agiri_val_size=10),
        show_progress=False,
    )
    val = load_splits(tmp_path / "cache")["agiri_val"]
    assert val.counts() == {"real": 5, "fake": 5}
    assert first_real not in set(val.paths) and listing.relpaths[real_order[5]] in set(val.paths)
    m = read_manifest(tmp_path / "cache")
    assert {"path": first_real, "reason": "empty file (0 bytes)"} in m["datasets"]["agiri"]["train"]["skipped"]


def test_crash_leaves_no_half_cache(sources, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    good = _prep(sources, cache)

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(builders_mod, "decode_files", boom)
    with pytest.raises(KeyboardInterrupt):
        _prep(sources, cache, options=PrepareOptions(resize="box"))
    assert read_manifest(cache)["cache_hash"] == good["cache_hash"]  # the old cache, intact
    assert not [p for p in (cache / "units").iterdir() if p.name.startswith(".tmp")]
    assert len(load_splits(cache)) == len(DEFAULT_SET_NAMES)


def test_only_keeps_other_datasets(sources, tmp_path):
    cache = tmp_path / "cache"
    _prep(sources, cache)
    prepare(cache, cifar100=sources / "cifar100", only=["cifar100"], show_progress=False)
    assert list(load_splits(cache)) == list(DEFAULT_SET_NAMES)


def test_missing_or_broken_cache_errors(tmp_path, tiny_cache):
    with pytest.raises(CacheError, match="not a prepared cache .*fakedet prepare --cache"):
        load_splits(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_cache, broken)
    unit = broken / read_manifest(broken)["sets"]["cifake_test"]["unit"]
    (unit / "cifake_test.labels.npy").unlink()
    with pytest.raises(CacheError, match="set cifake_test is incomplete"):
        load_splits(broken)


def test_resolve_data_specs(tiny_root, tiny_cache, tmp_path):
    assert resolve_data("synthetic", tiny_root, size="tiny") == tiny_cache  # idempotent
    assert resolve_data(str(tiny_cache), tmp_path) == tiny_cache  # a prepared cache, as it is
    src = tiny_root / "synthetic-tiny" / "sources"
    via_folder = resolve_data(str(src), tmp_path / "root", show_progress=False)
    assert via_folder.parent == tmp_path / "root" and cache_hash(via_folder) == cache_hash(tiny_cache)
    with pytest.raises(FileNotFoundError, match="no such folder, and not 'synthetic' or 'kaggle'"):
        resolve_data(str(tmp_path / "nothing"), tmp_path)
    (tmp_path / "partial" / "cifake").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="holds cifake/ but not agiri/, cifar100/"):
        resolve_data(str(tmp_path / "partial"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a prepared cache"):
        resolve_data(str(tmp_path / "empty"), tmp_path)
    with pytest.raises(ValueError, match="unknown stand-in size 'huge'"):
        resolve_data("synthetic", tmp_path, size="huge")


def test_resolve_data_is_safe_from_two_processes(tmp_path):
    code = (
        "import sys; from fakedet.data import resolve_data, cache_hash; "
        "p = resolve_data('synthetic', sys.argv[1], size='tiny', show_progress=False); print(p, cache_hash(p))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert outs[0][0] == outs[1][0]  # same folder, same hash
    assert not [p for p in tmp_path.rglob(".tmp-*")]
    assert len(load_splits(tmp_path / "synthetic-tiny" / "cache")) == len(DEFAULT_SET_NAMES)


def test_data_option_helper(tiny_root, tiny_cache):
    import argparse

    from fakedet.data.cli import add_data_arguments, resolve_data_args

    parser = argparse.ArgumentParser()
    add_data_arguments(parser)
    args = parser.parse_args(["--data-size", "tiny", "--cache-root", str(tiny_root)])
    assert args.data == "synthetic"
    assert resolve_data_args(args, show_progress=False) == tiny_cache
    args = parser.parse_args(["--data", str(tiny_cache)])
    assert resolve_data_args(args) == tiny_cache


@pytest.mark.timeout(300)
def test_prepare_lists_special_files_as_skipped_and_never_hangs(sources, tmp_path):
    # a FIFO named like an image used to hang `fakedet prepare` for ever, holding the cache lock;
    # a link to /dev/zero to exhaust memory; a dangling link to abort the whole prepare
    from test_data_files import special_files

    expected = {f"test/real/{k}": v for k, v in special_files(sources / "agiri" / "test" / "real").items()}
    os.mkfifo(sources / "cifake" / "train" / "REAL" / "0 fifo.jpg")  # sorts first: the JPEG quality probe meets it
    cmd = [sys.executable, "-m", "fakedet", "prepare", "--sources", str(sources), "--cache", str(tmp_path / "cache"),
           "--no-download", "--workers", "0", "--quiet"]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr[-3000:]
    m = read_manifest(tmp_path / "cache")
    skipped = {s["path"]: s["reason"] for s in m["datasets"]["agiri"]["test"]["skipped"]}
    for path, reason in expected.items():
        assert reason in skipped[path], (path, skipped.get(path))
    cifake = {s["path"]: s["reason"] for s in m["datasets"]["cifake"]["train"]["skipped"]}
    assert cifake == {"train/REAL/0 fifo.jpg": "not a regular file: a FIFO (named pipe)"}
    assert m["datasets"]["cifake"]["jpeg_quality_estimate"] == 90  # from the next file
    assert len(load_splits(tmp_path / "cache")["agiri_test"]) == 2 * SIZES["tiny"].agiri_test


def test_current_cache_is_used_without_the_writers_lock(sources, tmp_path, monkeypatch):
    import fakedet.data.build as build_mod

    cache = tmp_path / "cache"
    first = _prep(sources, cache)
    (cache / ".lock").unlink()

    def no_lock(path, what):
        raise AssertionError(f"took the writers' lock {path} ({what})")

    monkeypatch.setattr(build_mod, "writer_lock", no_lock)
    assert _prep(sources, cache) == first
    assert not (cache / ".lock").exists()

    # out of date and not writable: one line saying so, not "[Errno 30] Read-only file system"
    def read_only(path, what):
        raise OSError(30, "Read-only file system", str(path))

    monkeypatch.setattr(build_mod, "writer_lock", read_only)
    with pytest.raises(CacheError, match=r"cannot write here \(Read-only file system\), and the cache is not current"):
        _prep(sources, cache, options=PrepareOptions(val_fraction=0.2))
    assert read_manifest(cache) == first


def _can_mount_read_only(folder: Path) -> bool:
    probe = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && ! touch "$1/probe" 2>/dev/null'
    try:
        return subprocess.run(["unshare", "-m", "sh", "-c", probe, "sh", str(folder)], capture_output=True).returncode == 0
    except OSError:
        return False


@pytest.mark.timeout(300)
def test_read_only_store(tiny_root, tmp_path):
    # The tiny stand-in's store, bind-mounted read-only in a private mount namespace (root ignores
    # file modes, not a read-only mount): writes fail with EROFS, as on a shared read-only store.
    if not _can_mount_read_only(tmp_path):
        pytest.skip("needs `unshare -m` and mount (CAP_SYS_ADMIN) for a read-only bind mount")
    code = (
        "import sys; from fakedet.data import PrepareOptions, resolve_data, load_splits, cache_hash, DataError\n"
        "p = resolve_data('synthetic', sys.argv[1], size='tiny', show_progress=False)\n"
        "print(len(load_splits(p)), cache_hash(p))\n"
        "try:\n"
        "    resolve_data('synthetic', sys.argv[1], size='tiny', options=PrepareOptions(seed=1), show_progress=False)\n"
        "except DataError as e:\n"
        "    print('error:', e)\n"
    )
    script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'
    run = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, "sh", str(tiny_root), sys.executable, "-c", code, str(tiny_root)],
        capture_output=True, text=True, timeout=240, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    first, second = run.stdout.splitlines()
    assert first == f"{len(DEFAULT_SET_NAMES)} {cache_hash(tiny_root / 'synthetic-tiny' / 'cache')}"
    assert "cannot write here (Read-only file system), and the cache is not current" in second
