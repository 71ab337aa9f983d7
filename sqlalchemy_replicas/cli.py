"""Command line: ``sqlalchemy-replicas status`` and ``sqlalchemy-replicas demo``
(or ``python -m sqlalchemy_replicas ...``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

_STATUS_DESCRIPTION = """\
Show the primary and each replica: the role the server reports, lag (seconds,
and bytes on PostgreSQL or transactions on MariaDB/MySQL), applied position,
health and the reason a replica gets no reads. The servers come from the
options, else from the application's settings, as ReplicaRouter.from_env()
reads them: DATABASE_URL, DATABASE_REPLICA_URLS, SQLALCHEMY_REPLICAS_<OPTION>
(e.g. SQLALCHEMY_REPLICAS_MAX_LAG). Passwords are never printed.
"""

_STATUS_EPILOG = """\
exit status (a monitoring check, as Nagios plugins use it):
  0  all healthy
  1  a replica lags more than max_lag, but every server is reachable
  2  a replica is down, unreachable or not a replica of this primary, or the
     primary is unreachable or read-only
  3  configuration error (bad or missing settings or options)
With --watch: the status of the last round shown.
See docs/operations.md for the table, the JSON schema and checks.
"""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors exit with ``usage_error_status``."""

    usage_error_status = 2

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(self.usage_error_status, f"{self.prog}: error: {message}\n")


def _parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The command's parser, and that of ``status``."""
    from ._status_command import DEFAULT_TIMEOUT, DEFAULT_WATCH, check_seconds

    parser = _Parser(
        prog="sqlalchemy-replicas",
        description="Safe read replicas for SQLAlchemy.",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    commands.add_parser(
        "demo",
        help="start a real local primary with two replicas and show where each statement goes",
    )
    kwargs: dict[str, Any] = {
        "help": "show the primary and replicas: role, lag, position, health (exit 0/1/2/3)",
        "description": _STATUS_DESCRIPTION,
        "epilog": _STATUS_EPILOG,
        "formatter_class": argparse.RawDescriptionHelpFormatter,
    }
    status = commands.add_parser("status", **kwargs)
    # A usage error of `status` is a configuration error: 3, as documented.
    status.usage_error_status = 3
    status.add_argument("--json", action="store_true", help="print one JSON document (per round)")
    status.add_argument(
        "--watch",
        nargs="?",
        type=check_seconds,
        const=DEFAULT_WATCH,
        default=None,
        metavar="SECONDS",
        help=f"refresh every SECONDS (default {DEFAULT_WATCH:g}) until Ctrl-C",
    )
    status.add_argument(
        "--router",
        metavar="MODULE:ATTRIBUTE",
        help="the application's own ReplicaRouter (or a function returning one), e.g. "
        "myapp.db:router: its engines' creator, connect_args and do_connect listeners "
        "apply to the command's queries; instead of the server options and settings",
    )
    status.add_argument("--primary", metavar="URL", help="the primary (else DATABASE_URL)")
    status.add_argument(
        "--replica",
        action="append",
        metavar="URL",
        help="a replica, URL or name=URL; repeat for each (else DATABASE_REPLICA_URLS)",
    )
    status.add_argument(
        "--replicas", metavar="URLS", help="comma-separated replica URLs or name=URL pairs"
    )
    status.add_argument(
        "--prefix",
        default="",
        help="put in front of each setting's name, as from_env(prefix=...), e.g. ANALYTICS_",
    )
    status.add_argument(
        "--max-lag",
        type=check_seconds,
        metavar="SECONDS",
        help="over this a replica is lagging (else SQLALCHEMY_REPLICAS_MAX_LAG, default 5)",
    )
    status.add_argument(
        "--timeout",
        type=check_seconds,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"for each server to answer (default {DEFAULT_TIMEOUT:g})",
    )
    return parser, status


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser, status_parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # Reported by the subcommand's parser: for `status`, exit status 3.
        (status_parser if args.command == "status" else parser).error(
            f"unrecognized arguments: {' '.join(extra)}"
        )
    if args.command == "status":
        from ._status_command import run

        return run(args)
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
    return 2  # not reached: error() exits


if __name__ == "__main__":
    sys.exit(main())
