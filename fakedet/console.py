"""What the command lines, the sweep and its callbacks print: one line at a time, flushed at once, so a
line reaches a log file or a `ray job logs` stream in the order it was said, even when stdout is a pipe."""

from __future__ import annotations

from collections.abc import Callable


def say(msg: str) -> None:
    print(msg, flush=True)


def tagged(tag: str) -> Callable[[str], None]:
    """`say` with every line prefixed by `[tag]`, for a part whose lines interleave with others'."""

    def say_tagged(msg: str) -> None:
        say(f"[{tag}] {msg}")

    return say_tagged
