"""The loopback cluster's parts that need no servers: process supervision (tools/loopback/supervise.py) and the
check on Ray's private code for ray-project/ray#59110 (tools/loopback/ray_on_loopback.py). Seconds, Linux.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from importlib.metadata import version
from pathlib import Path
from types import ModuleType

import pytest

LOOPBACK = Path(__file__).resolve().parents[1] / "tools" / "loopback"
sys.path.insert(0, str(LOOPBACK))
psutil = pytest.importorskip("psutil")
from ray_on_loopback import ISSUE, PROBE, PatchError, patch
from supervise import Proc, Supervisor, family, listening

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process sessions: Linux")

# A service whose processes outlive their parent: a child that ignores SIGTERM, and a daemon that
# double-forks (its parent exits, so it is in the session but no longer in the tree), and a socket
# on 127.0.0.1 held by the service's first process.
SERVICE = textwrap.dedent("""
    import os, signal, socket, sys, time
    s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
    if os.fork() == 0:                      # the stubborn child
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(600); os._exit(0)
    middle = os.fork()
    if middle == 0:                         # the daemon: fork again, the middle process exits
        if os.fork() == 0:
            time.sleep(600); os._exit(0)
        os._exit(0)
    os.waitpid(middle, 0)
    print("ready", flush=True)
    time.sleep(600)
""")


def wait_for(predicate, timeout: float = 20.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow  # real processes started, listened on and stopped (10 s)
def test_a_service_its_session_and_its_socket_are_found_and_all_stopped_by_pid(tmp_path):
    supervisor = Supervisor(tmp_path, log=lambda msg: None)
    service = supervisor.spawn("tree", [sys.executable, "-c", SERVICE], {"PATH": "/usr/bin:/bin"})
    assert wait_for(lambda: "ready" in service.log.read_text())
    service.refresh()
    # the root, the stubborn child and the double-forked daemon (reparented away from the tree)
    assert wait_for(lambda: (service.refresh(), len(service.left()))[1] == 3), service.left()
    root_tree = {service.root, *map(Proc.of, psutil.Process(service.root.pid).children(recursive=True))}
    assert len(root_tree) == 2, "the daemon should have left the tree: this test would not test sessions"
    assert family(service.root) == set(service.left())
    heard = listening(service.left())
    assert len(heard) == 1 and next(iter(heard)).startswith("127.0.0.1:")

    left = supervisor.stop()
    assert left == []
    assert not [p for p in service.procs if p.alive()]
    assert service.popen.returncode == -signal.SIGTERM


def test_a_reused_pid_is_not_taken_for_ours():
    me = Proc.of(psutil.Process())
    assert me.alive()
    impostor = Proc(me.pid, me.create_time - 1.0)  # same pid, another process
    assert not impostor.alive() and impostor.process() is None
    impostor.signal(signal.SIGKILL)  # refused: we are still here
    assert me.alive()


def fake_services(resolve: bool = True) -> ModuleType:
    services = ModuleType("services")
    if resolve:
        services.resolve_ip_for_localhost = lambda host: "192.0.2.1" if host == "127.0.0.1" else host
    services.canonicalize_bootstrap_address = lambda addr: (
        lambda host, port: f"{services.resolve_ip_for_localhost(host)}:{port}")(*addr.split(":"))
    return services


def start_that_canonicalizes(address):
    return services.canonicalize_bootstrap_address(address)  # noqa: F821 (only its source is read)


def start_that_does_not(address):
    return address


def test_the_ray_59110_patch_applies_to_a_ray_that_has_the_function():
    services = fake_services()
    patch(services, start_that_canonicalizes)
    assert services.canonicalize_bootstrap_address(PROBE) == PROBE


@pytest.mark.parametrize("services, start, says", [
    (fake_services(resolve=False), start_that_canonicalizes, "resolve_ip_for_localhost is gone"),
    (fake_services(), start_that_does_not, "no longer resolves --address"),
])
def test_the_ray_59110_patch_fails_loudly_when_ray_changed(services, start, says):
    with pytest.raises(PatchError, match=says) as e:
        patch(services, start)
    assert ISSUE in str(e.value)


def test_the_ray_59110_patch_applies_to_the_installed_ray():
    # the real `ray` command line through the patch: exit 0 only if every check in `patch` passed
    r = subprocess.run([sys.executable, str(LOOPBACK / "ray_on_loopback.py"), "--version"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert version("ray") in r.stdout
