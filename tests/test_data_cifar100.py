"""CIFAR-100 pickles: both folder layouts, both pickle dialects, MD5 checks, hostile pickles refused."""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fakedet import REAL
from fakedet.data import LayoutError, UnsafePickleError, load_splits, prepare
from fakedet.data import cifar100 as c100
from fakedet.data.sources import find_root
from fakedet.data.synthetic import _py2_pickle

N = 30


def _content(seed: int = 0) -> tuple[np.ndarray, list[int], list[int]]:
    rng = np.random.default_rng(seed)
    # smooth pictures (a random colour ramp per image and plane), so a JPEG round trip stays close
    ramp = np.linspace(0, 1, 1024)[None, None]
    lo, hi = rng.uniform(0, 255, (2, N, 3, 1))
    data = np.rint(lo + (hi - lo) * ramp).astype(np.uint8).reshape(N, 3072)
    fine = rng.integers(0, 100, N).tolist()
    return data, fine, [f // 5 for f in fine]


def write_cifar100(folder: Path, dialect: str = "py2", seed: int = 0) -> Path:
    """The three pickles as the Toronto release (py2: cPickle protocol 2) or a Python 3 re-pickle holds them."""
    folder.mkdir(parents=True, exist_ok=True)
    data, fine, coarse = _content(seed)
    blobs = {
        "test": {
            b"filenames": [f"f_{i}.png".encode() for i in range(N)],
            b"batch_label": b"testing batch 1 of 1",
            b"fine_labels": fine,
            b"coarse_labels": coarse,
            b"data": data,
        },
        "meta": {
            b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
        },
    }
    for name, blob in blobs.items():
        if dialect == "py2":
            raw = _py2_pickle(blob)
        elif dialect == "py3-str-keys":  # a mirror re-pickled with str keys and numpy ints
            blob = {k.decode(): ([np.int64(x) for x in v] if k.endswith(b"labels") else v) for k, v in blob.items()}
            raw = pickle.dumps(blob, protocol=2)
        else:
            raw = pickle.dumps(blob, protocol=int(dialect[-1]))
        (folder / name).write_bytes(raw)
    return folder


@pytest.mark.parametrize("dialect", ["py2", "py3-proto2", "py3-proto5", "py3-str-keys"])
def test_reads_every_pickle_dialect(tmp_path, dialect):
    root = write_cifar100(tmp_path, dialect)
    split = c100.read_split(root, "test")
    data, fine, coarse = _content()
    assert split.images.shape == (N, 32, 32, 3) and split.images.dtype == np.uint8
    # channel-planar rows: red plane first, then green, then blue
    assert (
        split.images[3, 0, 1, 0] == data[3, 1]
        and split.images[3, 0, 1, 1] == data[3, 1024 + 1]
        and split.images[3, 2, 0, 2] == data[3, 2048 + 64]
    )
    assert split.fine.tolist() == fine and split.coarse.tolist() == coarse
    fine_names, coarse_names = c100.read_meta(root)
    assert fine_names[7] == "fine7" and len(coarse_names) == 20


def test_py2_writer_matches_what_the_standard_unpickler_and_torchvision_see(tmp_path):
    root = write_cifar100(tmp_path, "py2")
    with open(root / "test", "rb") as f:
        as_bytes = pickle.load(f, encoding="bytes")  # the keys CIFAR's own docs show: b'data'
    with open(root / "test", "rb") as f:
        as_latin1 = pickle.load(f, encoding="latin1")  # how torchvision reads them: str keys
    data, fine, _ = _content()
    assert np.array_equal(as_bytes[b"data"], data) and as_bytes[b"fine_labels"] == fine
    assert np.array_equal(as_latin1["data"], data) and as_latin1["filenames"][0] == "f_0.png"
    assert b"cnumpy.core.multiarray\n_reconstruct" in (root / "test").read_bytes()  # numpy 1.x's global name


@pytest.mark.parametrize("layout", ["toronto", "kaggle-root", "wrapped"])
def test_both_folder_layouts(tmp_path, layout):
    given = tmp_path / "src"
    if layout == "toronto":
        expect = write_cifar100(given / "cifar-100-python")
    elif layout == "kaggle-root":
        expect = write_cifar100(given)
    else:  # an archive extracted into a wrapper folder
        expect = write_cifar100(given / "download" / "cifar-100-python")
    assert find_root("cifar100", given) == expect
    cache = tmp_path / "cache"
    prepare(cache, cifar100=given, only=["cifar100"], show_progress=False)
    sets = load_splits(cache)
    assert set(sets) == {"cifar100_test", "cifar100_test_jpeg"}
    s = sets["cifar100_test"]
    assert len(s) == N and (s.labels == REAL).all() and s.real_only
    assert s.fine.tolist() == _content()[1] and s.coarse.tolist() == _content()[2]
    assert s.fine_names[0] == "fine0" and s.coarse_names[19] == "coarse19"
    assert s.paths[2] == "test#2:f_2.png"
    j = sets["cifar100_test_jpeg"]
    assert j.fine.tolist() == s.fine.tolist() and not np.array_equal(j.images, s.images)
    assert np.abs(j.images.astype(int) - s.images.astype(int)).mean() < 3  # the same pictures, compressed


def test_layout_error_says_what_was_expected_and_found(tmp_path):
    (tmp_path / "cifar-100-python").mkdir()
    (tmp_path / "cifar-100-python" / "data_batch_1").write_bytes(b"x")
    (tmp_path / "cifar-100-python.tar.gz").write_bytes(b"x")
    with pytest.raises(LayoutError) as e:
        find_root("cifar100", tmp_path)
    msg = str(e.value)
    assert "Expected the pickles 'test' and 'meta'" in msg and "cifar-100-python/" in msg
    assert "data_batch_1" in msg and "extract it first" in msg


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.mark.parametrize("proto", [0, 2, 5])
def test_hostile_pickle_is_refused_and_nothing_runs(tmp_path, proto):
    marker = tmp_path / "pwned"
    root = write_cifar100(tmp_path / "c")
    blob = {b"data": np.zeros((1, 3072), np.uint8), b"fine_labels": [0], b"coarse_labels": [0], b"x": _Evil(marker)}
    (root / "test").write_bytes(pickle.dumps(blob, protocol=proto))
    with pytest.raises(
        UnsafePickleError, match=r"refused to unpickle (posix|os|nt)\.system.*Nothing in it was executed"
    ):
        c100.read_split(root, "test")
    assert not marker.exists()
    # the same through prepare: the error surfaces, no cache is written
    with pytest.raises(UnsafePickleError):
        prepare(tmp_path / "cache", cifar100=root, only=["cifar100"], show_progress=False)
    assert not (tmp_path / "cache" / "manifest.json").exists()
    assert not marker.exists()
    with open(root / "test", "rb") as f:  # the control: the standard unpickler does run it
        pickle.load(f)
    assert marker.exists()


def test_other_smuggling_routes_are_refused(tmp_path):
    cases = {
        # builtins.eval("1+1"), hand-written: GLOBAL, a py2 str, TUPLE1, REDUCE
        "eval": b"\x80\x02cbuiltins\neval\nU\x031+1\x85R.",
        # _codecs.encode("abc", "zlib_codec"): an admitted global with an inadmissible argument
        "codec": b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x0a\x00\x00\x00zlib_codec\x86R.",
        # numpy's _reconstruct asked to build something other than an ndarray
        "subtype": b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\ndtype\nK\x00\x85U\x01b\x87R.",
        "object-array": pickle.dumps({b"data": np.array([1, "a"], dtype=object)}, protocol=2),
        "masked-array": pickle.dumps(np.ma.masked_array([1, 2], mask=[0, 1]), protocol=2),
    }
    for name, raw in cases.items():
        path = tmp_path / name
        path.write_bytes(raw)
        with pytest.raises(UnsafePickleError):
            c100.safe_load(path)


def test_md5_differs_from_official_is_said(tmp_path, caplog):
    root = write_cifar100(tmp_path / "c")
    with caplog.at_level(logging.WARNING, logger="fakedet.data"):
        manifest = prepare(tmp_path / "cache", cifar100=root, only=["cifar100"], show_progress=False)
    md5 = manifest["datasets"]["cifar100"]["md5"]
    assert md5["test"]["official"] is False and md5["test"]["expected"] == c100.OFFICIAL_MD5["test"]
    assert "differs from the official Toronto release" in caplog.text


def test_official_md5_recognised(tmp_path, caplog, monkeypatch):
    root = write_cifar100(tmp_path / "c")
    monkeypatch.setattr(
        c100,
        "OFFICIAL_MD5",
        {"test": c100.md5_of(root / "test"), "meta": c100.md5_of(root / "meta"), "train": "0" * 32},
    )
    with caplog.at_level(logging.WARNING, logger="fakedet.data"):
        manifest = prepare(tmp_path / "cache", cifar100=root, only=["cifar100"], show_progress=False)
    assert manifest["datasets"]["cifar100"]["md5"]["test"]["official"] is True
    assert "differs" not in caplog.text


def test_bad_contents_are_layout_errors(tmp_path):
    root = write_cifar100(tmp_path)
    (root / "test").write_bytes(
        pickle.dumps(
            {b"data": np.zeros((2, 100), np.uint8), b"fine_labels": [0, 0], b"coarse_labels": [0, 0]}, protocol=2
        )
    )
    with pytest.raises(LayoutError, match=r"must be uint8 N×3072"):
        c100.read_split(root, "test")
    (root / "test").write_bytes(
        pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"coarse_labels": [0, 0]}, protocol=2)
    )
    with pytest.raises(LayoutError, match="key 'fine_labels'"):
        c100.read_split(root, "test")


