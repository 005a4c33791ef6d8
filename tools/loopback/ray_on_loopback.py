#!/usr/bin/env python
"""`ray start` for a second node on the head's host, with Ray's rewrite of 127.0.0.1 turned off.

Ray 2.60's `ray start --address 127.0.0.1:P` rewrites the address to the machine's outward IP, where a
head bound to 127.0.0.1 does not listen, and refuses a second node under the switch that keeps
127.0.0.1 (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`) (ray-project/ray#59110). This runs Ray's own command
line with `ray._private.services.resolve_ip_for_localhost` replaced by the identity; the node's own
address is then the one it reaches the head from, 127.0.0.1.

That function is Ray's private code. `patch` checks that it is there, that `ray start` resolves the
head's address through the module (`services.canonicalize_bootstrap_address`) and that, once
patched, 127.0.0.1 stays 127.0.0.1; otherwise it exits 3 with a message naming ray#59110, instead of
sending the node to the outward address without a word.

    python tools/loopback/ray_on_loopback.py start --address 127.0.0.1:PORT [ray start options]
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from types import ModuleType

ISSUE = "ray-project/ray#59110"
PROBE = "127.0.0.1:6379"


class PatchError(RuntimeError):
    pass


def patch(services: ModuleType, start: Callable) -> None:
    """Make `services` leave 127.0.0.1 alone for `start` (the `ray start` command's function), or raise."""
    why = f"the work-around for {ISSUE} (a second Ray node on 127.0.0.1) no longer applies to this Ray"
    if not callable(getattr(services, "resolve_ip_for_localhost", None)):
        raise PatchError(f"ray._private.services.resolve_ip_for_localhost is gone: {why}; "
                         f"see whether {ISSUE} is fixed, and update tools/loopback/ray_on_loopback.py")
    try:
        source = inspect.getsource(inspect.unwrap(start))
    except (OSError, TypeError):
        source = ""
    if "services.canonicalize_bootstrap_address(" not in source:
        raise PatchError(f"`ray start` no longer resolves --address through "
                         f"ray._private.services.canonicalize_bootstrap_address: {why}")
    services.resolve_ip_for_localhost = lambda host: host
    resolved = services.canonicalize_bootstrap_address(PROBE)
    if resolved != PROBE:
        raise PatchError(f"patched, yet {PROBE} still resolves to {resolved}: {why}")


def main(argv: list[str]) -> int:
    import ray._private.services as services
    from ray.scripts.scripts import main as ray_main, start

    try:
        patch(services, start.callback)
    except PatchError as e:
        print(f"ray_on_loopback: {e}", file=sys.stderr, flush=True)
        return 3
    sys.argv = ["ray", *argv]
    return ray_main()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
