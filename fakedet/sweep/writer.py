"""Tracking writes and reads that survive an outage of the tracking store.

`retrying` is the one retry loop: a call failing for a transient reason (`transient`: the store is
away, overloaded or locked) is retried with backoff, 1 s doubling to 30 s, until the store has been
unreachable for the outage budget; a call the store refuses (a bad request, wrong credentials) fails at
once. `TrackingWriter` applies the driver's writes through it on one background thread, in order, so
Ray's event loop never waits on MLflow; `writer_for` gives the driver's one writer per store.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import requests
import sqlalchemy.exc
import urllib3.exceptions
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from fakedet.console import say as console_say

T = TypeVar("T")

# What reaching the store can raise while it is away, restarting or busy. MLflow's REST client wraps
# these in an MlflowException ("API request to ... failed with exception ...") raised while handling
# them, so they are found on the exception's chain; SQLite raises OperationalError ("database is
# locked") while another process writes.
_UNREACHABLE = (
    requests.exceptions.ConnectionError, requests.exceptions.Timeout, requests.exceptions.ChunkedEncodingError,
    requests.exceptions.RetryError,  # the REST client's own retries of 429 and 5xx ran out
    urllib3.exceptions.ProtocolError, urllib3.exceptions.TimeoutError, urllib3.exceptions.NewConnectionError,
    urllib3.exceptions.MaxRetryError, urllib3.exceptions.ResponseError,
    sqlalchemy.exc.OperationalError, sqlalchemy.exc.DisconnectionError, sqlalchemy.exc.TimeoutError,
    ConnectionError, TimeoutError,
)
# an OSError about a local path is a mistake to report, not an outage to wait out
_LOCAL_PATH_ERRORS = (PermissionError, FileNotFoundError, IsADirectoryError, NotADirectoryError)


class TrackingUnavailable(RuntimeError):
    """The tracking store stayed unreachable for longer than the outage budget, or refused a request
    (`status`: the HTTP status of the refusal, e.g. 401 or 403; None when it never answered)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status

    def __reduce__(self):  # keeps `status` across a pickle (Ray may carry the exception between processes)
        return type(self), (str(self), self.status)


