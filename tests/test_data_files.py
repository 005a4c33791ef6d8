"""Input files are read only when they are regular files, and never beyond a bound."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fakedet.data import files
from fakedet.data.files import Unreadable, open_regular, read_bounded


def special_files(folder: Path) -> dict[str, str]:
    """Names of an image that are not regular files, each with a fragment of its expected reason.
    Opening the FIFO would wait for a writer forever; reading /dev/zero would never end."""
    folder.mkdir(parents=True, exist_ok=True)
    os.mkfifo(folder / "fifo.jpg")
    (folder / "zero.jpg").symlink_to("/dev/zero")
    (folder / "dangling.jpg").symlink_to(folder / "gone.jpg")
    (folder / "dir.jpg").mkdir()
    return {
        "fifo.jpg": "not a regular file: a FIFO",
        "zero.jpg": "not a regular file: a character device",
        "dangling.jpg": "dangling symlink",
        "dir.jpg": "not a regular file: a directory",
    }


@pytest.mark.timeout(60)
def test_special_files_are_refused_unopened(tmp_path):
    for name, reason in special_files(tmp_path).items():
        with pytest.raises(Unreadable, match=reason):
            read_bounded(tmp_path / name, 1000)
        with pytest.raises(Unreadable, match=reason):
            open_regular(tmp_path / name)


def test_regular_files_and_links_to_them_are_read(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x" * 100)
    (tmp_path / "link.jpg").symlink_to(tmp_path / "a.jpg")
    assert read_bounded(tmp_path / "a.jpg", 100) == b"x" * 100  # exactly the bound: read
    assert read_bounded(tmp_path / "link.jpg", 100) == b"x" * 100
    with pytest.raises(Unreadable, match="file of 100 bytes exceeds max_file_bytes 99"):
        read_bounded(tmp_path / "a.jpg", 99)
    with pytest.raises(Unreadable, match="cannot read: No such file"):
        read_bounded(tmp_path / "missing.jpg", 100)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
def test_a_file_larger_than_its_stat_says_is_cut_at_the_bound(tmp_path, monkeypatch):
    # /proc files are regular files whose stat says 0 bytes: only the read bound catches them
    status = Path("/proc/self/status")
    assert status.stat().st_size == 0 and len(status.read_bytes()) > 201
    (tmp_path / "status.jpg").symlink_to(status)
    asked: list[int] = []

    class Spy:  # the file object read_bounded gets, recording how much it asks for
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def read(self, n=-1):
            asked.append(n)
            return self.f.read(n)

    real = files.open_regular
    monkeypatch.setattr(files, "open_regular", lambda path: Spy(real(path)))
    with pytest.raises(Unreadable, match="holds more than max_file_bytes 200 bytes"):
        read_bounded(tmp_path / "status.jpg", 200)
    assert asked == [201]
