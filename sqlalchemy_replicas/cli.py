"""Command line: ``sqlalchemy-replicas demo`` (or ``python -m sqlalchemy_replicas demo``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = argparse.ArgumentParser(
        prog="sqlalchemy-replicas",
        description="Safe read replicas for SQLAlchemy.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "demo",
        help="start a real local primary with two replicas and show where each statement goes",
    )
    args = parser.parse_args(argv)
    if args.command == "demo":
        from ._demo import main as demo
        from .exc import MissingDependency, ServerBinaryNotFound

        try:
            return demo(sys.stdout)
        except (MissingDependency, ServerBinaryNotFound) as exc:
            # Something to install, not a bug: the message says what; no traceback.
            print(f"{parser.prog}: error: {exc}", file=sys.stderr)
            return 1
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