class _Declared:
    """Pickles as numpy's array reconstruction with a declared shape and no data after it."""

    def __init__(self, shape: tuple[int, ...], state: tuple | None = None) -> None:
        self.shape, self.state = shape, state

    def __reduce__(self):
        from numpy._core.multiarray import _reconstruct

        return (_reconstruct, (np.ndarray, self.shape, b"B"), *([self.state] if self.state else []))


class _DirectNdarray:
    def __reduce__(self):
        return (np.ndarray, ((500_000, 3072), np.dtype(np.uint8)))


def test_small_pickle_declaring_a_huge_array_is_refused_at_once(tmp_path):
    # 245 bytes that the previous reader accepted as 500,000 images (1.5 GB of unfilled memory read
    # back, 3.5 GB RSS through prepare): numpy's pickles always declare (0,) and fill in from the file
    root = write_cifar100(tmp_path)
    n = 500_000
    routes = {
        "declared shape": {b"data": _Declared((n, 3072)), b"fine_labels": _Declared((n,)), b"coarse_labels": _Declared((n,))},
        "direct ndarray call": {b"data": _DirectNdarray(), b"fine_labels": [0], b"coarse_labels": [0]},
    }  # fmt: skip
    for what, blob in routes.items():
        raw = pickle.dumps(blob, protocol=2)
        assert len(raw) < 400, what
        (root / "test").write_bytes(raw)
        with pytest.raises(UnsafePickleError, match=r"/test: refused: (an array declared with shape|a direct numpy)"):
            c100.read_split(root, "test")


