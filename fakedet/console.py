"""What the command lines, the sweep and its callbacks print: one line at a time, flushed at once, so a
line reaches a log file or a `ray job logs` stream in the order it was said, even when stdout is a pipe;
and the tables they print, laid out for a person to read in `WIDTH` columns."""

from __future__ import annotations

import codecs
import math
import numbers
import os
import re
import sys
import textwrap
from collections.abc import Callable, Sequence

import pandas as pd

# The width every printed table and long line is laid out for: a terminal split in two, a log viewer or
# a CI page shows 120 columns without wrapping them mid-word.
WIDTH = 120
# A text column with a value longer than this share of the width goes under the table as numbered notes:
# one long sentence would otherwise widen every row to its length.
NOTE_SHARE = 3


# What the printed analysis uses beyond ASCII, and what a terminal or log that cannot show it reads instead
# (PYTHONIOENCODING=ascii, a latin-1 locale, a C locale's ASCII stdout); anything else becomes "?".
ASCII_FALLBACKS = {
    "ρ": "rho", "τ": "tau", "±": "+/-", "×": "x", "→": "->", "←": "<-", "≤": "<=", "≥": ">=", "≈": "~", "≠": "!=",
    "…": "...", "–": "-", "—": "--", "−": "-", "·": ".", "°": " deg", "µ": "u", "μ": "u", "α": "alpha", "β": "beta",
    "Δ": "delta", "δ": "delta", "σ": "sigma", "χ": "chi", "²": "^2", "√": "sqrt", "‰": " per mille", "•": "*",
    "‘": "'", "’": "'", "“": '"', "”": '"', "✓": "ok", "✗": "x",
}
ERRORS = "fakedet-ascii"


def _fallback(error: UnicodeError) -> tuple[str, int]:
    if not isinstance(error, UnicodeEncodeError):
        raise error
    text = error.object[error.start:error.end]
    return "".join(ASCII_FALLBACKS.get(ch, "?") for ch in text), error.end


codecs.register_error(ERRORS, _fallback)


def robust_output() -> None:
    """The command lines' stdout and stderr never crash on what they print: a character the stream's
    encoding lacks is written as its ASCII fallback (`ASCII_FALLBACKS`; latin-1 keeps its own ±, ×, µ), and a
    closed pipe (`... | head -3`) drops what is written after it closed (`say`) instead of ending the run."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors=ERRORS)


_STDOUT_GONE = False


def stdout_gone() -> bool:
    """Whether stdout's reader has gone (`say` then drops what it is given): a last word that matters (a
    resume command) is then said on stderr too."""
    return _STDOUT_GONE


def _drop_stdout() -> None:
    """The reader of stdout has gone: what is written from now on goes to /dev/null (Python's own advice
    for SIGPIPE, https://docs.python.org/3/library/signal.html#note-on-sigpipe), the run goes on."""
    global _STDOUT_GONE
    _STDOUT_GONE = True
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # not a real file descriptor (a test's capture): nothing to redirect
        pass


def say(msg: str) -> None:
    try:
        print(msg, flush=True)
    except BrokenPipeError:
        _drop_stdout()


def say_last(msg: str) -> None:
    """`say`, and on stderr as well once stdout's reader has gone: what to do next must reach someone."""
    say(msg)
    if _STDOUT_GONE:
        print(msg.strip(), file=sys.stderr, flush=True)


def tagged(tag: str) -> Callable[[str], None]:
    """`say` with every line prefixed by `[tag]`, for a part whose lines interleave with others'."""

    def say_tagged(msg: str) -> None:
        say(f"[{tag}] {msg}")

    return say_tagged


def wrap(text: str, width: int = WIDTH, indent: str = "  ") -> str:
    """Each line of `text` longer than `width` folded at spaces, its continuation lines indented; a word
    longer than a line (a URL, a path) is kept whole rather than cut."""
    return "\n".join(
        textwrap.fill(line, width, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False)
        if len(line) > width else line
        for line in text.split("\n")
    )  # fmt: skip


# a column whose every cell reads as a number, an interval or a p-value is right-aligned
_NUMBER_LIKE = re.compile(r"^[-+<>\[\]()0-9.,±→ e%]*$")


def _cell(value: object, floats: Callable[[float], str]) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return "-"
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, numbers.Integral)):
        return floats(float(value))
    return str(value)


