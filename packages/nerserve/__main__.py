"""`python -m nerserve tag ...` (the `tag` subcommand; the other subcommands come with the top-level CLI)."""

from __future__ import annotations

import argparse
import sys

from .tag import cli as tag_cli


def main() -> int:
    parser = argparse.ArgumentParser(prog="nerserve")
    commands = parser.add_subparsers(dest="command", required=True)
    tag_cli.add_arguments(commands.add_parser("tag", help="tag a corpus"))
    args = parser.parse_args()
    return tag_cli.main(args)


if __name__ == "__main__":
    sys.exit(main())