def _chain(e: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def http_status(e: BaseException) -> int | None:
    """The HTTP status the store answered with, if the failure was an answer (None when it never answered)."""
    for link in _chain(e):
        if isinstance(link, requests.exceptions.HTTPError) and link.response is not None:
            return link.response.status_code
        if isinstance(link, MlflowException) and link.__cause__ is None and link.__context__ is None:
            return link.get_http_status_code()
    return None


def _status_transient(status: int) -> bool:
    return status >= 500 or status == 429  # overloaded or restarting; any other 4xx refuses the request itself


def _verdict(e: BaseException) -> bool | None:
    if isinstance(e, MlflowException):
        if e.__cause__ is not None or e.__context__ is not None:
            return None  # the client's wrapper: what it wraps decides
        return _status_transient(e.get_http_status_code())
    if isinstance(e, requests.exceptions.HTTPError) and e.response is not None:
        return _status_transient(e.response.status_code)
    if isinstance(e, _UNREACHABLE):
        return True
    if isinstance(e, requests.exceptions.RequestException):
        return False  # InvalidURL, MissingSchema, ...: a wrong request, whatever the store's state
    if isinstance(e, OSError):
        return not isinstance(e, _LOCAL_PATH_ERRORS)
    return None


def transient(e: BaseException) -> bool:
    """A failure of reaching the store (worth a retry), not a refusal of what was asked."""
    for link in _chain(e):
        verdict = _verdict(link)
        if verdict is not None:
            return verdict
    return False


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def unavailable(uri: str, e: BaseException, outage_s: float, what: str = "a write") -> TrackingUnavailable:
    """The one line that says why the sweep can no longer track."""
    status = http_status(e)
    if status in (401, 403):
        why = (f"refused the sweep's credentials (HTTP {status}); set MLFLOW_TRACKING_USERNAME and "
               f"MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) to a user that may write this experiment")
    elif transient(e):
        why = f"was unreachable for over {outage_s:g} s"
    else:
        why = f"refused {what}"
    return TrackingUnavailable(f"the MLflow tracking store {uri} {why} ({type(e).__name__}: {first_line(e)})",
                               None if transient(e) else status)


def retrying(call: Callable[[], T], outage_s: float, backoff_s: float = 1.0, max_backoff_s: float = 30.0,
             on_failure: Callable[[BaseException, float], None] | None = None,
             sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> T:
    """`call()`, retried through an outage: after a transient failure wait `backoff_s`, doubling up to
    `max_backoff_s`, until `outage_s` have passed since the first failure; then, or at once for a failure
    that is not transient, the last exception is raised. `on_failure(e, seconds_down)` runs before each wait."""
    down_since, wait = None, backoff_s
    while True:
        try:
            return call()
        except Exception as e:  # noqa: BLE001 - classified by `transient`, raised as is when not worth a retry
            if not transient(e):
                raise
            now = clock()
            down_since = now if down_since is None else down_since
            if now - down_since >= outage_s:
                raise
            if on_failure is not None:
                on_failure(e, now - down_since)
            sleep(min(wait, max(outage_s - (now - down_since), 0.0)))
            wait = min(wait * 2, max_backoff_s)


class TrackingWriter:
    """One background thread applying tracking writes in order, each through `retrying`.

    A write that fails transiently (server down, connection refused, HTTP 5xx or 429, SQLite locked) is
    retried until it succeeds or the store has been unreachable for `outage_s` seconds; a write the store
    refuses is not retried. Either way the writer then stops for good and `check()` raises
    `TrackingUnavailable`. Nothing is dropped: what was queued is replayed by `--resume`, which logs only
    what is missing.
    """

    def __init__(self, uri: str, outage_s: float = 600.0, backoff_s: float = 1.0, max_backoff_s: float = 30.0,
                 say: Callable[[str], None] = console_say) -> None:
        self.uri, self.outage_s, self.backoff_s, self.max_backoff_s, self.say = uri, outage_s, backoff_s, max_backoff_s, say
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._client: MlflowClient | None = None
        self._thread = threading.Thread(target=self._drain, name="fakedet-tracking-writer", daemon=True)
        self._thread.start()

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.uri)
        return self._client

    def submit(self, write: Callable[[MlflowClient], Any]) -> None:
        """Queue a write; raises TrackingUnavailable once the writer has given up."""
        self.check()
        self._queue.put(write)

    def check(self) -> None:
        if self._error is not None:
            raise unavailable(self.uri, self._error, self.outage_s)

    def read(self, read: Callable[[MlflowClient], T]) -> T:
        """A read needed at once (on the caller's thread), retried like a write; TrackingUnavailable when
        the store stays away or refuses it."""
        try:
            return retrying(lambda: read(self.client), self.outage_s, self.backoff_s, self.max_backoff_s,
                            on_failure=lambda e, down: self._reconnect())
        except Exception as e:  # noqa: BLE001 - reported as one line
            raise unavailable(self.uri, e, self.outage_s, "a read") from None

    def pending(self) -> int:
        return self._queue.unfinished_tasks

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued write is applied (True) or the writer failed / the timeout passed (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._queue.unfinished_tasks and self._error is None:
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return self._error is None

    def _drain(self) -> None:
        while True:
            write = self._queue.get()
            try:
                if self._error is None:
                    self._apply(write)
            finally:
                self._queue.task_done()

    def _reconnect(self) -> None:
        self._client = None  # a fresh client: a new connection pool after the server's restart

    def _apply(self, write: Callable[[MlflowClient], Any]) -> None:
        down: list[float] = []

        def failed(e: BaseException, seconds_down: float) -> None:
            if not down:
                self.say(f"[tracking] {self.uri} unreachable ({first_line(e)}); training goes on, writes are queued "
                         f"and retried for up to {self.outage_s:g} s")
            down[:] = [time.monotonic() - seconds_down]
            self._reconnect()

        try:
            retrying(lambda: write(self.client), self.outage_s, self.backoff_s, self.max_backoff_s, on_failure=failed)
        except Exception as e:  # noqa: BLE001 - any failure of the store ends the writer, reported once by check()
            self._error = e
            return
        if down:
            self.say(f"[tracking] {self.uri} is back after {time.monotonic() - down[0]:.0f} s; "
                     f"{self._queue.unfinished_tasks - 1} queued writes follow")


_WRITERS: dict[str, TrackingWriter] = {}


def writer_for(uri: str, outage_s: float = 600.0) -> TrackingWriter:
    """The driver's one writer per store: `Tuner.restore` unpickles its own callback, and the driver
    must still be able to wait for that callback's writes."""
    if uri not in _WRITERS:
        _WRITERS[uri] = TrackingWriter(uri, outage_s=outage_s)
    return _WRITERS[uri]
