"""Why a sweep refuses to start (or stops), each with its own exit status, so that a script or a
Kubernetes Job can tell a typo from an unreachable server from someone else's running driver.

The statuses follow BSD's sysexits.h where one fits; README.md ("Exit codes") lists them all."""

from __future__ import annotations

from enum import IntEnum


class Exit(IntEnum):
    OK = 0
    FAILED_TRIALS = 1      # the sweep ran; some trials failed, or the analysis reported a problem
    BAD_REQUEST = 2        # a flag, name or study value is wrong (argparse's own status for usage errors)
    UNTRUSTED_STATE = 65   # EX_DATAERR: the saved experiment state is writable by others, changed since its last stop, or missing
    BAD_CREDENTIALS = 67   # EX_NOUSER: the tracking server refused the credentials (HTTP 401)
    TRACKING_DOWN = 69     # EX_UNAVAILABLE: the tracking store cannot be reached at start
    SWEEP_LOCKED = 71      # another driver holds this sweep's lock
    STORAGE_READONLY = 73  # EX_CANTCREAT: the Ray storage path cannot be written
    CACHE_READONLY = 74    # EX_IOERR: the prepared-data cache cannot be written
    TRACKING_OUTAGE = 75   # EX_TEMPFAIL: the tracking store went away mid-sweep for longer than --tracking-outage
    NOT_PERMITTED = 77     # EX_NOPERM: the user may not create runs in the experiment (HTTP 403, or the store refused a write)
    INTERRUPTED = 130      # Ctrl-C (128 + SIGINT); the resume command is printed


class Refused(Exception):
    """A sweep that must not go on: one line for the user, and the exit status that says which fault."""

    def __init__(self, message: str, code: Exit) -> None:
        super().__init__(message)
        self.code = code
