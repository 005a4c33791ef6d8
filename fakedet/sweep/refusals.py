"""Why a sweep refuses to start (or stops), each with its own exit status, so that a script or a
Kubernetes Job can tell a typo from an unreachable server from someone else's running driver.

The statuses follow BSD's sysexits.h where one fits; README.md ("Exit codes") lists them all."""

from __future__ import annotations

import errno
import re
from enum import IntEnum


class Exit(IntEnum):
    OK = 0
    FAILED_TRIALS = 1      # the sweep ran; some trials failed, or the analysis reported a problem
    BAD_REQUEST = 2        # a flag, name or study value is wrong (argparse's own status for usage errors)
    UNTRUSTED_STATE = 65   # EX_DATAERR: the saved experiment state is writable by others, or changed since its last stop
    CORRUPT_STATE = 66     # EX_NOINPUT: a file the sweep must read back (sweep file, tuner.pkl, a checkpoint) is unreadable
    BAD_CREDENTIALS = 67   # EX_NOUSER: the tracking server refused the credentials (HTTP 401)
    TRACKING_DOWN = 69     # EX_UNAVAILABLE: the tracking store cannot be reached at start
    SWEEP_LOCKED = 71      # another driver holds this sweep's lock
    DISK_FULL = 72         # no space left on a device the sweep writes (storage, cache, tracking store, a trial's checkpoint)
    STORAGE_READONLY = 73  # EX_CANTCREAT: the Ray storage path cannot be written
    CACHE_READONLY = 74    # EX_IOERR: the prepared-data cache cannot be written
    TRACKING_OUTAGE = 75   # EX_TEMPFAIL: the tracking store went away mid-sweep for longer than --tracking-outage
    NOT_PERMITTED = 77     # EX_NOPERM: the user may not create runs in the experiment (HTTP 403, or the store refused a write)
    INTERRUPTED = 130      # Ctrl-C (128 + SIGINT); the resume command is printed
    TERMINATED = 143       # SIGTERM (128 + 15: a Kubernetes pod or a batch job stopped): handled as Ctrl-C


class Refused(Exception):
    """A sweep that must not go on: one line for the user, and the exit status that says which fault."""

    def __init__(self, message: str, code: Exit) -> None:
        super().__init__(message)
        self.code = code


# The mark a fatal trial error carries in its text: Ray hands the driver a trial's exception as the text of
# its traceback (`error.txt`, `RayTaskError`), and the text is what the driver reads (never a pickle).
FATAL_MARK = re.compile(r"fakedet-fatal\[(\d+)\] ([^\n]*)")


class FatalTrialError(Exception):
    """A trial's fault that a retry on the same files cannot remove (a full disk, a checkpoint that does not
    load): the sweep stops resumably with one line instead of Tune retrying the trial as a crash."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message, int(code))
        self.message, self.code = message, int(code)

    def __str__(self) -> str:
        return f"fakedet-fatal[{self.code}] {self.message}"


class Stopping:
    """The refusal that is stopping this process's sweep (one driver per process), set by
    `execute.FatalStop` the moment it sees a fatal trial error; the other callbacks read it (a trial that
    is not retried is not announced as a retry)."""

    refusal: Refused | None = None


def fatal_in(text: str) -> Refused | None:
    """The refusal a trial's error text carries (the last one in it), None for an ordinary crash."""
    found = FATAL_MARK.findall(text or "")
    if not found:
        return None
    code, message = found[-1]
    return Refused(message.strip(), Exit(int(code)))


# ENOSPC as Python words it, with the file where the OS named one
_ENOSPC_TEXT = re.compile(r"No space left on device(?:: '([^']+)')?|database or disk is full")


def disk_full(e: BaseException) -> str | None:
    """Where the disk is full, when `e` (or an exception it was raised from) says no space is left: ENOSPC
    (errno 28, with the file's path where the OS gave one), or its text in a wrapped error (pyarrow, Ray's
    trial errors, SQLite's "database or disk is full")."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return str(e.filename) if e.filename else UNKNOWN_DEVICE
        found = _ENOSPC_TEXT.search(str(e))
        if found:
            return found.group(1) or UNKNOWN_DEVICE
        e = e.__cause__ or e.__context__
    return None


UNKNOWN_DEVICE = "a device the sweep writes (the storage path, the cache, the tracking store or the temp folder)"
