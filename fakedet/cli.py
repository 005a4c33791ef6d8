"""The `fakedet` command: one subcommand per job; each module adds its own subparsers."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from fakedet import __version__
    from fakedet.data import cli as data_cli
    from fakedet import train_cli

    parser = argparse.ArgumentParser(
        prog="fakedet", description="Train, evaluate and sweep small CNN detectors of AI-generated images."
    )
    parser.add_argument("--version", action="version", version=f"fakedet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    data_cli.add_subcommands(sub)  # prepare, make-synthetic
    train_cli.add_subcommands(sub)  # train, predict
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