def test_declared_sizes_must_match_the_bytes_in_the_file(tmp_path):
    root = write_cifar100(tmp_path)
    # an honest (0,) declaration whose filled-in state claims 500,000 rows from 3 kB of bytes: numpy
    # compares the byte count before it allocates, and the error is one line
    state = (1, (500_000, 3072), np.dtype(np.uint8), False, bytes(3072))
    (root / "test").write_bytes(
        pickle.dumps({b"data": _Declared((0,), state), b"fine_labels": [0], b"coarse_labels": [0]}, protocol=2)
    )
    with pytest.raises(LayoutError, match=r"/test: not a readable CIFAR-100 pickle, truncated or corrupt \(ValueError"):
        c100.read_split(root, "test")


def test_labels_must_be_lists_of_ints(tmp_path):
    root = write_cifar100(tmp_path)
    data = np.zeros((3, 3072), np.uint8)
    row = list(range(1000))
    cases = [
        np.zeros(3, np.int64),  # arrays may declare any size: CIFAR's labels are lists
        [row, row, row],  # memo references: 3 entries in the file, 3,000 numbers once read
        [b"a", b"b", b"c"],
    ]
    for labels in cases:
        blob = {b"data": data, b"fine_labels": labels, b"coarse_labels": [0, 0, 0]}
        (root / "test").write_bytes(pickle.dumps(blob, protocol=2))
        with pytest.raises(LayoutError, match="fine_labels must be a list of ints"):
            c100.read_split(root, "test")
    name = b"x" * 10_000  # one long name referenced by every row: refused before it is decoded N times
    blob = {b"data": data, b"fine_labels": [0] * 3, b"coarse_labels": [0] * 3, b"filenames": [name] * 3}
    (root / "test").write_bytes(pickle.dumps(blob, protocol=2))
    with pytest.raises(LayoutError, match="filenames must be a list of names of at most 255 characters"):
        c100.read_split(root, "test")


def test_truncated_pickle_is_a_one_line_error(tmp_path):
    root = write_cifar100(tmp_path / "c")
    raw = (root / "test").read_bytes()
    (root / "test").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(LayoutError, match=r"/test: not a readable CIFAR-100 pickle, truncated or corrupt"):
        c100.read_split(root, "test")
    # as a user meets it: `fakedet prepare` exits 2 with that line, no traceback
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "fakedet", "prepare", "--cifar100", str(root), "--only", "cifar100",
           "--cache", str(tmp_path / "cache"), "--no-download", "--quiet"]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 2, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "truncated or corrupt" in errors[0], run.stderr
    assert "Traceback" not in run.stderr and run.stderr.rstrip().splitlines()[-1] == errors[0]
    assert not (tmp_path / "cache" / "manifest.json").exists()
