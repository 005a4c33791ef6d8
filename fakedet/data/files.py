"""Reading input files safely: regular files only, never more than a bound.

A dataset folder may hold anything that has a file name: a FIFO (opening it waits for a writer
forever), a symlink to /dev/zero (reading it never ends), a dangling symlink, a directory named
`x.jpg`. Every input file is read through `open_regular` or `read_bounded`, which look at what the
name is (os.stat, following symlinks) before opening it, open without blocking, check again on the
open descriptor (the name may have changed in between) and refuse with `Unreadable(reason)`.
"""

from __future__ import annotations

import errno
import io
import os
import stat
from pathlib import Path


class Unreadable(Exception):
    """A file that is not read; the message is the reason (recorded in manifests, printed by CLIs)."""


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return f"a special file (mode {stat.filemode(mode)})"


def _stat_regular(path: str | Path) -> os.stat_result:
    try:
        st = os.stat(path)  # follows symlinks: a link to a regular file is read
    except FileNotFoundError:
        if os.path.islink(path):
            raise Unreadable(f"dangling symlink (to {os.readlink(path)})") from None
        raise Unreadable(f"cannot read: {os.strerror(errno.ENOENT)}") from None
    except OSError as e:
        raise Unreadable(f"cannot read: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise Unreadable(f"not a regular file: {_kind(st.st_mode)}")
    return st


def open_regular(path: str | Path) -> io.BufferedReader:
    """`path` opened for binary reading if it is a regular file (after symlinks), else `Unreadable`."""
    _stat_regular(path)
    try:
        # O_NONBLOCK: should the name have become a FIFO since the stat, opening it does not wait
        # (it has no effect on regular files); the check on the descriptor below then refuses it
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise Unreadable(f"cannot read: {e.strerror or e}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise Unreadable(f"not a regular file: {_kind(mode)}")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bounded(path: str | Path, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most `max_bytes`, else `Unreadable`.

    At most `max_bytes + 1` bytes are read, so a file that is larger than its stat says (a /proc file
    says 0, a file still growing) is refused without being read whole.
    """
    size = _stat_regular(path).st_size
    if size > max_bytes:
        raise Unreadable(f"file of {size:,} bytes exceeds max_file_bytes {max_bytes:,}")
    with open_regular(path) as f:
        try:
            data = f.read(max_bytes + 1)
        except OSError as e:
            raise Unreadable(f"cannot read: {e.strerror or e}") from None
    if len(data) > max_bytes:
        raise Unreadable(f"file holds more than max_file_bytes {max_bytes:,} bytes (its stat said {size:,})")
    return data