def table(frame: pd.DataFrame, title: str = "", *, keys: Sequence[str] = (), floats: Callable[[float], str] = "{:.4g}".format,
          width: int = WIDTH) -> str:  # fmt: skip
    """`frame` as text that fits `width` columns (title, table, notes), for a person to read:

    - a column holding one value on every row (of two or more) is said once, under the title
      (`n = 6`), not repeated per row (a key column only while another key column stays); one with
      no value on any row is named once, one empty on every row left out;
    - a text column with a value longer than `width / NOTE_SHARE` becomes marks [1], [2], ... with each
      distinct text said once under the table;
    - columns that do not fit side by side continue in further blocks, each repeating the `keys`
      columns (the row labels) on the left.

    Floats are written by `floats`, a missing value as "-"; numbers are right-aligned, text left-aligned.
    """
    lines = [wrap(title, width)] if title else []
    if frame.empty:
        return "\n".join([*lines, "(no rows)"])
    text = pd.DataFrame({c: [_cell(v, floats) for v in frame[c]] for c in frame.columns}, index=range(len(frame)))
    numeric = {c: not pd.api.types.is_bool_dtype(frame[c]) and all(_NUMBER_LIKE.match(v) for v in text[c]) for c in text}
    keys = [k for k in keys if k in text]
    if len(text) > 1:
        constant = [c for c in text.columns if text[c].nunique() == 1]
        kept_keys = [k for k in keys if k not in constant]
        if keys and not kept_keys:  # every key constant: the first stays as the row label
            constant.remove(keys[0])
            kept_keys = keys[:1]
        said = [f"{c} = {text[c].iloc[0]}" for c in constant if text[c].iloc[0] not in ("", "-")]
        if said:
            lines.append(wrap("every row: " + "; ".join(said), width))
        missing = [str(c) for c in constant if text[c].iloc[0] == "-"]
        if missing:
            lines.append(wrap("no value on any row: " + ", ".join(missing), width))
        text = text.drop(columns=constant)  # an empty text column (no note on any row) goes unsaid
        keys = kept_keys
    notes: dict[str, int] = {}
    for c in text.columns:
        if c not in keys and not numeric[c] and text[c].str.len().max() > width // NOTE_SHARE:
            marks = []
            for v in text[c]:
                if v in ("", "-"):
                    marks.append("")
                    continue
                notes.setdefault(v, len(notes) + 1)
                marks.append(f"[{notes[v]}]")
            text[c] = marks
    widths = {c: max(len(str(c)), text[c].str.len().max()) for c in text.columns}
    others = [c for c in text.columns if c not in keys]
    key_width = sum(widths[k] + 2 for k in keys)
    blocks: list[list[str]] = []
    for c in others:
        if blocks and key_width + sum(widths[o] + 2 for o in blocks[-1]) + widths[c] <= width:
            blocks[-1].append(c)
        else:
            blocks.append([c])
    for i, block in enumerate(blocks or [[]]):
        columns = [*keys, *block]
        if i:
            lines.append("")
        align = {c: (str.rjust if numeric[c] else str.ljust) for c in columns}
        lines.append("  ".join(align[c](str(c), widths[c]) for c in columns).rstrip())
        lines += ["  ".join(align[c](row[c], widths[c]) for c in columns).rstrip() for row in text.to_dict("records")]
    for note, n in notes.items():
        lines.append(wrap(f"[{n}] {note}", width, indent=" " * (len(str(n)) + 3)))
    return "\n".join(lines)
