"""Process supervision for the loopback cluster: start services, know all their processes, stop them by pid.

A service starts with `start_new_session=True`, so its session id is the pid we started. Its processes are
that pid, its descendants and whatever else lives in its session (a daemon that double-forks stays in
the session, though not in the tree), read through psutil at the start and every second after. Each
is recorded as (pid, create_time): a pid the kernel reuses later has another create time, so it is
never taken for ours, and psutil refuses to signal a reused pid.

Stopping: the service's own graceful signal to the pid we started (`ray start --block` stops its node
on SIGTERM; PostgreSQL takes SIGINT as a fast shutdown), then SIGTERM, then SIGKILL to each recorded
process still alive. Never by name (`pkill`, `ray stop`): that would reach other people's processes.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

GONE = (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied, ProcessLookupError, PermissionError)


@dataclass(frozen=True)
class Proc:
    """One process, as first seen: a later process with the same pid has another create_time."""

    pid: int
    create_time: float

    @classmethod
    def of(cls, process: psutil.Process) -> Proc:
        return cls(process.pid, process.create_time())

    def process(self) -> psutil.Process | None:
        """The running process, if it is still this one."""
        try:
            process = psutil.Process(self.pid)
            return process if process.create_time() == self.create_time else None
        except GONE:
            return None

    def alive(self) -> bool:
        """Still running: the same process, neither a zombie nor dead."""
        process = self.process()
        try:
            return process is not None and process.status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
        except GONE:
            return False

    def cmdline(self) -> list[str]:
        process = self.process()
        try:
            return process.cmdline() if process is not None else []
        except GONE:
            return []

    def signal(self, sig: int) -> None:
        process = self.process()
        if process is not None:
            try:
                process.send_signal(sig)  # psutil checks again that the pid was not reused
            except GONE:
                pass


def alive(p: Proc) -> bool:
    return p.alive()


def family(root: Proc) -> set[Proc]:
    """`root`, its descendants, and every process of its session (a session started with `root`)."""
    seeds = []
    for process in psutil.process_iter(["create_time"]):
        try:
            if process.info["create_time"] >= root.create_time and os.getsid(process.pid) == root.pid:
                seeds.append(process)
        except GONE:
            continue
    found = set()
    for process in seeds:
        try:
            found |= {Proc.of(process), *map(Proc.of, process.children(recursive=True))}
        except GONE:
            continue
    return found


def listening(procs) -> set[str]:
    """The TCP addresses (ip:port, [ip]:port for IPv6) these processes listen on."""
    found = set()
    for p in procs:
        process = p.process()
        try:
            connections = process.net_connections(kind="tcp") if process is not None else []
        except GONE:
            continue
        for c in connections:
            if c.status != psutil.CONN_LISTEN:
                continue
            ip = ipaddress.ip_address(c.laddr.ip.split("%")[0])
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
                ip = ip.ipv4_mapped
            found.add(f"{ip}:{c.laddr.port}" if ip.version == 4 else f"[{ip}]:{c.laddr.port}")
    return found


@dataclass
class Service:
    """A process tree started here: the pid we started, and every process of its tree or session seen since."""

    name: str
    popen: subprocess.Popen
    log: Path
    stop_signal: int = signal.SIGTERM
    root: Proc = field(init=False)
    procs: set[Proc] = field(default_factory=set)

    def __post_init__(self) -> None:
        try:
            self.root = Proc.of(psutil.Process(self.popen.pid))
        except GONE:  # ended already: nothing of it can be running
            self.root = Proc(self.popen.pid, 0.0)
        self.procs.add(self.root)

    def refresh(self) -> None:
        # called from the watcher thread and the main thread: readers iterate over list() copies
        self.procs |= family(self.root)

    def running(self) -> bool:
        return self.popen.poll() is None

    def left(self) -> list[Proc]:
        return sorted((p for p in list(self.procs) if p.alive()), key=lambda p: p.pid)

    def stop(self, grace: float = 30.0) -> list[Proc]:
        """Stop the tree by pid; returns the processes still alive afterwards (none, normally)."""
        self.refresh()
        if self.running():
            self.root.signal(self.stop_signal)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        self.refresh()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            left = self.left()
            if not left:
                break
            for p in left:
                p.signal(sig)
            deadline = time.time() + 10.0
            while time.time() < deadline and self.left():
                self.popen.poll()  # reaps the root if it has ended
                time.sleep(0.2)
        if self.popen.poll() is None:
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                pass
        return self.left()


class Supervisor:
    """Starts services, watches their processes and listening sockets once a second, stops them all."""

    def __init__(self, logs: Path, log: Callable[[str], None]) -> None:
        self.logs = logs
        self.log = log
        self.services: list[Service] = []
        self.heard: set[tuple[str, str]] = set()  # (service, ip:port) seen listening
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def spawn(self, name: str, cmd: list[str], env: dict[str, str], stop_signal: int = signal.SIGTERM,
              **popen_kw: Any) -> Service:
        """Start `cmd` in a new session, its output in logs/NAME.log."""
        log = self.logs / f"{name}.log"
        with open(log, "ab") as out:
            popen = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True, **popen_kw)
        service = Service(name, popen, log, stop_signal)
        self.services.append(service)
        self.log(f"started {name}: pid {popen.pid}: {' '.join(cmd)}")
        return service

    def watch(self) -> None:
        self._watcher = threading.Thread(target=self._watch, name="supervise-watch", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            try:
                for service in list(self.services):
                    service.refresh()
                    self.heard |= {(service.name, a) for a in listening(service.left())}
            except (psutil.Error, OSError) as e:  # a process ending mid-read; the next round sees it
                self.log(f"(process watch: {e!r})")

    def stop(self) -> list[tuple[str, Proc]]:
        """Stop every service, newest first, by pid; returns the processes still alive (none, normally)."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(5)
        left = []
        for service in reversed(self.services):
            procs = service.stop()
            left += [(service.name, p) for p in procs]
            self.log(f"stopped {service.name}: {len(service.procs)} process(es) "
                     f"({', '.join(str(p.pid) for p in sorted(service.procs, key=lambda p: p.pid))})"
                     + (f"; STILL RUNNING: {[p.pid for p in procs]}" if procs else ", none left"))
        return left

    def all_procs(self) -> set[Proc]:
        return {p for s in list(self.services) for p in list(s.procs)}


def log_tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def follow(service: Service, emit: Callable[[str], None]) -> None:
    """Pass a service's log on, line by line as it grows, until the service ends."""
    with open(service.log, errors="replace") as f:
        while True:
            line = f.readline()
            if line:
                emit(line.rstrip("\n"))
            elif not service.running():
                for rest in f.read().splitlines():
                    emit(rest)
                return
            else:
                time.sleep(0.2)
